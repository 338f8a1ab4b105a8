"""The speed switches change no picture: bfloat16 vs float32, channels-last vs contiguous, tiled vs untiled
VAE decode, float16 with the VAE upcast, the CLI's dtype choice. Correctness only: nothing here is timed
(benchmarks/run_all.py measures the speed).

Tolerances, each measured first and then given some room:
- channels-last vs contiguous, float32: max |difference| <= 1e-5 (the same arithmetic in another order).
- bfloat16 vs float32: PSNR >= 30 dB between the images (the issue's bar). Measured: 42-61 dB on the exact
  denoiser's pictures (20 steps), 50 dB on the tiny random pipeline, and on full-size random SD 1.5 weights
  (the slow test) see docs/performance.md.
- tiled vs untiled decode: not bit-identical (each tile has its own GroupNorm statistics and attention); the
  bounds below are measured figures plus room, and the blend leaves no seam (the weights are continuous).
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import torch

from minidiff import accuracy
from minidiff.loaders import convert
from minidiff.cli import build_parser, keep_freed_memory, load_pipeline
from minidiff.models.vae import AutoencoderKL, _blend_ramp, _tile_starts
from minidiff.pipelines import StableDiffusionPipeline
from minidiff.utils import cpu
from conftest import load_weights_script

random_model = load_weights_script("make_random_sd15").random_model

CHANNELS_LAST_TOLERANCE = 1e-5  # float32, max abs difference
MIN_PSNR_DB = 30.0  # bfloat16 (or float16) image vs the float32 image from the same seed
FULL_SIZE_WEIGHTS = Path("~/.cache/minidiff/random-sd15").expanduser()


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: threads only add overhead on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


def psnr(image: torch.Tensor, reference: torch.Tensor, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of `image` against `reference` (both with values in [0, peak])."""
    mse = (image.float() - reference.float()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def to_unit_range(image: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model images -> [0, 1], as the pipeline's output_type="pt"."""
    return (image.float() / 2 + 0.5).clamp(0, 1)


@pytest.fixture(scope="module")
def tiny_unet():
    return random_model("unet", seed=0, tiny=True)


@pytest.fixture(scope="module")
def tiny_vae():
    return random_model("vae", seed=0, tiny=True)


def unet_inputs(dtype=torch.float32, size=16):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, size, size, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)  # the tiny UNet's cross_attention_dim
    return latents.to(dtype), torch.tensor(981), context.to(dtype)


# ----- channels-last ------------------------------------------------------------------------------------


def test_channels_last_unet_matches_contiguous(tiny_unet):
    latents, t, context = unet_inputs()
    with torch.no_grad():
        expected = tiny_unet(latents, t, encoder_hidden_states=context).sample
        tiny_unet.to(memory_format=torch.channels_last)
        try:
            result = tiny_unet(latents.to(memory_format=torch.channels_last), t, encoder_hidden_states=context).sample
        finally:
            tiny_unet.to(memory_format=torch.contiguous_format)
    assert (result - expected).abs().max().item() <= CHANNELS_LAST_TOLERANCE


def test_channels_last_vae_matches_contiguous(tiny_vae):
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = tiny_vae.decode(z).sample
        tiny_vae.to(memory_format=torch.channels_last)
        try:
            result = tiny_vae.decode(z).sample
        finally:
            tiny_vae.to(memory_format=torch.contiguous_format)
    assert (result - expected).abs().max().item() <= CHANNELS_LAST_TOLERANCE


def channels_last(model) -> bool:
    convolutions = [module for module in model.modules() if isinstance(module, torch.nn.Conv2d)]
    return bool(convolutions) and all(conv.weight.is_contiguous(memory_format=torch.channels_last) for conv in convolutions)


@pytest.mark.parametrize("loader", ["from_pretrained", "from_single_file"])
def test_pipeline_stores_conv_weights_channels_last(tiny_sd15_folder, tmp_path, loader):
    """The VAE always; the UNet when it is not float32 (whose memory-mapped weights are left as loaded).
    Laid out while loading, with the same values as the file's."""
    load, source = StableDiffusionPipeline.from_pretrained, tiny_sd15_folder
    if loader == "from_single_file":
        load = partial(StableDiffusionPipeline.from_single_file, config=tiny_sd15_folder)
        source = convert(tiny_sd15_folder, tmp_path / "tiny.safetensors")
    float32 = load(source)
    assert channels_last(float32.vae) and not channels_last(float32.unet)
    bfloat16 = load(source, torch_dtype=torch.bfloat16)
    assert channels_last(bfloat16.vae) and channels_last(bfloat16.unet)
    for name in ("vae", "unet"):
        for (key, value), expected in zip(getattr(float32, name).state_dict().items(), getattr(bfloat16, name).state_dict().values()):
            assert torch.equal(value.bfloat16(), expected), f"{name}.{key}"


def test_model_from_pretrained_lays_out_conv_weights_as_asked(tiny_sd15_folder):
    as_stored = AutoencoderKL.from_pretrained(tiny_sd15_folder, subfolder="vae")
    laid_out = AutoencoderKL.from_pretrained(tiny_sd15_folder, subfolder="vae", memory_format=torch.channels_last)
    assert channels_last(laid_out) and not channels_last(as_stored)
    for (key, value), expected in zip(laid_out.state_dict().items(), as_stored.state_dict().values()):
        assert torch.equal(value, expected), key


# ----- bfloat16 / float16 vs float32 ---------------------------------------------------------------------


def test_bfloat16_unet_agrees_with_float32(tiny_unet):
    latents, t, context = unet_inputs()
    with torch.no_grad():
        expected = tiny_unet(latents, t, encoder_hidden_states=context).sample
        half = random_model("unet", seed=0, tiny=True).to(torch.bfloat16)
        result = half(latents.bfloat16(), t, encoder_hidden_states=context.bfloat16()).sample
    assert result.dtype == torch.bfloat16
    relative_error = ((result.float() - expected).norm() / expected.norm()).item()
    assert relative_error < 0.03  # bfloat16 keeps 8 significant bits (2^-8 = 0.4% per rounding); measured 0.011


@pytest.mark.parametrize("setup", [s for s in accuracy.DETERMINISTIC_SETUPS if s.label in ("DDIM", "Euler", "LMS", "DPM++ 2M")],
                         ids=lambda setup: setup.label)
def test_exact_denoiser_pictures_in_bfloat16(setup):
    """The exact Gaussian-mixture denoiser on the prototype pictures, 20 steps, run end to end in bfloat16
    (means, samples, scheduler arithmetic) vs float32 from the same noise. Measured 42 (LMS) to 61 dB."""
    noise = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8)  # one picture of each class
    images = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = accuracy.prototype_mixture(32, data_std=0.1, dtype=dtype)
        scheduler = accuracy.make_scheduler(setup)
        _, images[dtype] = accuracy.run_scheduler(scheduler, model, noise.to(dtype), 20, setup.step_kwargs, class_labels=labels)
    assert images[torch.bfloat16].dtype == torch.bfloat16
    assert psnr(to_unit_range(images[torch.bfloat16]), to_unit_range(images[torch.float32])) >= MIN_PSNR_DB


def generate(pipeline, size: int = 64, steps: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    pipeline.set_progress_bar_config(disable=True)
    latents = pipeline(
        "a photograph of an astronaut riding a horse", height=size, width=size, num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0), output_type="latent",
    ).images
    return latents, pipeline.latents_to_output(latents, "pt")


@pytest.fixture(scope="module")
def float32_generation(tiny_sd15_folder):
    return generate(StableDiffusionPipeline.from_pretrained(tiny_sd15_folder))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_pipeline_image_close_to_float32(tiny_sd15_folder, float32_generation, dtype):
    """The whole tiny random pipeline (CLIP, 20 PNDM steps, VAE): measured 50 dB (bf16), 71 dB (fp16)."""
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder, torch_dtype=dtype)
    latents, image = generate(pipeline)
    assert latents.dtype == dtype and pipeline.unet.dtype == dtype
    assert torch.isfinite(image).all() and image.std() > 0.01  # no NaN, not a flat (black) picture
    assert psnr(image, float32_generation[1]) >= MIN_PSNR_DB


def test_float16_pipeline_keeps_the_vae_in_float16_unless_upcast(tiny_sd15_folder):
    # As diffusers' SD 1.x pipelines: force_upcast is read only by SDXL's (docs/gpu.md); upcast_vae() when asked.
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder, torch_dtype=torch.float16)
    assert pipeline.vae.config.force_upcast
    assert pipeline.vae.dtype == pipeline.unet.dtype == torch.float16
    pipeline.upcast_vae()
    assert pipeline.vae.dtype == torch.float32 and pipeline.text_encoder.dtype == torch.float16
    bfloat16 = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder, torch_dtype=torch.bfloat16)
    assert bfloat16.vae.dtype == torch.bfloat16  # bfloat16 has float32's range: no upcast needed


# ----- tiled decoding ------------------------------------------------------------------------------------


def test_tile_starts_cover_the_latent():
    assert _tile_starts(40, 64, 16) == [0]
    assert _tile_starts(64, 64, 16) == [0]
    assert _tile_starts(100, 64, 16) == [0, 36]  # the last tile ends at the border
    starts = _tile_starts(200, 64, 16)
    assert starts == [0, 48, 96, 136]
    assert all(later - earlier <= 64 - 16 for earlier, later in zip(starts, starts[1:]))  # overlaps >= 16


def test_blend_ramp_is_positive_and_tapers_over_the_margin():
    weight = _blend_ramp(40, 48, margin=8)
    assert weight.shape == (1, 1, 40, 48)
    assert (weight > 0).all() and weight.max() == 1.0
    assert weight[0, 0, 20, 24] == 1.0  # inside the margins
    assert weight[0, 0, 20, 0] == pytest.approx(0.5 / 8) and weight[0, 0, 0, 0] == pytest.approx((0.5 / 8) ** 2)
    row = weight[0, 0, 20]
    assert torch.all(row[:8].diff() > 0) and torch.all(row[-8:].diff() < 0)  # linear in, linear out


def test_tiled_decode_of_one_tile_is_the_plain_decode(tiny_vae):
    z = torch.randn(1, 4, 24, 20, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = tiny_vae.decode(z).sample
        tiny_vae.enable_tiling(tile_size=32, tile_overlap=8)
        try:
            assert torch.equal(tiny_vae.decode(z).sample, expected)  # smaller than a tile: decode as usual
            result = tiny_vae.tiled_decode(z).sample  # one tile: weight * image / weight
        finally:
            tiny_vae.disable_tiling()
    assert (result - expected).abs().max().item() <= 1e-6


def test_tiled_decode_stays_close_to_the_untiled_decode(tiny_vae):
    """Latents 48x40, tiles of 32 with 16 overlap: measured max |difference| 0.29 and RMS 0.027 on images
    spanning [-2.0, 1.9] with this tiny random VAE (4 groups of 2-4 channels: noisy per-tile GroupNorm
    statistics); see the slow test for SD 1.5's full-size VAE."""
    z = torch.randn(1, 4, 48, 40, generator=torch.Generator().manual_seed(0))
    decoder_inputs = []
    hook = tiny_vae.decoder.register_forward_pre_hook(lambda module, args: decoder_inputs.append(args[0].shape))
    with torch.no_grad():
        try:
            expected = tiny_vae.decode(z).sample
            decoder_inputs.clear()
            tiny_vae.enable_tiling(tile_size=32, tile_overlap=16)
            result = tiny_vae.decode(z).sample
        finally:
            tiny_vae.disable_tiling()
            hook.remove()
    assert result.shape == expected.shape == (1, 3, 384, 320)
    assert len(decoder_inputs) == 4 and all(max(shape[-2:]) <= 32 for shape in decoder_inputs)  # memory: one tile
    difference = (result - expected).abs()
    assert difference.max().item() < 0.4
    assert difference.pow(2).mean().sqrt().item() < 0.04
    assert psnr(to_unit_range(result), to_unit_range(expected)) > 30


def test_pipeline_vae_tiling_switch(tiny_sd15_folder):
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder)
    pipeline.enable_vae_tiling(tile_size=16, tile_overlap=4)
    assert pipeline.vae.use_tiling and pipeline.vae.tile_size == 16
    pipeline.disable_vae_tiling()
    assert not pipeline.vae.use_tiling


@pytest.mark.parametrize("tile_size, tile_overlap", [(32, 32), (32, 40), (32, -1)])
def test_bad_tiling_is_refused(tiny_vae, tile_size, tile_overlap):
    with pytest.raises(ValueError, match="tile_overlap must be in"):
        tiny_vae.enable_tiling(tile_size=tile_size, tile_overlap=tile_overlap)
    assert not tiny_vae.use_tiling


# ----- the dtype choice and the CLI switches ----------------------------------------------------------------


@pytest.mark.parametrize("flags, expected", [
    ({"avx512f", "amx_bf16", "amx_tile"}, torch.bfloat16),
    ({"avx512f", "avx512_bf16"}, torch.bfloat16),
    ({"avx2", "fma"}, torch.float32),
    (set(), torch.float32),  # no /proc/cpuinfo (not Linux)
])
def test_fastest_cpu_dtype(monkeypatch, flags, expected):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
    assert cpu.fastest_cpu_dtype() == expected


def test_cli_dtype_auto_and_switches(tiny_sd15_folder, monkeypatch):
    arguments = build_parser().parse_args(["generate", "a cat", "--weights", str(tiny_sd15_folder)])
    assert arguments.dtype == "auto" and not arguments.vae_tiling and not arguments.compile
    monkeypatch.setattr(cpu, "cpu_flags", lambda: {"amx_bf16"})
    pipeline = load_pipeline(str(tiny_sd15_folder), "auto", vae_tiling=True)
    assert pipeline.unet.dtype == torch.bfloat16 and pipeline.vae.use_tiling
    monkeypatch.setattr(cpu, "cpu_flags", lambda: set())
    assert load_pipeline(str(tiny_sd15_folder), "auto").unet.dtype == torch.float32
    assert load_pipeline(str(tiny_sd15_folder), "fp16").vae.dtype == torch.float16  # no upcast, as diffusers' SD 1.x


def test_cli_low_memory_keeps_the_allocator_default(tiny_sd15_folder, monkeypatch):
    import minidiff.cli as cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("called") or True)
    assert build_parser().parse_args(["generate", "a cat", "--low-memory"]).low_memory
    load_pipeline(str(tiny_sd15_folder), "fp32", low_memory=True)
    assert calls == []
    load_pipeline(str(tiny_sd15_folder), "fp32")
    assert calls == ["called"]


def test_keep_freed_memory_leaves_results_unchanged():
    before = torch.randn(1000, generator=torch.Generator().manual_seed(0)).sum()
    assert keep_freed_memory() in (True, False)  # False only without glibc
    big = torch.ones(64 * 2**20 // 4)  # 64 MB: from the heap now, not a fresh mmap
    assert big.sum().item() == big.numel()
    assert torch.randn(1000, generator=torch.Generator().manual_seed(0)).sum() == before


# ----- full size (python -m pytest -m slow) -----------------------------------------------------------------

needs_full_size = pytest.mark.skipif(
    not (FULL_SIZE_WEIGHTS / "model_index.json").is_file(),
    reason=f"full-size random SD 1.5 weights not in {FULL_SIZE_WEIGHTS} (weights_scripts/make_random_sd15.py)",
)


@pytest.mark.slow
@needs_full_size
@pytest.mark.skipif(
    cpu.fastest_cpu_dtype() != torch.bfloat16,
    reason="this CPU has no AMX-BF16 or AVX512-BF16: torch runs bfloat16 through generic kernels (an 8192x1280x1280 "
    "matmul: 31 s against 0.22 s in fp32 on an AVX2 EPYC), so 20 full-size bf16 steps would take hours",
)
def test_full_size_bfloat16_image_close_to_float32():
    """512x512, 20 steps on the full-size random SD 1.5 weights: the bfloat16 image vs the float32 one."""
    images = {}
    for dtype in (torch.float32, torch.bfloat16):
        images[dtype] = generate(StableDiffusionPipeline.from_pretrained(FULL_SIZE_WEIGHTS, torch_dtype=dtype), size=512)[1]
    assert torch.isfinite(images[torch.bfloat16]).all()
    assert psnr(images[torch.bfloat16], images[torch.float32]) >= MIN_PSNR_DB


@pytest.mark.slow
@needs_full_size
def test_full_size_tiled_decode_close_to_untiled():
    """SD 1.5's VAE (random weights), latents 96x96 -> 768x768, tiles of 64 with 16 overlap: measured max
    |difference| 0.22, mean 0.011, RMS 0.016 (images spanning [-3.2, 3.8], std 0.41)."""
    from minidiff.models.vae import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(FULL_SIZE_WEIGHTS, subfolder="vae").to(memory_format=torch.channels_last)
    z = torch.randn(1, 4, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = vae.decode(z).sample
        vae.enable_tiling(tile_size=64, tile_overlap=16)
        result = vae.decode(z).sample
    difference = (result - expected).abs()
    assert difference.max().item() < 0.3 and difference.pow(2).mean().sqrt().item() < 0.02
