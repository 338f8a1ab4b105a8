"""Reading checkpoint files: one reader for every weights file minidiff opens.

    checkpoint = CheckpointFile("unet/diffusion_pytorch_model.safetensors")
    checkpoint.keys(), checkpoint.shape(key), checkpoint.tensor(key, dtype=torch.float16)
    state_dict = read_state_dict([file, ...], dtype=torch.float32)    # every tensor of one or more files

A `.safetensors` file is memory-mapped, and its header is validated before any tensor is read: first the common
breakages with a message of our own (empty, truncated, a tensor's size that does not match its offsets, a name
given twice), then every rule of the format by the safetensors library itself (`safe_open`: header size bounded,
offsets contiguous from 0 and covering the data exactly, so no two tensors share bytes). docs/reliability.md
says why, and docs/performance.md why the tensors come from our own map (a third of the library's peak memory
when converting the dtype). A tensor already in
the target dtype and layout is a view of the map; any other is converted in one copy, after which the file's
pages of that tensor are given back, so loading needs about the size of the weights in the target dtype.
A pickled `.bin` / `.ckpt` file is read only with `torch.load(weights_only=True)`: never arbitrary unpickling.
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import re
import struct
import zipfile
from collections import Counter
from pathlib import Path

import torch

from minidiff.checkpoints.errors import CheckpointError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class CheckpointFile:
    """The tensors of one checkpoint file, by name, each read only when asked for.

    A `.safetensors` file is 8 bytes (little-endian u64 N), N bytes of JSON header
    {name: {"dtype", "shape", "data_offsets": [begin, end]}}, then the raw tensor bytes. It is mapped
    copy-on-write (a module may write to its weights; the file never changes). Any other suffix is a
    pickled checkpoint, read with `torch.load(weights_only=True)` only.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"checkpoint file {self.path} does not exist")
        self._map = None
        if self.path.suffix == ".safetensors":
            self._map, self._header, self._data_start = _map_safetensors(self.path)
        else:
            self._tensors = read_pickled_checkpoint(self.path)

    def keys(self) -> list[str]:
        return list(self._header) if self._map is not None else list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"]) if self._map is not None else tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self._header[key]["dtype"]] if self._map is not None else self._tensors[key].dtype

    def tensor(self, key: str, dtype: torch.dtype | None = None, memory_format: torch.memory_format | None = None) -> torch.Tensor:
        """The tensor `key`: a floating one cast to `dtype`, a 4-D one laid out in `memory_format` (e.g.
        torch.channels_last), both in one copy, after which the file's pages of `key` are given back (so the
        weights are not resident twice). A tensor that needs neither is a view of the file's map."""
        stored = self._stored_tensor(key)
        tensor = converted(stored, dtype, memory_format)
        if tensor.data_ptr() != stored.data_ptr():  # a copy was made
            self._release(key)
        return tensor

    def _stored_tensor(self, key: str) -> torch.Tensor:
        if self._map is None:
            return self._tensors[key]
        info = self._header[key]
        begin, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        if end == begin:
            return torch.empty(info["shape"], dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=self._data_start + begin)
        return flat.view(info["shape"])

    def _release(self, key: str) -> None:
        """Give back the pages that only `key`'s bytes occupy (they are read again from disk if ever needed)."""
        if self._map is None or not hasattr(self._map, "madvise"):
            return
        begin, end = (self._data_start + offset for offset in self._header[key]["data_offsets"])
        first_page = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE
        last_page = end // mmap.PAGESIZE * mmap.PAGESIZE
        if last_page > first_page:
            self._map.madvise(mmap.MADV_DONTNEED, first_page, last_page - first_page)


def converted(tensor: torch.Tensor, dtype: torch.dtype | None, memory_format: torch.memory_format | None) -> torch.Tensor:
    """`tensor` cast to `dtype` if it is floating, and laid out in `memory_format` if it is 4-D (a conv weight);
    `tensor` itself when neither changes anything (None means: as it is)."""
    return tensor.to(
        dtype=dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype,
        memory_format=memory_format if memory_format is not None and tensor.ndim == 4 else torch.preserve_format,
    )


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's bound (MAX_HEADER_SIZE): no header is read past it


def _map_safetensors(path: Path) -> tuple[mmap.mmap, dict, int]:
    """Maps the file and validates its header (ours for the common breakages, then the safetensors library's
    for every rule of the format): nothing is read from a file that breaks any of them."""
    size = path.stat().st_size
    redownload = "The file is truncated or corrupt: download it again."
    if size < 8:
        raise CheckpointError(
            f"{path} is not a safetensors file: it has {size} bytes, less than the 8-byte header length. "
            f"It is empty or cut short: download it again, or save it again (e.g. with safetensors.torch.save_file)."
        )
    with open(path, "rb") as file:
        (header_size,) = struct.unpack("<Q", file.read(8))  # the length prefix; the header itself is validated below
        if header_size > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path} is not a readable safetensors file: its header claims {header_size} bytes, more than the "
                f"format's limit of {MAX_HEADER_BYTES}. It is not a safetensors file, or it is corrupt. {redownload}"
            )
        if 8 + header_size > size:
            raise CheckpointError(
                f"{path} is not a readable safetensors file: the header claims {header_size} bytes but the file has only {size} bytes. "
                f"It is not a safetensors file, or it is cut short. {redownload}"
            )
        try:
            header = json.loads(file.read(header_size), object_pairs_hook=_refuse_repeated_names(path, redownload))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path} is not a readable safetensors file: its header is not valid JSON ({error}). {redownload}") from None
        file_map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a readable safetensors file: its header must be a JSON object, found {type(header).__name__}. {redownload}")
    header.pop("__metadata__", None)
    data_size = size - 8 - header_size
    for key, info in header.items():
        _check_header_entry(path, key, info, data_size, redownload)
    _validate_with_safetensors(path, set(header), redownload)
    return file_map, header, 8 + header_size


def _refuse_repeated_names(path: Path, redownload: str):
    """A json.loads hook: a header naming one tensor twice is refused (json would keep the last silently)."""

    def as_dict(pairs: list) -> dict:
        repeated = sorted(name for name, count in Counter(name for name, _ in pairs).items() if count > 1)
        if repeated:
            raise CheckpointError(f"{path} is not a readable safetensors file: its header names {repeated} more than once. {redownload}")
        return dict(pairs)

    return as_dict


def _validate_with_safetensors(path: Path, names: set, redownload: str) -> None:
    """Every rule of the format, checked by the safetensors library (the reference implementation of the spec):
    header size, JSON, dtypes, shapes against offsets, offsets contiguous from 0 (no overlap, no gap) and the
    data covered exactly. Its error is reported with the file's name and what to do."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            library_names = set(handle.keys())
    except SafetensorError as error:
        raise CheckpointError(f"{path} is not a valid safetensors file: the safetensors library refuses it ({error}). {redownload}") from None
    if library_names != names:  # the two readings of one header must agree before our offsets are trusted
        raise CheckpointError(f"{path} is not a valid safetensors file: its header reads differently to the safetensors library. {redownload}")


def _check_header_entry(path: Path, key: str, info, data_size: int, redownload: str) -> None:
    try:
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        shape = [int(n) for n in info["shape"]]
        begin, end = (int(n) for n in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(
            f"{path} is not a readable safetensors file: the header entry of {key!r} is malformed ({info!r}); expected dtype (one of "
            f"{', '.join(SAFETENSORS_DTYPES)}), shape and data_offsets. {redownload}"
        ) from None
    needed = dtype.itemsize * torch.Size(shape).numel()
    if min(shape, default=0) < 0 or begin < 0 or end - begin != needed:
        raise CheckpointError(
            f"{path} is not a readable safetensors file: the header lies about {key!r}: {info['dtype']} {tuple(shape)} takes {needed} bytes, "
            f"but its data_offsets [{begin}, {end}] give {end - begin}. {redownload}"
        )
    if end > data_size:
        raise CheckpointError(
            f"{path} is not a readable safetensors file: it is truncated: {key!r} ends at byte {end} of the tensor data, but the file holds only "
            f"{data_size} bytes of it. {redownload}"
        )


def read_state_dict(
    files: list[Path], dtype: torch.dtype | None = None, memory_format: torch.memory_format | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of `files` (one file, or the shards of one), converted as `CheckpointFile.tensor` converts.

    `dtype` (floating tensors) and `memory_format` (4-D tensors) default to: as stored.
    """
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        checkpoint = CheckpointFile(file)
        repeated = sorted(set(checkpoint.keys()) & set(state_dict))
        if repeated:
            raise CheckpointError(f"{file} repeats tensors already read from another shard: {repeated[:10]}")
        state_dict.update((key, checkpoint.tensor(key, dtype, memory_format)) for key in checkpoint.keys())
    return state_dict


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
