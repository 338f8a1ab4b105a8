"""Drive a minidiff scheduler and its diffusers twin through the same loop and compare every number.

Used by the per-scheduler parity tests. The fake model is deterministic and depends on both the
sample and the timestep, so every coefficient of `step` shows up in the output:

    model(x, t) = x * t / (t + 1) + 0.1 * sin(x)     (diffusers' dummy model, plus a non-linear term)
"""

from __future__ import annotations

import numpy as np
import torch

# fp32 parity tolerance for every compared tensor: |ours - theirs| <= ATOL + RTOL * |theirs|
RTOL = 1e-5
ATOL = 1e-6


def fake_model(sample: torch.Tensor, t) -> torch.Tensor:
    t = float(t)
    return sample * t / (t + 1) + 0.1 * torch.sin(sample)


def dummy_sample(batch: int = 2, channels: int = 4, size: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=generator)


def assert_close(ours, theirs, what: str, rtol: float = RTOL, atol: float = ATOL) -> None:
    ours = torch.as_tensor(np.asarray(ours) if not isinstance(ours, torch.Tensor) else ours).double()
    theirs = torch.as_tensor(np.asarray(theirs) if not isinstance(theirs, torch.Tensor) else theirs).double()
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def run_parity(
    ours_cls,
    theirs_cls,
    config: dict,
    num_inference_steps: int,
    step_kwargs: dict | None = None,
    seed: int | None = None,
    rtol: float = RTOL,
    atol: float = ATOL,
) -> int:
    """Build both schedulers from `config`, run a whole loop, compare everything; returns the steps taken.

    With `seed`, each side gets its own `torch.Generator().manual_seed(seed)`, so stochastic
    schedulers must draw their noise in the same order and shape as diffusers.
    """
    ours, theirs = ours_cls(**config), theirs_cls(**config)
    ours.set_timesteps(num_inference_steps)
    theirs.set_timesteps(num_inference_steps)
    assert_close(ours.timesteps, theirs.timesteps, "timesteps", rtol=0, atol=0)
    assert ours.timesteps.dtype == theirs.timesteps.dtype, f"timesteps dtype {ours.timesteps.dtype} != {theirs.timesteps.dtype}"
    if hasattr(theirs, "sigmas"):
        assert_close(ours.sigmas, theirs.sigmas, "sigmas", rtol, atol)
    assert_close(float(ours.init_noise_sigma), float(theirs.init_noise_sigma), "init_noise_sigma", rtol, atol)
    assert ours.order == theirs.order

    sample_ours = dummy_sample() * float(theirs.init_noise_sigma)
    sample_theirs = sample_ours.clone()
    generators = (None, None) if seed is None else (torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed))
    step_kwargs = step_kwargs or {}
    for i, t in enumerate(theirs.timesteps):
        scaled_ours = ours.scale_model_input(sample_ours, ours.timesteps[i])
        scaled_theirs = theirs.scale_model_input(sample_theirs, t)
        assert_close(scaled_ours, scaled_theirs, f"scale_model_input at step {i}", rtol, atol)
        output = fake_model(scaled_theirs, t)
        kwargs_ours = dict(step_kwargs, generator=generators[0]) if seed is not None else dict(step_kwargs)
        kwargs_theirs = dict(step_kwargs, generator=generators[1]) if seed is not None else dict(step_kwargs)
        step_ours = ours.step(output.clone(), ours.timesteps[i], sample_ours, **kwargs_ours)
        step_theirs = theirs.step(output.clone(), t, sample_theirs, **kwargs_theirs)
        assert_close(step_ours.prev_sample, step_theirs.prev_sample, f"prev_sample at step {i} (t={float(t)})", rtol, atol)
        theirs_x0 = getattr(step_theirs, "pred_original_sample", None)
        if theirs_x0 is not None:
            assert_close(step_ours.pred_original_sample, theirs_x0, f"pred_original_sample at step {i}", rtol, atol)
        sample_ours, sample_theirs = step_ours.prev_sample, step_theirs.prev_sample
    return len(theirs.timesteps)
