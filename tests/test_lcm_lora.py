"""LCM-LoRA through `load_lora_weights`: a random LoRA in lcm-lora-sdv1-5's key layout gives diffusers' 4-step images.

latent-consistency/lcm-lora-sdv1-5's `pytorch_lora_weights.safetensors` is a kohya-style file on the UNet only:
`lora_unet_<diffusers module path, "." -> "_">.lora_down.weight / .lora_up.weight / .alpha`, on the attention
projections, proj_in / proj_out, the feed-forward layers, and the resnets' convolutions and time projections.
The test writes such a file for the tiny UNet (random, rank 4, alpha 2), loads it into both pipelines, and runs
the recipe (LCMScheduler, 4 steps, guidance 1). Skipped until minidiff's pipelines have `load_lora_weights`.
"""

import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from minidiff import LCMScheduler, StableDiffusionPipeline

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

ATOL = 1e-4
LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2", "time_emb_proj")


def lcm_lora_state_dict(unet: torch.nn.Module, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict:
    """A random LoRA for `unet` in LCM-LoRA's kohya key layout (linear and conv layers alike: lora_down, lora_up, alpha)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if not name.endswith(LORA_TARGETS) or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        if isinstance(module, torch.nn.Linear):
            down = torch.randn(rank, module.in_features, generator=generator) * 0.1
            up = torch.randn(module.out_features, rank, generator=generator) * 0.1
        else:  # conv: down has the layer's kernel, up is 1x1
            down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=generator) * 0.1
            up = torch.randn(module.out_channels, rank, 1, 1, generator=generator) * 0.1
        state[f"{key}.lora_down.weight"] = down
        state[f"{key}.lora_up.weight"] = up
        state[f"{key}.alpha"] = torch.tensor(alpha)
    return state


@pytest.fixture(scope="module")
def lora_file(tiny_sd15_folder, tmp_path_factory):
    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_sd15_folder / "unet")
    path = tmp_path_factory.mktemp("lcm-lora") / "pytorch_lora_weights.safetensors"
    state = lcm_lora_state_dict(unet)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in state
    assert "lora_unet_up_blocks_1_resnets_0_conv1.alpha" in state
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    return path


def test_diffusers_reads_the_layout(tiny_sd15_folder, lora_file):
    """The oracle accepts the file as a LoRA and it changes the UNet (so the layout test below means something)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_sd15_folder), safety_checker=None,
                                                                 requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a cat", height=64, width=64, num_inference_steps=4, guidance_scale=1.0, output_type="np")
    pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
    before = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(str(lora_file))
    after = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(after - before).max() > 1e-3


@pytest.mark.skipif(not hasattr(StableDiffusionPipeline, "load_lora_weights"),
                    reason="minidiff's pipelines have no load_lora_weights yet (the LoRA issue)")
@pytest.mark.parametrize("fuse", [False, True])
def test_lcm_lora_recipe_equals_diffusers(tiny_sd15_folder, lora_file, fuse):
    ours = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_sd15_folder), safety_checker=None,
                                                                   requires_safety_checker=False)
    for pipe, scheduler_class in ((ours, LCMScheduler), (theirs, diffusers.LCMScheduler)):
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
        pipe.load_lora_weights(str(lora_file))
        if fuse:
            pipe.fuse_lora()
    kwargs = dict(prompt="a cat", height=64, width=64, num_inference_steps=4, guidance_scale=1.0, output_type="np")
    a = ours(generator=torch.Generator().manual_seed(0), **kwargs).images
    b = theirs(generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
