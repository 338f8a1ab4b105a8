"""AutoencoderTiny (TAESD) against diffusers' on the same random weights, in both real key layouts: diffusers'
folder (madebyollin/taesd) and the original taesd_encoder.safetensors / taesd_decoder.safetensors pair.
Tolerance: max |difference| <= 1e-5 (float32) with the conv weights in diffusers' layout (the same operations in the
same order, in practice 0); with minidiff's default channels-last layout (several times faster on a CPU, other
oneDNN kernels) within 1e-5 relative to the output's largest value.
Then TAESD as a pipeline's VAE and as the preview decoder of `denoise`."""

import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from minidiff import AutoencoderTiny, StableDiffusionPipeline

diffusers = pytest.importorskip("diffusers")

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    """diffusers' AutoencoderTiny with SD's default config and random weights, saved in both layouts."""
    folder = tmp_path_factory.mktemp("taesd")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        theirs = diffusers.AutoencoderTiny().eval()
        for parameter in theirs.parameters():  # default init gives near-constant outputs; spread the weights
            parameter.data.normal_(0, 0.05)
    theirs.save_pretrained(folder / "diffusers")
    # the original files: the layout of madebyollin/taesd's taesd.py (its decoder starts with a Clamp layer)
    state = theirs.state_dict()
    encoder = {key.removeprefix("encoder.layers."): value.contiguous() for key, value in state.items() if key.startswith("encoder.")}
    decoder = {}
    for key, value in state.items():
        if key.startswith("decoder.layers."):
            index, _, rest = key.removeprefix("decoder.layers.").partition(".")
            decoder[f"{int(index) + 1}.{rest}"] = value.contiguous()
    save_file(encoder, str(folder / "taesd_encoder.safetensors"))
    save_file(decoder, str(folder / "taesd_decoder.safetensors"))
    return theirs, folder


def test_the_original_files_have_the_original_layout(taesd):
    """Keys of taesd.py's nn.Sequential: stride-2 convs without bias, decoder layer 0 (Clamp) without weights."""
    from safetensors import safe_open

    _, folder = taesd
    with safe_open(str(folder / "taesd_encoder.safetensors"), "pt") as f:
        encoder = set(f.keys())
    with safe_open(str(folder / "taesd_decoder.safetensors"), "pt") as f:
        decoder = set(f.keys())
    assert {"0.weight", "0.bias", "1.conv.0.weight", "2.weight", "14.weight", "14.bias"} <= encoder
    assert "2.bias" not in encoder and len(encoder) == 2 + 10 * 6 + 3 + 2
    assert {"1.weight", "3.conv.4.bias", "7.weight", "18.conv.0.weight", "19.weight", "19.bias"} <= decoder
    assert not any(key.startswith("0.") for key in decoder) and "7.bias" not in decoder


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_encode_decode_forward_equal_diffusers(taesd, layout):
    theirs, folder = taesd
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # diffusers' config.json reads with no warning
        same_layout = dict(memory_format=torch.contiguous_format)  # the conv weights laid out as diffusers' are
        if layout == "diffusers":
            ours = AutoencoderTiny.from_pretrained(folder / "diffusers", **same_layout)
            fast = AutoencoderTiny.from_pretrained(folder / "diffusers")
        else:
            files = folder / "taesd_encoder.safetensors", folder / "taesd_decoder.safetensors"
            ours, fast = AutoencoderTiny.from_original_files(*files, **same_layout), AutoencoderTiny.from_original_files(*files)
    assert fast.decoder.layers[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert ours.config.scaling_factor == 1.0 and list(ours.config.block_out_channels) == [64, 64, 64, 64]
    generator = torch.Generator().manual_seed(0)
    image, latents = torch.rand(2, 3, 64, 48, generator=generator) * 2 - 1, torch.randn(2, 4, 8, 6, generator=generator) * 2
    with torch.no_grad():
        assert (ours.encode(image).latents - theirs.encode(image).latents).abs().max() <= TOLERANCE
        assert (ours.decode(latents).sample - theirs.decode(latents).sample).abs().max() <= TOLERANCE
        assert (ours(image).sample - theirs(image).sample).abs().max() <= TOLERANCE
        expected = theirs.decode(latents).sample
        assert (fast.decode(latents).sample - expected).abs().max() <= TOLERANCE * expected.abs().max()
        expected = theirs.encode(image).latents
        assert (fast.encode(image).latents - expected).abs().max() <= TOLERANCE * expected.abs().max()
        ours.enable_slicing()  # one image at a time, on both sides (a batch of 1 may take another conv kernel)
        theirs.enable_slicing()
        assert (ours.decode(latents).sample - theirs.decode(latents).sample).abs().max() <= TOLERANCE
        theirs.disable_slicing()
    for x in (torch.randn(2, 4, 8, 8), torch.tensor([0.0, 0.2, 1.0])):
        assert torch.equal(ours.scale_latents(x), theirs.scale_latents(x))
        assert torch.equal(ours.unscale_latents(x), theirs.unscale_latents(x))


def test_bad_files_are_refused_with_advice(taesd, tmp_path):
    _, folder = taesd
    with pytest.raises(FileNotFoundError, match="taesd_encoder.safetensors"):
        AutoencoderTiny.from_original_files(tmp_path / "missing.safetensors", folder / "taesd_decoder.safetensors")
    with pytest.raises(ValueError, match="not a key of an original TAESD decoder file"):  # encoder and decoder swapped
        AutoencoderTiny.from_original_files(folder / "taesd_decoder.safetensors", folder / "taesd_encoder.safetensors")
    with pytest.raises(ValueError, match="diffusers-layout"):
        AutoencoderTiny.from_original_files(folder / "diffusers" / "diffusion_pytorch_model.safetensors",
                                            folder / "taesd_decoder.safetensors")
    with pytest.raises(ValueError, match=r"shape \(B, 4, H, W\)"):
        AutoencoderTiny.from_pretrained(folder / "diffusers").decode(torch.zeros(1, 3, 8, 8))


def test_taesd_as_the_pipeline_vae_and_the_preview_decoder(tiny_sd15_folder, taesd):
    """pipe.vae = AutoencoderTiny.from_pretrained(...) gives diffusers' image; denoise(preview_vae=) decodes each x0."""
    theirs_taesd, folder = taesd
    ours = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_sd15_folder), safety_checker=None,
                                                                   requires_safety_checker=False)
    ours.vae = AutoencoderTiny.from_pretrained(folder / "diffusers")
    theirs.vae = theirs_taesd
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a cat", height=64, width=64, num_inference_steps=3, guidance_scale=1.0, output_type="np")
    a = ours(generator=torch.Generator().manual_seed(0), **kwargs).images
    b = theirs(generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)

    full_vae = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder)
    full_vae.set_progress_bar_config(disable=True)
    steps = list(full_vae.denoise("a cat", height=64, width=64, num_inference_steps=3, guidance_scale=1.0,
                                  generator=torch.Generator().manual_seed(0), preview_vae=ours.vae))
    assert [step.preview.size for step in steps] == [(64, 64)] * len(full_vae.scheduler.timesteps)  # PNDM: N + 1
    with torch.no_grad():  # scaling_factor 1: the latents as they are
        expected = ours.vae.decode(steps[-1].pred_original_sample[:1]).sample
    expected = ((expected / 2 + 0.5).clamp(0, 1) * 255).round()[0].permute(1, 2, 0).numpy()
    assert np.abs(np.asarray(steps[-1].preview).astype(float) - expected).max() <= 1
