"""What every scheduler shares: the step's output, the checks of its inputs, add_noise, the step index.

The forward (noising) process of DDPM (Ho et al. 2020, arXiv 2006.11239, eq. 4) is

    q(x_t | x_0) = N( sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I ),   alpha_bar_t = prod_{s<=t} (1 - beta_s)

Every scheduler starts from the same betas -> alphas_cumprod (alpha_bar) of training. The sigma
schedulers (Karras et al. 2022, "EDM", arXiv 2206.00364) rewrite it as x = x_0 + sigma eps with

    sigma = sqrt( (1 - alpha_bar_t) / alpha_bar_t )

(the names of the two frames are set out in `parameterization.py`). Where the files are:
- `schedules.py`: the pure schedule functions (training betas, timestep spacing, sigma ramps);
- this file: `SchedulerMixin` (every scheduler) and `SigmaSchedulerMixin` (the VE-frame schedulers);
- `exponential_integrator.py`: the base of DPM-Solver multistep / singlestep, DEIS and UniPC;
- `two_model_calls.py`: the schedule of the samplers that call the model twice a step;
- `update_rules.py`: every update rule as a pure function; each scheduler class (one per file) picks the
  noise levels, keeps the state and calls them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from minidiff.configuration import CONFIG_CLASSES, ConfigMixin, check_choice
from minidiff.schedulers import parameterization
from minidiff.schedulers.parameterization import PREDICTION_TYPES, vp_from_alpha_bar
from minidiff.schedulers.schedules import (
    BETA_SCHEDULES,
    TIMESTEP_SPACINGS,
    check_one_noise_ramp,
    make_betas,
    sigmas_from_alphas_cumprod,
)
from minidiff.utils.outputs import BaseOutput

# Old import paths: these names lived here; code that imports them from `base` keeps working. Their homes:
# PREDICTION_TYPES, dynamic_threshold -> parameterization.py; randn_tensor -> utils/torch_utils.py; check_choice ->
# configuration.py; the schedule functions (make_betas, spaced_timesteps, karras_sigmas, ..., TIMESTEP_SPACINGS,
# BETA_SCHEDULES, and check_one_noise_schedule, now check_one_noise_ramp) -> schedules.py. New code imports them there.
from minidiff.schedulers.parameterization import dynamic_threshold  # noqa: F401,E402
from minidiff.utils.torch_utils import randn_tensor  # noqa: F401,E402
from minidiff.schedulers.schedules import (  # noqa: F401,E402  (the pure schedule functions, moved from here)
    beta_ppf,
    beta_sigmas,
    betas_for_alpha_bar,
    exponential_sigmas,
    karras_sigmas,
    regularized_incomplete_beta,
    rescale_zero_terminal_snr,
    sigma_to_t,
    spaced_sigmas,
    spaced_timesteps,
)
from minidiff.schedulers.schedules import check_one_noise_ramp as check_one_noise_schedule  # noqa: F401,E402

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


@dataclass
class SchedulerOutput(BaseOutput):
    """What `step` returns: x_{t-1} (`prev_sample`) and the model's estimate of x_0 (`pred_original_sample`)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


# ----- checks of what the user passes -------------------------------------------------------------


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


def check_decreasing(name: str, values) -> None:
    """Custom `timesteps` or `sigmas` must be finite and strictly decrease: the loop goes from the noisiest level
    to the cleanest (a NaN would pass any comparison unnoticed)."""
    values = [float(value) for value in values]
    not_finite = [value for value in values if not math.isfinite(value)]
    if not_finite:
        raise ValueError(f"custom `{name}` must be finite numbers, got {not_finite[0]} in {values}")
    for i, (earlier, later) in enumerate(zip(values, values[1:])):
        if later >= earlier:
            raise ValueError(
                f"custom `{name}` must strictly decrease (noisiest first), but entry {i + 1} ({later:g}) is not below "
                f"entry {i} ({earlier:g}); pass them in descending order, e.g. [999, 500, 0]"
            )


def check_step_shapes(model_output: torch.Tensor, sample: torch.Tensor, owner: str, learned_variance: bool = False) -> None:
    """`step`'s model_output is the prediction for `sample`, so the shapes must match; with a learned variance
    (`learned_variance`) the model may also output it in as many extra channels (B, 2C, ...)."""
    shape, expected = tuple(model_output.shape), tuple(sample.shape)
    doubled = len(shape) == len(expected) > 1 and shape[0] == expected[0] and shape[2:] == expected[2:] and shape[1] == 2 * expected[1]
    if shape != expected and not (learned_variance and doubled):
        raise ValueError(
            f"{owner}.step got model_output of shape {shape} and sample of shape {expected}; the model output must "
            "have the sample's shape (pass the model's prediction for this very sample, e.g. after combining the "
            "guidance halves)"
        )


def check_float_timestep(timestep, where: str) -> None:
    """The sigma schedulers find their noise level from `timestep` itself, a float of `scheduler.timesteps`
    (e.g. 978.6122); an integer is almost always a loop index by mistake. `where` names the caller in the error."""
    if isinstance(timestep, (int, np.integer)) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
        raise ValueError(
            f"{where} got the integer timestep {timestep!r}; pass the float values of `scheduler.timesteps` "
            "(e.g. `for t in scheduler.timesteps: ... scheduler.step(output, t, sample)`), not an index from `enumerate`"
        )


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

    _prediction_types: tuple[str, ...] = PREDICTION_TYPES  # PNDM takes fewer

    def _check_common_config(self) -> None:
        """The config checks every scheduler makes at construction: prediction_type, timestep_spacing (where the
        class has one), at most one noise ramp (`schedules.check_one_noise_ramp`)."""
        config = self.config
        check_choice("prediction_type", config.prediction_type, self._prediction_types)
        if "timestep_spacing" in config:
            check_choice("timestep_spacing", config.timestep_spacing, TIMESTEP_SPACINGS)
        check_one_noise_ramp(config)

    def _clip_range(self) -> float | None:
        """DDPM's and DDIM's clip_sample: the range x0_pred is clamped to, or None (`parameterization.limit_x0`)."""
        return self.config.clip_sample_range if self.config.clip_sample else None

    def _check_step_inputs(self, model_output: torch.Tensor, sample: torch.Tensor, learned_variance: bool = False) -> None:
        """What every `step` checks first: the shapes match (`check_step_shapes`), and set_timesteps was called
        when this scheduler needs it."""
        check_step_shapes(model_output, sample, type(self).__name__, learned_variance)
        if self.requires_set_timesteps and getattr(self, "num_inference_steps", None) is None:
            raise ValueError(
                f"{type(self).__name__}.step was called before set_timesteps; "
                "call `scheduler.set_timesteps(num_inference_steps)` first"
            )

    # What `step(..., return_dict=False)` returns, as diffusers: (prev_sample, pred_original_sample), or the
    # 1-tuple (prev_sample,) for the classes whose diffusers output has no x0 (PNDM and the exponential integrators).
    _tuple_has_pred_original_sample = True

    def _step_output(self, prev_sample: torch.Tensor, pred_original_sample: torch.Tensor | None, return_dict: bool):
        """`step`'s result: a SchedulerOutput (with minidiff's x0 estimate), or diffusers' tuple."""
        if return_dict:
            return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
        return (prev_sample, pred_original_sample) if self._tuple_has_pred_original_sample else (prev_sample,)


class SigmaSchedulerMixin(SchedulerMixin):
    """What the VE-frame schedulers share (Euler, Euler a, LMS, Heun, DPM2, DPM2 a, DPM++ SDE): they move
    x = x_0 + sigma eps (Karras et al. 2022), but the model was trained on
    x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps = x / sqrt(sigma^2 + 1).
    Subclasses call `set_training_sigmas` in `__init__` and set `self.sigmas` (the last one 0) in `set_timesteps`."""

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
                            trained_betas=None, rescale_betas_zero_snr: bool = False,
                            beta_schedules: tuple[str, ...] = BETA_SCHEDULES) -> None:
        """betas -> alpha_bar_t (DDPM eq. 4) -> sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) at every training
        timestep, float32 as diffusers computes them, and their logs (for `sigma_to_t`).

        With rescale_betas_zero_snr (Lin et al. 2023, arXiv 2305.08891) alpha_bar_{T-1} would be 0 and sigma_max
        infinite, so it is set to 2^-24, as diffusers does."""
        self.betas = make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas,
                                rescale_betas_zero_snr, beta_schedules)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24
        self.train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)  # (T,) float32, sigma_t for t = 0..T-1
        self.log_train_sigmas = np.log(self.train_sigmas)

    def _warn_if_input_not_scaled(self) -> None:
        """Euler, Euler a and LMS warn, as diffusers, when `step` comes without `scale_model_input` first."""
        if not self.is_scale_input_called:
            warnings.warn("call `scheduler.scale_model_input(sample, t)` on the model input before `step`", stacklevel=3)

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
