"""Line charts drawn with Pillow alone (no plotting library), and the fonts and colours of every picture.

    loglog_plot({"Euler": (steps, errors), ...}, "accuracy.png", title=..., x_label=..., y_label=...)
    loglog_panels({"first order": {...}, "multistep": {...}}, "accuracy.png", columns=2)   # one chart per group,
                                                                                           # the same axes in each
    line_plot({"SD 1.5": (t, log_snr), ...}, "snr.png", ...)        linear axes; also 2-D paths (x = dim 0, y = dim 1)

Grids of images are in grid.py.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# Distinct, color-blind-friendly-ish line colors (Tableau 10, then darker variants).
PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 128), (128, 0, 0),
    (0, 100, 0), (255, 0, 255), (0, 0, 0), (160, 82, 45),
)
GRID, AXIS, TEXT, GUIDE = (225, 225, 225), (60, 60, 60), (20, 20, 20), (150, 150, 150)


def font(size: int = 14) -> ImageFont.ImageFont:
    """Pillow's built-in font at `size` (a fixed bitmap font on Pillow builds without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _dashed_line(draw: ImageDraw.ImageDraw, start, end, fill, width: int = 2, dash: float = 8.0) -> None:
    (x0, y0), (x1, y1) = start, end
    length = math.hypot(x1 - x0, y1 - y0)
    pieces = max(1, int(length // dash))
    for i in range(0, pieces, 2):
        a, b = i / pieces, min(1.0, (i + 1) / pieces)
        draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))], fill=fill, width=width)


def tick_label(value: float) -> str:
    """A short axis label: 2 significant digits below 100 (0.041, 1.5, 15), whole numbers above (200, 1000)."""
    return f"{value:.0f}" if value >= 100 else f"{value:.2g}"


def spaced_labels(centers: list[float], half_widths: list[float], gap: float = 6) -> list[int]:
    """Which labels to draw, left to right, so that none overlaps the one before (centers in increasing order)."""
    kept, end = [], -math.inf
    for index, (center, half) in enumerate(zip(centers, half_widths)):
        if center - half > end + gap:
            kept.append(index)
            end = center + half
    return kept


def _finite_points(series: dict[str, tuple[list[float], list[float]]]) -> dict[str, list[tuple[float, float]]]:
    return {
        label: [(x, y) for x, y in zip(xs, ys) if x > 0 and y is not None and math.isfinite(y) and y > 0]
        for label, (xs, ys) in series.items()
    }


def loglog_plot(
    series: dict[str, tuple[list[float], list[float]]],
    path: str | Path,
    title: str = "",
    x_label: str = "",
    y_label: str = "",
    dashed: tuple[str, ...] = (),
    guide_orders: tuple[int, ...] = (1, 2),
    size: tuple[int, int] = (1000, 640),
    colors: dict[str, tuple[int, int, int]] | None = None,
) -> Path:
    """A log-log line chart of `series` (label -> (x values, y values)), written as PNG to `path`.

    Non-finite or non-positive y values are left out (a diverged run shows as a missing line).
    Gray dashed guides show the slopes of order 1, 2, ... (error ~ steps^-p) for comparison.
    colors: a colour per label (default: the palette in order). The x axis is labelled at each measured x,
    leaving out a label that would overlap the previous one.
    """
    image = loglog_image(series, title, x_label, y_label, dashed, guide_orders, size, colors)
    return save_png(image, path)


def loglog_panels(
    panels: dict[str, dict[str, tuple[list[float], list[float]]]],
    path: str | Path,
    columns: int = 2,
    title: str = "",
    x_label: str = "",
    y_label: str = "",
    dashed: tuple[str, ...] = (),
    guide_orders: tuple[int, ...] = (1, 2),
    panel_size: tuple[int, int] = (760, 400),
    colors: dict[str, tuple[int, int, int]] | None = None,
) -> Path:
    """Several log-log charts on the same axes, one per group (panel title -> series), `columns` per row.

    Fewer lines per chart than one `loglog_plot` of everything, and the shared axes keep the groups comparable.
    colors: a colour per label, the same in every panel (e.g. a gray reference line); the other lines of a panel take
    the palette in order.
    """
    all_points = [point for series in panels.values() for pts in _finite_points(series).values() for point in pts]
    if not all_points:
        raise ValueError("loglog_panels needs at least one positive, finite point to draw")
    bounds = _log_bounds([x for x, _ in all_points], [y for _, y in all_points])
    images = [
        loglog_image(series, panel_title, x_label, y_label, dashed, guide_orders, panel_size, colors, bounds)
        for panel_title, series in panels.items()
    ]
    cell_w, cell_h = max(image.width for image in images), max(image.height for image in images)
    header = 40 if title else 0
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (min(columns, len(images)) * cell_w, header + rows * cell_h), "white")
    for index, image in enumerate(images):
        sheet.paste(image, ((index % columns) * cell_w, header + (index // columns) * cell_h))
    if title:
        ImageDraw.Draw(sheet).text((sheet.width / 2, 12), title, fill=TEXT, font=font(18), anchor="mt")
    return save_png(sheet, path)


def _log_bounds(all_x: list[float], all_y: list[float]) -> tuple[float, float, int, int]:
    """(log10 x from, log10 x to, y decade from, y decade to) framing the points."""
    lx0, lx1 = math.log10(min(all_x)), math.log10(max(all_x))
    lx0, lx1 = (lx0 - 0.05, lx1 + 0.05) if lx1 > lx0 else (lx0 - 0.5, lx1 + 0.5)
    ly0, ly1 = math.floor(math.log10(min(all_y))), math.ceil(math.log10(max(all_y)))
    return lx0, lx1, ly0, ly1 if ly1 > ly0 else ly0 + 1


def loglog_image(
    series: dict[str, tuple[list[float], list[float]]],
    title: str = "",
    x_label: str = "",
    y_label: str = "",
    dashed: tuple[str, ...] = (),
    guide_orders: tuple[int, ...] = (1, 2),
    size: tuple[int, int] = (1000, 640),
    colors: dict[str, tuple[int, int, int]] | None = None,
    bounds: tuple[float, float, int, int] | None = None,
) -> Image.Image:
    """The chart of `loglog_plot` as a Pillow image; `bounds` (see `_log_bounds`) fixes the axes, e.g. across panels."""
    points = _finite_points(series)
    all_x = [x for pts in points.values() for x, _ in pts]
    all_y = [y for pts in points.values() for _, y in pts]
    if not all_x:
        raise ValueError("loglog_plot needs at least one positive, finite point to draw")
    small, large = font(13), font(17)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend_width = max(measure.textlength(label + " (no data)", font=small) for label in series)
    width, height = size[0] + max(0, int(legend_width) - 180), size[1]  # widen the canvas for long labels
    left, right, top, bottom = 90, int(legend_width) + 60, 50, 70
    plot_w, plot_h = width - left - right, height - top - bottom
    lx0, lx1, ly0, ly1 = bounds or _log_bounds(all_x, all_y)

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return (
            left + (math.log10(x) - lx0) / (lx1 - lx0) * plot_w,
            top + (ly1 - math.log10(y)) / (ly1 - ly0) * plot_h,
        )

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for decade in range(ly0, ly1 + 1):  # horizontal grid line and label per decade
        _, y = to_pixel(10 ** lx0, 10.0**decade)
        draw.line([(left, y), (left + plot_w, y)], fill=GRID)
        draw.text((left - 8, y), f"1e{decade}", fill=TEXT, font=small, anchor="rm")
    x_values = sorted(set(all_x))
    x_pixels = [to_pixel(x_value, 10.0**ly0)[0] for x_value in x_values]
    texts = [tick_label(x_value) for x_value in x_values]
    for x in x_pixels:  # a vertical grid line per measured x
        draw.line([(x, top), (x, top + plot_h)], fill=GRID)
    for index in spaced_labels(x_pixels, [measure.textlength(text, font=small) / 2 for text in texts]):
        draw.text((x_pixels[index], top + plot_h + 8), texts[index], fill=TEXT, font=small, anchor="mt")
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=AXIS)

    x_first, x_last = min(all_x), max(all_x)
    y_anchor = 10 ** (ly1 - 0.15)
    for order in guide_orders:  # y = y_anchor (x / x_first)^-order, clipped to the plot
        y_end = y_anchor * (x_last / x_first) ** -order
        x_end = x_last if y_end >= 10.0**ly0 else x_first * (y_anchor / 10.0**ly0) ** (1 / order)
        start, end = to_pixel(x_first, y_anchor), to_pixel(x_end, y_anchor * (x_end / x_first) ** -order)
        _dashed_line(draw, start, end, GUIDE, width=1)
        draw.text((end[0] - 4, end[1] - 4), f"order {order}", fill=GUIDE, font=small, anchor="rb")

    for index, (label, pts) in enumerate(points.items()):
        color = (colors or {}).get(label, PALETTE[index % len(PALETTE)])
        pixels = [to_pixel(x, y) for x, y in pts]
        for a, b in zip(pixels, pixels[1:]):
            if label in dashed:
                _dashed_line(draw, a, b, color, width=2)
            else:
                draw.line([a, b], fill=color, width=2)
        for x, y in pixels:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        legend_y = top + 6 + 20 * index  # legend on the right
        if label in dashed:
            _dashed_line(draw, (left + plot_w + 14, legend_y), (left + plot_w + 40, legend_y), color, width=3, dash=5)
        else:
            draw.line([(left + plot_w + 14, legend_y), (left + plot_w + 40, legend_y)], fill=color, width=3)
        suffix = "" if pts else " (no data)"
        draw.text((left + plot_w + 46, legend_y), label + suffix, fill=TEXT, font=small, anchor="lm")

    draw.text((left + plot_w / 2, 18), title, fill=TEXT, font=large, anchor="mt")
    draw.text((left + plot_w / 2, height - 24), x_label, fill=TEXT, font=font(14), anchor="mm")
    y_text = Image.new("RGB", (plot_h, 24), "white")  # the y label, drawn sideways
    ImageDraw.Draw(y_text).text((plot_h / 2, 12), y_label, fill=TEXT, font=font(14), anchor="mm")
    image.paste(y_text.rotate(90, expand=True), (8, top))
    return image


def _nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """About `count` round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    raw = (high - low) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def line_plot(
    series: dict[str, tuple[list[float], list[float]]],
    path: str | Path,
    title: str = "",
    x_label: str = "",
    y_label: str = "",
    colors: dict[str, int] | None = None,
    markers: tuple[str, ...] = (),
    size: tuple[int, int] = (1000, 640),
    equal_aspect: bool = False,
) -> Path:
    """A line chart with linear axes of `series` (label -> (x values, y values)), written as PNG to `path`.

    Labels starting with "_" are drawn but left out of the legend (e.g. many paths of one kind); `colors` maps a
    label to a PALETTE index (default: its position); labels in `markers` get a dot at each point. Non-finite
    values are left out. `equal_aspect` gives both axes the same scale (2-D paths)."""
    points = {
        label: [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)] for label, (xs, ys) in series.items()
    }
    all_x = [x for pts in points.values() for x, _ in pts]
    all_y = [y for pts in points.values() for _, y in pts]
    if not all_x:
        raise ValueError("line_plot needs at least one finite point to draw")
    small, large = font(13), font(17)
    shown = [label for label in series if not label.startswith("_")]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend_width = max([measure.textlength(label, font=small) for label in shown] or [0])
    width, height = size[0] + max(0, int(legend_width) - 180), size[1]
    left, right, top, bottom = 90, int(legend_width) + 60, 50, 70
    plot_w, plot_h = width - left - right, height - top - bottom
    x0, x1, y0, y1 = min(all_x), max(all_x), min(all_y), max(all_y)
    x0, x1 = (x0, x1) if x1 > x0 else (x0 - 1, x1 + 1)
    y0, y1 = (y0, y1) if y1 > y0 else (y0 - 1, y1 + 1)
    if equal_aspect:  # widen the narrower range so one unit is as long on both axes
        per_pixel = max((x1 - x0) / plot_w, (y1 - y0) / plot_h)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        x0, x1 = cx - per_pixel * plot_w / 2, cx + per_pixel * plot_w / 2
        y0, y1 = cy - per_pixel * plot_h / 2, cy + per_pixel * plot_h / 2

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * plot_w, top + (y1 - y) / (y1 - y0) * plot_h

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for value in _nice_ticks(y0, y1):
        _, y = to_pixel(x0, value)
        draw.line([(left, y), (left + plot_w, y)], fill=GRID)
        draw.text((left - 8, y), f"{value:g}", fill=TEXT, font=small, anchor="rm")
    for value in _nice_ticks(x0, x1):
        x, _ = to_pixel(value, y0)
        draw.line([(x, top), (x, top + plot_h)], fill=GRID)
        draw.text((x, top + plot_h + 8), f"{value:g}", fill=TEXT, font=small, anchor="mt")
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=AXIS)
    for index, (label, pts) in enumerate(points.items()):
        color = PALETTE[(colors or {}).get(label, index) % len(PALETTE)]
        pixels = [to_pixel(x, y) for x, y in pts]
        if len(pixels) > 1:
            draw.line(pixels, fill=color, width=2)
        if label in markers:
            for x, y in pixels:
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
    for row, label in enumerate(shown):
        color = PALETTE[(colors or {}).get(label, list(series).index(label)) % len(PALETTE)]
        legend_y = top + 6 + 20 * row
        draw.line([(left + plot_w + 14, legend_y), (left + plot_w + 40, legend_y)], fill=color, width=3)
        draw.text((left + plot_w + 46, legend_y), label, fill=TEXT, font=small, anchor="lm")
    draw.text((left + plot_w / 2, 18), title, fill=TEXT, font=large, anchor="mt")
    draw.text((left + plot_w / 2, height - 24), x_label, fill=TEXT, font=font(14), anchor="mm")
    y_text = Image.new("RGB", (plot_h, 24), "white")
    ImageDraw.Draw(y_text).text((plot_h / 2, 12), y_label, fill=TEXT, font=font(14), anchor="mm")
    image.paste(y_text.rotate(90, expand=True), (8, top))
    return save_png(image, path)


def save_png(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
