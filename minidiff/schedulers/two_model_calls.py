"""The schedule of the samplers that call the model twice a step: Heun, DPM2, DPM2 a and DPM++ SDE.

As in diffusers, every model call is one `step`, so `timesteps` holds 2N - 1 entries for N steps: each step's start
t_i and its second call (the end of the Euler step for Heun, the midpoint for DPM2 and DPM++ SDE). The functions
below lay per-step values out per model call and find the N steps' noise levels.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from minidiff.schedulers.base import check_num_inference_steps
from minidiff.schedulers.schedules import sigma_to_t, spaced_sigmas


def twice_after_first(values: torch.Tensor) -> torch.Tensor:
    """[v_0, v_1, v_1, v_2, v_2, ..., v_last, v_last]: each value but the first is the end of one step and the start
    of the next, so two model calls see it."""
    return torch.cat([values[:1], values[1:].repeat_interleave(2)])


def sigmas_per_model_call(sigmas: torch.Tensor) -> torch.Tensor:
    """[sigma_0, sigma_1, sigma_1, ..., sigma_{N-1}, sigma_{N-1}, 0] (2N,) from the N + 1 noise levels (the last 0)."""
    return torch.cat([twice_after_first(sigmas[:-1]), sigmas[-1:]])


def per_model_call(values: torch.Tensor) -> torch.Tensor:
    """[v_0, v_1, v_1, v_2, v_2, ..., v_N, v_N, v_N]: a per-step quantity at each entry of the DPM2 schedules."""
    return torch.cat([twice_after_first(values), values[-1:]])


def step_noise_levels(scheduler, num_inference_steps: int, num_train_timesteps: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The N steps' timesteps (N,) and noise levels sigma_0 > ... > sigma_{N-1} > 0, (N+1,) float32, of both DPM2
    schedulers (plain and ancestral; Karras timesteps rounded, as diffusers); sets `scheduler.num_inference_steps`."""
    config = scheduler.config
    num_train_timesteps = num_train_timesteps or config.num_train_timesteps
    check_num_inference_steps(num_inference_steps, num_train_timesteps)
    scheduler.num_inference_steps = num_inference_steps
    timesteps, sigmas = spaced_sigmas(config, scheduler.train_sigmas, scheduler.log_train_sigmas, num_inference_steps,
                                      num_train_timesteps)
    if config.use_karras_sigmas:
        timesteps = timesteps.round()  # as diffusers
    return torch.from_numpy(timesteps), torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))


def midpoint_timesteps_float32(midpoints: torch.Tensor, log_train_sigmas: np.ndarray) -> torch.Tensor:
    """The (fractional) timestep of each midpoint as diffusers computes it: `sigma_to_t` on float32 torch tensors,
    which mixes numpy's float32 ufuncs and torch's float32 operators (the float64 path differs in the last bit)."""
    with warnings.catch_warnings():  # numpy 2 warns about torch's __array_wrap__ signature; harmless here
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.as_tensor(sigma_to_t(midpoints, torch.from_numpy(log_train_sigmas)))
