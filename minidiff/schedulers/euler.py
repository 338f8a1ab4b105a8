"""Euler steps on the probability-flow ODE, with optional "churn" noise.

Paper: Karras, Aittala, Aila, Laine 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models" (EDM), arXiv 2206.00364, Algorithm 2 without its second-order correction.
This is k-diffusion's `sample_euler` and A1111's "Euler".

SD's DDPM-trained model is read as a denoiser of x = x_0 + sigma eps ("variance exploding" form),
with sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t). The model is fed x / sqrt(sigma^2 + 1), the
scale it saw in training (`scale_model_input`). One step from sigma_i to sigma_{i+1}:

    gamma     = min(s_churn / N, sqrt(2) - 1)  if s_tmin <= sigma_i <= s_tmax, else 0
    sigma_hat = sigma_i (1 + gamma)
    x_hat     = x_i + sqrt(sigma_hat^2 - sigma_i^2) * s_noise * z,   z ~ N(0, I)    (only if gamma > 0)
    x0_pred   = D(x_hat; sigma_hat), from the model output (see prediction_type)
    d_i       = (x_hat - x0_pred) / sigma_hat                                     (EDM eq. 3)
    x_{i+1}   = x_hat + (sigma_{i+1} - sigma_hat) d_i                             (Euler step)

With s_churn = 0 (the default) this is the plain Euler method on dx/dsigma = (x - x0_pred) / sigma.
As in diffusers, the model output handed to `step` was computed at x_i, not at x_hat.
`step` calls `parameterization.to_x0_ve` and `update_rules.churn`, `update_rules.euler_step`.

Config fields (diffusers' names and defaults):
- num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the training schedule
  alpha_bar_t, hence sigma.
- rescale_betas_zero_snr: zero terminal SNR (Lin et al. 2023, arXiv 2305.08891); alpha_bar_{T-1} is
  then set to 2^-24 so that sigma_max stays finite.
- prediction_type: "epsilon": x0 = x - sigma eps; "v_prediction": x0 = x / (sigma^2+1) - v sigma / sqrt(sigma^2+1);
  "sample": the model predicts x0 itself.
- timestep_spacing ("linspace", "leading", "trailing") and steps_offset: which training timesteps
  to visit. "linspace" keeps fractional timesteps (978.6122...).
- interpolation_type: "linear": sigma at a fractional timestep is interpolated linearly in sigma
  between integer timesteps. "log_linear": N+1 sigmas evenly spaced in log-sigma from sigma_max to
  sigma_min (as diffusers: the last step then ends at sigma_min; the appended final sigma is unused).
- use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas (at most one): replace the N sigmas by
  the Karras rho = 7 ramp, a ramp even in log-sigma, or Beta(0.6, 0.6) quantiles, between sigma_min
  and sigma_max (which default to the ends of the spaced schedule); timesteps then come from `sigma_to_t`.
- timestep_type: "continuous" with v_prediction feeds the model EDM's c_noise = ln(sigma) / 4 as timestep.
- final_sigmas_type: the sigma after the last step: "zero", or "sigma_min" (the smallest training sigma).
"""

from __future__ import annotations

import numpy as np
import torch

from minidiff.configuration import check_choice, register_to_config
from minidiff.schedulers.base import SigmaSchedulerMixin, check_decreasing, check_float_timestep, check_num_inference_steps
from minidiff.schedulers.parameterization import to_x0_ve
from minidiff.schedulers.schedules import (
    check_no_ramp_for_custom_timesteps,
    chosen_noise_ramp,
    replace_by_noise_ramp,
    sigma_to_t,
    spaced_timesteps,
)
from minidiff.schedulers.update_rules import churn, euler_step
from minidiff.utils.torch_utils import randn_tensor

INTERPOLATION_TYPES = ("linear", "log_linear")
TIMESTEP_TYPES = ("discrete", "continuous")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


class EulerDiscreteScheduler(SigmaSchedulerMixin):
    """Euler steps in sigma (Karras et al. 2022, Algorithm 2), with optional churn noise."""

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
        interpolation_type: str = "linear",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timestep_spacing: str = "linspace",
        timestep_type: str = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
    ):
        self._check_common_config()
        check_choice("interpolation_type", interpolation_type, INTERPOLATION_TYPES)
        check_choice("timestep_type", timestep_type, TIMESTEP_TYPES)
        check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
        self.set_training_sigmas(beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas,
                                 rescale_betas_zero_snr)

        # plain attributes as in diffusers (read without the deprecation warning); the schedule reads the config
        self.use_karras_sigmas = use_karras_sigmas
        self.use_exponential_sigmas = use_exponential_sigmas
        self.use_beta_sigmas = use_beta_sigmas
        # Until `set_timesteps`: every training timestep, noisiest first, then sigma = 0.
        self.num_inference_steps = None
        self.sigmas = torch.cat([torch.from_numpy(self.train_sigmas).flip(0), torch.zeros(1)])
        self.timesteps = self._model_timesteps(np.arange(num_train_timesteps - 1, -1, -1), self.sigmas)
        self.is_scale_input_called = False
        self._step_index = None
        self._begin_index = None

    # ----- the schedule -------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None) -> None:
        """Choose the N noise levels to visit: from `num_inference_steps` and the config, or from custom
        `timesteps` (training timesteps, noisiest first), or from custom `sigmas` (N + 1 values, final one included)."""
        self._check_set_timesteps_arguments(num_inference_steps, timesteps, sigmas)
        if num_inference_steps is None:
            num_inference_steps = len(timesteps) if timesteps is not None else len(sigmas) - 1
        self.num_inference_steps = num_inference_steps

        if sigmas is not None:
            sigmas = np.asarray(sigmas, dtype=np.float32)  # (N+1,)
            timesteps = sigma_to_t(sigmas[:-1], self.log_train_sigmas)
        else:
            if timesteps is None:
                config = self.config
                timesteps = spaced_timesteps(
                    config.timestep_spacing, num_inference_steps, config.num_train_timesteps, config.steps_offset
                )
            timesteps = np.asarray(timesteps, dtype=np.float32)  # (N,)
            sigmas = self._sigmas_at(timesteps)
            sigmas, timesteps = replace_by_noise_ramp(self.config, sigmas, timesteps, self.log_train_sigmas,
                                                      num_inference_steps)
            sigmas = np.concatenate([sigmas, [self._final_sigma()]]).astype(np.float32)  # (N+1,)

        self.sigmas = torch.from_numpy(sigmas)  # kept on the CPU: read one value per step
        self.timesteps = self._model_timesteps(timesteps, self.sigmas).to(device)
        self._step_index = None
        self._begin_index = None

    def _check_set_timesteps_arguments(self, num_inference_steps, timesteps, sigmas) -> None:
        arguments = {"num_inference_steps": num_inference_steps, "timesteps": timesteps, "sigmas": sigmas}
        given = [name for name, value in arguments.items() if value is not None]
        if len(given) != 1:
            raise ValueError(
                f"set_timesteps takes exactly one of num_inference_steps, timesteps or sigmas; got {given or 'none'}"
            )
        if num_inference_steps is not None:
            check_num_inference_steps(num_inference_steps, self.config.num_train_timesteps)
        if timesteps is not None:
            check_no_ramp_for_custom_timesteps(chosen_noise_ramp(self.config))
            if self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction":
                raise ValueError(
                    "custom `timesteps` cannot be used with timestep_type='continuous' and v_prediction, whose "
                    "timesteps are ln(sigma)/4; pass custom `sigmas` instead"
                )
            if len(timesteps) < 1:
                raise ValueError("custom `timesteps` must hold at least one timestep")
            check_decreasing("timesteps", timesteps)
        if sigmas is not None:
            if len(sigmas) < 2:
                raise ValueError("custom `sigmas` must hold at least two values: one per step plus the final sigma")
            check_decreasing("sigmas", sigmas)

    def _sigmas_at(self, timesteps: np.ndarray) -> np.ndarray:
        """sigma at each (possibly fractional) timestep, per interpolation_type."""
        if self.config.interpolation_type == "linear":
            return np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        # "log_linear": N+1 values even in log-sigma from sigma_max down to sigma_min (diffusers' behaviour)
        log_sigma_max, log_sigma_min = float(self.log_train_sigmas[-1]), float(self.log_train_sigmas[0])
        return torch.linspace(log_sigma_max, log_sigma_min, len(timesteps) + 1).exp().numpy()

    def _final_sigma(self) -> float:
        return 0.0 if self.config.final_sigmas_type == "zero" else float(self.train_sigmas[0])

    def _model_timesteps(self, timesteps: np.ndarray, sigmas: torch.Tensor) -> torch.Tensor:
        """What the model is told: the training timestep, or ln(sigma)/4 for continuous v-prediction (EDM's c_noise)."""
        if self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction":
            return torch.stack([0.25 * sigma.log() for sigma in sigmas[:-1]])  # one by one, as diffusers rounds them
        return torch.from_numpy(np.asarray(timesteps).astype(np.float32))

    # ----- one step -----------------------------------------------------------------------------

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ):
        """One Euler step from sigma_i to sigma_{i+1} (with churn when s_churn > 0); see the module docstring."""
        check_float_timestep(timestep, f"{type(self).__name__}.step")
        self._check_step_inputs(model_output, sample)
        self._warn_if_input_not_scaled()
        if self.step_index is None:
            self._init_step_index(timestep)

        sample = sample.to(torch.float32)  # the update in fp32; cast back at the end
        sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]

        # Alg. 2: gamma_i (N = len(sigmas) - 1 steps)
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)  # Alg. 2: t_hat = t_i + gamma_i t_i
        if gamma > 0:
            z = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            sample = churn(sample, sigma, sigma_hat, s_noise, z)  # Alg. 2: x_hat
        # D(x_hat; sigma_hat); as diffusers, v_prediction converts at sigma, not sigma_hat
        sigma_of_output = sigma_hat if self.config.prediction_type == "epsilon" else sigma
        x0_pred = to_x0_ve(model_output, sample, sigma_of_output, self.config.prediction_type)
        prev_sample = euler_step(sample, x0_pred, sigma_hat, sigma_next)  # Alg. 2: x_{i+1}

        prev_sample = prev_sample.to(model_output.dtype)
        self._step_index += 1
        return self._step_output(prev_sample, x0_pred, return_dict)
