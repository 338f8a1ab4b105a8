"""FlowMatchEulerDiscreteScheduler against diffusers 0.42.1: sigmas, timesteps and every step (within 1e-5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minidiff.schedulers import FlowMatchEulerDiscreteScheduler
from minidiff.schedulers.flow_match_euler import calculate_shift
from tests.scheduler_parity import assert_close, dummy_sample, fake_model

diffusers = pytest.importorskip("diffusers")
Theirs = diffusers.FlowMatchEulerDiscreteScheduler

TOL = {"rtol": 1e-5, "atol": 1e-6}


def run_both(config: dict, set_timesteps: dict, step_kwargs: dict | None = None, seed: int | None = None, steps=None):
    """Build both, set the same schedule, run the whole loop with the fake velocity model, compare every number."""
    ours, theirs = FlowMatchEulerDiscreteScheduler(**config), Theirs(**config)
    ours.set_timesteps(**set_timesteps)
    theirs.set_timesteps(**set_timesteps)
    assert_close(ours.sigmas, theirs.sigmas, "sigmas", **TOL)
    assert_close(ours.timesteps, theirs.timesteps, "timesteps", **TOL)
    assert ours.timesteps.dtype == theirs.timesteps.dtype and ours.sigmas.dtype == theirs.sigmas.dtype
    sample_ours = sample_theirs = dummy_sample()
    generators = (torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)) if seed is not None else (None, None)
    for i, t in enumerate(ours.timesteps[:steps]):
        u_ours, u_theirs = fake_model(sample_ours, t / 1000), fake_model(sample_theirs, theirs.timesteps[i] / 1000)
        sample_ours = ours.step(u_ours, t, sample_ours, generator=generators[0], **(step_kwargs or {})).prev_sample
        sample_theirs = theirs.step(u_theirs, theirs.timesteps[i], sample_theirs, generator=generators[1],
                                    **(step_kwargs or {})).prev_sample
        assert_close(sample_ours, sample_theirs, f"step {i}", **TOL)
    return ours, theirs


DEFAULT_GRID = [
    ({}, {"num_inference_steps": 10}),
    ({"shift": 3.0}, {"num_inference_steps": 7}),  # SD3's shift
    ({"use_dynamic_shifting": True}, {"num_inference_steps": 8, "mu": calculate_shift(1024)}),
    ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, {"num_inference_steps": 6, "mu": 1.3}),
    ({"shift_terminal": 0.1, "shift": 2.0}, {"num_inference_steps": 9}),
    ({"use_karras_sigmas": True}, {"num_inference_steps": 10}),
    ({"use_exponential_sigmas": True, "shift": 3.0}, {"num_inference_steps": 5}),
    ({"use_beta_sigmas": True}, {"num_inference_steps": 10}),
    ({"invert_sigmas": True}, {"num_inference_steps": 6}),
    ({}, {"sigmas": list(np.linspace(1.0, 1 / 8, 8))}),  # Flux's / rectified flow's schedule
    pytest.param({"shift": 3.0}, {"timesteps": [999.0, 750.5, 500.0, 250.0]},
                 marks=pytest.mark.filterwarnings("ignore:custom `timesteps` without `sigmas`")),
    ({}, {"sigmas": [1.0, 0.6, 0.3, 0.1], "timesteps": [1000.0, 700.0, 400.0, 100.0]}),
]


@pytest.mark.parametrize("config, schedule", DEFAULT_GRID)
def test_parity_default_grid(config, schedule):
    run_both(config, schedule)


def test_timesteps_without_sigmas_warn():
    with pytest.warns(UserWarning, match="without `sigmas`"):
        FlowMatchEulerDiscreteScheduler(shift=3.0).set_timesteps(timesteps=[999.0, 500.0])


def test_stochastic_sampling_draws_the_same_noise():
    run_both({"stochastic_sampling": True}, {"num_inference_steps": 6}, seed=0)


LONG_GRID = [
    ({"shift": shift, **extra}, {"num_inference_steps": n})
    for shift in (1.0, 3.0, 7.5)
    for extra in ({}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True},
                  {"shift_terminal": 0.05}, {"invert_sigmas": True}, {"stochastic_sampling": True})
    for n in (1, 2, 25, 50)
    if not (n == 1 and "shift_terminal" in extra)  # one step at sigma = 1 cannot be stretched: see below
] + [
    ({"use_dynamic_shifting": True, "time_shift_type": kind, "num_train_timesteps": T}, {"num_inference_steps": n, "mu": mu})
    for kind in ("exponential", "linear") for T in (1000, 500) for n in (4, 28) for mu in (0.5, 1.15, 2.0)
]


@pytest.mark.long
@pytest.mark.parametrize("config, schedule", LONG_GRID)
def test_parity_long_grid(config, schedule):
    run_both(config, schedule, seed=1 if config.get("stochastic_sampling") else None)


def test_fresh_scheduler_steps_on_the_training_levels():
    ours, theirs = FlowMatchEulerDiscreteScheduler(shift=3.0), Theirs(shift=3.0)
    assert_close(ours.sigmas, theirs.sigmas, "sigmas", **TOL)
    assert_close(ours.timesteps, theirs.timesteps, "timesteps", **TOL)
    assert ours.sigma_min == theirs.sigma_min and ours.sigma_max == theirs.sigma_max
    sample = dummy_sample()
    for t_ours, t_theirs in zip(ours.timesteps[:3], theirs.timesteps[:3]):
        out_ours = ours.step(fake_model(sample, 0.5), t_ours, sample).prev_sample
        out_theirs = theirs.step(fake_model(sample, 0.5), t_theirs, sample).prev_sample
        assert_close(out_ours, out_theirs, "step on the training schedule", **TOL)
        sample = out_ours


def test_shift_is_applied_twice_at_the_low_end_as_in_diffusers():
    """diffusers 0.42.1: __init__ shifts the training sigmas, so sigma_min is already shifted, and set_timesteps
    shifts the linspace between sigma_max and sigma_min again; the last level is shift(shift(1/T)), not shift(1/T)."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    once = 3.0 * 0.001 / (1 + 2.0 * 0.001)
    twice = 3.0 * once / (1 + 2.0 * once)
    assert abs(scheduler.sigmas[-2].item() - twice) < 1e-7 and abs(scheduler.sigmas[-2].item() - once) > 1e-3


def test_shift_terminal_with_one_step_is_refused_where_diffusers_gives_nan():
    theirs = Theirs(shift_terminal=0.05)
    with np.errstate(invalid="ignore"):
        theirs.set_timesteps(1)
    assert torch.isnan(theirs.sigmas[0])  # diffusers 0.42.1: (1 - 1) / (1 - 1)
    with pytest.raises(ValueError, match="cannot be stretched"):
        FlowMatchEulerDiscreteScheduler(shift_terminal=0.05).set_timesteps(1)


def test_scale_noise_and_begin_index_match_diffusers():
    ours, theirs = FlowMatchEulerDiscreteScheduler(shift=3.0), Theirs(shift=3.0)
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(10)
    x0, noise = dummy_sample(seed=1), dummy_sample(seed=2)
    t = ours.timesteps[3:4]
    assert_close(ours.scale_noise(x0, t, noise), theirs.scale_noise(x0, theirs.timesteps[3:4], noise), "scale_noise", **TOL)
    for scheduler in (ours, theirs):
        scheduler.set_begin_index(3)
    assert_close(ours.scale_noise(x0, t, noise), theirs.scale_noise(x0, theirs.timesteps[3:4], noise), "begin_index", **TOL)
    sigma = ours.sigmas[3]
    assert torch.allclose(ours.scale_noise(x0, t, noise), (1 - sigma) * x0 + sigma * noise)


def test_per_token_timesteps_match_diffusers():
    ours, theirs = FlowMatchEulerDiscreteScheduler(), Theirs()
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(5)
    sample = dummy_sample(batch=2, channels=6, size=1).reshape(2, 6, 1)  # (B, L tokens, C = 1)
    per_token = torch.tensor([[1000.0, 800.0, 610.0, 400.0, 200.0, 5.0]] * 2)
    u = fake_model(sample, 0.3)
    out_ours = ours.step(u, ours.timesteps[0], sample, per_token_timesteps=per_token).prev_sample
    out_theirs = theirs.step(u, theirs.timesteps[0], sample, per_token_timesteps=per_token).prev_sample
    assert_close(out_ours, out_theirs, "per-token step", **TOL)


def test_config_round_trip_and_tuple_output(tmp_path):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_karras_sigmas=True)
    scheduler.save_pretrained(tmp_path)
    theirs = Theirs.from_pretrained(tmp_path)
    assert theirs.config.shift == 3.0 and theirs.config.use_karras_sigmas
    again = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path)
    public = lambda config: {key: value for key, value in config.items() if not key.startswith('_')}  # noqa: E731
    assert public(again.config) == public(scheduler.config)
    again.set_timesteps(3)
    out = again.step(torch.zeros(1, 2), again.timesteps[0], torch.ones(1, 2), return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1
    assert FlowMatchEulerDiscreteScheduler.compatibles == [FlowMatchEulerDiscreteScheduler]
    assert len(again) == 1000


@pytest.mark.parametrize(
    "build, call, message",
    [
        ({"use_karras_sigmas": True, "use_beta_sigmas": True}, None, "at most one"),
        ({"time_shift_type": "cosine"}, None, "time_shift_type"),
        ({"shift_terminal": 1.5}, None, "shift_terminal"),
        ({"use_dynamic_shifting": True}, {"num_inference_steps": 4}, "needs `mu`"),
        ({}, {}, "needs num_inference_steps"),
        ({}, {"num_inference_steps": 3, "sigmas": [1.0, 0.5]}, "must agree"),
        ({}, {"sigmas": [1.0, 0.5], "timesteps": [1000.0]}, "same length"),
        ({}, {"num_inference_steps": 0}, "positive integer"),
        ({}, {"sigmas": [0.5, 1.0]}, "strictly decrease"),
    ],
)
def test_bad_input_is_named(build, call, message):
    with pytest.raises(ValueError, match=message):
        scheduler = FlowMatchEulerDiscreteScheduler(**build)
        scheduler.set_timesteps(**call)


def test_integer_timestep_and_add_noise_are_refused_with_advice():
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="integer timestep"):
        scheduler.step(torch.zeros(1), 3, torch.zeros(1))
    with pytest.raises(ValueError, match="must have the sample's shape"):
        scheduler.step(torch.zeros(2, 3), scheduler.timesteps[0], torch.zeros(2, 4))
    with pytest.raises(ValueError, match="scale_noise"):
        scheduler.add_noise(torch.zeros(1), torch.zeros(1), torch.tensor([999.0]))
