"""StableDiffusionInpaintPipeline: repaint the white part of a mask, keep the black part.

Two ways to make the loop respect the known pixels, chosen by the UNet's `in_channels`:

* **9 channels** (stable-diffusion-v1-5/stable-diffusion-inpainting, Rombach et al. 2022 §4.5): the UNet was
  trained to see the mask. Its conv_in takes

      cat([x_t (4), m (1, the mask on the latent grid), z_masked = scaling_factor * E(image * (1 - m)) (4)])

  so it predicts noise for the whole picture knowing what is there; the loop itself is text-to-image's.

* **4 channels** (an ordinary SD UNet; the "blend" of RePaint's §4 without its resampling, and of
  SDEdit-style inpainting): after every scheduler step the known region is overwritten by the image's own
  latents z_0 noised to the level the next step starts from, with the *same* noise eps every step:

      x_{t_{i+1}} <- (1 - m) * add_noise(z_0, eps, t_{i+1}) + m * x_{t_{i+1}}      (no noise after the last step)

  The unknown region never conditions the known one except through the UNet's receptive field, which is why
  the seam can be inconsistent (tutorial 12 measures it on the exact denoiser).

`strength` < 1 starts from z_0 noised to the level `strength` picks, as img2img; 1.0 starts from pure noise.
Masks and images are prepared as diffusers' VaeImageProcessor does (mask_processing.py), and the order of
random draws is diffusers', so the same weights, inputs and seed give the same image.
"""

from __future__ import annotations

import inspect

import torch
from PIL import Image

from minidiff.pipelines.common import DenoisingStep, StableDiffusionPipelineOutput, check_output_type
from minidiff.pipelines.compatibility import refuse_unsupported_arguments
from minidiff.pipelines.devices import SCHEDULE_DEVICE
from minidiff.pipelines.input_checks import check_finite, check_image_size
from minidiff.pipelines.img2img import StableDiffusionImg2ImgPipeline
from minidiff.pipelines.mask_processing import VaeImageProcessor, check_is_image, image_size
from minidiff.pipelines.stable_diffusion import StableDiffusionPipeline
from minidiff.utils.torch_utils import randn_tensor

UNET_CHANNELS = (4, 9)  # latents only; latents + mask (1) + masked-image latents (4)


def mask_brightest(mask_image) -> float:
    """The largest value of a mask in [0, 1] (PIL: after grayscale): below 0.5, binarising leaves nothing to repaint."""
    items = mask_image if isinstance(mask_image, list) else [mask_image]
    return max(
        item.convert("L").getextrema()[1] / 255 if isinstance(item, Image.Image) else float(torch.as_tensor(item).max())
        for item in items
    )


class StableDiffusionInpaintPipeline(StableDiffusionPipeline):
    """Inpainting with SD 1.x: the 9-channel inpainting UNet, or the per-step blend with an ordinary UNet."""

    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "mask", "masked_image_latents"]

    # The tail of the schedule that `strength` selects: the same rule as img2img's (SDEdit).
    get_timesteps = StableDiffusionImg2ImgPipeline.get_timesteps

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.mask_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=False,
                                                do_binarize=True, do_convert_grayscale=True)

    # ----- checks, all before any heavy work -----

    def check_inpaint_inputs(self, image, mask_image, masked_image_latents, strength: float, output_type: str,
                             padding_mask_crop: int | None) -> None:
        """What diffusers checks, plus what it lets through silently and gets wrong (each said in the message)."""
        if not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1] (how much of the schedule to run), got {strength}")
        in_channels = self.unet.config.in_channels
        if in_channels not in UNET_CHANNELS:
            raise ValueError(
                f"the UNet has {in_channels} input channels; inpainting needs 4 (an ordinary SD UNet, blended) or 9 "
                "(an inpainting UNet: latents, mask, masked-image latents)"
            )
        if image is None or mask_image is None:
            raise ValueError("inpainting needs an `image` and a `mask_image` (white = repaint, black = keep)")
        check_is_image(image, "image")
        check_is_image(mask_image, "mask_image")
        if masked_image_latents is not None and in_channels == 4:
            raise ValueError(
                "masked_image_latents feed the 9-channel inpainting UNet's conv_in; this UNet has 4 input channels and "
                "would ignore them (diffusers does, silently). Drop the argument, or load an inpainting checkpoint"
            )
        image_wh, mask_wh = image_size(image), image_size(mask_image)
        if image_wh is not None and mask_wh is not None and image_wh != mask_wh:
            raise ValueError(
                f"mask_image is {mask_wh[0]}x{mask_wh[1]} but image is {image_wh[0]}x{image_wh[1]}: they must be the "
                "same size so that the mask lines up with the picture (diffusers resizes each on its own and "
                "misaligns them); resize the mask to the image's size"
            )
        if padding_mask_crop is not None:
            if not isinstance(image, Image.Image) or not isinstance(mask_image, Image.Image):
                raise ValueError("padding_mask_crop needs image and mask_image as PIL images (one each)")
            if output_type != "pil":
                raise ValueError(f"padding_mask_crop pastes the result back into the picture: output_type must be 'pil', got {output_type!r}")
        if mask_brightest(mask_image) < 0.5:
            raise ValueError(
                "mask_image is all black: nothing to repaint (white marks the pixels to repaint, black the ones to "
                "keep). Did you invert it, or pass an alpha channel?"
            )

    def retrieve_timesteps(self, num_inference_steps: int, timesteps=None, sigmas=None):
        """Set the scheduler's schedule from a step count, or from custom `timesteps` or `sigmas` where its
        `set_timesteps` takes them (as diffusers' retrieve_timesteps). Returns (timesteps, number of steps)."""
        if timesteps is not None and sigmas is not None:
            raise ValueError("give custom timesteps or custom sigmas, not both")
        custom = {"timesteps": timesteps} if timesteps is not None else {"sigmas": sigmas} if sigmas is not None else {}
        for name in custom:
            if name not in inspect.signature(self.scheduler.set_timesteps).parameters:
                raise ValueError(f"{type(self.scheduler).__name__}.set_timesteps takes no custom {name}; use a scheduler that does (e.g. Euler)")
        if custom:
            self.scheduler.set_timesteps(device=SCHEDULE_DEVICE, **custom)
            return self.scheduler.timesteps, len(self.scheduler.timesteps)
        self.scheduler.set_timesteps(num_inference_steps, device=SCHEDULE_DEVICE)
        return self.scheduler.timesteps, num_inference_steps

    # ----- latents -----

    def _encode_vae_image(self, image: torch.Tensor, generator) -> torch.Tensor:
        """z = scaling_factor * a sample of q(z | image) (one generator per image when a list is given)."""
        if isinstance(generator, list):
            latents = torch.cat([self.vae.encode(image[i : i + 1]).latent_dist.sample(generator[i]) for i in range(image.shape[0])])
        else:
            latents = self.vae.encode(image).latent_dist.sample(generator)
        return self.vae.config.scaling_factor * latents

    @torch.no_grad()
    def prepare_inpaint_latents(self, batch_size: int, height: int, width: int, dtype, generator, latents, init_image,
                                timestep, is_strength_max: bool, need_image_latents: bool):
        """(x_start, eps, z_0 or None): pure noise at strength 1, else z_0 noised to `timestep`; given `latents`
        are the noise (and the start, scaled by init_noise_sigma), as in diffusers."""
        shape = (batch_size, self.vae.config.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"{len(generator)} generators for a batch of {batch_size} images: give one per image")
        image_latents = None
        if need_image_latents or (latents is None and not is_strength_max):
            init_image = init_image.to(device=self._execution_device, dtype=self.vae.dtype)
            image_latents = init_image if init_image.shape[1] == 4 else self._encode_vae_image(init_image, generator)
            image_latents = image_latents.to(dtype).repeat(batch_size // image_latents.shape[0], 1, 1, 1)
        if latents is None:
            noise = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=dtype)
            if is_strength_max:
                latents = noise * self.scheduler.init_noise_sigma
            else:
                latents = self.scheduler.add_noise(image_latents, noise, timestep)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape} for this batch and size, got {tuple(latents.shape)}")
            noise = latents.to(device=self._execution_device, dtype=dtype)
            latents = noise * self.scheduler.init_noise_sigma
        return latents, noise, image_latents

    @torch.no_grad()
    def prepare_mask_latents(self, mask, masked_image, batch_size: int, height: int, width: int, dtype, generator,
                             do_classifier_free_guidance: bool):
        """The mask on the latent grid (nearest neighbour) and the masked image's latents, repeated to the batch
        (and doubled for classifier-free guidance)."""
        mask = torch.nn.functional.interpolate(mask, size=(height // self.vae_scale_factor, width // self.vae_scale_factor))
        mask = mask.to(device=self._execution_device, dtype=dtype)
        masked_image = masked_image.to(device=self._execution_device, dtype=dtype if masked_image.shape[1] == 4 else self.vae.dtype)
        masked_latents = masked_image if masked_image.shape[1] == 4 else self._encode_vae_image(masked_image, generator)
        for name, tensor in (("masks", mask), ("images", masked_latents)):
            if batch_size % tensor.shape[0]:
                raise ValueError(f"{tensor.shape[0]} {name} cannot be repeated to a batch of {batch_size}; give 1 or a divisor")
        mask = mask.repeat(batch_size // mask.shape[0], 1, 1, 1)
        masked_latents = masked_latents.repeat(batch_size // masked_latents.shape[0], 1, 1, 1)
        if do_classifier_free_guidance:
            mask, masked_latents = torch.cat([mask] * 2), torch.cat([masked_latents] * 2)
        return mask, masked_latents.to(device=self._execution_device, dtype=dtype)

    # ----- the loop -----

    def denoise(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        mask_image=None,
        *,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 1.0,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        cross_attention_kwargs: dict | None = None,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        """The inpainting loop as a generator of `DenoisingStep`s (latents after the blend, for a 4-channel UNet).
        The prompt, image and mask are positional, the rest keyword-only (as img2img's `denoise`).

        After the last step, `self.inpaint_state` holds what decoding needs (the preprocessed image, the crop box)."""
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        # the shared checks of every pipeline (pipelines/input_checks.py), before any work: finite numbers, then sizes
        check_finite(guidance_scale=guidance_scale, strength=strength, eta=eta)
        prompts = len(prompt) if isinstance(prompt, list) else 1 if prompt is not None or prompt_embeds is None else len(prompt_embeds)
        tiling = getattr(self.vae, "use_tiling", False)
        check_image_size(height, width, prompts * num_images_per_prompt, tiling)  # what the loop makes and decodes
        for name, given in (("image", image), ("mask_image", mask_image)):  # what is read and resized (None: below)
            if given is not None:
                check_is_image(given, name)
                given_wh = image_size(given)  # None for latents
                if given_wh is not None:
                    check_image_size(given_wh[1], given_wh[0], 1, tiling)
        self.check_inputs(prompt, height, width, output_type, prompt_embeds, callback_on_step_end_tensor_inputs)
        self.check_inpaint_inputs(image, mask_image, masked_image_latents, strength, output_type, padding_mask_crop)
        do_cfg = guidance_scale > 1.0
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, self._execution_device, num_images_per_prompt, do_cfg, negative_prompt, prompt_embeds, negative_prompt_embeds,
            clip_skip=clip_skip,
        )
        batch_size = prompt_embeds.shape[0]

        timesteps, num_inference_steps = self.retrieve_timesteps(num_inference_steps, timesteps, sigmas)
        timesteps, num_inference_steps = self.get_timesteps(num_inference_steps, strength)
        if num_inference_steps < 1:
            raise ValueError(f"strength {strength} leaves no step to run; raise strength or num_inference_steps")
        latent_timestep = timesteps[:1].repeat(batch_size)
        is_strength_max = strength == 1.0

        # the picture and the mask, cropped to the box around the mask when padding_mask_crop is given
        crops_coords, resize_mode = None, "default"
        if padding_mask_crop is not None:
            crops_coords = self.mask_processor.get_crop_region(mask_image, width, height, pad=padding_mask_crop)
            resize_mode = "fill"
        if isinstance(image, Image.Image) and image.mode != "RGB":
            image_rgb = image.convert("RGB")  # diffusers keeps the mode: RGBA is taken for latents (a bug; see tests)
        else:
            image_rgb = image
        init_image = self.image_processor.preprocess(image_rgb, height, width, resize_mode, crops_coords).to(torch.float32)

        in_channels = self.unet.config.in_channels
        latents, noise, image_latents = self.prepare_inpaint_latents(
            batch_size, height, width, prompt_embeds.dtype, generator, latents, init_image, latent_timestep,
            is_strength_max, need_image_latents=in_channels == 4,
        )
        mask_condition = self.mask_processor.preprocess(mask_image, height, width, resize_mode, crops_coords)
        masked_image = init_image * (mask_condition < 0.5) if masked_image_latents is None else masked_image_latents
        # Encoded for a 4-channel UNet too, as diffusers does: that draw from the generator changes what a
        # stochastic scheduler draws next, so skipping it would give another image from the same seed.
        mask, masked_image_latents = self.prepare_mask_latents(
            mask_condition, masked_image, batch_size, height, width, prompt_embeds.dtype, generator, do_cfg,
        )
        if in_channels == 9 and 4 + mask.shape[1] + masked_image_latents.shape[1] != 9:
            raise ValueError(
                f"the 9-channel UNet takes 4 latent + 1 mask + 4 masked-image channels, got {mask.shape[1]} mask and "
                f"{masked_image_latents.shape[1]} masked-image channels"
            )
        self.inpaint_state = dict(init_image=init_image, mask_condition=mask_condition, crops_coords=crops_coords,
                                  original_image=image, mask_image=mask_image, padding_mask_crop=padding_mask_crop)

        step_kwargs = self.step_kwargs(generator, eta)
        text_embeddings = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_cfg else prompt_embeds
        known_mask = mask.chunk(2)[0] if do_cfg else mask
        for step_index, t in enumerate(self.progress_bar(timesteps)):
            model_input = self.scheduler.scale_model_input(torch.cat([latents] * 2) if do_cfg else latents, t)
            if in_channels == 9:
                model_input = torch.cat([model_input, mask, masked_image_latents], dim=1)
            with torch.no_grad():
                noise_pred = self.unet(model_input, t, encoder_hidden_states=text_embeddings,
                                       cross_attention_kwargs=cross_attention_kwargs).sample
            if do_cfg:
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
            output = self.scheduler.step(noise_pred, t, latents, **step_kwargs)
            latents = output.prev_sample

            if in_channels == 4:  # the blend: the known region is the image's own latents at the next level
                known = image_latents
                if step_index < len(timesteps) - 1:
                    known = self.scheduler.add_noise(image_latents, noise, timesteps[step_index + 1 : step_index + 2])
                latents = (1 - known_mask) * known + known_mask * latents

            if callback_on_step_end is not None:
                current = {"latents": latents, "prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds,
                           "mask": mask, "masked_image_latents": masked_image_latents}
                changed = callback_on_step_end(self, step_index, t, {name: current[name] for name in callback_on_step_end_tensor_inputs})
                latents = changed.pop("latents", latents)
                mask = changed.pop("mask", mask)
                masked_image_latents = changed.pop("masked_image_latents", masked_image_latents)
                if "prompt_embeds" in changed or "negative_prompt_embeds" in changed:
                    prompt_embeds = changed.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = changed.pop("negative_prompt_embeds", negative_prompt_embeds)
                    text_embeddings = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_cfg else prompt_embeds
            yield DenoisingStep(step_index, len(timesteps), t, latents, noise_pred, output.pred_original_sample)

    def finish(self, latents: torch.Tensor, output_type: str = "pil"):
        """Decode the last latents; with padding_mask_crop, paste each result back into the original picture."""
        images = self.latents_to_output(latents, output_type)
        state = self.inpaint_state
        if state["padding_mask_crop"] is not None:
            original = state["original_image"]
            images = [self.image_processor.apply_overlay(state["mask_image"], original, image, state["crops_coords"])
                      for image in images]
        return images

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        mask_image=None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 1.0,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
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
        """Inpaint `image` where `mask_image` is white; diffusers 0.42.1's arguments and positions (the IP-Adapter's are
        refused unless None)."""
        refuse_unsupported_arguments(ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds)
        check_output_type(output_type)
        step = None
        for step in self.denoise(
            prompt, image, mask_image, masked_image_latents=masked_image_latents, height=height, width=width,
            padding_mask_crop=padding_mask_crop, strength=strength, num_inference_steps=num_inference_steps,
            timesteps=timesteps, sigmas=sigmas, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt, eta=eta, generator=generator, latents=latents,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, output_type=output_type,
            cross_attention_kwargs=cross_attention_kwargs, clip_skip=clip_skip, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        ):
            pass
        images = self.finish(step.latents, output_type)
        return StableDiffusionPipelineOutput(images=images) if return_dict else (images, None)
