"""`minidiff demo`: every scheduler on an exact denoiser, in under a minute on a laptop CPU, no weights needed.

    from minidiff.lab.demo import run_demo
    result = run_demo("minidiff-demo")      # prints the tables, writes the files below

writes into the output folder
    accuracy.txt      the tables printed on screen
    accuracy.csv      deterministic schedulers: RMS error to the exact ODE endpoint per step count, fitted orders
    distribution.csv  stochastic schedulers: per-component frequency / mean / variance against the mixture
    accuracy.png      error vs steps on log-log axes, one panel per family of schedulers
    samples.png       32x32 samples of the picture mixture, one row per scheduler, one column per step count;
                      each cell holds one sample per class (class_labels 0..7: circle, square, ..., boat)
    trace.png         the denoising loop step by step (minidiff.viz.trace): x_t on top, the predicted x0 below,
    trace.gif         for one unconditional sample through DDPMPipeline with DPM-Solver++ 2M, 20 steps

The model is `GaussianMixtureDenoiser`, whose predictions are exact, so every error on show is
the scheduler's own (see `minidiff.lab.accuracy` for the method).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minidiff.lab import accuracy
from minidiff.viz import trace
from minidiff.pipelines.ddpm import DDPMPipeline
from minidiff.viz.grid import image_grid, tile
from minidiff.viz.plotting import GUIDE, loglog_panels
from minidiff.lab.prototypes import tensor_to_pil
from minidiff.schedulers import DPMSolverMultistepScheduler


GRID_TITLE = "Samples of the picture mixture (exact denoiser), same noise in every cell"


@dataclass
class DemoResult:
    """What `run_demo` measured and wrote."""

    out_dir: Path
    files: dict[str, Path]
    convergence: list[accuracy.ConvergenceResult]
    distribution: list[accuracy.DistributionResult]
    report: str
    missing: list[str] = field(default_factory=list)
    seconds: float = 0.0


def run_demo(
    out_dir: str | Path = "minidiff-demo",
    steps: tuple[int, ...] = accuracy.DEFAULT_STEPS,
    stochastic_steps: tuple[int, ...] = (10, 100),
    grid_steps: tuple[int, ...] = (5, 10, 20, 50),
    num_trajectories: int = 64,
    num_samples: int = 2000,
    image_size: int = 32,
    seed: int = 0,
    progress: bool = True,
    echo=print,
    library=None,
) -> DemoResult:
    """Run the accuracy lab and the sample grid; print the tables (through `echo`; None is silent).

    steps: step counts for the deterministic error table (the last three give the asymptotic order).
    stochastic_steps / num_samples: step counts and 2-D sample count for the distribution check.
    grid_steps / image_size: the sample grid (one row per scheduler, one class-conditional sample per class in a cell).
    library: where the scheduler classes come from (default minidiff.schedulers).
    """
    _check_arguments(steps, stochastic_steps, grid_steps, num_trajectories, num_samples)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} is a file; pass a folder (it is created if missing)")
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    say = echo or (lambda *args: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tensors are tiny: extra threads only add overhead
    try:
        result = _run(
            out_dir, steps, stochastic_steps, grid_steps, num_trajectories, num_samples, image_size, seed, progress, library
        )
    finally:
        torch.set_num_threads(threads)
    result.seconds = time.perf_counter() - start
    say(result.report)
    say(f"wrote {', '.join(str(path) for path in result.files.values())} in {result.seconds:.1f} s")
    return result


def _run(
    out_dir, steps, stochastic_steps, grid_steps, num_trajectories, num_samples, image_size, seed, progress, library
) -> DemoResult:
    """Measure (schedulers missing from `library` are skipped and listed), then write the five files."""
    deterministic = [
        s for s in accuracy.DETERMINISTIC_SETUPS + accuracy.FLOW_SETUPS if accuracy.make_scheduler(s, library) is not None
    ]
    stochastic = [s for s in accuracy.STOCHASTIC_SETUPS if accuracy.make_scheduler(s, library) is not None]
    every_class = {s.class_name for s in accuracy.DETERMINISTIC_SETUPS + accuracy.FLOW_SETUPS + accuracy.STOCHASTIC_SETUPS}
    missing = sorted(every_class - {s.class_name for s in deterministic + stochastic})
    total = (
        len(deterministic) * sum(steps)
        + len(stochastic) * sum(stochastic_steps)
        + len(deterministic + stochastic) * sum(grid_steps)
    )
    with tqdm(total=total, desc="minidiff demo", unit="step", disable=not progress) as bar:
        convergence = _deterministic_lab(deterministic, steps, num_trajectories, seed, library, bar)
        distribution = _stochastic_lab(stochastic, stochastic_steps, num_samples, seed, library, bar)
        grid = _sample_grid(deterministic + stochastic, grid_steps, image_size, seed, library, bar)

    report = _report(convergence, distribution, missing)
    files = {
        "accuracy.txt": out_dir / "accuracy.txt",
        "accuracy.csv": accuracy.write_convergence_csv(convergence, out_dir / "accuracy.csv"),
        "distribution.csv": accuracy.write_distribution_csv(distribution, out_dir / "distribution.csv"),
        "accuracy.png": _accuracy_plot(convergence, out_dir / "accuracy.png"),
        "samples.png": image_grid(*grid, out_dir / "samples.png", title=GRID_TITLE),
    }
    files["accuracy.txt"].write_text(report, encoding="utf-8")
    files["trace.png"], files["trace.gif"] = _trace(out_dir, image_size, seed, progress)
    return DemoResult(out_dir, files, convergence, distribution, report, missing)


def _trace(out_dir: Path, image_size: int, seed: int, progress: bool, steps: int = 20) -> tuple[Path, Path]:
    """One sample of the picture mixture through DDPMPipeline's loop, recorded at 8 steps with minidiff.viz.trace."""
    model = accuracy.prototype_mixture(image_size, data_std=0.1)
    scheduler = DPMSolverMultistepScheduler.from_config(accuracy.SD15_SCHEDULER_CONFIG)
    pipeline = DDPMPipeline(model, scheduler)
    pipeline.set_progress_bar_config(disable=not progress, desc="trace")

    def to_image(x: torch.Tensor):
        return tensor_to_pil(x[0]).resize((4 * image_size, 4 * image_size), resample=0)  # nearest: keep the pixels

    frames = trace.record(pipeline.denoise(generator=torch.Generator().manual_seed(seed), num_inference_steps=steps), to_image, count=8)
    return trace.save_film_strip(frames, out_dir / "trace.png"), trace.save_gif(frames, out_dir / "trace.gif")


def _check_arguments(steps, stochastic_steps, grid_steps, num_trajectories, num_samples) -> None:
    for name, values in (("steps", steps), ("stochastic_steps", stochastic_steps), ("grid_steps", grid_steps)):
        if not values or any(not isinstance(n, int) or not 1 <= n <= 500 for n in values):
            raise ValueError(
                f"{name} must be a non-empty list of integers from 1 to 500 (with SD 1.5's steps_offset=1, "
                f"more steps would reach t=1000), got {values!r}"
            )
    if len(steps) < 3 or list(steps) != sorted(set(steps)):
        raise ValueError(f"steps must hold at least 3 increasing step counts (orders are fitted over them), got {steps!r}")
    for name, value in (("num_trajectories", num_trajectories), ("num_samples", num_samples)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _deterministic_lab(setups, steps, num_trajectories, seed, library, bar) -> list[accuracy.ConvergenceResult]:
    model = accuracy.mixture_2d(torch.float64)
    noise = torch.randn(num_trajectories, 2, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    cache: dict = {}
    results = []
    for setup in setups:
        bar.set_postfix_str(setup.label)
        results.append(accuracy.measure_convergence(setup, model, noise, steps, library, cache, progress=bar))
    return results


def _stochastic_lab(setups, stochastic_steps, num_samples, seed, library, bar) -> list[accuracy.DistributionResult]:
    model = accuracy.mixture_2d(torch.float32)
    results = []
    for setup in setups:
        bar.set_postfix_str(setup.label)
        for num_inference_steps in stochastic_steps:
            results.append(accuracy.measure_distribution(setup, model, num_inference_steps, num_samples, seed, library))
            bar.update(num_inference_steps)
    return results


def _sample_grid(setups, grid_steps, image_size, seed, library, bar):
    """One cell per (scheduler, steps): a class-conditional sample of every prototype, from the same noise.
    The first row is the exact endpoint of the path from t=999 (where DPM-Solver and UniPC start) to sigma = 0."""
    model = accuracy.prototype_mixture(image_size, data_std=0.1)
    labels = torch.arange(model.num_classes)  # one sample per class: circle, square, ..., boat
    noise = torch.randn(len(labels), 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))

    def cell(samples: torch.Tensor):
        return tile([tensor_to_pil(image) for image in samples], columns=4)

    sigma_max = float(model.train_sigmas[-1])
    x_start = noise.double() * (sigma_max**2 + 1) ** 0.5  # the VP noise as x_0 + sigma_max eps
    exact = accuracy.probability_flow_ode(model, x_start, sigma_max, 0.0, labels, rtol=1e-6, atol=1e-6)
    rows = [[cell(exact)] + [None] * (len(grid_steps) - 1)]
    row_labels = ["exact PF-ODE"]
    for setup in setups:
        bar.set_postfix_str(f"grid: {setup.label}")
        row = []
        for index, num_inference_steps in enumerate(grid_steps):
            scheduler = accuracy.make_scheduler(setup, library)
            generator = torch.Generator().manual_seed(seed + index) if setup.stochastic else None
            _, samples = accuracy.run_scheduler(
                scheduler, model, noise, num_inference_steps, setup.step_kwargs, generator, class_labels=labels
            )
            row.append(cell(samples))
            bar.update(num_inference_steps)
        rows.append(row)
        row_labels.append(setup.label)
    return rows, row_labels, [f"{n} steps" for n in grid_steps]


def _accuracy_plot(results: list[accuracy.ConvergenceResult], path: Path) -> Path:
    """Error vs steps, one panel per family (`accuracy.FAMILIES`) on shared axes, Euler in gray in each as the
    yardstick (as tutorial 04 draws it); a scheduler of no family gets an "other" panel."""
    by_label = {r.label: r for r in results}
    groups = {family: [label for label in labels if label in by_label] for family, labels in accuracy.FAMILIES.items()}
    placed = {label for labels in groups.values() for label in labels}
    groups["other"] = [label for label in by_label if label not in placed]
    line = {label: f"{label} ({_order_text(r.order)})" for label, r in by_label.items()}
    yardstick = ("Euler",) if "Euler" in by_label else ()
    panels = {
        family: {line[label]: (by_label[label].steps, by_label[label].errors)
                 for label in (labels if "Euler" in labels else [*yardstick, *labels])}
        for family, labels in groups.items() if labels
    }
    return loglog_panels(
        panels,
        path,
        columns=2,
        title="Deterministic schedulers vs the exact ODE (2-D mixture, SD 1.5 schedule; Euler in gray in each panel)",
        x_label="number of steps",
        y_label="RMS error of the final sample",
        colors={line["Euler"]: GUIDE} if yardstick else None,
    )


def _order_text(order: float) -> str:
    return "diverged" if order != order else f"order {order:.2f}"


NOTES = """\
Notes
- Each deterministic scheduler is compared with the float64 probability-flow ODE solved from the same
  noise between its own first and last noise levels (DDIM/PNDM: leading timesteps down to
  final_alpha_cumprod; Euler/LMS/DPM-Solver++/UniPC: sigma_max down to 0, or to sigma_min).
- With SD 1.5's defaults (final_sigmas_type "zero"), DPM-Solver++ and UniPC end with a jump from the
  last timestep (t ~ 1000/N, sigma^2 ~ 1/N) to sigma = 0 that is first order, and the uniform-in-t grid
  barely refines in log-sigma near t = 0: their asymptotic order is ~1 although their error is far
  smaller than the first-order methods'. The "sigma_min" rows stop at sigma(t=0) and show more of
  their design order. The singlestep DPM++ 2S / 3S end the same way.
- Heun and DPM2 call the model twice a step (calls/step): compare them with a one-call method at twice
  the steps. The steps fit is still their order, since a constant factor in the cost does not change a
  slope. Heun's last step, from the smallest sigma (~0.03) down to 0, is an Euler step (Karras et al.
  2022, Algorithm 1), and it is the same step for every N. So Heun's error stops falling at ~3e-4
  from 100 steps on: order(asym) ~1, order(few) ~2.5.
- DEIS 3's error grows again beyond ~100 steps, in diffusers as here: each weight is a difference of
  two nearly equal float32 antiderivatives, and the rounding error wins when the steps get small.
"""


def _report(convergence, distribution, missing) -> str:
    parts = [
        "Deterministic schedulers: RMS error vs the exact PF-ODE endpoint (2-D Gaussian mixture, 4 components)",
        accuracy.format_convergence_table(convergence),
        "Stochastic schedulers: samples vs the known mixture",
        accuracy.format_distribution_table(distribution),
        NOTES,
    ]
    if missing:
        parts.append(f"Not available in this install (skipped): {', '.join(missing)}\n")
    return "\n".join(parts)
