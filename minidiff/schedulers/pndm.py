"""PNDM: Pseudo Numerical Methods for Diffusion Models on Manifolds (Liu, Ren, Lin & Zhao 2022, arXiv 2202.09778).

PNDM splits a sampling step into a *transfer* part, which moves x along the data manifold from t to
prev = t - delta given a noise estimate e, and a *gradient* part, which chooses that e from several
model outputs with a classical ODE method. The transfer part is formula (9) of the paper:

    phi(x_t, e, t, prev) = sqrt(alpha_bar_prev / alpha_bar_t) x_t
                         - (alpha_bar_prev - alpha_bar_t) e
                           / ( sqrt(alpha_bar_t) ( sqrt((1 - alpha_bar_prev) alpha_bar_t) + sqrt((1 - alpha_bar_t) alpha_bar_prev) ) )

(with a single e = eps_theta(x_t, t) this is exactly a DDIM step with eta = 0). The gradient part:

- PLMS, pseudo linear multi-step (`step_plms`), one model call per step, with e_i the model
  outputs at the previous steps, newest first (Adams-Bashforth of order 1..4):
      e' = e_0                                              (first step)
      e' = (3 e_0 - e_1) / 2
      e' = (23 e_0 - 16 e_1 + 5 e_2) / 12
      e' = (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24
      x_prev = phi(x_t, e', t, prev)
- PRK, pseudo Runge-Kutta (`step_prk`), four model calls per step (classical RK4 on the manifold),
  used for the first three steps so PLMS has three past outputs to start from:
      e_1 = eps(x_t, t)                     x_mid  = phi(x_t, e_1, t, t - delta/2)
      e_2 = eps(x_mid, t - delta/2)         x_mid' = phi(x_t, e_2, t, t - delta/2)
      e_3 = eps(x_mid', t - delta/2)        x_end  = phi(x_t, e_3, t, t - delta)
      e_4 = eps(x_end, t - delta)           e' = (e_1 + 2 e_2 + 2 e_3 + e_4) / 6,   x_prev = phi(x_t, e', t, t - delta)

With `skip_prk_steps=True` (Stable Diffusion's setting) there are no PRK steps. PLMS then warms up
with a second-order step that costs one extra model call: Euler to prev with e_0, evaluate the model
there, and redo the step from x_t with (e_0 + e_prev) / 2. So N steps take N+1 model calls and
`timesteps` repeats its second entry (SD 1.5, 50 steps: 981, 961, 961, 941, ..., 1).

Formula (9) is `update_rules.pndm_transfer` and the PLMS combination `update_rules.plms_eps`; the class
keeps the PRK/PLMS state machine (which call is which stage, the stored outputs).

Config fields (diffusers' names and defaults):
- num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the training noise
  schedule alpha_bar_t (see `schedules.make_betas`).
- skip_prk_steps: PLMS only (True), or three PRK steps then PLMS as in the paper (False).
- set_alpha_to_one: alpha_bar_prev once prev < 0: 1 when true, alpha_bar_0 when false (SD 1.5: false).
- prediction_type: "epsilon", or "v_prediction" (turned into eps = sqrt(alpha_bar) v + sqrt(1 - alpha_bar) x_t).
- timestep_spacing, steps_offset: which N timesteps to visit (`schedules.spaced_timesteps`). Steps use the
  fixed stride delta = T // N whatever the spacing, as diffusers does.
"""

from __future__ import annotations

import numpy as np
import torch

from minidiff.configuration import register_to_config
from minidiff.schedulers.base import SchedulerMixin, check_num_inference_steps, integer_timestep
from minidiff.schedulers.schedules import make_betas, spaced_timesteps
from minidiff.schedulers.parameterization import to_eps, vp_from_alpha_bar, x0_from_eps
from minidiff.schedulers.update_rules import plms_eps, pndm_transfer

PNDM_PREDICTION_TYPES = ("epsilon", "v_prediction")


class PNDMScheduler(SchedulerMixin):
    """PNDM (Liu et al. 2022): formula (9) as the step, with linear multi-step (PLMS) or Runge-Kutta (PRK) noise estimates."""

    order = 1
    _tuple_has_pred_original_sample = False  # diffusers' step returns (prev_sample,)
    _prediction_types = PNDM_PREDICTION_TYPES
    pndm_order = 4  # PRK evaluations per step, and the highest PLMS order

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        skip_prk_steps: bool = False,
        set_alpha_to_one: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
    ):
        self._check_common_config()
        self.betas = make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # alpha_bar_t, t = 0..T-1
        # alpha_bar_prev once prev < 0
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0  # x_T ~ N(0, I)

        self.num_inference_steps = None
        self.prk_timesteps = None
        self.plms_timesteps = None
        self.timesteps = None
        self._reset_history()

    def _reset_history(self) -> None:
        self.ets = []  # past model outputs e, oldest first (PLMS keeps the last four)
        self.counter = 0  # model calls seen since set_timesteps
        self.cur_sample = None  # x_t of the step in progress (PRK, and the PLMS warm-up)
        self.cur_model_output = 0  # the running RK4 sum (e_1 + 2 e_2 + 2 e_3) / 6

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose the timesteps at which the model is called: PRK's then PLMS's, noisiest first (int64)."""
        T = self.config.num_train_timesteps
        check_num_inference_steps(num_inference_steps, T)
        if not self.config.skip_prk_steps and num_inference_steps < 4:
            raise ValueError(
                f"PNDM with skip_prk_steps=False runs 3 Runge-Kutta steps then PLMS, so it needs "
                f"num_inference_steps >= 4, got {num_inference_steps}; use more steps or skip_prk_steps=True"
            )
        self.num_inference_steps = num_inference_steps
        steps = spaced_timesteps(self.config.timestep_spacing, num_inference_steps, T, self.config.steps_offset)
        steps = steps.round().astype(np.int64)  # N timesteps, noisiest first

        if self.config.skip_prk_steps:
            self.prk_timesteps = np.array([], dtype=np.int64)
            # the warm-up calls the model twice at steps[1]: 981, 961, 961, 941, ..., 1
            self.plms_timesteps = np.concatenate([steps[:1], steps[1:2], steps[1:]])
        else:
            # each RK4 step from t to t_next calls the model at t, mid, mid, t_next, with mid = t_next + delta/2
            half_delta = T // num_inference_steps // 2
            self.prk_timesteps = np.concatenate(
                [[t, t_next + half_delta, t_next + half_delta, t_next] for t, t_next in zip(steps[:3], steps[1:4])]
            ).astype(np.int64)
            self.plms_timesteps = steps[3:]
        self.timesteps = torch.from_numpy(np.concatenate([self.prk_timesteps, self.plms_timesteps])).to(device)
        self._reset_history()

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """PNDM feeds x_t to the model as it is."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
    ):
        """Take the next model call's output: a PRK stage while PRK timesteps remain, else a PLMS step.

        PNDM is deterministic: `generator` is accepted for a uniform scheduler API and not used."""
        self._check_step_inputs(model_output, sample)  # (before reading prk_timesteps, None until set_timesteps)
        if not self.config.skip_prk_steps and self.counter < len(self.prk_timesteps):
            return self.step_prk(model_output, timestep, sample, return_dict)
        return self.step_plms(model_output, timestep, sample, return_dict)

    def step_prk(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One of the four stages of a pseudo Runge-Kutta step (see the module docstring).

        Stage k = counter % 4 gets e_{k+1} at `timestep`; every stage restarts formula (9) from the
        step's starting x_t, so only the target timestep and the noise estimate change.
        """
        self._check_step_inputs(model_output, sample)
        stage = self.counter % 4
        half_delta = self.config.num_train_timesteps // self.num_inference_steps // 2
        t_call = integer_timestep(timestep, "PNDMScheduler")
        prev_t = t_call - half_delta if stage in (0, 2) else t_call  # stages 0, 2 go half a step past the call
        t = int(self.prk_timesteps[self.counter // 4 * 4])  # where this RK4 step started

        if stage == 0:
            self.cur_model_output += 1 / 6 * model_output  # e_1 / 6
            self.ets.append(model_output)  # PLMS later uses e_1 of each PRK step
            self.cur_sample = sample
        elif stage in (1, 2):
            self.cur_model_output += 1 / 3 * model_output  # 2 e_2 / 6, then 2 e_3 / 6
        else:
            model_output = self.cur_model_output + 1 / 6 * model_output  # e' = (e_1 + 2 e_2 + 2 e_3 + e_4) / 6
            self.cur_model_output = 0

        prev_sample, x0_pred = self._get_prev_sample(self.cur_sample, t, prev_t, model_output)
        self.counter += 1
        return self._step_output(prev_sample, x0_pred, return_dict)

    def step_plms(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """A pseudo linear multi-step (Adams-Bashforth) step; see the module docstring."""
        self._check_step_inputs(model_output, sample)
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError(
                "PNDMScheduler.step_plms needs the 3 model outputs left by the Runge-Kutta steps, but has "
                f"{len(self.ets)}: with skip_prk_steps=False, call `step` (or `step_prk` for the first "
                f"{len(self.prk_timesteps)} model calls) before `step_plms`"
            )
        delta = self.config.num_train_timesteps // self.num_inference_steps
        t = integer_timestep(timestep, "PNDMScheduler")
        prev_t = t - delta

        if self.counter == 1:  # warm-up, second call: the model was evaluated at prev; redo the step from x_t
            t, prev_t = t + delta, t
        else:
            self.ets = self.ets[-3:] + [model_output]

        if len(self.ets) == 1 and self.counter == 0:  # warm-up, first call: an Euler step with e_0
            e = model_output
            self.cur_sample = sample
        elif len(self.ets) == 1 and self.counter == 1:  # warm-up, second call: trapezoid (e_0 + e_prev) / 2
            e = (model_output + self.ets[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        else:  # Adams-Bashforth of order len(ets) (PNDM eq. 12)
            e = plms_eps(self.ets)

        prev_sample, x0_pred = self._get_prev_sample(sample, t, prev_t, e)
        self.counter += 1
        return self._step_output(prev_sample, x0_pred, return_dict)

    def _get_prev_sample(self, sample: torch.Tensor, t: int, prev_t: int, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The transfer part phi(x_t, e, t, prev), formula (9); also the x0 this e implies (DDPM eq. 15),
        which diffusers' PNDM does not return."""
        alpha_bar_t = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        alpha_t, sigma_t = vp_from_alpha_bar(alpha_bar_t)
        eps = to_eps(e, sample, alpha_t, sigma_t, self.config.prediction_type)
        return pndm_transfer(sample, eps, alpha_bar_t, alpha_bar_prev), x0_from_eps(eps, sample, alpha_t, sigma_t)

