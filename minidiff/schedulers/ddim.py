"""DDIM: Denoising Diffusion Implicit Models (Song, Meng & Ermon 2020, arXiv 2010.02502).

DDIM samples a model trained as a DDPM in far fewer steps. At each step it predicts x_0 from x_t,
then jumps to the earlier timestep `prev = t - T // N` along a path with the same marginals
q(x_t | x_0) as training (eq. 12 of the paper, with the noise std from eq. 16, which the paper calls sigma_t;
here `noise_std`, since sigma_t is the VP sqrt(1 - alpha_bar_t), see `parameterization.py`):

    x0_pred   = ( x_t - sqrt(1 - alpha_bar_t) eps ) / sqrt(alpha_bar_t)                       "predicted x_0"
    noise_std = eta sqrt( (1 - alpha_bar_prev) / (1 - alpha_bar_t) ) sqrt( 1 - alpha_bar_t / alpha_bar_prev )
    x_prev    = sqrt(alpha_bar_prev) x0_pred
              + sqrt(1 - alpha_bar_prev - noise_std^2) eps                                   "direction pointing to x_t"
              + noise_std z,    z ~ N(0, I)                                                  "random noise"

eta = 0 is the deterministic DDIM sampler; eta = 1 has DDPM's posterior variance. `step` converts the model
output (`parameterization.to_x0`, `to_eps`) and calls `update_rules.ddim_step`.

Config fields (diffusers' names and defaults):
- num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the training noise
  schedule alpha_bar_t (see `schedules.make_betas`).
- rescale_betas_zero_snr: shift alpha_bar so alpha_bar_{T-1} = 0 (Lin et al. 2023, arXiv 2305.08891).
  Then x_{T-1} is pure noise and eps cannot give x_0: use it with prediction_type "v_prediction".
- timestep_spacing, steps_offset: which N of the T training timesteps to visit (`schedules.spaced_timesteps`).
  Whatever the spacing, `prev = t - T // N` uses a fixed stride, as diffusers does.
- prediction_type: what the model outputs: "epsilon" (eps), "sample" (x_0 itself) or
  "v_prediction" (v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0, Salimans & Ho 2022).
- clip_sample, clip_sample_range: clamp x0_pred to [-range, range] before the direction term.
- thresholding, dynamic_thresholding_ratio, sample_max_value: Imagen's dynamic thresholding of
  x0_pred instead of the clamp (`parameterization.dynamic_threshold`).
- set_alpha_to_one: alpha_bar_prev on the last step (prev < 0): 1 when true, alpha_bar_0 when false
  (SD 1.5 uses false).
"""

from __future__ import annotations

import numpy as np
import torch

from minidiff.configuration import register_to_config
from minidiff.schedulers.base import SchedulerMixin, check_num_inference_steps, integer_timestep
from minidiff.schedulers.parameterization import eps_from_x0, limit_x0, to_eps, to_x0, vp_from_alpha_bar
from minidiff.schedulers.schedules import make_betas, spaced_timesteps
from minidiff.schedulers.update_rules import ddim_noise_std, ddim_step, posterior_variance
from minidiff.utils.torch_utils import randn_tensor


class DDIMScheduler(SchedulerMixin):
    """DDIM sampling (Song et al. 2020, eq. 12): predict x_0, then step to the earlier timestep."""

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        self._check_common_config()
        self.betas = make_betas(
            beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas, rescale_betas_zero_snr
        )
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # alpha_bar_t, t = 0..T-1
        # alpha_bar_prev for the last step, whose prev timestep is < 0
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0  # x_T ~ N(0, I)

        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose the N timesteps to visit, noisiest first (int64, like diffusers)."""
        check_num_inference_steps(num_inference_steps, self.config.num_train_timesteps)
        self.num_inference_steps = num_inference_steps
        timesteps = spaced_timesteps(
            self.config.timestep_spacing, num_inference_steps, self.config.num_train_timesteps, self.config.steps_offset
        )
        self.timesteps = torch.from_numpy(timesteps.round().astype(np.int64)).to(device)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """DDIM feeds x_t to the model as it is."""
        return sample

    def _get_variance(self, timestep: int, prev_timestep: int) -> torch.Tensor:
        """The variance of eq. 16 at eta = 1, DDPM's beta~_t between `timestep` and `prev_timestep`."""
        alpha_bar_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        return posterior_variance(self.alphas_cumprod[timestep], alpha_bar_prev)

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        """One DDIM step from x_t (`sample`) to x_prev, given the model's output at t.

        eta: the noise weight of eq. 16 (0 = deterministic DDIM, 1 = DDPM-like).
        use_clipped_model_output: recompute eps from the clipped x0_pred, so the direction term agrees with it.
        variance_noise: the z of eq. 12 given directly instead of drawn from `generator` (CycleDiffusion).
        """
        self._check_step_inputs(model_output, sample)
        t = integer_timestep(timestep, "DDIMScheduler")
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps  # fixed stride
        alpha_bar_t = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        alpha_t, sigma_t = vp_from_alpha_bar(alpha_bar_t)

        prediction_type = self.config.prediction_type  # the model's prediction as x_0 and as eps (eq. 12)
        x0_pred = limit_x0(to_x0(model_output, sample, alpha_t, sigma_t, prediction_type), self.config, self._clip_range())
        eps = to_eps(model_output, sample, alpha_t, sigma_t, prediction_type)
        if use_clipped_model_output:
            eps = eps_from_x0(x0_pred, sample, alpha_t, sigma_t)

        noise_std = ddim_noise_std(alpha_bar_t, alpha_bar_prev, eta)  # eq. 16
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either `generator` or `variance_noise` to DDIMScheduler.step, not both")
            noise = variance_noise
            if noise is None:
                noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
        prev_sample = ddim_step(x0_pred, eps, alpha_bar_prev, noise_std, noise)  # eq. 12

        return self._step_output(prev_sample, x0_pred, return_dict)
