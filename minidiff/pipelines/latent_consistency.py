"""LatentConsistencyModelPipeline: text to image in 2-8 steps with a full LCM checkpoint (Luo et al. 2023).

    prompt -> text encoder -> (loop: LCMScheduler <-> UNet with the guidance embedding) -> VAE decoder -> image

A full LCM checkpoint (e.g. `SimianLuo/LCM_Dreamshaper_v7`) was distilled *with* classifier-free guidance baked in
(LCM §4.2, "guided distillation"): its UNet takes the guidance scale as an input, `timestep_cond`, the sinusoidal
embedding of w = guidance_scale - 1 (`layers.guidance_scale_embedding`; diffusers writes guidance as
eps_u + s (eps_c - eps_u), the paper as eps_c + w (eps_c - eps_u)). So there is no unconditional batch and no
negative prompt: one UNet call per step. The loop is LCM's multistep sampling (schedulers/lcm.py), and the image
is decoded from the last step's `denoised`.

For LCM-LoRA (a LoRA on an ordinary SD 1.5 UNet, no guidance embedding), use StableDiffusionPipeline with
LCMScheduler and guidance_scale=1 (or 1-2): there CFG runs only when guidance_scale > 1.
"""

from __future__ import annotations

import torch

from minidiff.pipelines.common import DenoisingStep, StableDiffusionPipelineOutput, check_output_type
from minidiff.pipelines.compatibility import refuse_unsupported_arguments
from minidiff.pipelines.devices import SCHEDULE_DEVICE
from minidiff.pipelines.stable_diffusion import StableDiffusionPipeline


class LatentConsistencyModelPipeline(StableDiffusionPipeline):
    """diffusers' LatentConsistencyModelPipeline: 4 steps by default, guidance as a UNet input."""

    _callback_tensor_inputs = ["latents", "denoised", "prompt_embeds", "w_embedding"]

    def _check_lcm_unet(self) -> None:
        if self.unet.config.time_cond_proj_dim is None:
            raise ValueError(
                "LatentConsistencyModelPipeline needs a UNet distilled with the guidance embedding (its config sets "
                "time_cond_proj_dim, as SimianLuo/LCM_Dreamshaper_v7's does). For LCM-LoRA on an SD 1.5 UNet use "
                "StableDiffusionPipeline with LCMScheduler, num_inference_steps=4 and guidance_scale=1"
            )

    def denoise(
        self,
        prompt: str | list[str] | None = None,
        *,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 4,
        original_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        guidance_scale: float = 8.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        cross_attention_kwargs: dict | None = None,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        preview_vae=None,
    ):
        """LCM's loop as a generator of `DenoisingStep`s (`pred_original_sample` is the step's `denoised`)."""
        self._check_lcm_unet()
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self.check_inputs(prompt, height, width, prompt_embeds=prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        prompt_embeds, _ = self.encode_prompt(prompt, self._execution_device, num_images_per_prompt, False, None,
                                              prompt_embeds=prompt_embeds, clip_skip=clip_skip)
        if timesteps is not None:
            self.scheduler.set_timesteps(device=SCHEDULE_DEVICE, timesteps=timesteps, original_inference_steps=original_inference_steps)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=SCHEDULE_DEVICE, original_inference_steps=original_inference_steps)
        latents = self.prepare_latents(prompt_embeds.shape[0], height, width, prompt_embeds.dtype, generator, latents)
        # the guidance scale as the UNet's input: (B, time_cond_proj_dim)
        w_embedding = self.guidance_condition(guidance_scale, latents.shape[0], latents)

        timesteps = self.scheduler.timesteps
        for step_index, t in enumerate(self.progress_bar(timesteps)):
            latents = latents.to(prompt_embeds.dtype)
            with torch.no_grad():
                model_pred = self.unet(latents, t, encoder_hidden_states=prompt_embeds, timestep_cond=w_embedding,
                                       cross_attention_kwargs=cross_attention_kwargs).sample
            # denoised = f(x_t, t), the consistency function's sample; latents = it, re-noised to the next timestep
            latents, denoised = self.scheduler.step(model_pred, t, latents, generator=generator, return_dict=False)
            if callback_on_step_end is not None:
                current = {"latents": latents, "denoised": denoised, "prompt_embeds": prompt_embeds, "w_embedding": w_embedding}
                changed = callback_on_step_end(self, step_index, t, {name: current[name] for name in callback_on_step_end_tensor_inputs})
                latents = changed.pop("latents", latents)
                prompt_embeds = changed.pop("prompt_embeds", prompt_embeds)
                w_embedding = changed.pop("w_embedding", w_embedding)
                denoised = changed.pop("denoised", denoised)
            step = DenoisingStep(step_index, len(timesteps), t, latents, model_pred, denoised)
            if preview_vae is not None:
                step.preview = self.preview_image(denoised, preview_vae)
            yield step

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 4,
        original_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        guidance_scale: float = 8.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds=None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict | None = None,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ) -> StableDiffusionPipelineOutput | tuple:
        """Text to image with diffusers' signature and defaults (4 steps, guidance_scale 8.5): the loop, then the
        last `denoised` decoded. IP-Adapter images are not implemented in minidiff."""
        refuse_unsupported_arguments(ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds)
        check_output_type(output_type)  # the other inputs: the UNet, size and prompt checks, first thing in denoise
        step = None
        for step in self.denoise(
            prompt, height=height, width=width, num_inference_steps=num_inference_steps,
            original_inference_steps=original_inference_steps, timesteps=timesteps, guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents, prompt_embeds=prompt_embeds,
            cross_attention_kwargs=cross_attention_kwargs, clip_skip=clip_skip, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        ):
            pass
        denoised = step.pred_original_sample.to(step.latents.dtype)
        images = self.latents_to_output(denoised, output_type)
        self.maybe_free_model_hooks()  # with CPU offload: the VAE goes back to the CPU
        return StableDiffusionPipelineOutput(images=images) if return_dict else (images, None)
