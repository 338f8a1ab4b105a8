"""Few-step sampling on a CPU: the LCM recipe against minidiff's 20-step guided image, and against diffusers.

    python benchmarks/bench_fewstep.py [--weights FOLDER] [--dtype bfloat16|float32] [--repeats 3]

On the same random full-size SD 1.5 weights (weights_scripts/make_random_sd15.py, written once to
~/.cache/minidiff/random-sd15) and a random full-size TAESD, 512x512, each run in a fresh subprocess (so its
peak RSS, VmHWM, is its own), prints wall times and the ratios the issue sets as targets:

    recipe    LCMScheduler, 4 steps, guidance_scale 1 (no CFG batch), TAESD decode       (the LCM-LoRA recipe)
    baseline  DPMSolverMultistepScheduler, 20 steps, guidance_scale 7.5, full VAE decode  (minidiff's usual image)

    minidiff recipe / minidiff baseline     target <= 0.13
    minidiff recipe / diffusers recipe      target <= 0.8
    TAESD decode / full VAE decode          target <= 1/20   (minidiff, 64x64 latents -> 512x512, median of repeats)

Each generation job makes the image twice in its process: `first_generate_s` includes the one-time set-up of
oneDNN's kernels for each new shape (large on this path), `generate_s` (the second, what the ratios use) does not.
LCM-LoRA itself is not loaded: fused into the UNet (`fuse_lora`) it changes no weight's shape, so a fused step
costs what a base step costs; the recipe is timed on the base weights. Generation times exclude loading.
Needs the test extra (diffusers).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WEIGHTS = Path.home() / ".cache" / "minidiff" / "random-sd15"
PROMPT = "a photograph of an astronaut riding a horse"

CHILD = r"""
import json, statistics, sys, time, warnings
import torch
library, job, folder, taesd, dtype, repeats = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], getattr(torch, sys.argv[5]), int(sys.argv[6])
warnings.simplefilter("ignore")
torch.set_num_threads(2)
lib = __import__(library)
start = time.perf_counter()
kwargs = dict(safety_checker=None, requires_safety_checker=False) if library == "diffusers" else {}
pipe = lib.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, **kwargs)
pipe.set_progress_bar_config(disable=True)
tiny = lib.AutoencoderTiny.from_pretrained(taesd, torch_dtype=dtype)
loaded = time.perf_counter()
result = {"load_s": loaded - start}
if job == "decode":
    latents = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0), dtype=dtype)
    for name, vae in (("vae", pipe.vae), ("taesd", tiny)):
        times = []
        with torch.no_grad():
            for _ in range(repeats + 1):  # the first call warms up
                begin = time.perf_counter()
                vae.decode(latents / vae.config.scaling_factor)
                times.append(time.perf_counter() - begin)
        result[name + "_decode_s"] = statistics.median(times[1:])
else:
    if job == "recipe":
        pipe.scheduler = lib.LCMScheduler.from_config(pipe.scheduler.config)
        pipe.vae = tiny
        call = dict(num_inference_steps=4, guidance_scale=1.0)
    else:
        pipe.scheduler = lib.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        call = dict(num_inference_steps=20, guidance_scale=7.5)
    for run in ("first_generate_s", "generate_s"):  # the first image pays the kernels' one-time set-up; the second not
        begin = time.perf_counter()
        image = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **call).images
        result[run] = time.perf_counter() - begin
    result["image_mean"] = float(image.mean())
result["peak_rss_mib"] = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) / 1024
print(json.dumps(result))
""".replace("PROMPT", repr(PROMPT))


def run(library: str, job: str, weights: Path, taesd: Path, dtype: str, repeats: int) -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", CHILD, library, job, str(weights), str(taesd), dtype, str(repeats)],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{library} {job} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3, help="decode timings: median of this many (after a warm-up)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if not (args.weights / "unet" / "config.json").is_file():
        print(f"writing random full-size SD 1.5 weights to {args.weights} (4.3 GB, once)", flush=True)
        sys.path.insert(0, str(REPO / "weights_scripts"))
        from make_random_sd15 import make_random_sd15

        make_random_sd15(args.weights, seed=0)
    taesd = args.weights.parent / "random-taesd"
    if not (taesd / "config.json").is_file():
        import torch

        from minidiff import AutoencoderTiny

        torch.manual_seed(0)
        AutoencoderTiny().save_pretrained(taesd)  # TAESD's real config (madebyollin/taesd), random weights

    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical cores visible, torch threads 2, {args.dtype}", flush=True)
    results = {}
    for library, job in (("minidiff", "recipe"), ("diffusers", "recipe"), ("minidiff", "baseline"), ("minidiff", "decode")):
        start = time.perf_counter()
        results[library, job] = run(library, job, args.weights, taesd, args.dtype, args.repeats)
        print(f"{library} {job}: {results[library, job]} ({time.perf_counter() - start:.0f} s in all)", flush=True)

    ours, theirs, baseline, decode = (results["minidiff", "recipe"], results["diffusers", "recipe"],
                                      results["minidiff", "baseline"], results["minidiff", "decode"])
    print("\n512x512, recipe = LCM 4 steps, guidance 1, TAESD decode; baseline = DPM++ 2M 20 steps, guidance 7.5, full VAE")
    for label, row in (("minidiff recipe", ours), ("diffusers recipe", theirs), ("minidiff baseline", baseline)):
        print(f"{label}: {row['generate_s']:.1f} s (first image {row['first_generate_s']:.1f} s), "
              f"peak RSS {row['peak_rss_mib']:.0f} MiB")
    print(f"recipe / baseline (minidiff)       {ours['generate_s'] / baseline['generate_s']:.3f}   (target <= 0.13)")
    print(f"recipe minidiff / diffusers        {ours['generate_s'] / theirs['generate_s']:.3f}   (target <= 0.8)")
    print(f"peak RSS minidiff / diffusers      {ours['peak_rss_mib'] / theirs['peak_rss_mib']:.3f}")
    print(f"TAESD decode {decode['taesd_decode_s']:.3f} s / full VAE decode {decode['vae_decode_s']:.2f} s = "
          f"{decode['taesd_decode_s'] / decode['vae_decode_s']:.3f}   (target <= 0.05)")
    print(f"same recipe image: mean pixel {ours['image_mean']:.6f} (minidiff) vs {theirs['image_mean']:.6f} (diffusers)")


if __name__ == "__main__":
    main()
