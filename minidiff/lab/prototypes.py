"""Prototype images drawn with Pillow: the means mu_k of an image-shaped Gaussian mixture.

A mixture whose components sit on recognizable pictures (shapes and small scenes) makes sampling
errors visible: a good scheduler lands on a clean picture plus a little grain (the component's
spread s), a poor one leaves noise or a blend of two pictures. Everything is drawn procedurally at
4x the size and downsampled (anti-aliased), so no image files ship with the package.

    means = prototype_means(size=32)     # (8, 3, 32, 32) in [-1, 1], the range SD's VAE and DDPM use
    names = PROTOTYPE_NAMES              # ("circle", "square", ..., "boat"): class k is names[k]
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

PROTOTYPE_NAMES = ("circle", "square", "triangle", "smiley", "house", "tree", "mountain", "boat")

SUPERSAMPLE = 4  # draw at 4x and downsample, for smooth edges

SKY, GRASS, SEA, WHITE = (135, 190, 235), (90, 160, 70), (40, 90, 170), (245, 245, 240)


def _circle(draw: ImageDraw.ImageDraw, n: int) -> None:
    draw.rectangle([0, 0, n, n], fill=WHITE)
    draw.ellipse([0.2 * n, 0.2 * n, 0.8 * n, 0.8 * n], fill=(220, 40, 40))


def _square(draw: ImageDraw.ImageDraw, n: int) -> None:
    draw.rectangle([0, 0, n, n], fill=(250, 230, 120))
    draw.rectangle([0.22 * n, 0.22 * n, 0.78 * n, 0.78 * n], fill=(40, 70, 200))


def _triangle(draw: ImageDraw.ImageDraw, n: int) -> None:
    draw.rectangle([0, 0, n, n], fill=(40, 40, 50))
    draw.polygon([(0.5 * n, 0.15 * n), (0.85 * n, 0.8 * n), (0.15 * n, 0.8 * n)], fill=(60, 200, 90))


def _smiley(draw: ImageDraw.ImageDraw, n: int) -> None:
    draw.rectangle([0, 0, n, n], fill=(120, 200, 220))
    draw.ellipse([0.12 * n, 0.12 * n, 0.88 * n, 0.88 * n], fill=(255, 215, 0), outline=(40, 30, 0), width=n // 32)
    for x in (0.36, 0.64):
        draw.ellipse([(x - 0.06) * n, 0.32 * n, (x + 0.06) * n, 0.46 * n], fill=(40, 30, 0))
    draw.arc([0.3 * n, 0.35 * n, 0.7 * n, 0.72 * n], start=20, end=160, fill=(40, 30, 0), width=n // 20)


def _house(draw: ImageDraw.ImageDraw, n: int) -> None:
    draw.rectangle([0, 0, n, 0.7 * n], fill=SKY)
    draw.rectangle([0, 0.7 * n, n, n], fill=GRASS)
    draw.rectangle([0.28 * n, 0.45 * n, 0.72 * n, 0.78 * n], fill=(230, 220, 190))
    draw.polygon([(0.2 * n, 0.47 * n), (0.5 * n, 0.2 * n), (0.8 * n, 0.47 * n)], fill=(180, 40, 30))
    draw.rectangle([0.45 * n, 0.6 * n, 0.56 * n, 0.78 * n], fill=(110, 70, 40))


def _tree(draw: ImageDraw.ImageDraw, n: int) -> None:
    draw.rectangle([0, 0, n, 0.75 * n], fill=SKY)
    draw.rectangle([0, 0.75 * n, n, n], fill=GRASS)
    draw.rectangle([0.45 * n, 0.5 * n, 0.55 * n, 0.85 * n], fill=(110, 70, 40))
    draw.ellipse([0.22 * n, 0.1 * n, 0.78 * n, 0.6 * n], fill=(30, 120, 40))
    draw.ellipse([0.72 * n, 0.06 * n, 0.92 * n, 0.26 * n], fill=(255, 220, 60))


def _mountain(draw: ImageDraw.ImageDraw, n: int) -> None:
    for row in range(n):  # a vertical sky gradient, one line per pixel row
        shade = row / n
        draw.line([(0, row), (n, row)], fill=(int(90 + 120 * shade), int(130 + 90 * shade), 230))
    draw.polygon([(0.0, 0.9 * n), (0.45 * n, 0.25 * n), (0.95 * n, 0.9 * n)], fill=(110, 110, 120))
    draw.polygon([(0.34 * n, 0.41 * n), (0.45 * n, 0.25 * n), (0.56 * n, 0.41 * n)], fill=WHITE)
    draw.rectangle([0, 0.88 * n, n, n], fill=(70, 120, 60))


def _boat(draw: ImageDraw.ImageDraw, n: int) -> None:
    draw.rectangle([0, 0, n, 0.65 * n], fill=(250, 200, 150))
    draw.rectangle([0, 0.65 * n, n, n], fill=SEA)
    draw.polygon([(0.2 * n, 0.62 * n), (0.8 * n, 0.62 * n), (0.7 * n, 0.75 * n), (0.3 * n, 0.75 * n)], fill=(120, 60, 30))
    draw.polygon([(0.5 * n, 0.15 * n), (0.5 * n, 0.6 * n), (0.78 * n, 0.6 * n)], fill=WHITE)
    draw.line([(0.5 * n, 0.12 * n), (0.5 * n, 0.62 * n)], fill=(60, 40, 20), width=max(1, n // 40))


_PAINTERS = dict(zip(PROTOTYPE_NAMES, (_circle, _square, _triangle, _smiley, _house, _tree, _mountain, _boat)))


def draw_prototype(name: str, size: int = 32) -> Image.Image:
    """One prototype as a size x size RGB PIL image."""
    if name not in _PAINTERS:
        raise ValueError(f"unknown prototype {name!r}; choose from {', '.join(PROTOTYPE_NAMES)}")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an integer >= 8 (pixels), got {size!r}")
    n = size * SUPERSAMPLE
    image = Image.new("RGB", (n, n))
    _PAINTERS[name](ImageDraw.Draw(image), n)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def prototype_images(size: int = 32, names: tuple[str, ...] = PROTOTYPE_NAMES) -> list[Image.Image]:
    """The prototypes `names` as PIL images."""
    return [draw_prototype(name, size) for name in names]


def prototype_means(size: int = 32, names: tuple[str, ...] = PROTOTYPE_NAMES, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The prototypes as a (K, 3, size, size) tensor in [-1, 1]: the component means mu_k."""
    return torch.stack([pil_to_tensor(image, dtype) for image in prototype_images(size, names)])


def pil_to_tensor(image: Image.Image, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) tensor in [-1, 1]."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(pixels).permute(2, 0, 1).to(dtype)


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) tensor in [-1, 1] -> RGB PIL image (values outside [-1, 1] are clipped)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image tensor of shape (3, H, W), got {tuple(image.shape)}")
    pixels = ((image.detach().double().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())
