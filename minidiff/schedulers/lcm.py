"""LCM: Latent Consistency Models (Luo, Tan, Huang, Li & Zhao 2023, arXiv 2310.04378), on the consistency
models of Song, Dhariwal, Chen & Sutskever 2023 (arXiv 2303.01469).

A consistency model f(x_t, t) maps any point of a probability-flow ODE trajectory to the trajectory's start x_0,
so one evaluation gives a sample. It is built so that f(x, 0) = x holds exactly (the boundary condition,
Song et al. eq. 7 and Appendix C; LCM eq. 5 in discrete time, with t stretched by `timestep_scaling`):

    f(x_t, t) = c_skip(t) x_t + c_out(t) x0_pred(x_t, t)
    c_skip(t) = sigma_data^2 / ((s t)^2 + sigma_data^2),   c_out(t) = s t / sqrt((s t)^2 + sigma_data^2),   sigma_data = 0.5

where x0_pred is what the distilled UNet's output means as x_0 (for eps: (x_t - sqrt(1 - alpha_bar_t) eps) /
sqrt(alpha_bar_t)). With s = 10, c_skip(t) is below 3e-5 for t >= 9: in practice f is the x0 prediction.

Multistep latent consistency sampling (LCM Algorithm 3; Song et al. Algorithm 1):

    x = z ~ N(0, I)                                         at tau_1 = the noisiest timestep
    for n = 1 .. N:
        denoised = f(x, tau_n)                              one model call: a whole sample
        if n < N:
            z ~ N(0, I)
            x = sqrt(alpha_bar_{tau_{n+1}}) denoised + sqrt(1 - alpha_bar_{tau_{n+1}}) z     re-noise to the next level
    return denoised

Each step forgets x_t but for its denoised estimate and draws fresh noise: more steps refine the sample by
re-asking the model at lower noise, not by integrating an ODE. Unlike DDIM, the sampler is stochastic at every
step but the last.

The timesteps (`set_timesteps`) come from the distillation schedule: LCM was trained on the
`original_inference_steps` = 50 evenly spaced timesteps k - 1, 2k - 1, ..., T - 1 (k = T // 50; "skipping
step" k = 20 in the paper); N of them are taken at evenly spaced indices from the noisiest down. With
`strength` < 1 (img2img) only the first `original_inference_steps * strength` of that schedule exist.

Config fields (diffusers' names and defaults): the training schedule (num_train_timesteps, beta_start, beta_end,
beta_schedule, trained_betas, rescale_betas_zero_snr), original_inference_steps, timestep_scaling, prediction_type,
clip_sample / clip_sample_range and thresholding (applied to x0_pred), set_alpha_to_one (alpha_bar below
t = 0), and steps_offset / timestep_spacing, which LCM stores but does not use (as diffusers).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from minidiff.configuration import check_choice, register_to_config
from minidiff.schedulers.base import SchedulerMixin, check_decreasing, integer_timestep
from minidiff.schedulers.parameterization import PREDICTION_TYPES, limit_x0, to_x0, vp_from_alpha_bar
from minidiff.schedulers.schedules import TIMESTEP_SPACINGS, make_betas
from minidiff.schedulers.update_rules import consistency_function, consistency_scalings, renoise
from minidiff.utils.outputs import BaseOutput
from minidiff.utils.torch_utils import randn_tensor


@dataclass
class LCMSchedulerOutput(BaseOutput):
    """What `LCMScheduler.step` returns: the next x (`prev_sample`) and the consistency function's sample (`denoised`)."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor | None = None


def distillation_timesteps(num_train_timesteps: int, original_inference_steps: int, strength: float = 1.0) -> np.ndarray:
    """The timesteps a consistency model was distilled on, cleanest first: k - 1, 2k - 1, ..., with k = T // original_steps,
    the first `int(original_steps * strength)` of them."""
    k = num_train_timesteps // original_inference_steps
    return np.arange(1, int(original_inference_steps * strength) + 1) * k - 1


def evenly_spaced_subset(origin_timesteps: np.ndarray, num_inference_steps: int) -> np.ndarray:
    """N entries of `origin_timesteps` (cleanest first) at evenly spaced indices, noisiest first:
    indices floor(linspace(0, len, N, endpoint=False)) of the reversed list."""
    noisiest_first = origin_timesteps[::-1].copy()
    indices = np.floor(np.linspace(0, len(noisiest_first), num=num_inference_steps, endpoint=False)).astype(np.int64)
    return noisiest_first[indices]


def check_custom_timesteps(timesteps, origin_timesteps, num_train_timesteps: int, strength: float, longest: int, owner: str) -> None:
    """Custom timesteps must descend and start below T; timesteps outside the distillation schedule, a start other
    than T - 1, or more steps than the schedule has are allowed with a warning (as diffusers)."""
    timesteps = [int(t) for t in timesteps]
    check_decreasing("timesteps", timesteps)
    if timesteps[0] >= num_train_timesteps:
        raise ValueError(
            f"{owner}.set_timesteps: `timesteps` must start below num_train_timesteps={num_train_timesteps}, got {timesteps[0]}"
        )
    if strength == 1.0 and timesteps[0] != num_train_timesteps - 1:
        warnings.warn(f"the custom schedule starts at {timesteps[0]}, not at the noisiest timestep {num_train_timesteps - 1}")
    known = set(int(t) for t in origin_timesteps)
    off_schedule = [t for t in timesteps[1:] if t not in known]
    if off_schedule:
        warnings.warn(f"the custom schedule has timesteps the model was not distilled on: {off_schedule}")
    if len(timesteps) > longest:
        warnings.warn(f"the custom schedule has {len(timesteps)} timesteps, more than the {longest} of the distillation schedule")


def strength_cut(timesteps: np.ndarray, strength: float) -> np.ndarray:
    """img2img on a custom schedule: keep its last int(N * strength) entries (the least noisy)."""
    num = len(timesteps)
    keep = min(int(num * strength), num)
    return timesteps[max(num - keep, 0):]


class LCMScheduler(SchedulerMixin):
    """Multistep latent consistency sampling (Luo et al. 2023, Algorithm 3): denoise with the consistency function, re-noise."""

    order = 1
    _compatibles: list[str] = []  # diffusers lists none: an LCM only makes sense with its own sampler

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas=None,
        original_inference_steps: int = 50,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        timestep_scaling: float = 10.0,
        rescale_betas_zero_snr: bool = False,
    ):
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self.betas = make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas, rescale_betas_zero_snr)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self.custom_timesteps = False

    # ----- which timesteps -----

    def _origin_timesteps(self, original_inference_steps: int | None, strength: float) -> tuple[np.ndarray, int]:
        original_steps = self.config.original_inference_steps if original_inference_steps is None else original_inference_steps
        T = self.config.num_train_timesteps
        if not 1 <= original_steps <= T:
            raise ValueError(
                f"original_inference_steps={original_steps} must be between 1 and num_train_timesteps={T}: "
                "it is the length of the schedule the model was distilled on (50 for LCM-LoRA and LCM Dreamshaper)"
            )
        return distillation_timesteps(T, original_steps, strength), original_steps

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        original_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        strength: float = 1.0,
    ) -> None:
        """N timesteps, noisiest first (int64), from the distillation schedule (see the module docstring), or your own.

        num_inference_steps / timesteps: exactly one of the two. original_inference_steps: the distillation
        schedule's length (default: the config's). strength (img2img): only the schedule's first `strength` part."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(f"{type(self).__name__}.set_timesteps: pass exactly one of `num_inference_steps` or `timesteps`")
        origin, original_steps = self._origin_timesteps(original_inference_steps, strength)
        self._set_schedule(num_inference_steps, timesteps, strength, origin, original_steps, device)

    def _set_schedule(self, num_inference_steps, timesteps, strength, origin, longest, device) -> None:
        T = self.config.num_train_timesteps
        if timesteps is not None:
            check_custom_timesteps(timesteps, origin, T, strength, longest, type(self).__name__)
            timesteps = np.array(timesteps, dtype=np.int64)
            self.num_inference_steps = len(timesteps)
            self.custom_timesteps = True
            timesteps = strength_cut(timesteps, strength)
        else:
            if num_inference_steps > T:
                raise ValueError(f"num_inference_steps={num_inference_steps} is more than num_train_timesteps={T}")
            if len(origin) < num_inference_steps:
                raise ValueError(
                    f"the distillation schedule has only {len(origin)} timesteps (original_inference_steps x strength), "
                    f"fewer than num_inference_steps={num_inference_steps}: lower num_inference_steps or raise strength"
                )
            if num_inference_steps > longest:
                raise ValueError(
                    f"num_inference_steps={num_inference_steps} is more than the {longest} timesteps of the distillation "
                    "schedule it is taken from (original_inference_steps)"
                )
            self.num_inference_steps = num_inference_steps
            timesteps = evenly_spaced_subset(origin, num_inference_steps)
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.long)
        self._step_index = None
        self._begin_index = None

    def previous_timestep(self, timestep):
        """The timestep after `timestep` in the schedule (-1 after the last one)."""
        if self.custom_timesteps or self.num_inference_steps:
            index = (self.timesteps == timestep).nonzero(as_tuple=True)[0][0]
            return torch.tensor(-1) if index == self.timesteps.shape[0] - 1 else self.timesteps[index + 1]
        return timestep - 1

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """LCM feeds x_t to the model as it is."""
        return sample

    def get_scalings_for_boundary_condition_discrete(self, timestep) -> tuple[float, float]:
        """(c_skip, c_out) at `timestep` (`update_rules.consistency_scalings`, sigma_data = 0.5)."""
        self.sigma_data = 0.5
        return consistency_scalings(timestep, self.config.timestep_scaling, self.sigma_data)

    def _alpha_bar(self, timestep: int) -> torch.Tensor:
        return self.alphas_cumprod[timestep] if timestep >= 0 else self.final_alpha_cumprod

    def _next_timestep(self, past_the_end: int) -> int:
        """The next entry of the schedule; `past_the_end` after its last entry."""
        following = self.step_index + 1
        return int(self.timesteps[following]) if following < len(self.timesteps) else past_the_end

    def _is_last_step(self) -> bool:
        """As diffusers counts: the step index reaches num_inference_steps - 1. With img2img's `strength` on custom
        timesteps the schedule is shorter than num_inference_steps, so its last step still re-noises (as diffusers)."""
        return self.step_index == self.num_inference_steps - 1

    # ----- the step -----

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> LCMSchedulerOutput | tuple:
        """One step of Algorithm 3: denoised = f(x_t, t); then x_next = re-noised denoised (not on the last step)."""
        self._check_step_inputs(model_output, sample)
        t = integer_timestep(timestep, type(self).__name__)
        if self.step_index is None:
            self._init_step_index(timestep)
        next_t = self._next_timestep(past_the_end=t)

        alpha_t, sigma_t = vp_from_alpha_bar(self.alphas_cumprod[t])
        clip_range = self.config.clip_sample_range if self.config.clip_sample else None
        x0_pred = limit_x0(to_x0(model_output, sample, alpha_t, sigma_t, self.config.prediction_type), self.config, clip_range)
        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(t)
        denoised = consistency_function(x0_pred, sample, c_skip, c_out)

        if not self._is_last_step():
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=denoised.dtype)
            prev_sample = renoise(denoised, self._alpha_bar(next_t), noise)
        else:
            prev_sample = denoised
        self._step_index += 1

        if not return_dict:
            return (prev_sample, denoised)
        return LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)
