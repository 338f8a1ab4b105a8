"""StableDiffusionImg2ImgPipeline: start the loop part-way, from a noised encoding of an image (SDEdit, arXiv 2108.01073).

strength in (0, 1] picks how much of the schedule to run:

    init_timestep = min(int(N * strength), N)        t_start = N - init_timestep
    timesteps     = scheduler.timesteps[t_start * order:]     (and scheduler.set_begin_index(t_start * order))
    z_0 = scaling_factor * VAE.encode(image).sample(generator)
    x_t = scheduler.add_noise(z_0, eps, timesteps[0])

then the same loop as text-to-image. strength 1.0 starts from (almost) pure noise; 0.3 keeps most of the image.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from minidiff.pipelines.common import StableDiffusionPipelineOutput, check_output_type
from minidiff.pipelines.compatibility import refuse_unsupported_arguments
from minidiff.pipelines.devices import SCHEDULE_DEVICE
from minidiff.pipelines.input_checks import check_finite, check_image_size
from minidiff.pipelines.stable_diffusion import StableDiffusionPipeline
from minidiff.utils.torch_utils import randn_tensor


def preprocess_image(image, vae_scale_factor: int = 8) -> torch.Tensor:
    """PIL image(s) or a tensor -> (B, 3, H, W) in [-1, 1], H and W cut down to multiples of 8 (Lanczos resize)."""
    if isinstance(image, torch.Tensor):
        image = image.unsqueeze(0) if image.ndim == 3 else image
        return image if image.min() < 0 else image * 2 - 1  # a tensor already in [-1, 1] is kept as it is
    images = image if isinstance(image, list) else [image]
    if not all(isinstance(item, Image.Image) for item in images):
        raise TypeError(f"image must be a PIL image, a list of them, or a tensor; got {type(image).__name__}")
    width, height = (size // vae_scale_factor * vae_scale_factor for size in images[0].size)
    arrays = [
        np.asarray(item.convert("RGB").resize((width, height), resample=Image.LANCZOS), dtype=np.float32) / 255.0
        for item in images
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) * 2 - 1


def image_size(image) -> tuple[int, int]:
    """(width, height) of the input image(s), read without converting them (PIL's size, a tensor's last two dims)."""
    first = image[0] if isinstance(image, list) and image else image
    if isinstance(first, torch.Tensor):
        return first.shape[-1], first.shape[-2]
    if isinstance(first, Image.Image):
        return first.size
    raise TypeError(f"image must be a PIL image, a list of them, or a tensor; got {type(image).__name__}")


class StableDiffusionImg2ImgPipeline(StableDiffusionPipeline):
    """Image-to-image: the text-to-image loop started from a noised VAE encoding of `image`."""

    def get_timesteps(self, num_inference_steps: int, strength: float):
        """The tail of the schedule that `strength` selects, and how many steps that is."""
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = max(num_inference_steps - init_timestep, 0)
        timesteps = self.scheduler.timesteps[t_start * self.scheduler.order :]
        self.scheduler.set_begin_index(t_start * self.scheduler.order)
        return timesteps, num_inference_steps - t_start

    @torch.no_grad()
    def prepare_image_latents(self, image: torch.Tensor, timestep: torch.Tensor, batch_size: int, dtype, generator=None):
        """z_0 = scaling_factor * E(image) sampled from the latent distribution, then noised to `timestep`."""
        image = image.to(device=self._execution_device, dtype=self.vae.dtype)  # the VAE's dtype: float32 after upcast_vae()
        if isinstance(generator, list):
            if image.shape[0] < batch_size:
                image = torch.cat([image] * (batch_size // image.shape[0]))
            init_latents = torch.cat(
                [self.vae.encode(image[i : i + 1]).latent_dist.sample(generator[i]) for i in range(batch_size)]
            )
        else:
            init_latents = self.vae.encode(image).latent_dist.sample(generator)
        init_latents = self.vae.config.scaling_factor * init_latents.to(dtype)
        if batch_size % init_latents.shape[0]:
            raise ValueError(f"cannot repeat {init_latents.shape[0]} image(s) to a batch of {batch_size} prompts")
        init_latents = torch.cat([init_latents] * (batch_size // init_latents.shape[0]))
        noise = randn_tensor(init_latents.shape, generator=generator, device=self._execution_device, dtype=dtype)
        return self.scheduler.add_noise(init_latents, noise, timestep)

    def denoise(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        strength: float = 0.8,
        *,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        cross_attention_kwargs: dict | None = None,
        preview_vae=None,
    ):
        """The image-to-image loop as a generator of `DenoisingStep`s. The keyword arguments are text-to-image's,
        but for height, width and latents: the image sets the size and the start."""
        if image is None:
            raise ValueError("img2img needs an `image` to start from")
        check_finite(strength=strength, guidance_scale=guidance_scale, eta=eta)
        width, height = image_size(image)
        prompts = len(prompt) if isinstance(prompt, list) else 1
        check_image_size(height, width, prompts * num_images_per_prompt, getattr(self.vae, "use_tiling", False))  # before any resize
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        image = preprocess_image(image, self.vae_scale_factor)
        self.check_inputs(prompt, image.shape[-2], image.shape[-1], prompt_embeds=prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, self._execution_device, num_images_per_prompt, self.uses_classifier_free_guidance(guidance_scale), negative_prompt,
            prompt_embeds, negative_prompt_embeds, clip_skip=clip_skip,
            lora_scale=(cross_attention_kwargs or {}).get("scale"),
        )
        batch_size = prompt_embeds.shape[0]

        self.scheduler.set_timesteps(num_inference_steps, device=SCHEDULE_DEVICE)
        timesteps, num_inference_steps = self.get_timesteps(num_inference_steps, strength)
        if num_inference_steps < 1:
            raise ValueError(f"strength {strength} leaves no step to run; raise strength or num_inference_steps")
        latent_timestep = timesteps[:1].repeat(batch_size)
        latents = self.prepare_image_latents(image, latent_timestep, batch_size, prompt_embeds.dtype, generator)
        yield from self.denoising_loop(
            latents, timesteps, prompt_embeds, negative_prompt_embeds, guidance_scale, self.step_kwargs(generator, eta),
            callback_on_step_end, callback_on_step_end_tensor_inputs, cross_attention_kwargs, preview_vae,
        )

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict | None = None,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ) -> StableDiffusionPipelineOutput | tuple:
        """Image to image: the `denoise` loop run to the end, then decoded (`output_type` as text-to-image's).
        Arguments and positions are diffusers 0.42.1's; timesteps, sigmas and the IP-Adapter's are refused unless None."""
        refuse_unsupported_arguments(timesteps=timesteps, sigmas=sigmas, ip_adapter_image=ip_adapter_image,
                                     ip_adapter_image_embeds=ip_adapter_image_embeds)
        check_output_type(output_type)  # the other inputs: in denoise
        step = None
        for step in self.denoise(
            prompt, image, strength, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt, generator=generator, eta=eta,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, clip_skip=clip_skip,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            cross_attention_kwargs=cross_attention_kwargs,
        ):
            pass
        images = self.latents_to_output(step.latents, output_type)
        self.maybe_free_model_hooks()  # with CPU offload: the VAE goes back to the CPU
        return StableDiffusionPipelineOutput(images=images) if return_dict else (images, None)
