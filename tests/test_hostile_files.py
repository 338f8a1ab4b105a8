"""Hostile or broken weight files (issue 22): names that point outside the model folder, headers the
safetensors specification forbids, empty files. Each error names the file and says what to do."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from minidiff.checkpoints import CheckpointError, CheckpointFile
from test_loading import WEIGHTS, TinyNet, _write_shards, assert_same_weights

INDEX = "diffusion_pytorch_model.safetensors.index.json"
SHARDS = "diffusion_pytorch_model-0000{number}-of-00002.safetensors"


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyNet(width=8, depth=2)


# ----- a shard index may only name files next to it -----


@pytest.mark.parametrize("shard_name", ["/etc/passwd", "../outside/shard.safetensors", "../../etc/passwd", "sub/shard.safetensors", ".."])
def test_shard_index_pointing_outside_the_folder_is_refused(model, tmp_path, shard_name):
    folder = tmp_path / "model"
    index = _write_shards(model, folder, WEIGHTS, SHARDS, INDEX)
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(outside / "shard.safetensors"))
    weight_map = json.loads(index.read_text())["weight_map"]
    first_key = next(iter(weight_map))
    weight_map[first_key] = shard_name
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=rf"{INDEX} is refused: its weight_map names the shard '{shard_name}'.*download the model again"):
        TinyNet.from_pretrained(folder)


def test_hugging_face_cache_layout_of_symlinks_loads(model, tmp_path):
    """snapshots/<rev>/<file> -> ../../blobs/<hash>: files whose targets lie outside the snapshot folder."""
    repo = tmp_path / "models--someone--tiny"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "abc123"
    staging = tmp_path / "staging"
    _write_shards(model, staging, WEIGHTS, SHARDS, INDEX)
    model.save_pretrained(tmp_path / "single")
    blobs.mkdir(parents=True)
    for sub, source in (("sharded", staging), ("single", tmp_path / "single")):
        (snapshot / sub).mkdir(parents=True)
        for number, file in enumerate(sorted(source.iterdir())):
            blob = blobs / f"{sub}{number:04d}"
            blob.write_bytes(file.read_bytes())
            (snapshot / sub / file.name).symlink_to(os.path.relpath(blob, snapshot / sub))
    assert all(p.is_symlink() for p in (snapshot / "sharded").iterdir())
    assert_same_weights(TinyNet.from_pretrained(snapshot / "sharded"), model)
    assert_same_weights(TinyNet.from_pretrained(snapshot, subfolder="single"), model)


# ----- safetensors headers: every rule of the format (cases after the safetensors project's own tests) -----


def _raw(file, header: str | bytes, data: bytes, length: int | None = None):
    header = header.encode() if isinstance(header, str) else header
    file.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return file


A = '"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
B_AT = '"b": {{"dtype": "F32", "shape": [2], "data_offsets": [{0}, {1}]}}'

REFUSED = {  # name: (header, data bytes, length prefix or None, what the message says)
    "overlapping-offsets": ("{" + A + ", " + B_AT.format(4, 12) + "}", 12, None, "invalid offset for tensor `b`"),
    "gap-between-tensors": ("{" + A + ", " + B_AT.format(12, 20) + "}", 20, None, "invalid offset for tensor `b`"),
    "data-not-fully-covered": ("{" + A + "}", 12, None, "not fully covered"),
    "reversed-offsets": ('{"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}', 8, None, r"data_offsets \[8, 0\] give -8"),
    "duplicate-key": ("{" + A + ", " + A.replace("[0, 8]", "[8, 16]") + "}", 16, None, r"names \['a'\] more than once"),
    "duplicate-identical-key": ("{" + A + ", " + A + "}", 8, None, r"names \['a'\] more than once"),
    "header-too-large": ("{}", 16, 200_000_000, "more than the format's limit of 100000000"),
    "header-past-end": ("{}", 0, 10_000, "header claims 10000 bytes but the file has only"),
    "header-not-json": ("{not json", 0, None, "header is not valid JSON"),
    "header-not-utf8": (b'{"\xff": 1}', 0, None, "header is not valid JSON"),
    "header-not-an-object": ("[1, 2]", 0, None, "must be a JSON object"),
    "negative-dimension": ('{"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}', 8, None, "header lies about 'a'"),
    "unknown-dtype": ('{"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}', 8, None, "malformed"),
    "metadata-not-strings": ('{"__metadata__": {"x": 1}, ' + A + "}", 8, None, "invalid type: integer"),
}


@pytest.mark.parametrize("case", list(REFUSED), ids=list(REFUSED))
def test_header_breaking_a_rule_of_the_format_is_refused(tmp_path, case):
    header, data, length, message = REFUSED[case]
    file = _raw(tmp_path / "bad.safetensors", header, bytes(data), length)
    with pytest.raises(CheckpointError, match=message) as error:
        CheckpointFile(file)
    assert str(file) in str(error.value) and "download it again" in str(error.value)


@pytest.mark.parametrize("size", [0, 5])
def test_empty_or_stub_file_names_the_file_and_what_to_do(tmp_path, size):
    file = tmp_path / "learned_embeds.safetensors"
    file.write_bytes(bytes(size))
    with pytest.raises(CheckpointError, match=rf"{file} is not a safetensors file: it has {size} bytes.*download it again"):
        CheckpointFile(file)


def test_empty_textual_inversion_file_names_the_file(tmp_path):
    from minidiff.loaders.textual_inversion import load_textual_inversion

    file = tmp_path / "learned_embeds.safetensors"
    file.write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"{file} is not a safetensors file: it has 0 bytes"):
        load_textual_inversion(None, None, file)


@pytest.mark.parametrize(
    "header, data",
    [
        ("{" + A + "}   ", 8),  # the spec allows trailing spaces to align the data (safetensors' padded-header test)
        ('{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}', 0),  # a zero-sized tensor
        ('{"__metadata__": {"format": "pt"}, ' + A + "}", 8),  # free-form string metadata
    ],
    ids=["whitespace-padded", "zero-sized-tensor", "metadata"],
)
def test_valid_headers_still_load(tmp_path, header, data):
    file = _raw(tmp_path / "ok.safetensors", header, bytes(data))
    checkpoint = CheckpointFile(file)
    assert checkpoint.keys() == ["a"]
    assert checkpoint.tensor("a").abs().sum() == 0
