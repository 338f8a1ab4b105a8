"""What the tutorials share: where minidiff is, where the pictures go, which weights to use.

Every tutorial starts with `import tutorial_helpers as helpers`. Environment variables (all optional):

    MINIDIFF_TUTORIAL_OUT   the folder for pictures (default tutorials/out/); tutorial NN_name writes into
                            <folder>/NN_name/
    MINIDIFF_SD15           real Stable Diffusion 1.5 weights: a diffusers folder (unet/, vae/, text_encoder/,
                            tokenizer/, scheduler/) or one original checkpoint file (v1-5-pruned-emaonly.safetensors).
                            Unset: tiny random weights in the same layout, written once into the output folder.
                            They make noise, not pictures, but every shape, line and number of the loop is real.
    MINIDIFF_DDPM           a google/ddpm-cat-256 folder, for the last section of tutorial 01.
    MINIDIFF_SD15_INPAINTING  stable-diffusion-v1-5/stable-diffusion-inpainting (a folder or one checkpoint file),
                            for the real example of tutorial 12.

Get the weights with `minidiff download` (see the README); no tutorial needs a network.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch
from PIL import Image

TUTORIALS = Path(__file__).resolve().parent
REPO = TUTORIALS.parent

try:
    import minidiff  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`: use the checkout's minidiff
    sys.path.insert(0, str(REPO))


def output_folder(name: str) -> Path:
    """The folder tutorial `name` writes its pictures into, created if missing."""
    root = Path(os.environ.get("MINIDIFF_TUTORIAL_OUT") or TUTORIALS / "out").expanduser()
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


WEIGHTS_VARIABLES = {
    "MINIDIFF_SD15": "an SD 1.5 diffusers folder or one checkpoint file",
    "MINIDIFF_DDPM": "a google/ddpm-cat-256 folder",
    "MINIDIFF_SD15_INPAINTING": "an SD 1.5 inpainting diffusers folder or checkpoint file",
}


def weights_from_environment(variable: str) -> Path | None:
    """The path in environment variable `variable`, or None when it is unset; a clear error when it does not exist."""
    value = os.environ.get(variable, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.exists():
        raise ValueError(
            f"{variable}={value} does not exist; point it at {WEIGHTS_VARIABLES.get(variable, 'the weights')}, "
            f"or unset it to run without those weights"
        )
    return path


def sd15_weights() -> tuple[Path, bool]:
    """(path, real): MINIDIFF_SD15 when set (real=True), else a tiny random SD 1.5 folder (real=False)."""
    path = weights_from_environment("MINIDIFF_SD15")
    if path is not None:
        return path, True
    return tiny_sd15_folder(), False


def tiny_sd15_folder(seed: int = 0) -> Path:
    """A tiny random SD 1.5 folder (real layout and tokenizer, narrow networks), written once and reused."""
    folder = output_folder(f"tiny-random-sd15-seed{seed}")
    if not (folder / "model_index.json").is_file():
        load_weights_script("make_random_sd15").make_random_sd15(folder, seed=seed, tiny=True)
    return folder


def load_weights_script(name: str):
    """Import a script of weights_scripts/ (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "weights_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def describe(name: str, x: torch.Tensor) -> str:
    """One line on a tensor: its shape, dtype, mean and standard deviation (printed by the tutorials)."""
    x = torch.as_tensor(x)
    line = f"{name}: shape {tuple(x.shape)}, {str(x.dtype).replace('torch.', '')}"
    if x.is_floating_point() and x.numel() > 0:
        line += f", mean {x.double().mean().item():+.4f}"
        if x.numel() > 1:
            line += f", std {x.double().std().item():.4f}"
    print(line)
    return line


def enlarge(image: Image.Image, size: int = 96) -> Image.Image:
    """A small picture scaled up to size x size with nearest-neighbour, so each pixel stays visible."""
    return image.resize((size, size), Image.Resampling.NEAREST)


def draw_scatter_panels(
    panels: dict[str, torch.Tensor],
    path,
    bounds: tuple[float, float, float, float] = (-6.0, 6.0, -6.0, 6.0),
    marks: torch.Tensor | None = None,
    panel_size: int = 240,
) -> Image.Image:
    """2-D point clouds side by side, one panel per entry of `panels` (title -> (N, 2) points).

    bounds: (x_min, x_max, y_min, y_max) of every panel; marks: (K, 2) points drawn as black crosses
    (e.g. the mixture's means). Points outside the bounds are left out.
    """
    from PIL import ImageDraw

    from minidiff.viz.plotting import font

    x_min, x_max, y_min, y_max = bounds
    title_height, gap = 26, 12
    picture = Image.new("RGB", (len(panels) * (panel_size + gap) + gap, panel_size + title_height + gap), "white")
    draw = ImageDraw.Draw(picture)
    for index, (title, points) in enumerate(panels.items()):
        left, top = gap + index * (panel_size + gap), title_height

        def to_pixel(x: float, y: float) -> tuple[float, float]:
            return left + (x - x_min) / (x_max - x_min) * panel_size, top + (y_max - y) / (y_max - y_min) * panel_size

        draw.rectangle([left, top, left + panel_size, top + panel_size], outline=(120, 120, 120))
        draw.text((left + panel_size / 2, 6), title, fill=(20, 20, 20), font=font(13), anchor="mt")
        for x, y in points.reshape(-1, 2).tolist():
            if x_min < x < x_max and y_min < y < y_max:
                px, py = to_pixel(x, y)
                draw.rectangle([px - 1, py - 1, px, py], fill=(31, 119, 180))
        for x, y in ([] if marks is None else marks.reshape(-1, 2).tolist()):
            px, py = to_pixel(x, y)
            draw.line([(px - 5, py - 5), (px + 5, py + 5)], fill=(0, 0, 0), width=2)
            draw.line([(px - 5, py + 5), (px + 5, py - 5)], fill=(0, 0, 0), width=2)
    picture.save(path)
    return picture
