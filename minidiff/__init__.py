"""minidiff: Stable Diffusion 1.5, its schedulers and the denoising loop, from scratch in plain PyTorch."""

__version__ = "0.1.0"

from minidiff.configuration import ConfigMixin, FrozenConfig, register_to_config
from minidiff.schedulers import *  # noqa: F401,F403  (every scheduler class, e.g. minidiff.DDIMScheduler)
from minidiff.schedulers import __all__ as _scheduler_names
from minidiff.tokenizer import CLIPTokenizer
from minidiff.models.clip_text import CLIPTextModel
from minidiff.models.unet_2d_condition import UNet2DConditionModel
from minidiff.models.vae import AutoencoderKL
from minidiff.models.unet_2d import UNet2DModel
from minidiff.pipelines import DDPMPipeline, DiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

__all__ = ["ConfigMixin", "FrozenConfig", "register_to_config", *_scheduler_names, "CLIPTokenizer", "CLIPTextModel", "UNet2DConditionModel", "AutoencoderKL", "UNet2DModel", "DDPMPipeline", "DiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionPipeline"]
