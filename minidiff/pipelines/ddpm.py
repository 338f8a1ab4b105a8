"""DDPMPipeline: the first loop of the tutorial, for an unconditional pixel-space model (e.g. google/ddpm-cat-256).

    x_T ~ N(0, I);  for t in scheduler.timesteps:  eps = model(x_t, t);  x_{t-1} = scheduler.step(eps, t, x_t)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from minidiff.models.unet_2d import UNet2DModel
from minidiff.checkpoints.hub import HubOptions
from minidiff.loaders.scheduler import scheduler_from_folder
from minidiff.pipelines.devices import SCHEDULE_DEVICE, DevicePlacementMixin
from minidiff.pipelines.common import DenoisingStep, ProgressBarMixin, check_output_type, to_output_type, write_model_index
from minidiff.pipelines.input_checks import check_image_size
from minidiff.utils.torch_utils import randn_tensor, resolve_dtype
from minidiff.utils.outputs import BaseOutput


@dataclass
class ImagePipelineOutput(BaseOutput):
    images: list


class DDPMPipeline(DevicePlacementMixin, ProgressBarMixin):
    """`DDPMPipeline(unet, scheduler)`; `DDPMPipeline.from_pretrained(folder)` reads `unet/` (or the root) and `scheduler/`."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler):
        self.unet = unet
        self.scheduler = scheduler

    @property
    def components(self) -> dict:
        return {"unet": self.unet, "scheduler": self.scheduler}

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write model_index.json, unet/ and scheduler/ (the layout of diffusers' DDPM pipelines, e.g. after the
        Hugging Face course's unit 1); `DDPMPipeline.from_pretrained(folder)` and diffusers' both read it back."""
        folder = Path(folder)
        self.unet.save_pretrained(folder / "unet")
        self.scheduler.save_config(folder / "scheduler")
        write_model_index(folder, type(self).__name__, self.components)
        return folder

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        torch_dtype: torch.dtype | None = None,
        *,
        dtype: torch.dtype | None = None,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        low_cpu_mem_usage: bool = True,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
    ):
        """The UNet and scheduler of a DDPM folder or hub repo; the keyword arguments as in
        `StableDiffusionPipeline.from_pretrained` (`torch_dtype` is the deprecated spelling of `dtype`)."""
        dtype = resolve_dtype(dtype, torch_dtype, deprecated=True)
        hub = HubOptions(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
        # google/ddpm-cat-256 keeps its files at the repo's root; a diffusers pipeline folder uses unet/ and scheduler/.
        root = Path(path_or_repo_id)
        unet = UNet2DModel.from_pretrained(
            path_or_repo_id, subfolder="unet" if (root / "unet").is_dir() else None, dtype=dtype, variant=variant,
            use_safetensors=use_safetensors, low_cpu_mem_usage=low_cpu_mem_usage, **hub.as_kwargs(),
        )
        scheduler = scheduler_from_folder(path_or_repo_id, subfolder="scheduler" if (root / "scheduler").is_dir() else None, hub=hub)
        return cls(unet, scheduler)

    def denoise(self, batch_size: int = 1, generator=None, num_inference_steps: int = 1000):
        """The loop as a generator: yields a DenoisingStep (x_{t-1} in `.latents`, here pixels) after every step."""
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        check_image_size(*size, batch_size)  # pixels, no VAE: the same plain bound
        image = randn_tensor((batch_size, self.unet.config.in_channels, *size), generator, self._execution_device, self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=SCHEDULE_DEVICE)
        for step_index, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            with torch.no_grad():
                model_output = self.unet(image, t).sample
            output = self.scheduler.step(model_output, t, image, generator=generator)
            image = output.prev_sample
            yield DenoisingStep(step_index, len(self.scheduler.timesteps), t, image, model_output, output.pred_original_sample)

    def __call__(self, batch_size: int = 1, generator=None, num_inference_steps: int = 1000, output_type: str = "pil"):
        check_output_type(output_type)
        step = None
        for step in self.denoise(batch_size, generator, num_inference_steps):
            pass
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=to_output_type(step.latents, output_type))
