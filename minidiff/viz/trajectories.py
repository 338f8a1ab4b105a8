"""Paths in the plane: exact curves in gray, a sampler's discrete steps on top, one panel per (sampler, steps).

    trajectory_plot({"DDIM, 5 steps": (exact_points, step_points), ...}, "paths.png", columns=4, marks=means)

`exact_points` is (P, B, 2): B paths of P points each, drawn as wide light-gray curves with a ring where each
ends; `step_points` is (S, B, 2): where the sampler's sample is at its start and after each step, drawn as
coloured dots joined by straight lines (a step jumps from point to point; it does not follow a curve). The
last dot of each path is larger: when it sits inside the ring, the sampler landed where the exact path does.
Any (..., 2, 1, 1) sample shape works: points are flattened to (S, B, 2). Pillow only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from minidiff.viz.plotting import PALETTE, TEXT, font, save_png

EXACT_PATH = (200, 200, 200)
MEAN_MARK = (0, 0, 0)


def _as_paths(points: torch.Tensor) -> torch.Tensor:
    points = torch.as_tensor(points, dtype=torch.float64)
    if points.dim() < 3 or points[0, 0].numel() != 2:
        raise ValueError(f"expected (points along the path, paths, 2) or (..., 2, 1, 1), got {tuple(points.shape)}")
    return points.reshape(points.shape[0], points.shape[1], 2)


def trajectory_plot(
    panels: dict[str, tuple[torch.Tensor, torch.Tensor]],
    path: str | Path,
    columns: int = 4,
    bounds: tuple[float, float, float, float] = (-4.0, 4.0, -4.0, 4.0),
    marks: torch.Tensor | None = None,
    colors: dict[str, tuple[int, int, int]] | None = None,
    title: str = "",
    panel_size: int = 260,
) -> Path:
    """Panels of exact paths (gray) with a sampler's steps on top (colour), left to right, `columns` per row.

    bounds: (x_min, x_max, y_min, y_max) of every panel; marks: (K, 2) points drawn as black crosses (e.g. the
    mixture's means); colors: a colour per panel title (default: the palette in order). Returns the PNG's path.
    """
    if not panels:
        raise ValueError("trajectory_plot needs at least one panel")
    x_min, x_max, y_min, y_max = bounds
    gap, title_height, header = 12, 24, 34 if title else 0
    rows = (len(panels) + columns - 1) // columns
    width = min(columns, len(panels)) * (panel_size + gap) + gap
    height = header + rows * (panel_size + title_height + gap) + gap
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((width / 2, 10), title, fill=TEXT, font=font(17), anchor="mt")
    for index, (label, (exact, steps)) in enumerate(panels.items()):
        exact, steps = _as_paths(exact), _as_paths(steps)
        color = (colors or {}).get(label, PALETTE[index % len(PALETTE)])
        left = gap + (index % columns) * (panel_size + gap)
        top = header + (index // columns) * (panel_size + title_height + gap) + title_height

        panel = Image.new("RGB", (panel_size, panel_size), "white")  # its own canvas: what falls outside is clipped
        pen = ImageDraw.Draw(panel)

        def to_pixel(point) -> tuple[float, float]:
            x, y = float(point[0]), float(point[1])
            return (x - x_min) / (x_max - x_min) * panel_size, (y_max - y) / (y_max - y_min) * panel_size

        for b in range(exact.shape[1]):
            pen.line([to_pixel(p) for p in exact[:, b]], fill=EXACT_PATH, width=3)
            px, py = to_pixel(exact[-1, b])  # where the exact path ends: a ring
            pen.ellipse([px - 6, py - 6, px + 6, py + 6], outline=(90, 90, 90), width=1)
        for b in range(steps.shape[1]):
            pixels = [to_pixel(p) for p in steps[:, b]]
            pen.line(pixels, fill=color, width=1)
            for k, (px, py) in enumerate(pixels):
                r = 3 if k == len(pixels) - 1 else 1.5
                pen.ellipse([px - r, py - r, px + r, py + r], fill=color)
        for mark in [] if marks is None else torch.as_tensor(marks).reshape(-1, 2).tolist():
            px, py = to_pixel(mark)
            pen.line([(px - 5, py - 5), (px + 5, py + 5)], fill=MEAN_MARK, width=2)
            pen.line([(px - 5, py + 5), (px + 5, py - 5)], fill=MEAN_MARK, width=2)
        pen.rectangle([0, 0, panel_size - 1, panel_size - 1], outline=(120, 120, 120))
        image.paste(panel, (left, top))
        draw.text((left + panel_size / 2, top - title_height / 2), label, fill=TEXT, font=font(13), anchor="mm")
    return save_png(image, path)
