"""AutoencoderKL against diffusers' on the same random weights, and the clear errors of loading one.

Parity tests build diffusers' AutoencoderKL from a seeded tiny config, save it with diffusers'
`save_pretrained`, load the folder with minidiff's `from_pretrained` (strict), and compare on the same
inputs. Tolerance: max |difference| <= 1e-5 (float32; in practice 0). Samples of the posterior use the
same seeded generator on both sides and must agree to the same tolerance.
"""

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers")

from minidiff import AutoencoderKL  # noqa: E402
from minidiff.checkpoints import CheckpointError  # noqa: E402
from minidiff.models.vae import DiagonalGaussianDistribution  # noqa: E402

TOLERANCE = 1e-5  # max abs difference allowed vs diffusers, float32

WEIGHTS = "diffusion_pytorch_model.safetensors"
SD15_CONFIG = Path(__file__).parents[1] / "minidiff" / "data" / "sd15" / "vae" / "config.json"
TINY = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)


def make_pair(config: dict, folder: Path):
    torch.manual_seed(0)
    reference = diffusers.AutoencoderKL(**config).eval()
    reference.save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the config diffusers wrote must read with no warning
        ours = AutoencoderKL.from_pretrained(folder)
    return reference, ours


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae")
    make_pair(TINY, path)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(TINY, tmp_path_factory.mktemp("vae_pair"))


def image(batch=2, size=32, seed=1):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def difference(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# ----- parity -----------------------------------------------------------------------------------------


def test_encode_gives_diffusers_posterior(pair):
    reference, ours = pair
    x = image()
    with torch.no_grad():
        expected = reference.encode(x).latent_dist
        got = ours.encode(x).latent_dist
    assert got.mean.shape == (2, 4, 16, 16)
    for name in ["mean", "logvar", "std", "var"]:
        assert difference(getattr(got, name), getattr(expected, name)) <= TOLERANCE, name
    assert difference(got.mode(), expected.mode()) <= TOLERANCE
    assert difference(got.kl(), expected.kl()) <= TOLERANCE


def test_posterior_sample_with_a_seeded_generator_equals_diffusers(pair):
    reference, ours = pair
    x = image()
    with torch.no_grad():
        expected = reference.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(42))
        got = ours.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(42))
        # one generator per image, as img2img passes them
        expected_list = reference.encode(x).latent_dist.sample([torch.Generator().manual_seed(s) for s in (1, 2)])
        got_list = ours.encode(x).latent_dist.sample([torch.Generator().manual_seed(s) for s in (1, 2)])
    assert difference(got, expected) <= TOLERANCE
    assert difference(got_list, expected_list) <= TOLERANCE
    assert difference(got, ours.encode(x).latent_dist.mean) > 1e-3  # it really is a sample, not the mean


def test_decode_matches_diffusers(pair):
    reference, ours = pair
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference.decode(z).sample
        got = ours.decode(z).sample
        as_tuple = ours.decode(z, return_dict=False)
    assert got.shape == (2, 3, 32, 32)
    assert difference(got, expected) <= TOLERANCE
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], got)


@pytest.mark.parametrize("sample_posterior", [False, True])
def test_forward_reconstruction_matches_diffusers(pair, sample_posterior):
    reference, ours = pair
    x = image()
    with torch.no_grad():
        expected = reference(x, sample_posterior=sample_posterior, generator=torch.Generator().manual_seed(7)).sample
        got = ours(x, sample_posterior=sample_posterior, generator=torch.Generator().manual_seed(7)).sample
    assert difference(got, expected) <= TOLERANCE


def test_variants_without_attention_or_quant_convs_match_diffusers(tmp_path):
    config = dict(TINY, mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False)
    reference, ours = make_pair(config, tmp_path)
    assert ours.quant_conv is None and not any("attentions" in key for key in ours.state_dict())
    x = image()
    with torch.no_grad():
        assert difference(ours(x).sample, reference(x).sample) <= TOLERANCE


def test_old_diffusers_attention_names_are_renamed(tmp_path, folder):
    """VAE files written before diffusers 0.14 name the mid-block attention query/key/value/proj_attn."""
    tensors = load_file(str(folder / WEIGHTS))
    new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old_tensors = {}
    for key, tensor in tensors.items():
        for new, old in new_to_old.items():
            key = key.replace(f"mid_block.attentions.0.{new}.", f"mid_block.attentions.0.{old}.")
        old_tensors[key] = tensor
    assert "encoder.mid_block.attentions.0.query.weight" in old_tensors
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(old_tensors, str(tmp_path / WEIGHTS))
    renamed = AutoencoderKL.from_pretrained(tmp_path)
    original = AutoencoderKL.from_pretrained(folder)
    for key, tensor in original.state_dict().items():
        assert torch.equal(renamed.state_dict()[key], tensor), key


# ----- config --------------------------------------------------------------------------------------


def test_config_names_and_defaults(pair):
    _, ours = pair
    assert ours.config.scaling_factor == 0.18215
    assert list(ours.config.block_out_channels) == [32, 64]
    assert ours.config.shift_factor is None and ours.config.force_upcast is True
    assert ours.config.latent_channels == 4


def test_sd15_config_reads_without_warnings_and_builds_diffusers_shapes():
    config = json.loads(SD15_CONFIG.read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.device("meta"):
            ours = AutoencoderKL.from_config(config)
    with torch.device("meta"):
        reference = diffusers.AutoencoderKL.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in ours.state_dict().items()}
    assert shapes == {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863  # SD 1.5's VAE, 83.7M parameters
    assert "encoder.mid_block.attentions.0.to_q.weight" in shapes


def test_diagonal_gaussian_kl_is_zero_for_the_prior_and_positive_otherwise():
    prior = DiagonalGaussianDistribution(torch.zeros(2, 8, 4, 4))
    torch.testing.assert_close(prior.kl(), torch.zeros(2))
    shifted = DiagonalGaussianDistribution(torch.cat([torch.ones(2, 4, 4, 4), torch.zeros(2, 4, 4, 4)], dim=1))
    torch.testing.assert_close(shifted.kl(), torch.full((2,), 0.5 * 64))  # 1/2 * sum(mean^2) with mean = 1
    torch.testing.assert_close(shifted.kl(prior), shifted.kl())
    clamped = DiagonalGaussianDistribution(torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 100.0)], 1))
    assert clamped.logvar.max().item() == 20.0


def test_unimplemented_block_type_is_named():
    with pytest.raises(NotImplementedError, match="AttnDownEncoderBlock2D"):
        AutoencoderKL(**dict(TINY, down_block_types=("AttnDownEncoderBlock2D", "DownEncoderBlock2D")))


def test_bad_inputs_are_reported(pair):
    _, ours = pair
    with pytest.raises(ValueError, match=r"image x must have shape \(B, 3, H, W\), got \(2, 4, 32, 32\)"):
        ours.encode(torch.zeros(2, 4, 32, 32))
    with pytest.raises(ValueError, match=r"latents z must have shape \(B, 4, H, W\)"):
        ours.decode(torch.zeros(2, 3, 8, 8))


# ----- loading errors ------------------------------------------------------------------------------


def copy_with(folder: Path, target: Path, tensors: dict | None = None, config: dict | None = None) -> Path:
    target.mkdir(exist_ok=True)
    config = config if config is not None else json.loads((folder / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(config))
    save_file(tensors if tensors is not None else load_file(str(folder / WEIGHTS)), str(target / WEIGHTS))
    return target


def test_missing_key_is_named(folder, tmp_path):
    tensors = load_file(str(folder / WEIGHTS))
    del tensors["decoder.conv_out.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\):\s+decoder.conv_out.bias"):
        AutoencoderKL.from_pretrained(copy_with(folder, tmp_path / "vae", tensors))


def test_extra_key_is_named(folder, tmp_path):
    tensors = load_file(str(folder / WEIGHTS))
    tensors["decoder.extra_layer.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\):\s+decoder.extra_layer.weight"):
        AutoencoderKL.from_pretrained(copy_with(folder, tmp_path / "vae", tensors))


def test_wrong_shape_says_expected_and_found(folder, tmp_path):
    tensors = load_file(str(folder / WEIGHTS))
    tensors["quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    with pytest.raises(CheckpointError, match=r"quant_conv.weight: expected \(8, 8, 1, 1\), found \(8, 8, 3, 3\)"):
        AutoencoderKL.from_pretrained(copy_with(folder, tmp_path / "vae", tensors))


def test_truncated_safetensors_file_is_reported(folder, tmp_path):
    target = copy_with(folder, tmp_path / "vae")
    data = (target / WEIGHTS).read_bytes()
    (target / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        AutoencoderKL.from_pretrained(target)


def test_wrong_typed_config_field_is_reported(folder, tmp_path):
    config = json.loads((folder / "config.json").read_text())
    config["latent_channels"] = "4"
    with pytest.raises(ValueError, match=r"latent_channels.*must be a int.*'4' \(str\)"):
        AutoencoderKL.from_pretrained(copy_with(folder, tmp_path / "vae", config=config))


# ----- full size (slow) -----------------------------------------------------------------------------

FULL_SIZE_TOLERANCE = 1e-4  # max abs difference at SD 1.5 size (512x512, larger sums), float32


@pytest.mark.slow
def test_full_size_sd15_vae_matches_diffusers(tmp_path):
    """SD 1.5's VAE from random weights: decode 64x64 latents to 512x512, encode 512x512 to 64x64."""
    config = json.loads(SD15_CONFIG.read_text())
    torch.manual_seed(0)
    reference = diffusers.AutoencoderKL.from_config(config).eval()
    reference.save_pretrained(tmp_path)
    ours = AutoencoderKL.from_pretrained(tmp_path)
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 64, 64, generator=generator)
    x = torch.rand(1, 3, 512, 512, generator=generator) * 2 - 1
    with torch.no_grad():
        expected_image = reference.decode(z).sample
        got_image = ours.decode(z).sample
        assert got_image.shape == (1, 3, 512, 512)
        assert difference(got_image, expected_image) <= FULL_SIZE_TOLERANCE
        del expected_image, got_image
        expected = reference.encode(x).latent_dist
        got = ours.encode(x).latent_dist
    assert got.mean.shape == (1, 4, 64, 64)
    assert difference(got.mean, expected.mean) <= FULL_SIZE_TOLERANCE
    assert difference(got.std, expected.std) <= FULL_SIZE_TOLERANCE
