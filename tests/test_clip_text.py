"""minidiff.CLIPTextModel: parity with transformers' CLIPTextModel, checkpoint layouts, dtype, strict loading.

Parity tolerance: max |difference| <= 1e-5 on tiny float32 models (same weights, same ids; the
two implementations do the same float32 operations, so the measured difference is ~0), and
<= 1e-4 at full SD 1.5 size (slow test).
"""

from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

import minidiff

from minidiff.checkpoints.errors import CheckpointError
from minidiff.models.clip_text import CLIPTextModel
from minidiff.tokenizer import CLIPTokenizer

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-5  # tiny float32 models
FULL_SIZE_TOLERANCE = 1e-4  # SD 1.5 size, 12 layers of width 768

# SD 1.5's text_encoder/config.json, as it is on the hub (transformers 4.22 wrote it).
SD15_TEXT_ENCODER_CONFIG = {
    "_name_or_path": "openai/clip-vit-large-patch14",
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0",
    "vocab_size": 49408,
}


def tiny_config(**changes) -> dict:
    """A 2-layer CLIP text encoder with CLIP's real vocabulary size (so real tokenizer ids fit)."""
    config = dict(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=32,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )
    config.update(changes)
    return config


def transformers_model(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)).eval()


def saved_transformers_model(tmp_path, **changes):
    """A random transformers CLIPTextModel written with its own save_pretrained (transformers 5 layout)."""
    oracle = transformers_model(tiny_config(**changes))
    oracle.save_pretrained(str(tmp_path))
    return oracle


@functools.lru_cache(maxsize=None)
def clip_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer()


def prompt_ids(length: int = 16) -> torch.Tensor:
    """(4, length) ids as the tokenizer makes them: <|startoftext|> ... <|endoftext|> padded with <|endoftext|>."""
    tokenizer = clip_tokenizer()
    prompts = ["a photograph of an astronaut riding a horse", "", "a cat", "a " * 20]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the last prompt is truncated to `length`
        return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ----- parity with transformers ----------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {},  # eos_token_id 49407: pooled at the first <|endoftext|>
        {"eos_token_id": 2, "bos_token_id": 0},  # SD 1.5's config: pooled at the argmax of the ids
        {"hidden_act": "gelu", "num_hidden_layers": 3},
    ],
    ids=["eos-49407", "eos-2", "gelu"],
)
def test_parity_with_transformers(tmp_path, changes):
    oracle = saved_transformers_model(tmp_path, **changes)
    model = minidiff.CLIPTextModel.from_pretrained(tmp_path)
    ids = torch.cat([prompt_ids(), torch.randint(0, 49408, (2, 16))])  # tokenized prompts and random ids
    with torch.no_grad():
        ours, theirs = model(ids), oracle(ids)
    assert ours.last_hidden_state.shape == (6, 16, 32) and ours.pooler_output.shape == (6, 32)
    assert max_difference(ours.last_hidden_state, theirs.last_hidden_state) <= TOLERANCE
    assert max_difference(ours.pooler_output, theirs.pooler_output) <= TOLERANCE
    assert torch.equal(ours[0], ours.last_hidden_state) and torch.equal(ours[1], ours.pooler_output)


def test_pooled_output_is_the_end_token_under_both_rules(tmp_path):
    """On tokenizer output, SD 1.5's argmax rule (eos_token_id 2) and the first-<|endoftext|> rule agree."""
    model = CLIPTextModel.from_config(tiny_config())
    sd15_rule = CLIPTextModel.from_config(tiny_config(eos_token_id=2))
    sd15_rule.load_state_dict(model.state_dict())
    ids = prompt_ids()
    with torch.no_grad():
        output = model(ids)
        assert torch.equal(output.pooler_output, sd15_rule(ids).pooler_output)
    end_positions = [row.tolist().index(49407) for row in ids]
    assert end_positions == [9, 1, 3, 15]
    for row, position in enumerate(end_positions):
        assert torch.equal(output.pooler_output[row], output.last_hidden_state[row, position])


def test_attention_mask_and_hidden_states_match_transformers(tmp_path):
    oracle = saved_transformers_model(tmp_path)
    model = CLIPTextModel.from_pretrained(tmp_path)
    ids = prompt_ids()
    right_padding = (torch.arange(16)[None] <= torch.tensor([9, 1, 3, 15])[:, None]).long()
    left_padding = right_padding.flip(-1)  # rows whose first queries see no key at all
    for mask in (right_padding, left_padding):
        with torch.no_grad():
            ours = model(ids, attention_mask=mask, output_hidden_states=True)
            theirs = oracle(ids, attention_mask=mask, output_hidden_states=True)
        assert not ours.last_hidden_state.isnan().any()
        assert max_difference(ours.last_hidden_state, theirs.last_hidden_state) <= TOLERANCE
        assert max_difference(ours.pooler_output, theirs.pooler_output) <= TOLERANCE
        assert len(ours.hidden_states) == len(theirs.hidden_states) == 3  # embeddings + 2 layers
        for mine, reference in zip(ours.hidden_states, theirs.hidden_states):
            assert max_difference(mine, reference) <= TOLERANCE
    with torch.no_grad():
        masked, unmasked = model(ids, attention_mask=right_padding), model(ids)
    assert max_difference(masked.last_hidden_state[0, :10], unmasked.last_hidden_state[0, :10]) <= TOLERANCE  # causal: padding after a token never reaches it


def test_return_dict_false_and_causality():
    model = CLIPTextModel.from_config(tiny_config())
    ids = prompt_ids()
    with torch.no_grad():
        last_hidden_state, pooler_output = model(ids, return_dict=False)
        changed = ids.clone()
        changed[:, 8] = 320  # change token 8: positions 0..7 must not move
        moved = model(changed).last_hidden_state
    assert last_hidden_state.shape == (4, 16, 32) and pooler_output.shape == (4, 32)
    assert max_difference(moved[:, :8], last_hidden_state[:, :8]) == 0.0
    assert max_difference(moved[:, 8:], last_hidden_state[:, 8:]) > 1e-3


# ----- parameter names and checkpoint layouts --------------------------------------------------


def expected_keys(num_layers: int) -> set[str]:
    """SD 1.5's text_encoder/model.safetensors names (without position_ids), for `num_layers` layers."""
    keys = {
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "text_model.final_layer_norm.weight",
        "text_model.final_layer_norm.bias",
    }
    for i in range(num_layers):
        layer = f"text_model.encoder.layers.{i}"
        for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                       "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"{layer}.{module}.weight", f"{layer}.{module}.bias"}
    return keys


def test_parameter_names_are_sd15_and_there_are_no_buffers():
    model = CLIPTextModel.from_config(tiny_config())
    assert set(model.state_dict()) == expected_keys(2)
    assert list(model.buffers()) == []


def test_sd15_config_reads_quietly_and_sizes_match_transformers():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # model_type, architectures, ... are known bookkeeping keys
        with torch.device("meta"):
            model = CLIPTextModel.from_config(SD15_TEXT_ENCODER_CONFIG)
    with torch.device("meta"):
        oracle = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG))
    assert set(model.state_dict()) == expected_keys(12)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert shapes == {f"text_model.{key}": tuple(value.shape) for key, value in oracle.state_dict().items()}
    assert sum(p.numel() for p in model.parameters()) == 123_060_480  # CLIP ViT-L/14's text tower
    assert model.config.model_type == "clip_text_model"  # kept (and written back by save_config), not used


def test_unknown_config_key_is_reported():
    with pytest.warns(UserWarning, match="not_a_clip_field"):
        model = CLIPTextModel.from_config({**tiny_config(), "not_a_clip_field": 1})
    assert model.config.not_a_clip_field == 1  # kept in the config, not used


def write_folder(folder, config: dict, state_dict: dict, name: str = "model.safetensors"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {key: value.contiguous() for key, value in state_dict.items()}
    if name.endswith(".safetensors"):
        save_file(tensors, str(folder / name))
    else:
        torch.save(tensors, str(folder / name))
    return folder


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_text_model_prefixed_layout_with_position_ids_loads(tmp_path, name):
    """SD 1.5's own layout: `text_model.` keys, plus the `position_ids` buffer older transformers saved."""
    oracle = transformers_model(tiny_config())
    state_dict = {f"text_model.{key}": value for key, value in oracle.state_dict().items()}
    state_dict["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    write_folder(tmp_path / "sd" / "text_encoder", {**SD15_TEXT_ENCODER_CONFIG, **tiny_config()}, state_dict, name)
    model = CLIPTextModel.from_pretrained(tmp_path / "sd", subfolder="text_encoder")
    assert "text_model.embeddings.position_ids" not in model.state_dict()
    ids = prompt_ids()
    with torch.no_grad():
        assert max_difference(model(ids).last_hidden_state, oracle(ids).last_hidden_state) <= TOLERANCE
    # and minidiff writes that same layout back
    model.save_pretrained(tmp_path / "copy")
    reloaded = CLIPTextModel.from_pretrained(tmp_path / "copy")
    assert all(torch.equal(reloaded.state_dict()[key], value) for key, value in model.state_dict().items())


def test_minidiff_save_loads_in_transformers(tmp_path):
    torch.manual_seed(1)
    model = CLIPTextModel.from_config(tiny_config(hidden_act="gelu"))
    model.save_pretrained(tmp_path)
    oracle = transformers.CLIPTextModel.from_pretrained(str(tmp_path)).eval()
    ids = prompt_ids()
    with torch.no_grad():
        assert max_difference(model(ids).pooler_output, oracle(ids).pooler_output) <= TOLERANCE


def test_torch_dtype_bfloat16_casts(tmp_path):
    oracle = saved_transformers_model(tmp_path)
    model = CLIPTextModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = prompt_ids()
    with torch.no_grad():
        output = model(ids)
        reference = oracle(ids)
    assert output.last_hidden_state.dtype == torch.bfloat16
    # bfloat16 keeps 8 bits of mantissa: outputs of LayerNorm (|x| ~ 1-3) agree to a few hundredths
    assert max_difference(output.last_hidden_state, reference.last_hidden_state) <= 0.1


# ----- strict loading errors -------------------------------------------------------------------


def folder_with(tmp_path, edit):
    """A transformers-5-layout folder whose state dict `edit` has changed."""
    oracle = transformers_model(tiny_config())
    state_dict = dict(oracle.state_dict())
    edit(state_dict)
    return write_folder(tmp_path, tiny_config(), state_dict)


def test_missing_key_is_named(tmp_path):
    folder = folder_with(tmp_path, lambda sd: sd.pop("encoder.layers.1.mlp.fc2.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\):\n\s+text_model.encoder.layers.1.mlp.fc2.bias"):
        CLIPTextModel.from_pretrained(folder)


def test_extra_key_is_named(tmp_path):
    folder = folder_with(tmp_path, lambda sd: sd.update({"text_projection.weight": torch.zeros(32, 32)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\):\n\s+text_model.text_projection.weight"):
        CLIPTextModel.from_pretrained(folder)


def test_wrong_shape_is_named(tmp_path):
    folder = folder_with(tmp_path, lambda sd: sd.update({"final_layer_norm.weight": torch.ones(31)}))
    with pytest.raises(CheckpointError, match=r"text_model.final_layer_norm.weight: expected \(32,\), found \(31,\)"):
        CLIPTextModel.from_pretrained(folder)


def test_unknown_layout_names_the_expected_forms(tmp_path):
    oracle = transformers_model(tiny_config())
    state_dict = {f"cond_stage_model.transformer.text_model.{key}": value for key, value in oracle.state_dict().items()}
    folder = write_folder(tmp_path, tiny_config(), state_dict)
    with pytest.raises(CheckpointError, match=r"'text_model.embeddings.token_embedding.weight'.*'embeddings.token_embedding.weight'.*from_single_file"):
        CLIPTextModel.from_pretrained(folder)


def test_mixed_layouts_are_reported_not_guessed(tmp_path):
    oracle = transformers_model(tiny_config())
    state_dict = dict(oracle.state_dict())
    state_dict["text_model.final_layer_norm.bias"] = state_dict.pop("final_layer_norm.bias")
    with pytest.raises(CheckpointError, match="unexpected keys"):
        CLIPTextModel.from_state_dict(tiny_config(), state_dict)


# ----- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ids, mask, message",
    [
        (torch.tensor([49406, 320, 49407]), None, "batch, length"),
        (torch.zeros(1, 4), None, "integer token ids"),
        (torch.zeros(1, 17, dtype=torch.long), None, "at most 16 tokens"),
        (torch.tensor([[49406, 49408]]), None, r"\[0, 49408\)"),
        (torch.tensor([[49406, -1]]), None, r"\[0, 49408\)"),
        (torch.tensor([[49406, 49407]]), torch.ones(1, 3), "shape of input_ids"),
    ],
)
def test_bad_input_ids_are_clear_value_errors(ids, mask, message):
    model = CLIPTextModel.from_config(tiny_config())
    with pytest.raises(ValueError, match=message):
        model(ids, attention_mask=mask)


def test_bad_config_is_a_clear_value_error():
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        CLIPTextModel.from_config(tiny_config(hidden_act="relu"))
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        CLIPTextModel.from_config(tiny_config(hidden_size=30))


# ----- full size -------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_size_sd15_text_encoder_parity():
    """SD 1.5's text encoder at full size (123M random parameters), 77 tokens, 2 prompts."""
    oracle = transformers_model(SD15_TEXT_ENCODER_CONFIG)
    model = CLIPTextModel.from_state_dict(SD15_TEXT_ENCODER_CONFIG, dict(oracle.state_dict()))
    tokenizer = clip_tokenizer()
    ids = tokenizer(
        ["a photograph of an astronaut riding a horse", ""], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        ours, theirs = model(ids), oracle(ids)
    assert ours.last_hidden_state.shape == (2, 77, 768)
    assert max_difference(ours.last_hidden_state, theirs.last_hidden_state) <= FULL_SIZE_TOLERANCE
    assert max_difference(ours.pooler_output, theirs.pooler_output) <= FULL_SIZE_TOLERANCE
