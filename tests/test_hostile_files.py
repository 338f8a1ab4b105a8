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
