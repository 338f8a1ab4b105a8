"""UNet2DConditionModel against diffusers' on the same random weights.

Each parity test builds diffusers' UNet from a seeded tiny config, saves it with diffusers'
`save_pretrained`, loads the folder with minidiff's `from_pretrained` (strict: every key and shape must
match), and runs both on the same inputs. Tolerance: max |difference| <= 1e-5 (float32; the two compute
the same operations in the same order, so in practice the difference is 0).
"""

import json
import warnings
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from minidiff import UNet2DConditionModel  # noqa: E402
from minidiff.checkpoints import CheckpointError  # noqa: E402

TOLERANCE = 1e-5  # max abs difference allowed vs diffusers, float32
SD15_CONFIG = Path(__file__).parents[1] / "minidiff" / "data" / "sd15" / "unet" / "config.json"

# SD 1.x style: conv proj_in/proj_out, attention_head_dim an int (= number of heads), last block without attention.
TINY_SD1 = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24,
    attention_head_dim=2,
    norm_num_groups=8,
)
# SD 2.x style: linear proj_in/proj_out, heads per block, upcast_attention, 3 resolutions.
TINY_SD2 = dict(
    sample_size=16,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24,
    attention_head_dim=[2, 4, 4],
    use_linear_projection=True,
    upcast_attention=True,
    norm_num_groups=8,
)
# Less common options that SD-family configs use: more transformer layers, class labels, scale-shift resnets,
# a custom time embedding width and activation, centered inputs, only-cross-attention blocks, kernels of 1.
TINY_OPTIONS = dict(
    TINY_SD2,
    transformer_layers_per_block=[2, 1, 1],
    cross_attention_dim=[24, 24, 24],
    only_cross_attention=[True, False, False],
    num_class_embeds=5,
    resnet_time_scale_shift="scale_shift",
    time_embedding_dim=48,
    time_embedding_act_fn="silu",
    center_input_sample=True,
    mid_block_scale_factor=0.5,
    conv_in_kernel=1,
    conv_out_kernel=1,
    flip_sin_to_cos=False,
    freq_shift=1,
)


def make_pair(config: dict, folder: Path):
    """diffusers' UNet (seeded random weights) and minidiff's, loaded from the folder diffusers wrote."""
    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel(**config).eval()
    reference.save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the config diffusers wrote must read with no warning
        ours = UNet2DConditionModel.from_pretrained(folder)
    return reference, ours


def max_difference(reference, ours, *args, **kwargs) -> float:
    with torch.no_grad():
        expected = reference(*args, **kwargs).sample
        got = ours(*args, **kwargs).sample
    assert got.shape == expected.shape
    return (got - expected).abs().max().item()


@pytest.fixture(scope="module")
def sd1_pair(tmp_path_factory):
    return make_pair(TINY_SD1, tmp_path_factory.mktemp("unet_sd1"))


@pytest.fixture(scope="module")
def sd2_pair(tmp_path_factory):
    return make_pair(TINY_SD2, tmp_path_factory.mktemp("unet_sd2"))


def inputs(batch=2, height=16, width=16, tokens=7, seed=1):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, height, width, generator=generator)
    context = torch.randn(batch, tokens, 24, generator=generator)
    return latents, context


TIMESTEPS = {
    "python int": 10,
    "python float": 10.5,
    "0-d tensor": torch.tensor(999),
    "(1,) tensor": torch.tensor([500]),
    "batched (B,) tensor": torch.tensor([3, 781]),
    "batched float tensor": torch.tensor([0.25, 640.5]),
}


@pytest.mark.parametrize("name", TIMESTEPS)
def test_sd1_style_matches_diffusers_for_every_timestep_form(sd1_pair, name):
    latents, context = inputs()
    assert max_difference(*sd1_pair, latents, TIMESTEPS[name], encoder_hidden_states=context) <= TOLERANCE


@pytest.mark.parametrize("name", TIMESTEPS)
def test_sd2_style_matches_diffusers_for_every_timestep_form(sd2_pair, name):
    latents, context = inputs()
    assert max_difference(*sd2_pair, latents, TIMESTEPS[name], encoder_hidden_states=context) <= TOLERANCE


def test_latents_not_a_multiple_of_the_downsampling_match_diffusers(sd2_pair):
    """13x11 latents: the upsamplers resize to their skip's size (upsample_size) instead of doubling."""
    latents, context = inputs(batch=1, height=13, width=11)
    assert max_difference(*sd2_pair, latents, 37, encoder_hidden_states=context) <= TOLERANCE


def test_less_common_options_match_diffusers(tmp_path):
    reference, ours = make_pair(TINY_OPTIONS, tmp_path)
    latents, context = inputs()
    labels = torch.tensor([0, 4])
    difference = max_difference(reference, ours, latents, torch.tensor([10, 20]), context, class_labels=labels)
    assert difference <= TOLERANCE


def test_parameter_names_are_diffusers_folder_names(sd1_pair):
    reference, ours = sd1_pair
    assert set(ours.state_dict()) == set(reference.state_dict())
    names = set(ours.state_dict())
    for name in [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.weight",
        "down_blocks.0.downsamplers.0.conv.weight",
        "up_blocks.0.upsamplers.0.conv.weight",
        "mid_block.attentions.0.proj_in.weight",
        "time_embedding.linear_1.weight",
        "conv_norm_out.weight",
    ]:
        assert name in names


def test_return_dict_false_gives_a_tuple_and_config_is_readable(sd1_pair):
    _, ours = sd1_pair
    latents, context = inputs()
    with torch.no_grad():
        as_tuple = ours(latents, 5, context, return_dict=False)
        as_output = ours(latents, 5, context)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    torch.testing.assert_close(as_tuple[0], as_output.sample, rtol=0, atol=0)
    assert ours.config.in_channels == 4 and ours.config.sample_size == 16
    assert ours.config.attention_head_dim == 2


# ----- full-size configs, built on the meta device (no memory, no weights) ---------------------------

SD21_CONFIG = {  # as in stabilityai/stable-diffusion-2-1/unet/config.json
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.10.0.dev0",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 96,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": True,
    "use_linear_projection": True,
}


def shapes(module) -> dict:
    return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}


@pytest.mark.parametrize("which", ["sd15", "sd21"])
def test_real_configs_read_without_warnings_and_build_diffusers_shapes(which):
    config = json.loads(SD15_CONFIG.read_text()) if which == "sd15" else SD21_CONFIG
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.device("meta"):
            ours = UNet2DConditionModel.from_config(config)
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel.from_config(config)
    assert shapes(ours) == shapes(reference)
    if which == "sd15":
        assert sum(p.numel() for p in ours.parameters()) == 859_520_964  # SD 1.5's UNet, 859.5M parameters
        assert ours.config.cross_attention_dim == 768 and ours.config.sample_size == 64
    else:  # SD 2.x: attention_head_dim [5, 10, 20, 20] are head counts; each head has 64 channels
        attn = ours.down_blocks[0].attentions[0].transformer_blocks[0].attn1
        assert attn.heads == 5 and attn.to_q.out_features == 320


# ----- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("dual_cross_attention", True),
        ("class_embed_type", "timestep"),
        ("addition_embed_type", "text_time"),
        ("time_embedding_type", "fourier"),
        ("attention_type", "gated"),
        ("encoder_hid_dim", 32),
    ],
)
def test_unimplemented_fields_raise_only_when_set(field, value):
    with pytest.raises(NotImplementedError, match=field):
        UNet2DConditionModel(**{**TINY_SD1, field: value})
    UNet2DConditionModel(**TINY_SD1)  # the defaults build


def test_unknown_block_type_is_named():
    config = dict(TINY_SD1, down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D"))
    with pytest.raises(NotImplementedError, match="SimpleCrossAttnDownBlock2D"):
        UNet2DConditionModel(**config)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="num_attention_heads"):
        UNet2DConditionModel(**dict(TINY_SD1, num_attention_heads=2))
    with pytest.raises(ValueError, match="attention_head_dim .* 3 values .* 2 blocks"):
        UNet2DConditionModel(**dict(TINY_SD1, attention_head_dim=[2, 2, 2]))
    with pytest.raises(ValueError, match="same length"):
        UNet2DConditionModel(**dict(TINY_SD1, up_block_types=("UpBlock2D",)))


def test_wrong_typed_config_field_is_reported(tmp_path, sd1_pair):
    _, ours = sd1_pair
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["in_channels"] = "four"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="in_channels.*must be a int.*'four'"):
        UNet2DConditionModel.from_pretrained(tmp_path)


def test_checkpoint_of_another_config_is_reported_with_shapes(tmp_path, sd1_pair):
    _, ours = sd1_pair
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["cross_attention_dim"] = 32  # the weights were made for 24
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"attn2.to_k.weight: expected \(64, 32\), found \(64, 24\)"):
        UNet2DConditionModel.from_pretrained(tmp_path)


def test_bad_inputs_are_reported(sd1_pair):
    _, ours = sd1_pair
    latents, context = inputs()
    with pytest.raises(ValueError, match=r"sample must be latents of shape \(B, 4, H, W\)"):
        ours(latents[:, :3], 1, context)
    with pytest.raises(ValueError, match="encoder_hidden_states must be"):
        ours(latents, 1, None)
    with pytest.raises(ValueError, match="batch 1 but sample has batch 2"):
        ours(latents, 1, context[:1])
    with pytest.raises(ValueError, match=r"timestep must be .* got shape \(3,\)"):
        ours(latents, torch.tensor([1, 2, 3]), context)


# ----- full size (slow) -----------------------------------------------------------------------------

FULL_SIZE_TOLERANCE = 1e-4  # max abs difference at SD 1.5 size (deeper network, larger sums), float32


@pytest.mark.slow
def test_full_size_sd15_unet_matches_diffusers(tmp_path):
    """SD 1.5's UNet from random weights: batch 2, 64x64 latents, a 77x768 text context."""
    config = json.loads(SD15_CONFIG.read_text())
    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel.from_config(config).eval()
    reference.save_pretrained(tmp_path)
    ours = UNet2DConditionModel.from_pretrained(tmp_path)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 64, 64, generator=generator)
    context = torch.randn(2, 77, 768, generator=generator)
    timesteps = torch.tensor([999, 1])
    with torch.no_grad():
        expected = reference(latents, timesteps, encoder_hidden_states=context).sample
        del reference
        got = ours(latents, timesteps, encoder_hidden_states=context).sample
    assert got.shape == (2, 4, 64, 64)
    measured = (got - expected).abs().max().item()
    assert measured <= FULL_SIZE_TOLERANCE, f"max abs difference {measured}"


def test_refused_fields_are_data_recorded_in_the_config_and_checked_in_from_config():
    unet = UNet2DConditionModel(**TINY_SD1)
    for field, supported in UNet2DConditionModel._refused_config.items():
        assert unet.config[field] == supported  # a fresh config has diffusers' keys, as diffusers' does
        assert field in unet.config["_use_default_values"]
    again = UNet2DConditionModel.from_config(unet.config)  # round trip: accepted at their values, no warning
    assert dict(again.config) == dict(unet.config)
    with pytest.raises(NotImplementedError, match=r"encoder_hid_dim=32 is not implemented in minidiff .* set it to None"):
        written = {key: value for key, value in unet.config.items() if key != "_use_default_values"}  # as a config.json
        UNet2DConditionModel.from_config({**written, "encoder_hid_dim": 32})
