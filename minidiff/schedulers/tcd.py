"""TCD: Trajectory Consistency Distillation (Zheng, Yang, Zhao, Wang, Chen & Zhang 2024, arXiv 2402.19159).

TCD distils a model that predicts the ODE solution from x_t not only to x_0 (as LCM's consistency function does)
but to any earlier time s along the trajectory ("trajectory consistency function"). Its sampler, "strategic
stochastic sampling" (SSS, Algorithm 4 of the paper), uses that: from t it jumps deterministically along the ODE
to an intermediate time s, then adds forward noise from s back up to the next timestep t_prev. A knob gamma in
[0, 1] (diffusers: `eta` of `step`, default 0.3) says how far below t_prev the jump goes:

    for n = 1 .. N:                                            t = tau_n, t_prev = tau_{n+1} (0 after the last)
        s = floor((1 - gamma) t_prev)
        x0_pred = the model's x_0 at (x_t, t);   eps = the model's noise at (x_t, t)
        x_s = sqrt(alpha_bar_s) x0_pred + sqrt(1 - alpha_bar_s) eps                  deterministic jump t -> s (DDIM, eq. 12)
        if gamma > 0 and n < N:
            z ~ N(0, I)
            x_t_prev = sqrt(alpha_bar_t_prev / alpha_bar_s) x_s + sqrt(1 - alpha_bar_t_prev / alpha_bar_s) z     forward s -> t_prev
        else:
            x_t_prev = x_s

gamma = 0 makes it DDIM on the distilled model (no fresh noise); gamma = 1 puts s = 0, so each step is LCM's
"predict x_0, re-noise to t_prev" (LCM's boundary scalings aside, which TCD does not apply). In between, part of
x_t's information survives each step: the paper's answer to LCM's loss of detail as steps are added.
`step` returns x_t_prev (`prev_sample`) and x_s (`pred_noised_sample`).

The timesteps are LCM's (`lcm.py`): N of the `original_inference_steps` = 50 distillation timesteps. One difference
kept from diffusers: passing `original_inference_steps=` to `set_timesteps` spreads the N steps over all T training
timesteps 0..T-1 instead (TCD's "any number of steps" mode), still bounded by N <= original_inference_steps.
Config fields are LCM's; TCD does not clip or threshold x0_pred, and timestep_scaling is stored but unused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from minidiff.schedulers.base import integer_timestep
from minidiff.schedulers.lcm import LCMScheduler
from minidiff.schedulers.parameterization import to_eps, to_x0, vp_from_alpha_bar
from minidiff.schedulers.update_rules import tcd_step
from minidiff.utils.outputs import BaseOutput
from minidiff.utils.torch_utils import randn_tensor


@dataclass
class TCDSchedulerOutput(BaseOutput):
    """What `TCDScheduler.step` returns: the next x (`prev_sample`) and the deterministic jump's x_s (`pred_noised_sample`)."""

    prev_sample: torch.Tensor
    pred_noised_sample: torch.Tensor | None = None


class TCDScheduler(LCMScheduler):
    """Strategic stochastic sampling (Zheng et al. 2024, Algorithm 4): jump along the ODE to s, then noise up to t_prev."""

    order = 1
    _compatibles: list[str] = []

    def _origin_timesteps(self, original_inference_steps: int | None, strength: float) -> tuple[np.ndarray, int]:
        if original_inference_steps is None:  # the distillation schedule, as LCM
            return super()._origin_timesteps(None, strength)
        if original_inference_steps < 1:
            raise ValueError(f"original_inference_steps must be at least 1, got {original_inference_steps}")
        T = self.config.num_train_timesteps
        return np.arange(0, int(T * strength)), original_inference_steps

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        eta: float = 0.3,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> TCDSchedulerOutput | tuple:
        """One step of Algorithm 4 with gamma = `eta` (0: deterministic; 1: LCM-like re-noise to t_prev)."""
        self._check_step_inputs(model_output, sample)
        if not 0 <= eta <= 1:
            raise ValueError(f"TCDScheduler.step: eta (the paper's gamma) must be in [0, 1], got {eta}")
        t = integer_timestep(timestep, type(self).__name__)
        if self.step_index is None:
            self._init_step_index(timestep)
        t_prev = self._next_timestep(past_the_end=0)
        # s = floor((1 - gamma) t_prev), computed in float32 as diffusers does, so s lands on the same integer
        s = int(torch.floor((1 - eta) * torch.tensor(t_prev)))

        alpha_t, sigma_t = vp_from_alpha_bar(self.alphas_cumprod[t])
        prediction_type = self.config.prediction_type
        x0_pred = to_x0(model_output, sample, alpha_t, sigma_t, prediction_type)
        eps = to_eps(model_output, sample, alpha_t, sigma_t, prediction_type)

        noise = None
        if eta > 0 and not self._is_last_step():
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=x0_pred.dtype)
        prev_sample, pred_noised_sample = tcd_step(x0_pred, eps, self.alphas_cumprod[s], self._alpha_bar(t_prev), noise)
        self._step_index += 1

        if not return_dict:
            return (prev_sample, pred_noised_sample)
        return TCDSchedulerOutput(prev_sample=prev_sample, pred_noised_sample=pred_noised_sample)

