"""SD 1.5-based rectified-flow checkpoints (2-rectified flow, InstaFlow) through StableDiffusionPipeline's loop.

Papers: Liu, Gong, Liu 2023, "Flow Straight and Fast" (rectified flow, arXiv 2209.03003); Liu, Zhang, Ma, Peng,
Liu 2024, "InstaFlow: One Step is Enough for High-Quality Diffusion-Based Text-to-Image Generation"
(arXiv 2309.06380). Their checkpoints ("XCLiu/2_rectified_flow_from_sd_1_5", "XCLiu/instaflow_0_9B_from_sd_1_5")
are SD 1.5 folders in diffusers' layout whose UNet was fine-tuned to predict a velocity. Their published
sampler, in their convention (time runs from noise at t = 1000 to data at t = 0):

    for i in range(N):                      t_i = 1000 (1 - i/N)
        v = unet(x, t_i, text)              (classifier-free guidance on v)
        x = x + (1/N) v                     v points from the noise to the data

diffusers' FlowMatchEulerDiscreteScheduler runs the same loop with the velocity of the other sign (noise - data)
and dt = sigma_{i+1} - sigma_i = -1/N. So this pipeline is StableDiffusionPipeline with that scheduler on the
sigmas 1, 1 - 1/N, ..., 1/N (`prepare_timesteps`) and the UNet's output negated (`model_output_for_scheduler`).
docs/flow_matching.md sets the conventions side by side; tests/test_rectified_flow.py checks the latents against
the ten-line loop above.
"""

from __future__ import annotations

import torch

from minidiff.pipelines.stable_diffusion import StableDiffusionPipeline
from minidiff.schedulers.flow_match_euler import FlowMatchEulerDiscreteScheduler


class RectifiedFlowPipeline(StableDiffusionPipeline):
    """StableDiffusionPipeline for SD 1.5 rectified-flow checkpoints (the name of their own pipeline class).

    The folder's scheduler config is SD 1.5's (their sampler ignores it): any scheduler that is not a
    FlowMatchEulerDiscreteScheduler is replaced by one with the default config (shift 1, 1000 training steps).
    Their recommended guidance scales are small (1 to 2; InstaFlow-0.9B: one step, guidance 0).
    """

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None, feature_extractor=None,
                 requires_safety_checker: bool = False, image_encoder=None):
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                         requires_safety_checker, image_encoder)

    def model_output_for_scheduler(self, model_output: torch.Tensor) -> torch.Tensor:
        """The checkpoints' velocity points to the data (data - noise); diffusers' scheduler steps with noise - data."""
        return -model_output

    def check_inputs(self, *args, **kwargs) -> None:
        """StableDiffusionPipeline's checks, and first that the scheduler steps a velocity (before any heavy work)."""
        if not isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(
                f"RectifiedFlowPipeline's checkpoints predict a velocity; {type(self.scheduler).__name__} expects "
                "noise or v-prediction. Use FlowMatchEulerDiscreteScheduler (the default)"
            )
        super().check_inputs(*args, **kwargs)
