"""The denoising UNet of Stable Diffusion 1.x / 2.x: eps_theta(z_t, t, c) (Rombach et al. 2022, arXiv 2112.10752).

The latent diffusion model's network predicts the noise eps in a latent z_t (LDM eq. 2):

    L = E[ || eps - eps_theta(z_t, t, tau_theta(y)) ||^2 ]

with the text condition c = tau_theta(y) (CLIP's last hidden states, (B, 77, 768) for SD 1.5) entering
through cross-attention in the spatial transformers. With SD 1.5's config, a batch flows as

    z_t (B, 4, 64, 64) --conv_in--> (B, 320, 64, 64)  push             t --sinusoid--> (B, 320)
                                                                          --time_embedding--> temb (B, 1280)
    down_blocks: each (resnet [+ transformer]) x2, pushing each output onto the skip stack,
                 then a stride-2 conv (pushed too), except the last
      0 cross-attention  (B, 320, 64, 64)  -> (B, 320, 32, 32)     pushes 320, 320, 320
      1 cross-attention  (B, 320, 32, 32)  -> (B, 640, 16, 16)     pushes 640, 640, 640
      2 cross-attention  (B, 640, 16, 16)  -> (B, 1280, 8, 8)      pushes 1280, 1280, 1280
      3 plain            (B, 1280, 8, 8)   -> (B, 1280, 8, 8)      pushes 1280, 1280
    mid_block: resnet, transformer, resnet at (B, 1280, 8, 8)
    up_blocks: each (concat a popped skip, resnet [+ transformer]) x3, then nearest x2 + conv, except the last
      0 plain            (B, 1280, 8, 8)   -> (B, 1280, 16, 16)    pops 1280, 1280, 1280
      1 cross-attention  (B, 1280, 16, 16) -> (B, 1280, 32, 32)    pops 1280, 1280, 640
      2 cross-attention  (B, 1280, 32, 32) -> (B, 640, 64, 64)     pops 640, 640, 320
      3 cross-attention  (B, 640, 64, 64)  -> (B, 320, 64, 64)     pops 320, 320, 320
    conv_norm_out, SiLU, conv_out: (B, 320, 64, 64) -> eps_pred (B, 4, 64, 64)

The skip stack is the U: every feature map the way down pushes, the way up pops, last in first out. The
channel counts of the up path's resnets are found the same way, by pushing and popping channel counts.

Usage, as in diffusers:

    unet = UNet2DConditionModel.from_pretrained("path/to/stable-diffusion-v1-5", subfolder="unet")
    eps = unet(latents, t, encoder_hidden_states=text_embeddings).sample

The config uses diffusers' field names, so SD 1.x's and SD 2.x's `unet/config.json` read as they are; the
block types "CrossAttnDownBlock2D"/"DownBlock2D" and "CrossAttnUpBlock2D"/"UpBlock2D" choose a block with or
without cross-attention. One naming quirk is kept for compatibility: `attention_head_dim` is the NUMBER OF
HEADS of each block (8 for SD 1.5, [5, 10, 20, 20] for SD 2.x); each head has out_channels // heads channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minidiff.configuration import register_to_config
from minidiff.models.attention import Transformer2DModel
from minidiff.models.attention_processor import AttentionMixin
from minidiff.models.lora_adapters import LoraAdapterMixin, lora_scale
from minidiff.models.layers import (
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Timesteps,
    Upsample2D,
    checkpointed,
    get_activation,
    timesteps_for_batch,
)
from minidiff.models.modeling import ModelMixin
from minidiff.utils.outputs import BaseOutput

DOWN_BLOCK_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}  # block type -> with cross-attention
UP_BLOCK_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)


@dataclass
class UNet2DConditionOutput(BaseOutput):
    """What the UNet returns: `sample`, the predicted noise (or v, or x0, per the scheduler's prediction_type)."""

    sample: torch.Tensor


def spatial_transformers(channels: int, layers: list[int], heads: int, **transformer) -> nn.ModuleList:
    """One spatial transformer per resnet of a block: self-attention, cross-attention to the text, feed-forward."""
    return nn.ModuleList(
        Transformer2DModel(heads, channels // heads, in_channels=channels, num_layers=n, **transformer) for n in layers
    )


class DownBlock(nn.Module):
    """One level of the way down: `len(layers)` resnets, each followed by a spatial transformer when
    `transformer` is given (diffusers' CrossAttnDownBlock2D; DownBlock2D without), then a stride-2 conv unless
    it is the last level. Pushes every output onto `skips`: (B, C_in, H, W) -> (B, C_out, H/2, W/2)."""

    def __init__(self, in_channels, out_channels, layers: list[int], add_downsample, downsample_padding, resnet: dict,
                 transformer: dict | None):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels, **resnet)
            for i in range(len(layers))
        )
        self.attentions = spatial_transformers(out_channels, layers, **transformer) if transformer else None
        self.downsamplers = None
        if add_downsample:
            self.downsamplers = nn.ModuleList(
                [Downsample2D(out_channels, use_conv=True, out_channels=out_channels, padding=downsample_padding)]
            )
        self.gradient_checkpointing = False  # set by the model's enable_gradient_checkpointing()

    def forward(self, hidden_states, temb, encoder_hidden_states, skips: list[torch.Tensor], cross_attention_kwargs=None):
        for i, resnet in enumerate(self.resnets):
            hidden_states = checkpointed(self.gradient_checkpointing, resnet, hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states, encoder_hidden_states, cross_attention_kwargs)
            skips.append(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)  # (B, C, H, W) -> (B, C, H/2, W/2)
            skips.append(hidden_states)
        return hidden_states


class MidBlock(nn.Module):
    """The bottleneck at the lowest resolution (diffusers' UNetMidBlock2DCrossAttn): resnet, then
    (transformer, resnet) for each transformer."""

    def __init__(self, channels, layers: list[int], output_scale_factor, resnet: dict, transformer: dict):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels=channels, out_channels=channels, output_scale_factor=output_scale_factor, **resnet)
            for _ in range(len(layers) + 1)
        )
        self.attentions = spatial_transformers(channels, layers, **transformer)
        self.gradient_checkpointing = False

    def forward(self, hidden_states, temb, encoder_hidden_states, cross_attention_kwargs=None):
        hidden_states = checkpointed(self.gradient_checkpointing, self.resnets[0], hidden_states, temb)
        for attention, resnet in zip(self.attentions, self.resnets[1:]):
            hidden_states = attention(hidden_states, encoder_hidden_states, cross_attention_kwargs)
            hidden_states = checkpointed(self.gradient_checkpointing, resnet, hidden_states, temb)
        return hidden_states


class UpBlock(nn.Module):
    """One level of the way up: for each resnet, concatenate a skip popped from the stack, then the resnet (and
    a spatial transformer when `transformer` is given: diffusers' CrossAttnUpBlock2D; UpBlock2D without), then
    nearest-neighbour x2 and a 3x3 conv unless it is the last level. `in_channels[i]` is resnet i's input:
    what comes from below plus its skip's channels."""

    def __init__(self, in_channels: list[int], out_channels, layers: list[int], add_upsample, resnet: dict,
                 transformer: dict | None):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels=channels, out_channels=out_channels, **resnet) for channels in in_channels
        )
        self.attentions = spatial_transformers(out_channels, layers, **transformer) if transformer else None
        self.upsamplers = None
        if add_upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])
        self.gradient_checkpointing = False

    def forward(self, hidden_states, temb, encoder_hidden_states, skips: list[torch.Tensor], match_skip_size: bool = False,
                cross_attention_kwargs=None):
        for i, resnet in enumerate(self.resnets):
            hidden_states = torch.cat([hidden_states, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            hidden_states = checkpointed(self.gradient_checkpointing, resnet, hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states, encoder_hidden_states, cross_attention_kwargs)
        if self.upsamplers is not None:
            # an odd latent size: upsample to the size of the next skip instead of exactly x2
            size = tuple(skips[-1].shape[2:]) if match_skip_size else None
            hidden_states = self.upsamplers[0](hidden_states, size)  # (B, C, H, W) -> (B, C, 2H, 2W)
        return hidden_states


class UNet2DConditionModel(ModelMixin, AttentionMixin, LoraAdapterMixin):
    """SD's conditional UNet: eps_pred = unet(z_t, t, encoder_hidden_states=c).sample (see the module docstring)."""

    _supports_gradient_checkpointing = True

    # Config fields of diffusers' UNet2DConditionModel for features SD 1.x/2.x do not use: accepted at these
    # values (every SD 1.x/2.x config.json has them), refused otherwise (configuration.py).
    _refused_config = {
        "reverse_transformer_layers_per_block": None,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "dual_cross_attention": False,
        "class_embed_type": None,
        "addition_embed_type": None,
        "addition_time_embed_dim": None,
        "resnet_skip_time_act": False,
        "resnet_out_scale_factor": 1.0,
        "time_embedding_type": "positional",
        "timestep_post_act": None,
        "projection_class_embeddings_input_dim": None,
        "attention_type": "default",
        "class_embeddings_concat": False,
        "mid_block_only_cross_attention": None,
        "cross_attention_norm": None,
        "addition_embed_type_num_heads": 64,
    }

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        only_cross_attention: bool | tuple[bool, ...] = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int | tuple[int, ...] = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1.0,
        dropout: float = 0.0,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int | tuple[int, ...] = 1280,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        attention_head_dim: int | tuple[int, ...] = 8,
        num_attention_heads: int | tuple[int, ...] | None = None,
        use_linear_projection: bool = False,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        time_embedding_dim: int | None = None,
        time_embedding_act_fn: str | None = None,
        conv_in_kernel: int = 3,
        conv_out_kernel: int = 3,
        time_cond_proj_dim: int | None = None,
    ):
        super().__init__()
        self.sample_size = sample_size  # a plain attribute as in diffusers (read without the deprecation warning)
        num_blocks = len(block_out_channels)
        _check_block_types(down_block_types, up_block_types, mid_block_type, block_out_channels, norm_num_groups)
        if num_attention_heads is not None:
            raise ValueError(
                "num_attention_heads cannot be set: as in diffusers, SD configs give the number of heads per block "
                "in `attention_head_dim` (a naming kept from the first SD configs). Put the head counts there instead."
            )
        heads = _per_block("attention_head_dim", attention_head_dim, num_blocks)
        only_cross = _per_block("only_cross_attention", only_cross_attention, num_blocks)
        context_dims = _per_block("cross_attention_dim", cross_attention_dim, num_blocks)
        layers = _per_block("layers_per_block", layers_per_block, num_blocks)
        transformer_layers = _per_block("transformer_layers_per_block", transformer_layers_per_block, num_blocks)
        if not all(isinstance(n, int) for n in transformer_layers):
            raise NotImplementedError(
                f"transformer_layers_per_block {transformer_layers_per_block!r}: per-layer (nested) lists are not "
                "implemented in minidiff; give one int for all blocks or one int per block"
            )
        self.num_upsamplers = num_blocks - 1

        # input: z_t (B, in_channels, H, W) -> (B, C0, H, W)
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], conv_in_kernel, padding=(conv_in_kernel - 1) // 2)

        # time: t -> sinusoid (B, C0) -> MLP (B, time_embed_dim), with time_embed_dim = 4 * C0 by default
        time_embed_dim = time_embedding_dim or block_out_channels[0] * 4
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        # time_cond_proj_dim: LCM's guidance embedding w (B, time_cond_proj_dim) enters here (`timestep_cond`)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim, act_fn=act_fn,
                                                cond_proj_dim=time_cond_proj_dim)
        # optional class conditioning: a learned embedding per class label, added to temb
        self.class_embedding = nn.Embedding(num_class_embeds, time_embed_dim) if num_class_embeds is not None else None
        self.time_embed_act = get_activation(time_embedding_act_fn) if time_embedding_act_fn is not None else None

        resnet = dict(temb_channels=time_embed_dim, groups=norm_num_groups, eps=norm_eps, non_linearity=act_fn,
                      time_embedding_norm=resnet_time_scale_shift, dropout=dropout)

        def transformer(block: int, with_cross_attention: bool) -> dict | None:
            if not with_cross_attention:
                return None
            return dict(heads=heads[block], norm_num_groups=norm_num_groups, cross_attention_dim=context_dims[block],
                        use_linear_projection=use_linear_projection, only_cross_attention=only_cross[block],
                        upcast_attention=upcast_attention)

        # the way down: every resnet's and downsampler's output channels go on the skip stack
        skip_channels = [block_out_channels[0]]  # conv_in's output
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()  # filled below; registered before mid_block, as in diffusers (module order)
        channels = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            is_last = i == num_blocks - 1
            self.down_blocks.append(DownBlock(
                channels, block_out_channels[i], [transformer_layers[i]] * layers[i], not is_last, downsample_padding,
                resnet, transformer(i, DOWN_BLOCK_TYPES[block_type]),
            ))
            channels = block_out_channels[i]
            skip_channels += [channels] * (layers[i] + (0 if is_last else 1))

        self.mid_block = None
        if mid_block_type is not None:
            mid_transformer = transformer(num_blocks - 1, True)
            mid_transformer.pop("only_cross_attention")  # diffusers' mid block has no such option
            self.mid_block = MidBlock(channels, [transformer_layers[-1]], mid_block_scale_factor, resnet, mid_transformer)

        # the way up: one more resnet per level than on the way down, each taking a skip off the stack
        for i, block_type in enumerate(up_block_types):
            j = num_blocks - 1 - i  # the down level this up level mirrors
            in_channels_of_resnets = []
            for _ in range(layers[j] + 1):
                in_channels_of_resnets.append(channels + skip_channels.pop())
                channels = block_out_channels[j]
            self.up_blocks.append(UpBlock(
                in_channels_of_resnets, block_out_channels[j], [transformer_layers[j]] * (layers[j] + 1), j > 0,
                resnet, transformer(j, UP_BLOCK_TYPES[block_type]),
            ))

        # output: (B, C0, H, W) -> (B, out_channels, H, W)
        self.conv_norm_out = nn.GroupNorm(num_groups=norm_num_groups, num_channels=block_out_channels[0], eps=norm_eps)
        self.conv_act = get_activation(act_fn)
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, conv_out_kernel, padding=(conv_out_kernel - 1) // 2)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
        *,
        timestep_cond: torch.Tensor | None = None,
        cross_attention_kwargs: dict | None = None,
    ) -> UNet2DConditionOutput | tuple:
        """eps_theta(z_t, t, c).

        sample: z_t (B, in_channels, H, W); timestep: a number, a 0-d tensor, or a (B,) / (1,) tensor;
        encoder_hidden_states: c (B, tokens, cross_attention_dim), e.g. CLIP's (B, 77, 768).
        cross_attention_kwargs: keyword arguments for every attention processor (see attention_processor.py).
        timestep_cond: (B, time_cond_proj_dim), the guidance-scale embedding of LCM-distilled UNets
        (`guidance_scale_embedding` in pipelines/latent_consistency.py); only when the config has time_cond_proj_dim.
        Returns UNet2DConditionOutput(sample=(B, out_channels, H, W)), or a 1-tuple with return_dict=False.
        """
        self._check_inputs(sample, encoder_hidden_states, class_labels)
        cross_attention_kwargs, scale = _split_lora_scale(cross_attention_kwargs)
        with lora_scale(self, scale):  # the LoRA layers' scale for this call (models/lora.py)
            sample = self._forward(sample, timestep, encoder_hidden_states, class_labels, cross_attention_kwargs,
                                   timestep_cond)
        return UNet2DConditionOutput(sample=sample) if return_dict else (sample,)

    def _forward(self, sample, timestep, encoder_hidden_states, class_labels, cross_attention_kwargs,
                 timestep_cond=None) -> torch.Tensor:
        # Latents whose size is not a multiple of 2**num_upsamplers: each upsampler resizes to its skip's size.
        odd_size = any(size % 2**self.num_upsamplers != 0 for size in sample.shape[-2:])
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        # 1. time embedding
        timesteps = timesteps_for_batch(timestep, sample)  # (B,)
        t_emb = self.time_proj(timesteps).to(dtype=sample.dtype)  # (B, C0), computed in float32
        emb = self.time_embedding(t_emb, timestep_cond)  # (B, time_embed_dim)
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(class_labels).to(dtype=sample.dtype)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)

        # 2. down: every intermediate feature map goes on the skip stack
        sample = self.conv_in(sample)  # (B, 4, 64, 64) -> (B, 320, 64, 64) for SD 1.5
        skips = [sample]
        for block in self.down_blocks:
            sample = block(sample, emb, encoder_hidden_states, skips, cross_attention_kwargs)

        # 3. middle
        if self.mid_block is not None:
            sample = self.mid_block(sample, emb, encoder_hidden_states, cross_attention_kwargs)  # (B, 1280, 8, 8) for SD 1.5

        # 4. up: each resnet takes the last skip off the stack
        for block in self.up_blocks:
            sample = block(sample, emb, encoder_hidden_states, skips, odd_size, cross_attention_kwargs)

        # 5. output
        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))  # (B, 320, 64, 64) -> (B, 4, 64, 64)
        return sample

    def _check_inputs(self, sample, encoder_hidden_states, class_labels) -> None:
        config = self.config
        if sample.ndim != 4 or sample.shape[1] != config.in_channels:
            raise ValueError(f"sample must be latents of shape (B, {config.in_channels}, H, W), got {tuple(sample.shape)}")
        if encoder_hidden_states is None or encoder_hidden_states.ndim != 3:
            found = None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)
            raise ValueError(
                f"encoder_hidden_states must be the text encoder's hidden states, shape (B, tokens, "
                f"cross_attention_dim), got {found}"
            )
        if encoder_hidden_states.shape[0] != sample.shape[0]:
            raise ValueError(
                f"encoder_hidden_states has batch {encoder_hidden_states.shape[0]} but sample has batch "
                f"{sample.shape[0]}; repeat the text embeddings to the latents' batch (e.g. for CFG, cat uncond and cond)"
            )
        if self.class_embedding is not None and class_labels is None:
            raise ValueError("this UNet is class-conditional (num_class_embeds is set): pass class_labels (B,)")


def _split_lora_scale(cross_attention_kwargs: dict | None) -> tuple[dict | None, float]:
    """diffusers' UNet takes `cross_attention_kwargs["scale"]` as the scale of its LoRA layers (default 1.0) and does
    not pass it on to the attention processors."""
    if not cross_attention_kwargs or "scale" not in cross_attention_kwargs:
        return cross_attention_kwargs, 1.0
    cross_attention_kwargs = dict(cross_attention_kwargs)
    return cross_attention_kwargs, cross_attention_kwargs.pop("scale")


def _per_block(name: str, value, num_blocks: int) -> list:
    """A config field given once for all blocks (int/bool) or once per block (list), as a per-block list."""
    if isinstance(value, (list, tuple)):
        if len(value) != num_blocks:
            raise ValueError(
                f"{name} {list(value)} gives {len(value)} values but the UNet has {num_blocks} blocks "
                "(len(block_out_channels)); give one value per block or a single value"
            )
        return list(value)
    return [value] * num_blocks


def _check_block_types(down_block_types, up_block_types, mid_block_type, block_out_channels, norm_num_groups) -> None:
    if len(down_block_types) != len(block_out_channels) or len(up_block_types) != len(block_out_channels):
        raise ValueError(
            f"down_block_types ({len(down_block_types)}), up_block_types ({len(up_block_types)}) and "
            f"block_out_channels ({len(block_out_channels)}) must have the same length: one entry per resolution"
        )
    for kind, types, known in (("down", down_block_types, DOWN_BLOCK_TYPES), ("up", up_block_types, UP_BLOCK_TYPES)):
        for block_type in types:
            if block_type not in known:
                raise NotImplementedError(
                    f"{kind} block type {block_type!r} is not implemented in minidiff; SD 1.x/2.x use {sorted(known)}"
                )
    if mid_block_type is not None and mid_block_type not in MID_BLOCK_TYPES:
        raise NotImplementedError(
            f"mid_block_type {mid_block_type!r} is not implemented in minidiff; SD 1.x/2.x use 'UNetMidBlock2DCrossAttn'"
        )
    if norm_num_groups is None:
        raise NotImplementedError("norm_num_groups=None is not implemented in minidiff; SD 1.x/2.x use 32")
