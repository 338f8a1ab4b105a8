"""Inputs that would run away (issue 22): sizes and batches that cannot fit, NaN or infinity in a float argument.
Each is refused before anything is allocated, with an error naming the argument."""

import pytest
import torch
from PIL import Image

from minidiff import DDIMScheduler, DDPMPipeline, DDPMScheduler, StableDiffusionPipeline, UNet2DModel
from minidiff.cli import main
from minidiff.pipelines.img2img import StableDiffusionImg2ImgPipeline
from minidiff.pipelines.input_checks import MAX_SIDE, MAX_SIDE_TILED


@pytest.fixture(scope="module")
def pipe(tiny_sd15_folder):
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture
def no_heavy_work(pipe, monkeypatch):
    """Any call into the text encoder means the check came too late."""

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(pipe, "encode_prompt", refuse)
    return pipe


@pytest.mark.parametrize("size", [dict(height=10**6), dict(width=10**6), dict(height=MAX_SIDE + 8)])
def test_txt2img_refuses_a_size_that_cannot_fit(no_heavy_work, size):
    with pytest.raises(ValueError, match=rf"at most {MAX_SIDE} pixels per side without VAE tiling \(up to {MAX_SIDE_TILED}"):
        no_heavy_work("a cat", **size)
    with pytest.raises(ValueError, match="pixels per side"):
        next(no_heavy_work.denoise("a cat", **size))


def test_vae_tiling_raises_the_bound(no_heavy_work):
    no_heavy_work.enable_vae_tiling()
    try:
        with pytest.raises(AssertionError, match="work started"):  # 6144 passes the size check with tiling
            no_heavy_work("a cat", height=6144, width=512)
        with pytest.raises(ValueError, match=rf"at most {MAX_SIDE_TILED} pixels per side with VAE tiling"):
            no_heavy_work("a cat", height=10**6)
    finally:
        no_heavy_work.disable_vae_tiling()


def test_a_batch_that_cannot_fit_is_refused(no_heavy_work):
    with pytest.raises(ValueError, match=r"1000000 images of 512x512 are too many at once.*num_images_per_prompt"):
        no_heavy_work("a cat", num_images_per_prompt=10**6)
    with pytest.raises(ValueError, match=r"2000 images of 512x512"):
        no_heavy_work(["a cat", "a dog"], num_images_per_prompt=1000)


@pytest.mark.parametrize("name, value", [("guidance_scale", float("nan")), ("guidance_scale", float("inf")), ("eta", float("nan"))])
def test_nan_or_inf_argument_is_named(no_heavy_work, name, value):
    with pytest.raises(ValueError, match=rf"{name}={value} is not a finite number"):
        no_heavy_work("a cat", height=64, width=64, **{name: value})


def test_img2img_checks_size_and_numbers_before_resizing(pipe, monkeypatch):
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    monkeypatch.setattr(img2img, "encode_prompt", lambda *a, **k: pytest.fail("work started"))
    huge = torch.zeros(1, 3, 1, 1).expand(1, 3, 10**6, 64)  # no memory behind it: only the shape is read
    with pytest.raises(ValueError, match=r"height=1000000, width=64 is too large"):
        img2img("a cat", image=huge)
    with pytest.raises(ValueError, match=r"height=8, width=100000 is too large"):
        img2img("a cat", image=Image.new("RGB", (100_000, 8)))
    small = Image.new("RGB", (64, 64))
    for name in ("strength", "guidance_scale", "eta"):
        with pytest.raises(ValueError, match=rf"{name}=nan is not a finite number"):
            img2img("a cat", image=small, **{name: float("nan")})


def test_inpaint_checks_size_and_numbers_before_any_work(pipe, monkeypatch):
    from minidiff import StableDiffusionInpaintPipeline

    inpaint = StableDiffusionInpaintPipeline(**pipe.components)
    monkeypatch.setattr(inpaint, "encode_prompt", lambda *a, **k: pytest.fail("work started"))
    small, mask = Image.new("RGB", (64, 64)), Image.new("L", (64, 64), 255)
    with pytest.raises(ValueError, match=r"height=100000, width=64 is too large"):
        inpaint("a cat", small, mask, height=100_000, width=64)
    with pytest.raises(ValueError, match=r"64 images of 1024x1024 are too many at once"):
        inpaint("a cat", small, mask, height=1024, width=1024, num_images_per_prompt=64)
    with pytest.raises(ValueError, match=r"height=8, width=100000 is too large"):  # the picture itself, before resizing
        inpaint("a cat", Image.new("RGB", (100_000, 8)), Image.new("L", (100_000, 8)), height=64, width=64)
    for name in ("strength", "guidance_scale", "eta"):
        with pytest.raises(ValueError, match=rf"{name}=(nan|inf) is not a finite number"):
            inpaint("a cat", small, mask, height=64, width=64, **{name: float("nan" if name != "eta" else "inf")})


def test_ddpm_refuses_a_batch_that_cannot_fit():
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    pipeline = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))
    with pytest.raises(ValueError, match=r"1000000 images of 16x16 are too many at once"):
        pipeline(batch_size=10**6, num_inference_steps=2)


def test_ddim_eta_nan_is_named_not_silently_used(no_heavy_work):
    no_heavy_work.scheduler = DDIMScheduler.from_config(no_heavy_work.scheduler.config)
    with pytest.raises(ValueError, match=r"eta=inf is not a finite number"):
        no_heavy_work("a cat", height=64, width=64, eta=float("inf"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--size", "512x1000000"], f"--size 512x1000000: height=1000000, width=512 is too large: minidiff allows at most {MAX_SIDE}"),
        (["--size", "6144x512", "--guidance", "7"], "at most 4096 pixels per side without VAE tiling"),
        (["--guidance", "nan"], "--guidance=nan is not a finite number"),
    ],
)
def test_cli_refuses_before_loading_weights(tmp_path, capsys, args, message):
    code = main(["generate", "a cat", "--weights", str(tmp_path / "no-such-weights"), "--out", str(tmp_path / "x.png"), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
