"""The convolutional building blocks shared by the SD 1.5 UNet, the VAE and the DDPM pixel UNet.

Everything here is a plain `torch.nn.Module` whose parameter names are diffusers' (so a real
checkpoint's keys such as `down_blocks.0.resnets.0.conv1.weight` land on them unchanged).

API (constructor signatures are kept stable; other models build on them):

    get_timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1,
                           scale=1, max_period=10000)        # (N,) -> (N, embedding_dim), no parameters
    Timesteps(num_channels, flip_sin_to_cos, downscale_freq_shift, scale=1)
                                                              # the same, as a parameter-free module
    guidance_scale_embedding(w, embedding_dim=512, dtype=float32)  # (N,) guidance scales -> (N, embedding_dim) (LCM)
    TimestepEmbedding(in_channels, time_embed_dim, act_fn="silu", out_dim=None, cond_proj_dim=None)
                                                              # linear_1 -> act -> linear_2; forward(x, condition=None)
    ResnetBlock2D(in_channels=..., out_channels=None, temb_channels=512, groups=32, groups_out=None,
                  eps=1e-6, non_linearity="swish", time_embedding_norm="default", dropout=0.0,
                  output_scale_factor=1.0, use_in_shortcut=None, conv_shortcut_bias=True)
                                                              # forward(x, temb) ; temb may be None
    Downsample2D(channels, use_conv=False, out_channels=None, padding=1)
                                                              # forward(x): H, W -> H/2, W/2
    Upsample2D(channels, use_conv=False, out_channels=None)  # forward(x, output_size=None): H, W -> 2H, 2W
    get_activation(name)                                     # "silu"/"swish", "gelu", "mish", "relu"
    checkpointed(enabled, module, *args)                     # module(*args), through gradient checkpointing if enabled
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

_ACTIVATIONS = {"swish": nn.SiLU, "silu": nn.SiLU, "gelu": nn.GELU, "mish": nn.Mish, "relu": nn.ReLU}


def get_activation(name: str) -> nn.Module:
    """The activation module called `name` in a diffusers config (`act_fn`, `non_linearity`)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


# ----- timestep embedding ---------------------------------------------------------------------------


def get_timestep_embedding(
    timesteps: torch.Tensor,
    embedding_dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1,
    scale: float = 1,
    max_period: int = 10000,
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DDPM (Ho et al. 2020, arXiv 2006.11239),
    taken from the Transformer's positional encoding (Vaswani et al. 2017, section 3.5).

    With half = embedding_dim // 2 and frequencies

        omega_i = max_period ** (-i / (half - downscale_freq_shift)),   i = 0 .. half-1

    the embedding of t is [sin(scale * t * omega), cos(scale * t * omega)] (or [cos, sin] when
    `flip_sin_to_cos`, as SD uses). SD 1.5 uses downscale_freq_shift=0; DDPM uses 1.
    The frequencies are computed here on every call: no buffer, nothing to load.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be a 1-d tensor of shape (N,), got shape {tuple(timesteps.shape)}")
    half = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    omega = torch.exp(exponent / (half - downscale_freq_shift))  # (half,)
    angles = scale * timesteps[:, None].float() * omega[None, :]  # (N, half)
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (N, 2*half)
    if flip_sin_to_cos:
        embedding = torch.cat([embedding[:, half:], embedding[:, :half]], dim=-1)
    if embedding_dim % 2 == 1:
        embedding = F.pad(embedding, (0, 1))  # (N, embedding_dim)
    return embedding


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int = 512, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The guidance scale w as LCM's guided distillation feeds it to the UNet (Luo et al. 2023, §4.2; VDM's
    sinusoidal embedding of a scalar): (N,) -> (N, embedding_dim), sines then cosines of 1000 w at the
    frequencies 10000^(-i / (half - 1)), i = 0..half-1; zero-padded when embedding_dim is odd."""
    if w.ndim != 1:
        raise ValueError(f"guidance_scale_embedding takes a 1-D tensor of guidance scales, got shape {tuple(w.shape)}")
    half = embedding_dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    frequencies = torch.exp(torch.arange(half, dtype=dtype) * -step)
    angles = (w * 1000.0).to(dtype)[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(embedding, (0, 1)) if embedding_dim % 2 == 1 else embedding


class Timesteps(nn.Module):
    """`get_timestep_embedding` with its settings fixed: (N,) timesteps -> (N, num_channels). No parameters."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float = 1):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return get_timestep_embedding(
            timesteps, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift, self.scale
        )


class TimestepEmbedding(nn.Module):
    """The small MLP on top of the sinusoidal embedding: temb = linear_2(act(linear_1(sinusoid(t) + cond_proj(w)))).

    SD 1.5: (B, 320) -> (B, 1280), i.e. time_embed_dim = 4 * block_out_channels[0].
    `cond_proj_dim` (a UNet's `time_cond_proj_dim`): a bias-free linear map of an extra condition added to the
    sinusoid before the MLP. LCM checkpoints distilled with guidance (Luo et al. 2023, eq. 9) feed it the
    embedding of the guidance scale w, so one model call gives a guided prediction (no CFG batch).
    """

    def __init__(self, in_channels: int, time_embed_dim: int, act_fn: str = "silu", out_dim: int | None = None,
                 cond_proj_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim is not None else None
        self.act = get_activation(act_fn)
        self.linear_2 = nn.Linear(time_embed_dim, out_dim or time_embed_dim)

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            if self.cond_proj is None:
                raise ValueError(
                    "a timestep condition (timestep_cond, the guidance embedding) was given, but this UNet has no "
                    "time_cond_proj_dim: only LCM-distilled UNets (e.g. SimianLuo/LCM_Dreamshaper_v7) take one"
                )
            sample = sample + self.cond_proj(condition)
        return self.linear_2(self.act(self.linear_1(sample)))


# ----- residual block -------------------------------------------------------------------------------


class ResnetBlock2D(nn.Module):
    """The residual block of DDPM's and SD's UNets (and, without a time embedding, of the VAE).

        h = conv1(act(norm1(x)))
        h = h + time_emb_proj(act(temb))[:, :, None, None]           (time_embedding_norm="default")
            or  norm2(h) * (1 + scale) + shift                        (time_embedding_norm="scale_shift")
        h = conv2(dropout(act(norm2(h))))
        out = (shortcut(x) + h) / output_scale_factor

    `shortcut` is a 1x1 conv (`conv_shortcut`) when the channel count changes, else the identity.
    `temb_channels=None` builds no `time_emb_proj` (the VAE's blocks); then `forward(x, None)`.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        temb_channels: int | None = 512,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        non_linearity: str = "swish",
        time_embedding_norm: str = "default",
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
        use_in_shortcut: bool | None = None,
        conv_shortcut_bias: bool = True,
    ):
        super().__init__()
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(
                f"time_embedding_norm must be 'default' or 'scale_shift', got {time_embedding_norm!r}"
            )
        out_channels = out_channels or in_channels
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor

        self.norm1 = nn.GroupNorm(num_groups=groups, num_channels=in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.time_emb_proj = None
        if temb_channels is not None:
            projected = 2 * out_channels if time_embedding_norm == "scale_shift" else out_channels
            self.time_emb_proj = nn.Linear(temb_channels, projected)
        self.norm2 = nn.GroupNorm(num_groups=groups_out or groups, num_channels=out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nonlinearity = get_activation(non_linearity)

        if use_in_shortcut is None:
            use_in_shortcut = in_channels != out_channels
        self.conv_shortcut = None
        if use_in_shortcut:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=conv_shortcut_bias)

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        hidden_states = self.conv1(self.nonlinearity(self.norm1(input_tensor)))  # (B, C_in, H, W) -> (B, C_out, H, W)

        if self.time_emb_proj is not None and temb is not None:
            temb = self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]  # (B, C_out or 2*C_out, 1, 1)
        else:
            temb = None

        if self.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError("a ResnetBlock2D with time_embedding_norm='scale_shift' needs a time embedding `temb`")
            time_scale, time_shift = temb.chunk(2, dim=1)
            hidden_states = self.norm2(hidden_states) * (1 + time_scale) + time_shift
        else:
            if temb is not None:
                hidden_states = hidden_states + temb
            hidden_states = self.norm2(hidden_states)

        hidden_states = self.conv2(self.dropout(self.nonlinearity(hidden_states)))
        return (self.shortcut(input_tensor) + hidden_states) / self.output_scale_factor

    def shortcut(self, input_tensor: torch.Tensor) -> torch.Tensor:
        """The skip path: `conv_shortcut` (1x1) when the channel count changes, else the input itself.

        In training the conv's input is made contiguous first, as diffusers does (distributed training warns of
        mismatched gradient strides otherwise). The result's memory layout decides which elements the next
        dropout's random mask falls on, so this keeps a seeded train-mode step equal to diffusers'."""
        if self.conv_shortcut is None:
            return input_tensor
        if self.training:
            input_tensor = input_tensor.contiguous()
        return self.conv_shortcut(input_tensor)


# ----- resampling -----------------------------------------------------------------------------------


class Downsample2D(nn.Module):
    """Halve the resolution: a stride-2 3x3 conv (`use_conv=True`) or a 2x2 average pool.

    `padding=1` pads all sides (the UNets). `padding=0` pads only right and bottom by one pixel,
    (0, 1, 0, 1), before the conv: the asymmetric padding of LDM's (and SD's) VAE encoder.
    (B, C, H, W) -> (B, C_out, H/2, W/2).
    """

    def __init__(self, channels: int, use_conv: bool = False, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.padding = padding
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, kernel_size=3, stride=2, padding=padding)
        else:
            if self.out_channels != channels:
                raise ValueError(
                    f"Downsample2D without a conv cannot change channels ({channels} -> {self.out_channels}); "
                    "pass use_conv=True"
                )
            self.conv = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.use_conv and self.padding == 0:
            hidden_states = F.pad(hidden_states, (0, 1, 0, 1), mode="constant", value=0)  # (B, C, H+1, W+1)
        return self.conv(hidden_states)


class Upsample2D(nn.Module):
    """Double the resolution: nearest-neighbour x2 (or to `output_size`), then an optional 3x3 conv.

    (B, C, H, W) -> (B, C_out, 2H, 2W).
    """

    def __init__(self, channels: int, use_conv: bool = False, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.conv = nn.Conv2d(channels, self.out_channels, kernel_size=3, padding=1) if use_conv else None

    def forward(self, hidden_states: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        # PyTorch's channels-last nearest-neighbour kernel fails on large inputs (diffusers issue 984 for batches of 64
        # and more; pytorch issue 141831: outputs over 2**31 elements come back as zeros on CUDA), so those get a
        # contiguous copy first, as diffusers does. Smaller inputs keep their layout (and their speed).
        scale = 2 if output_size is None else max(o / s for o, s in zip(output_size, hidden_states.shape[-2:]))
        if hidden_states.shape[0] >= 64 or hidden_states.numel() * scale > 2**31:
            hidden_states = hidden_states.contiguous()
        if output_size is None:
            hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
        else:
            hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
        if self.conv is not None:
            hidden_states = self.conv(hidden_states)
        return hidden_states


def timesteps_for_batch(timestep, sample: torch.Tensor) -> torch.Tensor:
    """A python number, a 0-d tensor, or a (1,) / (B,) tensor -> a (B,) tensor on the sample's device."""
    batch = sample.shape[0]
    if not torch.is_tensor(timestep):
        timestep = torch.tensor([timestep], device=sample.device)
    timestep = timestep.to(sample.device).reshape(-1) if timestep.ndim == 0 else timestep.to(sample.device)
    if timestep.ndim != 1 or timestep.shape[0] not in (1, batch):
        raise ValueError(
            f"timestep must be a number, a 0-d tensor, or a tensor of shape (1,) or (batch={batch},), one per sample; "
            f"got shape {tuple(timestep.shape)}"
        )
    return timestep.expand(batch)


def checkpointed(enabled: bool, module: nn.Module, *args):
    """`module(*args)`; with `enabled` and gradients on, through torch.utils.checkpoint (gradient checkpointing,
    Chen et al. 2016, arXiv 1604.06174): the activations inside `module` are not kept for the backward pass but
    recomputed there, trading compute for memory. The gradients are the same (dropout replays its random
    numbers: torch saves and restores the RNG state)."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)
    return module(*args)
