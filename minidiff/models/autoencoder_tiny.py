"""AutoencoderTiny: TAESD, Ollin Boer Bohan's tiny autoencoder for SD's latent space (github.com/madebyollin/taesd,
2023; diffusers' `AutoencoderTiny`).

TAESD was trained (distilled) to encode and decode the *same latents* as SD's AutoencoderKL, with a network about
a hundred times cheaper: plain 3x3 convolutions and ReLUs, no normalisation, no attention. Good enough for
previews (each step's predicted x0), fast few-step images, and decoding on small machines.

    encode  x (B, 3, H, W) in [-1, 1] -> (x + 1) / 2 in [0, 1]
            conv 3->64, Block                                   (B, 64, H, W)
            3 x [ stride-2 conv (no bias), 3 Blocks ]           (B, 64, H/8, W/8)
            conv 64->4                                          latents (B, 4, H/8, W/8), no sampling: deterministic
    decode  z -> 3 tanh(z / 3)                                  a soft clamp to (-3, 3)
            conv 4->64, ReLU
            3 x [ 3 Blocks, nearest x2, conv (no bias) ]        (B, 64, H, W)
            Block, conv 64->3                                   in about [0, 1] -> 2 y - 1 in [-1, 1]
    Block   ReLU( conv(ReLU(conv(ReLU(conv(x))))) + x )         3x3 convs; a 1x1 skip when channels change

SD's pipelines work on the *scaled* latents z * 0.18215 (AutoencoderKL's scaling_factor) and decode
vae.decode(latents / vae.config.scaling_factor). TAESD was trained on those scaled latents directly, so its
`scaling_factor` is 1.0: the division changes nothing and `pipe.vae = AutoencoderTiny.from_pretrained(
"madebyollin/taesd")` just works. The trap for students: *do not* multiply or divide TAESD's latents by 0.18215.

`scale_latents` / `unscale_latents` map latents to [0, 1] and back (latent_magnitude 3, latent_shift 0.5), for
storing them as 8-bit images; `forward` does that round trip (encode, quantise to bytes, decode), as diffusers'.

Two file layouts load: diffusers' (`madebyollin/taesd`: config.json + diffusion_pytorch_model.safetensors,
`encoder.layers.N...`, `decoder.layers.N...`) with `from_pretrained`, and the original pair
`taesd_encoder.safetensors` / `taesd_decoder.safetensors` with `from_original_files` (`original_to_diffusers_keys`
says how the names differ).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from minidiff.checkpoints.reader import read_state_dict
from minidiff.configuration import register_to_config
from minidiff.models.layers import get_activation
from minidiff.models.modeling import ModelMixin
from minidiff.models.vae import DecoderOutput
from minidiff.utils.cpu import conv_memory_format
from minidiff.utils.outputs import BaseOutput
from minidiff.utils.torch_utils import resolve_dtype


@dataclass
class AutoencoderTinyOutput(BaseOutput):
    """What `AutoencoderTiny.encode` returns: the latents themselves (TAESD's encoder is deterministic)."""

    latents: torch.Tensor


class AutoencoderTinyBlock(nn.Module):
    """TAESD's residual block: ReLU(conv-act-conv-act-conv(x) + skip(x)), all 3x3 convolutions."""

    def __init__(self, in_channels: int, out_channels: int, act_fn: str):
        super().__init__()
        act = get_activation(act_fn)
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), act,
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1), act,
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
        )
        self.skip = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False) if in_channels != out_channels else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class EncoderTiny(nn.Module):
    """Image in [-1, 1] -> latents. `layers` is one nn.Sequential, so the keys are `layers.<index>...` (as the original)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: tuple[int, ...], block_out_channels: tuple[int, ...],
                 act_fn: str):
        super().__init__()
        layers = []
        for i, (repeats, channels) in enumerate(zip(num_blocks, block_out_channels)):
            if i == 0:
                layers.append(nn.Conv2d(in_channels, channels, kernel_size=3, padding=1))
            else:  # halve the resolution (each level keeps its own width, as diffusers builds it)
                layers.append(nn.Conv2d(channels, channels, kernel_size=3, padding=1, stride=2, bias=False))
            layers.extend(AutoencoderTinyBlock(channels, channels, act_fn) for _ in range(repeats))
        layers.append(nn.Conv2d(block_out_channels[-1], out_channels, kernel_size=3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.add(1).div(2))  # TAESD's encoder was trained on images in [0, 1]


class DecoderTiny(nn.Module):
    """Latents -> image in [-1, 1]. The original's first layer, a Clamp module, is the tanh in `forward` here."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: tuple[int, ...], block_out_channels: tuple[int, ...],
                 upsampling_scaling_factor: int, act_fn: str, upsample_fn: str):
        super().__init__()
        layers = [nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1), get_activation(act_fn)]
        for i, (repeats, channels) in enumerate(zip(num_blocks, block_out_channels)):
            last = i == len(num_blocks) - 1
            layers.extend(AutoencoderTinyBlock(channels, channels, act_fn) for _ in range(repeats))
            if not last:
                layers.append(nn.Upsample(scale_factor=upsampling_scaling_factor, mode=upsample_fn))
            layers.append(nn.Conv2d(channels, out_channels if last else channels, kernel_size=3, padding=1, bias=last))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = torch.tanh(z / 3) * 3  # soft clamp of the latents to (-3, 3)
        return self.layers(z).mul(2).sub(1)  # [0, 1] -> [-1, 1]


def original_to_diffusers_keys(encoder_state_dict: dict, decoder_state_dict: dict) -> dict:
    """The original TAESD files' names -> diffusers' (and minidiff's):

        taesd_encoder.safetensors   "<i>.<rest>"  ->  "encoder.layers.<i>.<rest>"      (same Sequential)
        taesd_decoder.safetensors   "<i>.<rest>"  ->  "decoder.layers.<i - 1>.<rest>"  (the original's layer 0 is Clamp,
                                                                                       which has no weights)
    """
    state_dict = {f"encoder.layers.{key}": tensor for key, tensor in encoder_state_dict.items()}
    for key, tensor in decoder_state_dict.items():
        index, _, rest = key.partition(".")
        if not index.isdigit() or int(index) < 1:
            raise ValueError(f"{key!r} is not a key of an original TAESD decoder file (expected '<layer index >= 1>.<name>')")
        state_dict[f"decoder.layers.{int(index) - 1}.{rest}"] = tensor
    return state_dict


class AutoencoderTiny(ModelMixin):
    """TAESD with diffusers' API: `encode(x).latents`, `decode(z).sample`, `forward(x).sample`, `scaling_factor` 1.0."""

    # written by __init__ itself (below), so a config.json holding it is not an unknown key
    _quiet_keys = (*ModelMixin._quiet_keys, "block_out_channels")

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64),
        decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64),
        act_fn: str = "relu",
        upsample_fn: str = "nearest",
        latent_channels: int = 4,
        upsampling_scaling_factor: int = 2,
        num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3),
        num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1),
        latent_magnitude: int = 3,
        latent_shift: float = 0.5,
        force_upcast: bool = False,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
    ):
        super().__init__()
        if len(encoder_block_out_channels) != len(num_encoder_blocks):
            raise ValueError("encoder_block_out_channels and num_encoder_blocks must have one entry per level, the same number")
        if len(decoder_block_out_channels) != len(num_decoder_blocks):
            raise ValueError("decoder_block_out_channels and num_decoder_blocks must have one entry per level, the same number")
        self.encoder = EncoderTiny(in_channels, latent_channels, num_encoder_blocks, encoder_block_out_channels, act_fn)
        self.decoder = DecoderTiny(latent_channels, out_channels, num_decoder_blocks, decoder_block_out_channels,
                                   upsampling_scaling_factor, act_fn, upsample_fn)
        self.latent_magnitude = latent_magnitude
        self.latent_shift = latent_shift
        self.scaling_factor = scaling_factor
        self.use_slicing = False
        # As diffusers: `block_out_channels` (the pipelines' vae_scale_factor = 2^(levels - 1) = 8) and force_upcast=False.
        self.register_to_config(block_out_channels=decoder_block_out_channels, force_upcast=False)

    # ----- latents <-> [0, 1] (8-bit storage) -----

    def scale_latents(self, x: torch.Tensor) -> torch.Tensor:
        """latents -> [0, 1]: x / (2 latent_magnitude) + latent_shift, clamped."""
        return x.div(2 * self.latent_magnitude).add(self.latent_shift).clamp(0, 1)

    def unscale_latents(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] -> latents: (x - latent_shift) 2 latent_magnitude."""
        return x.sub(self.latent_shift).mul(2 * self.latent_magnitude)

    # ----- encode / decode -----

    def enable_slicing(self) -> None:
        """Encode and decode a batch one image at a time (less memory, same numbers)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, *args, **kwargs) -> None:
        raise NotImplementedError(
            "tiled decoding is not implemented for AutoencoderTiny in minidiff: TAESD's activations are small "
            "(64 channels), so decode the whole image; for AutoencoderKL, pipe.enable_vae_tiling() works"
        )

    def _run(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([network(one) for one in x.split(1)])
        return network(x)

    def _check_channels(self, what: str, x: torch.Tensor, channels: int) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{what} must have shape (B, {channels}, H, W), got {tuple(x.shape)}")

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderTinyOutput | tuple:
        """x (B, 3, H, W) in [-1, 1] -> AutoencoderTinyOutput(latents=(B, 4, H/8, W/8)), SD's scaled latents."""
        self._check_channels("image x", x, self.config.in_channels)
        latents = self._run(self.encoder, x)
        return AutoencoderTinyOutput(latents=latents) if return_dict else (latents,)

    def decode(self, x: torch.Tensor, generator: torch.Generator | None = None, return_dict: bool = True) -> DecoderOutput | tuple:
        """Latents (B, 4, h, w) -> DecoderOutput(sample=(B, 3, 8h, 8w) in about [-1, 1]). `generator` is unused (as diffusers)."""
        self._check_channels("latents", x, self.config.latent_channels)
        image = self._run(self.decoder, x)
        return DecoderOutput(sample=image) if return_dict else (image,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Encode, store the latents as bytes (scale_latents, x 255, round), read them back, decode."""
        latents = self.encode(sample).latents
        as_bytes = self.scale_latents(latents).mul_(255).round_().byte()
        image = self.decode(self.unscale_latents(as_bytes / 255.0)).sample
        return DecoderOutput(sample=image) if return_dict else (image,)

    # ----- loading -----

    @classmethod
    def from_state_dict(cls, config, state_dict, torch_dtype=None, source: str = "checkpoint", memory_format=None):
        """As every model's, with the conv weights laid out channels-last by default (`conv_memory_format`, as the
        pipelines lay out the VAE): TAESD is all 3x3 convolutions, which oneDNN runs several times faster so on a CPU."""
        if memory_format is None:
            memory_format = conv_memory_format("vae", torch_dtype or torch.get_default_dtype())
        return super().from_state_dict(config, state_dict, torch_dtype, source=source, memory_format=memory_format)

    # ----- the original two files -----

    @classmethod
    def from_original_files(cls, encoder_file: str | os.PathLike, decoder_file: str | os.PathLike, *,
                            dtype: torch.dtype | None = None, torch_dtype: torch.dtype | None = None,
                            memory_format: torch.memory_format | None = None):
        """TAESD from the original `taesd_encoder.safetensors` and `taesd_decoder.safetensors` (madebyollin/taesd
        on GitHub; for SD 1.x/2.x latents), with the default config. Keys are renamed by `original_to_diffusers_keys`
        and checked strictly; `.pth` files are read with torch.load(weights_only=True). `memory_format`: the conv
        weights' layout (default channels-last, see `from_state_dict`)."""
        torch_dtype = resolve_dtype(dtype, torch_dtype, deprecated=False)
        files = {"encoder_file": Path(encoder_file), "decoder_file": Path(decoder_file)}
        for name, path in files.items():
            if not path.is_file():
                raise FileNotFoundError(
                    f"{name}: no file at {path}. Give the original TAESD files, taesd_encoder.safetensors and "
                    "taesd_decoder.safetensors (or load the diffusers layout with AutoencoderTiny.from_pretrained('madebyollin/taesd'))"
                )
        dtype = torch_dtype or torch.get_default_dtype()
        encoder = read_state_dict([files["encoder_file"]], dtype)
        decoder = read_state_dict([files["decoder_file"]], dtype)
        if any(key.startswith("decoder.") for key in decoder) or any(key.startswith("encoder.") for key in encoder):
            raise ValueError(
                f"{encoder_file} / {decoder_file} hold diffusers-layout keys ('encoder.layers...'): load that layout "
                "with AutoencoderTiny.from_pretrained(folder)"
            )
        state_dict = original_to_diffusers_keys(encoder, decoder)
        return cls.from_state_dict({}, state_dict, dtype, source=f"{encoder_file} + {decoder_file}",  # {}: the default config
                                   memory_format=memory_format)
