"""UNet2DModel (the DDPM pixel UNet) against diffusers' UNet2DModel on the same random weights.

diffusers writes the folder (save_pretrained), minidiff reads it (from_pretrained), both run the same
input. Tiny configs keep this fast; the full google/ddpm-cat-256 shape is checked under `-m slow`.
"""

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from minidiff.models.unet_2d import UNet2DModel  # noqa: E402

# fp32 parity: max |ours - diffusers| over the output
TINY_ATOL = 1e-5
FULL_ATOL = 1e-4

# google/ddpm-cat-256's config.json, verbatim apart from its bookkeeping keys.
DDPM_CAT_256 = {
    "act_fn": "silu", "attention_head_dim": None, "block_out_channels": [128, 128, 256, 256, 512, 512],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 256,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
}

# The same fields and block types, narrow: 32x32 pixels down to 1x1 over six levels.
TINY_CAT = {**DDPM_CAT_256, "block_out_channels": [16, 16, 32, 32, 64, 64], "norm_num_groups": 8, "sample_size": 32}

# The other config fields, each changed from its default somewhere below.
TINY_OTHER_FIELDS = {
    "default-blocks": dict(
        block_out_channels=[16, 32, 32, 48], norm_num_groups=8, attention_head_dim=8, sample_size=16,
    ),
    "fourier-scale-shift-resnet-resampling": dict(
        block_out_channels=[16, 32, 32], down_block_types=["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"], norm_num_groups=4, attention_head_dim=8,
        time_embedding_type="fourier", resnet_time_scale_shift="scale_shift", downsample_type="resnet",
        upsample_type="resnet", center_input_sample=True, mid_block_scale_factor=1.41421356, num_class_embeds=5,
        layers_per_block=1, in_channels=2, out_channels=5, sample_size=8, norm_eps=1e-6,
    ),
    "learned-time-timestep-classes-no-mid-attention": dict(
        block_out_channels=[8, 16], down_block_types=["AttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "AttnUpBlock2D"], norm_num_groups=4, attention_head_dim=4,
        time_embedding_type="learned", num_train_timesteps=1000, class_embed_type="timestep", add_attention=False,
        act_fn="mish", time_embedding_dim=24, layers_per_block=3, sample_size=8, dropout=0.1,
    ),
    "no-mid-block-attention-groups": dict(
        block_out_channels=[8, 16], down_block_types=["DownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "UpBlock2D"], norm_num_groups=4, attn_norm_num_groups=2,
        mid_block_type=None, attention_head_dim=None, class_embed_type="identity", time_embedding_dim=8,
        sample_size=8, downsample_padding=0,
    ),
    "mid-attention-groups-identity-class": dict(
        block_out_channels=[8, 16], down_block_types=["DownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "UpBlock2D"], norm_num_groups=4, attn_norm_num_groups=2,
        class_embed_type="identity", time_embedding_dim=8, sample_size=8, flip_sin_to_cos=False,
    ),
}


def diffusers_unet(config: dict, seed: int = 0):
    """diffusers' UNet2DModel with seeded random weights; norms and the Fourier weights are perturbed too,
    so that swapping any two layers of the same shape changes the output."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.2 * torch.randn_like(parameter))
    return model


def inputs(config: dict, batch: int = 2, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    size = config["sample_size"]
    sample = torch.randn(batch, config.get("in_channels", 3), size, size, generator=generator)
    if config.get("time_embedding_type") == "fourier":
        timesteps = torch.tensor([0.5, 20.0])[:batch]  # noise levels sigma > 0
    else:
        timesteps = torch.tensor([10, 980])[:batch]
    class_labels = None
    if config.get("num_class_embeds"):
        class_labels = torch.tensor([1, 4])[:batch]
    elif config.get("class_embed_type") == "timestep":
        class_labels = torch.tensor([3, 500])[:batch]
    elif config.get("class_embed_type") == "identity":
        time_embed_dim = config.get("time_embedding_dim") or 4 * config["block_out_channels"][0]
        class_labels = torch.randn(batch, time_embed_dim, generator=generator)
    return sample, timesteps, class_labels


def compare(config: dict, tmp_path, atol: float, batch: int = 2) -> float:
    theirs = diffusers_unet(config)
    theirs.save_pretrained(tmp_path)
    ours = UNet2DModel.from_pretrained(tmp_path)
    sample, timesteps, class_labels = inputs(config, batch)
    with torch.no_grad():
        expected = theirs(sample, timesteps, class_labels=class_labels).sample
        got = ours(sample, timesteps, class_labels=class_labels).sample
    assert got.shape == expected.shape
    error = (got - expected).abs().max().item()
    assert error <= atol, f"max abs difference {error:.3g} > {atol}"
    return error


def test_ddpm_cat_256_block_types_tiny_parity(tmp_path):
    compare(TINY_CAT, tmp_path, TINY_ATOL)
    ours = UNet2DModel.from_pretrained(tmp_path)
    assert ours.config.sample_size == 32
    assert [type(block.attentions).__name__ for block in ours.down_blocks].count("ModuleList") == 1


@pytest.mark.parametrize("name", list(TINY_OTHER_FIELDS))
def test_other_config_fields_parity(name, tmp_path):
    compare(TINY_OTHER_FIELDS[name], tmp_path, TINY_ATOL)


def test_parameter_names_and_shapes_are_diffusers():
    for config in [TINY_CAT, *TINY_OTHER_FIELDS.values()]:
        theirs = diffusers.UNet2DModel(**config)
        ours = UNet2DModel(**config)
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_timestep_as_int_0d_and_batch_tensor_agree(tmp_path):
    torch.manual_seed(0)
    model = UNet2DModel(**TINY_CAT).eval()
    sample, _, _ = inputs(TINY_CAT)
    with torch.no_grad():
        as_int = model(sample, 500).sample
        as_0d = model(sample, torch.tensor(500)).sample
        as_batch = model(sample, torch.tensor([500, 500])).sample
        as_tuple = model(sample, 500, return_dict=False)
    torch.testing.assert_close(as_0d, as_int, rtol=0, atol=0)
    torch.testing.assert_close(as_batch, as_int, rtol=0, atol=0)
    torch.testing.assert_close(as_tuple[0], as_int, rtol=0, atol=0)


def test_old_attention_key_names_load(tmp_path):
    """The original google/ddpm-* files name attention projections query/key/value/proj_attn."""
    theirs = diffusers_unet(TINY_CAT)
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    old = {}
    for key, value in theirs.state_dict().items():
        for new_name, old_name in renames.items():
            key = key.replace(new_name, old_name)
        old[key] = value
    assert any(".proj_attn." in key for key in old)
    ours = UNet2DModel.from_state_dict(dict(theirs.config), old)
    sample, timesteps, _ = inputs(TINY_CAT)
    with torch.no_grad():
        error = (ours(sample, timesteps).sample - theirs(sample, timesteps).sample).abs().max().item()
    assert error <= TINY_ATOL


def test_diffusers_sharded_fp16_variant_folder_loads(tmp_path):
    theirs = diffusers_unet(TINY_CAT).half()
    theirs.save_pretrained(tmp_path, variant="fp16", max_shard_size="200KB")
    names = sorted(path.name for path in tmp_path.iterdir())
    assert "diffusion_pytorch_model.safetensors.index.fp16.json" in names
    assert sum(name.endswith(".safetensors") for name in names) > 1
    ours = UNet2DModel.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16)
    assert ours.dtype == torch.float16
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_minidiff_folder_loads_in_diffusers(tmp_path):
    torch.manual_seed(0)
    ours = UNet2DModel(**TINY_CAT).eval()
    ours.save_pretrained(tmp_path)
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path).eval()
    sample, timesteps, _ = inputs(TINY_CAT)
    with torch.no_grad():
        error = (ours(sample, timesteps).sample - theirs(sample, timesteps).sample).abs().max().item()
    assert error <= TINY_ATOL
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "UNet2DModel"


# ----- clear errors -----


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(down_block_types=["DownBlock2D"] * 5), "one entry per level"),
        (dict(down_block_types=["SkipDownBlock2D"] + TINY_CAT["down_block_types"][1:]), "unknown down block type"),
        (dict(up_block_types=["CrossAttnUpBlock2D"] + TINY_CAT["up_block_types"][1:]), "unknown up block type"),
        (dict(time_embedding_type="sinusoidal"), "unknown time_embedding_type 'sinusoidal'"),
        (dict(time_embedding_type="learned"), "needs num_train_timesteps"),
        (dict(resnet_time_scale_shift="spatial"), "unknown resnet_time_scale_shift"),
        (dict(downsample_type="fir"), "unknown downsample_type"),
        (dict(class_embed_type="projection"), "unknown class_embed_type"),
    ],
)
def test_bad_config_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        UNet2DModel(**{**TINY_CAT, **change})


def test_bad_inputs_are_refused():
    model = UNet2DModel(**TINY_CAT).eval()
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        model(torch.randn(1, 4, 32, 32), 1)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 48, 48), 1)
    with pytest.raises(ValueError, match="one per sample"):
        model(torch.randn(2, 3, 32, 32), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="no class embedding"):
        model(torch.randn(1, 3, 32, 32), 1, class_labels=torch.tensor([0]))
    conditional = UNet2DModel(**{**TINY_CAT, "num_class_embeds": 3})
    with pytest.raises(ValueError, match="pass class_labels"):
        conditional(torch.randn(1, 3, 32, 32), 1)


@pytest.mark.slow
def test_full_size_ddpm_cat_256_parity(tmp_path):
    error = compare(DDPM_CAT_256, tmp_path, FULL_ATOL, batch=1)
    print(f"full-size ddpm-cat-256 max abs difference: {error:.3g}")


# ----- weights_scripts/make_random_ddpm.py -----


def _make_random_ddpm():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "weights_scripts" / "make_random_ddpm.py"
    spec = importlib.util.spec_from_file_location("make_random_ddpm", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_random_ddpm_folder_runs_the_same_in_both_pipelines(tmp_path):
    from minidiff.pipelines.ddpm import DDPMPipeline

    make = _make_random_ddpm()
    folder = make.make_random_ddpm(tmp_path / "a", seed=0, tiny=True)
    again = make.make_random_ddpm(tmp_path / "b", seed=0, tiny=True)
    weights = "diffusion_pytorch_model.safetensors"  # at the root, as in google/ddpm-cat-256
    assert (folder / weights).read_bytes() == (again / weights).read_bytes()  # seeded: same files
    assert make.ddpm_cat_config()["block_out_channels"] == DDPM_CAT_256["block_out_channels"]

    ours = DDPMPipeline.from_pretrained(folder)
    theirs = diffusers.DDPMPipeline.from_pretrained(folder)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    assert ours.unet.config.sample_size == 32
    images = [
        pipe(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=2, output_type="np").images
        for pipe in (ours, theirs)
    ]
    # the whole loop (noise draw, two UNet calls, DDPM steps, clipping), on the same random weights
    assert abs(torch.as_tensor(images[0]) - torch.as_tensor(images[1])).max() <= TINY_ATOL
