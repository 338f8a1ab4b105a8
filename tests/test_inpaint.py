"""StableDiffusionInpaintPipeline and its mask processing against diffusers 0.42.1 (oracle), on tiny random weights.

Both UNet kinds: the ordinary 4-channel one (the per-step blend) and the 9-channel inpainting one (conv_in sees the
mask and the masked image's latents), written by weights_scripts/make_random_sd15.py (`--inpainting`).
"""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import minidiff
from minidiff.pipelines import DiffusionPipeline, StableDiffusionInpaintPipeline
from minidiff.pipelines import mask_processing

from conftest import load_weights_script

diffusers = pytest.importorskip("diffusers")

ATOL = 1e-4  # images in [0, 1]; both sides run the same float32 arithmetic (measured: < 4e-6)
PROMPT = "a red cube on a table"


def picture(width=96, height=80, seed=0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8"))


def box_mask(width=96, height=80, box=(30, 20, 60, 50)) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


@pytest.fixture(scope="module")
def tiny_inpainting_folder(tmp_path_factory):
    return load_weights_script("make_random_sd15").make_random_sd15(tmp_path_factory.mktemp("tiny-inpaint"), tiny=True, inpainting=True)


def load_both(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = diffusers.StableDiffusionInpaintPipeline.from_pretrained(str(folder), safety_checker=None,
                                                                           requires_safety_checker=False)
    ours = StableDiffusionInpaintPipeline.from_pretrained(folder)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


@pytest.fixture(scope="module")
def pipes(tiny_sd15_folder, tiny_inpainting_folder):
    """{4: (ours, theirs), 9: (ours, theirs)}: the ordinary and the inpainting UNet."""
    return {4: load_both(tiny_sd15_folder), 9: load_both(tiny_inpainting_folder)}


def run_both(ours, theirs, scheduler="DDIMScheduler", seed=0, **kwargs):
    """Both pipelines on the same inputs; returns (ours, theirs) images and (ours, theirs) final latents."""
    ours.scheduler = getattr(minidiff, scheduler).from_config(ours.scheduler.config)
    theirs.scheduler = getattr(diffusers, scheduler).from_config(theirs.scheduler.config)
    kwargs = {"prompt": PROMPT, "image": picture(), "mask_image": box_mask(), "num_inference_steps": 5,
              "height": 64, "width": 64, **kwargs}
    results = []
    for pipe in (ours, theirs):
        last = {}

        def keep(pipe, i, t, tensors):
            last["latents"] = tensors["latents"].clone()
            return tensors

        images = pipe(generator=torch.Generator().manual_seed(seed), callback_on_step_end=keep, **kwargs).images
        if isinstance(images, list):
            images = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in images])
        results.append((images, last["latents"]))
    (a, latents_a), (b, latents_b) = results
    return a, b, latents_a, latents_b


# ----- parity -------------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("padding_mask_crop", [None, 8])
@pytest.mark.parametrize("channels", [4, 9])
def test_inpaint_equals_diffusers(pipes, channels, padding_mask_crop, strength):
    ours, theirs = pipes[channels]
    output_type = "pil" if padding_mask_crop else "np"  # diffusers pastes a crop back into PIL images only
    a, b, latents_a, latents_b = run_both(ours, theirs, padding_mask_crop=padding_mask_crop, strength=strength,
                                          output_type=output_type)
    torch.testing.assert_close(latents_a, latents_b, atol=ATOL, rtol=0)
    if padding_mask_crop:
        assert a.shape == (1, 80, 96, 3)  # pasted back into the full picture
        assert np.abs(a - b).max() <= 1 / 255 + 1e-7  # uint8 pictures: at most one level apart (rounding)
        kept = np.asarray(box_mask()) == 0
        np.testing.assert_array_equal(a[0][kept], np.asarray(picture(), dtype=np.float32)[kept] / 255)  # apply_overlay
    else:
        assert a.shape == (1, 64, 64, 3)
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("channels", [4, 9])
def test_stochastic_scheduler_batch_and_negative_prompt(pipes, channels):
    """Euler a draws noise every step: equal only if every draw (VAE samples included) comes in diffusers' order."""
    ours, theirs = pipes[channels]
    a, b, *_ = run_both(ours, theirs, "EulerAncestralDiscreteScheduler", prompt=[PROMPT, "a cat"],
                        negative_prompt=["blurry", "dark"], num_images_per_prompt=2, strength=0.8, output_type="np")
    assert a.shape == (4, 64, 64, 3)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_masked_image_latents_and_blurred_mask(pipes):
    ours, theirs = pipes[9]
    soft = ours.mask_processor.blur(box_mask(), blur_factor=4)
    latents = 0.3 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    a, b, *_ = run_both(ours, theirs, mask_image=soft, masked_image_latents=latents, output_type="np")
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_default_size_is_the_unets_and_all_white_mask_is_diffusers_behaviour(pipes):
    """height/width default to sample_size * 8, as diffusers'; an all-white mask repaints everything (diffusers'
    documented behaviour: white is repainted), so it is accepted and matches.

    One difference, on tiny weights only: diffusers' __init__ rewrites sample_size < 64 to 64 in a UNet config
    older than diffusers 0.9 (a fix for early SD 1.x uploads; the real configs say 64 already), so its default
    here is 512x512 while ours stays the config's 8 * 8 = 64."""
    ours, theirs = pipes[4]
    assert (ours.unet.config.sample_size, theirs.unet.config.sample_size) == (8, 64)
    ours.scheduler = minidiff.DDIMScheduler.from_config(ours.scheduler.config)
    theirs.scheduler = diffusers.DDIMScheduler.from_config(theirs.scheduler.config)
    white = Image.new("L", (96, 80), 255)
    common = dict(prompt=PROMPT, image=picture(), mask_image=white, num_inference_steps=4, output_type="np")
    a = ours(generator=torch.Generator().manual_seed(0), **common).images
    b = theirs(generator=torch.Generator().manual_seed(0), height=64, width=64, **common).images
    assert a.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_denoise_steps_through_and_call_is_built_on_it(pipes):
    ours, _ = pipes[4]
    ours.scheduler = minidiff.DDIMScheduler.from_config(ours.scheduler.config)
    kwargs = dict(image=picture(), mask_image=box_mask(), height=64, width=64, num_inference_steps=10, strength=0.6)
    steps = list(ours.denoise(PROMPT, generator=torch.Generator().manual_seed(2), **kwargs))
    assert [step.step_index for step in steps] == list(range(6)) and steps[0].num_steps == 6  # strength 0.6 of 10
    final = ours(PROMPT, generator=torch.Generator().manual_seed(2), output_type="latent", **kwargs).images
    torch.testing.assert_close(final, steps[-1].latents, rtol=0, atol=0)


# ----- mask processing against diffusers' VaeImageProcessor ---------------------------------------


def test_mask_processing_equals_diffusers_image_processor():
    from diffusers.image_processor import VaeImageProcessor as Theirs

    theirs_mask = Theirs(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    theirs_image = Theirs(vae_scale_factor=8)
    ours_mask = mask_processing.VaeImageProcessor(8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    ours_image = mask_processing.VaeImageProcessor(8)
    rng = np.random.default_rng(0)
    for trial in range(12):
        width, height = (int(size) for size in rng.integers(24, 90, size=2))
        x1, y1 = int(rng.integers(0, width - 4)), int(rng.integers(0, height - 4))
        box = (x1, y1, int(rng.integers(x1 + 1, width)), int(rng.integers(y1 + 1, height)))
        mask, image = box_mask(width, height, box), picture(width, height, trial)
        target = (64, 48) if trial % 2 else (48, 64)
        pad = int(rng.integers(0, 12))
        crop = theirs_mask.get_crop_region(mask, *target, pad=pad)
        assert ours_mask.get_crop_region(mask, *target, pad=pad) == crop
        for coords, mode in ((None, "default"), (crop, "fill")):
            torch.testing.assert_close(ours_mask.preprocess(mask, target[1], target[0], mode, coords),
                                       theirs_mask.preprocess(mask, target[1], target[0], mode, coords), rtol=0, atol=0)
            torch.testing.assert_close(ours_image.preprocess(image, target[1], target[0], mode, coords),
                                       theirs_image.preprocess(image, target[1], target[0], mode, coords), rtol=0, atol=0)
        generated = picture(*target, seed=99)
        soft = ours_mask.blur(mask, 3)
        assert np.array_equal(np.asarray(soft), np.asarray(theirs_mask.blur(mask, 3)))
        for overlay_mask in (mask, soft):
            assert np.array_equal(np.asarray(ours_image.apply_overlay(overlay_mask, image, generated, crop)),
                                  np.asarray(theirs_image.apply_overlay(overlay_mask, image, generated, crop)))
    # arrays and tensors: (H, W) / (B, H, W) / (B, 1, H, W) masks
    array = (rng.random((40, 56)) > 0.5).astype(np.float32)
    for mask in (array[None], torch.from_numpy(array)[None], torch.from_numpy(array)[None, None]):
        torch.testing.assert_close(ours_mask.preprocess(mask, 32, 48), theirs_mask.preprocess(mask, 32, 48), rtol=0, atol=0)


# ----- loading ------------------------------------------------------------------------------------


def test_inpainting_single_file_is_recognised_from_conv_in(tiny_sd15_folder, tiny_inpainting_folder, tmp_path, pipes):
    """The single file has no config: in_channels = 9 comes from conv_in's weight, the rest from the config folder
    (here the tiny 4-channel folder's, as a user would pass SD 1.5's for SD 1.5 inpainting)."""
    from minidiff.loaders.convert import convert

    path = convert(tiny_inpainting_folder, tmp_path / "inpainting.safetensors")
    pipe = StableDiffusionInpaintPipeline.from_single_file(path, config=tiny_sd15_folder)
    assert pipe.unet.config.in_channels == 9
    folder_unet = pipes[9][0].unet.state_dict()
    assert all(torch.equal(tensor, folder_unet[name]) for name, tensor in pipe.unet.state_dict().items())
    assert type(DiffusionPipeline.from_pretrained(tiny_inpainting_folder)) is StableDiffusionInpaintPipeline  # model_index
    # DiffusionPipeline on a single file (bundled full-size configs there; the tiny ones here) picks it from conv_in
    from minidiff.pipelines.stable_diffusion import StableDiffusionPipeline

    load = StableDiffusionPipeline.from_single_file.__func__
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StableDiffusionPipeline, "from_single_file",
                      classmethod(lambda cls, file, dtype=None: load(cls, file, dtype=dtype, config=tiny_sd15_folder)))
        assert type(DiffusionPipeline.from_pretrained(path)) is StableDiffusionInpaintPipeline


# ----- bad input ----------------------------------------------------------------------------------


def test_bad_inputs_are_refused_before_any_work(pipes):
    ours, _ = pipes[9]
    ours.vae.encode = lambda *args, **kwargs: pytest.fail("the VAE ran before the inputs were checked")
    try:
        common = dict(prompt=PROMPT, num_inference_steps=2, height=64, width=64)
        with pytest.raises(ValueError, match=r"mask_image is 64x80 but image is 96x80.*resize the mask"):
            ours(image=picture(), mask_image=box_mask(64, 80, (1, 1, 9, 9)), **common)
        with pytest.raises(ValueError, match="all black: nothing to repaint"):
            ours(image=picture(), mask_image=Image.new("L", (96, 80), 0), **common)
        with pytest.raises(ValueError, match="all black: nothing to repaint"):
            ours(image=picture(), mask_image=np.full((80, 96), 0.3, dtype=np.float32), **common)
        with pytest.raises(TypeError, match="mask_image must be a PIL image.*got str.*PIL.Image.open"):
            ours(image=picture(), mask_image="mask.png", **common)
        with pytest.raises(ValueError, match="padding_mask_crop.*output_type must be 'pil'"):
            ours(image=picture(), mask_image=box_mask(), padding_mask_crop=4, output_type="np", **common)
        with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
            ours(image=picture(), mask_image=box_mask(), strength=1.5, **common)
    finally:
        del ours.vae.encode
    four, _ = pipes[4]
    with pytest.raises(ValueError, match="4 input channels and would ignore them.*inpainting checkpoint"):
        four(image=picture(), mask_image=box_mask(), masked_image_latents=torch.zeros(1, 4, 8, 8), **common)


def test_what_diffusers_does_with_the_inputs_we_refuse(pipes):
    """The behaviour our errors replace: diffusers resizes a mask of another size on its own (it no longer lines
    up), runs an all-black mask (nothing repainted), and silently ignores masked_image_latents on a 4-channel UNet."""
    _, theirs = pipes[4]
    theirs.scheduler = diffusers.DDIMScheduler.from_config(theirs.scheduler.config)
    common = dict(prompt=PROMPT, image=picture(), num_inference_steps=2, height=64, width=64, output_type="np")
    theirs(mask_image=box_mask(64, 80, (1, 1, 9, 9)), **common)
    theirs(mask_image=Image.new("L", (96, 80), 0), **common)
    plain = theirs(mask_image=box_mask(), generator=torch.Generator().manual_seed(0), **common).images
    given = theirs(mask_image=box_mask(), masked_image_latents=torch.full((1, 4, 8, 8), 3.0),
                   generator=torch.Generator().manual_seed(0), **common).images
    np.testing.assert_array_equal(plain, given)
    with pytest.raises(ValueError, match="incorrect format"):
        theirs(mask_image="mask.png", **common)


def test_custom_timesteps_and_sigmas_equal_diffusers(pipes):
    ours, theirs = pipes[9]
    for custom in ({"timesteps": [999, 700, 400, 100, 1]}, {"sigmas": [14.6, 5.0, 1.5, 0.4, 0.05]}):
        a, b, *_ = run_both(ours, theirs, "EulerDiscreteScheduler", output_type="np", strength=0.8, **custom)
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="DDIMScheduler.set_timesteps takes no custom sigmas"):
        ours.scheduler = minidiff.DDIMScheduler.from_config(ours.scheduler.config)
        ours(PROMPT, picture(), box_mask(), sigmas=[1.0, 0.5], height=64, width=64)


def test_rgba_and_grayscale_pictures_work_where_diffusers_breaks(pipes):
    """diffusers' image processor keeps a PIL picture's mode: an RGBA PNG (common: exported with transparency)
    becomes a 4-channel tensor that prepare_latents takes for *latents* ("size of tensor a (64) must match ... (8)"),
    and a grayscale one reaches the VAE with 1 channel. A bug; minidiff converts the picture to RGB first."""
    ours, theirs = pipes[4]
    ours.scheduler = minidiff.DDIMScheduler.from_config(ours.scheduler.config)
    theirs.scheduler = diffusers.DDIMScheduler.from_config(theirs.scheduler.config)
    rgba = Image.fromarray((np.random.default_rng(1).random((80, 96, 4)) * 255).astype("uint8"), "RGBA")
    common = dict(mask_image=box_mask(), num_inference_steps=2, height=64, width=64, output_type="np")
    for mode in ("RGBA", "L"):
        with pytest.raises(RuntimeError):
            theirs(PROMPT, image=rgba.convert(mode), **common)
        a = ours(PROMPT, image=rgba.convert(mode), generator=torch.Generator().manual_seed(0), **common).images
        b = ours(PROMPT, image=rgba.convert(mode).convert("RGB"), generator=torch.Generator().manual_seed(0), **common).images
        np.testing.assert_array_equal(a, b)


def test_call_has_diffusers_arguments_in_diffusers_order():
    import inspect

    theirs = list(inspect.signature(diffusers.StableDiffusionInpaintPipeline.__call__).parameters)
    ours = list(inspect.signature(StableDiffusionInpaintPipeline.__call__).parameters)
    not_here = {"kwargs"}  # no deprecated callback; the IP-Adapter's are there to keep positions, refused unless None
    assert ours == [name for name in theirs if name not in not_here]
    for name in ours[1:]:
        ours_default = inspect.signature(StableDiffusionInpaintPipeline.__call__).parameters[name].default
        theirs_default = inspect.signature(diffusers.StableDiffusionInpaintPipeline.__call__).parameters[name].default
        assert ours_default == theirs_default or (name == "callback_on_step_end_tensor_inputs" and list(ours_default) == theirs_default), name
