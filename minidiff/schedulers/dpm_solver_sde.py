"""DPM-Solver++ SDE ("DPM++ SDE"): a two-stage DPM-Solver++ step in log-sigma, each stage ancestral,
with its noise taken from one Brownian path.

Papers: Lu, Zhou, Bao, Chen, Li, Zhu 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", arXiv 2211.01095, Algorithm 1 (DPM-Solver++(2S), the singlestep second-order
solver in data prediction), with r_1 = 1/2; made stochastic as in Katherine Crowson's k-diffusion
`sample_dpmpp_sde` (eta = 1, r = 1/2), which diffusers' DPMSolverSDEScheduler follows: each of the two
stages is an ancestral step (the deterministic part goes down to sigma_down, fresh noise of std
sigma_up brings it back up to the target), and the noise is the increment of a Brownian path in sigma
(`brownian.py`, Kidger et al. 2021, arXiv 2105.13493). A1111 calls it "DPM++ SDE".

With x = x_0 + sigma eps, t = -log(sigma) ("log-sigma time"), D(x; sigma) = x0_pred, one step from
sigma_i to sigma_{i+1} takes two model calls:

    h   = t_{i+1} - t_i,    s = t_i + h/2,    sigma_s = e^-s           (the midpoint in log-sigma)

    stage 1 (from sigma_i to sigma_s, x0 = D(x_i; sigma_i)):
        x_s     = A(x_i, x0, sigma_i -> sigma_s) + sigma_up z_1
    stage 2 (from sigma_i to sigma_{i+1}, x0 = D(x_s; sigma_s)):
        x_{i+1} = A(x_i, x0, sigma_i -> sigma_{i+1}) + sigma_up z_2

    where the ancestral DPM-Solver++(1) step A from sigma to sigma_to is (`update_rules.dpm_solver_pp_sde_stage`)
        sigma_up   = sqrt(sigma_to^2 (sigma^2 - sigma_to^2) / sigma^2)        (`update_rules.ancestral_sigmas`)
        sigma_down = sqrt(sigma_to^2 - sigma_up^2)
        A          = (sigma_down / sigma) x - expm1(t - t_down) x0,   t_down = -log(sigma_down)
                   = (sigma_down / sigma) x + (1 - sigma_down / sigma) x0        (2211.01095 eq. 8, k = 1)

    z_1 = (W(sigma_s) - W(sigma_i)) / sqrt(|sigma_s - sigma_i|),   z_2 = (W(sigma_{i+1}) - W(sigma_i)) / sqrt(.)

so z_1 and z_2 are each N(0, I) but correlated (they share the path between sigma_s and sigma_i).
Stage 2 uses D at the midpoint alone: Algorithm 1's (1 - 1/(2 r_1)) D_i + 1/(2 r_1) D_s with r_1 = 1/2.
The last step, to sigma = 0, is a plain Euler step (x0 = D(x; sigma_i), x_N = x0).

As in diffusers, this is a `step`-per-model-call scheduler: `timesteps` holds 2N - 1 entries
(t_0, midpoint_0, t_1, midpoint_1, ..., t_{N-1}), `state_in_first_order` says which stage the next
`step` is, and `scale_model_input` feeds the model x / sqrt(sigma^2 + 1) at sigma_i or at sigma_s.

Config fields (diffusers' names and defaults):
- num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the training schedule
  alpha_bar_t, hence sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t).
- prediction_type: "epsilon": x0 = x - sigma eps; "v_prediction": x0 = x / (sigma^2+1) - v sigma / sqrt(sigma^2+1);
  "sample": the model predicts x0 (diffusers raises NotImplementedError for it in `step`; minidiff supports it).
- use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas (at most one): replace the N sigmas by the
  Karras rho = 7 ramp, a ramp even in log-sigma, or Beta(0.6, 0.6) quantiles, between the ends of the
  spaced schedule; timesteps then come from `sigma_to_t`.
- noise_sampler_seed: the seed of the Brownian path, or a list of seeds, one path per batch item (None: one
  drawn from torch's global generator at the first `step`, as diffusers). The same seed gives diffusers'
  noise bit for bit (its torchsde BrownianInterval); `scheduler.noise_sampler` can also be replaced after
  `set_timesteps` by any callable (sigma, sigma_next) -> N(0, I) noise of the sample's shape.
- timestep_spacing ("linspace", "leading", "trailing") and steps_offset: which training timesteps to visit.
"""

from __future__ import annotations

import numpy as np
import torch

from minidiff.configuration import register_to_config
from minidiff.schedulers.base import SigmaSchedulerMixin, check_num_inference_steps
from minidiff.schedulers.brownian import BrownianTreeNoiseSampler
from minidiff.schedulers.parameterization import to_x0_ve
from minidiff.schedulers.schedules import sigma_to_t, spaced_sigmas
from minidiff.schedulers.two_model_calls import sigmas_per_model_call
from minidiff.schedulers.update_rules import dpm_solver_pp_sde_stage, euler_step, log_sigma_time, sigma_at

MIDPOINT_RATIO = 0.5  # r_1 of 2211.01095 Algorithm 1 (k-diffusion's r)


class DPMSolverSDEScheduler(SigmaSchedulerMixin):
    """DPM-Solver++ SDE: two model calls per step (2211.01095 Algorithm 1, stochastic as k-diffusion's sample_dpmpp_sde)."""

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
        noise_sampler_seed: int | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        self._check_common_config()
        self.set_training_sigmas(beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas)
        self.noise_sampler_seed = noise_sampler_seed
        # As diffusers: until `set_timesteps`, the schedule visits every training timestep.
        self.set_timesteps(num_train_timesteps)

    # ----- the schedule -------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int, device=None, num_train_timesteps: int | None = None) -> None:
        """N noise levels sigma_0 > ... > sigma_{N-1} (then 0), and the 2N - 1 model calls that visit them:

        timesteps = [t(sigma_0), t(midpoint_0), t(sigma_1), ..., t(midpoint_{N-2}), t(sigma_{N-1})]   float64
        sigmas    = [sigma_0, sigma_1, sigma_1, sigma_2, sigma_2, ..., sigma_{N-1}, sigma_{N-1}, 0]    float32, 2N

        (`sigmas[i]` is where stage 1 of step i // 2 starts; the midpoints are recomputed in `step`.)
        """
        config = self.config
        num_train_timesteps = num_train_timesteps or config.num_train_timesteps
        check_num_inference_steps(num_inference_steps, num_train_timesteps)
        self.num_inference_steps = num_inference_steps

        timesteps, sigmas = spaced_sigmas(config, self.train_sigmas, self.log_train_sigmas, num_inference_steps,
                                          num_train_timesteps, np.float64, karras_takes_config_bounds=False)
        midpoint_timesteps = sigma_to_t(self._midpoint_sigmas(sigmas), self.log_train_sigmas)  # (N-1,)

        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))  # (N+1,)
        self.sigmas = sigmas_per_model_call(sigmas)  # (2N,), kept on the CPU
        interleaved = np.empty(2 * num_inference_steps - 1, dtype=np.float64)
        interleaved[0::2], interleaved[1::2] = timesteps, midpoint_timesteps
        self.timesteps = torch.from_numpy(interleaved).to(device)  # (2N-1,)

        self.sample = None  # x_i, kept between stage 1 and stage 2
        self.mid_point_sigma = None  # sigma_s, the noise level of the stage-2 model call
        self.noise_sampler = None  # built at the first `step` (from the sample's shape), or set by the user
        self._step_index = None
        self._begin_index = None

    @staticmethod
    def _midpoint_sigmas(sigmas: np.ndarray) -> np.ndarray:
        """sigma_s = e^-(t_i + r_1 h) between consecutive noise levels (the stage-2 model calls), float64."""
        t = -np.log(sigmas)
        return np.exp(-(t[:-1] + np.diff(t) * MIDPOINT_RATIO))

    # ----- the state between the two stages -----------------------------------------------------

    @property
    def state_in_first_order(self) -> bool:
        """True when the next `step` is stage 1 of a step (a model call at sigma_i), False for stage 2 (at sigma_s)."""
        return self.sample is None

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """The model input x / sqrt(sigma^2 + 1), at sigma_i (stage 1) or at the midpoint sigma_s (stage 2)."""
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index] if self.state_in_first_order else self.mid_point_sigma
        return sample / ((sigma**2 + 1) ** 0.5)

    # ----- one step -----------------------------------------------------------------------------

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        return_dict: bool = True,
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
    ):
        """Stage 1 or stage 2 of a DPM-Solver++ SDE step (see the module docstring); `s_noise` scales the noise.

        The noise comes from `self.noise_sampler(sigma, sigma_next)` (standard normal for that step): the
        Brownian path of `noise_sampler_seed`, built at the first call, unless you set your own beforehand.
        `generator` is accepted for a uniform scheduler API and not used: as in diffusers, the path is fixed
        by `noise_sampler_seed` (or, when that is None, by torch's global generator)."""
        self._check_step_inputs(model_output, sample)  # an integer timestep is accepted, as diffusers does
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.noise_sampler is None:
            positive = self.sigmas[self.sigmas > 0]
            self.noise_sampler = BrownianTreeNoiseSampler(
                sample, positive.min().item(), self.sigmas.max().item(), self.noise_sampler_seed
            )

        first_stage = self.state_in_first_order
        index = self.step_index if first_stage else self.step_index - 1  # sigmas[index] = sigma_i
        sigma, sigma_next = self.sigmas[index], self.sigmas[index + 1]
        t, t_next = log_sigma_time(sigma), log_sigma_time(sigma_next)
        t_midpoint = t + (t_next - t) * MIDPOINT_RATIO
        sigma_model = sigma if first_stage else sigma_at(t_midpoint)  # where the model output was computed
        x0_pred = to_x0_ve(model_output, sample, sigma_model, self.config.prediction_type)  # D(x; sigma_model)

        if sigma_next == 0:  # the last step: Euler to sigma = 0
            prev_sample = euler_step(sample, x0_pred, sigma, sigma_next)
        else:
            start = sample if first_stage else self.sample  # both stages start from x_i
            t_to = t_midpoint if first_stage else t_next
            noise = self.noise_sampler(sigma_at(t), sigma_at(t_to))
            prev_sample = dpm_solver_pp_sde_stage(start, x0_pred, t, t_to, noise, s_noise)
            self.sample, self.mid_point_sigma = (start, sigma_at(t_to)) if first_stage else (None, None)

        self._step_index += 1
        return self._step_output(prev_sample, x0_pred, return_dict)

    def _model_sigma(self, entry: int) -> torch.Tensor:
        """The noise level of the model call at `timesteps[entry]`: sigma_i (even entries) or sigma_s (odd); what
        the base's `get_velocity` uses (diffusers' class has no get_velocity)."""
        if entry % 2 == 0:
            return self.sigmas[entry]
        t, t_next = log_sigma_time(self.sigmas[entry - 1]), log_sigma_time(self.sigmas[entry])
        return sigma_at(t + (t_next - t) * MIDPOINT_RATIO)
