"""KDPM2DiscreteScheduler and KDPM2AncestralDiscreteScheduler against diffusers 0.42.1: timesteps, sigmas and every
`step` output over a config grid (seeded for the ancestral one), and the tiny SD pipeline with each."""

from __future__ import annotations

import itertools

import diffusers
import numpy as np
import pytest
import torch

from minidiff import KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, PNDMScheduler
from scheduler_parity import assert_close, dummy_sample, run_parity

# diffusers' KDPM2 computes each midpoint's timestep with numpy ufuncs on torch tensors, and numpy 2 warns
# (DeprecationWarning, __array_wrap__) a thousand times per scheduler built: ignored here, it is not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
PAIRS = [(KDPM2DiscreteScheduler, diffusers.KDPM2DiscreteScheduler, None),
         (KDPM2AncestralDiscreteScheduler, diffusers.KDPM2AncestralDiscreteScheduler, 0)]  # (ours, theirs, seed)


# Each spacing, each sigma ramp and each prediction type at least once by default; the rest with `pytest -m long`
# (diffusers' KDPM2 takes about half a second to build, so each case costs over a second).
DEFAULT_GRID = [("linspace", {}, "epsilon"), ("leading", {}, "epsilon"), ("trailing", {}, "epsilon"),
                ("linspace", {"use_karras_sigmas": True}, "epsilon"), ("trailing", {"use_exponential_sigmas": True}, "epsilon"),
                ("leading", {}, "v_prediction")]


@pytest.mark.parametrize("pair", PAIRS, ids=["KDPM2", "KDPM2 ancestral"])
@pytest.mark.parametrize(
    "spacing, noise_levels, prediction_type",
    [pytest.param(*case, marks=[] if case in DEFAULT_GRID else [pytest.mark.long]) for case in
     [(spacing, levels, "epsilon") for spacing, levels in itertools.product(
         ["linspace", "leading", "trailing"], [{}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}])]
     + [(spacing, {}, "v_prediction") for spacing in ("linspace", "leading", "trailing")]],
)
def test_matches_diffusers_on_a_grid(pair, spacing, noise_levels, prediction_type):
    ours, theirs, seed = pair
    config = dict(SD15, timestep_spacing=spacing, prediction_type=prediction_type, steps_offset=1 if spacing == "leading" else 0,
                  **noise_levels)
    for steps in (1, 7):
        run_parity(ours, theirs, config, steps, seed=seed)


@pytest.mark.parametrize("pair", PAIRS, ids=["KDPM2", "KDPM2 ancestral"])
def test_long_runs_beta_sigmas_and_other_beta_schedules(pair):
    ours, theirs, seed = pair
    for steps in (10, 101):
        run_parity(ours, theirs, SD15, steps, seed=seed)
    beta = [cls(**SD15, use_beta_sigmas=True) for cls in (ours, theirs)]
    for scheduler in beta:
        scheduler.set_timesteps(20)
    # Beta quantiles: minidiff's bisection vs scipy's, equal to ~1e-15 relative (timesteps not bit for bit)
    assert_close(beta[0].timesteps, beta[1].timesteps, "beta-sigma timesteps", rtol=1e-9, atol=0)
    assert_close(beta[0].sigmas, beta[1].sigmas, "beta sigmas", rtol=1e-6, atol=0)
    run_parity(ours, theirs, dict(beta_schedule="linear"), 20, seed=seed)


@pytest.mark.parametrize("pair", PAIRS, ids=["KDPM2", "KDPM2 ancestral"])
def test_sample_prediction_which_diffusers_refuses_is_the_model_output(pair):
    ours_class, theirs_class, _ = pair
    ours = ours_class(**SD15, prediction_type="sample")
    ours.set_timesteps(3)
    x0 = dummy_sample(seed=3)
    out = ours.step(x0, ours.timesteps[0], dummy_sample() * ours.init_noise_sigma, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.pred_original_sample, x0)
    theirs = theirs_class(**SD15, prediction_type="sample")
    theirs.set_timesteps(3)
    with pytest.raises(NotImplementedError):
        theirs.step(x0, theirs.timesteps[0], dummy_sample())


@pytest.mark.parametrize("pair", PAIRS, ids=["KDPM2", "KDPM2 ancestral"])
def test_before_set_timesteps_add_noise_and_the_tutorial_swap(pair):
    ours_class, theirs_class, _ = pair
    ours, theirs = ours_class(**SD15), theirs_class(**SD15)
    assert_close(ours.timesteps, theirs.timesteps, "timesteps before set_timesteps", rtol=0, atol=0)
    ours.set_timesteps(6)
    theirs.set_timesteps(6)
    x0, noise = dummy_sample(seed=1), dummy_sample(seed=2)
    t = ours.timesteps[[0, 4]]
    assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), "add_noise")
    pndm = PNDMScheduler(**SD15, skip_prk_steps=True, steps_offset=1)
    swapped = ours_class.from_config(pndm.config)
    assert swapped.config.timestep_spacing == "linspace" and ours_class in pndm.compatibles


@pytest.mark.parametrize("pair", PAIRS, ids=["KDPM2", "KDPM2 ancestral"])
def test_tiny_pipeline_gives_diffusers_image(tiny_sd15_folder, pair):
    from minidiff import StableDiffusionPipeline

    ours_class, theirs_class, _ = pair
    ours = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd15_folder, safety_checker=None, requires_safety_checker=False)
    ours.scheduler = ours_class.from_config(ours.scheduler.config)
    theirs.scheduler = theirs_class.from_config(theirs.scheduler.config)
    images = []
    for pipeline in (ours, theirs):
        pipeline.set_progress_bar_config(disable=True)
        images.append(pipeline("a cat", height=64, width=64, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                               output_type="np").images)
    np.testing.assert_allclose(images[0], images[1], rtol=0, atol=1e-5)
