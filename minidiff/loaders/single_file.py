"""A whole Stable Diffusion 1.x pipeline from one original checkpoint file, offline.

    parts = load_single_file("v1-5-pruned-emaonly.safetensors", torch_dtype=torch.float16)
    parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, parts.scheduler, parts.accounted

The three networks load through `from_single_file` (models/modeling.py; the file's layout is in
checkpoints/single_file_layout.py). This module adds what only the whole file has: the tokenizer and the
scheduler (from the bundled SD 1.5 configs, or `config=` a diffusers-layout folder), and an account of every
key that belongs to no network (EMA copy, EMA bookkeeping, CLIP's position ids, LDM's noise-schedule buffers),
each checked or reported; a key nobody knows is an error.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minidiff.checkpoints.errors import CheckpointError, _listing
from minidiff.checkpoints.key_map import EMA_PREFIX
from minidiff.checkpoints.reader import CheckpointFile
from minidiff.checkpoints.single_file_layout import (
    ALPHAS_CUMPROD_TOLERANCE,
    EMA_BOOKKEEPING,
    PARTS,
    POSITION_IDS,
    SCHEDULE_BUFFERS,
    check_is_sd1,
)
from minidiff.data import SD15_CONFIGS
from minidiff.loaders.scheduler import scheduler_from_folder
from minidiff.models.clip_text import CLIPTextModel
from minidiff.models.unet_2d_condition import UNet2DConditionModel
from minidiff.models.vae import AutoencoderKL
from minidiff.tokenizer import CLIPTokenizer

logger = logging.getLogger(__name__)


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
    checkpoint = CheckpointFile(path)
    check_is_sd1(checkpoint)
    configs = config_folder(config)
    scheduler = scheduler_from_folder(configs)
    accounted = account_for_other_keys(checkpoint, scheduler, use_ema)
    load = dict(config=config, torch_dtype=torch_dtype)
    memory_formats = memory_formats or {}
    components = SingleFileComponents(
        unet=UNet2DConditionModel.from_single_file(checkpoint, use_ema=use_ema, memory_format=memory_formats.get("unet"), **load),
        vae=AutoencoderKL.from_single_file(checkpoint, memory_format=memory_formats.get("vae"), **load),
        text_encoder=CLIPTextModel.from_single_file(checkpoint, **load),
        tokenizer=tokenizer_from_config_folder(configs),
        scheduler=scheduler,
        accounted=accounted,
    )
    for line in accounted:
        logger.info("%s: %s", checkpoint.path.name, line)
    return components


def config_folder(config) -> Path:
    """The folder of configs: `config` itself, or SD 1.5's bundled one."""
    return Path(config) if config is not None else SD15_CONFIGS


def tokenizer_from_config_folder(folder: Path):
    """The tokenizer of `<folder>/tokenizer/` when there is one, else CLIP's bundled vocabulary."""
    if (folder / "tokenizer").is_dir():
        return CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    return CLIPTokenizer()


def account_for_other_keys(checkpoint: CheckpointFile, scheduler, use_ema: bool) -> list[str]:
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
            + "\nIt may be another kind of model (a ControlNet, an upscaling model, a LoRA); "
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
