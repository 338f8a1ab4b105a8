"""The diffusers folder layout: `<component>/config.json` + `<component>/<weights>.safetensors`.

Weights are read memory-mapped with `safetensors.safe_open`, so a tensor's bytes are touched only
when the module takes it. Also understood: `variant="fp16"` files (`model.fp16.safetensors`),
sharded checkpoints (`*.safetensors.index.json`), and legacy `.bin` files, which are read only with
`torch.load(weights_only=True)` (no arbitrary unpickling).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from minidiff.checkpoints.errors import CheckpointError


def _with_variant(name: str, variant: str | None) -> str:
    if not variant:
        return name
    stem, dot, extension = name.partition(".")
    return f"{stem}.{variant}.{extension}"


def weight_files_in_folder(folder: Path, weights_names: list[str], variant: str | None = None) -> list[Path]:
    """The weight file(s) of one component folder, trying each of `weights_names` (safetensors first)."""
    for base_name in weights_names:
        name = _with_variant(base_name, variant)
        if (folder / name).is_file():
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as error:
                raise CheckpointError(f"{index} is not a valid shard index ({error!r})") from None
            return [folder / shard for shard in dict.fromkeys(weight_map.values())]
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    wanted = [_with_variant(name, variant) for name in weights_names]
    hint = " (drop variant=... to load the full-precision files)" if variant else ""
    raise FileNotFoundError(f"no weights in {folder}: looked for {wanted}, found {present}{hint}")


def read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of `files`, memory-mapped (safetensors) or safely unpickled (.bin / .ckpt)."""
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        state_dict.update(_read_one(Path(file)))
    return state_dict


def _read_one(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"weights file {file} does not exist")
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt") as reader:
                return {key: reader.get_tensor(key) for key in reader.keys()}
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(
                f"{file} is not a readable safetensors file ({error}); it may be truncated or corrupt: "
                "download it again"
            ) from None
    return read_pickled_checkpoint(file)


def read_pickled_checkpoint(file: Path) -> dict[str, torch.Tensor]:
    """A `.bin`/`.ckpt` file, read with `torch.load(weights_only=True)` only: never arbitrary unpickling."""
    try:
        loaded = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise CheckpointError(
            f"{file} cannot be read safely: it needs unpickling of arbitrary Python objects "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). minidiff only loads "
            "pickled checkpoints with torch.load(weights_only=True). Download the `.safetensors` release of the same "
            "weights instead."
        ) from None
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{file} does not hold a dict of tensors (found {type(loaded).__name__})")
    return {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}
