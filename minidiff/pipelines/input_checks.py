"""Checks every pipeline (and the CLI, and the sweep spec) makes on its arguments before any heavy work.

    check_finite(guidance_scale=7.5, eta=0.0)           # NaN or inf in any float argument: an error naming it
    check_image_size(height, width, batch_size=2, vae_tiling=False)

The size bound is a plain one, not an estimate: at most MAX_SIDE (4096) pixels per side, and a batch of at most
MAX_SIDE x MAX_SIDE pixels in all (e.g. 64 images of 512x512); with VAE tiling, MAX_SIDE_TILED (8192). SD 1.5
was trained at 512x512. Past the bound the latents, the UNet's activations and above all the VAE decode (an
untiled 1024x1024 decode already peaks at about 3 GB in fp32) grow far beyond the memory of any ordinary
machine, so a typo such as height=10**6 is refused here, before a single tensor is allocated.
"""

from __future__ import annotations

import math

import torch

MAX_SIDE = 4096
MAX_SIDE_TILED = 8192


def check_finite(**values) -> None:
    """Each keyword's value (a number, a sequence of numbers or a tensor; None is skipped) must be finite."""
    for name, value in values.items():
        if value is None:
            continue
        try:
            if isinstance(value, torch.Tensor):
                finite = bool(torch.isfinite(value).all()) if value.is_floating_point() else True
            elif isinstance(value, (list, tuple)):
                finite = all(math.isfinite(float(item)) for item in value)
            else:
                finite = math.isfinite(float(value))
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a number, got {value!r}") from None
        if not finite:
            raise ValueError(f"{name}={value!r} is not a finite number: NaN and infinity are refused; give a real value")


def check_image_size(height: int, width: int, batch_size: int = 1, vae_tiling: bool = False) -> None:
    """Refuses a size (or batch) whose latents, activations and decode cannot fit: see the module's docstring."""
    side = MAX_SIDE_TILED if vae_tiling else MAX_SIDE
    how = "with VAE tiling" if vae_tiling else f"without VAE tiling (up to {MAX_SIDE_TILED} with pipe.enable_vae_tiling() / --vae-tiling)"
    if height > side or width > side:
        raise ValueError(
            f"height={height}, width={width} is too large: minidiff allows at most {side} pixels per side {how}; "
            f"SD 1.5 is trained at 512x512. Choose a smaller size"
        )
    if batch_size < 1:
        raise ValueError(f"the batch has {batch_size} images; ask for at least 1")
    if batch_size * height * width > side * side:
        raise ValueError(
            f"{batch_size} images of {width}x{height} are too many at once: minidiff allows at most {side}x{side} "
            f"pixels per call {how}. Ask for fewer images per call (num_images_per_prompt / batch_size), or a smaller size"
        )
