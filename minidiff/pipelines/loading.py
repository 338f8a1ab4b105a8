"""A Stable Diffusion pipeline's five parts from files, and back: `from_pretrained`, `from_single_file`, `save_pretrained`.

    diffusers folder (or hub repo id)          one original checkpoint file
    ├── unet/  vae/  text_encoder/             v1-5-pruned-emaonly.safetensors
    ├── tokenizer/  scheduler/                 (parts found by key prefix, configs bundled)
    └── model_index.json

`StableDiffusionLoadingMixin` is a base of `StableDiffusionPipeline` (and so of img2img): each class method
builds the parts and hands them to the class's own `__init__`, so a subclass loads as itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from minidiff.checkpoints.hub import HubOptions
from minidiff.loaders.scheduler import scheduler_from_folder
from minidiff.loaders.single_file import load_single_file
from minidiff.models.clip_text import CLIPTextModel
from minidiff.models.unet_2d_condition import UNet2DConditionModel
from minidiff.models.vae import AutoencoderKL
from minidiff.pipelines.common import write_model_index
from minidiff.tokenizer import CLIPTokenizer
from minidiff.utils.cpu import conv_memory_format
from minidiff.utils.torch_utils import resolve_dtype


class StableDiffusionLoadingMixin:
    """Loading and saving for a pipeline with `vae`, `text_encoder`, `tokenizer`, `unet` and `scheduler`."""

    @property
    def components(self) -> dict:
        """The pipeline's parts by name, as diffusers' `pipe.components`: `OtherPipeline(**pipe.components)`."""
        return {"vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer, "unet": self.unet,
                "scheduler": self.scheduler, "safety_checker": None, "feature_extractor": None}

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write the diffusers folder layout: model_index.json and one subfolder per part (diffusers can load it)."""
        folder = Path(folder)
        self.vae.save_pretrained(folder / "vae")
        self.text_encoder.save_pretrained(folder / "text_encoder")
        self.unet.save_pretrained(folder / "unet")
        self.tokenizer.save_pretrained(folder / "tokenizer")
        self.scheduler.save_config(folder / "scheduler")
        write_model_index(folder, type(self).__name__, self.components)
        return folder

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        *,
        dtype: torch.dtype | None = None,
        use_safetensors: bool | None = None,
        low_cpu_mem_usage: bool = True,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
    ):
        """Load every component of a diffusers-layout folder (or hub repo id): unet/, vae/, text_encoder/, tokenizer/, scheduler/.

        `dtype` is the weights' dtype; the old name `torch_dtype` still works, with diffusers' FutureWarning (both at
        once is an error, as in diffusers' pipelines). `variant`, `use_safetensors`, `revision`, `cache_dir`,
        `local_files_only` and `low_cpu_mem_usage` go to every model's `ModelMixin.from_pretrained`, which says
        what each does (`low_cpu_mem_usage` has no effect: loading always builds on the meta device).
        """
        dtype = resolve_dtype(dtype, torch_dtype, deprecated=True)
        path = Path(path_or_repo_id)
        if path.is_file():
            return cls.from_single_file(path, dtype=dtype)
        hub = HubOptions(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
        load = dict(dtype=dtype, variant=variant, use_safetensors=use_safetensors, low_cpu_mem_usage=low_cpu_mem_usage,
                    **hub.as_kwargs())
        layout_dtype = dtype or torch.get_default_dtype()
        return cls(
            vae=AutoencoderKL.from_pretrained(
                path_or_repo_id, subfolder="vae", memory_format=conv_memory_format("vae", layout_dtype), **load
            ),
            text_encoder=CLIPTextModel.from_pretrained(path_or_repo_id, subfolder="text_encoder", **load),
            tokenizer=CLIPTokenizer.from_pretrained(path_or_repo_id, subfolder="tokenizer", hub=hub),
            unet=UNet2DConditionModel.from_pretrained(
                path_or_repo_id, subfolder="unet", memory_format=conv_memory_format("unet", layout_dtype), **load
            ),
            scheduler=scheduler_from_folder(path_or_repo_id, hub=hub),
        )

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike,
        torch_dtype: torch.dtype | None = None,
        use_ema: bool = False,
        config: str | os.PathLike | None = None,
        *,
        dtype: torch.dtype | None = None,
    ):
        """Load an original one-file checkpoint (e.g. v1-5-pruned-emaonly.safetensors), offline.

        `config`: a diffusers-layout folder whose configs describe the file (default: SD 1.5's, bundled).
        `dtype` (or `torch_dtype`; `dtype` wins when both are given, silently, as in diffusers' from_single_file)."""
        dtype = resolve_dtype(dtype, torch_dtype, deprecated=False)
        layout_dtype = dtype or torch.get_default_dtype()
        memory_formats = {model: conv_memory_format(model, layout_dtype) for model in ("unet", "vae")}
        parts = load_single_file(path, torch_dtype=dtype, use_ema=use_ema, config=config, memory_formats=memory_formats)
        return cls(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
                   scheduler=parts.scheduler)
