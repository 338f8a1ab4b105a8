"""HeunDiscreteScheduler against diffusers 0.42.1: timesteps, sigmas and every `step` output, over a config grid;
and the tiny SD pipeline (txt2img and img2img) giving diffusers' image with it."""

from __future__ import annotations

import itertools

import diffusers
import numpy as np
import pytest
import torch

from minidiff import HeunDiscreteScheduler, PNDMScheduler
from scheduler_parity import assert_close, dummy_sample, run_parity

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize(
    "spacing, noise_levels, prediction_type",
    list(itertools.product(
        ["linspace", "leading", "trailing"],
        [{}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}],
        ["epsilon", "v_prediction", "sample"],
    )),
)
def test_heun_matches_diffusers_on_a_grid(spacing, noise_levels, prediction_type):
    config = dict(SD15, timestep_spacing=spacing, prediction_type=prediction_type, steps_offset=1 if spacing == "leading" else 0,
                  **noise_levels)
    for steps in (1, 2, 7):
        run_parity(HeunDiscreteScheduler, diffusers.HeunDiscreteScheduler, config, steps)


@pytest.mark.parametrize("steps", [3, 25, 50, 101])
def test_heun_long_and_odd_step_counts_clip_sample_and_beta_sigmas(steps):
    run_parity(HeunDiscreteScheduler, diffusers.HeunDiscreteScheduler, dict(SD15, clip_sample=True, clip_sample_range=0.5), steps)
    if steps == 25:
        run_parity(HeunDiscreteScheduler, diffusers.HeunDiscreteScheduler, dict(SD15, use_beta_sigmas=True), steps)
        run_parity(HeunDiscreteScheduler, diffusers.HeunDiscreteScheduler, dict(beta_schedule="linear"), steps)


def test_timesteps_have_2n_minus_1_entries_and_the_state_alternates():
    ours = HeunDiscreteScheduler(**SD15)
    ours.set_timesteps(4)
    assert len(ours.timesteps) == 2 * 4 - 1 and len(ours.sigmas) == 2 * 4
    sample, states = dummy_sample(), []
    for t in ours.timesteps:
        states.append(ours.state_in_first_order)
        sample = ours.step(ours.scale_model_input(sample, t) * 0.1, t, sample).prev_sample
    assert states == [True, False, True, False, True, False, True]  # the last step, to sigma = 0, is Euler only


def test_before_set_timesteps_and_custom_timesteps_add_noise_as_diffusers():
    ours, theirs = HeunDiscreteScheduler(**SD15), diffusers.HeunDiscreteScheduler(**SD15)
    assert_close(ours.timesteps, theirs.timesteps, "timesteps before set_timesteps", rtol=0, atol=0)
    assert ours.num_inference_steps == theirs.num_inference_steps == 1000
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(timesteps=[900, 600, 300, 50])
    assert_close(ours.timesteps, theirs.timesteps, "custom timesteps", rtol=0, atol=0)
    assert_close(ours.sigmas, theirs.sigmas, "custom sigmas")
    x0, noise = dummy_sample(seed=1), dummy_sample(seed=2)
    t = ours.timesteps[[0, 3]]
    assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), "add_noise")
    for scheduler in (ours, theirs):
        scheduler.set_begin_index(2)
    assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), "add_noise after set_begin_index")
    with pytest.raises(ValueError, match="exactly one"):
        ours.set_timesteps(5, timesteps=[900, 100])
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        HeunDiscreteScheduler(use_karras_sigmas=True).set_timesteps(timesteps=[900, 100])


def test_from_config_round_trips_with_the_tutorial_swap():
    pndm = PNDMScheduler(**SD15, skip_prk_steps=True, steps_offset=1)
    heun = HeunDiscreteScheduler.from_config(pndm.config)
    assert heun.config.timestep_spacing == "linspace" and heun.config.beta_schedule == "scaled_linear"
    back = PNDMScheduler.from_config(heun.config)
    assert back.config.skip_prk_steps is True and back.config.steps_offset == 1
    assert HeunDiscreteScheduler in pndm.compatibles and PNDMScheduler in heun.compatibles


@pytest.mark.parametrize("strength", [None, 0.5, 0.75])
def test_tiny_pipeline_gives_diffusers_image_with_heun(tiny_sd15_folder, strength):
    from PIL import Image

    from minidiff import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    if strength is None:
        ours = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder)
        theirs = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd15_folder, safety_checker=None, requires_safety_checker=False)
        kwargs = dict(height=64, width=64)
    else:
        ours = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd15_folder)
        theirs = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd15_folder, safety_checker=None, requires_safety_checker=False)
        picture = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
        kwargs = dict(image=picture, strength=strength)
    ours.scheduler = HeunDiscreteScheduler.from_config(ours.scheduler.config)
    theirs.scheduler = diffusers.HeunDiscreteScheduler.from_config(theirs.scheduler.config)
    for pipeline in (ours, theirs):
        pipeline.set_progress_bar_config(disable=True)
    images = [p("a cat", num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images
              for p in (ours, theirs)]
    np.testing.assert_allclose(images[0], images[1], rtol=0, atol=1e-5)
