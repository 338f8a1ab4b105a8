"""The base of the four exponential-integrator solvers: DPM-Solver multistep and singlestep, DEIS and UniPC.

All four solve the probability-flow ODE of the VP process, x_t = alpha_t x_0 + sigma_t eps, exactly in its linear
part and approximate only the model term (Lu et al. 2022, arXiv 2206.00927 §3; Zhang & Chen 2022, arXiv
2204.13902 §4; Zhao et al. 2023, arXiv 2302.04867 §3). They keep the schedule as VE noise levels
sigma = sigma_t / alpha_t (`scheduler.sigmas`) and turn each into the VP pair and the half log-SNR,

    alpha_t = 1 / sqrt(sigma^2 + 1),   sigma_t = sigma alpha_t,   lambda_t = log alpha_t - log sigma_t

(`parameterization.vp_from_sigma`). What they share, and this file holds once:
- the state of `__init__`: alpha_bar of training, alpha_t, sigma_t, lambda_t per training step, the buffer of
  past model outputs (`_init_solver`, `_reset_state`);
- the config checks (`_check_config`; each class adds its own algorithm and solver types);
- the schedule: N + 1 spaced points with the last dropped (`multistep_timesteps`), or custom timesteps; the
  sigmas at them or on a noise ramp; the final sigma after the last step (`_set_schedule`, `_final_sigma`);
- a timestep not in the schedule means the last step (`index_for_timestep`), add_noise in the VP frame, and
  `return_dict=False` giving diffusers' 1-tuple `(prev_sample,)`.
"""

from __future__ import annotations

import numpy as np
import torch

from minidiff.configuration import check_choice
from minidiff.schedulers.base import SchedulerMixin, check_decreasing, check_num_inference_steps
from minidiff.schedulers.parameterization import PREDICTION_TYPES, add_noise_vp, vp_from_sigma, x0_from_eps
from minidiff.schedulers.schedules import (
    check_no_ramp_for_custom_timesteps,
    chosen_noise_ramp,
    make_betas,
    ramp_sigmas,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
)

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
DPM_SOLVER_TYPES = ("midpoint", "heun")
# The solver types of the four classes: a config of one read by another gets that one's default type.
SOLVER_TYPES = ("midpoint", "heun", "logrho", "bh1", "bh2")
# "learned"/"learned_range": the model also outputs a variance (dropped). DDPM's fixed types (a DDPM config)
# mean it does not, as None does.
VARIANCE_TYPES = (None, "learned", "learned_range", "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")


def multistep_timesteps(
    spacing: str, num_inference_steps: int, num_train_timesteps: int, steps_offset: int = 0, last_timestep: int | None = None
) -> np.ndarray:
    """The N integer timesteps of the exponential integrators, from noisiest to cleanest.

    Unlike DDIM, N + 1 points are spaced and the last one (t = 0) is dropped, since the solver steps
    *to* the next noise level: linspace with 20 steps gives 999, 949, ..., 50 (docs/schedulers.md §2).
    leading:  the stride is last_timestep // (N + 1), then + steps_offset
    trailing: the stride is T / N, starting from last_timestep - 1
    `last_timestep` (default T) is lowered by `lambda_min_clipped`.
    """
    T, N = num_train_timesteps, num_inference_steps
    last_timestep = T if last_timestep is None else last_timestep
    if spacing == "trailing":
        timesteps = np.arange(last_timestep, 0, -T / N).round().astype(np.int64) - 1
        return timesteps[timesteps >= 0]  # no t = -1 from float round-off (see schedules.spaced_timesteps)
    points = spaced_timesteps(spacing, N + 1, last_timestep, steps_offset)  # (N + 1,), descending
    return points.round()[:-1].astype(np.int64)


def custom_timesteps(timesteps, num_train_timesteps: int, ramp: str | None) -> np.ndarray:
    """`set_timesteps(timesteps=[...])`: a strictly decreasing list of training timesteps instead of spaced ones,
    checked (a sigma ramp chooses its own timesteps, so it cannot be combined with a custom list)."""
    check_no_ramp_for_custom_timesteps(ramp)
    T = num_train_timesteps
    timesteps = np.array(timesteps).astype(np.int64)
    if timesteps.ndim != 1 or len(timesteps) == 0 or timesteps.min() < 0 or timesteps.max() >= T:
        raise ValueError(f"custom timesteps must be a non-empty list of training timesteps in [0, {T - 1}], got {timesteps}")
    check_decreasing("timesteps", timesteps)
    return timesteps


def check_vp_only(prediction_type: str, **flags) -> None:
    """Refuse the flow-matching options diffusers also has: minidiff implements SD 1.x's VP form."""
    if prediction_type == "flow_prediction":
        raise ValueError(
            "prediction_type 'flow_prediction' is for flow-matching models (SD3, Flux), which minidiff does not "
            f"implement; use one of {', '.join(map(repr, PREDICTION_TYPES))}"
        )
    for name, value in flags.items():
        if value:
            raise ValueError(
                f"{name}=True is not implemented in minidiff (it supports the VP noise schedule of SD 1.x); "
                "set it to False, and use use_karras_sigmas, use_exponential_sigmas or use_beta_sigmas for another sigma ramp"
            )


class ExponentialIntegratorMixin(SchedulerMixin):
    """What DPM-Solver (multistep, singlestep), DEIS and UniPC share; each subclass writes its own `step`."""

    order = 1
    _tuple_has_pred_original_sample = False  # diffusers' step returns (prev_sample,)
    solver_types: tuple[str, ...] = DPM_SOLVER_TYPES  # this class's own solver types
    default_solver_type = "midpoint"  # what another of the four classes' solver type is read as
    max_solver_order: int | None = 3  # None: any positive order (UniPC)
    # DEIS and UniPC end a sigma ramp on its own last sigma; DPM-Solver on the smallest training sigma (as diffusers)
    final_sigma_ends_ramp = False

    # ----- __init__ -----

    def _init_solver(self, rescale_betas_zero_snr: bool = False) -> None:
        """alpha_bar of training and, per training step, alpha_t, sigma_t, lambda_t; until `set_timesteps`, the
        schedule is every training timestep. Call after `_check_config`."""
        config = self.config
        T = config.num_train_timesteps
        self.betas = make_betas(config.beta_schedule, config.beta_start, config.beta_end, T, config.trained_betas,
                                rescale_betas_zero_snr)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24  # not 0, so the first sigma is finite
        self.alpha_t = self.alphas_cumprod.sqrt()
        self.sigma_t = (1 - self.alphas_cumprod).sqrt()
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)  # (T,) half log-SNR per training step
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5  # replaced by set_timesteps
        self.init_noise_sigma = 1.0  # the VP form: x_T ~ N(0, I)
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.linspace(0, T - 1, T, dtype=np.float32)[::-1].copy())
        self._reset_state()

    def _reset_state(self) -> None:
        """Forget the past model outputs and the step index (a new loop starts)."""
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def _check_config(self, solver_type: str) -> None:
        """The checks all four share (the fields a class has); a solver type of another of the four is read as
        this class's default. Subclasses check their algorithm types after this."""
        config = self.config
        check_vp_only(config.prediction_type, use_flow_sigmas=config.get("use_flow_sigmas"),
                      use_dynamic_shifting=config.get("use_dynamic_shifting"))
        self._check_common_config()
        for field, allowed in (("final_sigmas_type", FINAL_SIGMAS_TYPES), ("variance_type", VARIANCE_TYPES)):
            if field in config:
                check_choice(field, config[field], allowed)
        order, max_order = config.solver_order, self.max_solver_order
        if max_order is not None:
            check_choice("solver_order", order, tuple(range(1, max_order + 1)))
        elif not isinstance(order, int) or isinstance(order, bool) or order < 1:
            raise ValueError(f"solver_order must be a positive integer (2 for guided sampling), got {order!r}")
        if solver_type in SOLVER_TYPES and solver_type not in self.solver_types:  # another solver's config
            self.register_to_config(solver_type=self.default_solver_type)
        check_choice("solver_type", self.config.solver_type, self.solver_types)

    # ----- the schedule -----

    def _timesteps_to_visit(self, num_inference_steps, timesteps=None, mu=None, spacing: str = "linspace",
                            steps_offset: int = 0, lambda_min_clipped: float = -float("inf")) -> np.ndarray:
        """The N integer timesteps: custom `timesteps`, or N spaced ones (`multistep_timesteps`) above the
        largest t whose lambda_t is still >= lambda_min_clipped (critical for the cosine schedule)."""
        if mu is not None:
            raise ValueError("mu (dynamic shifting) is for flow-matching models, which minidiff does not implement; leave it None")
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps to set_timesteps")
        if timesteps is not None:
            return custom_timesteps(timesteps, self.config.num_train_timesteps, self._noise_ramp())
        T = self.config.num_train_timesteps
        check_num_inference_steps(num_inference_steps, T)
        clipped = torch.searchsorted(torch.flip(self.lambda_t, [0]), lambda_min_clipped).item()
        return multistep_timesteps(spacing, num_inference_steps, T, steps_offset, T - clipped)

    def _noise_ramp(self) -> str | None:
        """The sigma ramp that replaces the spaced sigmas (`schedules.chosen_noise_ramp`)."""
        return chosen_noise_ramp(self.config)

    def _rounds_ramp_timesteps(self, ramp: str | None) -> bool:
        """Whether the ramp's fractional timesteps are rounded (Karras, as diffusers); others are truncated."""
        return ramp == "karras"

    def _set_schedule(self, timesteps: np.ndarray, device, final_sigmas_type: str) -> None:
        """`scheduler.timesteps` (N,) int64 and `scheduler.sigmas` (N + 1,) float32 from the N timesteps to visit:
        sigma interpolated at each, or a ramp of N sigmas between the largest and the smallest training sigma (or
        the config's sigma_max / sigma_min) and the timesteps those sit at; then the final sigma. Resets the state."""
        N = len(timesteps)
        train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)  # (T,) float32, ascending in t
        log_sigmas = np.log(train_sigmas)
        ramp = self._noise_ramp()
        if ramp is None:
            sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        elif ramp == "lu":  # uniform steps in lambda = -log(sigma): a linear ramp in log sigma, written as diffusers
            # writes it (a float32 ulp in sigma matters when x0 = (x - sigma_t eps) / alpha_t)
            log_sigma_min, log_sigma_max = log_sigmas[0].item(), log_sigmas[-1].item()
            sigmas = np.exp(log_sigma_max + np.linspace(0, 1, N) * (log_sigma_min - log_sigma_max))
        else:
            sigmas = ramp_sigmas(ramp, train_sigmas[0].item(), train_sigmas[-1].item(), N, self.config)
        if ramp is not None:
            timesteps = sigma_to_t(sigmas, log_sigmas)
            if self._rounds_ramp_timesteps(ramp):
                timesteps = timesteps.round()  # the others keep fractional t, cast (truncated) to int below
        sigma_last = self._final_sigma(sigmas, ramp, final_sigmas_type)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [sigma_last]]).astype(np.float32))  # (N + 1,)
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)  # (N,)
        self.num_inference_steps = N
        self._reset_state()

    def _final_sigma(self, sigmas: np.ndarray, ramp: str | None, final_sigmas_type: str) -> float:
        """The noise level after the last step: 0 ("zero": the last step lands on x0_pred), else sigma_min, the
        smallest training sigma, or, for DEIS and UniPC with a ramp, the ramp's own last sigma (a zero-length step)."""
        if final_sigmas_type == "zero":
            return 0.0
        if ramp is not None and self.final_sigma_ends_ramp:
            return sigmas[-1]
        return (((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5).item()

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Identity: the VP-form model takes x_t as it is."""
        return sample

    # ----- the step index: as the base class, but a timestep not in the schedule means the last step -----

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        if not (schedule == timestep).any():
            return len(self.timesteps) - 1
        return super().index_for_timestep(timestep, schedule)

    def _begin_step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> None:
        """The checks and the step index every solver's `step` starts with."""
        learned_variance = self.config.get("variance_type") in ("learned", "learned_range")  # (B, 2C, ...) outputs
        self._check_step_inputs(model_output, sample, learned_variance)
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.step_index >= len(self.timesteps):
            raise ValueError(
                f"{type(self).__name__}.step was called after the last of its {len(self.timesteps)} timesteps. "
                "Call set_timesteps again to start a new loop. (If the first timestep occurs twice in `timesteps`, "
                "the loop starts at its second occurrence and ends one step early, as in diffusers.)"
            )

    def _alpha_sigma_lambda(self, index: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """alpha_t, sigma_t, lambda_t of `sigmas[index]`."""
        sigma = self.sigmas[index]
        return vp_from_sigma(sigma if device is None else sigma.to(device))

    def _x0_from_eps(self, eps: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """x0_pred = (x_t - sigma_t eps) / alpha_t at the current step (DDPM eq. 15), for `pred_original_sample`."""
        alpha_t, sigma_t, _ = self._alpha_sigma_lambda(self.step_index, sample.device)
        return x0_from_eps(eps, sample, alpha_t, sigma_t)

    # ----- the forward process -----

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x_0 + sigma_t eps at the schedule's sigma for each timestep (img2img's first latent)."""
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        step_indices = self._add_noise_step_indices(timesteps.to(original_samples.device), self.timesteps.to(original_samples.device))
        sigma = sigmas[step_indices].flatten().reshape(-1, *[1] * (original_samples.ndim - 1))  # (B, 1, 1, 1)
        alpha_t, sigma_t, _ = vp_from_sigma(sigma)
        return add_noise_vp(original_samples, noise, alpha_t, sigma_t)
