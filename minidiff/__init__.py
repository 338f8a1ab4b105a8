"""minidiff: Stable Diffusion 1.5, its schedulers and the denoising loop, from scratch in plain PyTorch."""

__version__ = "0.1.0"

from minidiff.configuration import ConfigMixin, FrozenConfig, register_to_config
from minidiff.models.clip_text import CLIPTextModel
from minidiff.models.gaussian_mixture import GaussianMixtureDenoiser
from minidiff.models.unet_2d import UNet2DModel
from minidiff.models.unet_2d_condition import UNet2DConditionModel
from minidiff.models.vae import AutoencoderKL
from minidiff.pipelines import DDPMPipeline, DiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from minidiff.schedulers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    SchedulerMixin,
    SchedulerOutput,
    UniPCMultistepScheduler,
)
from minidiff.tokenizer import CLIPTokenizer

__all__ = [
    "ConfigMixin", "FrozenConfig", "register_to_config",
    "CLIPTokenizer", "CLIPTextModel", "UNet2DConditionModel", "AutoencoderKL", "UNet2DModel", "GaussianMixtureDenoiser",
    "SchedulerMixin", "SchedulerOutput", "PNDMScheduler", "DDIMScheduler", "DDPMScheduler", "LMSDiscreteScheduler",
    "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSDEScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "UniPCMultistepScheduler",
    "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "DDPMPipeline", "DiffusionPipeline",
]
