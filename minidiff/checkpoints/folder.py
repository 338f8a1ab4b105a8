"""The diffusers folder layout: `<component>/config.json` + `<component>/<weights>.safetensors`.

Which file(s) hold a component's weights (reader.py reads them). Understood, with the file names diffusers
and transformers write:

    diffusion_pytorch_model.safetensors                    one file
    diffusion_pytorch_model.fp16.safetensors               variant="fp16"
    diffusion_pytorch_model.safetensors.index.json         sharded: {"weight_map": {key: shard file}}
    diffusion_pytorch_model-00001-of-00002.safetensors     ... and its shards
    diffusion_pytorch_model.safetensors.index.fp16.json    sharded fp16 variant,
    diffusion_pytorch_model.fp16-00001-of-00002.safetensors  ... and its shards
    diffusion_pytorch_model.bin                            legacy pickle, read only with torch.load(weights_only=True)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from minidiff.checkpoints.errors import CheckpointError


def with_variant(name: str, variant: str | None) -> str:
    """`model.safetensors` -> `model.fp16.safetensors`: the variant goes before the last suffix (as diffusers)."""
    if not variant:
        return name
    stem, dot, extension = name.rpartition(".")
    return f"{stem}.{variant}.{extension}"


def index_name(weights_name: str, variant: str | None) -> str:
    """The shard index of `weights_name`: `model.safetensors.index.json` (variant: `...index.fp16.json`)."""
    return with_variant(f"{weights_name}.index.json", variant)


def weight_file_patterns(weights_name: str, variant: str | None) -> list[str]:
    """Glob patterns of every file one weights name may be stored as: single file, shard index, shards."""
    single = with_variant(weights_name, variant)
    stem, _, extension = single.rpartition(".")
    return [single, index_name(weights_name, variant), f"{stem}-*.{extension}"]


def weight_files_in_folder(folder: Path, weights_names: list[str], variant: str | None = None) -> list[Path]:
    """The weight file(s) of one component folder, trying each of `weights_names` in order (safetensors first).

    Returns one file, or every shard named by a `*.index.json` (in the index's order).
    """
    folder = Path(folder)
    for base_name in weights_names:
        single = folder / with_variant(base_name, variant)
        if single.is_file():
            return [single]
        index = folder / index_name(base_name, variant)
        if index.is_file():
            return _shards_of_index(index)
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    wanted = [with_variant(name, variant) for name in weights_names]
    raise FileNotFoundError(
        f"no weights in {folder}: looked for {wanted} (or their sharded .index.json), found {present}"
        + _variant_hint(present, weights_names, variant)
    )


def _variant_hint(present: list[str], weights_names: list[str], variant: str | None) -> str:
    if variant:
        return f". There are no {variant!r} variant files here: drop variant=... to load the full-precision weights"
    found = set()
    for base_name in weights_names:
        stem, _, extension = base_name.rpartition(".")
        pattern = re.compile(rf"{re.escape(stem)}\.(\w+)\.{re.escape(extension)}$")
        found |= {match.group(1) for match in map(pattern.match, present) if match}
    return f". Only variant files are here: pass variant={sorted(found)[0]!r}" if found else ""


def _shards_of_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shard_names = list(dict.fromkeys(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(
            f"{index} is not a valid shard index ({type(error).__name__}: {error}); it must be a JSON object "
            'with a "weight_map" of {tensor name: shard file name}. Download it again.'
        ) from None
    for name in shard_names:
        _check_shard_name(index, name)
    missing = [name for name in shard_names if not (index.parent / name).is_file()]
    if missing:
        raise CheckpointError(f"{index} lists shard(s) that are not in {index.parent}: {missing}; download them too")
    return [index.parent / name for name in shard_names]


def _check_shard_name(index: Path, name) -> None:
    """A shard is a plain file name next to its index: no folder part, no `..`, not absolute (as diffusers).

    An index is data from a download; `../../etc/passwd` or `../outside/shard.safetensors` in it must not
    make minidiff read outside the model folder. (A shard that is a symlink, as in the Hugging Face cache,
    is fine: the user's own folder put it there.)
    """
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or Path(name).is_absolute():
        raise CheckpointError(
            f"{index} is refused: its weight_map names the shard {name!r}, which is not a plain file name in {index.parent} "
            "(a shard name has no '/', '\\' or '..' and is not absolute). The index may be corrupt or hostile: "
            "download the model again from a source you trust."
        )
