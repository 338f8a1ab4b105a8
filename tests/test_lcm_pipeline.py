"""Few-step sampling against diffusers 0.42.1 on tiny random weights: the UNet's guidance embedding
(time_cond_proj_dim, timestep_cond), LatentConsistencyModelPipeline, and StableDiffusionPipeline with LCMScheduler /
TCDScheduler (the LCM-LoRA recipe, and CFG's rule). Images in [0, 1] within 1e-4, tensors within 1e-5."""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

import minidiff
from minidiff import DiffusionPipeline, LatentConsistencyModelPipeline, StableDiffusionPipeline, UNet2DConditionModel
from minidiff.models.layers import guidance_scale_embedding

diffusers = pytest.importorskip("diffusers")

ATOL = 1e-4
PROMPT = "a photograph of an astronaut riding a horse"
TINY_LCM_UNET = dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, norm_num_groups=8, attention_head_dim=2,
                     cross_attention_dim=32, sample_size=8, time_cond_proj_dim=16)


@pytest.fixture(scope="module")
def lcm_folder(tiny_sd15_folder, tmp_path_factory):
    """The tiny SD 1.5 folder with an LCM UNet (guidance embedding) and LCM's scheduler, as LCM_Dreamshaper_v7 is laid out."""
    folder = tmp_path_factory.mktemp("tiny-lcm") / "lcm"
    shutil.copytree(tiny_sd15_folder, folder)
    config = json.loads((tiny_sd15_folder / "unet" / "config.json").read_text())
    config = {key: value for key, value in config.items() if not key.startswith("_")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        diffusers.UNet2DConditionModel(**{**config, **TINY_LCM_UNET}).save_pretrained(folder / "unet")
    diffusers.LCMScheduler.from_config(diffusers.PNDMScheduler.from_pretrained(folder / "scheduler").config).save_config(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(_class_name="LatentConsistencyModelPipeline", scheduler=["diffusers", "LCMScheduler"])
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def lcm_pair(lcm_folder):
    ours = DiffusionPipeline.from_pretrained(lcm_folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = diffusers.LatentConsistencyModelPipeline.from_pretrained(str(lcm_folder), safety_checker=None,
                                                                         requires_safety_checker=False)
    ours.set_progress_bar_config(disable=True)
    theirs.set_progress_bar_config(disable=True)
    return ours, theirs


def test_guidance_scale_embedding_equals_diffusers(lcm_pair):
    w = torch.tensor([0.0, 1.5, 7.5])
    for dim in (16, 17, 256):
        expected = lcm_pair[1].get_guidance_scale_embedding(w, embedding_dim=dim)
        assert torch.equal(guidance_scale_embedding(w, dim), expected)
    with pytest.raises(ValueError, match="1-D tensor"):
        guidance_scale_embedding(torch.tensor(7.5), 16)


def test_unet_guidance_embedding_equals_diffusers(lcm_folder):
    theirs = diffusers.UNet2DConditionModel.from_pretrained(lcm_folder / "unet").eval()
    ours = UNet2DConditionModel.from_pretrained(lcm_folder / "unet")
    assert ours.config.time_cond_proj_dim == 16 and ours.time_embedding.cond_proj.weight.shape == (32, 16)
    generator = torch.Generator().manual_seed(0)
    latents, context = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 32, generator=generator)
    condition = guidance_scale_embedding(torch.tensor([7.5, 1.0]), 16)
    with torch.no_grad():
        expected = theirs(latents, 499, context, timestep_cond=condition).sample
        got = ours(latents, 499, context, timestep_cond=condition).sample
        unconditioned = ours(latents, 499, context).sample
    assert (got - expected).abs().max().item() <= 1e-5
    assert (got - unconditioned).abs().max().item() > 1e-4  # the condition is used


def test_a_condition_for_a_unet_without_guidance_embedding_is_refused(tiny_sd15_folder):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15_folder / "unet")
    with pytest.raises(ValueError, match="no time_cond_proj_dim"):
        unet(torch.zeros(1, 4, 8, 8), 1, torch.zeros(1, 77, 32), timestep_cond=torch.zeros(1, 16))


@pytest.mark.parametrize("kwargs", [
    dict(),  # diffusers' defaults: 4 steps, guidance 8.5
    dict(num_inference_steps=2, guidance_scale=1.0, num_images_per_prompt=2),
    dict(num_inference_steps=3, original_inference_steps=25),
    dict(timesteps=[999, 499, 259]),
])
def test_latent_consistency_pipeline_equals_diffusers(lcm_pair, kwargs):
    ours, theirs = lcm_pair
    assert isinstance(ours, LatentConsistencyModelPipeline) and isinstance(ours.scheduler, minidiff.LCMScheduler)
    kwargs = dict(prompt=PROMPT, height=64, width=64, output_type="np", **kwargs)
    a = ours(generator=torch.Generator().manual_seed(0), **kwargs).images
    b = theirs(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_latent_consistency_pipeline_needs_the_guidance_embedding(tiny_sd15_folder):
    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny_sd15_folder)
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        pipe(PROMPT, num_inference_steps=4)


def test_sd_pipeline_with_an_lcm_unet_skips_cfg_and_uses_the_embedding(lcm_folder, lcm_pair):
    """StableDiffusionPipeline's rule, as diffusers': CFG only when guidance_scale > 1 and no time_cond_proj_dim."""
    ours = StableDiffusionPipeline(**{k: v for k, v in lcm_pair[0].components.items() if k not in ("safety_checker", "feature_extractor")})
    theirs = diffusers.StableDiffusionPipeline(**lcm_pair[1].components)
    ours.set_progress_bar_config(disable=True)
    calls = []
    ours.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    kwargs = dict(prompt=PROMPT, height=64, width=64, num_inference_steps=4, guidance_scale=5.0, output_type="np")
    a = ours(generator=torch.Generator().manual_seed(1), **kwargs).images
    b = theirs(generator=torch.Generator().manual_seed(1), **kwargs).images
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    assert calls == [1] * 4  # one image per call: no unconditional batch


@pytest.fixture(scope="module")
def sd_pair(tiny_sd15_folder):
    ours = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_sd15_folder), safety_checker=None,
                                                                   requires_safety_checker=False)
    ours.set_progress_bar_config(disable=True)
    theirs.set_progress_bar_config(disable=True)
    return ours, theirs


@pytest.mark.parametrize("scheduler_name, extra", [
    ("LCMScheduler", dict(guidance_scale=1.0)),  # the LCM-LoRA recipe (here without the LoRA)
    ("LCMScheduler", dict(guidance_scale=1.5)),  # CFG on: a batch of two
    ("TCDScheduler", dict(guidance_scale=1.0, eta=0.3)),  # TCD's recipe, gamma = 0.3
    ("TCDScheduler", dict(guidance_scale=1.0)),  # eta defaults to 0 in the pipeline: deterministic TCD
])
def test_sd_pipeline_with_few_step_schedulers_equals_diffusers(sd_pair, scheduler_name, extra):
    ours, theirs = sd_pair
    ours.scheduler = getattr(minidiff, scheduler_name).from_config(ours.scheduler.config)
    theirs.scheduler = getattr(diffusers, scheduler_name).from_config(theirs.scheduler.config)
    kwargs = dict(prompt=PROMPT, height=64, width=64, num_inference_steps=4, output_type="np", **extra)
    a = ours(generator=torch.Generator().manual_seed(2), **kwargs).images
    b = theirs(generator=torch.Generator().manual_seed(2), **kwargs).images
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    steps = list(ours.denoise(PROMPT, height=64, width=64, num_inference_steps=4, generator=torch.Generator().manual_seed(2),
                              **extra))
    assert len(steps) == 4 and all(step.pred_original_sample is not None for step in steps)


@pytest.mark.parametrize("scheduler_name", ["LCMScheduler", "TCDScheduler"])
def test_img2img_with_few_step_schedulers_equals_diffusers(sd_pair, tiny_sd15_folder, scheduler_name):
    from PIL import Image

    from minidiff import StableDiffusionImg2ImgPipeline

    ours = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd15_folder)
    theirs = diffusers.StableDiffusionImg2ImgPipeline(**sd_pair[1].components)
    ours.set_progress_bar_config(disable=True)
    theirs.set_progress_bar_config(disable=True)
    ours.scheduler = getattr(minidiff, scheduler_name).from_config(ours.scheduler.config)
    theirs.scheduler = getattr(diffusers, scheduler_name).from_config(theirs.scheduler.config)
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    kwargs = dict(prompt=PROMPT, image=image, strength=0.5, num_inference_steps=4, guidance_scale=1.0, output_type="np")
    a = ours(generator=torch.Generator().manual_seed(3), **kwargs).images
    b = theirs(generator=torch.Generator().manual_seed(3), **kwargs).images
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
