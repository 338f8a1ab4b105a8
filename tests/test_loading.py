"""ModelMixin.from_pretrained: the file layouts it reads, and the clear errors for everything it refuses.

A tiny ModelMixin defined here keeps these tests fast; UNet2DModel is loaded from diffusers-written
folders (sharded, fp16 variant) in tests/test_unet_2d.py.
"""

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from minidiff.checkpoints import CheckpointError
from minidiff.configuration import register_to_config
from minidiff.models.modeling import ModelMixin


class TinyNet(ModelMixin):
    """Linear layers and a group norm: enough keys and shapes to break in every way."""

    built_on_devices: list = []

    @register_to_config
    def __init__(self, in_features: int = 3, width: int = 8, depth: int = 2):
        super().__init__()
        self.proj_in = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.norm = nn.GroupNorm(2, width)
        TinyNet.built_on_devices.append(self.proj_in.weight.device.type)

    def forward(self, x):
        x = self.proj_in(x)
        for block in self.blocks:
            x = x + block(x)
        return self.norm(x)


WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyNet(width=8, depth=2)


def assert_same_weights(loaded: nn.Module, reference: nn.Module, dtype=torch.float32):
    expected = reference.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].dtype == dtype, key
        torch.testing.assert_close(got[key], expected[key].to(dtype), rtol=0, atol=0)


def _mapped_ranges(file) -> list[tuple[int, int]]:
    """Address ranges where this process has `file` memory-mapped (Linux /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(file.resolve())):
            start, end = line.split()[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


# ----- the layouts that load -----


def test_round_trip_is_exact_built_on_meta_and_memory_mapped(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", WEIGHTS]
    TinyNet.built_on_devices.clear()
    loaded = TinyNet.from_pretrained(tmp_path)
    assert TinyNet.built_on_devices == ["meta"]  # no memory was allocated for weights before loading
    assert_same_weights(loaded, model)
    assert not loaded.training
    assert loaded.config.width == 8 and loaded.config.depth == 2
    # Lazy: fp32 tensors (no cast needed) point into the file's memory map; no copy was made.
    if Path("/proc/self/maps").exists():
        mapped = _mapped_ranges(tmp_path / WEIGHTS)
        assert mapped, "the weights file is not memory-mapped"
        for name, parameter in loaded.named_parameters():
            assert any(start <= parameter.data_ptr() < end for start, end in mapped), name
    x = torch.randn(5, 3)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


class WithEmbedding(ModelMixin):
    @register_to_config
    def __init__(self, vocab: int = 10, width: int = 4):
        super().__init__()
        if width <= 0:
            raise ValueError("width must be positive")
        self.embedding = nn.Embedding(vocab, width)
        self.norm = nn.LayerNorm(width)


def test_built_without_random_init_and_torch_init_restored(tmp_path, monkeypatch):
    torch.manual_seed(0)
    WithEmbedding().save_pretrained(tmp_path)
    called = []
    original_normal = torch.nn.init.normal_
    monkeypatch.setattr(torch.nn.init, "normal_", lambda tensor, *a, **k: called.append(1) or original_normal(tensor))
    patched = torch.nn.init.normal_
    loaded = WithEmbedding.from_pretrained(tmp_path)
    assert called == []  # nn.Embedding's init was skipped on the meta device
    assert torch.nn.init.normal_ is patched  # and torch.nn.init is as it was
    assert not loaded.embedding.weight.is_meta
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "width": 0}))
    with pytest.raises(ValueError, match="width must be positive"):
        WithEmbedding.from_pretrained(tmp_path)
    assert torch.nn.init.normal_ is patched  # restored after an error too
    WithEmbedding()
    assert called  # outside loading, layers initialise as usual


def test_subfolder_and_torch_dtype(model, tmp_path):
    model.save_pretrained(tmp_path / "unet")
    loaded = TinyNet.from_pretrained(tmp_path, subfolder="unet", torch_dtype=torch.bfloat16)
    assert_same_weights(loaded, model, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16


def test_fp16_variant_loads_as_fp16_or_upcast_like_diffusers(model, tmp_path):
    model.half().save_pretrained(tmp_path, variant="fp16")
    model.float()
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    as_fp16 = TinyNet.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16)
    assert_same_weights(as_fp16, model.half(), dtype=torch.float16)
    # Without torch_dtype diffusers gives the default dtype (float32) whatever the file holds; so do we.
    as_default = TinyNet.from_pretrained(tmp_path, variant="fp16")
    assert as_default.dtype == torch.float32
    torch.testing.assert_close(as_default.proj_in.weight, model.proj_in.weight.float(), rtol=0, atol=0)


def test_missing_variant_says_so(model, tmp_path):
    model.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.fp16\.safetensors.*drop variant"):
        TinyNet.from_pretrained(tmp_path, variant="fp16")


def test_only_variant_files_suggests_the_variant(model, tmp_path):
    model.save_pretrained(tmp_path, variant="fp16")
    with pytest.raises(FileNotFoundError, match=r"pass variant='fp16'"):
        TinyNet.from_pretrained(tmp_path)


def _write_shards(model: nn.Module, folder, weights_name: str, shard_pattern: str, index_name: str):
    """Two shards and an index in diffusers' naming; returns the index path."""
    state_dict = model.state_dict()
    keys = list(state_dict)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    for number, shard_keys in enumerate(halves, start=1):
        name = shard_pattern.format(number=number)
        save_file({key: state_dict[key].contiguous() for key in shard_keys}, str(folder / name))
        weight_map.update({key: name for key in shard_keys})
    index = folder / index_name
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def test_sharded_index_loads(model, tmp_path):
    _write_shards(
        model, tmp_path, WEIGHTS,
        "diffusion_pytorch_model-0000{number}-of-00002.safetensors", "diffusion_pytorch_model.safetensors.index.json",
    )
    assert_same_weights(TinyNet.from_pretrained(tmp_path), model)


def test_sharded_fp16_variant_loads_with_diffusers_names(model, tmp_path):
    _write_shards(
        model.half(), tmp_path, WEIGHTS,
        "diffusion_pytorch_model.fp16-0000{number}-of-00002.safetensors",
        "diffusion_pytorch_model.safetensors.index.fp16.json",
    )
    loaded = TinyNet.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16)
    assert_same_weights(loaded, model.half(), dtype=torch.float16)


def test_index_naming_a_missing_shard_is_refused(model, tmp_path):
    _write_shards(
        model, tmp_path, WEIGHTS,
        "diffusion_pytorch_model-0000{number}-of-00002.safetensors", "diffusion_pytorch_model.safetensors.index.json",
    )
    (tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"lists shard\(s\) that are not in .*00002-of-00002"):
        TinyNet.from_pretrained(tmp_path)


def test_bin_with_only_tensors_loads(model, tmp_path):
    model.save_config(tmp_path)
    torch.save(model.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    assert_same_weights(TinyNet.from_pretrained(tmp_path), model)


class NotATensor:
    """Anything torch.load(weights_only=True) must refuse to rebuild."""

    def __init__(self):
        self.payload = "arbitrary object"


def test_bin_needing_arbitrary_unpickling_is_refused(model, tmp_path):
    model.save_config(tmp_path)
    torch.save({**model.state_dict(), "extra": NotATensor()}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"arbitrary Python objects.*NotATensor.*\.safetensors") as error:
        TinyNet.from_pretrained(tmp_path)
    assert "weights_only=False" not in str(error.value)  # never advise the unsafe way out


def test_truncated_bin_says_so(model, tmp_path):
    model.save_config(tmp_path)
    torch.save(model.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    data = (tmp_path / "diffusion_pytorch_model.bin").read_bytes()
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        TinyNet.from_pretrained(tmp_path)


# ----- broken safetensors files -----


def test_truncated_safetensors_says_so(model, tmp_path):
    model.save_pretrained(tmp_path)
    file = tmp_path / WEIGHTS
    data = file.read_bytes()
    file.write_bytes(data[:-40])
    with pytest.raises(CheckpointError, match=r"not a readable safetensors file.*truncated or corrupt"):
        TinyNet.from_pretrained(tmp_path)


def _raw_safetensors(file, header: dict, data: bytes):
    """A safetensors file byte by byte: 8-byte little-endian header length, JSON header, tensor bytes."""
    header_bytes = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)


@pytest.mark.parametrize(
    "header, data_bytes",
    [
        # the shape says 16 float32s (64 bytes), the offsets give 32
        ({"proj_in.weight": {"dtype": "F32", "shape": [8, 3], "data_offsets": [0, 32]}}, 32),
        # offsets run past the end of the file
        ({"proj_in.weight": {"dtype": "F32", "shape": [8, 3], "data_offsets": [0, 96]}}, 48),
        # the header length prefix is larger than the file
        (None, 0),
    ],
    ids=["shape-vs-offsets", "offsets-past-end", "header-length-past-end"],
)
def test_header_that_lies_is_refused(model, tmp_path, header, data_bytes):
    model.save_config(tmp_path)
    file = tmp_path / WEIGHTS
    if header is None:
        file.write_bytes(struct.pack("<Q", 10_000) + b'{"a": 1}')
    else:
        _raw_safetensors(file, header, bytes(data_bytes))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        TinyNet.from_pretrained(tmp_path)


# ----- weights that do not fit the config -----


def test_missing_unexpected_and_misshaped_keys_in_one_error(model, tmp_path):
    model.save_config(tmp_path)
    state_dict = dict(model.state_dict())
    del state_dict["blocks.1.bias"]
    state_dict["blocks.2.weight"] = torch.zeros(8, 8)
    state_dict["norm.weight"] = torch.ones(4)
    save_file(state_dict, str(tmp_path / WEIGHTS))
    with pytest.raises(CheckpointError) as error:
        TinyNet.from_pretrained(tmp_path)
    message = str(error.value)
    assert "missing keys (1)" in message and "blocks.1.bias" in message
    assert "unexpected keys (1)" in message and "blocks.2.weight" in message
    assert "wrong shape (1)" in message and "norm.weight: expected (8,), found (4,)" in message


def test_config_of_other_size_names_every_misfit(model, tmp_path):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "depth": 3, "width": 4}))
    with pytest.raises(CheckpointError, match=r"missing keys \(2\)[\s\S]*blocks\.2\.weight[\s\S]*wrong shape \(8\)"):
        TinyNet.from_pretrained(tmp_path)


def test_wrong_typed_config_field_is_named(model, tmp_path):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "width": "8"}))
    with pytest.raises(ValueError, match=r"'width' must be a int.*'8'"):
        TinyNet.from_pretrained(tmp_path)


def test_config_of_another_class_is_refused(model, tmp_path):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match=r"describes a AutoencoderKL, not a TinyNet"):
        TinyNet.from_pretrained(tmp_path)


def test_bad_torch_dtype_is_refused(model, tmp_path):
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="torch_dtype must be a floating torch.dtype"):
        TinyNet.from_pretrained(tmp_path, torch_dtype="float16")
    with pytest.raises(ValueError, match="torch_dtype must be a floating torch.dtype"):
        TinyNet.from_pretrained(tmp_path, torch_dtype=torch.int8)


def test_missing_subfolder_and_bad_path(model, tmp_path):
    model.save_pretrained(tmp_path / "unet")
    with pytest.raises(FileNotFoundError, match=r"no subfolder 'vae'"):
        TinyNet.from_pretrained(tmp_path, subfolder="vae")
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a hub repo id"):
        TinyNet.from_pretrained(tmp_path / "does-not-exist")


def test_empty_folder_lists_what_was_looked_for(tmp_path):
    TinyNet().save_config(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no weights in .*diffusion_pytorch_model\.safetensors.*config\.json"):
        TinyNet.from_pretrained(tmp_path)


# ----- the hub, offline -----


def test_hub_id_offline_says_weights_are_not_here(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from minidiff.hub import HubUnavailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)  # so "google/ddpm-cat-256" cannot be a local folder
    with pytest.raises(HubUnavailableError, match=r"weights are not on this machine.*weights_scripts/"):
        TinyNet.from_pretrained("google/ddpm-cat-256")


# ----- weights_scripts/make_random_sd15.py: a random SD 1.5 folder that every loader reads -----


def _make_random_sd15():
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "weights_scripts" / "make_random_sd15.py"
    spec = importlib.util.spec_from_file_location("make_random_sd15", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SD15_LAYOUT = [
    "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]


@pytest.fixture(scope="module")
def tiny_sd15(tmp_path_factory):
    return _make_random_sd15().make_random_sd15(tmp_path_factory.mktemp("tiny-sd15"), seed=0, tiny=True)


def test_random_sd15_has_the_layout_and_loads_in_minidiff(tiny_sd15):
    from minidiff import AutoencoderKL, CLIPTokenizer, PNDMScheduler, UNet2DConditionModel
    from minidiff.models.clip_text import CLIPTextModel

    assert sorted(p.relative_to(tiny_sd15).as_posix() for p in tiny_sd15.rglob("*") if p.is_file()) == SD15_LAYOUT
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(tiny_sd15, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd15, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd15, subfolder="tokenizer")
    scheduler = PNDMScheduler.from_pretrained(tiny_sd15, subfolder="scheduler")
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size == 32
    assert vae.config.scaling_factor == 0.18215
    assert scheduler.config.skip_prk_steps and scheduler.config.steps_offset == 1
    # the real SD 1.5 scheduler file: no timestep_spacing, so each scheduler class applies its own default
    assert "timestep_spacing" not in json.loads((tiny_sd15 / "scheduler/scheduler_config.json").read_text())
    ids = tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        context = text_encoder(ids)[0]  # (1, 77, 32)
        eps = unet(torch.randn(1, 4, 8, 8), 981, encoder_hidden_states=context).sample
        image = vae.decode(eps).sample
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_random_sd15_is_seeded_and_leaves_global_rng_alone(tiny_sd15, tmp_path):
    make = _make_random_sd15()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    again = make.make_random_sd15(tmp_path / "again", seed=0, tiny=True)
    assert torch.equal(torch.rand(1), expected_next)
    for name in ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"]:
        assert (again / name).read_bytes() == (tiny_sd15 / name).read_bytes(), name
    other_seed = make.random_model("vae", seed=7, tiny=True)
    same_seed = make.random_model("vae", seed=1, tiny=True)  # the VAE is model 1: seed 0 + 1
    from safetensors.torch import load_file

    stored = load_file(str(tiny_sd15 / "vae/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(stored[key], value) for key, value in same_seed.state_dict().items())
    assert not torch.equal(stored["decoder.conv_in.weight"], other_seed.state_dict()["decoder.conv_in.weight"])


def test_random_sd15_fp16_variant(tmp_path):
    from minidiff import UNet2DConditionModel

    folder = _make_random_sd15().make_random_sd15(tmp_path, seed=0, tiny=True, variant="fp16")
    assert (folder / "unet/diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (folder / "text_encoder/model.fp16.safetensors").is_file()
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", variant="fp16", torch_dtype=torch.float16)
    assert unet.dtype == torch.float16
    with pytest.raises(FileNotFoundError, match="pass variant='fp16'"):
        UNet2DConditionModel.from_pretrained(folder, subfolder="unet")


@pytest.mark.filterwarnings("ignore:The configuration file of the unet has set the default `sample_size`")
def test_random_sd15_loads_in_diffusers_and_transformers(tiny_sd15):
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from minidiff import UNet2DConditionModel
    from minidiff.models.clip_text import CLIPTextModel

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None)
    assert isinstance(pipe.scheduler, diffusers.PNDMScheduler)
    ids = pipe.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    ours_text = CLIPTextModel.from_pretrained(tiny_sd15, subfolder="text_encoder")
    theirs_text = transformers.CLIPTextModel.from_pretrained(tiny_sd15, subfolder="text_encoder")
    ours_unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        context = theirs_text(ids)[0]
        # same weights read by both libraries: same numbers (fp32, max abs <= 1e-5)
        assert (ours_text(ids)[0] - context).abs().max() <= 1e-5
        context = context.expand(2, -1, -1)
        eps_theirs = pipe.unet(latents, 981, encoder_hidden_states=context).sample
        eps_ours = ours_unet(latents, 981, encoder_hidden_states=context).sample
    assert (eps_ours - eps_theirs).abs().max() <= 1e-5


@pytest.mark.slow
def test_full_size_random_sd15_has_sd15_parameter_counts(tmp_path):
    from minidiff import UNet2DConditionModel

    folder = _make_random_sd15().make_random_sd15(tmp_path, seed=0)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    assert sum(parameter.numel() for parameter in unet.parameters()) == 859_520_964
