"""The pipelines against diffusers' (oracle) on the same tiny random SD 1.5 folder: same prompt, seed and steps."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import minidiff
from minidiff.pipelines import DDPMPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

diffusers = pytest.importorskip("diffusers")

# Images are in [0, 1]; both sides run the same float32 arithmetic, so they should agree to rounding.
ATOL = 1e-4
PROMPT = "a photograph of an astronaut riding a horse"
SCHEDULERS = [
    "PNDMScheduler", "DDIMScheduler", "DDPMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
]


# Every parity test here runs on the CPU, and on CUDA too where PyTorch sees a GPU (the same suite proves the GPU path).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


@pytest.fixture(scope="module", params=DEVICES)
def both(tiny_sd15_folder, request):
    """(minidiff pipeline, diffusers pipeline) loaded from the same folder, on the device of the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = diffusers.StableDiffusionPipeline.from_pretrained(
            str(tiny_sd15_folder), safety_checker=None, requires_safety_checker=False
        ).to(request.param)
    ours = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder).to(request.param)
    theirs.set_progress_bar_config(disable=True)
    ours.set_progress_bar_config(disable=True)
    return ours, theirs


def run_both(ours, theirs, scheduler_name: str, **kwargs):
    ours.scheduler = getattr(minidiff, scheduler_name).from_config(ours.scheduler.config)
    theirs.scheduler = getattr(diffusers, scheduler_name).from_config(theirs.scheduler.config)
    kwargs = {"height": 64, "width": 64, "num_inference_steps": 5, "output_type": "np", **kwargs}
    seed = kwargs.pop("seed", 0)
    a = ours(generator=torch.Generator().manual_seed(seed), **kwargs).images
    b = theirs(generator=torch.Generator().manual_seed(seed), **kwargs).images
    return a, b


@pytest.mark.parametrize("scheduler_name", SCHEDULERS)
def test_txt2img_equals_diffusers_for_every_scheduler(both, scheduler_name):
    ours, theirs = both
    a, b = run_both(ours, theirs, scheduler_name, prompt=PROMPT)
    assert a.shape == b.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_negative_prompt_and_several_images_per_prompt(both):
    ours, theirs = both
    a, b = run_both(
        ours, theirs, "EulerAncestralDiscreteScheduler", prompt=[PROMPT, "a red cube"], negative_prompt=["blurry", "dark"],
        num_images_per_prompt=2, height=48, width=64,
    )
    assert a.shape == (4, 48, 64, 3)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    assert np.abs(a[0] - a[1]).max() > 1e-3  # two images of one prompt differ (different noise)


def test_guidance_one_skips_the_unconditional_batch(both):
    ours, theirs = both
    calls = []
    forward = ours.unet.forward
    ours.unet.forward = lambda sample, *args, **kwargs: calls.append(sample.shape[0]) or forward(sample, *args, **kwargs)
    try:
        a, b = run_both(ours, theirs, "DDIMScheduler", prompt=PROMPT, guidance_scale=1.0)
    finally:
        del ours.unet.forward
    assert set(calls) == {1}
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_output_types(both):
    ours, _ = both
    ours.scheduler = minidiff.DDIMScheduler.from_config(ours.scheduler.config)
    common = dict(height=64, width=64, num_inference_steps=2)
    pil = ours(PROMPT, generator=torch.Generator().manual_seed(0), **common).images
    pt = ours(PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt", **common).images
    latent = ours(PROMPT, generator=torch.Generator().manual_seed(0), output_type="latent", **common).images
    assert isinstance(pil[0], Image.Image) and pil[0].size == (64, 64)
    assert pt.shape == (1, 3, 64, 64) and 0 <= pt.min() and pt.max() <= 1
    assert latent.shape == (1, 4, 8, 8)
    np.testing.assert_array_equal(np.asarray(pil[0]), (pt[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8"))


def test_denoise_yields_every_step_and_call_is_built_on_it(both):
    ours, _ = both
    ours.scheduler = minidiff.PNDMScheduler.from_config(ours.scheduler.config)
    steps = list(ours.denoise(PROMPT, height=64, width=64, num_inference_steps=4, generator=torch.Generator().manual_seed(3)))
    assert [step.step_index for step in steps] == list(range(5))  # PLMS: N + 1 model calls for N steps
    assert all(step.num_steps == 5 for step in steps)
    assert [int(step.t) for step in steps] == ours.scheduler.timesteps.tolist()
    assert steps[-1].latents.shape == steps[-1].noise_pred.shape == (1, 4, 8, 8)
    final = ours(PROMPT, height=64, width=64, num_inference_steps=4, generator=torch.Generator().manual_seed(3), output_type="latent")
    torch.testing.assert_close(final.images, steps[-1].latents, rtol=0, atol=0)


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("scheduler_name", ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_img2img_equals_diffusers(tiny_sd15_folder, both, strength, scheduler_name):
    _, theirs_txt2img = both
    ours = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd15_folder).to(theirs_txt2img.device)
    theirs = diffusers.StableDiffusionImg2ImgPipeline(**theirs_txt2img.components)
    ours.set_progress_bar_config(disable=True)
    theirs.set_progress_bar_config(disable=True)
    image = Image.fromarray((np.random.default_rng(0).random((64, 72, 3)) * 255).astype("uint8"))
    ours.scheduler = getattr(minidiff, scheduler_name).from_config(ours.scheduler.config)
    theirs.scheduler = getattr(diffusers, scheduler_name).from_config(theirs.scheduler.config)
    kwargs = dict(prompt=PROMPT, image=image, strength=strength, num_inference_steps=6, output_type="np")
    a = ours(generator=torch.Generator().manual_seed(1), **kwargs).images
    b = theirs(generator=torch.Generator().manual_seed(1), **kwargs).images
    assert a.shape == b.shape == (1, 64, 72, 3)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_ddpm_pipeline_equals_diffusers(tmp_path):
    torch.manual_seed(0)
    config = dict(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    theirs_unet = diffusers.UNet2DModel(**config).eval()
    theirs_unet.save_pretrained(tmp_path / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=1000).save_config(tmp_path / "scheduler")
    theirs = diffusers.DDPMPipeline(unet=theirs_unet, scheduler=diffusers.DDPMScheduler.from_pretrained(tmp_path / "scheduler"))
    ours = DDPMPipeline.from_pretrained(tmp_path)
    theirs.set_progress_bar_config(disable=True)
    ours.set_progress_bar_config(disable=True)
    a = ours(num_inference_steps=25, generator=torch.Generator().manual_seed(0), output_type="np").images
    b = theirs(num_inference_steps=25, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert a.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    image = ours(num_inference_steps=25, generator=torch.Generator().manual_seed(0)).images[0]
    assert isinstance(image, Image.Image) and image.size == (16, 16)


# ----- bad input -------------------------------------------------------------------------------------


def test_size_not_divisible_by_8_is_refused(both):
    ours, _ = both
    with pytest.raises(ValueError, match="multiples of 8.*500x512"):
        ours(PROMPT, height=500, width=512, num_inference_steps=1)


def test_bad_steps_prompt_and_output_type_are_refused(both):
    ours, _ = both
    ours.scheduler = minidiff.DDIMScheduler.from_config(ours.scheduler.config)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ours(PROMPT, height=64, width=64, num_inference_steps=0)
    with pytest.raises(TypeError, match="prompt must be a string"):
        ours(42, height=64, width=64, num_inference_steps=1)
    with pytest.raises(ValueError, match="output_type"):
        ours(PROMPT, height=64, width=64, num_inference_steps=1, output_type="jpeg")
    with pytest.raises(ValueError, match="negative_prompt has 2 entries"):
        ours([PROMPT], negative_prompt=["a", "b"], height=64, width=64, num_inference_steps=1)


def test_long_prompt_is_truncated_with_a_warning(both):
    ours, _ = both
    ours.scheduler = minidiff.DDIMScheduler.from_config(ours.scheduler.config)
    with pytest.warns(UserWarning, match="token\\(s\\) were dropped"):
        ours(" ".join(["horse"] * 100), height=64, width=64, num_inference_steps=1)


def test_img2img_refuses_an_unknown_output_type_before_any_work(tiny_sd15_folder):
    from minidiff import StableDiffusionImg2ImgPipeline

    pipeline = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd15_folder)
    with pytest.raises(ValueError, match="unknown output_type 'jpg'"):
        pipeline("a cat", image=Image.new("RGB", (64, 64)), output_type="jpg")
