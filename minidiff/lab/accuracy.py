"""The scheduler accuracy lab: how far is each scheduler from the exact answer, and how fast does it converge?

A trained UNet has its own error, which hides the scheduler's. Here the model is exact
(`GaussianMixtureDenoiser`: the Bayes-optimal denoiser of a Gaussian mixture), so whatever error
is left is the scheduler's discretization error. Two questions, two measurements:

1. Deterministic schedulers (DDIM eta=0, PNDM, LMS, Euler, Heun, DPM2, DPM-Solver++ 1/2M/3M and 2S/3S,
   DEIS, UniPC) solve the probability-flow ODE (Song et al. 2021, arXiv 2011.13456, eq. 13), written in sigma as in
   Karras et al. 2022 (arXiv 2206.00364, eq. 1 with sigma(t) = t, and eq. 3 for the score):

       dx/dsigma = (x - D(x, sigma)) / sigma = -sigma grad_x log p_sigma(x),    x = x_0 + sigma eps

   The reference is that ODE solved to ~1e-10 in float64 (adaptive Dormand-Prince 5(4)) from the
   same initial noise, between the scheduler's own first and last noise levels (`noise_levels`),
   so each scheduler is compared with the exact endpoint of its own path. The error is the RMS
   difference per element; the empirical order is the slope of -log(error) against log(steps).

   The flow-matching scheduler (`FLOW_SETUPS`) runs on the exact velocity of the same mixture (`ExactVelocityModel`)
   from the same noise, and its reference is the flow ODE dx/dsigma = u(x, sigma), x = (1 - sigma) x_0 + sigma eps,
   solved the same way (`flow_ode`): the same trajectories as the PF-ODE, in the coordinates of tutorial 13.

2. Stochastic schedulers (DDPM, Euler ancestral, DDIM eta=1, SDE-DPM-Solver++ 2M and 2S, DPM2 ancestral,
   DPM++ SDE with its Brownian tree) sample the mixture. Their error is a distribution error: the frequency, mean and variance of each
   component in a few thousand 2-D samples, against the known mixture, in units of the sampling
   standard error (`distribution_stats`).

Every scheduler is built as a tutorial does it: `Class.from_config(sd15_config, **changes)`, so the
numbers are those of Stable Diffusion 1.5's noise schedule and each scheduler's defaults.
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from minidiff.data import sd15_config
from minidiff.lab.gaussian_mixture import ExactVelocityModel, GaussianMixtureDenoiser

# Stable Diffusion 1.5's scheduler_config.json (bundled with minidiff: the one copy of SD 1.5's configs; docs/schedulers.md §1).
SD15_SCHEDULER_CONFIG = sd15_config("scheduler")

DEFAULT_STEPS = (5, 10, 20, 50, 100, 200)


@dataclass(frozen=True)
class SchedulerSetup:
    """One row of the lab: a scheduler class (by name), its config changes on top of SD 1.5's, and `step` arguments."""

    label: str
    class_name: str
    config: dict = field(default_factory=dict)
    step_kwargs: dict = field(default_factory=dict)
    stochastic: bool = False


# The singlestep solvers' groups of `solver_order` steps must fit N, and their step to sigma = 0 must be first
# order: diffusers switches lower_order_final on (with a warning) when they would not. Set it up front.
SINGLESTEP = {"lower_order_final": True}

DETERMINISTIC_SETUPS = (
    SchedulerSetup("DDIM", "DDIMScheduler", step_kwargs={"eta": 0.0}),
    SchedulerSetup("PNDM (PLMS)", "PNDMScheduler"),
    SchedulerSetup("LMS", "LMSDiscreteScheduler"),
    SchedulerSetup("Euler", "EulerDiscreteScheduler"),
    SchedulerSetup("Heun", "HeunDiscreteScheduler"),  # two model calls a step
    SchedulerSetup("DPM2", "KDPM2DiscreteScheduler"),  # two model calls a step
    SchedulerSetup("DPM++ 1", "DPMSolverMultistepScheduler", {"solver_order": 1}),
    SchedulerSetup("DPM++ 2M", "DPMSolverMultistepScheduler", {"solver_order": 2}),
    SchedulerSetup("DPM++ 3M", "DPMSolverMultistepScheduler", {"solver_order": 3}),
    SchedulerSetup("DPM++ 2S", "DPMSolverSinglestepScheduler", {"solver_order": 2, **SINGLESTEP}),
    SchedulerSetup("DPM++ 3S", "DPMSolverSinglestepScheduler", {"solver_order": 3, **SINGLESTEP}),
    SchedulerSetup("DEIS", "DEISMultistepScheduler", {"solver_order": 2}),
    SchedulerSetup("DEIS 3", "DEISMultistepScheduler", {"solver_order": 3}),
    SchedulerSetup("UniPC bh1", "UniPCMultistepScheduler", {"solver_type": "bh1"}),
    SchedulerSetup("UniPC bh2", "UniPCMultistepScheduler", {"solver_type": "bh2"}),
    # The same solvers stopping at sigma_min instead of jumping to sigma = 0 on the last step
    # (final_sigmas_type "sigma_min"): without that first-order jump their higher order shows.
    SchedulerSetup("DPM++ 2M sigma_min", "DPMSolverMultistepScheduler", {"solver_order": 2, "final_sigmas_type": "sigma_min"}),
    SchedulerSetup("DPM++ 3M sigma_min", "DPMSolverMultistepScheduler", {"solver_order": 3, "final_sigmas_type": "sigma_min"}),
    SchedulerSetup("UniPC bh2 sigma_min", "UniPCMultistepScheduler", {"final_sigmas_type": "sigma_min"}),
    SchedulerSetup("DPM++ 2S sigma_min", "DPMSolverSinglestepScheduler", {"solver_order": 2, "final_sigmas_type": "sigma_min", **SINGLESTEP}),
)

# Flow matching on the same mixture: Euler on the flow ODE, with diffusers' default levels and with SD3's shift.
# Kept apart from DETERMINISTIC_SETUPS (SD 1.5's `compatibles`, which tutorial 04 measures); `minidiff demo` runs both.
FLOW_SETUPS = (
    SchedulerSetup("Flow Euler", "FlowMatchEulerDiscreteScheduler"),
    SchedulerSetup("Flow Euler shift 3", "FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
)

STOCHASTIC_SETUPS = (
    SchedulerSetup("DDPM", "DDPMScheduler", stochastic=True),
    SchedulerSetup("Euler a", "EulerAncestralDiscreteScheduler", stochastic=True),
    SchedulerSetup("DDIM eta=1", "DDIMScheduler", step_kwargs={"eta": 1.0}, stochastic=True),
    SchedulerSetup("SDE-DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, stochastic=True),
    SchedulerSetup("DPM++ 2S a", "DPMSolverSinglestepScheduler", {"algorithm_type": "sde-dpmsolver++", **SINGLESTEP}, stochastic=True),
    SchedulerSetup("DPM2 a", "KDPM2AncestralDiscreteScheduler", stochastic=True),
    # its Brownian path comes from `noise_sampler_seed`, not from step's generator (as in diffusers): seeded here,
    # else each run would draw the seed from torch's global generator and the table would change from run to run
    SchedulerSetup("DPM++ SDE", "DPMSolverSDEScheduler", {"noise_sampler_seed": 0}, stochastic=True),
)

# The deterministic setups by family, for plots with a few lines per panel (tutorial 04, `minidiff demo`'s accuracy.png).
FAMILIES = {
    "first order": ("DDIM", "Euler", "DPM++ 1"),
    "linear multistep (in sigma or t)": ("LMS", "PNDM (PLMS)"),
    "two model calls a step": ("Heun", "DPM2"),
    "multistep exponential integrators": ("DPM++ 2M", "DPM++ 3M", "DEIS", "DEIS 3"),
    "UniPC, and singlestep DPM-Solver++": ("UniPC bh1", "UniPC bh2", "DPM++ 2S", "DPM++ 3S"),
    "stopping at sigma_min (no jump to 0)": ("DPM++ 2M sigma_min", "DPM++ 3M sigma_min", "UniPC bh2 sigma_min", "DPM++ 2S sigma_min"),
    "flow matching (flow ODE from pure noise)": ("Flow Euler", "Flow Euler shift 3"),
}

# Model calls per step where it is not one: the second-order single-step methods evaluate the model at the
# step's start and at a second point (Heun: the Euler step's end; DPM2 and DPM++ SDE: a midpoint). With N steps
# they make 2N - 1 calls (the last step has one), as `len(scheduler.timesteps)` says.
MODEL_CALLS_PER_STEP = {"Heun": 2, "DPM2": 2, "DPM2 a": 2, "DPM++ SDE": 2}

# The order each method is built to have (in its own step variable, on a smooth grid).
DESIGN_ORDERS = {
    "DDIM": 1, "Euler": 1, "DPM++ 1": 1, "PNDM (PLMS)": 4, "LMS": 4, "DPM++ 2M": 2, "DPM++ 3M": 3,
    "UniPC bh1": 3, "UniPC bh2": 3, "DPM++ 2M sigma_min": 2, "DPM++ 3M sigma_min": 3, "UniPC bh2 sigma_min": 3,
    "Heun": 2, "DPM2": 2, "DPM++ 2S": 2, "DPM++ 3S": 3, "DEIS": 2, "DEIS 3": 3, "DPM++ 2S sigma_min": 2,
    "Flow Euler": 1, "Flow Euler shift 3": 1,
}


def make_scheduler(setup: SchedulerSetup, library=None):
    """`Class.from_config(SD15_SCHEDULER_CONFIG, **setup.config)` (flow matching: only its num_train_timesteps), the class looked up by name in `library`
    (default `minidiff.schedulers`; any module with diffusers' class names works). None if it has no such class."""
    if library is None:
        import minidiff.schedulers as library
    scheduler_class = getattr(library, setup.class_name, None)
    if scheduler_class is None:
        return None
    # a flow scheduler has no beta schedule: it takes only SD 1.5's number of training steps
    base = {"num_train_timesteps": SD15_SCHEDULER_CONFIG["num_train_timesteps"]} if setup.class_name in FLOW_MATCHING else SD15_SCHEDULER_CONFIG
    return scheduler_class.from_config(base, **setup.config)


# ----- the mixtures --------------------------------------------------------------------------------------

# A 2-D mixture (C=2, H=W=1) with unequal weights: every scheduler runs on thousands of its samples in
# milliseconds. Components overlap a little (s = 1), which makes the ODE trajectories bend without
# making them chaotic.
MIXTURE_2D_MEANS = ((-2.0, -1.0), (2.0, -1.5), (0.0, 2.0), (2.5, 2.0))
MIXTURE_2D_WEIGHTS = (0.4, 0.3, 0.2, 0.1)
MIXTURE_2D_STD = 1.0


def mixture_2d(dtype: torch.dtype = torch.float64) -> GaussianMixtureDenoiser:
    """The low-dimensional mixture of the lab, on SD 1.5's noise schedule."""
    means = torch.tensor(MIXTURE_2D_MEANS, dtype=dtype)[:, :, None, None]  # (K, 2, 1, 1)
    return GaussianMixtureDenoiser.from_components(
        means, MIXTURE_2D_WEIGHTS, data_std=MIXTURE_2D_STD, scheduler_config=SD15_SCHEDULER_CONFIG
    )


def prototype_mixture(size: int = 32, data_std: float = 0.1, dtype: torch.dtype = torch.float32) -> GaussianMixtureDenoiser:
    """The image mixture: one component per Pillow prototype (circle, square, ..., boat), one class each."""
    from minidiff.lab.prototypes import prototype_means

    return GaussianMixtureDenoiser.from_components(
        prototype_means(size, dtype=dtype), data_std=data_std, scheduler_config=SD15_SCHEDULER_CONFIG
    )


# ----- running a scheduler -------------------------------------------------------------------------------


def run_scheduler(
    scheduler,
    model: GaussianMixtureDenoiser,
    noise: torch.Tensor,
    num_inference_steps: int,
    step_kwargs: dict | None = None,
    generator: torch.Generator | None = None,
    class_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The denoising loop of every diffusers tutorial. Returns (initial sample, final sample).

    `noise` is the N(0, I) draw; the initial sample is `noise * scheduler.init_noise_sigma`.
    A generator is passed to `step` only when given (stochastic schedulers). A flow-matching scheduler gets the
    mixture's exact velocity instead of its denoiser (diffusers' flow class has no init_noise_sigma or
    scale_model_input: 1 and the identity).
    """
    if is_flow_matching(scheduler) and isinstance(model, GaussianMixtureDenoiser):
        model = ExactVelocityModel(model, scheduler.config.num_train_timesteps)
    scheduler.set_timesteps(num_inference_steps)
    sample = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    initial = sample.clone()
    step_kwargs = dict(step_kwargs or {})
    if generator is not None:
        step_kwargs["generator"] = generator
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t) if hasattr(scheduler, "scale_model_input") else sample
        model_output = model(model_input, t, class_labels=class_labels).sample
        sample = scheduler.step(model_output, t, sample, **step_kwargs).prev_sample
    return initial, sample


VARIANCE_EXPLODING = (
    "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler", "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler",
)
SIGMA_SCHEDULE_VP = (
    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler"
)
ALPHA_SCHEDULE_VP = ("DDIMScheduler", "PNDMScheduler", "DDPMScheduler")
FLOW_MATCHING = ("FlowMatchEulerDiscreteScheduler",)


def is_flow_matching(scheduler) -> bool:
    """Whether `scheduler` moves x = (1 - sigma) x_0 + sigma eps with a velocity (minidiff's or diffusers' class)."""
    return type(scheduler).__name__ in FLOW_MATCHING


@dataclass(frozen=True)
class NoiseLevels:
    """Where a scheduler's path starts and ends, and how its sample is scaled.

    variance_exploding: the sample is x = x_0 + sigma eps (the `VARIANCE_EXPLODING` classes); otherwise it is the
    VP x = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps = (x_0 + sigma eps) / sqrt(sigma^2 + 1).
    """

    sigma_first: float
    sigma_last: float
    variance_exploding: bool
    flow_matching: bool = False  # the sample is x = (1 - sigma) x_0 + sigma eps, sigma_first/last in [0, 1]

    def to_sigma_form(self, sample: torch.Tensor, sigma: float) -> torch.Tensor:
        """The scheduler's sample at noise level sigma, as x_0 + sigma eps."""
        return sample if self.variance_exploding else sample * math.sqrt(sigma**2 + 1)

    def from_sigma_form(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return x if self.variance_exploding else x / math.sqrt(sigma**2 + 1)


def _sigma_of_alpha_bar(alpha_bar: float) -> float:
    return math.sqrt((1 - alpha_bar) / alpha_bar)


def noise_levels(scheduler) -> NoiseLevels:
    """The first and last noise level of the path `scheduler` takes (after `set_timesteps`).

    - Euler, Euler a, LMS, Heun, DPM2, DPM2 a, DPM++ SDE: sigmas[0] (the sample is sigma-scaled) to sigmas[-1] = 0.
    - DPM-Solver++ (multistep and singlestep), DEIS, UniPC: sigmas[0] to sigmas[-1]: 0 with final_sigmas_type "zero" (default),
      sigma(t=0) with "sigma_min"; the sample is VP-scaled.
    - DDIM, PNDM: the first timestep's alpha_bar to `final_alpha_cumprod` (the last step lands there,
      not at t=0's level, when set_alpha_to_one is True); with SD 1.5 (leading spacing, steps_offset 1)
      the first timestep is (N-1) * (1000 // N) + 1, e.g. 981 for 50 steps, not 999.
    - DDPM: the first timestep's alpha_bar to alpha_bar = 1 (its last step goes to t = -1).
    - FlowMatchEulerDiscreteScheduler: its flow sigmas[0] (1 by default) to sigmas[-1] = 0, in the flow frame.
    """
    name = type(scheduler).__name__
    if name in FLOW_MATCHING:
        return NoiseLevels(float(scheduler.sigmas[0]), float(scheduler.sigmas[-1]), False, flow_matching=True)
    if name in VARIANCE_EXPLODING or name in SIGMA_SCHEDULE_VP:
        return NoiseLevels(float(scheduler.sigmas[0]), float(scheduler.sigmas[-1]), name in VARIANCE_EXPLODING)
    if name in ALPHA_SCHEDULE_VP:
        alphas_cumprod = scheduler.alphas_cumprod.double()
        first = _sigma_of_alpha_bar(float(alphas_cumprod[int(scheduler.timesteps[0])]))
        last = 0.0 if name == "DDPMScheduler" else _sigma_of_alpha_bar(float(scheduler.final_alpha_cumprod))
        return NoiseLevels(first, last, variance_exploding=False)
    raise ValueError(
        f"the lab does not know where {name} starts and ends; add it to `noise_levels` "
        f"(known: {', '.join(VARIANCE_EXPLODING + SIGMA_SCHEDULE_VP + ALPHA_SCHEDULE_VP + FLOW_MATCHING)})"
    )


# ----- the reference: the probability-flow ODE, solved to high precision ----------------------------------

# Dormand & Prince 1980, "A family of embedded Runge-Kutta formulae" (Hairer, Norsett & Wanner,
# Solving ODEs I, Table 5.2): 7 stages, a 5th-order solution and an embedded 4th-order error estimate.
DOPRI_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
DOPRI_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
DOPRI_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
DOPRI_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


def solve_ode_dopri5(
    f, x: torch.Tensor, s_start: float, s_end: float, rtol: float = 1e-10, atol: float = 1e-10, max_steps: int = 100_000
):
    """Integrate dx/ds = f(s, x) from s_start to s_end with adaptive Dormand-Prince 5(4). Returns (x(s_end), evaluations).

    The step is accepted when the embedded error, scaled by atol + rtol |x| and RMS-averaged per
    sample, is <= 1 for every sample; the next step size is h * 0.9 * error^(-1/5), limited to [h/5, 5h].
    """
    direction = 1.0 if s_end >= s_start else -1.0
    s, h = s_start, (s_end - s_start) / 100
    evaluations = 0
    for _ in range(max_steps):
        if direction * (s_end - s) <= 0:
            return x, evaluations
        if direction * (s + h - s_end) > 0:
            h = s_end - s
        k = []
        for c, a in zip(DOPRI_C, DOPRI_A):
            stage = x + h * sum(a_j * k_j for a_j, k_j in zip(a, k)) if a else x
            k.append(f(s + c * h, stage))
        evaluations += len(k)
        x5 = x + h * sum(b * k_j for b, k_j in zip(DOPRI_B5, k))
        x4 = x + h * sum(b * k_j for b, k_j in zip(DOPRI_B4, k))
        scale = atol + rtol * torch.maximum(x.abs(), x5.abs())
        error = ((x5 - x4) / scale).pow(2).flatten(1).mean(1).sqrt().max().item()  # worst sample
        if error <= 1.0:
            s, x = s + h, x5
        h *= min(5.0, max(0.2, 0.9 * max(error, 1e-12) ** -0.2))
    raise RuntimeError(f"the reference ODE solver did not reach sigma={s_end} in {max_steps} steps (stopped at {s})")


def probability_flow_ode(
    model: GaussianMixtureDenoiser,
    x: torch.Tensor,
    sigma_from: float,
    sigma_to: float,
    class_labels: torch.Tensor | None = None,
    rtol: float = 1e-10,
    atol: float = 1e-10,
) -> torch.Tensor:
    """Solve dx/dsigma = -sigma grad log p_sigma(x) (= (x - D(x, sigma)) / sigma) in float64, x = x_0 + sigma eps.

    Written with the score rather than (x - D) / sigma, it stays finite at sigma = 0.
    """
    x = x.double()

    def velocity(sigma: float, x: torch.Tensor) -> torch.Tensor:
        score = model.posterior(x, 1.0, sigma, class_labels).score  # (B, D)
        return (-sigma * score).reshape(x.shape)

    x_end, _ = solve_ode_dopri5(velocity, x, sigma_from, sigma_to, rtol, atol)
    return x_end


def flow_ode(
    model: GaussianMixtureDenoiser,
    x: torch.Tensor,
    sigma_from: float,
    sigma_to: float,
    class_labels: torch.Tensor | None = None,
    rtol: float = 1e-10,
    atol: float = 1e-10,
) -> torch.Tensor:
    """Solve the flow-matching ODE dx/dsigma = u(x, sigma) = E[eps - x_0 | x] in float64, x = (1 - sigma) x_0 + sigma eps.

    The same trajectories as `probability_flow_ode`: x_flow = x_VE / (1 + sigma_VE) at sigma = sigma_VE / (1 + sigma_VE)
    (tutorial 13 checks it). Unlike the VE form it starts at pure noise, sigma = 1, where u stays finite."""
    x = x.double()

    def velocity(sigma: float, x: torch.Tensor) -> torch.Tensor:
        return model.flow_velocity(x, sigma, class_labels)

    x_end, _ = solve_ode_dopri5(velocity, x, sigma_from, sigma_to, rtol, atol)
    return x_end


def reference_endpoint(
    scheduler, model: GaussianMixtureDenoiser, initial_sample: torch.Tensor, class_labels=None, cache: dict | None = None
) -> torch.Tensor:
    """The exact end of `scheduler`'s path from `initial_sample`, in the scheduler's own scaling (float64).

    `cache` (a dict) reuses solves that start and end at the same place (e.g. Euler and LMS).
    """
    levels = noise_levels(scheduler)
    if levels.flow_matching:  # solved in its own frame: sigma = 1 is infinitely far in the VE one
        key = ("flow", levels.sigma_first, levels.sigma_last, hashlib.sha1(initial_sample.double().cpu().numpy().tobytes()).hexdigest())
        if cache is None or key not in cache:
            result = flow_ode(model, initial_sample, levels.sigma_first, levels.sigma_last, class_labels)
            if cache is None:
                return result
            cache[key] = result
        return cache[key]
    x_start = levels.to_sigma_form(initial_sample.double(), levels.sigma_first)
    key = (levels.sigma_first, levels.sigma_last, hashlib.sha1(x_start.cpu().numpy().tobytes()).hexdigest())
    if cache is not None and key in cache:
        return cache[key]
    x_end = probability_flow_ode(model, x_start, levels.sigma_first, levels.sigma_last, class_labels)
    result = levels.from_sigma_form(x_end, levels.sigma_last)
    if cache is not None:
        cache[key] = result
    return result


# ----- deterministic schedulers: error and order -----------------------------------------------------------


@dataclass
class ConvergenceResult:
    """One deterministic scheduler: RMS error to the exact ODE endpoint at each step count."""

    label: str
    steps: list[int]
    errors: list[float]

    @property
    def order(self) -> float:
        """Empirical order over the asymptotic range: the fit over the three largest step counts."""
        return fit_order(self.steps[-3:], self.errors[-3:])

    @property
    def order_few_steps(self) -> float:
        """Empirical order over the three smallest step counts (the range people sample with)."""
        return fit_order(self.steps[:3], self.errors[:3])


def fit_order(steps, errors) -> float:
    """p in error ~ C steps^(-p): minus the least-squares slope of log(error) against log(steps).

    NaN if any error is not finite (a diverged run has no order)."""
    errors = np.asarray(errors, dtype=np.float64)
    if len(errors) < 2 or not np.all(np.isfinite(errors)) or np.any(errors <= 0):
        return float("nan")
    slope = np.polyfit(np.log(np.asarray(steps, dtype=np.float64)), np.log(errors), 1)[0]
    return float(-slope)


def rms(x: torch.Tensor) -> float:
    return x.double().pow(2).mean().sqrt().item()


def measure_convergence(
    setup: SchedulerSetup,
    model: GaussianMixtureDenoiser,
    noise: torch.Tensor,
    steps=DEFAULT_STEPS,
    library=None,
    cache: dict | None = None,
    progress=None,
) -> ConvergenceResult | None:
    """Run `setup` at each step count from the same `noise`; None if `library` lacks the scheduler."""
    errors = []
    for num_inference_steps in steps:
        scheduler = make_scheduler(setup, library)
        if scheduler is None:
            return None
        initial, final = run_scheduler(scheduler, model, noise, num_inference_steps, setup.step_kwargs)
        reference = reference_endpoint(scheduler, model, initial, cache=cache)
        errors.append(rms(final.double() - reference))
        if progress is not None:
            progress.update(num_inference_steps)
    return ConvergenceResult(setup.label, list(steps), errors)


# ----- stochastic schedulers: distribution error -----------------------------------------------------------


@dataclass
class ComponentStats:
    """Sample statistics of one mixture component, and their z-scores (difference / standard error)."""

    component: int
    frequency: float
    frequency_target: float
    frequency_z: float
    mean_error: float  # |m_k - a mu_k|, Euclidean
    mean_z: float  # largest |z| over the dimensions
    variance: float  # per dimension, pooled
    variance_target: float
    variance_z: float


@dataclass
class DistributionResult:
    label: str
    num_inference_steps: int
    num_samples: int
    components: list[ComponentStats]

    @property
    def max_abs_z(self) -> float:
        values = [abs(v) for c in self.components for v in (c.frequency_z, c.mean_z, c.variance_z)]
        return float("nan") if any(math.isnan(v) for v in values) else max(values)


def distribution_stats(model: GaussianMixtureDenoiser, samples: torch.Tensor, sigma: float = 0.0) -> list[ComponentStats]:
    """Compare samples with the mixture noised to `sigma` (VP scale), component by component.

    Each sample is shared among the components by its exact responsibilities r_k(x). For samples of
    the mixture these estimators are unbiased whatever the overlap: E[r_k] = pi_k,
    E[r_k x] = pi_k a mu_k, E[r_k |x - a mu_k|^2] = pi_k D v. Standard errors are those of the
    ratio estimators (delta method), from the samples themselves.
    """
    a = 1 / math.sqrt(sigma**2 + 1)
    b = sigma * a
    x = samples.double().reshape(len(samples), -1)  # (N, D)
    n, dims = x.shape
    posterior = model.posterior(samples.double(), a, b)
    r = posterior.responsibilities  # (N, K)
    means = a * model.means.double().reshape(len(model.means), -1)  # (K, D)
    weights = model.log_weights.double().exp()
    variance_target = a**2 * model.config.data_std**2 + b**2
    stats = []
    for k in range(len(means)):
        r_k = r[:, k]
        total = r_k.mean()
        frequency_se = r_k.std() / math.sqrt(n)
        mean_k = (r_k[:, None] * x).mean(0) / total  # (D,)
        mean_se = ((r_k[:, None] * (x - mean_k)) / total).std(0) / math.sqrt(n)  # (D,)
        squared = ((x - means[k]) ** 2).sum(1) / dims  # (N,)
        variance_k = (r_k * squared).mean() / total
        variance_se = ((r_k * (squared - variance_k)) / total).std() / math.sqrt(n)
        stats.append(
            ComponentStats(
                component=k,
                frequency=total.item(),
                frequency_target=weights[k].item(),
                frequency_z=((total - weights[k]) / frequency_se).item(),
                mean_error=(mean_k - means[k]).norm().item(),
                mean_z=((mean_k - means[k]).abs() / mean_se).max().item(),
                variance=variance_k.item(),
                variance_target=variance_target,
                variance_z=((variance_k - variance_target) / variance_se).item(),
            )
        )
    return stats


def measure_distribution(
    setup: SchedulerSetup,
    model: GaussianMixtureDenoiser,
    num_inference_steps: int,
    num_samples: int = 4000,
    seed: int = 0,
    library=None,
) -> DistributionResult | None:
    """Sample `num_samples` points with a stochastic scheduler and compare them with the mixture at its final level."""
    scheduler = make_scheduler(setup, library)
    if scheduler is None:
        return None
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_samples, *model.means.shape[1:]), generator=generator, dtype=model.dtype)
    _, samples = run_scheduler(scheduler, model, noise, num_inference_steps, setup.step_kwargs, generator=generator)
    sigma_last = noise_levels(scheduler).sigma_last
    return DistributionResult(setup.label, num_inference_steps, num_samples, distribution_stats(model, samples, sigma_last))


# ----- tables ---------------------------------------------------------------------------------------------


def format_convergence_table(results: list[ConvergenceResult]) -> str:
    """A fixed-width text table: RMS error at each step count, and the two order fits."""
    if not results:
        return "(no deterministic scheduler available)\n"
    steps = results[0].steps
    label_width = max(len(r.label) for r in results) + 2
    header = f"{'scheduler':<{label_width}}" + "".join(f"{n:>10}" for n in steps) + f"{'order':>8}{'order':>8}{'design':>8}{'calls':>7}"
    subheader = f"{'':<{label_width}}" + "".join(f"{'steps':>10}" for _ in steps)
    subheader += f"{'(asym)':>8}{'(few)':>8}{'order':>8}{'/step':>7}"
    lines = [header, subheader, "-" * len(header)]
    for result in results:
        cells = "".join(f"{_format_error(e):>10}" for e in result.errors)
        design = DESIGN_ORDERS.get(result.label, "")
        orders = f"{_format_order(result.order):>8}{_format_order(result.order_few_steps):>8}{design!s:>8}"
        orders += f"{MODEL_CALLS_PER_STEP.get(result.label, 1):>7}"
        lines.append(f"{result.label:<{label_width}}{cells}{orders}")
    lines.append(
        f"RMS error per element vs the float64 PF-ODE endpoint; order(asym) fits the last three step counts "
        f"({', '.join(map(str, steps[-3:]))}), order(few) the first three; calls/step: model calls per step."
    )
    return "\n".join(lines) + "\n"


def format_distribution_table(results: list[DistributionResult]) -> str:
    """Per stochastic scheduler and step count: the worst |z| of frequency, mean and variance over the components."""
    if not results:
        return "(no stochastic scheduler available)\n"
    label_width = max(len(r.label) for r in results) + 2
    header = f"{'scheduler':<{label_width}}{'steps':>6}{'samples':>9}"
    header += f"{'|z| freq':>10}{'|z| mean':>10}{'|z| var':>10}{'var/target':>12}"
    lines = [header, "-" * len(header)]
    for result in results:
        worst = lambda attribute: max(abs(getattr(c, attribute)) for c in result.components)  # noqa: E731
        ratios = [c.variance / c.variance_target for c in result.components]
        lines.append(
            f"{result.label:<{label_width}}{result.num_inference_steps:>6}{result.num_samples:>9}"
            f"{worst('frequency_z'):>10.2f}{worst('mean_z'):>10.2f}{worst('variance_z'):>10.2f}"
            f"{min(ratios):>6.3f}-{max(ratios):<5.3f}"
        )
    lines.append("z = (sample statistic - mixture value) / its standard error; |z| < 3 is within sampling error.")
    return "\n".join(lines) + "\n"


def _format_error(error: float) -> str:
    return "diverged" if not math.isfinite(error) else f"{error:.2e}"


def _format_order(order: float) -> str:
    return "-" if math.isnan(order) else f"{order:.2f}"


def write_convergence_csv(results: list[ConvergenceResult], path: str | Path) -> Path:
    """One row per (scheduler, steps): label, steps, rms_error, order_asymptotic, order_few_steps, design_order."""
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["scheduler", "steps", "rms_error", "order_asymptotic", "order_few_steps", "design_order"])
        for result in results:
            for steps, error in zip(result.steps, result.errors):
                orders = [f"{result.order:.4f}", f"{result.order_few_steps:.4f}", DESIGN_ORDERS.get(result.label, "")]
                writer.writerow([result.label, steps, f"{error:.6e}", *orders])
    return path


def write_distribution_csv(results: list[DistributionResult], path: str | Path) -> Path:
    """One row per (scheduler, steps, component) with every statistic, its target and z-score."""
    path = Path(path)
    columns = [
        "frequency", "frequency_target", "frequency_z", "mean_error", "mean_z", "variance", "variance_target", "variance_z"
    ]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["scheduler", "steps", "samples", "component", *columns])
        for result in results:
            for c in result.components:
                values = [f"{getattr(c, name):.6g}" for name in columns]
                writer.writerow([result.label, result.num_inference_steps, result.num_samples, c.component, *values])
    return path
