"""Heun's method on the probability-flow ODE: Euler's step, then a correction with the slope at its end.

Paper: Karras, Aittala, Aila, Laine 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"
(EDM), arXiv 2206.00364, Algorithm 1 (deterministic sampling with Heun's 2nd order method), which is
k-diffusion's `sample_heun` and A1111's "Heun". With x = x_0 + sigma eps and d(x, sigma) = (x - D(x; sigma)) / sigma
(EDM eq. 3), one step from sigma_i to sigma_{i+1}:

    d_i       = (x_i - D(x_i; sigma_i)) / sigma_i                        line 4: the slope here
    x~        = x_i + (sigma_{i+1} - sigma_i) d_i                        line 5: an Euler step
    d'_i      = (x~ - D(x~; sigma_{i+1})) / sigma_{i+1}                  line 7: the slope there
    x_{i+1}   = x_i + (sigma_{i+1} - sigma_i) (d_i + d'_i) / 2           line 8: the trapezoidal rule
    (the last step, to sigma = 0, stops after the Euler step: line 6, d'_i would divide by 0)

Why "one step" costs two model calls: the correction needs the model's prediction at x~, a point that
exists only after the Euler step. So, as in diffusers, every model call is one `step`: `timesteps` holds
2N - 1 entries, [t_0, t_1, t_1, t_2, t_2, ..., t_{N-1}, t_{N-1}] (each noise level but the first twice:
once as the end of a step, once as the start of the next), and `state_in_first_order` says whether the next
`step` is line 5 (the Euler step, which remembers d_i and x_i) or line 8 (the correction, which forgets them).
The error falls as h^2 instead of h: for the same number of *model calls*, Heun beats Euler once the steps
are small enough (tutorial 04 measures it).

`step` calls `parameterization.to_x0_ve` and `update_rules.to_d` / `update_rules.heun_correction`.

Config fields (diffusers' names and defaults):
- num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the training schedule alpha_bar_t,
  hence sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t). Heun alone also offers beta_schedule "exp",
  alpha_bar(t) = exp(-12 t) (`schedules.exp_alpha_bar`), as diffusers' Heun does.
- prediction_type: "epsilon": x0 = x - sigma eps; "v_prediction": x0 = x / (sigma^2+1) - v sigma / sqrt(sigma^2+1);
  "sample": the model predicts x0.
- use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas (at most one): Karras rho = 7, log-even or
  Beta(0.6, 0.6) noise levels between the ends of the spaced schedule.
- clip_sample, clip_sample_range: clamp the predicted x0 to [-range, range].
- timestep_spacing ("linspace", "leading", "trailing") and steps_offset: which training timesteps to visit.
"""

from __future__ import annotations

import numpy as np
import torch

from minidiff.configuration import register_to_config
from minidiff.schedulers.base import SigmaSchedulerMixin, check_decreasing, check_num_inference_steps
from minidiff.schedulers.parameterization import to_x0_ve
from minidiff.schedulers.schedules import BETA_SCHEDULES, check_no_ramp_for_custom_timesteps, chosen_noise_ramp, spaced_sigmas
from minidiff.schedulers.two_model_calls import sigmas_per_model_call, twice_after_first
from minidiff.schedulers.update_rules import euler_step, heun_correction, to_d

HEUN_BETA_SCHEDULES = (*BETA_SCHEDULES, "exp")  # diffusers' Heun alone also offers alpha_bar(t) = exp(-12 t)


class HeunDiscreteScheduler(SigmaSchedulerMixin):
    """Heun's 2nd-order method in sigma (Karras et al. 2022, Algorithm 1): two model calls per step."""

    order = 2

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        self._check_common_config()
        self.set_training_sigmas(beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas,
                                 beta_schedules=HEUN_BETA_SCHEDULES)
        self.set_timesteps(num_train_timesteps)  # as diffusers: until `set_timesteps`, every training timestep

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, num_train_timesteps: int | None = None,
                      timesteps=None) -> None:
        """N noise levels sigma_0 > ... > sigma_{N-1} (then 0), visited by 2N - 1 model calls:

        timesteps = [t_0, t_1, t_1, ..., t_{N-1}, t_{N-1}]               (2N-1,) float32
        sigmas    = [sigma_0, sigma_1, sigma_1, ..., sigma_{N-1}, sigma_{N-1}, 0]   (2N,) float32
        Custom `timesteps` (N training timesteps, noisiest first) replace the spacing.
        """
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("set_timesteps takes exactly one of num_inference_steps or timesteps")
        config = self.config
        num_train_timesteps = num_train_timesteps or config.num_train_timesteps
        if timesteps is not None:
            check_no_ramp_for_custom_timesteps(chosen_noise_ramp(config))
            check_decreasing("timesteps", timesteps)
            timesteps = np.asarray(timesteps, dtype=np.float32)
            num_inference_steps = len(timesteps)
            sigmas = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        else:
            check_num_inference_steps(num_inference_steps, num_train_timesteps)
            timesteps, sigmas = spaced_sigmas(config, self.train_sigmas, self.log_train_sigmas, num_inference_steps, num_train_timesteps)
        self.num_inference_steps = num_inference_steps

        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))  # (N+1,)
        self.sigmas = sigmas_per_model_call(sigmas)  # (2N,), on the CPU
        self.timesteps = twice_after_first(torch.from_numpy(np.asarray(timesteps))).to(device=device, dtype=torch.float32)

        self.prev_derivative = None  # d_i, kept between the Euler step and the correction
        self.dt = None  # sigma_{i+1} - sigma_i
        self.sample = None  # x_i
        self._step_index = None
        self._begin_index = None

    @property
    def state_in_first_order(self) -> bool:
        """True when the next `step` is an Euler step (Algorithm 1, line 5); False for its correction (line 8)."""
        return self.dt is None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One model call's share of Algorithm 1: the Euler step (first call) or the trapezoidal correction (second)."""
        self._check_step_inputs(model_output, sample)
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.state_in_first_order:
            sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
            sigma_of_output = sigma  # the model saw x_i at sigma_i
        else:
            sigma, sigma_next = self.sigmas[self.step_index - 1], self.sigmas[self.step_index]
            sigma_of_output = sigma_next  # the model saw x~ at sigma_{i+1}
        x0_pred = to_x0_ve(model_output, sample, sigma_of_output, self.config.prediction_type)
        if self.config.clip_sample:
            x0_pred = x0_pred.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)

        if self.state_in_first_order:
            self.prev_derivative = to_d(sample, x0_pred, sigma)  # line 4: d_i
            self.dt, self.sample = sigma_next - sigma, sample
            prev_sample = euler_step(sample, x0_pred, sigma, sigma_next)  # line 5: x~ (line 6 when sigma_next = 0)
        else:
            prev_sample = heun_correction(self.sample, self.prev_derivative, to_d(sample, x0_pred, sigma_next), self.dt)
            self.prev_derivative = self.dt = self.sample = None  # line 8 done: the next step starts afresh

        self._step_index += 1
        return self._step_output(prev_sample, x0_pred, return_dict)
