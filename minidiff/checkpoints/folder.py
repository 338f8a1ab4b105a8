"""The diffusers folder layout: `<component>/config.json` + `<component>/<weights>.safetensors`.

Weights are read memory-mapped with `safetensors.safe_open`, so a tensor's bytes are touched only
when the module takes it. Also understood, with the file names diffusers and transformers write:

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
import pickle
import re
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

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
    missing = [name for name in shard_names if not (index.parent / name).is_file()]
    if missing:
        raise CheckpointError(f"{index} lists shard(s) that are not in {index.parent}: {missing}; download them too")
    return [index.parent / name for name in shard_names]


def read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of `files`, memory-mapped (safetensors) or safely unpickled (.bin / .ckpt)."""
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        tensors = _read_one(Path(file))
        repeated = sorted(set(tensors) & set(state_dict))
        if repeated:
            raise CheckpointError(f"{file} repeats tensors already read from another shard: {repeated[:10]}")
        state_dict.update(tensors)
    return state_dict


def _read_one(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"weights file {file} does not exist")
    if file.suffix == ".safetensors":
        return read_safetensors(file)
    return read_pickled_checkpoint(file)


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, as views of one memory map (no bytes are copied here).

    The safetensors library checks the header against the file: a truncated file, or a header whose
    shapes, dtypes and byte ranges disagree, is refused before any tensor is made.
    """
    try:
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            return {key: reader.get_tensor(key) for key in reader.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"{file} is not a readable safetensors file ({type(error).__name__}: {error}); "
            "it is probably truncated or corrupt: download it again"
        ) from None


def read_pickled_checkpoint(file: Path) -> dict[str, torch.Tensor]:
    """A `.bin`/`.ckpt` file, read with `torch.load(weights_only=True)` only: never arbitrary unpickling.

    A pickle that needs any Python object beyond tensors and plain containers is refused.
    """
    try:
        loaded = torch.load(str(file), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as error:
        refused = re.search(r"GLOBAL (\S+)", str(error))
        what = f" (it asks for {refused.group(1)})" if refused else ""
        raise CheckpointError(
            f"{file} cannot be read safely: it needs unpickling of arbitrary Python objects{what}, which can run "
            "any code. minidiff reads pickled checkpoints only with torch.load(weights_only=True). Use the "
            "`.safetensors` release of the same weights instead (or convert the file once, in a sandbox you "
            "trust, with safetensors.torch.save_file)."
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise CheckpointError(
            f"{file} is not a readable torch checkpoint ({type(error).__name__}: {first_line}); "
            "it is probably truncated or corrupt: download it again (prefer the .safetensors file)"
        ) from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]  # original Stable Diffusion .ckpt files wrap the weights
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{file} does not hold a dict of tensors (found {type(loaded).__name__})")
    return {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}
