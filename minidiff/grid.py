"""Pictures side by side with a caption under each: the scheduler comparison grid (Pillow only)."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont


def labeled_grid(images: list[Image.Image], labels: list[str], columns: int | None = None, caption_height: int = 22) -> Image.Image:
    """One image of `images` in a grid (as square as it fits), each with its label written under it."""
    if len(images) != len(labels):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    if not images:
        raise ValueError("labeled_grid needs at least one image")
    columns = columns or min(len(images), 4)
    rows = -(-len(images) // columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * (height + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for index, (image, label) in enumerate(zip(images, labels)):
        x, y = (index % columns) * width, (index // columns) * (height + caption_height)
        grid.paste(image.convert("RGB").resize((width, height)), (x, y))
        draw.text((x + 4, y + height + 4), label, fill="black", font=font)
    return grid
