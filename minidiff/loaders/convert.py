"""Writing the original one-file layout, and converting between it and a diffusers folder.

    convert("v1-5-pruned-emaonly.safetensors", "stable-diffusion-v1-5/")    # file -> folder
    convert("stable-diffusion-v1-5/", "sd15.safetensors")                 # folder -> file
    save_single_file("sd15.safetensors", unet, vae, text_encoder, scheduler)

Tensors are copied as they are (same dtype, same bits), so folder -> file -> folder gives back the same files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from minidiff.checkpoints.errors import CheckpointError, _listing
from minidiff.checkpoints.folder import weight_files_in_folder
from minidiff.checkpoints.key_map import TEXT_ENCODER_PREFIX
from minidiff.checkpoints.reader import CheckpointFile, read_state_dict
from minidiff.checkpoints.single_file_layout import (
    PARTS,
    POSITION_IDS,
    check_is_sd1,
    check_part_fits,
    component_config,
    key_map_for,
    stored_keys,
)
from minidiff.data import SD15_CONFIGS
from minidiff.loaders.scheduler import scheduler_from_folder
from minidiff.loaders.single_file import account_for_other_keys, config_folder, tokenizer_from_config_folder
from minidiff.models.clip_text import CLIPTextModel
from minidiff.models.modeling import build_on_meta
from minidiff.models.unet_2d_condition import UNet2DConditionModel
from minidiff.models.vae import AutoencoderKL
from minidiff.schedulers.base import make_betas
from minidiff.utils.no_clobber import refuse_to_replace

logger = logging.getLogger(__name__)


def ldm_schedule_buffers(scheduler_config: dict) -> dict[str, torch.Tensor]:
    """The noise-schedule buffers LDM's `DDPM.register_schedule` stores in the file, from a scheduler config.

    As LDM: computed in float64, stored in float32, with alpha_bar_t = prod_{s<=t} (1 - beta_s) and the
    posterior q(x_{t-1} | x_t, x_0) of DDPM (Ho et al. 2020, eq. 6-7), v_posterior = 0.
    """
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
    src: str | os.PathLike, dst: str | os.PathLike, config: str | os.PathLike | None = None, use_ema: bool = False,
    overwrite: bool = False,
) -> Path:
    """`minidiff convert SRC DST`: a single file becomes a diffusers-layout folder, a folder becomes a single file.

    Tensors are copied as they are (same dtype, same bits), so folder -> file -> folder gives back the same
    weights files. `config` (file -> folder) is the folder of configs to write, by default SD 1.5's;
    `use_ema` takes the UNet's EMA copy. A DST file, or any file of the layout in a DST folder, that already
    exists is replaced only with `overwrite=True` (`--overwrite`); the error lists them.
    """
    src, dst = Path(src), Path(dst)
    if src.is_dir():
        if dst.suffix != ".safetensors":
            raise ValueError(f"converting the folder {src} writes one .safetensors file; give DST a .safetensors name, not {dst}")
        refuse_to_replace([dst], f"converting {src} into {dst}", overwrite)
        return folder_to_single_file(src, dst)
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"converting the file {src} writes a diffusers folder, but {dst} is a file; give DST a folder name")
    refuse_to_replace(files_of_folder_layout(dst), f"converting {src} into the folder {dst}", overwrite)
    return single_file_to_folder(src, dst, config=config, use_ema=use_ema)


def files_of_folder_layout(folder: Path) -> list[Path]:
    """Every file `single_file_to_folder` writes into `folder`, and any tokenizer file already there."""
    written = [folder / "model_index.json", folder / "scheduler" / "scheduler_config.json"]
    for part in ("unet", "vae", "text_encoder"):
        written += [folder / part / "config.json", folder / part / PARTS[part][1][0]]
    tokenizer = folder / "tokenizer"
    return written + (sorted(tokenizer.iterdir()) if tokenizer.is_dir() else [])


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
    checkpoint = CheckpointFile(path)
    check_is_sd1(checkpoint)
    configs_folder, folder = config_folder(config), Path(folder)
    scheduler = scheduler_from_folder(configs_folder)
    for line in account_for_other_keys(checkpoint, scheduler, use_ema):
        logger.info("%s: %s", checkpoint.path.name, line)
    for part, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        part_config = component_config(part, configs_folder)
        key_map = key_map_for(part, part_config)
        stored_key = stored_keys(checkpoint, part, key_map, use_ema)
        check_part_fits(build_on_meta(cls, part_config), checkpoint, stored_key, key_map, part)
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
