"""DiffusionPipeline.from_pretrained: the pipeline class a folder's model_index.json names.

    pipeline = DiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", dtype=torch.float16)

reads `model_index.json` (`"_class_name": "StableDiffusionPipeline"`) and hands over to that class.
A single-file checkpoint goes to StableDiffusionPipeline.from_single_file (StableDiffusionInpaintPipeline when
its UNet's conv_in takes 9 channels).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from minidiff.checkpoints.hub import HubOptions, download_file
from minidiff.pipelines.ddpm import DDPMPipeline
from minidiff.pipelines.img2img import StableDiffusionImg2ImgPipeline
from minidiff.pipelines.latent_consistency import LatentConsistencyModelPipeline
from minidiff.pipelines.rectified_flow import RectifiedFlowPipeline
from minidiff.pipelines.inpaint import StableDiffusionInpaintPipeline
from minidiff.pipelines.stable_diffusion import StableDiffusionPipeline
from minidiff.utils.torch_utils import resolve_dtype

PIPELINES = {
    cls.__name__: cls
    for cls in (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, DDPMPipeline,
                RectifiedFlowPipeline, LatentConsistencyModelPipeline)
}


class DiffusionPipeline:
    """Not a pipeline itself: `from_pretrained` returns the pipeline named by the folder."""

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, torch_dtype: torch.dtype | None = None, *,
                        dtype: torch.dtype | None = None, **kwargs):
        """The pipeline class `model_index.json` names, loaded with its `from_pretrained` (`dtype`, or the
        deprecated `torch_dtype` with diffusers' warning; the other keyword arguments as that class takes them)."""
        dtype = resolve_dtype(dtype, torch_dtype, deprecated=True)
        classes = PIPELINES
        if Path(path_or_repo_id).is_file():
            pipe = classes["StableDiffusionPipeline"].from_single_file(path_or_repo_id, dtype=dtype)
            if pipe.unet.config.in_channels == 9:  # an inpainting checkpoint: its conv_in sees the mask too
                return StableDiffusionInpaintPipeline(**pipe.components)
            return pipe
        if Path(path_or_repo_id).is_dir():
            index_file = Path(path_or_repo_id) / "model_index.json"
        else:
            hub_keys = ("revision", "cache_dir", "local_files_only")
            hub = HubOptions(**{key: kwargs[key] for key in hub_keys if key in kwargs})
            index_file = download_file(str(path_or_repo_id), "model_index.json", hub=hub)
        try:
            name = json.loads(Path(index_file).read_text())["_class_name"]
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"{index_file} is not a readable model_index.json with a _class_name ({error})") from None
        if name not in classes:
            raise ValueError(f"{path_or_repo_id} holds a {name}, which minidiff does not implement; it has {sorted(classes)}")
        return classes[name].from_pretrained(path_or_repo_id, dtype=dtype, **kwargs)
