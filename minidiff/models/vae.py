"""AutoencoderKL: SD's image <-> latent autoencoder (Rombach et al. 2022, arXiv 2112.10752, section 3;
the KL-regularized autoencoder of Kingma & Welling 2013, arXiv 1312.6114).

The encoder maps an image x in [-1, 1] to the parameters of a diagonal Gaussian q(z | x) =
N(mean, diag(exp(logvar))); the decoder maps a latent z back to an image. Diffusion runs on
z * scaling_factor (0.18215 for SD 1.5, which gives the latents unit variance). With SD 1.5's config
(block_out_channels (128, 256, 512, 512), 4 latent channels, layers_per_block 2):

    encode   x (B, 3, 512, 512) --conv_in--> (B, 128, 512, 512)
             down_blocks (2 resnets each, then a stride-2 conv with (0, 1, 0, 1) padding, except the last)
               (B, 128, 512, 512) -> (B, 128, 256, 256) -> (B, 256, 128, 128) -> (B, 512, 64, 64) -> (B, 512, 64, 64)
             mid_block: resnet, single-head self-attention over the 64*64 positions, resnet
             conv_norm_out, SiLU, conv_out -> (B, 8, 64, 64); quant_conv (1x1) -> mean, logvar (B, 4, 64, 64) each
    decode   z (B, 4, 64, 64) --post_quant_conv (1x1), conv_in--> (B, 512, 64, 64); mid_block
             up_blocks (3 resnets each, then nearest x2 + conv, except the last)
               (B, 512, 64, 64) -> (B, 512, 128, 128) -> (B, 512, 256, 256) -> (B, 256, 512, 512) -> (B, 128, 512, 512)
             conv_norm_out, SiLU, conv_out -> x_rec (B, 3, 512, 512)

Usage, as in diffusers:

    posterior = vae.encode(image).latent_dist          # DiagonalGaussianDistribution
    latents = posterior.sample(generator) * vae.config.scaling_factor
    image = vae.decode(latents / vae.config.scaling_factor).sample
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minidiff.configuration import register_to_config
from minidiff.models.attention import Attention
from minidiff.models.attention_processor import AttentionMixin
from minidiff.models.layers import Downsample2D, ResnetBlock2D, Upsample2D, checkpointed
from minidiff.models.modeling import ModelMixin
from minidiff.utils.torch_utils import randn_tensor
from minidiff.utils.outputs import BaseOutput


# ----- the latent distribution ----------------------------------------------------------------------


class DiagonalGaussianDistribution:
    """q(z | x) = N(mean, diag(var)), from the encoder's (B, 2*latent_channels, h, w) output `parameters`.

    logvar is clamped to [-30, 20] for numerical safety, as in LDM. `sample` draws
    z = mean + std * eps with eps ~ N(0, I) from `generator` (the same draw as diffusers, so a seed gives
    the same latents); `mode()` is the mean; `kl()` is KL(q || N(0, I)) per sample (Kingma & Welling, appendix B):

        KL = 1/2 * sum( mean^2 + var - 1 - logvar )
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)  # (B, 2C, h, w) -> 2 x (B, C, h, w)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        eps = randn_tensor(self.mean.shape, generator=generator, device=self.parameters.device, dtype=self.parameters.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) summed over (C, h, w), one value per sample; `other=None` is N(0, I)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        if other is None:
            return 0.5 * torch.sum(self.mean**2 + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(
            (self.mean - other.mean) ** 2 / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=[1, 2, 3],
        )


@dataclass
class AutoencoderKLOutput(BaseOutput):
    """What `encode` returns: the posterior q(z | x)."""

    latent_dist: DiagonalGaussianDistribution


@dataclass
class DecoderOutput(BaseOutput):
    """What `decode` and `forward` return: the image, (B, 3, H, W) in about [-1, 1]."""

    sample: torch.Tensor


# ----- blocks ---------------------------------------------------------------------------------------


def _vae_resnet(in_channels: int, out_channels: int, groups: int, act_fn: str) -> ResnetBlock2D:
    """The VAE's resnets: no time embedding, GroupNorm eps 1e-6."""
    return ResnetBlock2D(
        in_channels=in_channels, out_channels=out_channels, temb_channels=None, groups=groups, eps=1e-6,
        non_linearity=act_fn,
    )


class DownEncoderBlock2D(nn.Module):
    """`num_layers` resnets, then (unless last) a stride-2 conv with LDM's asymmetric (0, 1, 0, 1) padding."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, add_downsample: bool, groups: int, act_fn: str):
        super().__init__()
        self.resnets = nn.ModuleList(
            _vae_resnet(in_channels if i == 0 else out_channels, out_channels, groups, act_fn) for i in range(num_layers)
        )
        self.downsamplers = None
        if add_downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, use_conv=True, out_channels=out_channels, padding=0)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, None)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)  # (B, C, H, W) -> (B, C, H/2, W/2)
        return hidden_states


class UpDecoderBlock2D(nn.Module):
    """`num_layers` resnets (no skip connections in a VAE), then (unless last) nearest x2 and a 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, add_upsample: bool, groups: int, act_fn: str):
        super().__init__()
        self.resnets = nn.ModuleList(
            _vae_resnet(in_channels if i == 0 else out_channels, out_channels, groups, act_fn) for i in range(num_layers)
        )
        self.upsamplers = None
        if add_upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, None)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)  # (B, C, H, W) -> (B, C, 2H, 2W)
        return hidden_states


class VAEMidBlock2D(nn.Module):
    """The VAE's bottleneck: resnet, single-head spatial self-attention (GroupNorm, residual), resnet.
    (diffusers builds it from its UNetMidBlock2D, as the pixel UNet's in unet_2d.py; the state-dict keys,
    `mid_block.resnets.0...`, are diffusers'.)"""

    def __init__(self, channels: int, groups: int, act_fn: str, add_attention: bool = True):
        super().__init__()
        self.resnets = nn.ModuleList([_vae_resnet(channels, channels, groups, act_fn) for _ in range(2)])
        self.attentions = nn.ModuleList()
        if add_attention:
            self.attentions.append(
                Attention(
                    channels, heads=1, dim_head=channels, bias=True, norm_num_groups=groups, eps=1e-6,
                    residual_connection=True, upcast_softmax=True,
                )
            )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, None)
        for attention in self.attentions:
            hidden_states = attention(hidden_states)  # attends over the h*w positions, (B, C, h, w) in and out
        return self.resnets[1](hidden_states, None)


# ----- encoder and decoder --------------------------------------------------------------------------


class Encoder(nn.Module):
    """x (B, in_channels, H, W) -> (B, 2*latent_channels, H/f, W/f), f = 2**(len(block_out_channels) - 1)."""

    def __init__(self, in_channels, latent_channels, block_out_channels, layers_per_block, norm_num_groups, act_fn,
                 mid_block_add_attention=True):
        super().__init__()
        last = len(block_out_channels) - 1
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, stride=1, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(
                block_out_channels[max(i - 1, 0)], block_out_channels[i], layers_per_block,
                add_downsample=i < last, groups=norm_num_groups, act_fn=act_fn,
            )
            for i in range(len(block_out_channels))
        )
        self.mid_block = VAEMidBlock2D(block_out_channels[-1], norm_num_groups, act_fn, mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(num_groups=norm_num_groups, num_channels=block_out_channels[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(block_out_channels[-1], 2 * latent_channels, kernel_size=3, padding=1)
        self.gradient_checkpointing = False  # set by the model's enable_gradient_checkpointing()

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(sample)  # (B, 3, 512, 512) -> (B, 128, 512, 512) for SD 1.5
        for block in self.down_blocks:
            sample = checkpointed(self.gradient_checkpointing, block, sample)
        sample = checkpointed(self.gradient_checkpointing, self.mid_block, sample)  # (B, 512, 64, 64)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))  # (B, 8, 64, 64): mean and logvar


class Decoder(nn.Module):
    """z (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f)."""

    def __init__(self, latent_channels, out_channels, block_out_channels, layers_per_block, norm_num_groups, act_fn,
                 mid_block_add_attention=True):
        super().__init__()
        reversed_channels = list(reversed(block_out_channels))
        last = len(block_out_channels) - 1
        self.conv_in = nn.Conv2d(latent_channels, block_out_channels[-1], kernel_size=3, stride=1, padding=1)
        self.mid_block = VAEMidBlock2D(block_out_channels[-1], norm_num_groups, act_fn, mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(
                reversed_channels[max(i - 1, 0)], reversed_channels[i], layers_per_block + 1,
                add_upsample=i < last, groups=norm_num_groups, act_fn=act_fn,
            )
            for i in range(len(block_out_channels))
        )
        self.conv_norm_out = nn.GroupNorm(num_groups=norm_num_groups, num_channels=block_out_channels[0], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, kernel_size=3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(z)  # (B, 4, 64, 64) -> (B, 512, 64, 64) for SD 1.5
        sample = checkpointed(self.gradient_checkpointing, self.mid_block, sample)
        for block in self.up_blocks:
            sample = checkpointed(self.gradient_checkpointing, block, sample)  # ... -> (B, 128, 512, 512)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))  # (B, 3, 512, 512)


# ----- the autoencoder ------------------------------------------------------------------------------


class AutoencoderKL(ModelMixin, AttentionMixin):
    """SD's VAE: `encode(x).latent_dist`, `decode(z).sample`, `forward(x).sample` (see the module docstring).

    Config fields are diffusers': `scaling_factor` (0.18215, SD 1.5), `shift_factor` (None; the pipeline
    uses (z - shift) * scale when it is set), `latents_mean`/`latents_std`, `force_upcast` (run in float32
    when the pipeline is half precision), `use_quant_conv`, `use_post_quant_conv`, `mid_block_add_attention`.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int | tuple[int, int] = 32,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        latents_mean: tuple[float, ...] | None = None,
        latents_std: tuple[float, ...] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        _check_block_types(down_block_types, up_block_types, block_out_channels)
        self.encoder = Encoder(
            in_channels, latent_channels, block_out_channels, layers_per_block, norm_num_groups, act_fn,
            mid_block_add_attention,
        )
        self.decoder = Decoder(
            latent_channels, out_channels, block_out_channels, layers_per_block, norm_num_groups, act_fn,
            mid_block_add_attention,
        )
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None
        # Tiled decoding (off by default; see `enable_tiling`): tile size and overlap in latent pixels.
        self.use_tiling = False
        self.tile_size = 64
        self.tile_overlap = 16
        self.use_slicing = False  # encode / decode a batch one image at a time (see `enable_slicing`)

    # Names of the mid-block attention in checkpoints written by diffusers before 0.14 (its old AttentionBlock).
    _OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

    @classmethod
    def checkpoint_to_module_keys(cls, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Older diffusers VAE files name the mid-block attention `query/key/value/proj_attn`; rename those
        to `to_q/to_k/to_v/to_out.0` (same shapes). Every other key is kept as it is."""
        renamed = {}
        for key, tensor in state_dict.items():
            side, mid, attentions, index, leaf, kind = (key.split(".") + [""] * 6)[:6]
            if mid == "mid_block" and attentions == "attentions" and leaf in cls._OLD_ATTENTION_NAMES:
                key = f"{side}.mid_block.attentions.{index}.{cls._OLD_ATTENTION_NAMES[leaf]}.{kind}"
            renamed[key] = tensor
        return renamed

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """x (B, in_channels, H, W) in [-1, 1] -> AutoencoderKLOutput(latent_dist=q(z | x))."""
        self._check_channels("image x", x, self.config.in_channels)
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._moments(one) for one in x.split(1)])
        else:
            moments = self._moments(x)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)  # (B, 2C, H/8, W/8) for SD 1.5
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """z (B, latent_channels, h, w) (already divided by scaling_factor) -> DecoderOutput(sample=image)."""
        self._check_channels("latents z", z, self.config.latent_channels)
        if self.use_slicing and z.shape[0] > 1:
            image = torch.cat([self.decode(one).sample for one in z.split(1)])
            return DecoderOutput(sample=image) if return_dict else (image,)
        if self.use_tiling and max(z.shape[-2:]) > self.tile_size:
            return self.tiled_decode(z, return_dict)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        image = self.decoder(z)  # (B, 3, 8h, 8w) for SD 1.5
        return DecoderOutput(sample=image) if return_dict else (image,)

    # ----- tiled decoding: memory bounded by one tile, for large images -----

    def enable_tiling(self, tile_size: int = 64, tile_overlap: int = 16) -> None:
        """Make `decode` work tile by tile on latents wider or taller than `tile_size` (see `tiled_decode`).

        SD 1.5: a 64x64-latent tile is a 512x512 image; the decoder's activations at full resolution
        (B, 128..512, H, W) are what fill the memory, so a 1024x1024 decode needs about a quarter of it.
        """
        if not 0 <= tile_overlap < tile_size:
            raise ValueError(
                f"tile_overlap must be in [0, tile_size): got tile_size={tile_size}, tile_overlap={tile_overlap}; "
                "e.g. enable_tiling(tile_size=64, tile_overlap=16)"
            )
        self.use_tiling, self.tile_size, self.tile_overlap = True, tile_size, tile_overlap

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        """Encode and decode a batch one image at a time: the activations of one image, the same result."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def tiled_decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Decode overlapping latent tiles one at a time and blend them into one image.

        Tiles of `tile_size`^2 latents start every `tile_size - tile_overlap` latents (the last row and column
        of tiles end at the border). Each image pixel is the weighted mean of the tiles covering it, each
        tile weighted by a ramp rising linearly across its overlap margins, so tiles fade into each other
        with no seam. It is not bit-identical to `decode`: each tile computes its own GroupNorm statistics
        and its mid-block attention sees only its own latents (tests/test_precision.py measures the gap).
        """
        self._check_channels("latents z", z, self.config.latent_channels)
        scale = 2 ** (len(self.config.block_out_channels) - 1)  # image pixels per latent pixel: 8 for SD 1.5
        batch, _, height, width = z.shape
        image = torch.zeros(batch, self.config.out_channels, height * scale, width * scale, device=z.device)
        total_weight = torch.zeros(1, 1, height * scale, width * scale, device=z.device)  # sums in float32
        for top in _tile_starts(height, self.tile_size, self.tile_overlap):
            for left in _tile_starts(width, self.tile_size, self.tile_overlap):
                tile = z[:, :, top : top + self.tile_size, left : left + self.tile_size]
                if self.post_quant_conv is not None:
                    tile = self.post_quant_conv(tile)
                decoded = self.decoder(tile).float()  # (B, 3, 8*tile, 8*tile)
                weight = _blend_ramp(*decoded.shape[-2:], self.tile_overlap * scale, device=z.device)
                rows = slice(top * scale, top * scale + decoded.shape[-2])
                columns = slice(left * scale, left * scale + decoded.shape[-1])
                image[:, :, rows, columns] += decoded * weight
                total_weight[:, :, rows, columns] += weight
        image = (image / total_weight).to(z.dtype)
        return DecoderOutput(sample=image) if return_dict else (image,)

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
    ) -> DecoderOutput | tuple:
        """Reconstruct: encode, take z = a posterior sample (or its mode), decode."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        image = self.decode(z).sample
        return DecoderOutput(sample=image) if return_dict else (image,)

    @staticmethod
    def _check_channels(what: str, tensor: torch.Tensor, channels: int) -> None:
        if tensor.ndim != 4 or tensor.shape[1] != channels:
            raise ValueError(f"{what} must have shape (B, {channels}, H, W), got {tuple(tensor.shape)}")


def _tile_starts(size: int, tile_size: int, overlap: int) -> list[int]:
    """Where tiles start along one side: every tile_size - overlap, the last one ending at `size`."""
    if size <= tile_size:
        return [0]
    return [*range(0, size - tile_size, tile_size - overlap), size - tile_size]


def _blend_ramp(height: int, width: int, margin: int, device=None) -> torch.Tensor:
    """A tile's blending weight, (1, 1, height, width): rises linearly from 1/(2*margin) to 1 across a band
    of `margin` pixels on every side, 1 inside. Positive everywhere, so the weighted mean is always defined."""

    def ramp(length: int) -> torch.Tensor:
        position = torch.arange(length, device=device, dtype=torch.float32)
        distance_to_edge = torch.minimum(position, length - 1 - position)  # 0 at both ends
        return ((distance_to_edge + 0.5) / max(margin, 1)).clamp(max=1.0)

    return (ramp(height)[:, None] * ramp(width)[None, :])[None, None]


def _check_block_types(down_block_types, up_block_types, block_out_channels) -> None:
    if len(down_block_types) != len(block_out_channels) or len(up_block_types) != len(block_out_channels):
        raise ValueError(
            f"down_block_types ({len(down_block_types)}), up_block_types ({len(up_block_types)}) and "
            f"block_out_channels ({len(block_out_channels)}) must have the same length: one entry per resolution"
        )
    for block_type in down_block_types:
        if block_type != "DownEncoderBlock2D":
            raise NotImplementedError(f"VAE down block {block_type!r} is not implemented; SD uses 'DownEncoderBlock2D'")
    for block_type in up_block_types:
        if block_type != "UpDecoderBlock2D":
            raise NotImplementedError(f"VAE up block {block_type!r} is not implemented; SD uses 'UpDecoderBlock2D'")
