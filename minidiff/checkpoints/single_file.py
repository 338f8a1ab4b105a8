"""The original one-file Stable Diffusion checkpoint: read it, recognise it, load SD 1.x from it, write it.

    parts = load_single_file("v1-5-pruned-emaonly.safetensors", torch_dtype=torch.float16)
    parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, parts.scheduler
    unet = UNet2DConditionModel.from_single_file("v1-5-pruned-emaonly.safetensors")
    convert("v1-5-pruned-emaonly.safetensors", "stable-diffusion-v1-5/")     # and back: convert(folder, file)

Everything works offline: the file holds only weights, so the architecture configs, the default
scheduler config (PNDM, scaled_linear 0.00085-0.012, skip_prk_steps, steps_offset 1) and the CLIP
vocabulary come with minidiff (`minidiff/data/sd15/`). Pass `config=` a diffusers-layout folder for
another architecture.

What the file holds (keys of `v1-5-pruned.safetensors`):

    model.diffusion_model.*        UNet             renamed by the key map (key_map.py)
    first_stage_model.*            VAE              renamed by the key map
    cond_stage_model.transformer.* CLIP text model  renamed by the key map
    ...text_model.embeddings.position_ids           arange(77): CLIPTextModel computes it; checked, not loaded
    model_ema.*                    EMA copy of the UNet (dots dropped from the names); used with use_ema=True
    model_ema.decay, model_ema.num_updates          EMA bookkeeping; not loaded
    betas, alphas_cumprod, ...     LDM's noise-schedule buffers; alphas_cumprod is checked against the scheduler

Every key is accounted for: loaded, checked, or reported in `SingleFileComponents.accounted`; a key the
map does not know is an error. Memory: a `.safetensors` file is memory-mapped; a tensor already in the
target dtype is used in place (a view of the map), any other is cast once and the pages it came from
are given back (madvise), so loading needs about the size of the weights in the target dtype.
`.ckpt` files are read only with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import shutil
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from minidiff.checkpoints.errors import CheckpointError, _listing
from minidiff.checkpoints.folder import read_pickled_checkpoint, read_state_dict, weight_files_in_folder
from minidiff.checkpoints.key_map import (
    EMA_PREFIX,
    TEXT_ENCODER_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    KeyMap,
    ema_key,
    text_encoder_key_map,
    unet_key_map,
    vae_key_map,
)

logger = logging.getLogger(__name__)

SD15_CONFIGS = Path(__file__).resolve().parent.parent / "data" / "sd15"
POSITION_IDS = TEXT_ENCODER_PREFIX + "text_model.embeddings.position_ids"
EMA_BOOKKEEPING = (EMA_PREFIX + "decay", EMA_PREFIX + "num_updates")
# The buffers LDM's `DDPM.register_schedule` stores next to the weights (Rombach et al. 2022, ldm/models/diffusion/ddpm.py).
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
ALPHAS_CUMPROD_TOLERANCE = 1e-5  # float32 rounding of the same schedule differs by < 1e-6
# The three networks: the prefix of their keys in the file, and the names of their files in a diffusers folder.
PARTS = {
    "unet": (UNET_PREFIX, ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"]),
    "vae": (VAE_PREFIX, ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"]),
    "text_encoder": (TEXT_ENCODER_PREFIX, ["model.safetensors", "pytorch_model.bin"]),
}
PART_OF_CLASS = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae", "CLIPTextModel": "text_encoder"}


# ----- reading: the safetensors format, memory-mapped ---------------------------------------------

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


def _map_safetensors(path: Path) -> tuple[mmap.mmap, dict, int]:
    """Maps the file and checks its header against its size: a truncated file or a header that lies
    about a tensor's size is reported here, before any tensor is read."""
    size = path.stat().st_size
    redownload = "The file is truncated or corrupt: download it again."
    if size < 8:
        raise CheckpointError(f"{path} is not a safetensors file: it has {size} bytes, less than the 8-byte header length")
    with open(path, "rb") as file:
        (header_size,) = struct.unpack("<Q", file.read(8))
        if 8 + header_size > size:
            raise CheckpointError(
                f"{path}: the header claims {header_size} bytes but the file has only {size} bytes. "
                f"It is not a safetensors file, or it is cut short. {redownload}"
            )
        try:
            header = json.loads(file.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({error}). {redownload}") from None
        file_map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header must be a JSON object, found {type(header).__name__}. {redownload}")
    header.pop("__metadata__", None)
    data_size = size - 8 - header_size
    for key, info in header.items():
        _check_header_entry(path, key, info, data_size, redownload)
    return file_map, header, 8 + header_size


def _check_header_entry(path: Path, key: str, info, data_size: int, redownload: str) -> None:
    try:
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        shape = [int(n) for n in info["shape"]]
        begin, end = (int(n) for n in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(
            f"{path}: the header entry of {key!r} is malformed ({info!r}); expected dtype (one of "
            f"{', '.join(SAFETENSORS_DTYPES)}), shape and data_offsets. {redownload}"
        ) from None
    needed = dtype.itemsize * torch.Size(shape).numel()
    if min(shape, default=0) < 0 or begin < 0 or end - begin != needed:
        raise CheckpointError(
            f"{path}: the header lies about {key!r}: {info['dtype']} {tuple(shape)} takes {needed} bytes, "
            f"but its data_offsets [{begin}, {end}] give {end - begin}. {redownload}"
        )
    if end > data_size:
        raise CheckpointError(
            f"{path} is truncated: {key!r} ends at byte {end} of the tensor data, but the file holds only "
            f"{data_size} bytes of it. {redownload}"
        )


# ----- recognising what the file is ----------------------------------------------------------------


def check_is_sd1(checkpoint: CheckpointFile) -> None:
    """Returns quietly for a Stable Diffusion 1.x checkpoint; raises a CheckpointError saying what the file is otherwise."""
    keys = checkpoint.keys()
    path = checkpoint.path
    unsupported = "minidiff loads Stable Diffusion 1.x checkpoints only so far."
    sdxl = [key for key in keys if key.startswith(("conditioner.embedders.", UNET_PREFIX + "label_emb."))]
    if sdxl:
        raise CheckpointError(
            f"{path} is an SDXL checkpoint (found {sdxl[0]!r}: SDXL's text encoders under conditioner.embedders "
            f"and its size conditioning, label_emb / add_embedding). {unsupported}"
        )
    open_clip = [key for key in keys if key.startswith("cond_stage_model.model.")]
    context = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    context_dim = checkpoint.shape(context)[-1] if context in keys else None
    if open_clip or context_dim == 1024:
        found = f"OpenCLIP text encoder keys ({open_clip[0]!r})" if open_clip else "cross-attention context dim 1024"
        raise CheckpointError(
            f"{path} is a Stable Diffusion 2.x checkpoint (found {found}; SD 2.x uses OpenCLIP ViT-H, context dim "
            f"1024, and its 768px model predicts v). {unsupported}"
        )
    if not any(key.startswith((UNET_PREFIX, VAE_PREFIX, TEXT_ENCODER_PREFIX)) for key in keys):
        hint = ""
        if any(key.startswith(("down_blocks.", "text_model.", "encoder.down_blocks.")) for key in keys):
            hint = " Its keys look like one component of a diffusers folder: load that folder with from_pretrained."
        raise CheckpointError(
            f"{path} is not a Stable Diffusion checkpoint: none of its {len(keys)} keys start with "
            f"{UNET_PREFIX!r}, {VAE_PREFIX!r} or {TEXT_ENCODER_PREFIX!r} (first keys: {sorted(keys)[:5]}).{hint}"
        )


# ----- configs ---------------------------------------------------------------------------------


def component_config(part: str, config: dict | str | os.PathLike | None = None) -> dict:
    """The architecture config of `part`: `config` itself if it is a dict, else `<config>/<part>/config.json`
    (or `<config>/config.json`), else the bundled SD 1.5 config."""
    if isinstance(config, dict):
        return dict(config)
    folder = Path(config) if config is not None else SD15_CONFIGS
    for candidate in (folder / part / "config.json", folder / "config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text(encoding="utf-8"))
    raise FileNotFoundError(f"no {part}/config.json in {folder}; pass config= a diffusers-layout folder, or None for SD 1.5")


def key_map_for(part: str, config: dict) -> KeyMap:
    if part == "unet":
        return unet_key_map(config)
    if part == "vae":
        return vae_key_map(config)
    return text_encoder_key_map()


def _config_folder(config) -> Path:
    return Path(config) if config is not None else SD15_CONFIGS


# ----- loading one network -------------------------------------------------------------------------


def load_component(
    cls,
    path_or_checkpoint: str | os.PathLike | CheckpointFile,
    config: dict | str | os.PathLike | None = None,
    torch_dtype: torch.dtype | None = None,
    use_ema: bool = False,
    memory_format: torch.memory_format | None = None,
):
    """`cls` (UNet2DConditionModel, AutoencoderKL or CLIPTextModel) with its weights from an original single file.

    The file's keys under the network's prefix are renamed by the key map and checked against the module
    (built on the meta device) before any tensor is read; then each tensor is read, and cast (to `torch_dtype`)
    and laid out (4-D ones, in `memory_format`) in one copy where needed (CheckpointFile.tensor).
    """
    part = next((PART_OF_CLASS[klass.__name__] for klass in cls.__mro__ if klass.__name__ in PART_OF_CLASS), None)
    if part is None:
        raise ValueError(f"{cls.__name__} cannot be loaded from a single file; only {', '.join(PART_OF_CLASS)} can")
    if torch_dtype is not None and not (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
        raise ValueError(f"torch_dtype must be a floating torch.dtype such as torch.float16, got {torch_dtype!r}")
    checkpoint = path_or_checkpoint if isinstance(path_or_checkpoint, CheckpointFile) else CheckpointFile(path_or_checkpoint)
    check_is_sd1(checkpoint)
    config = component_config(part, config)
    key_map = key_map_for(part, config)
    stored_key = _stored_keys(checkpoint, part, key_map, use_ema)  # diffusers name -> key in the file
    from minidiff.models.modeling import build_on_meta  # (a module-level import would be circular)

    model = build_on_meta(cls, config)  # shapes only, and no random init (nn.Embedding's imports torch._dynamo: 1.5 s)
    _check_fits(model, checkpoint, stored_key, key_map, part)
    dtype = torch_dtype or torch.get_default_dtype()
    state_dict = {name: key_map.tensor_to_diffusers(name, checkpoint.tensor(key, dtype, memory_format)) for name, key in stored_key.items()}
    return cls.from_state_dict(config, state_dict, dtype, source=f"{checkpoint.path} ({part})")


def _stored_keys(checkpoint: CheckpointFile, part: str, key_map: KeyMap, use_ema: bool) -> dict[str, str]:
    """For each weight of `part` in the file: its diffusers name -> the key that holds it (the EMA copy if asked)."""
    prefix = PARTS[part][0]
    originals = [key for key in checkpoint.keys() if key.startswith(prefix) and key != POSITION_IDS]
    if not originals:
        raise CheckpointError(f"{checkpoint.path} holds no {part} weights (no keys start with {prefix!r})")
    unplaced = [key for key in originals if key_map.to_diffusers(key) is None]
    if unplaced:
        raise CheckpointError(
            f"{checkpoint.path} has {part} weights the key map cannot place for this config:\n"
            + _listing("unexpected keys", unplaced)
            + "\nThe file is not a Stable Diffusion 1.x checkpoint of this architecture: pass config= the matching diffusers-layout folder."
        )
    stored = {key_map.to_diffusers(key): key for key in originals}
    if use_ema and part == "unet":
        stored = {name: ema_key(key) for name, key in stored.items()}
        present = set(checkpoint.keys())
        absent = [key for key in stored.values() if key not in present]
        if len(absent) == len(stored):
            raise CheckpointError(
                f"{checkpoint.path} has no EMA weights (no {EMA_PREFIX}* keys). An '-emaonly' file already holds the "
                "EMA weights under model.diffusion_model.*: load it with use_ema=False."
            )
        if absent:
            raise CheckpointError(f"{checkpoint.path} lacks the EMA copy of some UNet weights:\n" + _listing("missing keys", absent))
    return stored


def _check_fits(model: torch.nn.Module, checkpoint: CheckpointFile, stored_key: dict[str, str], key_map: KeyMap, part: str) -> None:
    """One error listing every weight the file lacks, has in excess or has in the wrong shape, under the
    file's names (diffusers' names in parentheses). Reads shapes only, no tensor data."""
    expected = model.state_dict(keep_vars=True)
    missing = [f"{key_map.to_original(name) or '(no original name)'} ({name})" for name in expected if name not in stored_key]
    unexpected = [f"{stored_key[name]} ({name})" for name in stored_key if name not in expected]
    misshaped = []
    for name, key in stored_key.items():
        if name in expected:
            found = tuple(key_map.tensor_to_diffusers(name, torch.empty(checkpoint.shape(key), device="meta")).shape)
            if found != tuple(expected[name].shape):
                misshaped.append(f"{key} ({name}): expected {tuple(expected[name].shape)}, found {found}")
    if not (missing or unexpected or misshaped):
        return
    parts = [f"{checkpoint.path} does not fit {type(model).__name__} as configured ({part} weights under {key_map.prefix!r}):"]
    for title, lines in (("missing keys", missing), ("unexpected keys", unexpected), ("keys with the wrong shape", misshaped)):
        if lines:
            parts.append(_listing(title, lines))
    parts.append(
        "Check that the file is complete and is a Stable Diffusion 1.x checkpoint, or pass config= the "
        "diffusers-layout folder of its architecture."
    )
    raise CheckpointError("\n".join(parts))


# ----- loading the whole pipeline --------------------------------------------------------------------


@dataclass
class SingleFileComponents:
    """What `load_single_file` returns: the five parts of a StableDiffusionPipeline, and an account of
    every key of the file that was not loaded into a module (and why)."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    accounted: list[str] = field(default_factory=list)


def load_single_file(
    path: str | os.PathLike,
    torch_dtype: torch.dtype | None = None,
    use_ema: bool = False,
    config: str | os.PathLike | None = None,
    memory_formats: dict[str, torch.memory_format] | None = None,
) -> SingleFileComponents:
    """Every component of Stable Diffusion 1.x from one original checkpoint file, offline.

    `use_ema=True` loads the UNet's EMA copy (`model_ema.*`, in files such as v1-5-pruned.safetensors).
    `config` is a diffusers-layout folder with the configs (unet/, vae/, text_encoder/, scheduler/,
    optionally tokenizer/); by default SD 1.5's, bundled with minidiff.
    `memory_formats` gives the conv weights' layout per part, e.g. {"vae": torch.channels_last}.
    """
    from minidiff.models.clip_text import CLIPTextModel
    from minidiff.models.unet_2d_condition import UNet2DConditionModel
    from minidiff.models.vae import AutoencoderKL

    checkpoint = CheckpointFile(path)
    check_is_sd1(checkpoint)
    scheduler = scheduler_from_config_folder(_config_folder(config))
    accounted = _account_for_other_keys(checkpoint, scheduler, use_ema)
    load = dict(config=config, torch_dtype=torch_dtype)
    memory_formats = memory_formats or {}
    components = SingleFileComponents(
        unet=load_component(UNet2DConditionModel, checkpoint, use_ema=use_ema, memory_format=memory_formats.get("unet"), **load),
        vae=load_component(AutoencoderKL, checkpoint, memory_format=memory_formats.get("vae"), **load),
        text_encoder=load_component(CLIPTextModel, checkpoint, **load),
        tokenizer=tokenizer_from_config_folder(_config_folder(config)),
        scheduler=scheduler,
        accounted=accounted,
    )
    for line in accounted:
        logger.info("%s: %s", checkpoint.path.name, line)
    return components


def scheduler_from_config_folder(folder: Path):
    """The scheduler named in `<folder>/scheduler/scheduler_config.json`; PNDM for the bundled SD 1.5 config."""
    import minidiff.schedulers as schedulers

    config = schedulers.SchedulerMixin.load_config(folder, subfolder="scheduler")
    name = str(config.get("_class_name", "PNDMScheduler"))
    scheduler_class = getattr(schedulers, name, None)
    if scheduler_class is None:
        raise ValueError(f"{folder}/scheduler/scheduler_config.json names {name!r}, which minidiff does not implement")
    return scheduler_class.from_config(config)


def tokenizer_from_config_folder(folder: Path):
    """The tokenizer of `<folder>/tokenizer/` when there is one, else CLIP's bundled vocabulary."""
    from minidiff.tokenizer import CLIPTokenizer

    if (folder / "tokenizer").is_dir():
        return CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    return CLIPTokenizer()


def _account_for_other_keys(checkpoint: CheckpointFile, scheduler, use_ema: bool) -> list[str]:
    """Checks the keys that belong to no network and says what happened to each group; an unknown key is an error."""
    keys = checkpoint.keys()
    networks = tuple(prefix for prefix, _ in PARTS.values())
    ema = [key for key in keys if key.startswith(EMA_PREFIX) and key not in EMA_BOOKKEEPING]
    schedule = [key for key in keys if key in SCHEDULE_BUFFERS]
    bookkeeping = [key for key in keys if key in EMA_BOOKKEEPING]
    known = set(ema) | set(schedule) | set(bookkeeping) | {POSITION_IDS}
    unknown = [key for key in keys if not key.startswith(networks) and key not in known]
    if unknown:
        raise CheckpointError(
            f"{checkpoint.path} has keys that belong to no part of Stable Diffusion 1.x:\n"
            + _listing("unexpected keys", unknown)
            + "\nIt may be another kind of model (a ControlNet, an inpainting or upscaling model, a LoRA); "
            "minidiff loads plain SD 1.x checkpoints."
        )
    accounted = []
    if ema:
        use = "loaded into the UNet (use_ema=True)" if use_ema else "not used; pass use_ema=True to load them"
        accounted.append(f"{len(ema)} EMA tensors ({EMA_PREFIX}*): {use}")
    if bookkeeping:
        values = {key: checkpoint.tensor(key).tolist() for key in bookkeeping}
        accounted.append(f"EMA bookkeeping {values}: not needed for inference")
    if POSITION_IDS in keys:
        accounted.append(_check_position_ids(checkpoint))
    if schedule:
        accounted.append(_check_schedule(checkpoint, scheduler, schedule))
    return accounted


def _check_position_ids(checkpoint: CheckpointFile) -> str:
    stored = checkpoint.tensor(POSITION_IDS).reshape(-1)
    if torch.equal(stored.long(), torch.arange(stored.numel())) and not stored.is_floating_point():
        return f"{POSITION_IDS} = arange({stored.numel()}): CLIPTextModel computes the same ids itself"
    warnings.warn(
        f"{checkpoint.path}: {POSITION_IDS} is not arange({stored.numel()}) (found {stored[:8].tolist()}...); "
        "some fine-tunes store damaged position ids. minidiff ignores them and uses 0, 1, 2, ... as CLIP was trained.",
        stacklevel=4,
    )
    return f"{POSITION_IDS}: not arange({stored.numel()}); ignored (CLIPTextModel uses 0, 1, 2, ...)"


def _check_schedule(checkpoint: CheckpointFile, scheduler, schedule: list[str]) -> str:
    """The file's alphas_cumprod (the training noise schedule) must be the scheduler's, or sampling is off."""
    names = ", ".join(schedule)
    if "alphas_cumprod" not in schedule:
        return f"noise-schedule buffers ({names}): not needed, the scheduler config defines the schedule"
    stored = checkpoint.tensor("alphas_cumprod").double().reshape(-1)
    expected = scheduler.alphas_cumprod.double()
    if stored.shape != expected.shape:
        difference = f"{stored.numel()} timesteps in the file, {expected.numel()} in the scheduler config"
    else:
        difference = f"max difference {float((stored - expected).abs().max()):.3g}"
        if float((stored - expected).abs().max()) <= ALPHAS_CUMPROD_TOLERANCE:
            return f"noise-schedule buffers ({names}): alphas_cumprod matches the scheduler config ({difference})"
    config = scheduler.config
    warnings.warn(
        f"{checkpoint.path}: the alphas_cumprod stored in the file does not match the scheduler config "
        f"({config.get('beta_schedule')} {config.get('beta_start')}-{config.get('beta_end')}, "
        f"{config.get('num_train_timesteps')} steps): {difference} (tolerance {ALPHAS_CUMPROD_TOLERANCE}). The model "
        "was probably trained with another noise schedule; pass config= a folder whose scheduler config matches.",
        stacklevel=4,
    )
    return f"noise-schedule buffers ({names}): alphas_cumprod does NOT match the scheduler config ({difference})"


# ----- writing -------------------------------------------------------------------------------------


def ldm_schedule_buffers(scheduler_config: dict) -> dict[str, torch.Tensor]:
    """The noise-schedule buffers LDM's `DDPM.register_schedule` stores in the file, from a scheduler config.

    As LDM: computed in float64, stored in float32, with alpha_bar_t = prod_{s<=t} (1 - beta_s) and the
    posterior q(x_{t-1} | x_t, x_0) of DDPM (Ho et al. 2020, eq. 6-7), v_posterior = 0.
    """
    from minidiff.schedulers.base import make_betas

    schedule, start, end = scheduler_config["beta_schedule"], scheduler_config["beta_start"], scheduler_config["beta_end"]
    steps = scheduler_config["num_train_timesteps"]
    if scheduler_config.get("trained_betas") is None and schedule == "scaled_linear":  # LDM's "linear"
        betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    elif scheduler_config.get("trained_betas") is None and schedule == "linear":  # LDM's "sqrt_linear"
        betas = torch.linspace(start, end, steps, dtype=torch.float64)
    else:
        betas = make_betas(schedule, start, end, steps, scheduler_config.get("trained_betas")).double()
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)  # beta~_t, eq. 7
    buffers = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
    }
    return {name: value.float() for name, value in buffers.items()}


def single_file_state_dict(state_dicts: dict[str, dict], configs: dict[str, dict], scheduler_config: dict) -> dict:
    """The original file's tensors from the three networks' diffusers-layout state dicts (no copy, no cast),
    plus CLIP's position ids and LDM's noise-schedule buffers, as the original files have them."""
    tensors = {}
    for part, state_dict in state_dicts.items():
        key_map = key_map_for(part, configs[part])
        unplaced = []
        for name, tensor in state_dict.items():
            if part == "text_encoder" and not name.startswith("text_model."):
                name = "text_model." + name  # transformers 5 writes CLIP's keys without the prefix
            original = key_map.to_original(name)
            if original is None:
                unplaced.append(name)
            else:
                tensors[original] = key_map.tensor_to_original(name, tensor).contiguous()
        if unplaced:
            raise CheckpointError(
                f"the {part} weights have keys the key map cannot place for its config:\n" + _listing("keys", unplaced)
            )
    position_embedding = tensors.get(TEXT_ENCODER_PREFIX + "text_model.embeddings.position_embedding.weight")
    if position_embedding is not None:
        tensors[POSITION_IDS] = torch.arange(position_embedding.shape[0]).unsqueeze(0)  # (1, 77) int64
    tensors.update(ldm_schedule_buffers(scheduler_config))
    return tensors


def save_single_file(path: str | os.PathLike, unet, vae, text_encoder, scheduler) -> Path:
    """Write the modules (and the scheduler's noise schedule) as one original-layout `.safetensors` file."""
    state_dicts = {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": text_encoder.state_dict()}
    configs = {"unet": dict(unet.config), "vae": dict(vae.config), "text_encoder": dict(text_encoder.config)}
    tensors = single_file_state_dict(state_dicts, configs, dict(scheduler.config))
    path = Path(path)
    save_file({key: value.detach() for key, value in tensors.items()}, str(path), metadata={"format": "pt"})
    return path


# ----- converting: single file <-> diffusers folder ----------------------------------------------------


def convert(
    src: str | os.PathLike, dst: str | os.PathLike, config: str | os.PathLike | None = None, use_ema: bool = False
) -> Path:
    """`minidiff convert SRC DST`: a single file becomes a diffusers-layout folder, a folder becomes a single file.

    Tensors are copied as they are (same dtype, same bits), so folder -> file -> folder gives back the same
    weights files. `config` (file -> folder) is the folder of configs to write, by default SD 1.5's;
    `use_ema` takes the UNet's EMA copy.
    """
    src, dst = Path(src), Path(dst)
    if src.is_dir():
        if dst.suffix != ".safetensors":
            raise ValueError(f"converting the folder {src} writes one .safetensors file; give DST a .safetensors name, not {dst}")
        return folder_to_single_file(src, dst)
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"converting the file {src} writes a diffusers folder, but {dst} is a file; give DST a folder name")
    return single_file_to_folder(src, dst, config=config, use_ema=use_ema)


def folder_to_single_file(folder: str | os.PathLike, path: str | os.PathLike) -> Path:
    """A diffusers-layout SD 1.x folder (unet/, vae/, text_encoder/, scheduler/) as one original-layout file."""
    folder = Path(folder)
    state_dicts, configs = {}, {}
    for part, (_, weights_names) in PARTS.items():
        configs[part] = component_config(part, folder)
        state_dicts[part] = read_state_dict(weight_files_in_folder(folder / part, weights_names))
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    tensors = single_file_state_dict(state_dicts, configs, scheduler_config)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return Path(path)


def single_file_to_folder(
    path: str | os.PathLike, folder: str | os.PathLike, config: str | os.PathLike | None = None, use_ema: bool = False
) -> Path:
    """An original SD 1.x file as a diffusers-layout folder. Every weight is checked against its module (built
    on the meta device) and written unchanged; configs, tokenizer and model_index.json come from `config`."""
    from minidiff.models.clip_text import CLIPTextModel
    from minidiff.models.unet_2d_condition import UNet2DConditionModel
    from minidiff.models.vae import AutoencoderKL

    checkpoint = CheckpointFile(path)
    check_is_sd1(checkpoint)
    configs_folder, folder = _config_folder(config), Path(folder)
    scheduler = scheduler_from_config_folder(configs_folder)
    for line in _account_for_other_keys(checkpoint, scheduler, use_ema):
        logger.info("%s: %s", checkpoint.path.name, line)
    for part, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        part_config = component_config(part, configs_folder)
        key_map = key_map_for(part, part_config)
        stored_key = _stored_keys(checkpoint, part, key_map, use_ema)
        with torch.device("meta"):
            model = cls.from_config(part_config)
        _check_fits(model, checkpoint, stored_key, key_map, part)
        tensors = {name: key_map.tensor_to_diffusers(name, checkpoint.tensor(key)).contiguous() for name, key in stored_key.items()}
        (folder / part).mkdir(parents=True, exist_ok=True)
        _copy_config(configs_folder, folder, f"{part}/config.json")
        save_file(tensors, str(folder / part / PARTS[part][1][0]), metadata={"format": "pt"})
    _copy_config(configs_folder, folder, "scheduler/scheduler_config.json")
    _copy_config(configs_folder if (configs_folder / "model_index.json").is_file() else SD15_CONFIGS, folder, "model_index.json")
    if (configs_folder / "tokenizer").is_dir():
        shutil.copytree(configs_folder / "tokenizer", folder / "tokenizer", dirs_exist_ok=True)
    else:
        tokenizer_from_config_folder(configs_folder).save_pretrained(folder / "tokenizer")
    return folder


def _copy_config(source_folder: Path, target_folder: Path, name: str) -> None:
    (target_folder / name).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source_folder / name, target_folder / name)
