"""DPM-Solver-2 in sigma (k-diffusion's `sample_dpm_2`, A1111's "DPM2"): an Euler step to the midpoint in
log-sigma, then the whole step with the slope found there.

Papers: Lu, Zhou, Bao, Chen, Li, Zhu 2022, "DPM-Solver", arXiv 2206.00927, Algorithm 1 (DPM-Solver-2, r_1 = 1/2),
as Karras et al. 2022 (arXiv 2206.00364, Appendix, "DPM-Solver-2" in sigma) and Katherine Crowson's k-diffusion
write it for x = x_0 + sigma eps. One step from sigma_i to sigma_{i+1}:

    sigma_mid = exp((log sigma_i + log sigma_{i+1}) / 2)           the geometric midpoint
    d_i       = (x_i - D(x_i; sigma_i)) / sigma_i                   (EDM eq. 3)
    x_mid     = x_i + (sigma_mid - sigma_i) d_i                     an Euler step to the midpoint
    d_mid     = (x_mid - D(x_mid; sigma_mid)) / sigma_mid
    x_{i+1}   = x_i + (sigma_{i+1} - sigma_i) d_mid                 the whole step with the midpoint's slope
    (the last step, to sigma = 0, is an Euler step: its midpoint is 0)

Like Heun, two model calls per step, and every model call is one `step`: `timesteps` holds 2N - 1 entries,
[t_0, t(mid_1), t_1, t(mid_2), t_2, ...], and `state_in_first_order` tells the Euler half from the midpoint half.
`step` calls `parameterization.to_x0_ve` and `update_rules.euler_step` / `update_rules.dpm_solver_2_step`.

Config fields (diffusers' names and defaults):
- num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the training schedule.
- prediction_type: "epsilon", "v_prediction", or "sample" (diffusers raises NotImplementedError for "sample";
  minidiff supports it).
- use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas (at most one): other noise levels between the
  ends of the spaced schedule (diffusers rounds the Karras timesteps to integers; so does minidiff).
- timestep_spacing ("linspace", "leading", "trailing") and steps_offset.
"""

from __future__ import annotations

import torch

from minidiff.configuration import register_to_config
from minidiff.schedulers.base import SigmaSchedulerMixin
from minidiff.schedulers.two_model_calls import midpoint_timesteps_float32, per_model_call, step_noise_levels
from minidiff.schedulers.parameterization import to_x0_ve
from minidiff.schedulers.update_rules import dpm_solver_2_step, euler_step


class KDPM2DiscreteScheduler(SigmaSchedulerMixin):
    """DPM-Solver-2 in sigma (k-diffusion's sample_dpm_2): two model calls per step."""

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
        """N noise levels and their N - 1 midpoints, visited by 2N - 1 model calls."""
        timesteps, sigmas = step_noise_levels(self, num_inference_steps, num_train_timesteps)
        # mid_k: the geometric midpoint of sigma_{k-1} and sigma_k (mid_N = 0: the last step is Euler's)
        midpoints = sigmas.log().lerp(sigmas.roll(1).log(), 0.5).exp()  # (N+1,), entry 0 unused
        self.sigmas, self.sigmas_interpol = per_model_call(sigmas), per_model_call(midpoints)  # (2N+2,), on the CPU

        midpoint_timesteps = midpoint_timesteps_float32(midpoints, self.log_train_sigmas).to(timesteps.dtype)
        calls = torch.stack([midpoint_timesteps[1:-1], timesteps[1:]], dim=-1).flatten()  # [t(mid_1), t_1, t(mid_2), ...]
        self.timesteps = torch.cat([timesteps[:1], calls]).to(device)  # (2N-1,)
        self.sample = None  # x_i, kept between the two halves of a step
        self._step_index = None
        self._begin_index = None

    @property
    def state_in_first_order(self) -> bool:
        """True when the next `step` is the Euler half (to the midpoint); False for the midpoint half."""
        return self.sample is None

    def _model_sigma(self, entry: int) -> torch.Tensor:
        """sigma_i at even entries (the Euler half), the midpoint at odd ones."""
        return self.sigmas[entry] if entry % 2 == 0 else self.sigmas_interpol[entry]

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x / sqrt(sigma^2 + 1) at the noise level the model is asked about: sigma_i, or the midpoint."""
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index] if self.state_in_first_order else self.sigmas_interpol[self.step_index]
        self.is_scale_input_called = True
        return sample / ((sigma**2 + 1) ** 0.5)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One model call's half of the step (module docstring)."""
        self._check_step_inputs(model_output, sample)
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.state_in_first_order:
            sigma, sigma_mid = self.sigmas[self.step_index], self.sigmas_interpol[self.step_index + 1]
            x0_pred = to_x0_ve(model_output, sample, sigma, self.config.prediction_type)
            self.sample = sample
            prev_sample = euler_step(sample, x0_pred, sigma, sigma_mid)  # x_mid
        else:
            sigma, sigma_mid = self.sigmas[self.step_index - 1], self.sigmas_interpol[self.step_index]
            sigma_next = self.sigmas[self.step_index]
            x0_pred = to_x0_ve(model_output, sample, sigma_mid, self.config.prediction_type)
            prev_sample = dpm_solver_2_step(self.sample, sample, x0_pred, sigma, sigma_mid, sigma_next)
            self.sample = None
        self._step_index += 1
        return self._step_output(prev_sample, x0_pred, return_dict)
