"""Ancestral DPM-Solver-2 in sigma (k-diffusion's `sample_dpm_2_ancestral`, A1111's "DPM2 a").

The step of `kdpm2.py` with its end moved down and noise added back (as Euler a does to Euler): each step
from sigma_i to sigma_{i+1} is split into a deterministic part down to sigma_down and fresh noise sigma_up,

    sigma_up   = sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2),   sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2)
    sigma_mid  = exp((log sigma_i + log sigma_down) / 2)
    x_mid      = x_i + (sigma_mid - sigma_i) d_i                          d_i at x_i (model call 1)
    x_{i+1}    = x_i + (sigma_down - sigma_i) d_mid + sigma_up z,  z ~ N(0, I)    d_mid at x_mid (model call 2)

so x_{i+1} has noise level sqrt(sigma_down^2 + sigma_up^2) = sigma_{i+1} again (Ho et al.'s ancestral
sampling, k-diffusion's `get_ancestral_step` with eta = 1). Two model calls per step, one `step` each, as
in kdpm2.py; the noise is drawn (`randn_tensor`, with `generator`) at the second call, as diffusers draws it.
`step` calls `update_rules.ancestral_sigmas`, `euler_step` and `dpm_solver_2_step`.

Config fields: as `KDPM2DiscreteScheduler` (diffusers' names and defaults).
"""

from __future__ import annotations

import torch

from minidiff.configuration import register_to_config
from minidiff.schedulers.base import SigmaSchedulerMixin
from minidiff.schedulers.parameterization import to_x0_ve
from minidiff.schedulers.two_model_calls import midpoint_timesteps_float32, per_model_call, step_noise_levels
from minidiff.schedulers.update_rules import (
    ancestral_sigmas,
    dpm_solver_2_step,
    euler_step,
)
from minidiff.utils.torch_utils import randn_tensor


class KDPM2AncestralDiscreteScheduler(SigmaSchedulerMixin):
    """Ancestral DPM-Solver-2 in sigma (k-diffusion's sample_dpm_2_ancestral): two model calls per step."""

    order = 2

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas=None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        self._check_common_config()
        self.set_training_sigmas(beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas)
        self.set_timesteps(num_train_timesteps)  # as diffusers: until `set_timesteps`, every training timestep

    def set_timesteps(self, num_inference_steps: int, device=None, num_train_timesteps: int | None = None) -> None:
        """N noise levels, each step's sigma_up / sigma_down and midpoint, visited by 2N - 1 model calls."""
        timesteps, sigmas = step_noise_levels(self, num_inference_steps, num_train_timesteps)
        sigmas_next = torch.cat([sigmas[1:], sigmas.new_zeros(1)])
        sigmas_down, sigmas_up = ancestral_sigmas(sigmas, sigmas_next)  # step i: sigma_i -> sigma_{i+1}
        sigmas_down[-1] = 0.0
        midpoints = sigmas.log().lerp(sigmas_down.log(), 0.5).exp()  # step i's midpoint
        midpoints[-2:] = 0.0  # the last step (to 0) is an Euler step
        self.sigmas, self.sigmas_interpol = per_model_call(sigmas), per_model_call(midpoints)  # (2N+2,), on the CPU
        self.sigmas_up, self.sigmas_down = per_model_call(sigmas_up), per_model_call(sigmas_down)

        midpoint_timesteps = midpoint_timesteps_float32(midpoints, self.log_train_sigmas).to(timesteps.dtype)
        calls = torch.stack([midpoint_timesteps[:-2], timesteps[1:]], dim=-1).flatten()  # [t(mid_0), t_1, t(mid_1), ...]
        self.timesteps = torch.cat([timesteps[:1], calls]).to(device)  # (2N-1,)
        self.sample = None  # x_i, kept between the two halves of a step
        self._step_index = None
        self._begin_index = None

    @property
    def state_in_first_order(self) -> bool:
        """True when the next `step` is the Euler half (to the midpoint); False for the midpoint half."""
        return self.sample is None

    def _model_sigma(self, entry: int) -> torch.Tensor:
        """sigma_i at even entries (the Euler half), the step's midpoint at odd ones."""
        return self.sigmas[entry] if entry % 2 == 0 else self.sigmas_interpol[entry - 1]

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x / sqrt(sigma^2 + 1) at the noise level the model is asked about: sigma_i, or the step's midpoint."""
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.state_in_first_order:
            sigma = self.sigmas[self.step_index]
        else:
            sigma = self.sigmas_interpol[self.step_index - 1]
        self.is_scale_input_called = True
        return sample / ((sigma**2 + 1) ** 0.5)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One model call's half of the step (module docstring); the second half draws the noise z."""
        self._check_step_inputs(model_output, sample)
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.state_in_first_order:
            sigma, sigma_mid = self.sigmas[self.step_index], self.sigmas_interpol[self.step_index]
            x0_pred = to_x0_ve(model_output, sample, sigma, self.config.prediction_type)
            self.sample = sample
            prev_sample = euler_step(sample, x0_pred, sigma, sigma_mid)  # x_mid
        else:
            sigma, sigma_mid = self.sigmas[self.step_index - 1], self.sigmas_interpol[self.step_index - 1]
            sigma_up, sigma_down = self.sigmas_up[self.step_index - 1], self.sigmas_down[self.step_index - 1]
            x0_pred = to_x0_ve(model_output, sample, sigma_mid, self.config.prediction_type)
            prev_sample = dpm_solver_2_step(self.sample, sample, x0_pred, sigma, sigma_mid, sigma_down)
            self.sample = None
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + noise * sigma_up
        self._step_index += 1
        return self._step_output(prev_sample, x0_pred, return_dict)
