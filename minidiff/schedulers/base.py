"""What every scheduler shares: the training noise schedule, timestep spacing, add_noise, the step index.

The forward (noising) process of DDPM (Ho et al. 2020, arXiv 2006.11239, eq. 4) is

    q(x_t | x_0) = N( sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I ),   alpha_bar_t = prod_{s<=t} (1 - beta_s)

Every scheduler starts from the same betas -> alphas_cumprod (alpha_bar) of training. The sigma
schedulers (Karras et al. 2022, "EDM", arXiv 2206.00364) rewrite it as x = x_0 + sigma eps with

    sigma = sqrt( (1 - alpha_bar_t) / alpha_bar_t )

(the names of the two frames are set out in `parameterization.py`). The update rules are pure functions in
`update_rules.py`; each scheduler class (one per file) picks the noise levels, keeps the state and calls them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from minidiff.configuration import CONFIG_CLASSES, ConfigMixin, check_choice
from minidiff.schedulers import parameterization
from minidiff.schedulers.parameterization import PREDICTION_TYPES, dynamic_threshold, vp_from_alpha_bar  # noqa: F401
from minidiff.utils.outputs import BaseOutput
from minidiff.utils.torch_utils import randn_tensor  # noqa: F401  (re-exported: old import path)

# The scheduler classes that read each other's configs: diffusers' `KarrasDiffusionSchedulers` enum.
# `compatibles` keeps the ones minidiff implements.
KARRAS_DIFFUSION_SCHEDULERS = [
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
    "DPMSolverSDEScheduler",
    "EDMEulerScheduler",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


@dataclass
class SchedulerOutput(BaseOutput):
    """What `step` returns: x_{t-1} (`prev_sample`) and the model's estimate of x_0 (`pred_original_sample`)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


# ----- the training noise schedule ---------------------------------------------------------------


def betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule of Nichol & Dhariwal 2021 (arXiv 2102.09672, eq. 17), "squaredcos_cap_v2":

    alpha_bar(t) = cos^2( (t + 0.008) / 1.008 * pi/2 ),   beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta)
    """

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023, arXiv 2305.08891, Algorithm 1).

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first value is unchanged.
    """
    sqrt_alpha_bar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[0:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def make_betas(
    beta_schedule: str,
    beta_start: float,
    beta_end: float,
    num_train_timesteps: int,
    trained_betas=None,
    rescale_betas_zero_snr: bool = False,
) -> torch.Tensor:
    """beta_1..beta_T in float32, from `trained_betas` when given, else from the named schedule.

    linear:            beta_t = linspace(beta_start, beta_end, T)
    scaled_linear:     beta_t = linspace(sqrt(beta_start), sqrt(beta_end), T)^2      (latent diffusion, SD 1.x)
    squaredcos_cap_v2: the cosine schedule (`betas_for_alpha_bar`)
    """
    if trained_betas is not None:
        betas = torch.tensor(np.asarray(trained_betas), dtype=torch.float32)
    else:
        check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        else:
            betas = betas_for_alpha_bar(num_train_timesteps)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t) (VE) for every training timestep t, as float32 numpy.

    Computed in float32, as diffusers does: Karras/exponential timesteps come from `sigma_to_t` on
    `np.log` of these values, and float64 sigmas shift those timesteps by a float32 ulp often enough
    to break exact timestep parity.
    """
    alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float32)
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


# ----- which timesteps to visit --------------------------------------------------------------------


def integer_timestep(timestep, scheduler_name: str) -> int:
    """The training timestep `t` (an int, or a 0-dim tensor holding one) as a Python int.

    The DDPM-family schedulers index alpha_bar by t; a fractional t has no alpha_bar.
    """
    value = float(timestep)
    if value != int(value):
        raise ValueError(
            f"{scheduler_name} works on integer training timesteps, got {value}; "
            "pass the values of `scheduler.timesteps` (after `set_timesteps`) to `step`"
        )
    return int(value)


def check_num_inference_steps(num_inference_steps, num_train_timesteps: int) -> None:
    if not isinstance(num_inference_steps, (int, np.integer)) or isinstance(num_inference_steps, bool):
        raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be between 1 and num_train_timesteps={num_train_timesteps}, "
            f"got {num_inference_steps}: the model was trained on only {num_train_timesteps} noise levels"
        )


def spaced_timesteps(spacing: str, num_inference_steps: int, num_train_timesteps: int, steps_offset: int = 0) -> np.ndarray:
    """The N timesteps to visit, from noisiest to cleanest, as float64 (each scheduler rounds/casts as it needs).

    leading:  t_i = i * (T // N) + steps_offset, i = N-1..0       (DDIM paper; never reaches T-1)
    linspace: t_i = linspace(0, T-1, N), reversed                   (not rounded here)
    trailing: t_i = round(T - i * T/N) - 1, i = 0..N-1              (Lin et al. 2023, Table 2; starts at T-1)
    See docs/schedulers.md §2 for the examples these reproduce (e.g. trailing, 4 steps: 999, 749, 499, 249).
    """
    check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    T, N = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        return np.linspace(0, T - 1, N)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, N) * (T // N)).round()[::-1].astype(np.float64) + steps_offset
    timesteps = np.round(np.arange(T, 0, -T / N)) - 1
    # For some N (61, 103, 121, ... at T=1000) float round-off gives arange one point too many, just above 0,
    # which becomes t = -1 (diffusers 0.42 keeps it: N+1 steps, the last at t = -1). We drop it.
    return timesteps[timesteps >= 0]


# ----- noise levels of the sigma schedulers (Euler, LMS, DPM-Solver, UniPC) -------------------


def check_float_timestep(timestep, where: str) -> None:
    """The sigma schedulers find their noise level from `timestep` itself, a float of `scheduler.timesteps`
    (e.g. 978.6122); an integer is almost always a loop index by mistake. `where` names the caller in the error."""
    if isinstance(timestep, (int, np.integer)) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
        raise ValueError(
            f"{where} got the integer timestep {timestep!r}; pass the float values of `scheduler.timesteps` "
            "(e.g. `for t in scheduler.timesteps: ... scheduler.step(output, t, sample)`), not an index from `enumerate`"
        )


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep whose noise level is `sigma`: linear interpolation in log-sigma."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    distances = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(distances >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    t = (1 - w) * low + w * high
    return t.reshape(np.shape(sigma))


def spaced_sigmas(config, train_sigmas: np.ndarray, log_train_sigmas: np.ndarray, num_inference_steps: int,
                  num_train_timesteps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) of N steps for the k-diffusion schedulers (Heun, DPM-Solver-2, ...): the spaced
    timesteps, sigma interpolated linearly between training timesteps, then, if the config asks, Karras /
    exponential / beta noise levels between the two ends of that schedule (timesteps from `sigma_to_t`)."""
    timesteps = spaced_timesteps(config.timestep_spacing, num_inference_steps, num_train_timesteps, config.steps_offset)
    timesteps = timesteps.astype(np.float32)  # as diffusers: sigma is interpolated at the float32 timesteps
    sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)  # (N,) float64
    sigma_min, sigma_max = float(sigmas[-1]), float(sigmas[0])
    if config.use_karras_sigmas:
        sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps)
    elif config.use_exponential_sigmas:
        sigmas = exponential_sigmas(sigma_min, sigma_max, num_inference_steps)
    elif config.use_beta_sigmas:
        sigmas = beta_sigmas(sigma_min, sigma_max, num_inference_steps)
    else:
        return timesteps, sigmas
    return sigma_to_t(sigmas, log_train_sigmas), sigmas


def check_one_noise_schedule(use_karras_sigmas: bool, use_exponential_sigmas: bool, use_beta_sigmas: bool) -> None:
    if sum(map(bool, (use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas))) > 1:
        raise ValueError(
            "use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas each replace the noise levels; "
            "set at most one of them to True"
        )


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    ramp = np.linspace(0, 1, num_inference_steps)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int) -> np.ndarray:
    """Noise levels evenly spaced in log-sigma, from sigma_max down to sigma_min."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_inference_steps))


def beta_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """Lee et al. 2024, "Beta Sampling is All You Need" (arXiv 2407.12173): noise levels at the quantiles
    of a Beta(alpha, beta) distribution, dense near both ends of the schedule:

    sigma_i = sigma_min + F^-1(1 - i/(N-1)) (sigma_max - sigma_min),   F = the Beta(alpha, beta) CDF
    """
    quantiles = 1 - np.linspace(0, 1, num_inference_steps)
    return np.array([sigma_min + beta_ppf(q, alpha, beta) * (sigma_max - sigma_min) for q in quantiles])


def beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse of the Beta(a, b) CDF, by bisection on `regularized_incomplete_beta` (monotone in x)."""
    if q <= 0 or q >= 1:
        return float(q >= 1)
    low, high = 0.0, 1.0
    for _ in range(60):  # 2^-60 < 1e-18: as exact as a float64 allows
        middle = (low + high) / 2
        low, high = (middle, high) if regularized_incomplete_beta(middle, a, b) < q else (low, middle)
    return (low + high) / 2


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """The Beta(a, b) CDF, I_x(a, b) = B(x; a, b) / B(a, b), by its continued fraction
    (Abramowitz & Stegun 26.5.8), evaluated with the modified Lentz method.

    The fraction converges fast for x < (a+1)/(a+b+2); above that, I_x(a, b) = 1 - I_{1-x}(b, a).
    """
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):
        return 1.0 - regularized_incomplete_beta(1.0 - x, b, a)
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - log_beta) / a

    def nonzero(value: float) -> float:  # Lentz's guard against dividing by zero
        return value if abs(value) > 1e-300 else 1e-300

    c, d = 1.0, 1 / nonzero(1 - (a + b) * x / (a + 1))
    fraction = d
    for m in range(1, 300):
        for numerator in (  # the terms d_{2m} and d_{2m+1} of the fraction
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 / nonzero(1 + numerator * d)
            c = nonzero(1 + numerator / c)
            fraction *= c * d
        if abs(c * d - 1) < 1e-16:
            break
    return front * fraction


# ----- the forward process ----------------------------------------------------------------------


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    values = values.flatten()
    while values.ndim < like.ndim:
        values = values.unsqueeze(-1)
    return values


def add_noise_vp(alphas_cumprod: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """x_t = alpha_t x_0 + sigma_t eps (DDPM eq. 4) at each sample's timestep (`parameterization.add_noise_vp`)."""
    alpha_bar = _broadcast(alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[timesteps.to(x0.device).long()], x0)
    return parameterization.add_noise_vp(x0, noise, *vp_from_alpha_bar(alpha_bar))


def velocity_vp(alphas_cumprod: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """v = alpha_t eps - sigma_t x_0 (Salimans & Ho 2022, arXiv 2202.00512, §4) at each sample's timestep."""
    alpha_bar = _broadcast(alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[timesteps.to(x0.device).long()], x0)
    return parameterization.velocity(x0, noise, *vp_from_alpha_bar(alpha_bar))


class _ClassAndInstanceProperty:
    """`X.compatibles` and `x.compatibles` both work (diffusers has it on instances only)."""

    def __init__(self, method):
        self.method = method
        self.__doc__ = method.__doc__

    def __get__(self, instance, owner):
        return self.method(owner)


class SchedulerMixin(ConfigMixin):
    """The bookkeeping every scheduler shares; the algorithm is in each subclass's `step`.

    - `compatibles`: the minidiff scheduler classes that can be built from this one's config.
    - `step_index`: which entry of `timesteps` the next `step` is at. It is found from the first
      timestep passed to `step` (the second match when a timestep repeats), unless
      `set_begin_index(i)` was called first, as img2img does.
    """

    config_name = "scheduler_config.json"
    _compatibles = KARRAS_DIFFUSION_SCHEDULERS
    order = 1
    # Whether `step` needs `set_timesteps` first. DDPM, Euler, Euler Ancestral and LMS set False: as in
    # diffusers, a fresh one steps through all num_train_timesteps of training (T-1, ..., 0).
    requires_set_timesteps = True

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **push_to_hub_kwargs):
        """Writes `scheduler_config.json` into `save_directory` (created if needed), for `from_pretrained`.

        As diffusers' signature; `push_to_hub=True` is refused (minidiff never uploads). Returns the file's path.
        """
        return self.save_config(save_directory, push_to_hub=push_to_hub, **push_to_hub_kwargs)

    @_ClassAndInstanceProperty
    def compatibles(cls) -> list[type]:
        """Every minidiff scheduler class that can take this config (this class included)."""
        return cls._compatible_classes()

    @classmethod
    def _compatible_classes(cls) -> list[type]:
        names = dict.fromkeys([cls.__name__, *cls._compatibles])
        found = [CONFIG_CLASSES.get(name) for name in names]
        return [klass for klass in found if isinstance(klass, type) and issubclass(klass, SchedulerMixin)]

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ----- the step index -----

    _step_index: int | None = None
    _begin_index: int | None = None

    @property
    def step_index(self) -> int | None:
        """The index into `timesteps` of the next step (None until the first `step`)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The first index, when set by `set_begin_index` (img2img); None otherwise."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at `timesteps[begin_index]` without searching for the timestep (img2img calls this)."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Position of `timestep` in the schedule; when it occurs twice, the second one (so a
        run that starts mid-schedule does not skip a noise level)."""
        schedule_timesteps = self.timesteps if schedule_timesteps is None else schedule_timesteps
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.to(schedule_timesteps.device)
        matches = (schedule_timesteps == timestep).nonzero()
        if len(matches) == 0:
            raise ValueError(
                f"timestep {float(timestep)} is not one of this scheduler's timesteps; pass the values of "
                "`scheduler.timesteps` (after `set_timesteps`) to `step`"
            )
        return matches[1 if len(matches) > 1 else 0].item()

    def _init_step_index(self, timestep) -> None:
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    def _add_noise_step_indices(self, timesteps: torch.Tensor, schedule_timesteps: torch.Tensor) -> list[int]:
        """Which entry of the schedule `add_noise` takes for each sample, as diffusers' sigma schedulers:

        - no `set_begin_index` (training, or a pipeline without it): search each timestep (second match);
        - after the first step (inpainting re-noises the known region): the current step index;
        - before the first step (img2img builds its start latent): the begin index.
        """
        timesteps = timesteps.reshape(-1)
        if self.begin_index is None:
            return [self.index_for_timestep(t, schedule_timesteps) for t in timesteps]
        if self.step_index is not None:
            return [self.step_index] * len(timesteps)
        return [self.begin_index] * len(timesteps)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x_0 + sigma_t eps (DDPM eq. 4), for each sample's timestep."""
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (`sample` is x_0)."""
        return velocity_vp(self.alphas_cumprod, sample, noise, timesteps)

    def _check_timesteps_set(self) -> None:
        if self.requires_set_timesteps and getattr(self, "num_inference_steps", None) is None:
            raise ValueError(
                f"{type(self).__name__}.step was called before set_timesteps; "
                "call `scheduler.set_timesteps(num_inference_steps)` first"
            )


class SigmaSchedulerMixin(SchedulerMixin):
    """What Euler, Euler Ancestral and LMS share: they move x = x_0 + sigma eps (Karras et al. 2022), but the
    model was trained on x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps = x / sqrt(sigma^2 + 1).
    Subclasses set `self.sigmas` (N+1 values, the last 0) in `set_timesteps`."""

    is_scale_input_called = False

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """Std of the starting noise x_T: sigma_max, or sqrt(sigma_max^2 + 1) for "leading" (as diffusers)."""
        sigma_max = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return sigma_max
        return (sigma_max**2 + 1) ** 0.5

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """The model input x / sqrt(sigma^2 + 1): the noisy sample at the scale the model was trained on."""
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        self.is_scale_input_called = True
        return sample / ((sigma**2 + 1) ** 0.5)

    def set_training_sigmas(self, beta_schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int,
                            trained_betas=None) -> None:
        """betas -> alpha_bar_t (DDPM eq. 4) -> sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) at every training
        timestep, float32 as diffusers computes them, and their logs (for `sigma_to_t`)."""
        self.betas = make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)  # (T,) float32, sigma_t for t = 0..T-1
        self.log_train_sigmas = np.log(self.train_sigmas)

    def _model_sigma(self, entry: int) -> torch.Tensor:
        """The noise level the model is asked about at `timesteps[entry]` (the 2-calls-a-step schedulers override it)."""
        return self.sigmas[entry]

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x = x_0 + sigma eps, with sigma the schedule's noise level at each timestep in `timesteps`."""
        device = original_samples.device
        sigmas = self.sigmas.to(device=device, dtype=original_samples.dtype)
        step_indices = self._add_noise_step_indices(timesteps.to(device), self.timesteps.to(device))
        sigma = _broadcast(sigmas[step_indices], original_samples)  # (B, 1, 1, 1)
        return parameterization.add_noise_ve(original_samples, noise, sigma)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022, §4),
        with alpha_bar = 1 / (sigma^2 + 1) at each timestep's noise level: v = (eps - sigma x_0) / sqrt(sigma^2 + 1).

        diffusers 0.42.1 indexes alphas_cumprod by the *position* in `timesteps` here instead of the
        timestep; minidiff uses the timestep's own noise level.
        """
        check_float_timestep(timesteps, f"{type(self).__name__}.get_velocity")
        schedule_timesteps = self.timesteps.to(sample.device)
        step_indices = [self.index_for_timestep(t, schedule_timesteps) for t in timesteps.to(sample.device).reshape(-1)]
        sigma = torch.stack([self._model_sigma(index) for index in step_indices])
        sigma = _broadcast(sigma.to(device=sample.device, dtype=sample.dtype), sample)
        return (noise - sigma * sample) / (sigma**2 + 1) ** 0.5
