"""The original one-file Stable Diffusion 1.x checkpoint: what it holds, how to recognise it, where each part is.

What the file holds (keys of `v1-5-pruned.safetensors`):

    model.diffusion_model.*        UNet             renamed by the key map (key_map.py)
    first_stage_model.*            VAE              renamed by the key map
    cond_stage_model.transformer.* CLIP text model  renamed by the key map
    ...text_model.embeddings.position_ids           arange(77): CLIPTextModel computes it; checked, not loaded
    model_ema.*                    EMA copy of the UNet (dots dropped from the names); used with use_ema=True
    model_ema.decay, model_ema.num_updates          EMA bookkeeping; not loaded
    betas, alphas_cumprod, ...     LDM's noise-schedule buffers; alphas_cumprod is checked against the scheduler

The file holds only weights: the architecture configs, the default scheduler config (PNDM, scaled_linear
0.00085-0.012, skip_prk_steps, steps_offset 1) and the CLIP vocabulary come with minidiff (`minidiff/data/sd15/`,
the one copy of SD 1.5's configs, read by `minidiff.data.sd15_config`). One network is loaded from such a file by `ModelMixin.from_single_file`;
the whole pipeline by `minidiff.loaders.single_file`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from minidiff.checkpoints.errors import CheckpointError, _listing, check_state_dict
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
from minidiff.checkpoints.reader import CheckpointFile
from minidiff.data import SD15_CONFIGS, sd15_config  # noqa: F401 (sd15_config: its old address, kept importable)

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


# ----- where each part is ---------------------------------------------------------------------------


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


UNET_CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"  # conv_in: (320, in_channels, 3, 3)
INPAINTING_IN_CHANNELS = 9  # latents 4 + mask 1 + masked-image latents 4


def config_for_file(part: str, config: dict, checkpoint: CheckpointFile) -> dict:
    """`config` with what the file itself decides: a UNet whose conv_in takes 9 channels is an inpainting UNet
    (SD 1.5 inpainting: latents, mask, masked-image latents), which needs no config of its own. Other channel
    counts (InstructPix2Pix's 8, ...) are other models: left to the shape check, which names them."""
    if part == "unet" and UNET_CONV_IN in checkpoint.keys():
        in_channels = checkpoint.shape(UNET_CONV_IN)[1]
        if in_channels == INPAINTING_IN_CHANNELS and config.get("in_channels") == 4:
            config = {**config, "in_channels": in_channels}
    return config


def key_map_for(part: str, config: dict) -> KeyMap:
    if part == "unet":
        return unet_key_map(config)
    if part == "vae":
        return vae_key_map(config)
    return text_encoder_key_map()


def stored_keys(checkpoint: CheckpointFile, part: str, key_map: KeyMap, use_ema: bool) -> dict[str, str]:
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


SINGLE_FILE_ADVICE = (
    "Check that the file is complete and is a Stable Diffusion 1.x checkpoint, or pass config= the "
    "diffusers-layout folder of its architecture."
)


def check_part_fits(model: torch.nn.Module, checkpoint: CheckpointFile, stored_key: dict[str, str], key_map: KeyMap, part: str) -> None:
    """One error listing every weight the file lacks, has in excess or has in the wrong shape, under the file's
    names (the module's in parentheses). Reads shapes only, no tensor data."""
    found = {name: key_map.tensor_to_diffusers(name, torch.empty(checkpoint.shape(key), device="meta")) for name, key in stored_key.items()}

    def label(name: str) -> str:
        return f"{stored_key.get(name) or key_map.to_original(name) or '(no original name)'} ({name})"

    source = f"{checkpoint.path} ({part} weights under {key_map.prefix!r})"
    check_state_dict(model, found, source, label, advice=SINGLE_FILE_ADVICE)
