"""Euler steps on the flow-matching ODE: the sampler of rectified flow, SD3 and Flux.

Papers:
- Lipman, Chen, Ben-Hamu, Nickel, Le 2023, "Flow Matching for Generative Modeling", arXiv 2210.02747
  (eq. 20-23: the conditional optimal-transport path and its velocity, with sigma_min = 0).
- Liu, Gong, Liu 2023, "Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow",
  arXiv 2209.03003 (eq. 1: the straight interpolation; §2.2: the Euler sampler; reflow straightens the paths).
- Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (SD3),
  arXiv 2403.03206, §5.3.2 eq. 23: the resolution-dependent shift of the noise levels.

The path from data x_0 (sigma = 0) to noise eps (sigma = 1) is a straight line, and the model predicts its
velocity (diffusers' sign, the one this class uses; the time conventions side by side: docs/flow_matching.md):

    x_sigma = (1 - sigma) x_0 + sigma eps,      u(x, sigma) = E[eps - x_0 | x_sigma = x] = dx/dsigma

Algorithm (one `step`, sigma_i -> sigma_{i+1}; `timesteps` = 1000 sigma is what the model is told):

    sigmas    = linspace(sigma_max, sigma_min, N)                  (or custom `sigmas` / `timesteps`)
    sigmas    = shift sigma / (1 + (shift - 1) sigma)               (SD3 eq. 23; or time_shift(mu) if dynamic)
    sigmas    = stretched to end at shift_terminal                  (optional, LTX-Video)
    sigmas    = Karras / exponential / beta ramp between their ends (optional); then append 0 (1 if inverted)
    x_{i+1}   = x_i + (sigma_{i+1} - sigma_i) u(x_i, sigma_i)        (Euler; `update_rules.flow_euler_step`)
      or, with stochastic_sampling:
    x_{i+1}   = (1 - sigma_{i+1}) (x_i - sigma_i u) + sigma_{i+1} z  (`update_rules.flow_stochastic_step`)

The same ODE as DDIM's, in other coordinates: x_flow = x_t / (alpha_t + sigma_t), sigma = sigma_t / (alpha_t +
sigma_t) turns DDPM's x_t = alpha_t x_0 + sigma_t eps into the line above, and an Euler step here is then
exactly a DDIM step there (tutorial 13 asserts it on the exact model).

Config fields (diffusers 0.42.1's names and defaults):
- num_train_timesteps: timestep = num_train_timesteps * sigma.
- shift: the static shift (SD3 uses 3.0; 1.0 = none). Larger shifts spend more steps at high noise.
- use_dynamic_shifting, base_shift, max_shift, base_image_seq_len, max_image_seq_len: shift by `mu` passed to
  `set_timesteps` (Flux: mu grows linearly with the number of latent tokens; `calculate_shift` computes it).
- time_shift_type: "exponential": e^mu / (e^mu + (1/sigma - 1)); "linear": mu / (mu + (1/sigma - 1)).
- shift_terminal: stretch the shifted schedule so that its last sigma is this value.
- use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas: replace the sigmas by that ramp between its ends.
- invert_sigmas: sigmas -> 1 - sigmas, ending at 1 (Mochi's convention: sigma = 1 is data).
- stochastic_sampling: renew the noise at every step instead of following the ODE.

Two behaviours of diffusers 0.42.1 kept for parity (tests/test_schedulers_flow_match.py names them):
- With `shift` != 1 and no dynamic shifting, the schedule is shifted twice at its low end: `__init__` shifts the
  training sigmas (so `sigma_min` is already shifted) and `set_timesteps` shifts the linspace between them again.
- With `per_token_timesteps`, dt = sigma - sigma_next (positive), the opposite sign of the ordinary step.

Not in diffusers' class, added so `StableDiffusionPipeline` can run it: `init_noise_sigma` (1: the noise is the
sample at sigma = 1) and `scale_model_input` (the identity: the model sees x itself).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from minidiff.configuration import check_choice, register_to_config
from minidiff.schedulers.base import SchedulerMixin, _broadcast, check_decreasing, check_float_timestep
from minidiff.schedulers.schedules import check_one_noise_ramp, chosen_noise_ramp, ramp_sigmas
from minidiff.schedulers.parameterization import add_noise_flow
from minidiff.schedulers.update_rules import flow_euler_step, flow_stochastic_step
from minidiff.utils.outputs import BaseOutput
from minidiff.utils.torch_utils import randn_tensor

TIME_SHIFT_TYPES = ("exponential", "linear")


@dataclass
class FlowMatchEulerDiscreteSchedulerOutput(BaseOutput):
    """What `step` returns: the sample at the next noise level (no x_0 estimate, as in diffusers)."""

    prev_sample: torch.Tensor


# ----- the shifts of the noise levels --------------------------------------------------------------


def shift_sigmas(sigmas, shift: float):
    """SD3's static shift (Esser et al. 2024, eq. 23): sigma' = shift sigma / (1 + (shift - 1) sigma).
    It keeps 0 and 1 fixed and, for shift > 1, moves every level in between towards 1 (more noise)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift_exponential(mu: float, sigma: float, t):
    """e^mu / (e^mu + (1/t - 1)^sigma): at sigma = 1 it is the static shift with shift = e^mu (Flux's form)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def time_shift_linear(mu: float, sigma: float, t):
    """mu / (mu + (1/t - 1)^sigma): at sigma = 1 it is the static shift with shift = mu."""
    return mu / (mu + (1 / t - 1) ** sigma)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """mu for `set_timesteps(mu=...)` with dynamic shifting: a line through (base_seq_len, base_shift) and
    (max_seq_len, max_shift), at the image's number of latent tokens (what diffusers' Flux pipeline computes)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def stretch_to_terminal(sigmas, shift_terminal: float):
    """Scale 1 - sigma so that the last sigma becomes `shift_terminal` (LTX-Video's stretch); the first stays put
    only up to that scale (1 - sigma_0 is scaled too)."""
    one_minus = 1 - sigmas
    scale = one_minus[-1] / (1 - shift_terminal)
    return 1 - (one_minus / scale)


class FlowMatchEulerDiscreteScheduler(SchedulerMixin):
    """Euler steps on dx/dsigma = u(x, sigma), x = (1 - sigma) x_0 + sigma eps; see the module docstring."""

    _tuple_has_pred_original_sample = False  # step(..., return_dict=False) is (prev_sample,), as diffusers
    _compatibles: list[str] = []  # as diffusers: no diffusion (eps/v) scheduler reads this config
    order = 1
    requires_set_timesteps = False  # as diffusers: a fresh one steps through all the training levels
    init_noise_sigma = 1.0  # x at sigma = 1 is the noise itself

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
    ):
        check_one_noise_ramp(self.config)
        check_choice("time_shift_type", time_shift_type, TIME_SHIFT_TYPES, type(self).__name__)
        if shift_terminal is not None and not 0 <= shift_terminal < 1:
            raise ValueError(f"shift_terminal must be in [0, 1) (the last sigma of the schedule), got {shift_terminal}")

        # The training levels sigma = t / T for t = T, ..., 1 (float32), shifted unless the shift comes later.
        sigmas = torch.from_numpy(np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy())
        sigmas = sigmas / num_train_timesteps
        if not use_dynamic_shifting:
            sigmas = shift_sigmas(sigmas, shift)
        self.timesteps = sigmas * num_train_timesteps
        self.sigmas = sigmas  # kept on the CPU: one value is read per step
        self.sigma_min = self.sigmas[-1].item()
        self.sigma_max = self.sigmas[0].item()
        self._shift = shift
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None

    @property
    def shift(self) -> float:
        """The static shift `set_timesteps` applies (the config's, until `set_shift`)."""
        return self._shift

    def set_shift(self, shift: float) -> None:
        self._shift = shift

    # ----- the schedule -------------------------------------------------------------------------

    def _sigma_to_t(self, sigma):
        return sigma * self.config.num_train_timesteps

    def time_shift(self, mu: float, sigma: float, t):
        """The dynamic shift of the levels `t` by `mu` (config.time_shift_type)."""
        if self.config.time_shift_type == "exponential":
            return time_shift_exponential(mu, sigma, t)
        return time_shift_linear(mu, sigma, t)

    def stretch_shift_to_terminal(self, t):
        """The levels `t` stretched so the last one is config.shift_terminal."""
        return stretch_to_terminal(t, self.config.shift_terminal)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu: float | None = None,
                      timesteps=None) -> None:
        """Choose the N noise levels: evenly spaced between sigma_max and sigma_min, or custom `sigmas` (N values,
        without the final 0), or custom `timesteps` (N values, model times; sigma = t / T before shifting); then
        shift (by `mu` when use_dynamic_shifting), stretch, ramp, and append the final level."""
        config = self.config
        self._check_set_timesteps_arguments(num_inference_steps, sigmas, mu, timesteps)
        if num_inference_steps is None:
            num_inference_steps = len(sigmas) if sigmas is not None else len(timesteps)
        self.num_inference_steps = num_inference_steps

        custom_timesteps = timesteps is not None
        if custom_timesteps and sigmas is None:  # diffusers logs the same caution
            warnings.warn(
                "custom `timesteps` without `sigmas`: the timesteps are used as given, but the sigmas derived from them "
                "(t / num_train_timesteps) are shifted, so the two may disagree; pass `sigmas` (or both) to control them",
                stacklevel=2,
            )
        if custom_timesteps:
            timesteps = np.asarray(timesteps).astype(np.float32)
        if sigmas is None:
            if timesteps is None:  # float64, as diffusers
                timesteps = np.linspace(self._sigma_to_t(self.sigma_max), self._sigma_to_t(self.sigma_min), num_inference_steps)
            sigmas = timesteps / config.num_train_timesteps
        else:
            sigmas = np.asarray(sigmas).astype(np.float32)
            num_inference_steps = len(sigmas)

        if config.use_dynamic_shifting:
            sigmas = self.time_shift(mu, 1.0, sigmas)
        else:
            sigmas = shift_sigmas(sigmas, self.shift)
        if config.shift_terminal:
            if float(sigmas[-1]) >= 1:  # diffusers 0.42.1 divides 0 by 0 here and returns NaN sigmas
                raise ValueError(
                    f"shift_terminal={config.shift_terminal} stretches the schedule so its last sigma becomes that value, "
                    f"but the last sigma is {float(sigmas[-1])} (1 = pure noise: e.g. a single step), which cannot be "
                    "stretched; use at least two steps or set shift_terminal=None"
                )
            sigmas = self.stretch_shift_to_terminal(sigmas)
        ramp = chosen_noise_ramp(config)
        if ramp is not None:  # Karras / exponential / beta levels between the two ends of the schedule
            sigmas = ramp_sigmas(ramp, float(sigmas[-1]), float(sigmas[0]), num_inference_steps, config)

        sigmas = torch.from_numpy(np.asarray(sigmas)).to(dtype=torch.float32, device=device)
        if custom_timesteps:
            timesteps = torch.from_numpy(timesteps).to(dtype=torch.float32, device=device)
        else:
            timesteps = sigmas * config.num_train_timesteps
        if config.invert_sigmas:  # Mochi: sigma = 1 is data; the last level is then 1
            sigmas = 1.0 - sigmas
            timesteps = sigmas * config.num_train_timesteps
            final = torch.ones(1, device=sigmas.device)
        else:
            final = torch.zeros(1, device=sigmas.device)
        self.sigmas = torch.cat([sigmas, final])
        self.timesteps = timesteps
        self._step_index = None
        self._begin_index = None

    def _check_set_timesteps_arguments(self, num_inference_steps, sigmas, mu, timesteps) -> None:
        if self.config.use_dynamic_shifting and mu is None:
            raise ValueError(
                "use_dynamic_shifting=True needs `mu` in set_timesteps (the shift for this image size, e.g. "
                "calculate_shift(image_seq_len)); or build the scheduler with use_dynamic_shifting=False"
            )
        if num_inference_steps is None and sigmas is None and timesteps is None:
            raise ValueError("set_timesteps needs num_inference_steps, or custom `sigmas` or `timesteps`")
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError(f"custom `sigmas` ({len(sigmas)}) and `timesteps` ({len(timesteps)}) must have the same length")
        if num_inference_steps is not None:
            if not isinstance(num_inference_steps, (int, np.integer)) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
            for name, values in (("sigmas", sigmas), ("timesteps", timesteps)):
                if values is not None and len(values) != num_inference_steps:
                    raise ValueError(
                        f"custom `{name}` holds {len(values)} values but num_inference_steps={num_inference_steps}; "
                        "they must agree (or leave num_inference_steps out)"
                    )
        for name, values in (("sigmas", sigmas), ("timesteps", timesteps)):
            if values is not None and len(values) < 1:
                raise ValueError(f"custom `{name}` must hold at least one value")
            if values is not None:
                check_decreasing(name, values)

    # ----- the forward process ------------------------------------------------------------------

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The forward process: x = (1 - sigma) x_0 + sigma eps at each sample's timestep (img2img's start)."""
        if noise is None:
            raise ValueError("scale_noise needs `noise` (a tensor like `sample`, e.g. torch.randn_like(sample))")
        sigmas = self.sigmas.to(device=sample.device, dtype=sample.dtype)
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        step_indices = self._add_noise_step_indices(timestep, self.timesteps.to(sample.device))
        sigma = _broadcast(sigmas[step_indices], sample)
        return add_noise_flow(sample, noise, sigma)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The model sees x itself (minidiff's addition; diffusers' class has no such method)."""
        return sample

    def add_noise(self, original_samples, noise, timesteps):
        raise ValueError(
            "FlowMatchEulerDiscreteScheduler has no add_noise (it has no alphas_cumprod); its forward process is "
            "scale_noise(sample, timestep, noise) = (1 - sigma) x_0 + sigma eps"
        )

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
        per_token_timesteps: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> FlowMatchEulerDiscreteSchedulerOutput | tuple:
        """One Euler step from sigmas[i] to sigmas[i + 1] with the predicted velocity `model_output`.

        s_churn, s_tmin, s_tmax and s_noise are accepted and unused, as in diffusers."""
        check_float_timestep(timestep, f"{type(self).__name__}.step")
        self._check_step_inputs(model_output, sample)
        if self.step_index is None:
            self._init_step_index(timestep)
        sample = sample.to(torch.float32)  # the update in fp32

        if per_token_timesteps is not None:  # one noise level per token (B, L): the next lower level of the schedule
            per_token_sigmas = per_token_timesteps / self.config.num_train_timesteps
            schedule = self.sigmas[:, None, None]
            below = schedule < per_token_sigmas[None] - 1e-6
            sigma, sigma_next = per_token_sigmas[..., None], (below * schedule).max(dim=0).values[..., None]
        else:
            sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]

        if self.config.stochastic_sampling:
            noise = randn_tensor(sample.shape, generator, sample.device, sample.dtype)
            prev_sample = flow_stochastic_step(sample, model_output, sigma, sigma_next, noise)
        elif per_token_timesteps is not None:
            # diffusers 0.42.1 steps by dt = sigma - sigma_next here (> 0), the opposite sign of the ordinary step
            prev_sample = flow_euler_step(sample, model_output, sigma_next, sigma)
        else:
            prev_sample = flow_euler_step(sample, model_output, sigma, sigma_next)

        self._step_index += 1
        if per_token_timesteps is None:
            prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)
