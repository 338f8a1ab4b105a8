"""One grid of pictures for every purpose: a contact sheet, a captioned comparison, a labelled table.

    image_grid([[a, b], [c, None]])                                        # rows of images; None: an empty cell
    image_grid(rows, row_labels, column_labels, "table.png", title="...")  # a labelled table, saved as PNG
    image_grid(rows, captions=[["DDIM, 25 steps", ...], ...])              # a caption under each image
    tile(images, columns=4)                   # a flat list, left to right and top to bottom, no labels
    labeled_grid(images, labels, columns=4)   # a flat list with a caption under each image

Every cell has the size of the first image times `scale` (enlarged with nearest-neighbour, so the pixels of
a 32x32 picture stay visible). Labels and captions are drawn with Pillow's fonts; no plotting library.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from minidiff.viz.plotting import TEXT, font, save_png

LABEL_WIDTH, HEADER_HEIGHT, TITLE_HEIGHT, CAPTION_HEIGHT, PAD = 190, 28, 34, 22, 6


def image_grid(
    cells: list[list[Image.Image | None]],
    row_labels: list[str] | None = None,
    column_labels: list[str] | None = None,
    path: str | Path | None = None,
    title: str = "",
    scale: int = 2,
    captions: list[list[str]] | None = None,
) -> Image.Image | Path:
    """Rows of images as one picture; returns it, or the PNG's path when `path` is given."""
    _check_shape(cells, row_labels, column_labels, captions)
    first = next((image for row in cells for image in row if image is not None), None)
    if first is None:
        raise ValueError("image_grid needs at least one image")
    cell_w, cell_h = first.width * scale, first.height * scale
    labelled = bool(row_labels or column_labels or title)
    pad = PAD if labelled else 0
    left = LABEL_WIDTH if row_labels else 0
    top = (TITLE_HEIGHT if title else 0) + (HEADER_HEIGHT if column_labels else 0)
    row_height = cell_h + (CAPTION_HEIGHT if captions else 0) + pad
    columns = max(len(row) for row in cells)
    sheet = Image.new("RGB", (left + columns * (cell_w + pad) + pad, top + len(cells) * row_height + pad), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((sheet.width / 2, 10), title, fill=TEXT, font=font(17), anchor="mt")
    for c, label in enumerate(column_labels or []):
        draw.text((left + pad + c * (cell_w + pad) + cell_w / 2, top - HEADER_HEIGHT / 2), label, fill=TEXT, font=font(14), anchor="mm")
    for r, row in enumerate(cells):
        y = top + r * row_height + pad
        if row_labels:
            draw.text((left - 8, y + cell_h / 2), row_labels[r], fill=TEXT, font=font(14), anchor="rm")
        for c, image in enumerate(row):
            x = left + pad + c * (cell_w + pad)
            if image is not None:
                sheet.paste(image.convert("RGB").resize((cell_w, cell_h), Image.Resampling.NEAREST), (x, y))
            if captions and captions[r][c]:
                draw.text((x + 4, y + cell_h + 4), captions[r][c], fill=TEXT, font=font(12))
    return save_png(sheet, path) if path is not None else sheet


def rows_of(items: list, columns: int) -> list[list]:
    """A flat list cut into rows of `columns` (the last row may be shorter)."""
    return [items[start:start + columns] for start in range(0, len(items), columns)]


def tile(images: list[Image.Image], columns: int) -> Image.Image:
    """Equally sized images in a grid of `columns` columns, left to right, top to bottom, nothing between them."""
    if not images:
        raise ValueError("tile needs at least one image")
    return image_grid(rows_of(images, columns), scale=1)


def labeled_grid(images: list[Image.Image], labels: list[str], columns: int | None = None) -> Image.Image:
    """Images in a grid (up to 4 a row unless `columns` says), each with its label written under it."""
    if len(images) != len(labels):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    if not images:
        raise ValueError("labeled_grid needs at least one image")
    columns = columns or min(len(images), 4)
    return image_grid(rows_of(images, columns), scale=1, captions=rows_of(labels, columns))


def _check_shape(cells, row_labels, column_labels, captions) -> None:
    if row_labels is not None and len(row_labels) != len(cells):
        raise ValueError(f"image_grid needs {len(row_labels)} rows (one per label), got {len(cells)}")
    if column_labels is not None and any(len(row) != len(column_labels) for row in cells):
        raise ValueError(
            f"image_grid needs rows of {len(column_labels)} cells (one per column label), got {[len(row) for row in cells]}"
        )
    if captions is not None and [len(row) for row in captions] != [len(row) for row in cells]:
        raise ValueError("image_grid needs one caption per cell")
