"""Time of one scheduler `step` at shape (1, 4, 64, 64): minidiff vs diffusers, same run, ratio printed.

    python benchmarks/bench_schedulers.py [--steps 50] [--repeats 5]

Each figure is the median over `repeats` whole 50-step loops of the mean time per `step` call
(scale_model_input included), with SD 1.5's scheduler config. Needs the test extra (diffusers).
"""

import argparse
import statistics
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


def seconds_per_step(scheduler_class, steps: int, repeats: int) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = scheduler_class.from_config({**SD15_CONFIG, "_class_name": "PNDMScheduler"})
    sample = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    model_output = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    timings = []
    for _ in range(repeats):
        scheduler.set_timesteps(steps)
        generator = torch.Generator().manual_seed(0)
        x = sample.clone()
        start = time.perf_counter()
        for t in scheduler.timesteps:
            scheduler.scale_model_input(x, t)
            kwargs = {"generator": generator} if "generator" in scheduler.step.__code__.co_varnames else {}
            x = scheduler.step(model_output, t, x, **kwargs).prev_sample
        timings.append((time.perf_counter() - start) / len(scheduler.timesteps))
    return statistics.median(timings)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; one step at (1, 4, 64, 64), {args.steps}-step loops")
    print(f"{'scheduler':34s} {'minidiff':>12s} {'diffusers':>12s} {'ratio':>7s}")
    for name, (class_name, *_) in SCHEDULERS.items():
        ours = seconds_per_step(getattr(minidiff, class_name), args.steps, args.repeats)
        theirs = seconds_per_step(getattr(diffusers, class_name), args.steps, args.repeats)
        print(f"{class_name:34s} {ours * 1e6:9.1f} us {theirs * 1e6:9.1f} us {ours / theirs:7.2f}")


if __name__ == "__main__":
    main()
