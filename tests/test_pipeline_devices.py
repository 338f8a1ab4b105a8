"""The pipelines' GPU path, proved without a GPU.

- PyTorch's `meta` device stands in for CUDA: a tensor made on the CPU that meets a meta tensor raises, and so
  does `.item()` or any read of device data. Every sampler runs txt2img and img2img with the models on `meta`.
- float16 on a CPU: the dtype path (img2img used to crash: the VAE was upcast, the image was not), with diffusers'
  latents as the oracle.
- `pipe.to(...)` in every form diffusers' accepts, `pipe.dtype`, `_execution_device`, CPU offload's hooks.
"""

import warnings

import diffusers
import minidiff
import numpy as np
import pytest
import torch
from PIL import Image

from minidiff import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from minidiff.pipelines.offload import ModelOffload
from minidiff.schedulers.names import SAMPLER_NAMES

PROMPT = "a photo of a cat"
IMAGE = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def on_meta(tiny_sd15_folder):
    txt2img = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder).to("meta")
    txt2img.set_progress_bar_config(disable=True)
    img2img = StableDiffusionImg2ImgPipeline(**txt2img.components)
    img2img.set_progress_bar_config(disable=True)
    return txt2img, img2img, dict(txt2img.scheduler.config)


@pytest.mark.parametrize("name", [row.name for row in SAMPLER_NAMES if row.family != "flow"])  # LCM and TCD too
def test_every_sampler_runs_with_the_models_on_another_device(on_meta, name):
    """Noise from a CPU generator, then everything on the models' device: nothing made on the CPU meets them.
    (The flow scheduler runs with the rectified-flow pipeline: tests/test_rectified_flow.py.)"""
    txt2img, img2img, sd15_config = on_meta
    row = next(row for row in SAMPLER_NAMES if row.name == name)
    for pipeline, inputs in ((txt2img, {"height": 64, "width": 64}), (img2img, {"image": IMAGE, "strength": 0.6})):
        pipeline.scheduler = row.from_config(sd15_config)
        latents = pipeline(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                           output_type="latent", **inputs).images
        assert latents.device.type == "meta" and latents.shape == (1, 4, 8, 8)


def test_to_takes_every_form_diffusers_takes(tiny_sd15_folder):
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder)
    assert pipeline.to(torch.float16) is pipeline
    assert pipeline.dtype == pipeline.unet.dtype == pipeline.vae.dtype == torch.float16
    pipeline.to("cpu", torch.float32)
    assert pipeline.dtype == torch.float32 and pipeline.device == torch.device("cpu")
    pipeline.to(device="meta", dtype=torch.bfloat16)
    assert pipeline.device.type == "meta" and pipeline.vae.dtype == torch.bfloat16
    assert pipeline._execution_device == pipeline.device
    with pytest.warns(FutureWarning, match="`torch_device=` is the old spelling"):
        pipeline.to(torch_device="meta")
    with pytest.raises(ValueError, match="device first"):
        pipeline.to(torch.float16, "cpu")
    with pytest.raises(ValueError, match="device was given twice"):
        pipeline.to("cpu", device="cpu")
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['devce'\\]"):
        pipeline.to(devce="cpu")


def test_ddpm_pipeline_to_float16(tmp_path):
    from minidiff import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8)
    pipeline = DDPMPipeline(unet, DDPMScheduler()).to(torch.float16)
    assert pipeline.dtype == pipeline.unet.dtype == torch.float16
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(generator=torch.Generator().manual_seed(0), num_inference_steps=2, output_type="pt").images
    assert images.dtype == torch.float16


def load_fp16(folder, name: str):
    """(minidiff's, diffusers') pipeline class `name` in float16 from the same folder, progress bars off."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = getattr(diffusers, name).from_pretrained(
            str(folder), torch_dtype=torch.float16, safety_checker=None, requires_safety_checker=False
        )
    ours = getattr(minidiff, name).from_pretrained(folder, dtype=torch.float16)
    for pipeline in (ours, theirs):
        pipeline.set_progress_bar_config(disable=True)
    return ours, theirs


@pytest.fixture(scope="module")
def both_fp16(tiny_sd15_folder):
    return load_fp16(tiny_sd15_folder, "StableDiffusionPipeline")


DETERMINISTIC = [
    "PNDMScheduler", "DDIMScheduler", "DDPMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler", "UniPCMultistepScheduler"]  # DPM++ SDE draws its Brownian seed from the global RNG
DEFAULT_GRID = {"PNDMScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"}


@pytest.mark.parametrize("scheduler_name", [
    name if name in DEFAULT_GRID else pytest.param(name, marks=pytest.mark.long) for name in DETERMINISTIC
])
def test_float16_txt2img_latents_equal_diffusers_exactly(both_fp16, scheduler_name):
    ours, theirs = both_fp16
    ours.scheduler = getattr(minidiff, scheduler_name).from_config(ours.scheduler.config)
    theirs.scheduler = getattr(diffusers, scheduler_name).from_config(ours.scheduler.config)
    kwargs = dict(prompt=PROMPT, height=64, width=64, num_inference_steps=4, output_type="latent")
    a = ours(generator=torch.Generator().manual_seed(0), **kwargs).images
    b = theirs(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert a.dtype == b.dtype == torch.float16
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_float16_img2img_runs_and_equals_diffusers(tiny_sd15_folder):
    """It crashed before ("Input type (c10::Half) and bias type (float)"): the VAE was upcast, the image was not."""
    ours, theirs = load_fp16(tiny_sd15_folder, "StableDiffusionImg2ImgPipeline")
    assert ours.vae.dtype == torch.float16  # as diffusers' SD 1.x pipelines: no VAE upcast
    kwargs = dict(prompt=PROMPT, image=IMAGE, strength=0.75, num_inference_steps=4)
    a = ours(generator=torch.Generator().manual_seed(1), output_type="latent", **kwargs).images
    b = theirs(generator=torch.Generator().manual_seed(1), output_type="latent", **kwargs).images
    # To the bit, on channels-last latents (both libraries keep the layout of the PIL array): it differed by up to
    # 3e-2 while minidiff's Transformer2DModel kept that layout where diffusers makes its output contiguous, and the
    # CPU's float16 GroupNorm sums in another order on channels-last maps (PNDM's multistep sums carried the 1e-3).
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    ours.scheduler = minidiff.DDIMScheduler.from_config(ours.scheduler.config)
    theirs.scheduler = diffusers.DDIMScheduler.from_config(theirs.scheduler.config)
    a = ours(generator=torch.Generator().manual_seed(1), output_type="latent", **kwargs).images
    b = theirs(generator=torch.Generator().manual_seed(1), output_type="latent", **kwargs).images
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # DDIM's calls on those latents agree to the bit
    pixels = ours(generator=torch.Generator().manual_seed(1), output_type="pt", **kwargs).images
    assert pixels.dtype == torch.float16 and torch.isfinite(pixels).all()


def test_upcast_vae_decodes_in_float32_and_img2img_still_runs(both_fp16):
    ours_txt2img, _ = both_fp16
    pipeline = StableDiffusionImg2ImgPipeline(**{**ours_txt2img.components, "vae": ours_txt2img.vae})
    pipeline.set_progress_bar_config(disable=True)
    pipeline.upcast_vae()
    try:
        out = pipeline(PROMPT, image=IMAGE, strength=0.5, num_inference_steps=2, output_type="pt",
                       generator=torch.Generator().manual_seed(0)).images
        assert pipeline.vae.dtype == torch.float32 and out.dtype == torch.float32 and pipeline.unet.dtype == torch.float16
    finally:
        pipeline.vae.to(torch.float16)


def test_vae_slicing_gives_the_same_images(tiny_sd15_folder):
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder)
    pipeline.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=[PROMPT, "a dog"], height=64, width=64, num_inference_steps=2, output_type="pt")
    whole = pipeline(generator=torch.Generator().manual_seed(0), **kwargs).images
    pipeline.enable_vae_slicing()
    sliced = pipeline(generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(sliced, whole, rtol=0, atol=1e-6)


def test_model_offload_moves_one_model_at_a_time_in_the_order_they_run(tiny_sd15_folder):
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder)
    pipeline.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPT, height=64, width=64, num_inference_steps=2, output_type="latent")
    plain = pipeline(generator=torch.Generator().manual_seed(0), **kwargs).images
    # The offload target would be a GPU; on a CPU machine the same hooks run with the CPU as the target.
    offload = ModelOffload(list(pipeline._models().values()), torch.device("cpu"))
    pipeline._offload = offload
    entered = []
    onload = offload._onload

    def recording_onload(model, module, args):
        if offload.active is not model:
            entered.append(type(model).__name__)
        onload(model, module, args)

    offload._onload = recording_onload
    for handle in offload.handles:
        handle.remove()
    offload.handles = [entry.register_forward_pre_hook(lambda module, args, model=model: recording_onload(model, module, args))
                       for model in pipeline._models().values() for entry in (model, *model.children())]
    kwargs["output_type"] = "np"
    with_offload = pipeline(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert entered == ["CLIPTextModel", "UNet2DConditionModel", "AutoencoderKL"]
    assert offload.active is None  # maybe_free_model_hooks sent the VAE back after the image
    kwargs["output_type"] = "latent"
    torch.testing.assert_close(pipeline(generator=torch.Generator().manual_seed(0), **kwargs).images, plain, rtol=0, atol=0)
    assert with_offload.shape == (1, 64, 64, 3)
    pipeline.remove_all_hooks()
    assert pipeline._offload is None


def test_sequential_offload_computes_every_layer_on_the_target_device(tiny_sd15_folder):
    """With `meta` as the target, any weight used outside its own layer's forward would meet meta inputs on the CPU."""
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.enable_sequential_cpu_offload(device="meta")
    assert pipeline._execution_device == torch.device("meta", 0) and pipeline.device.type == "cpu"
    latents = pipeline(PROMPT, height=64, width=64, num_inference_steps=2, output_type="latent",
                       generator=torch.Generator().manual_seed(0)).images
    assert latents.device.type == "meta"
    assert all(p.device.type == "cpu" for p in pipeline.unet.parameters())  # the weights never left the CPU
    with pytest.raises(ValueError, match="remove_all_hooks"):
        pipeline.to("meta")
    pipeline.remove_all_hooks()


def test_offload_without_a_gpu_is_a_clear_error(tiny_sd15_folder, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder)
    with pytest.raises(RuntimeError, match="PyTorch sees no GPU"):
        pipeline.enable_model_cpu_offload()


def test_xformers_switch_is_a_documented_no_op(tiny_sd15_folder):
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder)
    processors = dict(pipeline.unet.attn_processors)
    with pytest.warns(UserWarning, match="scaled_dot_product_attention"):
        pipeline.enable_xformers_memory_efficient_attention()
    assert dict(pipeline.unet.attn_processors) == processors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_txt2img_close_to_diffusers(tiny_sd15_folder, dtype):
    """On a GPU machine: the same pipeline on CUDA, against diffusers on CUDA, CPU generator."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = diffusers.StableDiffusionPipeline.from_pretrained(
            str(tiny_sd15_folder), torch_dtype=dtype, safety_checker=None, requires_safety_checker=False).to("cuda")
    ours = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder, dtype=dtype).to("cuda")
    kwargs = dict(prompt=PROMPT, height=64, width=64, num_inference_steps=4, output_type="latent")
    a = ours(generator=torch.Generator().manual_seed(0), **kwargs).images
    b = theirs(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert a.device.type == "cuda" and torch.isfinite(a).all()
    torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=1e-3 if dtype == torch.float16 else 1e-5)


def test_rectified_flow_pipeline_runs_with_the_models_on_another_device(on_meta):
    from minidiff import RectifiedFlowPipeline

    txt2img, _, _ = on_meta
    pipeline = RectifiedFlowPipeline(**{**txt2img.components, "scheduler": None})
    pipeline.set_progress_bar_config(disable=True)
    latents = pipeline(PROMPT, height=64, width=64, num_inference_steps=3, output_type="latent",
                       generator=torch.Generator().manual_seed(0)).images
    assert latents.device.type == "meta" and latents.shape == (1, 4, 8, 8)


@pytest.mark.parametrize("dtype, keeps_channels_last", [(torch.bfloat16, True), (torch.float16, False), (torch.float32, False)])
def test_transformer_output_layout_is_diffusers_except_in_the_channels_last_cpu_unet(dtype, keeps_channels_last):
    # diffusers makes the map contiguous before proj_out; minidiff keeps channels-last (a view, no copy) only where its
    # CPU UNet runs channels-last (bfloat16: utils/cpu.py's conv_memory_format): elsewhere the layout, and so the
    # float16 sums, are diffusers'.
    from minidiff.models.attention import Transformer2DModel

    block = Transformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=8, norm_num_groups=4,
                               cross_attention_dim=8).to(dtype)
    feature_map = torch.randn(1, 8, 4, 4, dtype=dtype).to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = block(feature_map, torch.randn(1, 3, 8, dtype=dtype))
    assert out.is_contiguous(memory_format=torch.channels_last) == keeps_channels_last
