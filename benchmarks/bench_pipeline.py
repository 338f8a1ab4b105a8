"""A whole 512x512, 20-step text-to-image run: minidiff vs diffusers on the same random full-size SD 1.5 weights.

    python benchmarks/bench_pipeline.py [--weights FOLDER] [--steps 20] [--dtype fp32|bf16]

Each library runs in a fresh subprocess (load, generate, decode), so peak RSS (VmHWM from /proc) is its
own. Prints wall time (load and generation separately) and peak RSS, and the ratio minidiff / diffusers.
The weights come from weights_scripts/make_random_sd15.py (written to ~/.cache/minidiff/random-sd15 once).
Needs the test extra (diffusers).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WEIGHTS = Path.home() / ".cache" / "minidiff" / "random-sd15"

CHILD = r"""
import json, sys, time, warnings
import torch
library, folder, steps, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), getattr(torch, sys.argv[4])
warnings.simplefilter("ignore")
start = time.perf_counter()
if library == "minidiff":
    from minidiff import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype)
else:
    import diffusers
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
loaded = time.perf_counter()
pipe.set_progress_bar_config(disable=True)
image = pipe("a photograph of an astronaut riding a horse", num_inference_steps=steps,
             generator=torch.Generator().manual_seed(0), output_type="np").images
done = time.perf_counter()
peak_kib = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
print(json.dumps({"load_s": loaded - start, "generate_s": done - loaded, "peak_rss_gib": peak_kib / 2**20,
                  "image_mean": float(image.mean())}))
"""


def run(library: str, folder: Path, steps: int, dtype: str) -> dict:
    output = subprocess.run(
        [sys.executable, "-c", CHILD, library, str(folder), str(steps), dtype],
        capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    if not (args.weights / "unet" / "config.json").is_file():
        print(f"writing random full-size SD 1.5 weights to {args.weights} (4.3 GB, once)")
        sys.path.insert(0, str(REPO / "weights_scripts"))
        from make_random_sd15 import make_random_sd15

        make_random_sd15(args.weights, seed=0)
    results = {}
    for library in ("minidiff", "diffusers"):
        start = time.perf_counter()
        results[library] = run(library, args.weights, args.steps, args.dtype)
        print(f"{library}: {results[library]} ({time.perf_counter() - start:.0f} s in all)", flush=True)
    ours, theirs = results["minidiff"], results["diffusers"]
    print(f"\n512x512, {args.steps} steps, {args.dtype}, PNDM (SD 1.5's default), guidance 7.5")
    print(f"{'':16s} {'minidiff':>12s} {'diffusers':>12s} {'ratio':>7s}")
    for key, unit in (("load_s", "s"), ("generate_s", "s"), ("peak_rss_gib", "GiB")):
        print(f"{key:16s} {ours[key]:8.2f} {unit:3s} {theirs[key]:8.2f} {unit:3s} {ours[key] / theirs[key]:7.2f}")
    print(f"same image: mean pixel {ours['image_mean']:.6f} vs {theirs['image_mean']:.6f}")


if __name__ == "__main__":
    main()
