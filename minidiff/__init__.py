"""minidiff: Stable Diffusion 1.5, its schedulers and the denoising loop, from scratch in plain PyTorch."""

import importlib
import sys

from minidiff.utils.version import __version__ as __version__

from minidiff.configuration import ConfigMixin, FrozenConfig, register_to_config
from minidiff.models.clip_text import CLIPTextModel
from minidiff.lab.gaussian_mixture import GaussianMixtureDenoiser
from minidiff.models.unet_2d import UNet2DModel
from minidiff.models.unet_2d_condition import UNet2DConditionModel
from minidiff.models.vae import AutoencoderKL
from minidiff.models.autoencoder_tiny import AutoencoderTiny
from minidiff.pipelines import (
    DDPMPipeline,
    DiffusionPipeline,
    LatentConsistencyModelPipeline,
    RectifiedFlowPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from minidiff.schedulers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    TCDScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    SchedulerMixin,
    SchedulerOutput,
    UniPCMultistepScheduler,
)
from minidiff.loaders.textual_inversion import load_textual_inversion
from minidiff.tokenizer import CLIPTokenizer

# Modules that moved when lab/ and viz/ were made: their old import paths keep working as aliases.
MOVED_MODULES = {
    "minidiff.accuracy": "minidiff.lab.accuracy",
    "minidiff.demo": "minidiff.lab.demo",
    "minidiff.prototypes": "minidiff.lab.prototypes",
    "minidiff.models.gaussian_mixture": "minidiff.lab.gaussian_mixture",
    "minidiff.plotting": "minidiff.viz",  # the plots and (before grid.py) the image grids
    "minidiff.grid": "minidiff.viz",
    "minidiff.trace": "minidiff.viz.trace",
    "minidiff.hub": "minidiff.checkpoints.hub",
    "minidiff.download": "minidiff.checkpoints.download",
    "minidiff.checkpoints.single_file": "minidiff.loaders.single_file",  # load_single_file; convert is in loaders
}
for _old, _new in MOVED_MODULES.items():
    sys.modules[_old] = importlib.import_module(_new)
    _parent, _, _name = _old.rpartition(".")
    setattr(sys.modules[_parent], _name, sys.modules[_old])  # `import minidiff.trace; minidiff.trace.record(...)`

__all__ = [
    "ConfigMixin", "FrozenConfig", "register_to_config",
    "CLIPTokenizer", "CLIPTextModel", "UNet2DConditionModel", "AutoencoderKL", "AutoencoderTiny", "UNet2DModel", "GaussianMixtureDenoiser",
    "SchedulerMixin", "SchedulerOutput", "PNDMScheduler", "DDIMScheduler", "DDPMScheduler", "LMSDiscreteScheduler",
    "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "DPMSolverSDEScheduler", "DEISMultistepScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler", "LCMScheduler", "TCDScheduler",
    "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline", "DDPMPipeline", "DiffusionPipeline", "RectifiedFlowPipeline", "LatentConsistencyModelPipeline",
    "load_textual_inversion",
]
