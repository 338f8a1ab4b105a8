"""Paths you can see: the exact probability-flow paths of a 2-D mixture, and the points a scheduler steps through.

    exact = exact_trajectory(model, start, sigmas)             # the ODE's path through the noise levels `sigmas`
    steps = scheduler_trajectory(scheduler, model, noise, 5)   # the scheduler's sample after each of its 5 steps

Both are `Trajectory`s: the noise level of each point and the points themselves, in the VP frame
x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps = (x_0 + sigma eps) / sqrt(sigma^2 + 1), which stays
bounded from pure noise (the N(0, I) draw) to the data, whatever frame the scheduler works in. The exact
path is the probability-flow ODE of `accuracy.probability_flow_ode` (Karras et al. 2022, arXiv 2206.00364,
eq. 1 with sigma(t) = t: dx/dsigma = -sigma grad log p_sigma(x)), solved in float64 between consecutive noise
levels. `minidiff.viz.trajectories.trajectory_plot` draws them.

Which noise level a scheduler's sample sits at after each step is read from its schedule (`visited_sigmas`);
a scheduler the function does not know is refused with a clear error, so a new family is added there.

Three frames, one path (`to_vp_frame`): a VE sample x = x_0 + sigma eps is divided by sqrt(sigma^2 + 1); a VP
sample is already x_t; a flow-matching sample x = (1 - s) x_0 + s eps (FlowMatchEulerDiscreteScheduler) is x_t / (alpha + sigma_t)
at s = sigma_t / (alpha_t + sigma_t) (tutorial 13, docs/flow_matching.md), i.e. VE sigma = s / (1 - s), and is multiplied back
by alpha + sigma_t = (1 + sigma) / sqrt(sigma^2 + 1). A flow path from pure noise starts at s = 1: VE sigma infinity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from minidiff.lab.accuracy import (
    ALPHA_SCHEDULE_VP,
    FLOW_MATCHING,
    SIGMA_SCHEDULE_VP,
    VARIANCE_EXPLODING,
    noise_levels,
    probability_flow_ode,
)
from minidiff.lab.gaussian_mixture import ExactVelocityModel, GaussianMixtureDenoiser


@dataclass(frozen=True)
class Trajectory:
    """Points along a path from noise to data: `points[i]` (B, *shape) sits at noise level `sigmas[i]` (VP frame)."""

    sigmas: tuple[float, ...]
    points: torch.Tensor  # (len(sigmas), B, *sample shape)

    def at(self, sigma: float) -> torch.Tensor:
        """The points at noise level `sigma` (one of `sigmas`, to 1e-9 relative)."""
        for index, value in enumerate(self.sigmas):
            if abs(value - sigma) <= 1e-9 * max(1.0, abs(sigma)):
                return self.points[index]
        raise KeyError(f"sigma {sigma} is not one of this trajectory's noise levels")


def visited_sigmas(scheduler) -> list[float]:
    """The N + 1 noise levels (VE sigma) a scheduler's sample sits at: the start, then after each of its N steps.

    Needs `set_timesteps` first. Two model calls a step (Heun, DPM2): their `sigmas` repeat each inner level,
    [s_0, s_1, s_1, ..., s_{N-1}, s_{N-1}, 0]; a step ends once at each distinct level.
    """
    name = type(scheduler).__name__
    if name in VARIANCE_EXPLODING or name in SIGMA_SCHEDULE_VP:
        sigmas = [float(sigma) for sigma in scheduler.sigmas]
        return [sigma for index, sigma in enumerate(sigmas) if index == 0 or sigma != sigmas[index - 1]]
    if name in ("DDIMScheduler", "DDPMScheduler"):  # the sample after a step sits at the next timestep's alpha_bar
        alphas_cumprod = scheduler.alphas_cumprod.double()
        levels = [math.sqrt((1 - a) / a) for a in (float(alphas_cumprod[int(t)]) for t in scheduler.timesteps)]
        return levels + [noise_levels(scheduler).sigma_last]
    if name in FLOW_MATCHING:  # flow level s = sigma / (1 + sigma) in VE terms; s = 1 is pure noise
        return [float(s) / (1 - float(s)) if float(s) < 1 else math.inf for s in scheduler.sigmas.double()]
    raise ValueError(
        f"visited_sigmas does not know the noise levels of {name}'s steps; add its family here "
        f"(known: {', '.join(VARIANCE_EXPLODING + SIGMA_SCHEDULE_VP + FLOW_MATCHING)}, DDIMScheduler, DDPMScheduler; "
        f"PNDM's warm-up steps revisit levels: not drawn)"
    )


def frame_of(scheduler) -> str:
    """"ve" (x_0 + sigma eps), "flow" ((1 - s) x_0 + s eps) or "vp" (x_t): how a scheduler's sample is scaled."""
    name = type(scheduler).__name__
    return "ve" if name in VARIANCE_EXPLODING else "flow" if name in FLOW_MATCHING else "vp"


def to_vp_frame(sample: torch.Tensor, sigma: float, frame: str) -> torch.Tensor:
    """A scheduler's sample at (VE) noise level sigma in the VP frame x_t: see the module's docstring."""
    if frame == "ve":
        return sample / math.sqrt(sigma**2 + 1)
    if frame == "flow":  # x_t = (alpha + sigma_t) x_flow; alpha + sigma_t -> 1 at pure noise
        return sample if math.isinf(sigma) else sample * (1 + sigma) / math.sqrt(sigma**2 + 1)
    if frame == "vp":
        return sample
    raise ValueError(f"frame must be 've', 'vp' or 'flow', got {frame!r}")


def scheduler_trajectory(
    scheduler, model: GaussianMixtureDenoiser, noise: torch.Tensor, num_inference_steps: int | None,
    step_kwargs: dict | None = None, sigmas: list[float] | None = None,
) -> Trajectory:
    """The scheduler's loop (as `accuracy.run_scheduler`), keeping the sample at the start and after each whole step.

    A two-call step (Heun, DPM2) is whole when the scheduler is back in its first-order state, or after the last call.
    Custom `sigmas` (in the scheduler's own terms) go to `set_timesteps(sigmas=...)` instead of a step count.
    A flow-matching scheduler is given the mixture's exact velocity (as in `accuracy.run_scheduler`).
    """
    if sigmas is None:
        scheduler.set_timesteps(num_inference_steps)
    else:
        scheduler.set_timesteps(sigmas=sigmas)
    levels = visited_sigmas(scheduler)
    frame = frame_of(scheduler)
    if frame == "flow":
        model = ExactVelocityModel(model, scheduler.config.num_train_timesteps)
    sample = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    points = [to_vp_frame(sample, levels[0], frame)]
    for index, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(sample, t) if hasattr(scheduler, "scale_model_input") else sample
        model_output = model(model_input, t).sample
        sample = scheduler.step(model_output, t, sample, **(step_kwargs or {})).prev_sample
        if getattr(scheduler, "state_in_first_order", True) or index == len(scheduler.timesteps) - 1:
            points.append(to_vp_frame(sample, levels[len(points)], frame))
    if len(points) != len(levels):
        raise RuntimeError(f"{type(scheduler).__name__} made {len(points) - 1} whole steps, expected {len(levels) - 1}")
    return Trajectory(tuple(levels), torch.stack(points))


def exact_trajectory(
    model: GaussianMixtureDenoiser, start: torch.Tensor, sigmas, num_points: int = 48, rtol: float = 1e-8
) -> Trajectory:
    """The exact probability-flow path from `start` (VP frame, at noise level sigmas[0]) through every level of
    `sigmas` (decreasing), with `num_points` more levels spaced evenly in log sigma for a smooth curve.

    With a scheduler's `visited_sigmas`, `result.at(sigma)` is where the exact path is at each of its steps.
    """
    sigmas = [float(sigma) for sigma in sigmas]
    if math.isinf(sigmas[0]):
        raise ValueError("the path starts at pure noise (sigma infinity, a flow path at s = 1): start the exact path at its first finite level")
    positive = [sigma for sigma in sigmas if sigma > 0]
    high, low = max(positive), min(positive)
    dense = [math.exp(math.log(high) + (math.log(low) - math.log(high)) * i / (num_points - 1)) for i in range(num_points)]
    grid = sorted(set(sigmas) | set(dense), reverse=True)
    grid = [sigma for sigma in grid if sigmas[-1] <= sigma <= sigmas[0]]
    x = start.double() * math.sqrt(grid[0] ** 2 + 1)  # the VE frame, x_0 + sigma eps, in which the ODE is solved
    points = [start.double()]
    for sigma_from, sigma_to in zip(grid, grid[1:]):
        x = probability_flow_ode(model, x, sigma_from, sigma_to, rtol=rtol, atol=rtol)
        points.append(x / math.sqrt(sigma_to**2 + 1))
    return Trajectory(tuple(grid), torch.stack(points))
