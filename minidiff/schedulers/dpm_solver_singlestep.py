"""DPM-Solver and DPM-Solver++ singlestep (Lu et al. 2022: arXiv 2206.00927 and arXiv 2211.01095).

The same exponential integrator in the half log-SNR lambda as the multistep solver (see
`dpm_solver_multistep.py` for alpha_t, sigma_t, lambda_t of a noise level sigma), but a step of order k
gathers its k model outputs *inside* the step, as a Runge-Kutta method does, instead of reusing outputs
from earlier steps. DPM-Solver-2 (2206.00927, Algorithm 1), from t_{i-1} to t_i, h = lambda_{t_i} - lambda_{t_{i-1}}:

    u_i     = (alpha_{s_i} / alpha_{t_{i-1}}) x_{i-1} - sigma_{s_i} (e^{r1 h} - 1) eps(x_{i-1}, t_{i-1})      (to s_i)
    x_i     = (alpha_{t_i} / alpha_{t_{i-1}}) x_{i-1} - sigma_{t_i} (e^h - 1) eps(x_{i-1}, t_{i-1})
              - sigma_{t_i} / (2 r1) (e^h - 1) ( eps(u_i, s_i) - eps(x_{i-1}, t_{i-1}) )

where s_i is the level r1 h of the way from t_{i-1} to t_i. DPM-Solver-3 (Algorithm 2) has two intermediate
levels (r1 = 1/3, r2 = 2/3) and ends with the secant to the second one. DPM-Solver++(2S) (2211.01095,
Algorithm 1) is the same in the data prediction x0:

    x_i     = (sigma_{t_i} / sigma_{t_{i-1}}) x_{i-1} - alpha_{t_i} (e^-h - 1) D_i,
    D_i     = (1 - 1/(2 r1)) x0(x_{i-1}, t_{i-1}) + 1/(2 r1) x0(u_i, s_i)

As diffusers does, the intermediate levels are the scheduler's own timesteps: `order_list` gives the order
of each of the N steps, e.g. 1, 2, 1, 2, ... (2S) or 1, 2, 3, 1, 2, 3, ... (3S). An order-1 step starts a
group: it remembers its sample x_s (`self.sample`) and goes by DPM-Solver-1 to the next timestep, where the
model is called again; the order-2 step then goes from x_s (not from that intermediate sample) to the
timestep after, with both outputs (`update_rules.dpm_solver_pp_2s`, `dpm_solver_pp_3s`, ...). The
prev_sample of each order-1 step is the u_i above: the model is evaluated there, then it is discarded.
The SDE variant ("sde-dpmsolver++", 2211.01095 §5) adds fresh noise at every step.

Config fields (diffusers' names and defaults):
- num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the training schedule alpha_bar.
- solver_order: 1, 2 or 3 (the k above; 2 with classifier-free guidance).
- algorithm_type: "dpmsolver++" | "sde-dpmsolver++" | "dpmsolver" (deprecated, FutureWarning; needs
  final_sigmas_type "sigma_min"). "deis" is read as "dpmsolver++" (and also needs "sigma_min").
- solver_type: "midpoint" (the paper's formulas above) | "heun" (order 2: the linear term integrated
  exactly; order 3: the full quadratic through the three outputs). "logrho", "bh1", "bh2" read as "midpoint".
- prediction_type: "epsilon" | "v_prediction" | "sample".
- thresholding, dynamic_thresholding_ratio, sample_max_value: Imagen's dynamic thresholding of x0_pred
  (for "dpmsolver" too, at the step's own noise level; diffusers 0.42.1 fails there with a shape error).
- lower_order_final: end on a complete group (the order list shortened as diffusers does). set_timesteps
  turns it on, in the config, with a logged warning, when N is not a multiple of solver_order or
  final_sigmas_type is "zero" (as diffusers). With "zero" the last step is always first order.
- final_sigmas_type: the noise level after the last step: "zero" or "sigma_min".
- use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas (at most one): a sigma ramp from the largest
  to the smallest training sigma replaces the spaced sigmas; the timesteps then come from those sigmas.
- lambda_min_clipped: timesteps whose lambda is below this are never visited (for the cosine schedule).
- variance_type: "learned" / "learned_range": only the first half of the channels (the mean) is used.
- Timesteps: N + 1 points of linspace(0, T - 1) rounded, the last (t = 0) dropped (no timestep_spacing here).
- use_flow_sigmas, flow_shift, use_dynamic_shifting, time_shift_type: flow-matching options (SD3, Flux);
  minidiff implements the VP form of SD 1.x only, so they are refused fields (`_refused_config`).
"""

from __future__ import annotations

import logging
import warnings

import torch

from minidiff.configuration import check_choice, register_to_config
from minidiff.schedulers.exponential_integrator import ExponentialIntegratorMixin
from minidiff.schedulers.parameterization import eps_from_x0, limit_x0, to_eps, to_x0, vp_from_sigma, x0_from_eps
from minidiff.schedulers.update_rules import (
    dpm_solver_2s,
    dpm_solver_3s,
    dpm_solver_first_order,
    dpm_solver_pp_2s,
    dpm_solver_pp_3s,
    dpm_solver_pp_first_order,
    sde_dpm_solver_pp_2s,
    sde_dpm_solver_pp_3s,
    sde_dpm_solver_pp_first_order,
)
from minidiff.utils.torch_utils import randn_tensor

logger = logging.getLogger(__name__)

SINGLESTEP_ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver")


def singlestep_order_list(num_inference_steps: int, solver_order: int, lower_order_final: bool, final_sigmas_type: str) -> list[int]:
    """The order of each step: groups 1, 2 (, 3) repeated. With lower_order_final the list ends on a complete
    shorter group; with final_sigmas_type "zero" the last step is first order (a step to sigma = 0)."""
    N, k = num_inference_steps, solver_order
    if k == 1:
        orders = [1] * N
    elif not lower_order_final:
        orders = list(range(1, k + 1)) * (N // k)  # set_timesteps makes N a multiple of k here
    elif k == 2:
        orders = [1, 2] * (N // 2 - 1) + [1, 1] if N % 2 == 0 else [1, 2] * (N // 2) + [1]
    elif N % 3 == 0:
        orders = [1, 2, 3] * (N // 3 - 1) + [1, 2] + [1]
    else:
        orders = [1, 2, 3] * (N // 3) + [1, 2][: N % 3]
    if final_sigmas_type == "zero":
        orders[-1] = 1
    return orders


class DPMSolverSinglestepScheduler(ExponentialIntegratorMixin):
    """DPM-Solver(++) singlestep: order 1-3, the extra model outputs of a step taken at its own intermediate levels."""

    _refused_config = {"use_flow_sigmas": False, "flow_shift": 1.0, "use_dynamic_shifting": False, "time_shift_type": "exponential"}

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
        lower_order_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
    ):
        self._check_config(algorithm_type, solver_type)
        self._init_solver()
        self.order_list = self.get_order_list(num_train_timesteps)

    def _reset_state(self) -> None:
        super()._reset_state()
        self.sample = None  # x_s: the sample at the start of the current group of steps

    def _check_config(self, algorithm_type: str, solver_type: str) -> None:
        super()._check_config(solver_type)
        if algorithm_type == "deis":  # a DEIS config: its algorithm is DPM-Solver++'s
            self.register_to_config(algorithm_type="dpmsolver++")
        check_choice("algorithm_type", self.config.algorithm_type, SINGLESTEP_ALGORITHM_TYPES)
        if algorithm_type == "dpmsolver":
            warnings.warn(
                "algorithm_type 'dpmsolver' is deprecated (as in diffusers); use 'dpmsolver++' or 'sde-dpmsolver++'",
                FutureWarning,
                stacklevel=3,
            )
        if algorithm_type not in ("dpmsolver++", "sde-dpmsolver++") and self.config.final_sigmas_type == "zero":
            raise ValueError(
                f"final_sigmas_type 'zero' is not supported with algorithm_type {algorithm_type!r}: the noise-prediction "
                "update cannot step to sigma = 0. Pass final_sigmas_type='sigma_min'"
            )

    def get_order_list(self, num_inference_steps: int) -> list[int]:
        """The order of each of the N steps (see `singlestep_order_list`)."""
        config = self.config
        return singlestep_order_list(num_inference_steps, config.solver_order, config.lower_order_final, config.final_sigmas_type)

    # ----- the schedule -----

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Choose the N timesteps, their sigmas (N + 1: the final one is 0 or sigma_min) and the order of each step.

        `timesteps` gives a custom descending list of training timesteps instead of `num_inference_steps`.
        """
        config = self.config
        timesteps = self._timesteps_to_visit(num_inference_steps, timesteps, mu, lambda_min_clipped=config.lambda_min_clipped)
        self._set_schedule(timesteps, device, config.final_sigmas_type)  # linspace: no timestep_spacing here
        self._require_lower_order_final(self.num_inference_steps)
        self.order_list = self.get_order_list(self.num_inference_steps)

    def _require_lower_order_final(self, num_inference_steps: int) -> None:
        """The groups must fit the N steps and the step to sigma = 0 must be first order: as diffusers, switch
        lower_order_final on (in the config) when they would not, and say so."""
        config = self.config
        if config.lower_order_final:
            return
        if num_inference_steps % config.solver_order != 0:
            reason = f"{num_inference_steps} steps are not a multiple of solver_order={config.solver_order}"
        elif config.final_sigmas_type == "zero":
            reason = "final_sigmas_type 'zero' needs a first-order last step"
        else:
            return
        logger.warning("DPMSolverSinglestepScheduler: setting lower_order_final=True in the config: %s", reason)
        self.register_to_config(lower_order_final=True)

    # ----- one step -----

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """What the solver integrates: x0_pred for DPM-Solver++, eps for DPM-Solver, at the current step."""
        if self.config.variance_type in ("learned", "learned_range"):
            model_output = model_output[:, : sample.shape[1]]  # (B, 2C, ...) -> (B, C, ...): the mean, not the variance
        alpha_t, sigma_t, _ = vp_from_sigma(self.sigmas[self.step_index])
        prediction_type = self.config.prediction_type
        if self.config.algorithm_type != "dpmsolver":
            return limit_x0(to_x0(model_output, sample, alpha_t, sigma_t, prediction_type), self.config)
        eps = to_eps(model_output, sample, alpha_t, sigma_t, prediction_type)
        if self.config.thresholding:  # threshold x0_pred, then go back to eps
            x0_pred = limit_x0(x0_from_eps(eps, sample, alpha_t, sigma_t), self.config)
            eps = eps_from_x0(x0_pred, sample, alpha_t, sigma_t)
        return eps

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ):
        """One step of the order `order_list` gives (lower when the group's earlier outputs are missing, e.g. when
        img2img starts mid-group). An order-1 step starts a group at `sample`; higher orders step from that start."""
        self._begin_step(model_output, timestep, sample)

        m0 = self.convert_model_output(model_output, sample)  # x0_pred (++) or eps
        self.model_outputs = self.model_outputs[1:] + [m0]  # [..., m_r1, m0]: this group's outputs, oldest first
        x0_pred = m0 if self.config.algorithm_type != "dpmsolver" else self._x0_from_eps(m0, sample)
        noise = None
        if self.config.algorithm_type == "sde-dpmsolver++":  # drawn on every step, in the model output's dtype
            noise = randn_tensor(m0.shape, generator=generator, device=m0.device, dtype=m0.dtype)

        order = self.order_list[self.step_index]
        while self.model_outputs[-order] is None:
            order -= 1
        if order == 1:
            self.sample = sample
        prev_sample = self.singlestep_dpm_solver_update(self.model_outputs, sample=self.sample, order=order, noise=noise)

        self._step_index += 1
        return self._step_output(prev_sample, x0_pred, return_dict)

    def singlestep_dpm_solver_update(self, model_output_list: list, sample: torch.Tensor, order: int, noise=None) -> torch.Tensor:
        """The update of order 1, 2 or 3 from the group's start `sample` to the next timestep."""
        if order == 1:
            return self.dpm_solver_first_order_update(model_output_list[-1], sample=sample, noise=noise)
        if order == 2:
            return self.singlestep_dpm_solver_second_order_update(model_output_list, sample=sample, noise=noise)
        return self.singlestep_dpm_solver_third_order_update(model_output_list, sample=sample, noise=noise)

    def _levels(self, *indices: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(alpha, sigma, lambda) in the VP form at each index into `sigmas`."""
        return [vp_from_sigma(self.sigmas[index]) for index in indices]

    def dpm_solver_first_order_update(self, model_output: torch.Tensor, sample: torch.Tensor, noise=None) -> torch.Tensor:
        """DPM-Solver-1 (= DDIM) from the current level s to the next timestep t."""
        (alpha_t, sigma_t, lambda_t), (alpha_s, sigma_s, lambda_s) = self._levels(self.step_index + 1, self.step_index)
        algorithm = self.config.algorithm_type
        if algorithm == "dpmsolver++":
            return dpm_solver_pp_first_order(sample, model_output, alpha_t, sigma_t, sigma_s, lambda_t, lambda_s)
        if algorithm == "dpmsolver":
            return dpm_solver_first_order(sample, model_output, alpha_t, sigma_t, alpha_s, lambda_t, lambda_s)
        return sde_dpm_solver_pp_first_order(sample, model_output, alpha_t, sigma_t, sigma_s, lambda_t, lambda_s, noise)

    def singlestep_dpm_solver_second_order_update(self, model_output_list: list, sample: torch.Tensor, noise=None) -> torch.Tensor:
        """Order 2 from the group's start s (one step back) to t, with the output at r (the current level)."""
        i = self.step_index
        (alpha_t, sigma_t, lambda_t), (_, _, lambda_r), (alpha_s, sigma_s, lambda_s) = self._levels(i + 1, i, i - 1)
        m_s, m_r = model_output_list[-2], model_output_list[-1]
        lambdas, solver_type = (lambda_t, lambda_s, lambda_r), self.config.solver_type
        algorithm = self.config.algorithm_type
        if algorithm == "dpmsolver++":
            return dpm_solver_pp_2s(sample, m_s, m_r, alpha_t, sigma_t, sigma_s, *lambdas, solver_type)
        if algorithm == "dpmsolver":
            return dpm_solver_2s(sample, m_s, m_r, alpha_t, sigma_t, alpha_s, *lambdas, solver_type)
        return sde_dpm_solver_pp_2s(sample, m_s, m_r, alpha_t, sigma_t, sigma_s, *lambdas, noise, solver_type)

    def singlestep_dpm_solver_third_order_update(self, model_output_list: list, sample: torch.Tensor, noise=None) -> torch.Tensor:
        """Order 3 from the group's start s (two steps back) to t, with the outputs at r1 and r2 (the current level)."""
        i = self.step_index
        levels = self._levels(i + 1, i, i - 1, i - 2)
        (alpha_t, sigma_t, lambda_t), (_, _, lambda_r2), (_, _, lambda_r1), (alpha_s, sigma_s, lambda_s) = levels
        m_s, m_r1, m_r2 = model_output_list[-3], model_output_list[-2], model_output_list[-1]
        lambdas, solver_type = (lambda_t, lambda_s, lambda_r1, lambda_r2), self.config.solver_type
        algorithm = self.config.algorithm_type
        if algorithm == "dpmsolver++":
            return dpm_solver_pp_3s(sample, m_s, m_r1, m_r2, alpha_t, sigma_t, sigma_s, *lambdas, solver_type)
        if algorithm == "dpmsolver":
            return dpm_solver_3s(sample, m_s, m_r1, m_r2, alpha_t, sigma_t, alpha_s, *lambdas, solver_type)
        return sde_dpm_solver_pp_3s(sample, m_s, m_r1, m_r2, alpha_t, sigma_t, sigma_s, *lambdas, noise, solver_type)
