"""DEIS: the diffusion exponential integrator sampler, multistep (Zhang & Chen 2022, arXiv 2204.13902).

DEIS integrates the probability-flow ODE of the VP process exactly in its linear part. Writing
rho = sigma_t / alpha_t (the VE noise level `sigma` of the sigma schedulers) and y = x_t / alpha_t, the ODE
becomes dy/drho = eps(x, rho) (the "rho" reparameterization of §4), so from level s0 to the next level t

    x_t / alpha_t = x_s0 / alpha_s0 + integral from rho_s0 to rho_t of eps d rho.

AB-DEIS (the exponential Adams-Bashforth method) replaces eps by the polynomial through the outputs of
the last k steps, eps_s0, eps_s1, ... (kept in `model_outputs`: no extra model calls) and integrates it
exactly. diffusers' "logrho" variant takes the polynomial in log rho:

    x_t = alpha_t ( x_s0 / alpha_s0 + sum_j C_j eps_sj ),   C_j = integral_{rho_s0}^{rho_t} l_j(log rho) d rho,

l_j the Lagrange basis polynomial that is 1 at log rho_sj and 0 at the other levels
(`update_rules.deis_logrho_coefficients`, closed forms for k = 2, 3). With k = 1 (C_0 = rho_t - rho_s0)
this is DDIM, i.e. DPM-Solver-1 (`update_rules.dpm_solver_first_order`).

The first steps are lower order (warm-up: no previous outputs yet), and with lower_order_final and fewer
than 15 steps so are the last two (first order, then at most second).

Config fields (diffusers' names and defaults):
- num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the training schedule alpha_bar.
- solver_order: k = 1, 2 or 3 (2 with classifier-free guidance).
- prediction_type: "epsilon" | "v_prediction" | "sample". The output is turned into x0_pred and then into
  eps (so thresholding applies), as diffusers does, even for "epsilon".
- thresholding, dynamic_thresholding_ratio, sample_max_value: Imagen's dynamic thresholding of x0_pred.
- algorithm_type: "deis" ("dpmsolver", "dpmsolver++" from a DPM-Solver config are read as "deis").
- solver_type: "logrho" ("midpoint", "heun", "bh1", "bh2" from a DPM-Solver or UniPC config are read as "logrho").
- lower_order_final: see above.
- use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas (at most one): a sigma ramp replaces the
  spaced sigmas (the timesteps then come from the sigmas); the final sigma repeats the ramp's last one.
  Without a ramp the final sigma is sigma_min, the smallest training sigma.
- timestep_spacing, steps_offset: N + 1 points spaced over the training timesteps, the last one dropped
  (`exponential_integrator.multistep_timesteps`).
- use_flow_sigmas, flow_shift, use_dynamic_shifting, time_shift_type: flow-matching options (SD3, Flux);
  minidiff implements the VP form of SD 1.x only, so they are refused fields (`_refused_config`).
"""

from __future__ import annotations

import torch

from minidiff.configuration import check_choice, register_to_config
from minidiff.schedulers.exponential_integrator import ExponentialIntegratorMixin
from minidiff.schedulers.parameterization import eps_from_x0, limit_x0, to_x0, vp_from_sigma
from minidiff.schedulers.update_rules import deis_logrho_coefficients, deis_multistep_update, dpm_solver_first_order


class DEISMultistepScheduler(ExponentialIntegratorMixin):
    """DEIS (AB-DEIS, "logrho"): an exponential integrator in rho, of order 1-3, reusing past model outputs."""

    _refused_config = {"use_flow_sigmas": False, "flow_shift": 1.0, "use_dynamic_shifting": False, "time_shift_type": "exponential"}
    solver_types = ("logrho",)
    default_solver_type = "logrho"
    final_sigma_ends_ramp = True

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
        algorithm_type: str = "deis",
        solver_type: str = "logrho",
        lower_order_final: bool = True,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        self._check_config(algorithm_type, solver_type)
        self._init_solver()

    def _check_config(self, algorithm_type: str, solver_type: str) -> None:
        super()._check_config(solver_type)
        if algorithm_type in ("dpmsolver", "dpmsolver++"):  # a DPM-Solver config
            self.register_to_config(algorithm_type="deis")
        check_choice("algorithm_type", self.config.algorithm_type, ("deis",))

    # ----- the schedule -----

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None, mu: float | None = None) -> None:
        """Choose the N timesteps and their N + 1 sigmas (the last one sigma_min, or the ramp's last repeated)."""
        config = self.config
        timesteps = self._timesteps_to_visit(num_inference_steps, None, mu, config.timestep_spacing, config.steps_offset)
        self._set_schedule(timesteps, device, final_sigmas_type="sigma_min")

    # ----- one step -----

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """eps, by way of x0_pred (thresholded when asked): DEIS integrates the noise prediction."""
        return self._eps_and_x0(model_output, sample)[0]

    def _eps_and_x0(self, model_output: torch.Tensor, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_t, sigma_t, _ = vp_from_sigma(self.sigmas[self.step_index])
        x0_pred = limit_x0(to_x0(model_output, sample, alpha_t, sigma_t, self.config.prediction_type), self.config)
        return eps_from_x0(x0_pred, sample, alpha_t, sigma_t), x0_pred

    def _order_of_this_step(self) -> int:
        """Warm-up (order <= number of outputs seen) and, with lower_order_final and N < 15, lower last steps."""
        config, last = self.config, len(self.timesteps) - 1
        few_steps = config.lower_order_final and len(self.timesteps) < 15
        if config.solver_order == 1 or self.lower_order_nums < 1 or (few_steps and self.step_index == last):
            return 1
        if config.solver_order == 2 or self.lower_order_nums < 2 or (few_steps and self.step_index == last - 1):
            return 2
        return 3

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ):
        """One AB-DEIS step from the current noise level to the next (deterministic: `generator` is not used)."""
        self._begin_step(model_output, timestep, sample)
        order = self._order_of_this_step()

        eps, x0_pred = self._eps_and_x0(model_output, sample)
        self.model_outputs = self.model_outputs[1:] + [eps]  # ring buffer: [..., eps_s2, eps_s1, eps_s0]
        if order == 1:
            prev_sample = self.deis_first_order_update(eps, sample=sample)
        elif order == 2:
            prev_sample = self.multistep_deis_second_order_update(self.model_outputs, sample=sample)
        else:
            prev_sample = self.multistep_deis_third_order_update(self.model_outputs, sample=sample)

        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        self._step_index += 1
        return self._step_output(prev_sample, x0_pred, return_dict)

    def _alpha_and_rho(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha and rho = sigma_t / alpha_t at an index into `sigmas`."""
        alpha, sigma, _ = vp_from_sigma(self.sigmas[index])
        return alpha, sigma / alpha

    def deis_first_order_update(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Order 1: DPM-Solver-1 (= DDIM) with the current eps."""
        alpha_t, sigma_t, lambda_t = vp_from_sigma(self.sigmas[self.step_index + 1])
        alpha_s0, _, lambda_s0 = vp_from_sigma(self.sigmas[self.step_index])
        return dpm_solver_first_order(sample, model_output, alpha_t, sigma_t, alpha_s0, lambda_t, lambda_s0)

    def multistep_deis_second_order_update(self, model_output_list: list, sample: torch.Tensor) -> torch.Tensor:
        """Order 2: eps linear in log rho through the last two outputs."""
        i = self.step_index
        (alpha_t, rho_t), (alpha_s0, rho_s0), (_, rho_s1) = (self._alpha_and_rho(j) for j in (i + 1, i, i - 1))
        coefficients = deis_logrho_coefficients(rho_t, rho_s0, rho_s1)
        return deis_multistep_update(sample, model_output_list[::-1][:2], alpha_t, alpha_s0, coefficients)

    def multistep_deis_third_order_update(self, model_output_list: list, sample: torch.Tensor) -> torch.Tensor:
        """Order 3: eps quadratic in log rho through the last three outputs."""
        i = self.step_index
        levels = [self._alpha_and_rho(j) for j in (i + 1, i, i - 1, i - 2)]
        (alpha_t, rho_t), (alpha_s0, rho_s0), (_, rho_s1), (_, rho_s2) = levels
        coefficients = deis_logrho_coefficients(rho_t, rho_s0, rho_s1, rho_s2)
        return deis_multistep_update(sample, model_output_list[::-1][:3], alpha_t, alpha_s0, coefficients)
