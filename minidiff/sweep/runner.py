"""Run a sweep: in one process, or as one rank of `torchrun` (torch.distributed), resumable.

    python -m minidiff sweep spec.json --out sweep/                                  # one process
    torchrun --standalone --nproc_per_node=2 -m minidiff sweep spec.json --out sweep/ # two ranks, one machine

Under torchrun (RANK and WORLD_SIZE set in the environment) every rank joins the process group (`choose_backend`):
nccl only when every local rank has a GPU of its own (LOCAL_WORLD_SIZE <= torch.cuda.device_count(): NCCL refuses
two ranks on one GPU), else gloo, with ranks then sharing the GPUs (local rank modulo the GPU count); forcing nccl
with `backend="nccl"` (`--backend nccl`) on too few GPUs is a clear error. The sweep's only collectives are its
barriers, and they run on a gloo group with a timeout of BARRIER_TIMEOUT: a rank whose share finished early waits
at the final barrier for the slowest rank instead of dying on NCCL's 10-minute (gloo's 30-minute) default.
Then, on every rank:
1. read which jobs are done (their PNG and their manifest line both exist) and barrier, so that every rank
   sees the same list of jobs left to do;
2. take every WORLD_SIZE-th of them, starting at RANK; claim each job before doing it (claims.py: an exclusive-create
   file next to the PNG, so that independent runs or several torchrun worlds on one folder do each job once, and
   a job claimed elsewhere is skipped); load the pipeline once; for each job build its scheduler,
   seed a fresh `torch.Generator` from the job's seed (never a shared stream), generate, write the PNG to a
   temporary name and rename it (a killed job leaves no half-written PNG), then append one manifest line;
3. barrier; rank 0 makes the grids and index.html (report.py).
An image so depends only on its job, never on the rank or the world size. A job that raises is recorded in the
manifest with its error, and the sweep goes on.

The manifest (manifest.jsonl) has one JSON object a line: job_id, the job, rank, seconds, peak_rss_mib (the
process's peak resident memory so far: on a CPU it grows, it does not reset per job), on CUDA peak_gpu_mib (the
most GPU memory PyTorch's allocator held during this job: `torch.cuda.max_memory_allocated`, reset per job),
sha256 of the PNG file, or error. Ranks append whole lines with one write each to a file opened O_APPEND, which Linux keeps whole on a
local disk; on a shared network file system across hosts, give each host its own --out and merge afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import socket
import time
from contextlib import contextmanager
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minidiff.pipelines import StableDiffusionPipeline
from minidiff.schedulers.names import find_sampler
from minidiff.sweep.claims import claim_path, release, try_claim
from minidiff.sweep.spec import Job, Spec, check_job_count, expand_jobs, job_count
from minidiff.utils.device import auto_dtype, peak_gpu_memory_mib, synchronize

MANIFEST = "manifest.jsonl"
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = ("auto", "nccl", "gloo")
BARRIER_TIMEOUT = timedelta(days=7)  # a sweep's ranks may finish hours apart; a hung peer is a killed job, resumable


# ----- the process group ---------------------------------------------------------------------------------------


def local_world_size() -> int:
    """How many ranks run on this host (torchrun's LOCAL_WORLD_SIZE; WORLD_SIZE when it is not set)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def choose_backend(requested: str = "auto") -> str:
    """nccl when every local rank has a GPU of its own, else gloo; `requested="nccl"` on too few GPUs raises."""
    if requested not in BACKENDS:
        raise ValueError(f"backend {requested!r} is not one of {list(BACKENDS)}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    ranks = local_world_size()
    if requested == "nccl" and ranks > gpus:
        raise RuntimeError(
            f"backend nccl needs one GPU per rank, but this host runs {ranks} rank(s) and PyTorch sees {gpus} GPU(s); "
            f"launch at most {gpus} process(es) per node (torchrun --nproc_per_node={max(gpus, 1)}), or use --backend gloo")
    if requested != "auto":
        return requested
    return "nccl" if 0 < ranks <= gpus else "gloo"


@contextmanager
def process_group(backend: str = "auto"):
    """(rank, world_size, barrier_group): joins torch.distributed when launched by torchrun, else (0, 1, None)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield 0, 1, None
        return
    import torch.distributed as dist

    backend = choose_backend(backend)
    if backend == "nccl":  # device_id binds this rank's communicator to its own GPU
        dist.init_process_group(backend="nccl", device_id=torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
        barrier_group = dist.new_group(backend="gloo", timeout=BARRIER_TIMEOUT)  # barriers wait on the CPU, for days
    else:
        dist.init_process_group(backend="gloo", timeout=BARRIER_TIMEOUT)
        barrier_group = None  # the default group, with the long timeout
    try:
        yield dist.get_rank(), dist.get_world_size(), barrier_group
    finally:
        dist.destroy_process_group()


def barrier(world_size: int, group=None) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier(group=group)


def device_for_rank() -> torch.device:
    """cuda:LOCAL_RANK with a GPU per rank; ranks beyond the GPU count share them (modulo); the CPU without CUDA."""
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        torch.cuda.set_device(index)
        torch.backends.cudnn.benchmark = False  # autotuning may pick different kernels on different GPUs
        torch.backends.cudnn.deterministic = True
        return torch.device("cuda", index)
    return torch.device("cpu")


# ----- what is done ---------------------------------------------------------------------------------------------


def read_manifest(out: Path) -> list[dict]:
    """Every whole line of the manifest (a line cut short by a kill is skipped)."""
    path = out / MANIFEST
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def done_job_ids(out: Path) -> set[str]:
    """Jobs whose PNG exists and whose manifest line says it succeeded."""
    return {entry["job_id"] for entry in read_manifest(out) if "error" not in entry and (out / f"{entry['job_id']}.png").is_file()}


def append_manifest_line(out: Path, entry: dict) -> None:
    line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
    descriptor = os.open(out / MANIFEST, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, line)  # one write of the whole line: appends never interleave on a local disk
    finally:
        os.close(descriptor)


# ----- one job ---------------------------------------------------------------------------------------------------


def load_pipeline_for(spec: Spec, device: torch.device) -> StableDiffusionPipeline:
    dtype = auto_dtype(device) if spec.dtype == "auto" else TORCH_DTYPES[spec.dtype]  # auto: fp16 on CUDA
    path = Path(spec.weights).expanduser()
    if path.is_file():
        pipeline = StableDiffusionPipeline.from_single_file(path, dtype=dtype)
    else:
        pipeline = StableDiffusionPipeline.from_pretrained(spec.weights, dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def run_job(pipeline: StableDiffusionPipeline, base_scheduler_config: dict, job: Job, out: Path) -> bytes:
    """Generate one job's image, write it as out/<job_id>.png (atomically), return the PNG's bytes."""
    pipeline.scheduler = find_sampler(job.scheduler).from_config(base_scheduler_config)
    generator = torch.Generator().manual_seed(job.seed)  # the job's own stream: the image depends on the job only
    image = pipeline(
        job.prompt, negative_prompt=job.negative_prompt or None, height=job.height, width=job.width,
        num_inference_steps=job.steps, guidance_scale=job.guidance_scale, generator=generator,
    ).images[0]
    target = out / f"{job.job_id}.png"
    temporary = out / f".{job.job_id}.{os.getpid()}.png.tmp"
    image.save(temporary, format="PNG")
    os.replace(temporary, target)  # atomic: a reader sees no PNG or the whole PNG
    return target.read_bytes()


def _done_meanwhile(out: Path, job: Job) -> bool:
    """Finished by another runner since this one read the manifest (its PNG first, so the manifest is rarely read)."""
    return (out / f"{job.job_id}.png").is_file() and job.job_id in done_job_ids(out)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def gpu_memory_fields(device: torch.device) -> dict:
    """{"peak_gpu_mib": ...} on CUDA (`torch.cuda.max_memory_allocated`), nothing on another device."""
    peak = peak_gpu_memory_mib(device)
    return {} if peak is None else {"peak_gpu_mib": round(peak, 1)}


# ----- the sweep ------------------------------------------------------------------------------------------------


def run_sweep(spec: Spec, out: str | Path, progress: bool = True, allow_many_jobs: bool = False,
              backend: str = "auto") -> dict:
    """Do this process's share of the jobs not done yet; returns counts {total, skipped, done, failed} for this rank
    (skipped: done before, or claimed by another runner). More than spec.MAX_JOBS jobs need `allow_many_jobs`;
    `backend` (auto, nccl, gloo) is the process group's under torchrun (`choose_backend`)."""
    check_job_count(spec, allow_many_jobs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = expand_jobs(spec)
    with process_group(backend) as (rank, world_size, barrier_group):
        done = done_job_ids(out)
        if rank == 0:
            for stale in out.glob(".*.png.tmp"):  # left by a job killed halfway; a live writer holds its job's claim
                if not claim_path(out, stale.name.split(".")[1]).exists():
                    stale.unlink(missing_ok=True)
        barrier(world_size, barrier_group)  # no rank writes before every rank has read what is done
        todo = [job for job in jobs if job.job_id not in done]
        mine = todo[rank::world_size]
        counts = {"total": len(jobs), "skipped": len(jobs) - len(todo), "done": 0, "failed": 0}
        pipeline = None
        for job in tqdm(mine, desc=f"rank {rank}", position=rank, disable=not progress, unit="image"):
            claim = try_claim(out, job.job_id)  # another runner (another terminal, host or torchrun world) may have it
            if claim is None or _done_meanwhile(out, job):
                if claim is not None:
                    release(claim)
                counts["skipped"] += 1
                continue
            try:
                if pipeline is None:  # loaded once, and only by a runner that got a job
                    torch.set_num_threads(spec.threads)  # the same in every process: see spec.py on why it decides the bits
                    device = device_for_rank()
                    pipeline = load_pipeline_for(spec, device)
                    base_config = dict(pipeline.scheduler.config)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)  # peak_gpu_mib is this job's
                start = time.perf_counter()
                entry = {"job_id": job.job_id, "job": asdict(job), "rank": rank, "world_size": world_size,
                         "host": socket.gethostname()}
                try:
                    png = run_job(pipeline, base_config, job, out)  # PIL output: the device has finished
                    entry.update(seconds=round(time.perf_counter() - start, 3), peak_rss_mib=round(peak_rss_mib(), 1),
                                 **gpu_memory_fields(device), sha256=hashlib.sha256(png).hexdigest())
                    counts["done"] += 1
                except Exception as error:  # noqa: BLE001 - a failing job is recorded, the sweep goes on
                    entry.update(seconds=round(time.perf_counter() - start, 3), error=f"{type(error).__name__}: {error}")
                    counts["failed"] += 1
                append_manifest_line(out, entry)
            finally:
                release(claim)  # after the manifest line: whoever claims the job next sees it done
        barrier(world_size, barrier_group)  # long timeout: early ranks wait for the slowest
        if rank == 0:
            from minidiff.sweep.report import write_report

            write_report(out, jobs, read_manifest(out))
    return counts


def estimate_seconds(spec: Spec, device: torch.device | str | None = None) -> tuple[float, int]:
    """(seconds for one UNet call at the spec's size, model calls of the whole sweep): measured, not guessed.
    The call runs where the sweep would (`device_for_rank` unless `device` is given), on inputs made there, timed
    between two synchronisations (CUDA queues its work: without them the clock reads the launch, not the call)."""
    pipeline = load_pipeline_for(spec, device_for_rank() if device is None else torch.device(device))
    base_config = dict(pipeline.scheduler.config)
    calls = 0
    for name in spec.schedulers:  # each (scheduler, steps) pair once, times the jobs that share it: never every job
        for steps in spec.steps:
            scheduler = find_sampler(name).from_config(base_config)
            scheduler.set_timesteps(steps)
            calls += len(scheduler.timesteps)  # second-order schedulers call the model about twice per step
    calls *= job_count(spec) // (len(spec.schedulers) * len(spec.steps))
    where, dtype = pipeline._execution_device, pipeline.unet.dtype
    latents = torch.randn(2, pipeline.unet.config.in_channels, spec.height // 8, spec.width // 8, dtype=dtype, device=where)
    context = torch.randn(2, 77, pipeline.unet.config.cross_attention_dim, dtype=dtype, device=where)
    with torch.no_grad():
        pipeline.unet(latents, 999, encoder_hidden_states=context)  # warm-up
        synchronize(where)
        start = time.perf_counter()
        pipeline.unet(latents, 999, encoder_hidden_states=context)
        synchronize(where)
    return time.perf_counter() - start, calls
