"""DDPM: Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel 2020, arXiv 2006.11239).

Ancestral sampling: predict x_0 from x_t, then draw x_prev from the forward process posterior
q(x_prev | x_t, x_0) (eq. 6 and 7 of the paper). With `prev` the next entry of `timesteps` (t - 1 when
all T steps are run), the paper's one-step alpha_t and beta_t are here alpha_step = alpha_bar_t / alpha_bar_prev
and beta_step = 1 - alpha_step (`alpha_t, sigma_t` are the VP pair of `parameterization.py`), and the paper's
sigma_t, the std of the added noise, is `noise_std`:

    x0_pred = ( x_t - sqrt(1 - alpha_bar_t) eps ) / sqrt(alpha_bar_t)                              (eq. 15)
    mu      = sqrt(alpha_bar_prev) beta_step / (1 - alpha_bar_t) x0_pred
            + sqrt(alpha_step) (1 - alpha_bar_prev) / (1 - alpha_bar_t) x_t                         (eq. 7)
    x_prev  = mu + noise_std z,   z ~ N(0, I), only when t > 0                                      (eq. 6)

The variance noise_std^2 is chosen by `variance_type`, from beta~_t = (1 - alpha_bar_prev) / (1 - alpha_bar_t) beta_step:
- fixed_small:      noise_std^2 = beta~_t      (the true posterior variance, eq. 7)
- fixed_small_log:  the same, computed as noise_std = exp(log(beta~_t) / 2)
- fixed_large:      noise_std^2 = beta_step    (the upper bound, §3.2)
- fixed_large_log:  the same, computed as noise_std = exp(log(beta_step) / 2)
- None:             (a DPM-Solver config) as fixed_small, as diffusers does
- learned:          the model outputs noise_std^2 in extra channels (model_output has 2C channels)
- learned_range:    the model outputs v in [-1, 1] in extra channels and
                    log noise_std^2 = (v+1)/2 log(beta_step) + (1 - (v+1)/2) log(beta~_t)
                    (Nichol & Dhariwal 2021, arXiv 2102.09672, eq. 15)

`step` converts the model output (`parameterization.to_x0`) and calls `update_rules.ddpm_posterior_mean`.

Other config fields (diffusers' names and defaults):
- num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr:
  the training noise schedule alpha_bar_t (see `schedules.make_betas`).
- timestep_spacing, steps_offset: which N timesteps to visit (`schedules.spaced_timesteps`);
  `set_timesteps(timesteps=[...])` takes any descending list instead.
- prediction_type: "epsilon" (eps), "sample" (x_0) or "v_prediction" (v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0).
- clip_sample, clip_sample_range: clamp x0_pred to [-range, range].
- thresholding, dynamic_thresholding_ratio, sample_max_value: Imagen's dynamic thresholding of x0_pred
  instead of the clamp (`parameterization.dynamic_threshold`).
"""

from __future__ import annotations

import numpy as np
import torch

from minidiff.configuration import check_choice, register_to_config
from minidiff.schedulers.base import SchedulerMixin, check_decreasing, check_num_inference_steps, integer_timestep
from minidiff.schedulers.parameterization import limit_x0, to_x0, vp_from_alpha_bar
from minidiff.schedulers.schedules import make_betas, spaced_timesteps
from minidiff.schedulers.update_rules import ddpm_posterior_mean, posterior_variance
from minidiff.utils.torch_utils import randn_tensor

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
        self._check_common_config()
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
        check_decreasing("timesteps", timesteps)
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
        """What `variance_type` says about the noise at t: noise_std^2, noise_std or log noise_std^2 (module docstring)."""
        prev_t = self.previous_timestep(t)
        alpha_bar_t = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_step = 1 - alpha_bar_t / alpha_bar_prev  # DDPM's beta_t between prev and t
        beta_tilde = posterior_variance(alpha_bar_t, alpha_bar_prev).clamp(min=1e-20)  # eq. 7

        variance_type = self.config.variance_type or "fixed_small"
        if variance_type == "fixed_small":
            return beta_tilde
        if variance_type == "fixed_small_log":
            return torch.exp(0.5 * torch.log(beta_tilde))  # noise_std, not noise_std^2
        if variance_type == "fixed_large":
            return beta_step
        if variance_type == "fixed_large_log":
            return torch.log(beta_step)  # log noise_std^2
        if variance_type == "learned":
            return predicted_variance
        fraction = (predicted_variance + 1) / 2  # learned_range: log noise_std^2, iDDPM eq. 15
        return fraction * torch.log(beta_step) + (1 - fraction) * torch.log(beta_tilde)

    def _noise_scale(self, t: int, predicted_variance: torch.Tensor | None) -> torch.Tensor:
        """noise_std, the standard deviation of the noise added at t."""
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
    ):
        """One ancestral step from x_t (`sample`) to x_prev.

        With variance_type "learned" or "learned_range", `model_output` may carry 2C channels:
        the prediction, then the variance (channels C..2C-1).
        """
        self._check_step_inputs(model_output, sample, self.config.variance_type in ("learned", "learned_range"))
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
        alpha_t, sigma_t = vp_from_alpha_bar(alpha_bar_t)
        x0_pred = limit_x0(to_x0(model_output, sample, alpha_t, sigma_t, self.config.prediction_type), self.config, self._clip_range())  # eq. 15
        prev_sample = ddpm_posterior_mean(x0_pred, sample, alpha_bar_t, alpha_bar_prev)  # mu~_t(x_t, x_0), eq. 7

        if t > 0:  # eq. 6: x_prev ~ N(mu, noise_std^2 I); no noise on the last step to x_0
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
            prev_sample = prev_sample + self._noise_scale(t, predicted_variance) * noise

        return self._step_output(prev_sample, x0_pred, return_dict)
