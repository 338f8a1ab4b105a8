"""Time of one scheduler `step` at shape (1, 4, 64, 64): minidiff vs diffusers, same run, ratio printed.

    python benchmarks/bench_schedulers.py [--steps 50] [--repeats 10] [--only Heun,DEIS]

All fourteen classes of SD 1.5's `scheduler.compatibles`, each built with `from_config` of SD 1.5's
scheduler_config.json (the copy bundled with minidiff). Each figure is the best over `repeats` whole
loops of the mean time per loop iteration (`scale_model_input` + `step`; Heun, DPM2, DPM2 a and DPM++ SDE
have 2N - 1 iterations for N steps). The two libraries' loops alternate, so load on the machine hits
both alike. Needs the test extra (diffusers; torchsde for DPM++ SDE).
"""

import argparse
import inspect
import time
import warnings

import torch

import diffusers
import minidiff
from minidiff.data import sd15_config

SD15_SCHEDULER_CONFIG = sd15_config("scheduler")


def seconds_per_step(scheduler, steps: int, pass_generator: bool) -> float:
    """Mean time of scale_model_input + step over one whole loop."""
    sample = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    model_output = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    scheduler.set_timesteps(steps)
    kwargs = {"generator": torch.Generator().manual_seed(0)} if pass_generator else {}
    x = sample.clone()
    start = time.perf_counter()
    for t in scheduler.timesteps:
        scheduler.scale_model_input(x, t)
        x = scheduler.step(model_output, t, x, **kwargs).prev_sample
    return (time.perf_counter() - start) / len(scheduler.timesteps)


def build(library, class_name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(library, class_name).from_config(SD15_SCHEDULER_CONFIG)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--only", default="", help="comma-separated class-name fragments, e.g. Heun,DEIS")
    args = parser.parse_args()
    class_names = sorted(scheduler_class.__name__ for scheduler_class in minidiff.PNDMScheduler.compatibles)
    if args.only:
        class_names = [name for name in class_names if any(part in name for part in args.only.split(","))]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; one step at (1, 4, 64, 64), {args.steps}-step loops")
    print(f"{'scheduler':34s} {'minidiff':>12s} {'diffusers':>12s} {'ratio':>7s}")
    for class_name in class_names:
        ours, theirs = build(minidiff, class_name), build(diffusers, class_name)
        # every minidiff step takes a generator; some of diffusers' deterministic ones have no such argument
        theirs_takes_generator = "generator" in inspect.signature(theirs.step).parameters
        timings = [
            [seconds_per_step(ours, args.steps, True), seconds_per_step(theirs, args.steps, theirs_takes_generator)]
            for _ in range(args.repeats)
        ]
        best_ours, best_theirs = (min(column) for column in zip(*timings))
        print(f"{class_name:34s} {best_ours * 1e6:9.1f} us {best_theirs * 1e6:9.1f} us {best_ours / best_theirs:7.2f}")


if __name__ == "__main__":
    main()
