"""Pipelines: the tutorial's loops behind `__call__`, with a step-through `denoise` generator."""

from minidiff.pipelines.auto import DiffusionPipeline
from minidiff.pipelines.ddpm import DDPMPipeline
from minidiff.pipelines.img2img import StableDiffusionImg2ImgPipeline
from minidiff.pipelines.latent_consistency import LatentConsistencyModelPipeline
from minidiff.pipelines.rectified_flow import RectifiedFlowPipeline
from minidiff.pipelines.inpaint import StableDiffusionInpaintPipeline
from minidiff.pipelines.stable_diffusion import StableDiffusionPipeline, StableDiffusionPipelineOutput

__all__ = ["DiffusionPipeline", "DDPMPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline", "StableDiffusionPipeline", "StableDiffusionPipelineOutput",
           "RectifiedFlowPipeline", "LatentConsistencyModelPipeline"]
