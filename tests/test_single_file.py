"""Original single-file checkpoints: the key map, round trips, loading, diffusers as oracle, and every bad input.

Everything runs on tiny random SD-shaped networks (a three-level UNet with attention in two levels, a
two-level VAE, a two-layer CLIP) written as a diffusers-layout folder; full-size SD 1.5 is `slow`.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minidiff.checkpoints import CheckpointError
from minidiff.checkpoints.key_map import ema_key, text_encoder_key_map, unet_key_map, vae_key_map
from minidiff.checkpoints.reader import CheckpointFile
from minidiff.checkpoints.single_file_layout import SD15_CONFIGS
from minidiff.loaders.convert import convert, ldm_schedule_buffers, save_single_file
from minidiff.loaders.single_file import load_single_file
from minidiff.models.clip_text import CLIPTextModel
from minidiff.models.modeling import ModelMixin
from minidiff.models.unet_2d_condition import UNet2DConditionModel
from minidiff.models.vae import AutoencoderKL
from minidiff.schedulers.pndm import PNDMScheduler

ORACLE_TOLERANCE = 1e-5  # diffusers/transformers vs minidiff on the same weights and input (float32)

UNET_CONFIGS = {
    # layers_per_block 2: SD's numbering; three levels: an upsampler after an attention (output_blocks.k.2)
    "sd_like": dict(
        sample_size=8,
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        norm_num_groups=4,
        cross_attention_dim=16,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
    "one_layer": dict(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=16,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ),
}
VAE_CONFIG = dict(
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
    sample_size=16,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
)
CLIP_CONFIG = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, projection_dim=16)


def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight random (no norm left at ones, no bias at zero), so a swapped key cannot hide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return module.eval()


def write_tiny_folder(folder: Path, unet_config: dict) -> Path:
    randomized(UNet2DConditionModel(**unet_config), 0).save_pretrained(folder / "unet")
    randomized(AutoencoderKL(**VAE_CONFIG), 1).save_pretrained(folder / "vae")
    randomized(CLIPTextModel(**CLIP_CONFIG), 2).save_pretrained(folder / "text_encoder")
    for name in ("scheduler/scheduler_config.json", "model_index.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SD15_CONFIGS / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny diffusers-layout folder and the single file converted from it."""
    root = tmp_path_factory.mktemp("single_file")
    folder = write_tiny_folder(root / "folder", UNET_CONFIGS["sd_like"])
    convert(folder, root / "tiny.safetensors")
    return folder, root / "tiny.safetensors"


def rewritten(source: Path, target: Path, edit) -> Path:
    """A copy of the single file `source` whose tensors dict went through `edit`."""
    tensors = load_file(str(source))
    edit(tensors)
    save_file(tensors, str(target))
    return target


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert state_a[key].dtype == state_b[key].dtype and torch.equal(state_a[key], state_b[key]), key


# ----- the key map -------------------------------------------------------------------------------


def test_key_map_sd15_names():
    """Spot checks of SD 1.5's map against names of the real v1-5 file."""
    unet_map = unet_key_map(json.loads((SD15_CONFIGS / "unet/config.json").read_text()))
    pairs = {
        "model.diffusion_model.input_blocks.0.0.weight": "conv_in.weight",
        "model.diffusion_model.input_blocks.1.0.in_layers.0.weight": "down_blocks.0.resnets.0.norm1.weight",
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": "down_blocks.1.resnets.0.conv_shortcut.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight": "down_blocks.0.downsamplers.0.conv.weight",
        "model.diffusion_model.input_blocks.11.0.out_layers.3.bias": "down_blocks.3.resnets.1.conv2.bias",
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.0.attn2.to_k.weight": "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight": "mid_block.attentions.0.proj_in.weight",
        "model.diffusion_model.middle_block.2.emb_layers.1.weight": "mid_block.resnets.1.time_emb_proj.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight": "up_blocks.0.upsamplers.0.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight": "up_blocks.1.upsamplers.0.conv.weight",
        "model.diffusion_model.output_blocks.11.1.norm.weight": "up_blocks.3.attentions.2.norm.weight",
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": "up_blocks.3.resnets.2.conv_shortcut.weight",
        "model.diffusion_model.time_embed.2.bias": "time_embedding.linear_2.bias",
        "model.diffusion_model.out.2.weight": "conv_out.weight",
    }
    vae_map = vae_key_map(json.loads((SD15_CONFIGS / "vae/config.json").read_text()))
    vae_pairs = {
        "first_stage_model.decoder.up.3.block.0.nin_shortcut.weight": "decoder.up_blocks.0.resnets.0.conv_shortcut.weight",
        "first_stage_model.decoder.up.0.block.2.conv2.weight": "decoder.up_blocks.3.resnets.2.conv2.weight",
        "first_stage_model.decoder.up.1.upsample.conv.weight": "decoder.up_blocks.2.upsamplers.0.conv.weight",
        "first_stage_model.encoder.mid.attn_1.proj_out.weight": "encoder.mid_block.attentions.0.to_out.0.weight",
        "first_stage_model.encoder.mid.attn_1.norm.bias": "encoder.mid_block.attentions.0.group_norm.bias",
        "first_stage_model.encoder.norm_out.weight": "encoder.conv_norm_out.weight",
        "first_stage_model.quant_conv.weight": "quant_conv.weight",
    }
    for key_map, table in ((unet_map, pairs), (vae_map, vae_pairs)):
        for original, diffusers_name in table.items():
            assert key_map.to_diffusers(original) == diffusers_name
            assert key_map.to_original(diffusers_name) == original
    clip_map = text_encoder_key_map()
    assert clip_map.to_diffusers("cond_stage_model.transformer.text_model.final_layer_norm.weight") == "text_model.final_layer_norm.weight"
    assert ema_key("model.diffusion_model.input_blocks.1.1.proj_in.weight") == "model_ema.diffusion_modelinput_blocks11proj_inweight"
    assert unet_map.to_diffusers("model.diffusion_model.input_blocks.12.0.in_layers.0.weight") is None  # SD 1.5 has 0..11


@pytest.mark.parametrize("name", sorted(UNET_CONFIGS))
def test_key_map_is_a_bijection_on_every_module_key(name):
    """Every key of the modules maps to an original name and back, and no two keys share an original name."""
    with torch.device("meta"):
        modules = {
            "unet": (UNet2DConditionModel(**UNET_CONFIGS[name]), unet_key_map(UNET_CONFIGS[name])),
            "vae": (AutoencoderKL(**VAE_CONFIG), vae_key_map(VAE_CONFIG)),
            "text_encoder": (CLIPTextModel(**CLIP_CONFIG), text_encoder_key_map()),
        }
    for module, key_map in modules.values():
        keys = list(module.state_dict())
        originals = [key_map.to_original(key) for key in keys]
        assert None not in originals
        assert len(set(originals)) == len(keys)
        assert [key_map.to_diffusers(original) for original in originals] == keys


@pytest.mark.parametrize("name", sorted(UNET_CONFIGS))
def test_key_map_agrees_with_diffusers_conversion_functions(name):
    """diffusers' own converters (convert_ldm_unet/vae/clip_checkpoint) turn our original names back into
    exactly the diffusers state dict, tensor for tensor (the VAE's 1x1 convolutions included)."""
    import diffusers
    import transformers
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    unet = diffusers.UNet2DConditionModel(**UNET_CONFIGS[name])
    vae = diffusers.AutoencoderKL(**VAE_CONFIG)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_CONFIG))
    cases = [
        (unet.state_dict(), unet_key_map(dict(unet.config)), lambda sd: convert_ldm_unet_checkpoint(sd, dict(unet.config))),
        (vae.state_dict(), vae_key_map(dict(vae.config)), lambda sd: convert_ldm_vae_checkpoint(sd, dict(vae.config))),
        (
            {("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in clip.state_dict().items()},
            text_encoder_key_map(),
            convert_ldm_clip_checkpoint,
        ),
    ]
    for state_dict, key_map, diffusers_convert in cases:
        original = {key_map.to_original(k): key_map.tensor_to_original(k, v) for k, v in state_dict.items()}
        assert None not in original
        converted = diffusers_convert(original)
        assert set(converted) == set(state_dict)
        for key, tensor in state_dict.items():
            assert torch.equal(converted[key], tensor), key


def test_vae_attention_projections_are_1x1_convolutions_in_the_file(tiny):
    _, file = tiny
    checkpoint = CheckpointFile(file)
    for leaf in ("q", "k", "v", "proj_out"):
        assert checkpoint.shape(f"first_stage_model.encoder.mid.attn_1.{leaf}.weight") == (16, 16, 1, 1)
    assert checkpoint.shape("first_stage_model.encoder.mid.attn_1.norm.weight") == (16,)


# ----- round trips ---------------------------------------------------------------------------------


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_round_trip_folder_file_folder_is_bit_identical(tiny, tmp_path):
    folder, file = tiny
    convert(file, tmp_path / "back", config=folder)
    original, back = files_of(folder), files_of(tmp_path / "back")
    assert set(original) <= set(back)  # back also has tokenizer/ (bundled vocabulary)
    for name, content in original.items():
        assert back[name] == content, name  # weights files and configs, byte for byte
    assert (tmp_path / "back" / "tokenizer" / "vocab.json").is_file()


def test_round_trip_file_folder_file_is_bit_identical(tiny, tmp_path):
    folder, file = tiny
    convert(file, tmp_path / "folder", config=folder)
    convert(tmp_path / "folder", tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == file.read_bytes()


def test_file_has_the_original_extras(tiny):
    """position_ids and LDM's schedule buffers are written as the original files have them."""
    _, file = tiny
    tensors = load_file(str(file))
    position_ids = tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    assert position_ids.dtype == torch.int64 and torch.equal(position_ids, torch.arange(77)[None])
    scheduler = PNDMScheduler.from_pretrained(SD15_CONFIGS, subfolder="scheduler")
    # LDM computes in float64 and stores float32; diffusers computes in float32: same schedule to float32 rounding
    assert torch.allclose(tensors["alphas_cumprod"], scheduler.alphas_cumprod, atol=1e-6, rtol=0)
    assert tensors["betas"].shape == (1000,) and len(ldm_schedule_buffers(dict(scheduler.config))) == 12


# ----- loading ----------------------------------------------------------------------------------------


def test_load_single_file_equals_folder_layout(tiny):
    folder, file = tiny
    parts = load_single_file(file, config=folder)
    from_folder = {
        "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
        "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae"),
        "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
    }
    for name, module in from_folder.items():
        assert_same_state(getattr(parts, name), module)
    torch.manual_seed(0)
    latents, context, t = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 16), torch.tensor([3, 999])
    ids = torch.randint(0, 49408, (2, 77))
    image = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(parts.unet(latents, t, encoder_hidden_states=context).sample,
                           from_folder["unet"](latents, t, encoder_hidden_states=context).sample)  # fmt: skip
        assert torch.equal(parts.vae(image).sample, from_folder["vae"](image).sample)
        assert torch.equal(parts.text_encoder(ids)[0], from_folder["text_encoder"](ids)[0])
    assert isinstance(parts.scheduler, PNDMScheduler) and parts.scheduler.config.steps_offset == 1
    assert parts.tokenizer("a cat").input_ids[0] == 49406
    assert any("position_ids = arange(77)" in line for line in parts.accounted)
    assert any("alphas_cumprod matches" in line for line in parts.accounted)


def test_component_from_single_file_and_dtype(tiny):
    folder, file = tiny
    unet = UNet2DConditionModel.from_single_file(file, config=folder / "unet", torch_dtype=torch.float16)
    reference = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    assert unet.dtype == torch.float16
    for key, tensor in reference.state_dict().items():
        assert torch.equal(unet.state_dict()[key], tensor.half()), key
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    assert_same_state(AutoencoderKL.from_single_file(file, config=vae_config), AutoencoderKL.from_pretrained(folder, subfolder="vae"))


def test_ckpt_of_plain_tensors_loads(tiny, tmp_path):
    folder, file = tiny
    torch.save({"state_dict": load_file(str(file)), "global_step": 470000}, tmp_path / "tiny.ckpt")
    assert_same_state(
        UNet2DConditionModel.from_single_file(tmp_path / "tiny.ckpt", config=folder),
        UNet2DConditionModel.from_single_file(file, config=folder),
    )


def test_ema_weights_used_when_asked(tiny, tmp_path):
    folder, file = tiny

    def add_ema(tensors):
        for key in [k for k in tensors if k.startswith("model.diffusion_model.")]:
            tensors[ema_key(key)] = tensors[key] + 1.0
        tensors["model_ema.decay"] = torch.tensor(0.9999)
        tensors["model_ema.num_updates"] = torch.tensor(470000, dtype=torch.int32)

    with_ema = rewritten(file, tmp_path / "with_ema.safetensors", add_ema)
    plain = load_single_file(with_ema, config=folder)
    ema = load_single_file(with_ema, config=folder, use_ema=True)
    reference = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    assert_same_state(plain.unet, reference)
    for key, tensor in reference.state_dict().items():
        assert torch.equal(ema.unet.state_dict()[key], tensor + 1.0), key
    assert any("EMA tensors (model_ema.*): not used; pass use_ema=True" in line for line in plain.accounted)
    assert any("EMA bookkeeping" in line and "model_ema.decay" in line for line in plain.accounted)
    assert any("loaded into the UNet (use_ema=True)" in line for line in ema.accounted)


def test_use_ema_without_ema_weights_is_refused(tiny):
    folder, file = tiny
    with pytest.raises(CheckpointError, match=r"no EMA weights .* use_ema=False"):
        UNet2DConditionModel.from_single_file(file, config=folder, use_ema=True)


def test_schedule_mismatch_is_reported_with_the_max_difference(tiny, tmp_path):
    folder, file = tiny
    edited = dict(json.loads((SD15_CONFIGS / "scheduler/scheduler_config.json").read_text()), beta_end=0.09)

    def other_schedule(tensors):
        tensors["alphas_cumprod"] = ldm_schedule_buffers(edited)["alphas_cumprod"]

    changed = rewritten(file, tmp_path / "other_schedule.safetensors", other_schedule)
    with pytest.warns(UserWarning, match=r"alphas_cumprod .* does not match the scheduler config .*max difference 0\.\d+"):
        parts = load_single_file(changed, config=folder)
    assert any("does NOT match" in line for line in parts.accounted)


def test_damaged_position_ids_warn_and_are_ignored(tiny, tmp_path):
    folder, file = tiny

    def damage(tensors):
        tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None] - 0.0001

    damaged = rewritten(file, tmp_path / "damaged.safetensors", damage)
    with pytest.warns(UserWarning, match="position_ids is not arange"):
        parts = load_single_file(damaged, config=folder)
    assert_same_state(parts.text_encoder, CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"))


def test_save_single_file_from_modules_writes_the_same_file(tiny, tmp_path):
    folder, file = tiny
    parts = load_single_file(file, config=folder)
    written = save_single_file(tmp_path / "saved.safetensors", parts.unet, parts.vae, parts.text_encoder, parts.scheduler)
    assert written.read_bytes() == file.read_bytes()


def test_pipeline_from_single_file_matches_folder(tiny_sd15_folder, tmp_path):
    """The SD 1.5-layout tiny folder, through a single file, gives the same weights, bit for bit, and the same
    images as the folder itself. The images are compared to 1e-5, not bit for bit: the weights are equal, with
    equal strides, but the two loaders leave them at different address alignments, and with one thread the CPU
    kernels then sum in a different order (measured: at most 2.1e-6 over 2 steps; 0.0 with two threads)."""
    import numpy as np

    from minidiff.pipelines import StableDiffusionPipeline

    file = convert(tiny_sd15_folder, tmp_path / "tiny_sd15.safetensors")
    parts = load_single_file(file, config=tiny_sd15_folder)
    from_file = StableDiffusionPipeline(parts.vae, parts.text_encoder, parts.tokenizer, parts.unet, parts.scheduler)
    from_folder = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder)
    for name in ("vae", "text_encoder", "unet"):
        file_state, folder_state = getattr(from_file, name).state_dict(), getattr(from_folder, name).state_dict()
        assert file_state.keys() == folder_state.keys()
        assert all(torch.equal(file_state[key], folder_state[key]) for key in file_state), name
    images = []
    for pipe in (from_file, from_folder):
        pipe.set_progress_bar_config(disable=True)
        run = dict(num_inference_steps=2, height=64, width=64, output_type="np", generator=torch.Generator().manual_seed(0))
        images.append(pipe("a photograph of an astronaut riding a horse", **run).images)
    assert np.abs(images[0] - images[1]).max() <= 1e-5


# ----- diffusers as the oracle -------------------------------------------------------------------------


def test_diffusers_reads_the_file_minidiff_wrote(tiny):
    """Offline: diffusers' from_single_file with `config=` the local folder and local_files_only=True."""
    import diffusers
    import transformers
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm, load_single_file_checkpoint

    folder, file = tiny
    offline = dict(config=str(folder), local_files_only=True)
    parts = load_single_file(file, config=folder)
    torch.manual_seed(0)
    latents, context, t = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 16), torch.tensor([3, 999])
    image, ids = torch.randn(1, 3, 16, 16), torch.randint(0, 49408, (2, 77))
    with torch.no_grad():
        unet = diffusers.UNet2DConditionModel.from_single_file(str(file), subfolder="unet", **offline)
        expected = unet(latents, t, encoder_hidden_states=context).sample
        found = parts.unet(latents, t, encoder_hidden_states=context).sample
        assert (expected - found).abs().max() <= ORACLE_TOLERANCE

        vae = diffusers.AutoencoderKL.from_single_file(str(file), subfolder="vae", **offline)
        assert (vae(image).sample - parts.vae(image).sample).abs().max() <= ORACLE_TOLERANCE

        checkpoint = load_single_file_checkpoint(str(file), local_files_only=True)
        clip = create_diffusers_clip_model_from_ldm(transformers.CLIPTextModel, checkpoint, subfolder="text_encoder", **offline)
        assert (clip(ids).last_hidden_state - parts.text_encoder(ids)[0]).abs().max() <= ORACLE_TOLERANCE


# ----- bad input: each with its message -------------------------------------------------------------


def test_truncated_file(tiny, tmp_path):
    _, file = tiny
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"is truncated: .* download it again"):
        load_single_file(cut)
    stub = tmp_path / "stub.safetensors"
    stub.write_bytes(file.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"header claims \d+ bytes but the file has only 200 bytes"):
        load_single_file(stub)


def test_header_that_lies_about_sizes(tmp_path):
    header = json.dumps({"model.diffusion_model.out.2.bias": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}).encode()
    lying = tmp_path / "lying.safetensors"
    lying.write_bytes(struct.pack("<Q", len(header)) + header + bytes(32))
    with pytest.raises(CheckpointError, match=r"header lies about 'model.diffusion_model.out.2.bias': F32 \(4, 4\) takes 64 bytes, but its data_offsets \[0, 32\] give 32"):
        load_single_file(lying)


def test_missing_key(tiny, tmp_path):
    folder, file = tiny
    incomplete = rewritten(file, tmp_path / "missing.safetensors", lambda t: t.pop("model.diffusion_model.out.2.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\):\n    model.diffusion_model.out.2.bias \(conv_out.bias\)"):
        load_single_file(incomplete, config=folder)


def test_extra_keys(tiny, tmp_path):
    folder, file = tiny

    def unplaceable(tensors):
        tensors["model.diffusion_model.input_blocks.99.0.in_layers.0.weight"] = torch.zeros(8)

    with pytest.raises(CheckpointError, match=r"cannot place .*\n.*unexpected keys \(1\):\n    model.diffusion_model.input_blocks.99"):
        load_single_file(rewritten(file, tmp_path / "extra.safetensors", unplaceable), config=folder)

    def placeable_but_absent(tensors):
        tensors["model.diffusion_model.out.2.scale"] = torch.zeros(4)

    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\):\n    model.diffusion_model.out.2.scale \(conv_out.scale\)"):
        load_single_file(rewritten(file, tmp_path / "extra2.safetensors", placeable_but_absent), config=folder)

    def foreign(tensors):
        tensors["control_model.time_embed.0.weight"] = torch.zeros(4)

    with pytest.raises(CheckpointError, match=r"(?s)belong to no part of Stable Diffusion 1.x:\n.*control_model.time_embed.0.weight"):
        load_single_file(rewritten(file, tmp_path / "extra3.safetensors", foreign), config=folder)


def test_wrong_shape_says_expected_and_found(tiny, tmp_path):
    folder, file = tiny

    def reshape(tensors):
        # InstructPix2Pix's conv_in (8 channels); an inpainting UNet's 9 are recognised instead (tests/test_inpaint.py)
        tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, 8, 3, 3)

    with pytest.raises(CheckpointError, match=r"model.diffusion_model.input_blocks.0.0.weight \(conv_in.weight\): expected \(8, 4, 3, 3\), found \(8, 8, 3, 3\)"):
        load_single_file(rewritten(file, tmp_path / "shape.safetensors", reshape), config=folder)


def test_full_size_sd15_config_refuses_a_tiny_file_clearly(tiny):
    _, file = tiny
    with pytest.raises(CheckpointError, match=r"does not fit UNet2DConditionModel as configured"):
        UNet2DConditionModel.from_single_file(file)  # bundled SD 1.5 config: every shape differs


def test_sd2_file_is_recognised(tmp_path):
    sd2 = tmp_path / "v2-1_768-ema-pruned.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 1024),
            "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(3, 4),
            "first_stage_model.encoder.conv_in.weight": torch.zeros(2),
        },
        str(sd2),
    )
    with pytest.raises(CheckpointError, match=r"is a Stable Diffusion 2.x checkpoint \(found OpenCLIP text encoder keys.*Stable Diffusion 1.x checkpoints only"):
        load_single_file(sd2)
    only_unet = tmp_path / "sd2_unet_only.safetensors"
    save_file({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 1024)}, str(only_unet))
    with pytest.raises(CheckpointError, match=r"Stable Diffusion 2.x checkpoint \(found cross-attention context dim 1024"):
        UNet2DConditionModel.from_single_file(only_unet)


def test_sdxl_file_is_recognised(tmp_path):
    sdxl = tmp_path / "sd_xl_base_1.0.safetensors"
    save_file(
        {
            "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": torch.zeros(77, 8),
            "model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 4),
        },
        str(sdxl),
    )
    with pytest.raises(CheckpointError, match=r"is an SDXL checkpoint \(found 'conditioner.embedders.*label_emb.*Stable Diffusion 1.x checkpoints only"):
        load_single_file(sdxl)


def test_safetensors_of_something_else(tmp_path):
    bert = tmp_path / "bert.safetensors"
    save_file({"bert.embeddings.word_embeddings.weight": torch.zeros(4, 4)}, str(bert))
    with pytest.raises(CheckpointError, match=r"is not a Stable Diffusion checkpoint: none of its 1 keys start with 'model.diffusion_model.'"):
        load_single_file(bert)
    component = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({"down_blocks.0.resnets.0.norm1.weight": torch.zeros(4)}, str(component))
    with pytest.raises(CheckpointError, match=r"look like one component of a diffusers folder: load that folder with from_pretrained"):
        UNet2DConditionModel.from_single_file(component)
    with pytest.raises(CheckpointError, match=r"is not a safetensors file: it has 3 bytes"):
        (tmp_path / "tiny.safetensors").write_bytes(b"abc")
        load_single_file(tmp_path / "tiny.safetensors")


class ArbitraryObject:
    """Stands for the pytorch-lightning callbacks and other objects some .ckpt files pickle."""


def test_ckpt_that_needs_unpickling_is_refused(tmp_path):
    ckpt = tmp_path / "sd-v1-5.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}, "callbacks": ArbitraryObject()}, ckpt)
    with pytest.raises(CheckpointError, match=r"cannot be read safely.*ArbitraryObject.*weights_only=True\)\. Use the `.safetensors` release of the same weights"):
        load_single_file(ckpt)


def test_other_model_classes_and_bad_dtype_are_refused(tiny):
    folder, file = tiny
    from minidiff.models.unet_2d import UNet2DModel

    with pytest.raises(ValueError, match=r"UNet2DModel cannot be loaded from a single file; only UNet2DConditionModel"):
        UNet2DModel.from_single_file(file)
    with pytest.raises(ValueError, match="torch_dtype must be a floating torch.dtype"):
        UNet2DConditionModel.from_single_file(file, config=folder, torch_dtype=torch.int8)
    with pytest.raises(ValueError, match="give DST a .safetensors name"):
        convert(folder, folder.parent / "out_folder")


# ----- memory --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, dtype, memory_format",
    [((1024, 1024), "torch.float16", "None"), ((256, 64, 4, 4), "None", "torch.channels_last")],
    ids=["cast to float16", "laid out channels-last"],
)
def test_converting_gives_back_the_pages_it_read(tmp_path, shape, dtype, memory_format):
    """Reading 24 float32 tensors converted (cast, or re-laid out) must peak near what it keeps,
    not at the map plus the copies (1.5x for the cast, 2x for the layout)."""
    file = tmp_path / "weights.safetensors"
    save_file({f"w{i}": torch.randn(shape) for i in range(24)}, str(file))
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from minidiff.checkpoints.reader import CheckpointFile

        def status_kb(field):  # VmRSS: resident now; VmHWM: the peak of this process (not of the forked parent)
            return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

        before = status_kb("VmRSS:")
        checkpoint = CheckpointFile({str(file)!r})
        kept = [checkpoint.tensor(key, {dtype}, {memory_format}) for key in checkpoint.keys()]
        assert all(tensor.is_contiguous(memory_format={memory_format} or torch.contiguous_format) for tensor in kept)
        print(sum(tensor.nbytes for tensor in kept), (status_kb("VmHWM:") - before) * 1024)
        """
    )
    output = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    kept, grown = map(int, output.split())
    assert grown <= 1.2 * kept, f"peak grew by {grown / 2**20:.0f} MB for {kept / 2**20:.0f} MB of converted weights"


def test_only_tensors_needing_a_conversion_are_copied(tmp_path):
    """Asked for float32 channels-last from a float32 file: 2-D tensors stay views of the file's map, 4-D ones
    become channels-last copies (1x1 convolutions too, with channels-last strides, as Module.to makes them)."""
    file = tmp_path / "weights.safetensors"
    stored = {"linear": torch.randn(8, 4), "conv1x1": torch.randn(8, 4, 1, 1), "conv3x3": torch.randn(8, 4, 3, 3)}
    save_file(stored, str(file))
    checkpoint = CheckpointFile(file)
    for key, expected in stored.items():
        tensor = checkpoint.tensor(key, torch.float32, torch.channels_last)
        assert torch.equal(tensor, expected) and tensor.stride() == expected.to(memory_format=torch.channels_last if expected.ndim == 4 else torch.contiguous_format).stride()
        assert (tensor.data_ptr() == checkpoint.tensor(key).data_ptr()) == (key == "linear"), key


# ----- full size (slow) ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_size_sd15_round_trip_and_load(tmp_path):
    """Random full-size SD 1.5 (4.3 GB of fp32): folder -> file -> folder bit-identical; the file loads with the
    bundled configs (no config=) into the same weights."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "weights_scripts"))
    from make_random_sd15 import make_random_sd15

    folder = make_random_sd15(tmp_path / "sd15", seed=0)
    convert(folder, tmp_path / "sd15.safetensors")
    convert(tmp_path / "sd15.safetensors", tmp_path / "back")
    for name in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (tmp_path / "back" / name).read_bytes() == (folder / name).read_bytes(), name
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the bundled configs and the file's schedule fit: nothing to warn about
        parts = load_single_file(tmp_path / "sd15.safetensors")
    reference = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    for key, tensor in parts.unet.state_dict().items():
        assert torch.equal(tensor, reference[key]), key
