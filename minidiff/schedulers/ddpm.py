"""DDPM: Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel 2020, arXiv 2006.11239).

Ancestral sampling: predict x_0 from x_t, then draw x_prev from the forward process posterior
q(x_prev | x_t, x_0) (eq. 6 and 7 of the paper). With `prev` the next entry of `timesteps` (t - 1 when
all T steps are run), alpha_t = alpha_bar_t / alpha_bar_prev and beta_t = 1 - alpha_t:

    x0_pred = ( x_t - sqrt(1 - alpha_bar_t) eps ) / sqrt(alpha_bar_t)                       (eq. 15)
    mu      = sqrt(alpha_bar_prev) beta_t / (1 - alpha_bar_t) x0_pred
            + sqrt(alpha_t) (1 - alpha_bar_prev) / (1 - alpha_bar_t) x_t                    (eq. 7)
    x_prev  = mu + sigma_t z,   z ~ N(0, I), only when t > 0                                 (eq. 6)

The variance sigma_t^2 is chosen by `variance_type`, from beta~_t = (1 - alpha_bar_prev) / (1 - alpha_bar_t) beta_t:
- fixed_small:      sigma_t^2 = beta~_t        (the true posterior variance, eq. 7)
- fixed_small_log:  the same, computed as sigma_t = exp(log(beta~_t) / 2)
- fixed_large:      sigma_t^2 = beta_t         (the upper bound, §3.2)
- fixed_large_log:  the same, computed as sigma_t = exp(log(beta_t) / 2)
- None:             (a DPM-Solver config) as fixed_small, as diffusers does
- learned:          the model outputs sigma_t^2 in extra channels (model_output has 2C channels)
- learned_range:    the model outputs v in [-1, 1] in extra channels and
                    log sigma_t^2 = (v+1)/2 log(beta_t) + (1 - (v+1)/2) log(beta~_t)
                    (Nichol & Dhariwal 2021, arXiv 2102.09672, eq. 15)

Other config fields (diffusers' names and defaults):
- num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr:
  the training noise schedule alpha_bar_t (see `base.make_betas`).
- timestep_spacing, steps_offset: which N timesteps to visit (`base.spaced_timesteps`);
  `set_timesteps(timesteps=[...])` takes any descending list instead.
- prediction_type: "epsilon" (eps), "sample" (x_0) or "v_prediction" (v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0).
- clip_sample, clip_sample_range: clamp x0_pred to [-range, range].
- thresholding, dynamic_thresholding_ratio, sample_max_value: Imagen's dynamic thresholding of x0_pred
  instead of the clamp (`base.dynamic_threshold`).
"""

from __future__ import annotations

import numpy as np
import torch

from minidiff.configuration import register_to_config
from minidiff.schedulers.base import (
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    SchedulerMixin,
    SchedulerOutput,
    add_noise_vp,
    check_choice,
    check_num_inference_steps,
    dynamic_threshold,
    integer_timestep,
    make_betas,
    randn_tensor,
    spaced_timesteps,
)

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


class DDPMScheduler(SchedulerMixin):
    """DDPM ancestral sampling (Ho et al. 2020, eq. 6/7/15): predict x_0, then sample the posterior q(x_prev | x_t, x_0)."""

    order = 1
    requires_set_timesteps = False  # steps on the training schedule (T-1, ..., 0) until set_timesteps

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        check_choice("variance_type", variance_type, (None, *VARIANCE_TYPES))  # None (a DPM-Solver config): fixed_small
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self.betas = make_betas(
            beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas, rescale_betas_zero_snr
        )
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # alpha_bar_t, t = 0..T-1
        self.one = torch.tensor(1.0)  # alpha_bar_prev after the last timestep
        self.init_noise_sigma = 1.0  # x_T ~ N(0, I)
        self.variance_type = variance_type  # a plain attribute as in diffusers (no deprecation warning)

        self.num_inference_steps = None
        self.custom_timesteps = False
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Choose the timesteps to visit, noisiest first (int64): N spaced ones, or your own descending list."""
        T = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(
                "pass exactly one of `num_inference_steps` (an int) or `timesteps` (a descending list of ints) "
                "to DDPMScheduler.set_timesteps"
            )
        if timesteps is not None:
            timesteps = self._check_custom_timesteps(timesteps)
            self.custom_timesteps = True
            self.num_inference_steps = len(timesteps)
        else:
            check_num_inference_steps(num_inference_steps, T)
            self.custom_timesteps = False
            self.num_inference_steps = num_inference_steps
            spaced = spaced_timesteps(self.config.timestep_spacing, num_inference_steps, T, self.config.steps_offset)
            timesteps = spaced.round().astype(np.int64)
        self.timesteps = torch.from_numpy(timesteps).to(device)

    def _check_custom_timesteps(self, timesteps) -> np.ndarray:
        timesteps = [int(t) for t in timesteps]
        T = self.config.num_train_timesteps
        if len(timesteps) == 0:
            raise ValueError("custom `timesteps` is empty; pass at least one timestep, e.g. [999, 500, 0]")
        if any(later >= earlier for earlier, later in zip(timesteps, timesteps[1:])):
            raise ValueError(f"custom `timesteps` must be in strictly descending order (noisiest first), got {timesteps}")
        if timesteps[0] >= T:
            raise ValueError(
                f"custom `timesteps` must start below num_train_timesteps={T} (the model knows t = 0..{T - 1}), "
                f"got {timesteps[0]}"
            )
        if timesteps[-1] < 0:
            raise ValueError(f"custom `timesteps` must be >= 0, got {timesteps[-1]}")
        return np.array(timesteps, dtype=np.int64)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """DDPM feeds x_t to the model as it is."""
        return sample

    def previous_timestep(self, timestep) -> int | torch.Tensor:
        """The timestep after `timestep` in `timesteps` (-1 after the last one), typed as diffusers returns it:
        a 0-dim int64 tensor after set_timesteps; before it (every training step), `timestep - 1` (int or tensor)."""
        t = integer_timestep(timestep, "DDPMScheduler")
        if self.num_inference_steps is None and 0 <= t < self.config.num_train_timesteps:
            return timestep - 1
        matches = (self.timesteps == t).nonzero()
        if len(matches) == 0:
            raise ValueError(
                f"timestep {t} is not one of this scheduler's timesteps; pass the values of `scheduler.timesteps`"
            )
        index = matches[0].item()
        return self.timesteps[index + 1] if index + 1 < len(self.timesteps) else torch.tensor(-1)

    def _get_variance(self, t: int, predicted_variance: torch.Tensor | None = None) -> torch.Tensor:
        """What `variance_type` says about the noise at t: sigma_t^2, sigma_t or log sigma_t^2 (see the module docstring)."""
        prev_t = self.previous_timestep(t)
        alpha_bar_t = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_t = 1 - alpha_bar_t / alpha_bar_prev
        posterior_variance = ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t).clamp(min=1e-20)  # beta~_t, eq. 7

        variance_type = self.config.variance_type or "fixed_small"
        if variance_type == "fixed_small":
            return posterior_variance
        if variance_type == "fixed_small_log":
            return torch.exp(0.5 * torch.log(posterior_variance))  # sigma_t, not sigma_t^2
        if variance_type == "fixed_large":
            return beta_t
        if variance_type == "fixed_large_log":
            return torch.log(beta_t)  # log sigma_t^2
        if variance_type == "learned":
            return predicted_variance
        fraction = (predicted_variance + 1) / 2  # learned_range: log sigma_t^2, iDDPM eq. 15
        return fraction * torch.log(beta_t) + (1 - fraction) * torch.log(posterior_variance)

    def _noise_scale(self, t: int, predicted_variance: torch.Tensor | None) -> torch.Tensor:
        """sigma_t, the standard deviation of the noise added at t."""
        variance = self._get_variance(t, predicted_variance)
        if self.config.variance_type == "fixed_small_log":
            return variance
        if self.config.variance_type in ("fixed_large_log", "learned_range"):
            return torch.exp(0.5 * variance)
        return variance**0.5

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One ancestral step from x_t (`sample`) to x_prev.

        With variance_type "learned" or "learned_range", `model_output` may carry 2C channels:
        the prediction, then the variance (channels C..2C-1).
        """
        self._check_timesteps_set()
        t = integer_timestep(timestep, "DDPMScheduler")
        prev_t = self.previous_timestep(t)

        channels = sample.shape[1]
        predicted_variance = None
        if self.config.variance_type in ("learned", "learned_range"):
            if model_output.shape[1] != 2 * channels:
                raise ValueError(
                    f"variance_type {self.config.variance_type!r} needs a model output with 2 x {channels} channels "
                    f"(prediction, then variance), got {model_output.shape[1]}"
                )
            model_output, predicted_variance = torch.split(model_output, channels, dim=1)  # 2 x (B, C, H, W)

        alpha_bar_t = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_bar_t, beta_bar_prev = 1 - alpha_bar_t, 1 - alpha_bar_prev
        alpha_t = alpha_bar_t / alpha_bar_prev  # one step from prev to t (the paper's alpha_t when prev = t - 1)
        beta_t = 1 - alpha_t

        if self.config.prediction_type == "epsilon":
            x0_pred = (sample - beta_bar_t**0.5 * model_output) / alpha_bar_t**0.5  # eq. 15
        elif self.config.prediction_type == "sample":
            x0_pred = model_output
        else:  # v_prediction: v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0
            x0_pred = alpha_bar_t**0.5 * sample - beta_bar_t**0.5 * model_output

        if self.config.thresholding:
            x0_pred = dynamic_threshold(x0_pred, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        elif self.config.clip_sample:
            x0_pred = x0_pred.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)

        x0_coeff = alpha_bar_prev**0.5 * beta_t / beta_bar_t  # eq. 7
        xt_coeff = alpha_t**0.5 * beta_bar_prev / beta_bar_t  # eq. 7
        prev_sample = x0_coeff * x0_pred + xt_coeff * sample  # mu~_t(x_t, x_0), eq. 7

        if t > 0:  # eq. 6: x_prev ~ N(mu, sigma_t^2 I); no noise on the last step to x_0
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
            prev_sample = prev_sample + self._noise_scale(t, predicted_variance) * noise

        if not return_dict:
            return (prev_sample, x0_pred)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0_pred)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (eq. 4), for each sample's timestep."""
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timesteps)

