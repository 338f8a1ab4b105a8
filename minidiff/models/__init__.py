"""The networks of Stable Diffusion 1.5 and of DDPM, in plain PyTorch."""

from minidiff.models.attention_processor import AttnProcessor, AttnProcessor2_0
from minidiff.models.autoencoder_tiny import AutoencoderTiny
from minidiff.models.clip_text import CLIPTextModel
from minidiff.models.modeling import ModelMixin
from minidiff.models.unet_2d import UNet2DModel
from minidiff.models.unet_2d_condition import UNet2DConditionModel
from minidiff.models.vae import AutoencoderKL

__all__ = ["AttnProcessor", "AttnProcessor2_0", "CLIPTextModel", "ModelMixin", "UNet2DConditionModel", "AutoencoderKL", "AutoencoderTiny",
           "UNet2DModel"]
