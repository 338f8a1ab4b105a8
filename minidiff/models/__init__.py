"""The networks of Stable Diffusion 1.5 and of DDPM, in plain PyTorch."""

from minidiff.models.gaussian_mixture import GaussianMixtureDenoiser
from minidiff.models.modeling import ModelMixin

__all__ = ["GaussianMixtureDenoiser", "ModelMixin"]
