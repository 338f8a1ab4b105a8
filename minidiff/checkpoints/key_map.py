"""The key map between the original single-file names and minidiff's names, derived from the architecture config.

The original Stable Diffusion checkpoint (`v1-5-pruned-emaonly.safetensors`, from CompVis' latent-diffusion
code, Rombach et al. 2022, arXiv 2112.10752) keeps all three networks in one file, each under a prefix:

    model.diffusion_model.                  the UNet            (minidiff / diffusers: unet/)
    first_stage_model.                      the VAE             (vae/)
    cond_stage_model.transformer.           the CLIP text model (text_encoder/)

Inside, the module names differ from diffusers'. Rather than a table of a thousand keys, the map pairs
*modules* (one entry per ResNet block, attention block, up/downsampler), plus the few leaf layers whose
names differ inside a module. For SD 1.5's UNet (layers_per_block 2) it reads:

    original                              diffusers
    time_embed.0, time_embed.2            time_embedding.linear_1, time_embedding.linear_2
    input_blocks.0.0                      conv_in
    input_blocks.1.0                      down_blocks.0.resnets.0       in_layers.0 -> norm1, in_layers.2 -> conv1,
    input_blocks.1.1                      down_blocks.0.attentions.0    emb_layers.1 -> time_emb_proj,
    input_blocks.2.0, input_blocks.2.1    down_blocks.0.resnets.1, ...  out_layers.0 -> norm2, out_layers.3 -> conv2,
    input_blocks.3.0.op                   down_blocks.0.downsamplers.0.conv       skip_connection -> conv_shortcut
    middle_block.0, .1, .2                mid_block.resnets.0, mid_block.attentions.0, mid_block.resnets.1
    output_blocks.0.0 ... output_blocks.2.0   up_blocks.0.resnets.0 ... resnets.2 (layers_per_block + 1 each)
    output_blocks.2.1                     up_blocks.0.upsamplers.0      (output_blocks.5.2 after an attention)
    out.0, out.2                          conv_norm_out, conv_out

and for the VAE (whose decoder counts its levels the other way round: `up.3` is diffusers' `up_blocks.0`):

    encoder.down.0.block.0                encoder.down_blocks.0.resnets.0     nin_shortcut -> conv_shortcut
    encoder.down.0.downsample             encoder.down_blocks.0.downsamplers.0
    encoder.mid.block_1, mid.attn_1       encoder.mid_block.resnets.0, encoder.mid_block.attentions.0
                                          norm -> group_norm, q/k/v -> to_q/to_k/to_v, proj_out -> to_out.0
                                          (q, k, v, proj_out are 1x1 convolutions: weights (C, C, 1, 1) <-> (C, C))
    decoder.up.3.block.0, up.3.upsample   decoder.up_blocks.0.resnets.0, decoder.up_blocks.0.upsamplers.0
    encoder.norm_out                      encoder.conv_norm_out

The CLIP text model keeps transformers' names: `cond_stage_model.transformer.text_model.X` is `text_model.X`.
Each `KeyMap` below is used in both directions: `to_diffusers` when loading, `to_original` when writing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
EMA_PREFIX = "model_ema."

# Leaf layers of a ResNet block whose names differ (LDM's `ResBlock` vs diffusers' `ResnetBlock2D`).
UNET_RESNET_LEAVES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
VAE_RESNET_LEAVES = {"nin_shortcut": "conv_shortcut"}  # norm1, conv1, norm2, conv2 keep their names
VAE_ATTENTION_LEAVES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# The VAE's attention projections: 1x1 convolutions in the original file, linear layers in diffusers.
VAE_CONV_AS_LINEAR = re.compile(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")


@dataclass(frozen=True)
class ModuleRename:
    """One module under both names, e.g. `input_blocks.1.0` <-> `down_blocks.0.resnets.0`, and its renamed leaves."""

    original: str
    diffusers: str
    leaves: dict[str, str] = field(default_factory=dict)  # original leaf name -> diffusers leaf name


def _rename(key: str, source: str, target: str, leaves: dict[str, str]) -> str | None:
    """`key` moved from module `source` to module `target`, renaming its leaf; None if `key` is not in `source`."""
    if not key.startswith(source + "."):
        return None
    rest = key[len(source) + 1 :]
    for leaf_source, leaf_target in leaves.items():
        if rest.startswith(leaf_source + "."):
            rest = leaf_target + rest[len(leaf_source) :]
            break
    return f"{target}.{rest}"


@dataclass
class KeyMap:
    """The names of one network in the original file (under `prefix`) and in diffusers' layout, both ways."""

    prefix: str
    modules: list[ModuleRename]
    conv_as_linear: re.Pattern | None = None  # diffusers keys stored as 1x1 convolutions in the original file

    def to_diffusers(self, original_key: str) -> str | None:
        """`model.diffusion_model.input_blocks.1.0.in_layers.0.weight` -> `down_blocks.0.resnets.0.norm1.weight`.
        None when the key belongs to no module of the map."""
        if not original_key.startswith(self.prefix):
            return None
        key = original_key[len(self.prefix) :]
        for module in self.modules:
            renamed = _rename(key, module.original, module.diffusers, module.leaves)
            if renamed is not None:
                return renamed
        return None

    def to_original(self, diffusers_key: str) -> str | None:
        """The inverse of `to_diffusers`."""
        for module in self.modules:
            leaves = {target: source for source, target in module.leaves.items()}
            renamed = _rename(diffusers_key, module.diffusers, module.original, leaves)
            if renamed is not None:
                return self.prefix + renamed
        return None

    def tensor_to_diffusers(self, diffusers_key: str, tensor: torch.Tensor) -> torch.Tensor:
        """A (C, C, 1, 1) convolution weight becomes the (C, C) linear weight (a view, no copy)."""
        if self.conv_as_linear is not None and self.conv_as_linear.search(diffusers_key) and tensor.ndim == 4:
            return tensor[:, :, 0, 0]
        return tensor

    def tensor_to_original(self, diffusers_key: str, tensor: torch.Tensor) -> torch.Tensor:
        """A (C, C) linear weight becomes the (C, C, 1, 1) convolution weight of the original file."""
        if self.conv_as_linear is not None and self.conv_as_linear.search(diffusers_key) and tensor.ndim == 2:
            return tensor[:, :, None, None]
        return tensor

    def table(self) -> str:
        """The map as readable text, one module per line."""
        lines = []
        for module in self.modules:
            leaves = ", ".join(f"{source} -> {target}" for source, target in module.leaves.items())
            lines.append(f"{self.prefix}{module.original:<28} {module.diffusers:<40} {leaves}".rstrip())
        return "\n".join(lines)


def _per_block(value, count: int, name: str) -> list[int]:
    """`layers_per_block` may be one int for every block or a list with one per block."""
    if isinstance(value, int):
        return [value] * count
    if len(value) != count:
        raise ValueError(f"{name} has {len(value)} entries, but the config has {count} blocks; give one per block")
    return list(value)


def unet_key_map(config: dict) -> KeyMap:
    """The UNet's map, from `down_block_types`, `up_block_types` and `layers_per_block` of its config.

    The original UNet numbers its blocks in one running sequence: `input_blocks.k` walks down every level
    (layers_per_block ResNet blocks, then a downsampler except at the bottom), `output_blocks.k` walks up
    (layers_per_block + 1 ResNet blocks, the last one carrying the upsampler). Position 0 inside a block is
    the ResNet, position 1 the attention (if the level has one), then the up/downsampler.
    """
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    levels = len(down_types)
    layers = _per_block(config["layers_per_block"], levels, "layers_per_block")
    modules = [
        ModuleRename("time_embed.0", "time_embedding.linear_1"),
        ModuleRename("time_embed.2", "time_embedding.linear_2"),
        ModuleRename("input_blocks.0.0", "conv_in"),
    ]

    k = 1  # input_blocks.0 is conv_in
    for level, block_type in enumerate(down_types):
        for j in range(layers[level]):
            modules.append(ModuleRename(f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}", UNET_RESNET_LEAVES))
            if "CrossAttn" in block_type:
                modules.append(ModuleRename(f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{j}"))
            k += 1
        if level < levels - 1:
            modules.append(ModuleRename(f"input_blocks.{k}.0.op", f"down_blocks.{level}.downsamplers.0.conv"))
            k += 1

    modules += [
        ModuleRename("middle_block.0", "mid_block.resnets.0", UNET_RESNET_LEAVES),
        ModuleRename("middle_block.1", "mid_block.attentions.0"),
        ModuleRename("middle_block.2", "mid_block.resnets.1", UNET_RESNET_LEAVES),
    ]

    k = 0
    for level, block_type in enumerate(up_types):
        has_attention = "CrossAttn" in block_type
        resnets = list(reversed(layers))[level] + 1
        for j in range(resnets):
            modules.append(ModuleRename(f"output_blocks.{k}.0", f"up_blocks.{level}.resnets.{j}", UNET_RESNET_LEAVES))
            if has_attention:
                modules.append(ModuleRename(f"output_blocks.{k}.1", f"up_blocks.{level}.attentions.{j}"))
            if j == resnets - 1 and level < levels - 1:
                position = 2 if has_attention else 1
                modules.append(ModuleRename(f"output_blocks.{k}.{position}", f"up_blocks.{level}.upsamplers.0"))
            k += 1

    modules += [ModuleRename("out.0", "conv_norm_out"), ModuleRename("out.2", "conv_out")]
    return KeyMap(UNET_PREFIX, modules)


def _vae_mid_block(side: str) -> list[ModuleRename]:
    return [
        ModuleRename(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", VAE_RESNET_LEAVES),
        ModuleRename(f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", VAE_ATTENTION_LEAVES),
        ModuleRename(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", VAE_RESNET_LEAVES),
    ]


def vae_key_map(config: dict) -> KeyMap:
    """The VAE's map, from `block_out_channels` and `layers_per_block` of its config.

    The encoder has layers_per_block ResNet blocks per level, the decoder layers_per_block + 1; the
    original decoder numbers its levels from the bottom (`up.{levels-1}` runs first), diffusers' from the top.
    """
    levels = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    modules = [ModuleRename("encoder.conv_in", "encoder.conv_in")]
    for level in range(levels):
        for j in range(layers):
            modules.append(
                ModuleRename(f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}", VAE_RESNET_LEAVES)
            )
        if level < levels - 1:
            modules.append(ModuleRename(f"encoder.down.{level}.downsample", f"encoder.down_blocks.{level}.downsamplers.0"))
    modules += _vae_mid_block("encoder")
    modules += [
        ModuleRename("encoder.norm_out", "encoder.conv_norm_out"),
        ModuleRename("encoder.conv_out", "encoder.conv_out"),
        ModuleRename("quant_conv", "quant_conv"),
        ModuleRename("post_quant_conv", "post_quant_conv"),
        ModuleRename("decoder.conv_in", "decoder.conv_in"),
    ]
    modules += _vae_mid_block("decoder")
    for level in range(levels):
        original_level = levels - 1 - level
        for j in range(layers + 1):
            modules.append(
                ModuleRename(
                    f"decoder.up.{original_level}.block.{j}", f"decoder.up_blocks.{level}.resnets.{j}", VAE_RESNET_LEAVES
                )
            )
        if level < levels - 1:
            modules.append(ModuleRename(f"decoder.up.{original_level}.upsample", f"decoder.up_blocks.{level}.upsamplers.0"))
    modules += [
        ModuleRename("decoder.norm_out", "decoder.conv_norm_out"),
        ModuleRename("decoder.conv_out", "decoder.conv_out"),
    ]
    return KeyMap(VAE_PREFIX, modules, conv_as_linear=VAE_CONV_AS_LINEAR)


def text_encoder_key_map() -> KeyMap:
    """CLIP keeps transformers' names; only the prefix differs (`cond_stage_model.transformer.text_model.X`)."""
    return KeyMap(TEXT_ENCODER_PREFIX, [ModuleRename("text_model", "text_model")])


def ema_key(original_unet_key: str) -> str:
    """Where the original file keeps the EMA copy of a UNet weight: LDM's `LitEma` drops the dots.

    `model.diffusion_model.input_blocks.0.0.weight` -> `model_ema.diffusion_modelinput_blocks00weight`
    """
    return EMA_PREFIX + original_unet_key[len("model.") :].replace(".", "")
