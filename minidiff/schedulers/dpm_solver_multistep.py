"""DPM-Solver and DPM-Solver++ multistep (Lu et al. 2022: arXiv 2206.00927 and arXiv 2211.01095).

DPM-Solver integrates the diffusion ODE exactly in its linear part and approximates only the model
term, using a change of variable from t to the half log-SNR lambda. In the VP form used here,
every noise level sigma (the "sigma" of the sigma schedulers, sqrt((1 - alpha_bar) / alpha_bar)) gives

    alpha_t = 1 / sqrt(sigma^2 + 1),   sigma_t = sigma * alpha_t,   lambda_t = log alpha_t - log sigma_t

so that x_t = alpha_t x_0 + sigma_t eps. One step goes from the current noise level s (s0) to the
next one t, with h = lambda_t - lambda_s0 > 0; s1, s2 are the two previous levels, whose model
outputs are kept in the `model_outputs` buffer (that is what "multistep" means: no extra model calls).

DPM-Solver++ ("dpmsolver++", the default; 2211.01095) integrates the data prediction m = x0_pred:

    order 1 (= DDIM):  x_t = (sigma_t / sigma_s0) x_s0 - alpha_t (e^-h - 1) m0                      (§4, eq. 8 with k = 1)
    order 2 ("2M"):    r0 = h_0 / h,  D0 = m0,  D1 = (m0 - m1) / r0,   h_0 = lambda_s0 - lambda_s1
        midpoint:      x_t = (sigma_t / sigma_s0) x_s0 - alpha_t (e^-h - 1) D0 - 0.5 alpha_t (e^-h - 1) D1   (Algorithm 2)
        heun:          x_t = (sigma_t / sigma_s0) x_s0 - alpha_t (e^-h - 1) D0 + alpha_t ((e^-h - 1)/h + 1) D1
    order 3 ("3M"):    adds the second difference D2 of m0, m1, m2 (2206.00927 §3.3, in data-prediction form)

DPM-Solver ("dpmsolver"; 2206.00927) integrates the noise prediction m = eps instead:

    order 1:           x_t = (alpha_t / alpha_s0) x_s0 - sigma_t (e^h - 1) m0                           (eq. 3.7, DPM-Solver-1)

The SDE variants ("sde-dpmsolver++", "sde-dpmsolver") solve the reverse SDE with the same exponential
integrator; each step adds fresh noise z ~ N(0, I), drawn in float32 (2211.01095, SDE-DPM-Solver++):

    order 1:           x_t = (sigma_t / sigma_s0) e^-h x_s0 + alpha_t (1 - e^-2h) m0 + sigma_t sqrt(1 - e^-2h) z

The first steps are lower order (warm-up: there are no previous outputs yet), and so are the last
steps when asked (see `lower_order_final`, `euler_at_final`, `final_sigmas_type` below). Each formula
is one function of `update_rules.py` (`dpm_solver_pp_first_order`, `dpm_solver_pp_second_order`, ...);
`step` converts the model output (`parameterization.to_x0` / `to_eps`), picks the order, and calls one.

Config fields (diffusers' names and defaults):
- num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the training schedule
  alpha_bar (`schedules.make_betas`).
- rescale_betas_zero_snr: zero terminal SNR (Lin et al. 2023, arXiv 2305.08891); alpha_bar[-1] is then
  set to 2^-24 instead of 0, so the first sigma is large but finite.
- solver_order: 1, 2 or 3 (2 is recommended with classifier-free guidance).
- algorithm_type: "dpmsolver++" | "sde-dpmsolver++" | "dpmsolver" | "sde-dpmsolver". The last two are
  deprecated (FutureWarning) and need final_sigmas_type="sigma_min". "deis" is read as "dpmsolver++"
  (and, as in diffusers, also needs "sigma_min").
- solver_type: "midpoint" | "heun", the second-order formula ("bh1", "bh2", "logrho" from a UniPC or
  DEIS config are read as "midpoint").
- prediction_type: "epsilon" | "v_prediction" | "sample"; converted to x0_pred (or eps) first.
- thresholding, dynamic_thresholding_ratio, sample_max_value: Imagen's dynamic thresholding of x0_pred.
- lower_order_final: with fewer than 15 steps, the last step is first order and the one before it at
  most second order. euler_at_final: the last step is always first order.
- final_sigmas_type: the noise level after the last step: "zero" (sigma = 0, lambda = inf, so the last
  step is first order) or "sigma_min" (the smallest training sigma).
- timestep_spacing, steps_offset: N + 1 points spaced over the training timesteps, the last one dropped
  (`exponential_integrator.multistep_timesteps`).
- use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas / use_lu_lambdas: replace the spaced sigmas
  by a Karras ramp (rho = 7), an exponential ramp, Beta(0.6, 0.6) quantiles (`schedules.beta_sigmas`), or steps
  uniform in lambda (Lu et al.); the timesteps then come from those sigmas (`schedules.sigma_to_t`).
- lambda_min_clipped: timesteps whose lambda is below this are never visited (for the cosine schedule).
- variance_type: "learned" / "learned_range" for models that also output a variance: only the first
  half of the channels (the mean) is used. DDPM's other types (a DDPM config) change nothing, as None.
- use_flow_sigmas, flow_shift, use_dynamic_shifting, time_shift_type: accepted so
  configs read, but minidiff implements only the VP (SD 1.x) form: turning them on raises ValueError.
"""

from __future__ import annotations

import warnings

import torch

from minidiff.configuration import check_choice, register_to_config
from minidiff.schedulers.exponential_integrator import ExponentialIntegratorMixin
from minidiff.schedulers.parameterization import eps_from_x0, limit_x0, to_eps, to_x0, x0_from_eps
from minidiff.schedulers.update_rules import (
    dpm_solver_first_order,
    dpm_solver_pp_first_order,
    dpm_solver_pp_second_order,
    dpm_solver_pp_third_order,
    dpm_solver_second_order,
    dpm_solver_third_order,
    sde_dpm_solver_first_order,
    sde_dpm_solver_pp_first_order,
    sde_dpm_solver_pp_second_order,
    sde_dpm_solver_pp_third_order,
    sde_dpm_solver_second_order,
)
from minidiff.utils.torch_utils import randn_tensor

ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")


class DPMSolverMultistepScheduler(ExponentialIntegratorMixin):
    """DPM-Solver(++) multistep: an exponential integrator in lambda, of order 1-3, reusing past model outputs."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        self._check_config(algorithm_type, solver_type)
        self._init_solver(rescale_betas_zero_snr)

    def _check_config(self, algorithm_type: str, solver_type: str) -> None:
        super()._check_config(solver_type)
        if algorithm_type == "deis":  # a DEIS config: its algorithm is DPM-Solver++'s
            self.register_to_config(algorithm_type="dpmsolver++")
        check_choice("algorithm_type", self.config.algorithm_type, ALGORITHM_TYPES)
        if algorithm_type in ("dpmsolver", "sde-dpmsolver"):
            warnings.warn(
                f"algorithm_type {algorithm_type!r} is deprecated (as in diffusers); use 'dpmsolver++' or 'sde-dpmsolver++'",
                FutureWarning,
                stacklevel=3,
            )
        if algorithm_type not in ("dpmsolver++", "sde-dpmsolver++") and self.config.final_sigmas_type == "zero":
            raise ValueError(  # as diffusers, checked on the type as given (so "deis" too)
                f"final_sigmas_type 'zero' is not supported with algorithm_type {algorithm_type!r}: the noise-prediction "
                "update cannot step to sigma = 0. Pass final_sigmas_type='sigma_min'"
            )
        if algorithm_type == "sde-dpmsolver" and self.config.solver_order == 3:
            raise ValueError("algorithm_type 'sde-dpmsolver' has no third-order update; use solver_order 1 or 2")

    # ----- the schedule -----

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Choose the N timesteps and their sigmas (N + 1 of them: the final one is 0 or sigma_min).

        `timesteps` gives a custom descending list of training timesteps instead of `num_inference_steps`.
        """
        config = self.config
        timesteps = self._timesteps_to_visit(num_inference_steps, timesteps, mu, config.timestep_spacing,
                                             config.steps_offset, config.lambda_min_clipped)
        self._set_schedule(timesteps, device, config.final_sigmas_type)

    def _noise_ramp(self) -> str | None:
        """The sigma ramp that replaces the spaced sigmas, in diffusers' precedence: Karras, Lu, exponential, beta."""
        ramp = super()._noise_ramp()
        return "lu" if self.config.use_lu_lambdas and ramp != "karras" else ramp

    def _rounds_ramp_timesteps(self, ramp: str | None) -> bool:
        """Karras and Lu timesteps are rounded, except with the cosine schedule (as diffusers)."""
        return ramp in ("karras", "lu") and self.config.beta_schedule != "squaredcos_cap_v2"

    # ----- one step -----

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """What the solver integrates: x0_pred for DPM-Solver++, eps for DPM-Solver, at the current step."""
        if self.config.variance_type in ("learned", "learned_range"):
            model_output = model_output[:, : sample.shape[1]]  # (B, 2C, ...) -> (B, C, ...): the mean, not the variance
        alpha_t, sigma_t, _ = self._alpha_sigma_lambda(self.step_index)
        prediction_type = self.config.prediction_type
        if self.config.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
            return limit_x0(to_x0(model_output, sample, alpha_t, sigma_t, prediction_type), self.config)
        eps = to_eps(model_output, sample, alpha_t, sigma_t, prediction_type)
        if self.config.thresholding:  # threshold x0_pred, then go back to eps
            x0_pred = limit_x0(x0_from_eps(eps, sample, alpha_t, sigma_t), self.config)
            eps = eps_from_x0(x0_pred, sample, alpha_t, sigma_t)
        return eps

    def _order_of_this_step(self) -> int:
        """Warm-up (order <= number of outputs seen) and the optional lower-order final steps."""
        config, last = self.config, len(self.timesteps) - 1
        few_steps = config.lower_order_final and len(self.timesteps) < 15
        first_order_final = self.step_index == last and (
            config.euler_at_final or few_steps or config.final_sigmas_type == "zero"
        )
        second_order_second_to_last = self.step_index == last - 1 and few_steps
        if config.solver_order == 1 or self.lower_order_nums < 1 or first_order_final:
            return 1
        if config.solver_order == 2 or self.lower_order_nums < 2 or second_order_second_to_last:
            return 2
        return 3

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        """One solver step from the current noise level to the next.

        `variance_noise` (SDE variants only) replaces the noise drawn from `generator`.
        """
        self._begin_step(model_output, timestep, sample)
        order = self._order_of_this_step()

        m0 = self.convert_model_output(model_output, sample)  # x0_pred (++) or eps
        self.model_outputs = self.model_outputs[1:] + [m0]  # ring buffer: [..., m2, m1, m0]
        x0_pred = m0 if "++" in self.config.algorithm_type else self._x0_from_eps(m0, sample)
        sample = sample.to(torch.float32)  # the update runs in float32
        noise = self._sde_noise(m0, generator, variance_noise)

        if order == 1:
            prev_sample = self.dpm_solver_first_order_update(m0, sample, noise)
        elif order == 2:
            prev_sample = self.multistep_dpm_solver_second_order_update(self.model_outputs, sample, noise)
        else:
            prev_sample = self.multistep_dpm_solver_third_order_update(self.model_outputs, sample, noise)

        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        prev_sample = prev_sample.to(m0.dtype)
        self._step_index += 1
        return self._step_output(prev_sample, x0_pred, return_dict)

    def _sde_noise(self, like: torch.Tensor, generator, variance_noise) -> torch.Tensor | None:
        """z ~ N(0, I) in float32 for the SDE variants, drawn on every step (even a first-order one)."""
        if not self.config.algorithm_type.startswith("sde-"):
            return None
        if variance_noise is not None:
            return variance_noise.to(device=like.device, dtype=torch.float32)
        return randn_tensor(like.shape, generator=generator, device=like.device, dtype=torch.float32)

    def dpm_solver_first_order_update(self, m0: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """DPM-Solver-1 (= DDIM): the exact solution with the model output held constant over the step."""
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self.step_index + 1)
        alpha_s0, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(self.step_index)
        algorithm = self.config.algorithm_type
        if algorithm == "dpmsolver++":
            return dpm_solver_pp_first_order(sample, m0, alpha_t, sigma_t, sigma_s0, lambda_t, lambda_s0)
        if algorithm == "dpmsolver":
            return dpm_solver_first_order(sample, m0, alpha_t, sigma_t, alpha_s0, lambda_t, lambda_s0)
        if algorithm == "sde-dpmsolver++":
            return sde_dpm_solver_pp_first_order(sample, m0, alpha_t, sigma_t, sigma_s0, lambda_t, lambda_s0, noise)
        return sde_dpm_solver_first_order(sample, m0, alpha_t, sigma_t, alpha_s0, lambda_t, lambda_s0, noise)

    def multistep_dpm_solver_second_order_update(self, model_outputs: list, sample: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """Multistep order 2: the model output is linear in lambda through the last two outputs."""
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self.step_index + 1)
        alpha_s0, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(self.step_index)
        _, _, lambda_s1 = self._alpha_sigma_lambda(self.step_index - 1)
        m0, m1 = model_outputs[-1], model_outputs[-2]
        lambdas, algorithm, solver_type = (lambda_t, lambda_s0, lambda_s1), self.config.algorithm_type, self.config.solver_type
        if algorithm == "dpmsolver++":
            return dpm_solver_pp_second_order(sample, m0, m1, alpha_t, sigma_t, sigma_s0, *lambdas, solver_type)
        if algorithm == "dpmsolver":
            return dpm_solver_second_order(sample, m0, m1, alpha_t, sigma_t, alpha_s0, *lambdas, solver_type)
        if algorithm == "sde-dpmsolver++":
            return sde_dpm_solver_pp_second_order(sample, m0, m1, alpha_t, sigma_t, sigma_s0, *lambdas, noise, solver_type)
        return sde_dpm_solver_second_order(sample, m0, m1, alpha_t, sigma_t, alpha_s0, *lambdas, noise, solver_type)

    def multistep_dpm_solver_third_order_update(self, model_outputs: list, sample: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """Multistep order 3: the model output is quadratic in lambda through the last three outputs."""
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self.step_index + 1)
        alpha_s0, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(self.step_index)
        _, _, lambda_s1 = self._alpha_sigma_lambda(self.step_index - 1)
        _, _, lambda_s2 = self._alpha_sigma_lambda(self.step_index - 2)
        m0, m1, m2 = model_outputs[-1], model_outputs[-2], model_outputs[-3]
        lambdas, algorithm = (lambda_t, lambda_s0, lambda_s1, lambda_s2), self.config.algorithm_type
        if algorithm == "dpmsolver++":
            return dpm_solver_pp_third_order(sample, m0, m1, m2, alpha_t, sigma_t, sigma_s0, *lambdas)
        if algorithm == "dpmsolver":
            return dpm_solver_third_order(sample, m0, m1, m2, alpha_t, sigma_t, alpha_s0, *lambdas)
        # sde-dpmsolver++ (sde-dpmsolver has no third order: refused in __init__)
        return sde_dpm_solver_pp_third_order(sample, m0, m1, m2, alpha_t, sigma_t, sigma_s0, *lambdas, noise)
