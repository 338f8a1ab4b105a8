"""The coursework's own loops, run with minidiff and with diffusers on the same weights.

- fast.ai's "Stable Diffusion Deep Dive", loss guidance: the gradient of a colour loss on the decoded predicted
  x0 with respect to the latents, taken inside an LMSDiscreteScheduler loop with classifier-free guidance.
- Hugging Face's diffusion-models-class, unit 1: train a small UNet2DModel with DDPMScheduler.add_noise, sample
  with DDPMPipeline, save, reload (here and in diffusers), and the course's hand-written sampling loop.

Tolerances: losses and gradients rtol 1e-4 (atol 1e-6) against diffusers (same float32 math, different
kernels and summation order); a pipeline reloaded from its own folder gives the same images exactly.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from minidiff.models.clip_text import CLIPTextModel
from minidiff.models.unet_2d_condition import UNet2DConditionModel
from minidiff.models.vae import AutoencoderKL
from minidiff.schedulers.lms import LMSDiscreteScheduler
from minidiff.tokenizer import CLIPTokenizer

diffusers = pytest.importorskip("diffusers")

# diffusers' LMS scheduler builds its sigmas with np.array(tensor), which numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

RTOL, ATOL = 1e-4, 1e-6


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=ATOL)


# ----- the Deep Dive: loss guidance -------------------------------------------------------------------


def blue_loss(images: torch.Tensor) -> torch.Tensor:
    """The Deep Dive's colour loss: how far the blue channel is from 0.9, on average."""
    return torch.abs(images[:, 2] - 0.9).mean()


@pytest.fixture(scope="module")
def deep_dive_parts(tiny_sd15_folder):
    """(minidiff's unet, vae, text embeddings [uncond; cond]), (diffusers' unet, vae) from the same folder."""
    folder = tiny_sd15_folder
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    ids = tokenizer(["", "a watercolor painting of a lighthouse"], padding="max_length",
                    max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        text_embeddings = text_encoder(ids)[0]  # (2, 77, 32): [uncond; cond], as the notebook concatenates them
    ours = (UNet2DConditionModel.from_pretrained(folder, subfolder="unet"), AutoencoderKL.from_pretrained(folder, subfolder="vae"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = (diffusers.UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet"),
                  diffusers.AutoencoderKL.from_pretrained(str(folder), subfolder="vae"))
    return ours, theirs, text_embeddings


def loss_guided_loop(unet, vae, scheduler, text_embeddings, through_unet: bool, guidance_scale=7.5, loss_scale=200,
                     steps=4):
    """The Deep Dive's sampling loop with loss guidance at every step; returns [(loss, grad)] and the final latents.

    As the notebook: x0 = latents - sigma * eps, decoded and mapped to [0, 1], blue_loss, and the gradient moves
    the latents by -grad * sigma^2. `through_unet=False` is the notebook's cheap variant (eps under no_grad, so
    the gradient flows through the VAE only); `True` also differentiates the UNet's prediction.
    """
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator) * scheduler.init_noise_sigma
    history = []
    for i, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i]
        latents = latents.detach().requires_grad_()
        with torch.set_grad_enabled(through_unet):
            latent_model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise_pred = unet(latent_model_input, t, encoder_hidden_states=text_embeddings).sample
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        latents_x0 = latents - sigma * noise_pred
        denoised_images = vae.decode((1 / 0.18215) * latents_x0).sample / 2 + 0.5  # (1, 3, 64, 64) in [0, 1]
        loss = blue_loss(denoised_images) * loss_scale
        cond_grad = torch.autograd.grad(loss, latents)[0]
        history.append((loss.detach(), cond_grad))
        latents = latents.detach() - cond_grad * sigma**2
        latents = scheduler.step(noise_pred.detach(), t, latents).prev_sample
    return history, latents


@pytest.mark.parametrize("through_unet", [False, True], ids=["notebook", "through-unet"])
def test_loss_guidance_gradients_equal_diffusers(deep_dive_parts, tiny_sd15_folder, through_unet):
    (unet, vae), (their_unet, their_vae), text_embeddings = deep_dive_parts
    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    ours, final = loss_guided_loop(unet, vae, LMSDiscreteScheduler(**config), text_embeddings, through_unet)
    theirs, their_final = loss_guided_loop(their_unet, their_vae, diffusers.LMSDiscreteScheduler(**config),
                                           text_embeddings, through_unet)
    for (loss, grad), (their_loss, their_grad) in zip(ours, theirs, strict=True):
        assert_close(loss, their_loss)
        assert_close(grad, their_grad)
        assert grad.abs().sum() > 0  # the colour loss does reach the latents
    assert_close(final, their_final)
