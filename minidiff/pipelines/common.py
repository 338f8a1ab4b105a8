"""What the pipelines share: the step the loop yields, the output types and turning an image tensor into them,
model_index.json, and the progress bar."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tqdm.auto import tqdm

from minidiff.configuration import DIFFUSERS_CONFIG_VERSION
from minidiff.utils.outputs import BaseOutput


@dataclass
class StableDiffusionPipelineOutput(BaseOutput):
    """`images`: a list of PIL images, a (B, H, W, 3) numpy array in [0, 1], a (B, 3, H, W) tensor, or latents."""

    images: list | np.ndarray | torch.Tensor
    nsfw_content_detected: list | None = None  # minidiff has no safety checker; kept for diffusers' API


@dataclass
class DenoisingStep:
    """What the loop yields after step `step_index` (x_t -> x_{t-1}) at timestep `t`."""

    step_index: int
    num_steps: int  # len(timesteps): steps in the whole loop (PNDM runs N+1 for N)
    t: torch.Tensor
    latents: torch.Tensor  # x_{t-1}, after the scheduler step: (B, 4, H/8, W/8) (pixels for DDPMPipeline)
    noise_pred: torch.Tensor  # the guided prediction eps_uncond + s * (eps_text - eps_uncond)
    pred_original_sample: torch.Tensor  # the scheduler's estimate of x_0 from this step (LCM: its `denoised`)
    preview: Image.Image | None = None  # the first image's x_0 decoded by `denoise(..., preview_vae=...)`


def predicted_x0(output) -> torch.Tensor | None:
    """The estimate of x_0 in a scheduler's step output: `pred_original_sample`, or LCM's `denoised` (the consistency
    function's sample), or TCD's `pred_noised_sample` (x at the intermediate time s; x_0 itself when gamma = 1)."""
    for name in ("pred_original_sample", "denoised", "pred_noised_sample"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def to_output_type(image: torch.Tensor, output_type: str):
    """(B, 3, H, W) in [-1, 1] -> "pt" (B, 3, H, W) in [0, 1], "np" (B, H, W, 3) in [0, 1], or "pil" images."""
    image = (image / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    array = image.cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return array
    return [Image.fromarray(pixels) for pixels in (array * 255).round().astype("uint8")]


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_output_type(output_type: str) -> None:
    """Refuse an output_type no pipeline can give (e.g. "jpg"), before any work is done."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output_type {output_type!r}; expected one of {OUTPUT_TYPES} (save a PIL image to get a file)")


def write_model_index(folder: Path, class_name: str, components: dict) -> Path:
    """model_index.json: for each part, [library, class] as diffusers writes it ([null, null] for an absent part)."""
    libraries = {"CLIPTextModel": "transformers", "CLIPTokenizer": "transformers"}
    index = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_CONFIG_VERSION}
    for name, part in components.items():
        part_class = type(part).__name__ if part is not None else None
        index[name] = [libraries.get(part_class, "diffusers"), part_class] if part is not None else [None, None]
    if "safety_checker" in components:
        index["requires_safety_checker"] = False
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return folder / "model_index.json"


class ProgressBarMixin:
    """diffusers' `set_progress_bar_config(**tqdm_options)` and the bar the loop runs under."""

    _progress_bar_config: dict = {}

    def set_progress_bar_config(self, **kwargs) -> None:
        """Options for tqdm, e.g. `disable=True` to turn the progress bars off."""
        self._progress_bar_config = kwargs

    def progress_bar(self, iterable):
        return tqdm(iterable, **self._progress_bar_config)
