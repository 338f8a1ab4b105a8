"""UNet2DModel: the unconditional pixel-space UNet of DDPM (Ho et al. 2020, arXiv 2006.11239, appendix B).

The network predicts the noise in a noisy image, eps_theta(x_t, t), for the DDPM loss (eq. 14)

    L_simple = E_{t, x_0, eps} || eps - eps_theta( sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t ) ||^2

Its shape is the PixelCNN++ / Wide-ResNet UNet of the paper:

    x_t (B, 3, H, W) --conv_in--> (B, C0, H, W)
    down_blocks:  per level, `layers_per_block` ResnetBlock2D (+ self-attention in AttnDownBlock2D),
                  then a stride-2 conv, except at the last level          (B, C_i, H/2^i, W/2^i)
    mid_block:    resnet, self-attention, resnet at the lowest resolution
    up_blocks:    per level, `layers_per_block + 1` resnets, each fed the concatenation with one
                  down-path activation popped off the skip stack (the U's skip connections, last in
                  first out, as in UNet2DConditionModel), then a nearest x2 + conv
    conv_norm_out, SiLU, conv_out                                          (B, 3, H, W)

Every resnet also receives the timestep embedding temb = MLP(sinusoid(t)) (Transformer positional
encoding of t, Vaswani et al. 2017, section 3.5), and the self-attention is single-head by default
(`attention_head_dim=None`: one head as wide as the channels), at 16x16 resolution in DDPM.

Config fields and parameter names are diffusers' `UNet2DModel`, so `google/ddpm-cat-256` (and the
other `google/ddpm-*` checkpoints) load as they are. Supported block types: DownBlock2D,
AttnDownBlock2D, UpBlock2D, AttnUpBlock2D (the skip/score-SDE blocks of NCSN++ are not).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from minidiff.configuration import check_choice, register_to_config
from minidiff.models.attention import Attention
from minidiff.models.attention_processor import AttentionMixin
from minidiff.models.layers import (
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Timesteps,
    Upsample2D,
    checkpointed,
    timesteps_for_batch,
)
from minidiff.models.modeling import ModelMixin
from minidiff.utils.outputs import BaseOutput


@dataclass
class UNet2DOutput(BaseOutput):
    """`model(x, t).sample`: the prediction, shaped like the input (B, C_out, H, W)."""

    sample: torch.Tensor


# ----- embeddings ------------------------------------------------------------------------------------


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of the noise level (Tancik et al. 2020; used by score-SDE, Song et al. 2021):

        gamma(sigma) = [sin(2 pi W log(sigma)), cos(2 pi W log(sigma))],   W ~ N(0, scale^2), fixed.

    `weight` (the W above) is a frozen parameter stored in the checkpoint. (N,) -> (N, 2 * embedding_size).
    """

    def __init__(self, embedding_size: int = 256, scale: float = 1.0, log: bool = True, flip_sin_to_cos: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)
        self.log = log
        self.flip_sin_to_cos = flip_sin_to_cos

    def forward(self, noise_level: torch.Tensor) -> torch.Tensor:
        if self.log:
            noise_level = torch.log(noise_level)
        angles = noise_level[:, None] * self.weight[None, :] * 2 * math.pi  # (N, embedding_size)
        if self.flip_sin_to_cos:
            return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


# ----- blocks ----------------------------------------------------------------------------------------


class ResamplingResnetBlock2D(ResnetBlock2D):
    """A ResnetBlock2D that halves (`down`) or doubles (`up`) the resolution inside the block, as BigGAN
    (Brock et al. 2019) does: `downsample_type="resnet"` / `upsample_type="resnet"` use it instead of a conv.

        h = act(norm1(x));  x, h = resample(x), resample(h)      (2x2 average pool, or nearest x2)
        then the ResnetBlock2D computation from conv1 on.
    """

    def __init__(self, *, down: bool = False, up: bool = False, **resnet_arguments):
        super().__init__(**resnet_arguments)
        channels = resnet_arguments["in_channels"]
        self.resample = Downsample2D(channels, use_conv=False) if down else Upsample2D(channels, use_conv=False)

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        hidden_states = self.nonlinearity(self.norm1(input_tensor))
        input_tensor, hidden_states = self.resample(input_tensor), self.resample(hidden_states)  # (B, C, H', W')
        hidden_states = self.conv1(hidden_states)
        temb = self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]  # (B, C_out or 2*C_out, 1, 1)
        if self.time_embedding_norm == "scale_shift":
            time_scale, time_shift = temb.chunk(2, dim=1)
            hidden_states = self.norm2(hidden_states) * (1 + time_scale) + time_shift
        else:
            hidden_states = self.norm2(hidden_states + temb)
        hidden_states = self.conv2(self.dropout(self.nonlinearity(hidden_states)))
        return (self.shortcut(input_tensor) + hidden_states) / self.output_scale_factor


def spatial_self_attention(channels: int, head_dim: int | None, groups: int | None, eps: float, rescale: float = 1.0):
    """DDPM's self-attention block on a feature map: x + to_out(attention(group_norm(x))), over its H*W pixels.

    `head_dim=None` means one head as wide as `channels` (DDPM's choice)."""
    head_dim = head_dim or channels
    return Attention(
        channels, heads=channels // head_dim, dim_head=head_dim, rescale_output_factor=rescale, eps=eps,
        norm_num_groups=groups, residual_connection=True, bias=True, upcast_softmax=True,
    )


class DownBlock2D(nn.Module):
    """One level of the contracting path: `num_layers` resnets (each followed by self-attention when
    `with_attention`, i.e. diffusers' AttnDownBlock2D), then a downsampler unless it is the last level.

    Pushes every output onto `skips`, the stack the up path pops (as in UNet2DConditionModel):
    (B, C_in, H, W) -> (B, C_out, H/2, W/2), num_layers [+ 1] pushes.
    """

    def __init__(self, in_channels, out_channels, temb_channels, num_layers, with_attention, add_downsample,
                 downsample_type, downsample_padding, resnet, attention_head_dim):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels,
                          temb_channels=temb_channels, **resnet)
            for i in range(num_layers)
        )
        self.attentions = None
        if with_attention:
            self.attentions = nn.ModuleList(
                spatial_self_attention(out_channels, attention_head_dim, resnet["groups"], resnet["eps"])
                for _ in range(num_layers)
            )
        self.downsamplers = None
        if add_downsample and downsample_type == "resnet":
            self.downsamplers = nn.ModuleList([ResamplingResnetBlock2D(
                in_channels=out_channels, out_channels=out_channels, temb_channels=temb_channels, down=True, **resnet)])
        elif add_downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(
                out_channels, use_conv=True, out_channels=out_channels, padding=downsample_padding)])
        self.gradient_checkpointing = False  # set by the model's enable_gradient_checkpointing()

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            hidden_states = checkpointed(self.gradient_checkpointing, resnet, hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states)
            skips.append(hidden_states)
        if self.downsamplers is not None:
            downsampler = self.downsamplers[0]
            if isinstance(downsampler, ResnetBlock2D):
                hidden_states = downsampler(hidden_states, temb)
            else:
                hidden_states = downsampler(hidden_states)  # (B, C_out, H/2, W/2)
            skips.append(hidden_states)
        return hidden_states


class UNetMidBlock2D(nn.Module):
    """The bottom of the U: resnet, then (self-attention, resnet) `num_layers` times, at the lowest resolution."""

    def __init__(self, channels, temb_channels, resnet, attention_head_dim, attention_groups, add_attention,
                 num_layers: int = 1):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels=channels, out_channels=channels, temb_channels=temb_channels, **resnet)
            for _ in range(num_layers + 1)
        )
        self.attentions = nn.ModuleList(
            spatial_self_attention(channels, attention_head_dim, attention_groups, resnet["eps"],
                                   resnet["output_scale_factor"]) if add_attention else nn.Identity()
            for _ in range(num_layers)
        )
        self.gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        hidden_states = checkpointed(self.gradient_checkpointing, self.resnets[0], hidden_states, temb)
        for attention, resnet in zip(self.attentions, self.resnets[1:]):
            hidden_states = checkpointed(self.gradient_checkpointing, resnet, attention(hidden_states), temb)
        return hidden_states


class UpBlock2D(nn.Module):
    """One level of the expanding path: one resnet per skip tensor it pops off the stack (layers_per_block + 1),
    each on [hidden_states, skip] concatenated along channels (each followed by self-attention when
    `with_attention`: diffusers' AttnUpBlock2D), then an upsampler unless it is the last level.
    (B, C_prev, H, W) -> (B, C_out, 2H, 2W).

    `skip_channels` is the channel count of each skip tensor it takes, in the order it takes them.
    """

    def __init__(self, prev_output_channel, out_channels, skip_channels, temb_channels, with_attention,
                 add_upsample, upsample_type, resnet, attention_head_dim):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels=(prev_output_channel if i == 0 else out_channels) + skip,
                          out_channels=out_channels, temb_channels=temb_channels, **resnet)
            for i, skip in enumerate(skip_channels)
        )
        self.attentions = None
        if with_attention:
            self.attentions = nn.ModuleList(
                spatial_self_attention(out_channels, attention_head_dim, resnet["groups"], resnet["eps"])
                for _ in skip_channels
            )
        self.upsamplers = None
        if add_upsample and upsample_type == "resnet":
            self.upsamplers = nn.ModuleList([ResamplingResnetBlock2D(
                in_channels=out_channels, out_channels=out_channels, temb_channels=temb_channels, up=True, **resnet)])
        elif add_upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])
        self.gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            hidden_states = torch.cat([hidden_states, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            hidden_states = checkpointed(self.gradient_checkpointing, resnet, hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states)
        if self.upsamplers is not None:
            upsampler = self.upsamplers[0]
            if isinstance(upsampler, ResnetBlock2D):
                hidden_states = upsampler(hidden_states, temb)
            else:
                hidden_states = upsampler(hidden_states)  # (B, C_out, 2H, 2W)
        return hidden_states


# ----- the model -------------------------------------------------------------------------------------

DOWN_BLOCK_TYPES = {"DownBlock2D": False, "AttnDownBlock2D": True}  # name -> with self-attention
UP_BLOCK_TYPES = {"UpBlock2D": False, "AttnUpBlock2D": True}


class UNet2DModel(ModelMixin, AttentionMixin):
    """The DDPM UNet: eps_theta(x_t, t) (or x_0 / v, as its scheduler's prediction_type says), in pixel space.

        unet = UNet2DModel.from_pretrained("path/to/ddpm-cat-256")
        eps = unet(x_t, t).sample          # (B, 3, 256, 256) -> (B, 3, 256, 256)

    Config (diffusers' names and defaults; `google/ddpm-cat-256` sets block_out_channels
    [128, 128, 256, 256, 512, 512], attention at 16x16 in its fifth level, norm_eps 1e-6,
    downsample_padding 0, flip_sin_to_cos False, freq_shift 1, attention_head_dim None):
      time_embedding_type  "positional" (sinusoid), "fourier" (score-SDE noise levels) or "learned"
      flip_sin_to_cos, freq_shift   the sinusoid's layout and frequency offset (layers.get_timestep_embedding)
      downsample_type, upsample_type  "conv" or "resnet"; as in diffusers they apply to the Attn* blocks only
      mid_block_scale_factor         the mid block's resnets and attention divide their output by it
      resnet_time_scale_shift        "default" (temb added) or "scale_shift" (temb scales and shifts norm2)
      class_embed_type, num_class_embeds   optional class conditioning, added to temb
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2D",
        up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels: tuple[int, ...] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1.0,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,
        norm_num_groups: int = 32,
        attn_norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: str | None = None,
        num_class_embeds: int | None = None,
        num_train_timesteps: int | None = None,
    ):
        super().__init__()
        self.sample_size = sample_size  # a plain attribute as in diffusers (read without the deprecation warning)
        self._check_config(down_block_types, up_block_types, block_out_channels, mid_block_type, time_embedding_type,
                           downsample_type, upsample_type, resnet_time_scale_shift, class_embed_type,
                           num_train_timesteps)
        channels = list(block_out_channels)
        time_embed_dim = time_embedding_dim or channels[0] * 4
        resnet = dict(eps=norm_eps, groups=norm_num_groups, dropout=dropout, non_linearity=act_fn,
                      time_embedding_norm=resnet_time_scale_shift)

        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)

        # time embedding: t -> (B, C0) sinusoid / Fourier features / learned -> MLP -> (B, 4*C0)
        if time_embedding_type == "fourier":
            self.time_proj = GaussianFourierProjection(embedding_size=channels[0], scale=16)
            timestep_input_dim = 2 * channels[0]
        elif time_embedding_type == "learned":
            self.time_proj = nn.Embedding(num_train_timesteps, channels[0])
            timestep_input_dim = channels[0]
        else:
            self.time_proj = Timesteps(channels[0], flip_sin_to_cos, freq_shift)
            timestep_input_dim = channels[0]
        self.time_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim)
        self.class_embedding = self._class_embedding(class_embed_type, num_class_embeds, timestep_input_dim,
                                                     time_embed_dim)

        # contracting path; skip_channels is the stack of the channels of every activation it pushes
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()  # filled below; registered before mid_block, as in diffusers (module order)
        skip_channels = [channels[0]]
        for level, block_type in enumerate(down_block_types):
            is_last = level == len(channels) - 1
            block_in = channels[max(level - 1, 0)]
            self.down_blocks.append(DownBlock2D(
                block_in, channels[level], time_embed_dim, layers_per_block, DOWN_BLOCK_TYPES[block_type],
                add_downsample=not is_last, downsample_type=downsample_type if DOWN_BLOCK_TYPES[block_type] else "conv",
                downsample_padding=downsample_padding, resnet=resnet, attention_head_dim=attention_head_dim))
            skip_channels += [channels[level]] * (layers_per_block + (0 if is_last else 1))

        self.mid_block = None
        if mid_block_type is not None:
            attention_groups = attn_norm_num_groups or (norm_num_groups if resnet_time_scale_shift == "default" else None)
            self.mid_block = UNetMidBlock2D(
                channels[-1], time_embed_dim, {**resnet, "output_scale_factor": mid_block_scale_factor},
                attention_head_dim, attention_groups, add_attention)

        # expanding path: each level pops layers_per_block + 1 skips, last in first out
        reversed_channels = channels[::-1]
        for level, block_type in enumerate(up_block_types):
            is_last = level == len(channels) - 1
            taken = [skip_channels.pop() for _ in range(layers_per_block + 1)]
            self.up_blocks.append(UpBlock2D(
                reversed_channels[max(level - 1, 0)], reversed_channels[level], taken, time_embed_dim,
                UP_BLOCK_TYPES[block_type], add_upsample=not is_last,
                upsample_type=upsample_type if UP_BLOCK_TYPES[block_type] else "conv",
                resnet=resnet, attention_head_dim=attention_head_dim))

        self.conv_norm_out = nn.GroupNorm(num_groups=norm_num_groups, num_channels=channels[0], eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[0], out_channels, kernel_size=3, padding=1)

    @staticmethod
    def _check_config(down_block_types, up_block_types, block_out_channels, mid_block_type, time_embedding_type,
                      downsample_type, upsample_type, resnet_time_scale_shift, class_embed_type, num_train_timesteps):
        if not len(down_block_types) == len(up_block_types) == len(block_out_channels):
            raise ValueError(
                "UNet2DModel needs one entry per level in down_block_types, up_block_types and block_out_channels; "
                f"got {len(down_block_types)}, {len(up_block_types)} and {len(block_out_channels)}"
            )
        for block_type in down_block_types:
            check_choice("down block type", block_type, list(DOWN_BLOCK_TYPES), "UNet2DModel")
        for block_type in up_block_types:
            check_choice("up block type", block_type, list(UP_BLOCK_TYPES), "UNet2DModel")
        check_choice("mid_block_type", mid_block_type, [None, "UNetMidBlock2D"], "UNet2DModel")
        check_choice("time_embedding_type", time_embedding_type, ["positional", "fourier", "learned"], "UNet2DModel")
        check_choice("downsample_type", downsample_type, ["conv", "resnet"], "UNet2DModel")
        check_choice("upsample_type", upsample_type, ["conv", "resnet"], "UNet2DModel")
        check_choice("resnet_time_scale_shift", resnet_time_scale_shift, ["default", "scale_shift"], "UNet2DModel")
        check_choice("class_embed_type", class_embed_type, [None, "timestep", "identity"], "UNet2DModel")
        if time_embedding_type == "learned" and not num_train_timesteps:
            raise ValueError("UNet2DModel: time_embedding_type='learned' needs num_train_timesteps (e.g. 1000)")

    @staticmethod
    def _class_embedding(class_embed_type, num_class_embeds, timestep_input_dim, time_embed_dim):
        """What turns class labels into a vector added to temb: a lookup table, the timestep MLP, or nothing."""
        if class_embed_type is None and num_class_embeds is not None:
            return nn.Embedding(num_class_embeds, time_embed_dim)
        if class_embed_type == "timestep":
            return TimestepEmbedding(timestep_input_dim, time_embed_dim)
        if class_embed_type == "identity":
            return nn.Identity()
        return None

    @classmethod
    def checkpoint_to_module_keys(cls, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Old diffusers files (such as the original google/ddpm-* uploads) name the attention projections
        `query`, `key`, `value`, `proj_attn`; today's names are `to_q`, `to_k`, `to_v`, `to_out.0`."""
        renamed = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
        pattern = re.compile(r"(attentions\.\d+)\.(query|key|value|proj_attn)\.")
        return {pattern.sub(lambda m: f"{m.group(1)}.{renamed[m.group(2)]}.", key): value
                for key, value in state_dict.items()}

    # ----- forward -----

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple[torch.Tensor]:
        """eps_theta(x_t, t): `sample` (B, C_in, H, W), `timestep` a number or (B,) / (1,) tensor -> (B, C_out, H, W)."""
        self._check_sample(sample)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0  # images in [0, 1] -> [-1, 1]
        timesteps = timesteps_for_batch(timestep, sample)  # (B,)

        temb = self.time_embedding(self.time_proj(timesteps).to(sample.dtype))  # (B, 4*C0)
        temb = temb + self._class_embedding_of(class_labels, sample.dtype)

        # down: every intermediate activation goes on the skip stack; up: each resnet pops the last one
        hidden_states = self.conv_in(sample)  # (B, C0, H, W)
        skips = [hidden_states]
        for block in self.down_blocks:
            hidden_states = block(hidden_states, temb, skips)  # (B, C_i, H/2^i, W/2^i)
        if self.mid_block is not None:
            hidden_states = self.mid_block(hidden_states, temb)
        for block in self.up_blocks:
            hidden_states = block(hidden_states, temb, skips)  # back up to (B, C0, H, W)

        sample = self.conv_out(self.conv_act(self.conv_norm_out(hidden_states)))  # (B, C_out, H, W)
        if self.config.time_embedding_type == "fourier":
            sample = sample / timesteps.reshape(-1, 1, 1, 1)  # score-SDE: the network predicts score * sigma
        return UNet2DOutput(sample=sample) if return_dict else (sample,)

    def _check_sample(self, sample: torch.Tensor) -> None:
        factor = 2 ** (len(self.down_blocks) - 1)
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"UNet2DModel expects a sample of shape (B, {self.config.in_channels}, H, W), got {tuple(sample.shape)}"
            )
        if sample.shape[2] % factor or sample.shape[3] % factor:
            raise ValueError(
                f"UNet2DModel halves the resolution {len(self.down_blocks) - 1} times, so H and W must be multiples "
                f"of {factor}; got {tuple(sample.shape[2:])} (sample_size is {self.config.sample_size})"
            )

    def _class_embedding_of(self, class_labels: torch.Tensor | None, dtype: torch.dtype):
        """The class vector added to temb (0 for an unconditional model)."""
        if self.class_embedding is None:
            if class_labels is not None:
                raise ValueError("class_labels were given, but this UNet2DModel has no class embedding "
                                 "(set class_embed_type or num_class_embeds in its config)")
            return 0
        if class_labels is None:
            raise ValueError("this UNet2DModel is class-conditional: pass class_labels (one per sample)")
        if self.config.class_embed_type == "timestep":
            class_labels = self.time_proj(class_labels)
        return self.class_embedding(class_labels).to(dtype)
