"""`minidiff sweep` wall time: one process against `torchrun --nproc_per_node=2` (gloo), on the same tiny spec.

    python benchmarks/bench_sweep.py [--weights FOLDER] [--jobs-per-prompt-seed ...]

Both runs use 1 intra-op thread per process (the spec's `threads`, which keeps the images identical), so the
ratio is what a second rank buys on this machine; also printed: one process with 2 threads, whose images differ
in the last bits from the 1-thread ones (docs/sweep.md). There is no diffusers counterpart: diffusers has no sweep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="~/.cache/minidiff/random-sd15-tiny", help="tiny random SD 1.5 folder (made if missing)")
    args = parser.parse_args()
    weights = Path(args.weights).expanduser()
    if not (weights / "model_index.json").is_file():
        sys.path.insert(0, str(REPO / "weights_scripts"))
        from make_random_sd15 import make_random_sd15

        make_random_sd15(weights, seed=0, tiny=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        results = {}
        for threads in (1, 2):
            spec = {"weights": str(weights), "prompts": ["a cat", "a dog", "a boat", "a house"],
                    "schedulers": ["DDIM", "Euler a", "DPM++ 2M Karras", "Heun"], "steps": [4, 8], "seeds": [0, 1],
                    "size": "64x64", "threads": threads}
            (scratch / f"spec{threads}.json").write_text(json.dumps(spec))
        one = [sys.executable, "-m", "minidiff", "sweep", str(scratch / "spec1.json"), "--no-progress", "--out"]
        results["1 process, 1 thread"] = run(one + [str(scratch / "a")], env)
        results["2 torchrun ranks, 1 thread each"] = run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "minidiff", "sweep",
             str(scratch / "spec1.json"), "--no-progress", "--out", str(scratch / "b")], env)
        results["1 process, 2 threads"] = run(
            [sys.executable, "-m", "minidiff", "sweep", str(scratch / "spec2.json"), "--no-progress", "--out", str(scratch / "c")], env)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; 64 jobs (4 prompts x 4 schedulers x 2 step counts x 2 seeds), 64x64, tiny random weights")
    base = results["1 process, 1 thread"]
    for name, seconds in results.items():
        print(f"{name:34s} {seconds:6.1f} s   ratio to 1 process, 1 thread: {seconds / base:.2f}")


if __name__ == "__main__":
    main()
