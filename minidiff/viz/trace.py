"""A trace of the denoising loop you can look at: x_t and the predicted x0 at chosen steps.

    steps = pipeline.denoise(prompt, num_inference_steps=25, generator=generator)
    frames = record(steps, to_image=pipeline.latents_to_image, count=6)
    save_film_strip(frames, "out/strip.png")      # top row x_t, bottom row predicted x0
    save_gif(frames, "out/denoising.gif")         # one frame per recorded step

`to_image` turns a (B, C, H, W) sample into a PIL image: the VAE decode for latent models
(`pipeline.latents_to_image`), `to_output_type(x, "pil")[0]` for pixel models. A step that carries a `preview`
(`denoise(..., preview_vae=taesd)`) gives its predicted-x0 picture from it; with
`to_image=lambda z: pipeline.preview_image(z, taesd)` the x_t row is TAESD's too, and the whole strip costs
a few tiny-autoencoder decodes instead of full VAE decodes (`minidiff generate --preview`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

CAPTION_HEIGHT = 18


@dataclass
class TraceFrame:
    step_index: int
    timestep: float
    sample: Image.Image  # x_{t-1} after this step
    predicted_x0: Image.Image | None  # the model's estimate of the clean image at this step


def evenly_spaced(num_steps: int, count: int) -> set[int]:
    """`count` step indices spread over 0..num_steps-1, always including the first and the last."""
    if count >= num_steps:
        return set(range(num_steps))
    if count < 2:
        return {num_steps - 1}
    return {round(i * (num_steps - 1) / (count - 1)) for i in range(count)}


def record(steps, to_image, count: int | None = None) -> list[TraceFrame]:
    """Runs a `denoise(...)` generator to the end, keeping `count` evenly spaced frames (every step if None)."""
    frames = []
    for step in steps:
        if count is None or step.step_index in evenly_spaced(step.num_steps, count):
            x0 = step.pred_original_sample
            preview = getattr(step, "preview", None)  # already decoded by denoise(..., preview_vae=...): no second decode
            x0_image = preview if preview is not None else (to_image(x0) if x0 is not None else None)
            frames.append(TraceFrame(step.step_index, float(step.t), to_image(step.latents), x0_image))
    return frames


def _caption(frame: TraceFrame) -> str:
    return f"step {frame.step_index}, t={frame.timestep:g}"


def save_film_strip(frames: list[TraceFrame], path: str | Path) -> Path:
    """One PNG: a column per frame, x_t on top and the predicted x0 under it, each labeled with step and timestep."""
    if not frames:
        raise ValueError("no frames to save: was count 0?")
    width, height = frames[0].sample.size
    rows = 2 if any(frame.predicted_x0 is not None for frame in frames) else 1
    strip = Image.new("RGB", (len(frames) * width, rows * height + CAPTION_HEIGHT), "white")
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default()
    for column, frame in enumerate(frames):
        strip.paste(frame.sample.convert("RGB"), (column * width, 0))
        if rows == 2 and frame.predicted_x0 is not None:
            strip.paste(frame.predicted_x0.convert("RGB"), (column * width, height))
        draw.text((column * width + 3, rows * height + 3), _caption(frame), fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    strip.save(path)
    return path


def save_gif(frames: list[TraceFrame], path: str | Path, milliseconds_per_frame: int = 400) -> Path:
    """An animated GIF, one frame per recorded step: x_t on the left, the predicted x0 on the right."""
    if not frames:
        raise ValueError("no frames to save: was count 0?")
    width, height = frames[0].sample.size
    font = ImageFont.load_default()
    pictures = []
    for frame in frames:
        picture = Image.new("RGB", (2 * width, height + CAPTION_HEIGHT), "white")
        picture.paste(frame.sample.convert("RGB"), (0, 0))
        if frame.predicted_x0 is not None:
            picture.paste(frame.predicted_x0.convert("RGB"), (width, 0))
        ImageDraw.Draw(picture).text((3, height + 3), _caption(frame) + "   x_t | predicted x0", fill="black", font=font)
        pictures.append(picture)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=milliseconds_per_frame, loop=0)
    return path
