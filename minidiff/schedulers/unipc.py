"""UniPC: a unified predictor-corrector framework for fast sampling (Zhao et al. 2023, arXiv 2302.04867).

UniPC builds on DPM-Solver's exponential integrator in the half log-SNR lambda (see
`dpm_solver_multistep.py` for the VP form alpha_t, sigma_t, lambda_t of a noise level sigma). A step
goes from the current level s (s0) to the next level t, h = lambda_t - lambda_s0; s1, s2, ... are the
previous levels, with r_k = (lambda_sk - lambda_s0) / h and the model outputs m (x0_pred when
`predict_x0`, as in DPM-Solver++; eps otherwise) kept in `model_outputs`.

UniP-p, the predictor of order p (written for predict_x0; for eps swap alpha <-> sigma and -h <-> h):

    D_k   = (m_sk - m_s0) / r_k,   k = 1 .. p-1
    x_t   = (sigma_t / sigma_s0) x_s0 - alpha_t (e^-h - 1) m_s0 - alpha_t B(h) sum_k a_k D_k        (§3.1, UniP)

UniC-p, the corrector. Once the model has been called at the predicted x_t (the next step's call),
its output m_t refines that same x_t, so the corrector needs no extra model evaluation:

    x_t^c = (sigma_t / sigma_s0) x_s0 - alpha_t (e^-h - 1) m_s0
            - alpha_t B(h) ( sum_k c_k D_k + c_p (m_t - m_s0) )                                        (§3.1, UniC)

The coefficients solve the order conditions of §3.2, one row per i = 1 .. p (r_p = 1):

    sum_k r_k^(i-1) a_k = i! h phi_{i+1}(h) / B(h),    h phi_1(h) = e^h - 1,  h phi_{k+1}(h) = h phi_k(h) / h - 1/k!

(`update_rules.unipc_bh_coefficients`). Two cases are fixed instead of solved: a_1 = 0.5 for the order-2
predictor and c_1 = 0.5 for the order-1 corrector. B(h) is the free function of the "B(h)" variant: h for
"bh1", e^h - 1 for "bh2". The predictor and corrector are `update_rules.uni_p_update` and `uni_c_update`.

`step` therefore does, in order: convert the model output; correct the sample it was computed at
(UniC, skipped on the first step and for indices in `disable_corrector`); then predict the next sample
(UniP). Its order is min(solver_order, steps left when lower_order_final, number of outputs seen + 1).

Config fields (diffusers' names and defaults):
- num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr:
  the training schedule (`schedules.make_betas`; alpha_bar[-1] = 2^-24 when rescaled to zero SNR).
- solver_order: p of the predictor (2 for guided sampling, 3 for unconditional).
- prediction_type: "epsilon" | "v_prediction" | "sample".
- predict_x0: integrate the data prediction (True, "UniPC with DPM-Solver++") or the noise prediction.
- solver_type: "bh1" | "bh2", the B(h) above ("midpoint", "heun", "logrho" from a DPM-Solver or DEIS
  config are read as "bh2").
- lower_order_final: lower the order near the end (the last step is first order).
- disable_corrector: step indices whose sample is not corrected (the corrector can hurt with large
  guidance at the first steps).
- solver_p: another scheduler to use as the predictor instead of UniP (UniC then corrects its output).
- thresholding, dynamic_thresholding_ratio, sample_max_value: Imagen's dynamic thresholding of x0_pred.
- timestep_spacing, steps_offset: as DPM-Solver (`exponential_integrator.multistep_timesteps`: N + 1 points, the last dropped).
- use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas, sigma_min, sigma_max: a Karras, exponential
  or Beta(0.6, 0.6)-quantile sigma ramp (between sigma_min and sigma_max when set, else the training range).
- final_sigmas_type: "zero" or "sigma_min", the noise level after the last step.
- use_flow_sigmas, flow_shift, use_dynamic_shifting, time_shift_type, shift_terminal:
  accepted so configs read, but minidiff implements only the VP (SD 1.x) form: turning them on raises.
"""

from __future__ import annotations

import torch

from minidiff.configuration import register_to_config
from minidiff.schedulers.base import SchedulerMixin
from minidiff.schedulers.exponential_integrator import ExponentialIntegratorMixin
from minidiff.schedulers.parameterization import limit_x0, to_eps, to_x0
from minidiff.schedulers.update_rules import uni_c_update, uni_p_update, unipc_bh_coefficients, unipc_differences


class UniPCMultistepScheduler(ExponentialIntegratorMixin):
    """UniPC: UniC corrects the last sample with the new model output, then UniP predicts the next one."""

    solver_types = ("bh1", "bh2")
    default_solver_type = "bh2"
    max_solver_order = None  # any order p: the coefficients are solved for (§3.2)
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
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list[int] = [],  # noqa: B006  (diffusers' default, never mutated)
        solver_p: SchedulerMixin = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        shift_terminal: float | None = None,
    ):
        self._check_config(solver_type)
        if shift_terminal is not None:
            raise ValueError("shift_terminal is only used with use_flow_sigmas (flow-matching models); leave it None")
        self.predict_x0 = predict_x0
        self.disable_corrector = disable_corrector
        self.solver_p = solver_p
        self._init_solver(rescale_betas_zero_snr)

    def _reset_state(self) -> None:
        super()._reset_state()
        self.timestep_list = [None] * self.config.solver_order
        self.this_order = None
        self.last_sample = None

    # ----- the schedule -----

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Choose the N timesteps and their sigmas (N + 1 of them: the final one is 0 or sigma_min)."""
        if sigmas is not None:
            raise ValueError(
                "custom sigmas are only for flow-matching models (use_flow_sigmas), which minidiff does not "
                "implement; pass num_inference_steps only"
            )
        config = self.config
        timesteps = self._timesteps_to_visit(num_inference_steps, None, mu, config.timestep_spacing, config.steps_offset)
        self._set_schedule(timesteps, device, config.final_sigmas_type)
        if self.solver_p:
            self.solver_p.set_timesteps(self.num_inference_steps, device=device)

    # ----- one step -----

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """What UniPC integrates at the current step: x0_pred when predict_x0, else eps (not thresholded, as diffusers)."""
        alpha_t, sigma_t, _ = self._alpha_sigma_lambda(self.step_index, sample.device)
        if self.predict_x0:
            return limit_x0(to_x0(model_output, sample, alpha_t, sigma_t, self.config.prediction_type), self.config)
        return to_eps(model_output, sample, alpha_t, sigma_t, self.config.prediction_type)

    def _levels(self, index_t: int, index_s0: int, order: int, device):
        """VP pairs at the target and the current level, h, and r_k, D_k of the order - 1 previous outputs."""
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(index_t, device)
        alpha_s0, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(index_s0, device)
        h = lambda_t - lambda_s0
        previous_outputs = [self.model_outputs[-(k + 1)] for k in range(1, order)]  # m_s1, m_s2, ...
        previous_lambdas = [self._alpha_sigma_lambda(index_s0 - k, device)[2] for k in range(1, order)]
        rks, D1s = unipc_differences(self.model_outputs[-1], previous_outputs, previous_lambdas, lambda_s0, h)
        return (alpha_t, sigma_t, alpha_s0, sigma_s0), h, rks, D1s

    def multistep_uni_p_bh_update(self, model_output: torch.Tensor, sample: torch.Tensor, order: int) -> torch.Tensor:
        """UniP-p: predict x_t at the next noise level from the current sample and the last `order` outputs."""
        if self.solver_p:  # another scheduler predicts; it takes the raw model output
            return self.solver_p.step(model_output, self.timestep_list[-1], sample).prev_sample
        if self.sigmas[self.step_index + 1] == 0:  # final_sigmas_type "zero": lambda_t = inf, see `_step_to_sigma_zero`
            return self._step_to_sigma_zero(self.model_outputs[-1], sample)
        vp, h, rks, D1s = self._levels(self.step_index + 1, self.step_index, order, sample.device)
        h_phi_1, B_h, R, b = unipc_bh_coefficients(h, rks, order, self.predict_x0, self.config.solver_type)
        return uni_p_update(sample, self.model_outputs[-1], D1s, R, b, h_phi_1, B_h, *vp, order, self.predict_x0)

    def _step_to_sigma_zero(self, m0: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The step to sigma = 0 (h = inf) lands on the current x0_pred: the limit of UniP's first-order term.

        With predict_x0 and bh2 at order 1 (the defaults) diffusers' formula gives exactly this. Elsewhere
        it computes inf * 0 (B(h) = -inf for bh1, e^h - 1 = inf for eps, r_k = 0 at order >= 2) and returns
        NaN; minidiff returns the limit instead.
        """
        x0_pred = m0 if self.predict_x0 else self._x0_from_eps(m0, sample)
        return x0_pred.to(sample.dtype)

    def multistep_uni_c_bh_update(
        self, this_model_output: torch.Tensor, last_sample: torch.Tensor, this_sample: torch.Tensor, order: int
    ) -> torch.Tensor:
        """UniC-p: correct `this_sample` (predicted from `last_sample`) with the model output at it, m_t."""
        vp, h, rks, D1s = self._levels(self.step_index, self.step_index - 1, order, this_sample.device)
        h_phi_1, B_h, R, b = unipc_bh_coefficients(h, rks, order, self.predict_x0, self.config.solver_type)
        return uni_c_update(last_sample, self.model_outputs[-1], this_model_output, D1s, R, b, h_phi_1, B_h, *vp, order, self.predict_x0)

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ):
        """Correct the current sample with the new model output (UniC), then predict the next one (UniP).

        UniPC is deterministic: `generator` is accepted for a uniform scheduler API and not used.
        """
        self._begin_step(model_output, timestep, sample)

        m_t = self.convert_model_output(model_output, sample)  # x0_pred (predict_x0) or eps at this step
        x0_pred = m_t if self.predict_x0 else self._x0_from_eps(m_t, sample)
        use_corrector = self.step_index > 0 and self.step_index - 1 not in self.disable_corrector and self.last_sample is not None
        if use_corrector:
            sample = self.multistep_uni_c_bh_update(m_t, self.last_sample, sample, order=self.this_order)

        self.model_outputs = self.model_outputs[1:] + [m_t]  # ring buffers: [..., s2, s1, s0]
        self.timestep_list = self.timestep_list[1:] + [timestep]
        steps_left = len(self.timesteps) - self.step_index
        this_order = min(self.config.solver_order, steps_left) if self.config.lower_order_final else self.config.solver_order
        self.this_order = min(this_order, self.lower_order_nums + 1)  # warm-up: at most one more than seen
        self.last_sample = sample
        prev_sample = self.multistep_uni_p_bh_update(model_output, sample, order=self.this_order)

        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        self._step_index += 1
        return self._step_output(prev_sample, x0_pred, return_dict)

