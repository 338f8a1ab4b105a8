"""The contract every one of the fourteen schedulers keeps, checked against diffusers 0.42.1 where it has an answer.

- what `step(..., return_dict=False)` returns (diffusers' tuple shape, class by class);
- a missing attribute raises Python's own AttributeError message (diffusers' scheduler tests compare it);
- which classes take an integer timestep in `step` (diffusers: all but Euler and Euler ancestral);
- bad input gets a clear error before any work: model_output and sample of different shapes, custom timesteps or
  sigmas that do not decrease, a training schedule no model has (num_train_timesteps <= 0, trained_betas of the
  wrong length);
- Heun's beta_schedule "exp", which diffusers' Heun alone offers.
Tiny tensors, one or two steps each: these stay in the default suite.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import diffusers
import minidiff
from scheduler_parity import assert_close, dummy_sample, fake_model

# The fourteen classes of SD 1.5's `pipeline.scheduler.compatibles` (diffusers' KarrasDiffusionSchedulers that minidiff has).
NAMES = sorted(cls.__name__ for cls in minidiff.DDIMScheduler.compatibles)
assert len(NAMES) == 14, NAMES
# Integer-valued timesteps wherever the class has a spacing (so an int names a real entry of `timesteps`).
LEADING = {"timestep_spacing": "leading"}
NO_SPACING = {"DPMSolverSinglestepScheduler"}


def pair(name: str, **config):
    """minidiff's class and diffusers', same config; 100 training steps, since diffusers' KDPM2 builds slowly at 1000."""
    config = {"num_train_timesteps": 100, **config}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(minidiff, name)(**config), getattr(diffusers, name)(**config)


def first_step(scheduler, timestep, model_output, sample, **kwargs):
    """One `step` as a pipeline does it (scale_model_input first), with a fixed generator where one is taken."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler.scale_model_input(sample, timestep)
        if "generator" in inspect.signature(scheduler.step).parameters:
            kwargs["generator"] = torch.Generator().manual_seed(0)
        return scheduler.step(model_output, timestep, sample, **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_return_dict_false_gives_diffusers_tuple(name):
    ours, theirs = pair(name, noise_sampler_seed=0) if name == "DPMSolverSDEScheduler" else pair(name)
    sample = dummy_sample()
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(10)
    t = ours.timesteps[0]
    mine = first_step(ours, t, fake_model(sample, t), sample, return_dict=False)
    oracle = first_step(theirs, theirs.timesteps[0], fake_model(sample, t), sample, return_dict=False)
    assert type(mine) is tuple and len(mine) == len(oracle), (len(mine), len(oracle))
    assert_close(mine[0], oracle[0], f"{name} prev_sample", rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_missing_attribute_raises_pythons_attribute_error(name):
    """diffusers' own scheduler test: str(error) is exactly Python's message; minidiff's hint is a note (PEP 678)."""
    ours, theirs = pair(name)
    with pytest.raises(AttributeError) as error:
        ours.does_not_exist
    with pytest.raises(AttributeError) as their_error:
        theirs.does_not_exist
    assert str(error.value) == str(their_error.value) == f"'{name}' object has no attribute 'does_not_exist'"
    assert "not a key of its config" in error.value.__notes__[0]


@pytest.mark.parametrize("name", NAMES)
def test_integer_timestep_taken_or_refused_as_diffusers(name):
    config = {} if name in NO_SPACING else LEADING
    ours, theirs = pair(name, **config)
    sample = dummy_sample()
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(10)
    t = int(ours.timesteps[0])
    try:
        first_step(theirs, t, fake_model(sample, t), sample)
    except ValueError:
        with pytest.raises(ValueError, match="integer timestep"):
            first_step(ours, t, fake_model(sample, t), sample)
    else:
        assert name not in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")
        first_step(ours, t, fake_model(sample, t), sample)


@pytest.mark.parametrize("name", NAMES)
def test_model_output_of_another_shape_is_refused(name):
    """(2, 4, 8, 8) against (1, 4, 8, 8) broadcasts silently in the arithmetic; step names both shapes instead."""
    scheduler = getattr(minidiff, name)(num_train_timesteps=100)
    scheduler.set_timesteps(10)
    sample, t = dummy_sample(batch=1), scheduler.timesteps[0]
    with pytest.raises(ValueError, match=r"model_output of shape \(2, 4, 8, 8\) and sample of shape \(1, 4, 8, 8\)"):
        first_step(scheduler, t, fake_model(dummy_sample(batch=2), t), sample)


CUSTOM = [
    ("DDPMScheduler", "timesteps", [1, 50, 99]),
    ("EulerDiscreteScheduler", "timesteps", [1, 50, 99]),
    ("EulerDiscreteScheduler", "sigmas", [1.0, 5.0, 14.0, 0.0]),
    ("HeunDiscreteScheduler", "timesteps", [1, 50, 99]),
    ("DPMSolverMultistepScheduler", "timesteps", [1, 50, 99]),
    ("DPMSolverSinglestepScheduler", "timesteps", [99, 50, 50]),
]


@pytest.mark.parametrize("name, argument, values", CUSTOM)
def test_custom_timesteps_and_sigmas_must_decrease(name, argument, values):
    scheduler = getattr(minidiff, name)(num_train_timesteps=100)
    with pytest.raises(ValueError, match=rf"custom `{argument}` must strictly decrease \(noisiest first\)"):
        scheduler.set_timesteps(**{argument: values})


def test_custom_sigmas_must_be_finite():
    scheduler = minidiff.EulerDiscreteScheduler(num_train_timesteps=100)
    with pytest.raises(ValueError, match="custom `sigmas` must be finite numbers, got nan"):
        scheduler.set_timesteps(sigmas=[14.0, float("nan"), 1.0, 0.0])


@pytest.mark.parametrize("name", NAMES)
def test_training_schedule_checked_at_construction(name):
    cls = getattr(minidiff, name)
    for bad in (-5, 0):
        with pytest.raises(ValueError, match=f"num_train_timesteps must be a positive integer .* got {bad}"):
            cls(num_train_timesteps=bad)
    with pytest.raises(ValueError, match="trained_betas holds 10 values but num_train_timesteps is 100"):
        cls(num_train_timesteps=100, trained_betas=[0.01] * 10)


RAMP_CLASSES = [name for name in NAMES if name not in ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "EulerAncestralDiscreteScheduler")]


@pytest.mark.parametrize("name", RAMP_CLASSES)
def test_noise_ramp_bounds_kept_from_an_euler_config_as_diffusers(name):
    """A config carrying Euler's sigma_min / sigma_max bounds every ramp, as diffusers' `hasattr(self.config,
    "sigma_min")` does, except where diffusers forgot it: the Karras ramp of LMS and DPM++ SDE ignores them."""
    for ramp in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
        euler = pair("EulerDiscreteScheduler", sigma_min=0.1, sigma_max=10.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = getattr(minidiff, name).from_config(euler[0].config, **{ramp: True})
            theirs = getattr(diffusers, name).from_config(euler[1].config, **{ramp: True})
            ours.set_timesteps(8)
            theirs.set_timesteps(8)
        assert_close(ours.sigmas, theirs.sigmas.float(), f"{name} {ramp} sigmas")


def test_heun_exp_beta_schedule_matches_diffusers():
    ours, theirs = pair("HeunDiscreteScheduler", beta_schedule="exp")
    assert torch.equal(ours.betas, theirs.betas)
    sample = dummy_sample()
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(4)
    assert torch.equal(ours.sigmas, theirs.sigmas) and torch.equal(ours.timesteps, theirs.timesteps)
    for t in ours.timesteps[:3]:
        model_output = fake_model(sample, t)
        ours.scale_model_input(sample, t), theirs.scale_model_input(sample, t)
        mine, oracle = ours.step(model_output, t, sample).prev_sample, theirs.step(model_output, t, sample).prev_sample
        assert_close(mine, oracle, "Heun exp prev_sample")
        sample = mine
    with pytest.raises(ValueError, match="unknown beta_schedule 'exp'"):  # the other classes do not offer it
        minidiff.EulerDiscreteScheduler(beta_schedule="exp")
