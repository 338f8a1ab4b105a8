"""The denoising UNet of Stable Diffusion 1.x / 2.x: eps_theta(z_t, t, c) (Rombach et al. 2022, arXiv 2112.10752).

The latent diffusion model's network predicts the noise eps in a latent z_t (LDM eq. 2):

    L = E[ || eps - eps_theta(z_t, t, tau_theta(y)) ||^2 ]

with the text condition c = tau_theta(y) (CLIP's last hidden states, (B, 77, 768) for SD 1.5) entering
through cross-attention in the spatial transformers. With SD 1.5's config, a batch flows as

    z_t (B, 4, 64, 64) --conv_in--> (B, 320, 64, 64)                     t --sinusoid--> (B, 320)
                                                                           --time_embedding--> temb (B, 1280)
    down_blocks  (each: resnet [+ transformer] x2, then a stride-2 conv, except the last)
      0 CrossAttnDownBlock2D  (B, 320, 64, 64)  -> (B, 320, 32, 32)
      1 CrossAttnDownBlock2D  (B, 320, 32, 32)  -> (B, 640, 16, 16)
      2 CrossAttnDownBlock2D  (B, 640, 16, 16)  -> (B, 1280, 8, 8)
      3 DownBlock2D           (B, 1280, 8, 8)   -> (B, 1280, 8, 8)
    mid_block  UNetMidBlock2DCrossAttn: resnet, transformer, resnet at (B, 1280, 8, 8)
    up_blocks  (each: resnet [+ transformer] x3, every resnet taking one skip by concatenation,
                then nearest x2 + conv, except the last)
      0 UpBlock2D             (B, 1280, 8, 8)   -> (B, 1280, 16, 16)
      1 CrossAttnUpBlock2D    (B, 1280, 16, 16) -> (B, 1280, 32, 32)
      2 CrossAttnUpBlock2D    (B, 1280, 32, 32) -> (B, 640, 64, 64)
      3 CrossAttnUpBlock2D    (B, 640, 64, 64)  -> (B, 320, 64, 64)
    conv_norm_out, SiLU, conv_out: (B, 320, 64, 64) -> eps_pred (B, 4, 64, 64)

Usage, as in diffusers:

    unet = UNet2DConditionModel.from_pretrained("path/to/stable-diffusion-v1-5", subfolder="unet")
    eps = unet(latents, t, encoder_hidden_states=text_embeddings).sample

The config uses diffusers' field names, so SD 1.x's and SD 2.x's `unet/config.json` read as they
are. One naming quirk is kept for compatibility: `attention_head_dim` is the NUMBER OF HEADS of each
block (8 for SD 1.5, [5, 10, 20, 20] for SD 2.x); each head has out_channels // heads channels.

The blocks below (DownBlock2D, UpBlock2D, ...) take the same arguments as diffusers' blocks of the
same name and every block's forward takes (hidden_states, temb, encoder_hidden_states), which a
block without attention ignores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minidiff.configuration import register_to_config
from minidiff.models.attention import Transformer2DModel
from minidiff.models.layers import Downsample2D, ResnetBlock2D, TimestepEmbedding, Timesteps, Upsample2D, get_activation
from minidiff.models.modeling import ModelMixin
from minidiff.utils.outputs import BaseOutput


@dataclass
class UNet2DConditionOutput(BaseOutput):
    """What the UNet returns: `sample`, the predicted noise (or v, or x0, per the scheduler's prediction_type)."""

    sample: torch.Tensor


# ----- down blocks ----------------------------------------------------------------------------------


class DownBlock2D(nn.Module):
    """`num_layers` ResnetBlock2Ds, then (unless last) a stride-2 conv. Returns the output and every
    intermediate feature map, which the up path takes back as skip connections."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int = 1,
        add_downsample: bool = True,
        downsample_padding: int = 1,
        dropout: float = 0.0,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_time_scale_shift: str = "default",
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(
                in_channels=in_channels if i == 0 else out_channels,
                out_channels=out_channels,
                temb_channels=temb_channels,
                groups=resnet_groups,
                eps=resnet_eps,
                non_linearity=resnet_act_fn,
                time_embedding_norm=resnet_time_scale_shift,
                dropout=dropout,
            )
            for i in range(num_layers)
        )
        self.downsamplers = None
        if add_downsample:
            self.downsamplers = nn.ModuleList(
                [Downsample2D(out_channels, use_conv=True, out_channels=out_channels, padding=downsample_padding)]
            )

    def forward(self, hidden_states, temb, encoder_hidden_states=None):
        skips = []
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb)
            skips.append(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)  # (B, C, H, W) -> (B, C, H/2, W/2)
            skips.append(hidden_states)
        return hidden_states, skips


class CrossAttnDownBlock2D(nn.Module):
    """Like DownBlock2D, with a spatial transformer (self-attention, cross-attention to the text,
    feed-forward) after each resnet."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int = 1,
        transformer_layers_per_block: int | list[int] = 1,
        add_downsample: bool = True,
        downsample_padding: int = 1,
        dropout: float = 0.0,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_time_scale_shift: str = "default",
        num_attention_heads: int = 1,
        cross_attention_dim: int = 1280,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
    ):
        super().__init__()
        layers = _per_layer(transformer_layers_per_block, num_layers)
        self.resnets = nn.ModuleList(
            ResnetBlock2D(
                in_channels=in_channels if i == 0 else out_channels,
                out_channels=out_channels,
                temb_channels=temb_channels,
                groups=resnet_groups,
                eps=resnet_eps,
                non_linearity=resnet_act_fn,
                time_embedding_norm=resnet_time_scale_shift,
                dropout=dropout,
            )
            for i in range(num_layers)
        )
        self.attentions = nn.ModuleList(
            Transformer2DModel(
                num_attention_heads,
                out_channels // num_attention_heads,
                in_channels=out_channels,
                num_layers=layers[i],
                norm_num_groups=resnet_groups,
                cross_attention_dim=cross_attention_dim,
                use_linear_projection=use_linear_projection,
                only_cross_attention=only_cross_attention,
                upcast_attention=upcast_attention,
            )
            for i in range(num_layers)
        )
        self.downsamplers = None
        if add_downsample:
            self.downsamplers = nn.ModuleList(
                [Downsample2D(out_channels, use_conv=True, out_channels=out_channels, padding=downsample_padding)]
            )

    def forward(self, hidden_states, temb, encoder_hidden_states=None):
        skips = []
        for resnet, attention in zip(self.resnets, self.attentions):
            hidden_states = resnet(hidden_states, temb)
            hidden_states = attention(hidden_states, encoder_hidden_states)
            skips.append(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)  # (B, C, H, W) -> (B, C, H/2, W/2)
            skips.append(hidden_states)
        return hidden_states, skips


# ----- middle block ---------------------------------------------------------------------------------


class UNetMidBlock2DCrossAttn(nn.Module):
    """The bottleneck at the lowest resolution: resnet, then (transformer, resnet) x num_layers."""

    def __init__(
        self,
        in_channels: int,
        temb_channels: int,
        num_layers: int = 1,
        transformer_layers_per_block: int | list[int] = 1,
        dropout: float = 0.0,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_time_scale_shift: str = "default",
        output_scale_factor: float = 1.0,
        num_attention_heads: int = 1,
        cross_attention_dim: int = 1280,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
    ):
        super().__init__()
        layers = _per_layer(transformer_layers_per_block, num_layers)
        self.resnets = nn.ModuleList(
            ResnetBlock2D(
                in_channels=in_channels,
                out_channels=in_channels,
                temb_channels=temb_channels,
                groups=resnet_groups,
                eps=resnet_eps,
                non_linearity=resnet_act_fn,
                time_embedding_norm=resnet_time_scale_shift,
                dropout=dropout,
                output_scale_factor=output_scale_factor,
            )
            for _ in range(num_layers + 1)
        )
        self.attentions = nn.ModuleList(
            Transformer2DModel(
                num_attention_heads,
                in_channels // num_attention_heads,
                in_channels=in_channels,
                num_layers=layers[i],
                norm_num_groups=resnet_groups,
                cross_attention_dim=cross_attention_dim,
                use_linear_projection=use_linear_projection,
                upcast_attention=upcast_attention,
            )
            for i in range(num_layers)
        )

    def forward(self, hidden_states, temb, encoder_hidden_states=None):
        hidden_states = self.resnets[0](hidden_states, temb)
        for attention, resnet in zip(self.attentions, self.resnets[1:]):
            hidden_states = attention(hidden_states, encoder_hidden_states)
            hidden_states = resnet(hidden_states, temb)
        return hidden_states


# ----- up blocks ------------------------------------------------------------------------------------


class UpBlock2D(nn.Module):
    """`num_layers` ResnetBlock2Ds, each fed [hidden_states, skip] concatenated on channels (the
    skips are taken last-in first-out), then (unless last) nearest-neighbour x2 and a 3x3 conv.

    `prev_output_channel` is what comes from below, `in_channels` the channels of the block's last skip.
    """

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int = 1,
        add_upsample: bool = True,
        dropout: float = 0.0,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_time_scale_shift: str = "default",
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(
                in_channels=_up_resnet_in_channels(i, num_layers, in_channels, prev_output_channel, out_channels),
                out_channels=out_channels,
                temb_channels=temb_channels,
                groups=resnet_groups,
                eps=resnet_eps,
                non_linearity=resnet_act_fn,
                time_embedding_norm=resnet_time_scale_shift,
                dropout=dropout,
            )
            for i in range(num_layers)
        )
        self.upsamplers = None
        if add_upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])

    def forward(self, hidden_states, skips, temb, encoder_hidden_states=None, upsample_size=None):
        for resnet in self.resnets:
            hidden_states = torch.cat([hidden_states, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            hidden_states = resnet(hidden_states, temb)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, upsample_size)  # (B, C, H, W) -> (B, C, 2H, 2W)
        return hidden_states


class CrossAttnUpBlock2D(nn.Module):
    """Like UpBlock2D, with a spatial transformer after each resnet."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int = 1,
        transformer_layers_per_block: int | list[int] = 1,
        add_upsample: bool = True,
        dropout: float = 0.0,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_time_scale_shift: str = "default",
        num_attention_heads: int = 1,
        cross_attention_dim: int = 1280,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
    ):
        super().__init__()
        layers = _per_layer(transformer_layers_per_block, num_layers)
        self.resnets = nn.ModuleList(
            ResnetBlock2D(
                in_channels=_up_resnet_in_channels(i, num_layers, in_channels, prev_output_channel, out_channels),
                out_channels=out_channels,
                temb_channels=temb_channels,
                groups=resnet_groups,
                eps=resnet_eps,
                non_linearity=resnet_act_fn,
                time_embedding_norm=resnet_time_scale_shift,
                dropout=dropout,
            )
            for i in range(num_layers)
        )
        self.attentions = nn.ModuleList(
            Transformer2DModel(
                num_attention_heads,
                out_channels // num_attention_heads,
                in_channels=out_channels,
                num_layers=layers[i],
                norm_num_groups=resnet_groups,
                cross_attention_dim=cross_attention_dim,
                use_linear_projection=use_linear_projection,
                only_cross_attention=only_cross_attention,
                upcast_attention=upcast_attention,
            )
            for i in range(num_layers)
        )
        self.upsamplers = None
        if add_upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])

    def forward(self, hidden_states, skips, temb, encoder_hidden_states=None, upsample_size=None):
        for resnet, attention in zip(self.resnets, self.attentions):
            hidden_states = torch.cat([hidden_states, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            hidden_states = resnet(hidden_states, temb)
            hidden_states = attention(hidden_states, encoder_hidden_states)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, upsample_size)  # (B, C, H, W) -> (B, C, 2H, 2W)
        return hidden_states


def _up_resnet_in_channels(i: int, num_layers: int, in_channels: int, prev_output_channel: int, out_channels: int):
    """Input channels of an up block's i-th resnet: (what comes from below or from resnet i-1) + (its skip)."""
    from_below = prev_output_channel if i == 0 else out_channels
    skip = in_channels if i == num_layers - 1 else out_channels
    return from_below + skip


def _per_layer(value: int | list[int], num_layers: int) -> list[int]:
    """`transformer_layers_per_block` for one block: an int for every layer, or one int per layer."""
    if isinstance(value, int):
        return [value] * num_layers
    if len(value) != num_layers or not all(isinstance(v, int) for v in value):
        raise ValueError(f"transformer_layers_per_block {value!r} must give one int per layer ({num_layers} layers)")
    return list(value)


DOWN_BLOCKS = {"DownBlock2D": DownBlock2D, "CrossAttnDownBlock2D": CrossAttnDownBlock2D}
UP_BLOCKS = {"UpBlock2D": UpBlock2D, "CrossAttnUpBlock2D": CrossAttnUpBlock2D}
MID_BLOCKS = {"UNetMidBlock2DCrossAttn": UNetMidBlock2DCrossAttn}

# Config fields of diffusers' UNet2DConditionModel for features SD 1.x/2.x do not use; they are read from
# config.json, and any value other than this default raises NotImplementedError.
_NOT_IMPLEMENTED = {
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
    "time_cond_proj_dim": None,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}


# ----- the UNet -------------------------------------------------------------------------------------


class UNet2DConditionModel(ModelMixin):
    """SD's conditional UNet: eps_pred = unet(z_t, t, encoder_hidden_states=c).sample (see the module docstring)."""

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
        reverse_transformer_layers_per_block: tuple[tuple[int, ...], ...] | None = None,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int | tuple[int, ...] = 8,
        num_attention_heads: int | tuple[int, ...] | None = None,
        dual_cross_attention: bool = False,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        resnet_skip_time_act: bool = False,
        resnet_out_scale_factor: float = 1.0,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        time_embedding_act_fn: str | None = None,
        timestep_post_act: str | None = None,
        time_cond_proj_dim: int | None = None,
        conv_in_kernel: int = 3,
        conv_out_kernel: int = 3,
        projection_class_embeddings_input_dim: int | None = None,
        attention_type: str = "default",
        class_embeddings_concat: bool = False,
        mid_block_only_cross_attention: bool | None = None,
        cross_attention_norm: str | None = None,
        addition_embed_type_num_heads: int = 64,
    ):
        super().__init__()
        self.sample_size = sample_size  # a plain attribute as in diffusers (read without the deprecation warning)
        _check_not_implemented(locals())
        num_blocks = len(block_out_channels)
        _check_block_config(down_block_types, up_block_types, mid_block_type, block_out_channels, norm_num_groups)
        # diffusers' naming quirk: without num_attention_heads, `attention_head_dim` is the number of heads.
        if num_attention_heads is not None:
            raise ValueError(
                "num_attention_heads cannot be set: as in diffusers, SD configs give the number of heads per block "
                "in `attention_head_dim` (see huggingface/diffusers#2011). Put the head counts there instead."
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
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim, act_fn=act_fn)
        # optional class conditioning: a learned embedding per class label, added to temb
        self.class_embedding = nn.Embedding(num_class_embeds, time_embed_dim) if num_class_embeds is not None else None
        self.time_embed_act = get_activation(time_embedding_act_fn) if time_embedding_act_fn is not None else None

        common = dict(
            temb_channels=time_embed_dim,
            dropout=dropout,
            resnet_eps=norm_eps,
            resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups,
            resnet_time_scale_shift=resnet_time_scale_shift,
        )
        attention = dict(use_linear_projection=use_linear_projection, upcast_attention=upcast_attention)

        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(down_block_types):
            block_args = dict(
                in_channels=block_out_channels[max(i - 1, 0)],
                out_channels=block_out_channels[i],
                num_layers=layers[i],
                add_downsample=i < num_blocks - 1,
                downsample_padding=downsample_padding,
                **common,
            )
            if block_type == "CrossAttnDownBlock2D":
                block_args.update(
                    transformer_layers_per_block=transformer_layers[i],
                    num_attention_heads=heads[i],
                    cross_attention_dim=context_dims[i],
                    only_cross_attention=only_cross[i],
                    **attention,
                )
            self.down_blocks.append(DOWN_BLOCKS[block_type](**block_args))

        self.mid_block = None
        if mid_block_type is not None:
            self.mid_block = UNetMidBlock2DCrossAttn(
                in_channels=block_out_channels[-1],
                transformer_layers_per_block=transformer_layers[-1],
                output_scale_factor=mid_block_scale_factor,
                num_attention_heads=heads[-1],
                cross_attention_dim=context_dims[-1],
                **attention,
                **common,
            )

        self.up_blocks = nn.ModuleList()
        reversed_channels = list(reversed(block_out_channels))
        for i, block_type in enumerate(up_block_types):
            j = num_blocks - 1 - i  # the down block this up block mirrors
            block_args = dict(
                in_channels=reversed_channels[min(i + 1, num_blocks - 1)],
                prev_output_channel=reversed_channels[max(i - 1, 0)],
                out_channels=reversed_channels[i],
                num_layers=layers[j] + 1,
                add_upsample=i < num_blocks - 1,
                **common,
            )
            if block_type == "CrossAttnUpBlock2D":
                block_args.update(
                    transformer_layers_per_block=transformer_layers[j],
                    num_attention_heads=heads[j],
                    cross_attention_dim=context_dims[j],
                    only_cross_attention=only_cross[j],
                    **attention,
                )
            self.up_blocks.append(UP_BLOCKS[block_type](**block_args))

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
    ) -> UNet2DConditionOutput | tuple:
        """eps_theta(z_t, t, c).

        sample: z_t (B, in_channels, H, W); timestep: a number, a 0-d tensor, or a (B,) / (1,) tensor;
        encoder_hidden_states: c (B, tokens, cross_attention_dim), e.g. CLIP's (B, 77, 768).
        Returns UNet2DConditionOutput(sample=(B, out_channels, H, W)), or a 1-tuple with return_dict=False.
        """
        self._check_inputs(sample, encoder_hidden_states, class_labels)
        # Latents whose size is not a multiple of 2**num_upsamplers: each upsampler resizes to its skip's size.
        odd_size = any(size % 2**self.num_upsamplers != 0 for size in sample.shape[-2:])
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        # 1. time embedding
        timesteps = _timesteps_for_batch(timestep, sample)  # (B,)
        t_emb = self.time_proj(timesteps).to(dtype=sample.dtype)  # (B, C0), computed in float32
        emb = self.time_embedding(t_emb)  # (B, time_embed_dim)
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(class_labels).to(dtype=sample.dtype)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)

        # 2. down: keep every intermediate feature map as a skip connection
        sample = self.conv_in(sample)  # (B, 4, 64, 64) -> (B, 320, 64, 64) for SD 1.5
        skips = [sample]
        for block in self.down_blocks:
            sample, block_skips = block(sample, emb, encoder_hidden_states)
            skips.extend(block_skips)

        # 3. middle
        if self.mid_block is not None:
            sample = self.mid_block(sample, emb, encoder_hidden_states)  # (B, 1280, 8, 8) for SD 1.5

        # 4. up: each up block takes back as many skips as it has resnets, last-in first-out
        for i, block in enumerate(self.up_blocks):
            block_skips = skips[len(skips) - len(block.resnets):]
            del skips[len(skips) - len(block.resnets):]
            upsample_size = tuple(skips[-1].shape[2:]) if odd_size and i < len(self.up_blocks) - 1 else None
            sample = block(sample, block_skips, emb, encoder_hidden_states, upsample_size=upsample_size)

        # 5. output
        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))  # (B, 320, 64, 64) -> (B, 4, 64, 64)
        return UNet2DConditionOutput(sample=sample) if return_dict else (sample,)

    def _check_inputs(self, sample, encoder_hidden_states, class_labels) -> None:
        config = self.config
        if sample.ndim != 4 or sample.shape[1] != config.in_channels:
            raise ValueError(
                f"sample must be latents of shape (B, {config.in_channels}, H, W), got {tuple(sample.shape)}"
            )
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


def _timesteps_for_batch(timestep, sample: torch.Tensor) -> torch.Tensor:
    """A python number, a 0-d tensor, or a (1,) / (B,) tensor -> a (B,) tensor on the sample's device."""
    batch = sample.shape[0]
    if not torch.is_tensor(timestep):
        timestep = torch.tensor([timestep], device=sample.device)
    timestep = timestep.to(sample.device).reshape(-1) if timestep.ndim == 0 else timestep.to(sample.device)
    if timestep.ndim != 1 or timestep.shape[0] not in (1, batch):
        raise ValueError(
            f"timestep must be a number, a 0-d tensor, or a tensor of shape (1,) or (batch={batch},); "
            f"got shape {tuple(timestep.shape)}"
        )
    return timestep.expand(batch)


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


def _check_block_config(down_block_types, up_block_types, mid_block_type, block_out_channels, norm_num_groups) -> None:
    if len(down_block_types) != len(block_out_channels) or len(up_block_types) != len(block_out_channels):
        raise ValueError(
            f"down_block_types ({len(down_block_types)}), up_block_types ({len(up_block_types)}) and "
            f"block_out_channels ({len(block_out_channels)}) must have the same length: one entry per resolution"
        )
    for kind, types, known in (("down", down_block_types, DOWN_BLOCKS), ("up", up_block_types, UP_BLOCKS)):
        for block_type in types:
            if block_type not in known:
                raise NotImplementedError(
                    f"{kind} block type {block_type!r} is not implemented in minidiff; SD 1.x/2.x use {sorted(known)}"
                )
    if mid_block_type is not None and mid_block_type not in MID_BLOCKS:
        raise NotImplementedError(
            f"mid_block_type {mid_block_type!r} is not implemented in minidiff; SD 1.x/2.x use 'UNetMidBlock2DCrossAttn'"
        )
    if norm_num_groups is None:
        raise NotImplementedError("norm_num_groups=None is not implemented in minidiff; SD 1.x/2.x use 32")


def _check_not_implemented(arguments: dict) -> None:
    for name, default in _NOT_IMPLEMENTED.items():
        if arguments[name] != default:
            raise NotImplementedError(
                f"UNet2DConditionModel config field {name}={arguments[name]!r} is not implemented in minidiff "
                f"(SD 1.x/2.x leave it at {default!r}); remove it from the config or set it to {default!r}"
            )
