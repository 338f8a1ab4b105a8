"""Every figure of docs/performance.md in one run: minidiff vs diffusers on the same full-size random SD 1.5 weights.

    python benchmarks/run_all.py [--weights ~/.cache/minidiff/random-sd15] [--repeats 5] [--skip-compile] [--out FILE]
                                 [--dtypes fp32,bf16] [--only SECTIONS] [--memory-limits 3072,2048,1536]

What is measured (in each of --dtypes: fp32, and bf16 where the CPU has bfloat16 units, see below), each as a
ratio minidiff / diffusers next to its target:

    UNet step      one guided step: batch 2 (uncond + text), latents (2, 4, 64, 64), context (2, 77, 768);
                   achieved TFLOP/s next to the CPU's nominal peak; minidiff eager and (opt-in) torch.compile'd
    VAE decode     latents (1, 4, 64, 64) -> image (1, 3, 512, 512)
    tiled decode   latents (1, 4, 128, 128) -> 1024x1024: peak memory tiled vs untiled, max difference
    generation     the whole 512x512 text-to-image run, 20 steps (PNDM, the folder's scheduler): wall time and
                   peak RSS of a fresh process (load + generate), each library as it runs by default
    loading        `from_pretrained` (folder) and `from_single_file` of the whole pipeline, cold (the weight
                   files evicted from the page cache) and warm, median of --repeats fresh processes
    memory limit   the generation (fastest of --dtypes, 2 steps) inside cgroup memory limits (--memory-limits, MiB; page cache
                   counted, weight files evicted first): which limits each library completes under, and how fast
    scheduler      one `step` as a share of a UNet step (bf16 if measured, else fp32)
    quality        bf16 (and fp16) vs fp32 images from the same seed: PSNR (exact denoiser, random SD weights)
    profile        where one UNet step's time goes (benchmarks/profile_unet.py)

How it is measured, on a machine shared with others:
- Each library runs in its own worker process, as its users run it: minidiff as its CLI does (channels-last
  weights, `keep_freed_memory()`), diffusers as `from_pretrained` gives it. A third worker, diffusers with
  the same allocator setting, shows what that setting alone is worth.
- Timed calls alternate between the workers (A B A B ...), after a warm-up call each, and each timed call
  waits (up to a minute) until no other process is running; the table gives medians, and how many of the
  calls found the machine quiet. The load average is printed with every section.
- Memory figures come from fresh subprocesses (VmHWM, the peak resident set of /proc/self/status).

`--dtypes`: by default fp32, plus bf16 on a CPU with AMX-BF16 or AVX512-BF16 (`fastest_cpu_dtype()`). Without
them (an AVX2-only CPU, e.g. AMD EPYC before Zen 4) torch runs bfloat16 and float16 through slow generic
kernels: measured on such a CPU, a 8192x1280x1280 matmul takes 0.22 s in fp32 and 31 s in bf16, so a bf16 UNet
step would take many minutes. Every "bf16" row below is then left out (the report says so).

`--tiny` runs everything on tiny random weights in a minute: a smoke test of this script, not a benchmark.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the checkout's minidiff, benchmarks and weights_scripts, without `pip install -e .`
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "weights_scripts"))

PROMPT = "a photograph of an astronaut riding a horse"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LIBRARIES = ("minidiff", "diffusers", "diffusers+malloc")  # the third: diffusers with minidiff's allocator setting

# the targets: ratio minidiff / diffusers must be at most this
TARGETS = {
    ("unet", "fp32"): 0.85, ("unet", "bf16"): 0.6, ("vae", "fp32"): 0.6, ("vae", "bf16"): 0.6,
    "generation": 0.7, "load": 1.0,
}


# ----- the machine ----------------------------------------------------------------------------------------------


def cpu_info() -> dict:
    """Model name, flags, clock (MHz) and cores from /proc/cpuinfo, and what torch sees."""
    info = {"flags": set(), "mhz": 0.0, "model": "unknown"}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "flags":
            info["flags"] = set(value.split())
        elif key == "cpu MHz":
            info["mhz"] = float(value)
        elif key == "model name":
            info["model"] = value
    info["cores"] = os.cpu_count()
    info["threads"] = torch.get_num_threads()
    return info


def nominal_peaks(info: dict) -> dict[str, float]:
    """FLOP/s at the reported clock: AVX-512 FMA (2 units x 16 fp32 lanes x 2 = 64 FLOP/cycle/core) and AMX-BF16
    (1024 FLOP/cycle/core). Turbo clocks are higher; a VM's reported clock is the base one."""
    cycles = info["mhz"] * 1e6 * info["threads"]
    peaks = {"fp32": 64 * cycles if "avx512f" in info["flags"] else 32 * cycles}
    peaks["bf16"] = 1024 * cycles if "amx_bf16" in info["flags"] else 2 * peaks["fp32"]
    return peaks


def unet_step_flops(folder: Path) -> float:
    """FLOPs of one guided UNet step: convolutions and linear layers counted by torch's FlopCounterMode on
    the meta device (no memory, no time), attention as 4 * B * N * M * inner_dim per Attention call (QK^T and AV)."""
    from torch.utils.flop_counter import FlopCounterMode

    from minidiff.models.attention import Attention
    from minidiff.models.modeling import build_on_meta
    from minidiff.models.unet_2d_condition import UNet2DConditionModel

    unet = build_on_meta(UNet2DConditionModel, UNet2DConditionModel.load_config(folder / "unet"))
    attention_flops = []

    def count_attention(module, args, output):
        query = args[0]
        context = args[1] if len(args) > 1 and args[1] is not None else query
        attention_flops.append(4 * query.shape[0] * query.shape[1] * context.shape[1] * module.to_q.out_features)

    hooks = [module.register_forward_hook(count_attention) for module in unet.modules() if isinstance(module, Attention)]
    latents, timestep, context = unet_inputs(torch.float32, unet.config, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(latents, timestep, encoder_hidden_states=context)
    for hook in hooks:
        hook.remove()
    counted = counter.get_flop_counts()["Global"]
    dense = sum(flops for op, flops in counted.items() if str(op).split(".")[-1] in ("convolution", "addmm", "mm"))
    return dense + sum(attention_flops)


# ----- a quiet machine ------------------------------------------------------------------------------------------


def others_running() -> int:
    """Runnable tasks on the machine besides the one asking (procs_running of /proc/stat)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("procs_running"):
            return int(line.split()[1]) - 1
    return 0


QUIET_WAIT_SECONDS = 60.0  # 0 with --tiny: a smoke test measures nothing worth waiting for


def wait_for_quiet(timeout: float | None = None, samples: int = 4) -> bool:
    """Wait until no other process has been running for `samples` checks 0.25 s apart; False after `timeout`."""
    timeout = QUIET_WAIT_SECONDS if timeout is None else timeout
    deadline, calm = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        calm = calm + 1 if others_running() == 0 else 0
        if calm >= samples:
            return True
        time.sleep(0.25)
    return False


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


# ----- inputs ---------------------------------------------------------------------------------------------------


def unet_inputs(dtype: torch.dtype, config, device="cpu"):
    """The CFG batch of one SD 1.5 step: latents (2, 4, 64, 64), timestep 981, context (2, 77, 768)."""
    generator = torch.Generator().manual_seed(0)
    size = config["sample_size"] if isinstance(config, dict) else config.sample_size
    context_dim = config["cross_attention_dim"] if isinstance(config, dict) else config.cross_attention_dim
    latents = torch.randn(2, 4, size, size, generator=generator).to(device=device, dtype=dtype)
    context = torch.randn(2, 77, context_dim, generator=generator).to(device=device, dtype=dtype)
    return latents, torch.tensor(981, device=device), context


def vae_input(dtype: torch.dtype, size: int) -> torch.Tensor:
    """Latents as the pipeline hands them to the decoder: N(0, 1) / 0.18215, shape (1, 4, size, size)."""
    return (torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(1)) / 0.18215).to(dtype)


# ----- workers: one long-lived process per library, driven one JSON line at a time ------------------------------


class Worker:
    """A subprocess running `worker_main(library)`; `ask(command=..., ...)` sends one request, returns the reply."""

    def __init__(self, library: str):
        self.library = library
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", library], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.library} worker died on {request} (its stderr is above)")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.library} worker: {reply['error']}")
        return reply

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def load_model(library: str, kind: str, folder: str, dtype: torch.dtype):
    """The UNet or VAE as each library's users get it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if library == "minidiff":
            from minidiff.models.unet_2d_condition import UNet2DConditionModel
            from minidiff.models.vae import AutoencoderKL

            model_class = UNet2DConditionModel if kind == "unet" else AutoencoderKL
            model = model_class.from_pretrained(folder, subfolder=kind, torch_dtype=dtype)
            if kind == "vae" or dtype != torch.float32:  # as StableDiffusionPipeline lays out its conv weights
                model.to(memory_format=torch.channels_last)
            return model
        import diffusers

        model_class = diffusers.UNet2DConditionModel if kind == "unet" else diffusers.AutoencoderKL
        return model_class.from_pretrained(folder, subfolder=kind, torch_dtype=dtype).eval()


def worker_main(library: str) -> None:
    """Serve requests: load (a model), run (one timed call), compile, profile, save (the output), free."""
    from minidiff.utils.cpu import keep_freed_memory

    if library in ("minidiff", "diffusers+malloc"):
        keep_freed_memory()
    state: dict = {}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = handle(library, state, request)
        except Exception as error:  # reported to the parent, which stops with it
            reply = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(reply), flush=True)


def handle(library: str, state: dict, request: dict) -> dict:
    command = request["command"]
    if command in ("load", "free"):
        if state.pop("compiled", False):
            torch._dynamo.reset()  # drop the compiled graphs and the weights they froze
        state.clear()
        if command == "free":
            return {}
        dtype = DTYPES[request["dtype"]]
        start = time.perf_counter()
        model = load_model(library, request["kind"], request["folder"], dtype)
        seconds = time.perf_counter() - start
        if request["kind"] == "unet":
            latents, timestep, context = unet_inputs(dtype, model.config)
            state["call"] = lambda: model(latents, timestep, encoder_hidden_states=context).sample
        else:
            z = vae_input(dtype, request["size"])
            state["call"] = lambda: model.decode(z).sample
        state["model"], state["kind"], state["dtype"] = model, request["kind"], dtype
        return {"seconds": seconds}
    if command == "run":
        with torch.no_grad():
            start, cpu_start = time.perf_counter(), time.process_time()
            state["output"] = state["call"]()
            return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start}
    if command == "compile":  # minidiff's opt-in: StableDiffusionPipeline.compile() does this to the UNet and decoder
        model = state["model"] if state["kind"] == "unet" else state["model"].decoder
        model.forward = torch.compile(model.forward, options={"freezing": True})
        state["compiled"] = True
        with torch.no_grad():
            start = time.perf_counter()
            state["call"]()
            return {"seconds": time.perf_counter() - start}
    if command == "profile":
        from profile_unet import profile_step

        latents, timestep, context = unet_inputs(state["dtype"], state["model"].config)
        rows, wall = profile_step(state["model"], latents, timestep, context)
        return {"rows": rows, "wall": wall}
    if command == "save":
        torch.save(state["output"].float(), request["path"])
        return {}
    raise ValueError(f"unknown command {command!r}")


def interleaved(workers: dict[str, Worker], repeats: int) -> dict[str, dict]:
    """Time `run` on every worker, alternating; a warm-up call first. Median seconds and quiet-call count."""
    for worker in workers.values():
        worker.ask(command="run")  # warm-up: oneDNN builds and caches its kernels on the first call
    seconds = {name: [] for name in workers}
    quiet = dict.fromkeys(workers, 0)
    for _ in range(repeats):
        for name, worker in workers.items():
            quiet[name] += wait_for_quiet()
            seconds[name].append(worker.ask(command="run")["seconds"])
    return {name: {"median": statistics.median(times), "min": min(times), "quiet": quiet[name], "n": len(times)}
            for name, times in seconds.items()}


# ----- one-shot children: generation, loading, decode memory (a fresh process each, for peak RSS) ---------------


def status_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak) of this process, KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (this benchmark needs Linux)")


def load_pipeline(library: str, source: str, dtype: torch.dtype, single_file: bool = False, config: str | None = None):
    """`library`: "minidiff" (as its CLI loads it), "minidiff-low-memory" (the CLI's --low-memory) or "diffusers"."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if library.startswith("minidiff"):
            from minidiff.cli import load_pipeline as cli_load_pipeline
            from minidiff.pipelines import StableDiffusionPipeline

            if single_file:
                return StableDiffusionPipeline.from_single_file(source, torch_dtype=dtype, config=config)
            dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
            return cli_load_pipeline(source, dtype_name, low_memory=library == "minidiff-low-memory")
        import diffusers

        options = dict(torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
        if single_file:
            return diffusers.StableDiffusionPipeline.from_single_file(source, config=config, local_files_only=True, **options)
        return diffusers.StableDiffusionPipeline.from_pretrained(source, **options)


def import_library(library: str) -> None:
    """Import everything the load will use, before the clock starts (diffusers imports its pipelines lazily)."""
    if library.startswith("minidiff"):
        import minidiff.cli  # noqa: F401
        import minidiff.pipelines  # noqa: F401
    else:
        import diffusers

        diffusers.StableDiffusionPipeline  # noqa: B018  (the lazy import happens here)


def child_generate(library: str, dtype_name: str, folder: str, out: str, size: int, steps: int) -> dict:
    """Load the pipeline and generate one image; the process's peak RSS covers imports, load and generation."""
    import_library(library)  # minidiff's load_pipeline (the CLI's) calls keep_freed_memory() after loading
    baseline = status_kib("VmRSS")
    start = time.perf_counter()
    pipeline = load_pipeline(library, folder, DTYPES[dtype_name])
    pipeline.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()
    image = pipeline(PROMPT, height=size, width=size, num_inference_steps=steps,
                     generator=torch.Generator().manual_seed(0), output_type="np").images
    done = time.perf_counter()
    torch.save(torch.as_tensor(image), out)
    return {"load": loaded - start, "generate": done - loaded, "peak_mib": status_kib("VmHWM") / 1024,
            "baseline_mib": baseline / 1024}


def child_load(library: str, kind: str, dtype_name: str, source: str, config: str) -> dict:
    import_library(library)
    start = time.perf_counter()
    pipeline = load_pipeline(library, source, DTYPES[dtype_name], single_file=kind == "single_file", config=config)
    seconds = time.perf_counter() - start
    parameters = sum(p.numel() for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder) for p in module.parameters())
    return {"seconds": seconds, "parameters": parameters, "peak_mib": status_kib("VmHWM") / 1024}


def child_decode_memory(mode: str, dtype_name: str, folder: str, out: str, size: int) -> dict:
    """minidiff's VAE decode of (1, 4, size, size) latents, tiled or not: the peak RSS growth of the decode alone."""
    from minidiff.models.vae import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=DTYPES[dtype_name]).to(memory_format=torch.channels_last)
    if mode == "tiled":
        vae.enable_tiling()  # tiles of 64x64 latents (512x512 pixels), 16 latents of overlap
    z = vae_input(DTYPES[dtype_name], size)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = status_kib("VmRSS")
    start = time.perf_counter()
    with torch.no_grad():
        image = vae.decode(z).sample
    seconds = time.perf_counter() - start
    torch.save(image.float(), out)
    return {"seconds": seconds, "growth_mib": (status_kib("VmHWM") - before) / 1024}


def run_child(*arguments: str, cgroup: Path | None = None) -> dict:
    """This script's `--child` in a fresh process (inside `cgroup` if given, which is removed afterwards): its
    JSON result, or {"killed": True} when the kernel's out-of-memory killer stopped it."""
    join_cgroup = None if cgroup is None else lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid()))
    completed = subprocess.run([sys.executable, __file__, "--child", *arguments], capture_output=True, text=True, check=False,
                               preexec_fn=join_cgroup)
    if cgroup is not None:
        cgroup.rmdir()
    if completed.returncode == -9:
        return {"killed": True}
    if completed.returncode != 0:
        raise RuntimeError(f"child {arguments} failed:\n{completed.stderr[-3000:]}")
    return {**json.loads(completed.stdout.strip().splitlines()[-1]), "killed": False}


def evict_from_page_cache(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (POSIX_FADV_DONTNEED): the next read comes from disk."""
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


# ----- the report -----------------------------------------------------------------------------------------------


class Report:
    """Markdown tables, printed as they are made and kept for `--out`."""

    def __init__(self):
        self.lines: list[str] = []

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.say("| " + " | ".join(header) + " |")
        self.say("|" + "|".join("---" for _ in header) + "|")
        for row in rows:
            self.say("| " + " | ".join(row) + " |")
        self.say()


def ratio_cells(ours: float, theirs: float, target: float | None) -> list[str]:
    ratio = ours / theirs
    met = "" if target is None else ("yes" if ratio <= target else "**no**")
    return [f"{ratio:.2f}", "" if target is None else f"<= {target}", met]


def seconds_cell(result: dict) -> str:
    return f"{result['median']:.2f} s ({result['quiet']}/{result['n']} quiet)"


# ----- the sections ---------------------------------------------------------------------------------------------


def section_compute(report: Report, folder: Path, dtypes: list[str], repeats: int, compile_too: bool, flops: float, peaks: dict,
                    tiny: bool) -> dict:
    """UNet step and VAE decode in each dtype, interleaved between the three workers; the profile in the fastest."""
    workers = {name: Worker(name) for name in LIBRARIES}
    rows, medians = [], {}
    vae_size = 16 if tiny else 64
    try:
        for kind in ("unet", "vae"):
            for dtype_name in dtypes:
                for worker in workers.values():
                    worker.ask(command="load", kind=kind, dtype=dtype_name, folder=str(folder), size=vae_size)
                found = interleaved(workers, repeats)
                ours, theirs, malloc = found["minidiff"], found["diffusers"], found["diffusers+malloc"]
                medians[(kind, dtype_name)] = ours["median"]
                name = "UNet step (2x4x64x64)" if kind == "unet" else "VAE decode 64->512"
                rate = f"{flops / ours['median'] / 1e12:.2f} of {peaks.get(dtype_name, math.nan) / 1e12:.2f}" if kind == "unet" else ""
                rows.append([f"{name}, {dtype_name}", seconds_cell(ours), seconds_cell(theirs),
                             *ratio_cells(ours["median"], theirs["median"], TARGETS[(kind, dtype_name)]),
                             f"{malloc['median']:.2f} s", rate])
                if kind == "unet" and dtype_name == fastest_of(dtypes):
                    medians["profile"] = {(name, dtype_name): workers[name].ask(command="profile") for name in ("minidiff", "diffusers")}
                for other in ("diffusers", "diffusers+malloc"):
                    workers[other].ask(command="free")  # room for the compiled copy
                if compile_too:
                    compiled = workers["minidiff"].ask(command="compile")["seconds"]
                    result = interleaved({"minidiff": workers["minidiff"]}, repeats)["minidiff"]
                    rate = f"{flops / result['median'] / 1e12:.2f}" if kind == "unet" else ""
                    rows.append([f"{name}, {dtype_name}, minidiff compiled (compile {compiled:.0f} s)", seconds_cell(result),
                                 f"{theirs['median']:.2f} s", *ratio_cells(result["median"], theirs["median"], None), "", rate])
                report.say(f"  measured {name} {dtype_name} (load average {load_average()})")
    finally:
        for worker in workers.values():
            worker.close()
    report.say()
    report.table(["", "minidiff", "diffusers", "ratio", "target", "met", "diffusers + malloc setting", "TFLOP/s (of peak)"], rows)
    return medians


def section_profile(report: Report, profiles: dict) -> None:
    from profile_unet import format_profile

    for (library, dtype_name), found in profiles.items():
        report.say(f"{library}, one {dtype_name} UNet step under torch.profiler (self time per op group):")
        report.say("```")
        report.say(format_profile([tuple(row) for row in found["rows"]], found["wall"]))
        report.say("```")


def section_generation(report: Report, folder: Path, dtypes: list[str], size: int, steps: int) -> dict:
    """The whole text-to-image run in fresh processes, libraries alternating; images kept for the quality section."""
    rows, images = [], {}
    scratch = Path(os.environ.get("TMPDIR", "/tmp"))
    for dtype_name in dtypes:
        found = {}
        for library in ("minidiff", "diffusers", "minidiff-low-memory"):
            out = scratch / f"minidiff-bench-{library}-{dtype_name}.pt"
            wait_for_quiet()
            found[library] = run_child("generate", library, dtype_name, str(folder), str(out), str(size), str(steps))
            images[(library, dtype_name)] = torch.load(out, weights_only=True)
        ours, theirs, low = found["minidiff"], found["diffusers"], found["minidiff-low-memory"]
        rows.append([f"{steps} steps {size}x{size}, {dtype_name}: generation wall time", f"{ours['generate']:.1f} s",
                     f"{theirs['generate']:.1f} s", *ratio_cells(ours["generate"], theirs["generate"], TARGETS["generation"])])
        rows.append([f"... load + generation", f"{ours['load'] + ours['generate']:.1f} s", f"{theirs['load'] + theirs['generate']:.1f} s",
                     *ratio_cells(ours["load"] + ours["generate"], theirs["load"] + theirs["generate"], TARGETS["generation"])])
        rows.append([f"... peak RSS of the process", f"{ours['peak_mib']:.0f} MiB", f"{theirs['peak_mib']:.0f} MiB",
                     *ratio_cells(ours["peak_mib"], theirs["peak_mib"], TARGETS["generation"])])
        rows.append([f"... minidiff --low-memory: generation, peak RSS", f"{low['generate']:.1f} s, {low['peak_mib']:.0f} MiB",
                     "", *ratio_cells(low["peak_mib"], theirs["peak_mib"], TARGETS["generation"])])
        report.say(f"  measured generation {dtype_name} (load average {load_average()})")
    if "fp16" in dtypes:
        out = scratch / "minidiff-bench-minidiff-fp16.pt"
        fp16 = run_child("generate", "minidiff", "fp16", str(folder), str(out), str(size), str(steps))
        images[("minidiff", "fp16")] = torch.load(out, weights_only=True)
        rows.append([f"{steps} steps {size}x{size}, fp16 (VAE upcast to fp32): generation", f"{fp16['generate']:.1f} s", "", "", "", ""])
    report.say()
    report.table(["", "minidiff", "diffusers", "ratio", "target", "met"], rows)
    return images


def section_loading(report: Report, folder: Path, single_file: Path, dtypes: list[str], repeats: int) -> None:
    """Whole-pipeline loading (imports done before the clock starts), cold (the weight files evicted from the
    page cache) then warm, libraries alternating, each the median of `repeats` fresh processes; the peak RSS
    of the load alongside (its largest over the repeats)."""
    weight_files = [*folder.glob("*/*.safetensors"), single_file]
    rows = []
    for kind, source in (("from_pretrained", folder), ("single_file", single_file)):
        for dtype_name in dtypes:
            for temperature in ("cold", "warm"):
                runs = {"minidiff": [], "diffusers": []}
                for _ in range(repeats):
                    for library, found in runs.items():
                        if temperature == "cold":
                            evict_from_page_cache(weight_files)
                        wait_for_quiet()
                        found.append(run_child("load", library, kind, dtype_name, str(source), str(folder)))
                if {run["parameters"] for found in runs.values() for run in found} != {runs["minidiff"][0]["parameters"]}:
                    raise RuntimeError(f"the libraries loaded different models: {runs}")
                ours, theirs = (statistics.median(run["seconds"] for run in runs[library]) for library in ("minidiff", "diffusers"))
                peaks = [max(run["peak_mib"] for run in runs[library]) for library in ("minidiff", "diffusers")]
                name = "from_single_file" if kind == "single_file" else kind
                rows.append([f"{name}, {dtype_name}, {temperature}", f"{ours:.2f} s", f"{theirs:.2f} s",
                             *ratio_cells(ours, theirs, TARGETS["load"]), f"{peaks[0]:.0f} / {peaks[1]:.0f} MiB"])
    report.say(f"  measured loading, median of {repeats} (load average {load_average()})")
    report.say()
    report.table(["pipeline loading", "minidiff", "diffusers", "ratio", "target", "met", "peak RSS (minidiff / diffusers)"], rows)


def memory_cgroup(limit_mib: int) -> Path | None:
    """A new cgroup (v1 memory controller) whose processes may use `limit_mib` of memory, page cache included;
    None where this machine does not let us make one (no cgroup v1 memory controller, or no permission)."""
    folder = Path("/sys/fs/cgroup/memory") / f"minidiff-bench-{os.getpid()}-{limit_mib}"
    try:
        folder.mkdir()
        (folder / "memory.limit_in_bytes").write_text(str(limit_mib * 2**20))
    except OSError:
        return None
    return folder


def section_memory_limit(report: Report, folder: Path, dtype_name: str, limits_mib: list[int], size: int, steps: int) -> None:
    """The text-to-image run under a memory limit that counts the page cache too (a cgroup), the weight files
    evicted first so that their pages are charged to it: what a machine with that much free memory would see.
    Peak RSS counts the memory-mapped weights' file pages, which the kernel can drop and read again."""
    weight_files = list(folder.glob("*/*.safetensors"))
    rows = []
    probe = memory_cgroup(limits_mib[0])
    if probe is None:
        report.say("(memory-limit section skipped: no writable cgroup v1 memory controller on this machine)")
        return
    probe.rmdir()
    out = Path(os.environ.get("TMPDIR", "/tmp")) / "minidiff-bench-limited.pt"
    for limit in [None, *limits_mib]:
        row = ["none" if limit is None else f"{limit} MiB"]
        for library in ("minidiff", "minidiff-low-memory", "diffusers"):
            evict_from_page_cache(weight_files)
            wait_for_quiet()
            arguments = ("generate", library, dtype_name, str(folder), str(out), str(size), str(steps))
            found = run_child(*arguments, cgroup=None if limit is None else memory_cgroup(limit))
            row.append("killed (out of memory)" if found["killed"] else
                       f"{found['generate']:.1f} s (peak RSS {found['peak_mib']:.0f} MiB)")
        rows.append(row)
    report.say(f"  measured memory limits (load average {load_average()})")
    report.say()
    report.table([f"{steps} steps {size}x{size} {dtype_name}, memory limit", "minidiff", "minidiff --low-memory", "diffusers"], rows)


def section_tiled_decode(report: Report, folder: Path, dtype_name: str, latent_size: int) -> None:
    scratch = Path(os.environ.get("TMPDIR", "/tmp"))
    found, images = {}, {}
    for mode in ("untiled", "tiled"):
        out = scratch / f"minidiff-bench-decode-{mode}.pt"
        wait_for_quiet()
        found[mode] = run_child("decode-memory", mode, dtype_name, str(folder), str(out), str(latent_size))
        images[mode] = torch.load(out, weights_only=True)
    difference = (images["tiled"] - images["untiled"]).abs()
    pixels = latent_size * 8
    report.table(
        [f"VAE decode {latent_size}->{pixels} ({dtype_name})", "peak RSS growth", "time", "vs untiled"],
        [[mode, f"{found[mode]['growth_mib']:.0f} MiB", f"{found[mode]['seconds']:.1f} s",
          "" if mode == "untiled" else f"max abs diff {difference.max():.3f}, mean {difference.mean():.4f}, "
          f"PSNR {psnr(to_unit(images['tiled']), to_unit(images['untiled'])):.1f} dB"] for mode in found],
    )


def section_scheduler(report: Report, folder: Path, dtype_name: str, unet_seconds: float) -> None:
    import minidiff.schedulers as schedulers

    config = schedulers.SchedulerMixin.load_config(folder, subfolder="scheduler")  # SD 1.5's (PNDM, skip_prk_steps)
    rows = []
    for name in ("PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheduler = getattr(schedulers, name).from_config(config)
        scheduler.set_timesteps(20)
        sample = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
        model_output = torch.randn_like(sample)
        start = time.perf_counter()
        for t in scheduler.timesteps:
            sample = scheduler.step(model_output, t, scheduler.scale_model_input(sample, t)).prev_sample
        per_step = (time.perf_counter() - start) / len(scheduler.timesteps)
        rows.append([name, f"{per_step * 1e3:.2f} ms", f"{per_step / unet_seconds:.3%}"])
    report.table(["scheduler step (1x4x64x64)", "time per step", f"of a {dtype_name} UNet step (target < 1%)"], rows)


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    mse = (image.float() - reference.float()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def to_unit(image: torch.Tensor) -> torch.Tensor:
    return (image.float() / 2 + 0.5).clamp(0, 1)


QUALITY_REFERENCES = [("minidiff", "fp32"), ("diffusers", "fp32"), ("diffusers", "bf16"), ("diffusers", "fp16")]


def quality_reference(images: dict) -> tuple[str, str]:
    """The most precise image the generation section made: minidiff fp32, else diffusers' in the widest dtype run."""
    for key in QUALITY_REFERENCES:
        if key in images:
            return key
    raise ValueError(f"no reference image among {sorted(images)}: the quality section needs diffusers' or an fp32 run")


def section_quality(report: Report, images: dict, size: int) -> None:
    from minidiff import accuracy

    rows = []
    noise = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for setup in accuracy.DETERMINISTIC_SETUPS:
        if setup.label not in ("DDIM", "PNDM (PLMS)", "LMS", "DPM++ 2M"):
            continue
        found = {}
        for dtype in (torch.float32, torch.bfloat16):
            model = accuracy.prototype_mixture(32, data_std=0.1, dtype=dtype)
            found[dtype] = accuracy.run_scheduler(accuracy.make_scheduler(setup), model, noise.to(dtype), 20,
                                                  setup.step_kwargs, class_labels=torch.arange(8))[1]
        rows.append([f"exact denoiser, 8 pictures 32x32, {setup.label} 20 steps: bf16 vs fp32",
                     f"{psnr(to_unit(found[torch.bfloat16]), to_unit(found[torch.float32])):.1f} dB", ""])
    reference_key = quality_reference(images)
    reference_name = " ".join(reference_key)
    for key, image in images.items():
        if key == reference_key or key[0] == "minidiff-low-memory":
            continue
        finite = bool(torch.isfinite(image).all())
        rows.append([f"random SD 1.5 weights, {size}x{size}: {' '.join(key)} vs {reference_name}", f"{psnr(image, images[reference_key]):.1f} dB",
                     f"finite: {finite}, std {image.float().std():.3f} (not black)"])
    report.table(["quality (target: PSNR >= 30 dB)", "PSNR", "notes"], rows)


# ----- main -----------------------------------------------------------------------------------------------------


def default_dtypes() -> list[str]:
    """fp32, and bf16 where the CPU runs it fast (the same test as the CLI's --dtype auto)."""
    from profile_unet import fastest_dtype_name

    return ["fp32"] if fastest_dtype_name() == "fp32" else ["fp32", "bf16"]


def fastest_of(dtypes: list[str]) -> str:
    """The dtype the profile, the tiled decode and the scheduler's share are measured in: bf16 if asked for."""
    return "bf16" if "bf16" in dtypes else dtypes[0]


def prepare_weights(folder: Path, tiny: bool) -> Path:
    """The random SD 1.5 folder (written once) and its single-file form next to it."""
    from make_random_sd15 import make_random_sd15

    from minidiff.loaders import convert

    if not (folder / "model_index.json").is_file():
        print(f"writing random SD 1.5 weights to {folder} (once) ...", file=sys.stderr)
        make_random_sd15(folder, seed=0, tiny=tiny)
    single_file = folder.with_suffix(".safetensors")
    if not single_file.is_file():
        print(f"converting {folder} to {single_file} (once) ...", file=sys.stderr)
        convert(folder, single_file)
    return single_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="~/.cache/minidiff/random-sd15", help="random SD 1.5 folder (made if missing)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile rows (minutes of compiling)")
    parser.add_argument("--only", default="compute,generation,loading,memory-limit,tiling,scheduler,quality",
                        help="comma-separated sections")
    parser.add_argument("--dtypes", default=None, help="comma-separated, from fp32,bf16,fp16 (default: fp32, and bf16 on CPUs with bf16 units)")
    parser.add_argument("--memory-limits", default=None, help="comma-separated MiB for the memory-limit section (default: 3072,2048,1536)")
    parser.add_argument("--tiny", action="store_true", help="tiny random weights: a smoke test of this script")
    parser.add_argument("--out", default=None, help="also write the report (Markdown) to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args.worker)
    if args.child:
        warnings.simplefilter("ignore")
        child = {"generate": child_generate, "load": child_load, "decode-memory": child_decode_memory}[args.child[0]]
        numbers = [int(value) if value.isdigit() else value for value in args.child[1:]]
        print(json.dumps(child(*numbers)))
        return None

    folder = Path(args.weights).expanduser()
    if args.tiny:
        global QUIET_WAIT_SECONDS
        QUIET_WAIT_SECONDS = 0.0
    if args.tiny and args.weights == parser.get_default("weights"):
        folder = folder.with_name("random-sd15-tiny")
    single_file = prepare_weights(folder, args.tiny)
    sections = set(args.only.split(","))
    dtypes = args.dtypes.split(",") if args.dtypes else default_dtypes()
    fastest = fastest_of(dtypes)
    info = cpu_info()
    peaks = nominal_peaks(info)
    flops = unet_step_flops(folder)
    report = Report()
    report.say(f"# minidiff vs diffusers, {time.strftime('%Y-%m-%d %H:%M')}")
    report.say()
    report.say(f"{info['model']}, {info['threads']} threads at {info['mhz']:.0f} MHz; "
               f"AMX-BF16: {'amx_bf16' in info['flags']}, AVX512-BF16: {'avx512_bf16' in info['flags']}; "
               f"torch {torch.__version__} (oneDNN {torch.backends.mkldnn.is_available()}, {torch.backends.cpu.get_cpu_capability()}); "
               f"nominal peak {peaks['fp32'] / 1e12:.2f} TFLOP/s fp32"
               + (f", {peaks['bf16'] / 1e12:.2f} bf16; " if "bf16" in dtypes else "; ") +
               f"one guided UNet step = {flops / 1e12:.2f} TFLOP. Load average at start: {load_average()}.")
    report.say()
    report.say(f"dtypes measured: {', '.join(dtypes)}" + ("" if args.dtypes or "bf16" in dtypes else
               " (no bf16: this CPU has no AMX-BF16 or AVX512-BF16, and torch's generic bfloat16 kernels are far slower than fp32)"))
    report.say()
    medians = {}
    if "compute" in sections:
        medians = section_compute(report, folder, dtypes, args.repeats, not args.skip_compile, flops, peaks, args.tiny)
        section_profile(report, medians.pop("profile"))
    images = {}
    size, steps = (64, 4) if args.tiny else (512, 20)
    if "generation" in sections:
        images = section_generation(report, folder, dtypes, size, steps)
    if "loading" in sections:
        section_loading(report, folder, single_file, dtypes, args.repeats)
    if "memory-limit" in sections:  # 2 steps: the weights are all read in the first; more steps page the same
        limits = [int(limit) for limit in args.memory_limits.split(",")] if args.memory_limits else [512, 320] if args.tiny else [3072, 2048, 1536]
        section_memory_limit(report, folder, fastest, limits, size, 2)
    if "tiling" in sections:
        section_tiled_decode(report, folder, fastest, 96 if args.tiny else 128)
    if "scheduler" in sections and ("unet", fastest) in medians:
        section_scheduler(report, folder, fastest, medians[("unet", fastest)])
    if "quality" in sections and images:
        section_quality(report, images, size)
    report.say(f"Load average at the end: {load_average()}.")
    if args.out:
        Path(args.out).write_text("\n".join(report.lines) + "\n")


if __name__ == "__main__":
    main()
