"""Euler ancestral sampling: an Euler step down to a lower noise level, then fresh noise back up.

Source: k-diffusion's `sample_euler_ancestral` (Katherine Crowson), the "Euler a" sampler of A1111;
the step splits each move from sigma_from to sigma_to as in ancestral sampling of DDPM
(Ho et al. 2020, arXiv 2006.11239), written in the sigma form of Karras et al. 2022 (arXiv 2206.00364).

With x = x_0 + sigma eps (sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t), the VE noise level of `parameterization.py`), one step from
sigma_from = sigma_i to sigma_to = sigma_{i+1} is

    sigma_up   = sqrt( sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2 )   the noise to add back
    sigma_down = sqrt( sigma_to^2 - sigma_up^2 )                                  where the ODE step lands
    x0_pred    = D(x_i; sigma_from), from the model output (see prediction_type)
    d          = (x_i - x0_pred) / sigma_from                                     (Karras eq. 3)
    x_{i+1}    = x_i + (sigma_down - sigma_from) d + sigma_up z,   z ~ N(0, I)

so x_{i+1} has noise level sqrt(sigma_down^2 + sigma_up^2) = sigma_to. Noise is drawn on every step,
the last one included (where sigma_to = 0, so sigma_up = 0), as diffusers does, so a seed gives the
same images. `step` calls `parameterization.to_x0_ve`, then `update_rules.ancestral_sigmas` and
`update_rules.euler_ancestral_step`.

Config fields (diffusers' names and defaults):
- num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the training schedule alpha_bar_t.
- rescale_betas_zero_snr: zero terminal SNR (Lin et al. 2023, arXiv 2305.08891), with alpha_bar_{T-1} = 2^-24
  so that sigma_max stays finite.
- prediction_type: "epsilon": x0 = x - sigma eps; "v_prediction": x0 = x / (sigma^2+1) - v sigma / sqrt(sigma^2+1);
  "sample": the model predicts x0 (diffusers raises NotImplementedError for it; minidiff supports it).
- timestep_spacing ("linspace", "leading", "trailing") and steps_offset: which training timesteps to
  visit; sigma at a fractional timestep is interpolated linearly in sigma.
"""

from __future__ import annotations

import numpy as np
import torch

from minidiff.configuration import register_to_config
from minidiff.schedulers.base import SigmaSchedulerMixin, check_float_timestep, check_num_inference_steps
from minidiff.schedulers.parameterization import to_x0_ve
from minidiff.schedulers.schedules import spaced_timesteps
from minidiff.schedulers.update_rules import ancestral_sigmas, euler_ancestral_step
from minidiff.utils.torch_utils import randn_tensor


class EulerAncestralDiscreteScheduler(SigmaSchedulerMixin):
    """Euler ancestral ("Euler a"): an Euler step to sigma_down, then noise of std sigma_up."""

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
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        self._check_common_config()
        self.set_training_sigmas(beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas,
                                 rescale_betas_zero_snr)

        # Until `set_timesteps`: every training timestep, noisiest first, then sigma = 0.
        self.num_inference_steps = None
        self.sigmas = torch.cat([torch.from_numpy(self.train_sigmas).flip(0), torch.zeros(1)])
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.float64)  # float64 here, as diffusers
        self.is_scale_input_called = False
        self._step_index = None
        self._begin_index = None

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """The N timesteps to visit (per timestep_spacing) and their sigmas, linearly interpolated, then sigma = 0."""
        check_num_inference_steps(num_inference_steps, self.config.num_train_timesteps)
        self.num_inference_steps = num_inference_steps
        timesteps = spaced_timesteps(
            self.config.timestep_spacing, num_inference_steps, self.config.num_train_timesteps, self.config.steps_offset
        ).astype(np.float32)  # (N,)
        sigmas = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)  # (N+1,)

        self.sigmas = torch.from_numpy(sigmas)  # kept on the CPU: read one value per step
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self._step_index = None
        self._begin_index = None

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ):
        """One ancestral step from sigma_i to sigma_{i+1}; see the module docstring."""
        check_float_timestep(timestep, f"{type(self).__name__}.step")
        self._check_step_inputs(model_output, sample)
        self._warn_if_input_not_scaled()
        if self.step_index is None:
            self._init_step_index(timestep)

        sigma_from, sigma_to = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        sample = sample.to(torch.float32)  # the update in fp32; cast back at the end
        x0_pred = to_x0_ve(model_output, sample, sigma_from, self.config.prediction_type)
        sigma_down, sigma_up = ancestral_sigmas(sigma_from, sigma_to)
        z = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
        prev_sample = euler_ancestral_step(sample, x0_pred, sigma_from, sigma_down, sigma_up, z)

        prev_sample = prev_sample.to(model_output.dtype)
        self._step_index += 1
        return self._step_output(prev_sample, x0_pred, return_dict)
