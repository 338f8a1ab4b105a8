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
  alpha_bar (`base.make_betas`).
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
  (`multistep_timesteps`).
- use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas / use_lu_lambdas: replace the spaced sigmas
  by a Karras ramp (rho = 7), an exponential ramp, Beta(0.6, 0.6) quantiles (`base.beta_sigmas`), or steps
  uniform in lambda (Lu et al.); the timesteps then come from those sigmas (`base.sigma_to_t`).
- lambda_min_clipped: timesteps whose lambda is below this are never visited (for the cosine schedule).
- variance_type: "learned" / "learned_range" for models that also output a variance: only the first
  half of the channels (the mean) is used. DDPM's other types (a DDPM config) change nothing, as None.
- use_flow_sigmas, flow_shift, use_dynamic_shifting, time_shift_type: accepted so
  configs read, but minidiff implements only the VP (SD 1.x) form: turning them on raises ValueError.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from minidiff.configuration import register_to_config
from minidiff.schedulers.base import (
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    SchedulerMixin,
    SchedulerOutput,
    beta_sigmas,
    check_choice,
    check_num_inference_steps,
    exponential_sigmas,
    karras_sigmas,
    make_betas,
    randn_tensor,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
)
from minidiff.schedulers.parameterization import (
    add_noise_vp,
    eps_from_x0,
    limit_x0,
    to_eps,
    to_x0,
    vp_from_sigma,
    x0_from_eps,
)
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

ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")
DPM_SOLVER_TYPES = ("midpoint", "heun")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
# "learned"/"learned_range": the model also outputs a variance (dropped). DDPM's fixed types (a DDPM config)
# mean it does not, as None does.
VARIANCE_TYPES = (None, "learned", "learned_range", "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")


# ----- shared by the multistep solvers (DPM-Solver, UniPC) ----------------------------------------


def multistep_timesteps(
    spacing: str, num_inference_steps: int, num_train_timesteps: int, steps_offset: int = 0, last_timestep: int | None = None
) -> np.ndarray:
    """The N integer timesteps of DPM-Solver and UniPC, from noisiest to cleanest.

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
        return timesteps[timesteps >= 0]  # no t = -1 from float round-off (see base.spaced_timesteps)
    points = spaced_timesteps(spacing, N + 1, last_timestep, steps_offset)  # (N + 1,), descending
    return points.round()[:-1].astype(np.int64)


def schedule_sigmas(scheduler, timesteps: np.ndarray, num_inference_steps: int, ramp: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas, timesteps) of a multistep solver, before the final sigma is appended.

    ramp None: sigma interpolated at each spaced timestep. "karras" / "exponential" / "beta" / "lu": a ramp of
    N sigmas from the largest to the smallest training sigma (or the config's sigma_max / sigma_min
    when set), and the (fractional) timesteps those sigmas correspond to.
    """
    train_sigmas = sigmas_from_alphas_cumprod(scheduler.alphas_cumprod)  # (T,) float32, ascending in t
    if ramp is None:
        return np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas), timesteps
    log_sigmas = np.log(train_sigmas)
    sigma_min, sigma_max = train_sigmas[0].item(), train_sigmas[-1].item()
    if ramp != "lu":  # a config carrying sigma_min / sigma_max (UniPC's, or hidden keys of Euler's) bounds the ramp
        config_min, config_max = scheduler.config.get("sigma_min"), scheduler.config.get("sigma_max")
        sigma_min = config_min if config_min is not None else sigma_min
        sigma_max = config_max if config_max is not None else sigma_max
    if ramp == "karras":
        sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps)
    elif ramp == "exponential":
        sigmas = exponential_sigmas(sigma_min, sigma_max, num_inference_steps)
    elif ramp == "beta":
        sigmas = beta_sigmas(sigma_min, sigma_max, num_inference_steps)
    else:  # "lu": uniform steps in lambda. Here lambda = -log(sigma), so log sigma is a linear ramp (as exponential,
        # but written as diffusers writes it: a float32 ulp in sigma matters when x0 = (x - sigma_t eps) / alpha_t)
        log_sigma_min, log_sigma_max = log_sigmas[0].item(), log_sigmas[-1].item()
        ramp_01 = np.linspace(0, 1, num_inference_steps)
        sigmas = np.exp(log_sigma_max + ramp_01 * (log_sigma_min - log_sigma_max))
    return sigmas, sigma_to_t(sigmas, log_sigmas)


def custom_timesteps(timesteps, config) -> np.ndarray:
    """`set_timesteps(timesteps=[...])`: a descending list of training timesteps instead of spaced ones,
    checked (a sigma ramp chooses its own timesteps, so it cannot be combined with a custom list)."""
    for flag in ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas"):
        if config.get(flag):
            raise ValueError(f"custom timesteps cannot be used with {flag}=True: the sigma ramp chooses the timesteps")
    T = config.num_train_timesteps
    timesteps = np.array(timesteps).astype(np.int64)
    if timesteps.ndim != 1 or len(timesteps) == 0 or timesteps.min() < 0 or timesteps.max() >= T:
        raise ValueError(f"custom timesteps must be a non-empty list of training timesteps in [0, {T - 1}], got {timesteps}")
    return timesteps


def index_or_last(scheduler, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
    """`index_for_timestep` of the DPM-Solver family: a timestep not in the schedule means the last step (as diffusers)."""
    schedule = scheduler.timesteps if schedule_timesteps is None else schedule_timesteps
    if not (schedule == timestep).any():
        return len(scheduler.timesteps) - 1
    return SchedulerMixin.index_for_timestep(scheduler, timestep, schedule)


def noise_step_indices(scheduler, timesteps: torch.Tensor) -> list[int]:
    """Which entry of `scheduler.sigmas` `add_noise` uses for each timestep (as diffusers does).

    img2img calls `set_begin_index` first: then it is begin_index (or step_index, once stepping, for
    inpainting); otherwise each timestep is looked up in the schedule.
    """
    if scheduler.begin_index is None:
        schedule = scheduler.timesteps.to(timesteps.device)
        return [scheduler.index_for_timestep(t, schedule) for t in timesteps]
    index = scheduler.step_index if scheduler.step_index is not None else scheduler.begin_index
    return [index] * timesteps.shape[0]


def add_noise_at_sigmas(scheduler, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """x_t = alpha_t x_0 + sigma_t eps, with the VP pair of the schedule's sigma at each timestep."""
    sigmas = scheduler.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
    sigma = sigmas[noise_step_indices(scheduler, timesteps.to(original_samples.device))].flatten()  # (B,)
    sigma = sigma.reshape(-1, *[1] * (original_samples.ndim - 1))  # (B, 1, 1, 1)
    alpha_t, sigma_t, _ = vp_from_sigma(sigma)
    return add_noise_vp(original_samples, noise, alpha_t, sigma_t)


def check_steps_left(scheduler) -> None:
    """A clear error instead of an IndexError when `step` is called past the last timestep."""
    if scheduler.step_index >= len(scheduler.timesteps):
        raise ValueError(
            f"{type(scheduler).__name__}.step was called after the last of its {len(scheduler.timesteps)} timesteps. "
            "Call set_timesteps again to start a new loop. (If the first timestep occurs twice in `timesteps`, "
            "the loop starts at its second occurrence and ends one step early, as in diffusers.)"
        )


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


# ----- the scheduler --------------------------------------------------------------------------------


class DPMSolverMultistepScheduler(SchedulerMixin):
    """DPM-Solver(++) multistep: an exponential integrator in lambda, of order 1-3, reusing past model outputs."""

    order = 1

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
        self.betas = make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas, rescale_betas_zero_snr)
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
        self.timesteps = torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy())
        self.model_outputs = [None] * solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def _check_config(self, algorithm_type: str, solver_type: str) -> None:
        config = self.config
        check_vp_only(config.prediction_type, use_flow_sigmas=config.use_flow_sigmas, use_dynamic_shifting=config.use_dynamic_shifting)
        if config.use_exponential_sigmas + config.use_karras_sigmas + config.use_beta_sigmas > 1:
            raise ValueError("use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas: set at most one; choose one sigma ramp")
        check_choice("prediction_type", config.prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", config.timestep_spacing, TIMESTEP_SPACINGS)
        check_choice("final_sigmas_type", config.final_sigmas_type, FINAL_SIGMAS_TYPES)
        check_choice("variance_type", config.variance_type, VARIANCE_TYPES)
        check_choice("solver_order", config.solver_order, (1, 2, 3))
        if algorithm_type == "deis":  # a DEIS config: its algorithm is DPM-Solver++'s
            self.register_to_config(algorithm_type="dpmsolver++")
        check_choice("algorithm_type", self.config.algorithm_type, ALGORITHM_TYPES)
        if solver_type in ("logrho", "bh1", "bh2"):  # a DEIS or UniPC config
            self.register_to_config(solver_type="midpoint")
        check_choice("solver_type", self.config.solver_type, DPM_SOLVER_TYPES)
        if algorithm_type in ("dpmsolver", "sde-dpmsolver"):
            warnings.warn(
                f"algorithm_type {algorithm_type!r} is deprecated (as in diffusers); use 'dpmsolver++' or 'sde-dpmsolver++'",
                FutureWarning,
                stacklevel=3,
            )
        if algorithm_type not in ("dpmsolver++", "sde-dpmsolver++") and config.final_sigmas_type == "zero":
            raise ValueError(  # as diffusers, checked on the type as given (so "deis" too)
                f"final_sigmas_type 'zero' is not supported with algorithm_type {algorithm_type!r}: the noise-prediction "
                "update cannot step to sigma = 0. Pass final_sigmas_type='sigma_min'"
            )
        if algorithm_type == "sde-dpmsolver" and config.solver_order == 3:
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
        timesteps = self._spaced_timesteps(num_inference_steps, mu, timesteps)
        config = self.config
        ramp = self._sigma_ramp()
        sigmas, timesteps = schedule_sigmas(self, timesteps, len(timesteps), ramp)
        if ramp in ("karras", "lu") and config.beta_schedule != "squaredcos_cap_v2":
            timesteps = timesteps.round()  # exponential and cosine keep fractional t, cast (truncated) to int below

        if config.final_sigmas_type == "sigma_min":
            sigma_last = (((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5).item()
        else:
            sigma_last = 0.0
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [sigma_last]]).astype(np.float32))  # (N + 1,)
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)  # (N,)
        self.num_inference_steps = len(timesteps)
        self.model_outputs = [None] * config.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def _sigma_ramp(self) -> str | None:
        """The sigma ramp that replaces the spaced sigmas, in diffusers' precedence: Karras, Lu, exponential, beta."""
        if self.config.use_karras_sigmas:
            return "karras"
        if self.config.use_lu_lambdas:
            return "lu"
        if self.config.use_exponential_sigmas:
            return "exponential"
        return "beta" if self.config.use_beta_sigmas else None

    def _spaced_timesteps(self, num_inference_steps, mu, timesteps) -> np.ndarray:
        config = self.config
        T = config.num_train_timesteps
        if mu is not None:
            raise ValueError("mu (dynamic shifting) is for flow-matching models, which minidiff does not implement; leave it None")
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps to set_timesteps")
        if timesteps is not None:
            return custom_timesteps(timesteps, config)
        check_num_inference_steps(num_inference_steps, T)
        # lambda_min_clipped: the largest t whose lambda_t is still >= the clip (critical for the cosine schedule)
        clipped = torch.searchsorted(torch.flip(self.lambda_t, [0]), config.lambda_min_clipped).item()
        return multistep_timesteps(config.timestep_spacing, num_inference_steps, T, config.steps_offset, T - clipped)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity: the VP-form model takes x_t as it is."""
        return sample

    # ----- the step index: as the base class, but a timestep not in the schedule means the last step -----

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        return index_or_last(self, timestep, schedule_timesteps)

    # ----- one step -----

    def _alpha_sigma_lambda(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return vp_from_sigma(self.sigmas[index])

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
    ) -> SchedulerOutput | tuple:
        """One solver step from the current noise level to the next.

        `variance_noise` (SDE variants only) replaces the noise drawn from `generator`.
        """
        self._check_timesteps_set()
        if self.step_index is None:
            self._init_step_index(timestep)
        check_steps_left(self)
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
        output = SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0_pred)
        return output if return_dict else (prev_sample,)  # diffusers' tuple; pred_original_sample is a minidiff extra

    def _x0_from_eps(self, eps: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        alpha_t, sigma_t, _ = self._alpha_sigma_lambda(self.step_index)
        return x0_from_eps(eps, sample, alpha_t, sigma_t)

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

    # ----- the forward process -----

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x_0 + sigma_t eps at the schedule's sigma for each timestep (img2img's first latent)."""
        return add_noise_at_sigmas(self, original_samples, noise, timesteps)
