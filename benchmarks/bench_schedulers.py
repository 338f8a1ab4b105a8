"""Time of one scheduler `step` at shape (1, 4, 64, 64): minidiff vs diffusers, same run, ratio printed.

    python benchmarks/bench_schedulers.py [--steps 50] [--repeats 5]

Each figure is the best over `repeats` whole 50-step loops of the mean time per `step` call
(scale_model_input included), with SD 1.5's scheduler config; the two libraries' loops alternate, so
load on the machine hits both alike. Needs the test extra (diffusers).
"""

import argparse
import inspect
import time
import warnings

import torch

import diffusers
import minidiff
from minidiff.cli import SCHEDULERS

SD15_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False,
)


def seconds_per_step(scheduler, steps: int) -> float:
    """Mean time of scale_model_input + step over one whole loop."""
    sample = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    model_output = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(0)
    kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    x = sample.clone()
    start = time.perf_counter()
    for t in scheduler.timesteps:
        scheduler.scale_model_input(x, t)
        x = scheduler.step(model_output, t, x, **kwargs).prev_sample
    return (time.perf_counter() - start) / len(scheduler.timesteps)


def build(library, class_name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(library, class_name).from_config({**SD15_CONFIG, "_class_name": "PNDMScheduler"})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; one step at (1, 4, 64, 64), {args.steps}-step loops")
    print(f"{'scheduler':34s} {'minidiff':>12s} {'diffusers':>12s} {'ratio':>7s}")
    for name, (class_name, *_) in SCHEDULERS.items():
        pair = build(minidiff, class_name), build(diffusers, class_name)
        timings = [[seconds_per_step(scheduler, args.steps) for scheduler in pair] for _ in range(args.repeats)]
        ours, theirs = (min(column) for column in zip(*timings))
        print(f"{class_name:34s} {ours * 1e6:9.1f} us {theirs * 1e6:9.1f} us {ours / theirs:7.2f}")


if __name__ == "__main__":
    main()
