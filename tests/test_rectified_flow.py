"""SD 1.5 rectified-flow checkpoints (2-rectified flow, InstaFlow) through the pipeline = their published sampler.

The reference is the ten-line loop of the InstaFlow / rectified-flow repositories (pipeline_rf.py), in their
convention: t from 1000 down by 1000/N, the UNet's v points to the data, x += (1/N) v. Written here in our words.
"""

from __future__ import annotations

import pytest
import torch

from minidiff import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, RectifiedFlowPipeline, StableDiffusionPipeline
from minidiff.schedulers import PNDMScheduler


def published_sampler(pipe, latents, prompt_embeds, negative_embeds, N: int, guidance_scale: float) -> torch.Tensor:
    """The rectified-flow repos' loop: t_i = 1000 (1 - i/N), dt = 1/N, x <- x + dt v (guided v)."""
    dt = 1.0 / N
    x = latents.clone()
    for i in range(N):
        t = (1.0 - i / N) * 1000.0
        guided = guidance_scale > 1
        x_in = torch.cat([x, x]) if guided else x
        embeds = torch.cat([negative_embeds, prompt_embeds]) if guided else prompt_embeds
        vec_t = torch.ones(x_in.shape[0]) * t
        with torch.no_grad():
            v = pipe.unet(x_in, vec_t, encoder_hidden_states=embeds).sample
        if guided:
            v_uncond, v_text = v.chunk(2)
            v = v_uncond + guidance_scale * (v_text - v_uncond)
        x = x + dt * v
    return x


@pytest.fixture(scope="module")
def rf_pipe(tiny_sd15_folder):
    return RectifiedFlowPipeline.from_pretrained(tiny_sd15_folder)


@pytest.mark.parametrize("steps, guidance_scale", [(1, 0.0), (4, 1.5), (25, 1.0)])
def test_pipeline_latents_equal_the_published_sampler(rf_pipe, steps, guidance_scale):
    pipe = rf_pipe
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)  # the folder's PNDM config is replaced
    noise = torch.randn(1, pipe.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = pipe("a red cube", negative_prompt="", height=64, width=64, num_inference_steps=steps,
                guidance_scale=guidance_scale, latents=noise, output_type="latent").images
    prompt_embeds, negative_embeds = pipe.encode_prompt("a red cube", None, 1, guidance_scale > 1, "")
    reference = published_sampler(pipe, noise, prompt_embeds, negative_embeds, steps, guidance_scale)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert pipe.scheduler.timesteps[0] == 1000 and pipe.scheduler.sigmas[-1] == 0
    torch.testing.assert_close(pipe.scheduler.timesteps, torch.tensor([1000.0 * (1 - i / steps) for i in range(steps)]))


def test_denoise_yields_the_x0_estimate_of_the_straight_line(rf_pipe):
    """x0 = x - sigma u: one step from sigma = 1 to 0 lands exactly on it."""
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    steps = list(rf_pipe.denoise("x", height=64, width=64, num_inference_steps=1, guidance_scale=1.0, latents=noise))
    torch.testing.assert_close(steps[0].pred_original_sample, steps[0].latents, rtol=1e-5, atol=1e-6)
    steps = list(rf_pipe.denoise("x", height=64, width=64, num_inference_steps=3, guidance_scale=1.0, latents=noise))
    assert all(step.pred_original_sample is not None for step in steps)
    torch.testing.assert_close(steps[-1].pred_original_sample, steps[-1].latents, rtol=1e-5, atol=1e-6)  # last: to 0


def test_stable_diffusion_pipeline_with_the_flow_scheduler_takes_diffusers_sign(tiny_sd15_folder):
    """A velocity model in diffusers' sign (noise - data) runs in StableDiffusionPipeline itself, on the same levels;
    RectifiedFlowPipeline differs only by the sign of the velocity. One step from the same noise: x_1 - x_0 = -v vs +v."""
    plain = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder)
    plain.scheduler = FlowMatchEulerDiscreteScheduler()
    rf = RectifiedFlowPipeline(**plain.components)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(height=64, width=64, num_inference_steps=1, guidance_scale=1.0, latents=noise, output_type="latent")
    a, b = plain("x", **kwargs).images, rf("x", **kwargs).images
    torch.testing.assert_close(a - noise, -(b - noise), rtol=1e-5, atol=1e-6)
    assert (a - b).abs().max() > 1e-2  # and the sign matters


def test_from_model_index_and_a_wrong_scheduler(tiny_sd15_folder, tmp_path):
    rf = RectifiedFlowPipeline.from_pretrained(tiny_sd15_folder)
    rf.save_pretrained(tmp_path / "rf")
    assert '"RectifiedFlowPipeline"' in (tmp_path / "rf" / "model_index.json").read_text()
    again = DiffusionPipeline.from_pretrained(tmp_path / "rf")
    assert type(again) is RectifiedFlowPipeline
    again.scheduler = PNDMScheduler()
    with pytest.raises(ValueError, match="predict a velocity"):
        again("x", height=64, width=64, num_inference_steps=2, output_type="latent")
