"""minidiff vs diffusers/transformers on the same random full-size SD 1.5 weights: one run, ratios printed.

    python benchmarks/bench_models.py [--weights ~/.cache/minidiff/random-sd15] [--repeats 3] [--tiny]

The weights come from weights_scripts/make_random_sd15.py (written to `--weights` on the first run,
4.3 GB in fp32; never in git). Measured, fp32 on CPU:

    UNet CFG step    one UNet call at batch 2 (cond + uncond), latents (2, 4, 64, 64), context (2, 77, 768)
    VAE decode       latents (1, 4, 64, 64) -> image (1, 3, 512, 512)
    CLIP encode      token ids (2, 77) -> (2, 77, 768)
    load             `from_pretrained` of unet / vae / text_encoder: wall time, and peak RSS in a fresh
                     subprocess per load (the peak resident memory during the call, VmHWM reset just
                     before it, minus the resident memory before it: what loading added to the imports);
                     `--repeats` subprocesses per library: the fastest time, the largest peak

Each compute figure is the best (minimum) of `--repeats` timed calls after one warm-up call, the two
libraries' calls alternating: on a shared machine the minimum is the least disturbed estimate of the
cost (as `timeit` advises). Each output is also compared between the libraries (max abs difference):
the timings are of the same computation.
The ratio is minidiff / other: below 1 means minidiff is faster or smaller.

Note: minidiff's load memory-maps the safetensors file and assigns its tensors to the module; pages
are read when a weight is first used, so its load figures do not include reading the whole file.
diffusers takes another path when `accelerate` is installed (`low_cpu_mem_usage=True`); the table
says which one it took.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the checkout's minidiff and weights_scripts, without `pip install -e .`
sys.path.insert(0, str(REPO / "weights_scripts"))

COMPONENTS = ["unet", "vae", "text_encoder"]


# ----- loading, in a fresh subprocess per (library, component) -----


def load_component(library: str, component: str, folder: str):
    """`from_pretrained` of one component with one library (imports done before the clock starts)."""
    if library == "minidiff":
        import minidiff  # noqa: F401  (the whole package, as `from minidiff import ...` would; not timed)
        from minidiff.models.clip_text import CLIPTextModel
        from minidiff.models.unet_2d_condition import UNet2DConditionModel
        from minidiff.models.vae import AutoencoderKL
    else:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel
    model_class = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}[component]
    return lambda: model_class.from_pretrained(folder, subfolder=component)


def status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status: VmRSS (now) or VmHWM (peak), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (this benchmark needs Linux)")


def load_child(library: str, component: str, folder: str) -> None:
    """Runs in the subprocess: prints one JSON line with the load's seconds and added peak RSS (MiB)."""
    warnings.simplefilter("ignore")
    load = load_component(library, component, folder)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = status_kib("VmRSS")
    start = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - start
    peak = status_kib("VmHWM")
    path = "meta device + assign (mmap)" if library == "minidiff" else _diffusers_load_path(component)
    print(json.dumps({"seconds": seconds, "peak_mib": (peak - before) / 1024, "path": path,
                      "parameters": sum(p.numel() for p in model.parameters())}))


def _diffusers_load_path(component: str) -> str:
    import importlib.util

    if component == "text_encoder":
        return "transformers"
    installed = importlib.util.find_spec("accelerate") is not None
    return "diffusers, accelerate " + ("installed" if installed else "not installed (low_cpu_mem_usage=False)")


def measure_load(library: str, component: str, folder: Path) -> dict:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    completed = subprocess.run(
        [sys.executable, __file__, "--load-child", library, component, str(folder)],
        capture_output=True, text=True, env=environment, check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"loading {component} with {library} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def best_loads(component: str, folder: Path, repeats: int) -> tuple[dict, dict]:
    """`repeats` fresh subprocess loads per library, alternating; the fastest time and the largest peak of each."""
    runs = {"minidiff": [], "diffusers": []}
    for _ in range(repeats):
        for library in runs:
            runs[library].append(measure_load(library, component, folder))
    return tuple(
        {**results[0], "seconds": min(r["seconds"] for r in results), "peak_mib": max(r["peak_mib"] for r in results)}
        for results in runs.values()
    )


# ----- compute, in this process, one model (in both libraries) at a time -----


def best_seconds_interleaved(ours, theirs, repeats: int) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """Best of `repeats` timed calls of each, alternating ours/theirs so that a busy spell on a shared
    machine slows both alike; one warm-up call each first (it also faults the memory-mapped weights in)."""
    timings = {ours: [], theirs: []}
    with torch.no_grad():
        outputs = [ours(), theirs()]  # warm-up
        for _ in range(repeats):
            for call in (ours, theirs):
                start = time.perf_counter()
                call()
                timings[call].append(time.perf_counter() - start)
    return min(timings[ours]), min(timings[theirs]), *outputs


def compute_benchmarks(folder: Path, repeats: int, tiny: bool) -> list[tuple[str, float, float, float]]:
    """Rows (name, minidiff seconds, other seconds, max abs difference of the outputs)."""
    import diffusers
    import transformers

    import minidiff.models.clip_text as minidiff_clip
    from minidiff.models.unet_2d_condition import UNet2DConditionModel
    from minidiff.models.vae import AutoencoderKL

    generator = torch.Generator().manual_seed(0)
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    latent_size = unet_config["sample_size"]
    latents = torch.randn(2, 4, latent_size, latent_size, generator=generator)  # (2, 4, 64, 64): cond + uncond
    context = torch.randn(2, 77, unet_config["cross_attention_dim"], generator=generator)  # (2, 77, 768)
    ids = torch.randint(0, 49408, (2, 77), generator=generator)

    cases = [
        ("UNet CFG step (2x4x64x64)", UNet2DConditionModel, diffusers.UNet2DConditionModel, "unet",
         lambda unet: unet(latents, 981, encoder_hidden_states=context).sample),
        ("VAE decode 64->512", AutoencoderKL, diffusers.AutoencoderKL, "vae",
         lambda vae: vae.decode(latents[:1]).sample),
        ("CLIP encode (2x77)", minidiff_clip.CLIPTextModel, transformers.CLIPTextModel, "text_encoder",
         lambda text_encoder: text_encoder(ids)[0]),
    ]
    if tiny:
        cases[0] = (f"UNet CFG step (2x4x{latent_size}x{latent_size})", *cases[0][1:])
        cases[1] = (f"VAE decode {latent_size}->{latent_size * 8}", *cases[1][1:])
    rows = []
    for name, ours_class, their_class, subfolder, call in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # both map the same safetensors file: its pages are shared, so two models cost little more than one
            ours = ours_class.from_pretrained(folder, subfolder=subfolder).eval()
            theirs = their_class.from_pretrained(folder, subfolder=subfolder).eval()
        ours_seconds, their_seconds, ours_output, their_output = best_seconds_interleaved(
            lambda: call(ours), lambda: call(theirs), repeats
        )
        rows.append((name, ours_seconds, their_seconds, (ours_output - their_output).abs().max().item()))
        del ours, theirs
        gc.collect()
        print(f"  measured {name}", file=sys.stderr)
    return rows


# ----- the table -----


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="~/.cache/minidiff/random-sd15", help="random SD 1.5 folder (made if missing)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny configs (a smoke test of this script)")
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--skip-compute", action="store_true")
    parser.add_argument("--load-child", nargs=3, metavar=("LIBRARY", "COMPONENT", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_child:
        load_child(*args.load_child)
        return

    from make_random_sd15 import make_random_sd15

    folder = Path(args.weights).expanduser()
    if args.tiny and args.weights == parser.get_default("weights"):
        folder = folder.with_name("random-sd15-tiny")
    if not (folder / "model_index.json").is_file():
        print(f"writing random SD 1.5 weights to {folder} (once) ...", file=sys.stderr)
        make_random_sd15(folder, seed=0, tiny=args.tiny)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, weights {folder}")
    print(f"{'':32s} {'minidiff':>12s} {'diffusers':>12s} {'ratio':>7s}  notes")
    if not args.skip_compute:
        for name, ours, theirs, difference in compute_benchmarks(folder, args.repeats, args.tiny):
            print(f"{name:32s} {ours:10.3f} s {theirs:10.3f} s {ours / theirs:7.2f}  outputs differ by {difference:.2g}")
    if args.skip_load:
        return
    for component in COMPONENTS:
        ours, theirs = best_loads(component, folder, args.repeats)
        assert ours["parameters"] == theirs["parameters"], (component, ours, theirs)
        print(f"{'load ' + component + ' time':32s} {ours['seconds']:10.3f} s {theirs['seconds']:10.3f} s "
              f"{ours['seconds'] / theirs['seconds']:7.2f}  {ours['parameters'] / 1e6:.2f}M parameters")
        print(f"{'load ' + component + ' peak RSS':32s} {ours['peak_mib']:8.0f} MiB {theirs['peak_mib']:8.0f} MiB "
              f"{ours['peak_mib'] / max(theirs['peak_mib'], 1):7.2f}  other: {theirs['path']}")


if __name__ == "__main__":
    main()
