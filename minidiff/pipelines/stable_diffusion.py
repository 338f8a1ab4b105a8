"""StableDiffusionPipeline: the deconstruction tutorial's loop, behind `__call__`.

    prompt -> tokenizer -> text encoder -> (loop: scheduler <-> UNet, guidance) -> VAE decoder -> image

`denoise(...)` is the loop itself, as a generator: it yields a `DenoisingStep` after every step so
a tutorial can stop, look at the latents, the guided noise prediction and the predicted x0, and
resume. `__call__` runs it to the end and decodes. The order of operations (and of random draws)
is diffusers', so the same weights, prompt and seed give the same image.

This class is the loop and its steps; the rest comes from mixins, each in its own module:
    pipelines/loading.py            from_pretrained, from_single_file, save_pretrained, components
    loaders/textual_inversion.py    load_textual_inversion, maybe_convert_prompt
    pipelines/compatibility.py      diffusers' deprecated spellings and switches; its scheduler-config fix
    pipelines/common.py             the progress bar (shared with DDPMPipeline)
    pipelines/devices.py            to(), device, dtype, where tensors are made; CPU offload (pipelines/offload.py)
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from PIL import Image

from minidiff.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
from minidiff.loaders.textual_inversion import TextualInversionLoaderMixin
from minidiff.models.lora_adapters import lora_scale as scaled_lora
from minidiff.models.layers import guidance_scale_embedding
from minidiff.pipelines.common import (
    DenoisingStep,
    ProgressBarMixin,
    StableDiffusionPipelineOutput,
    predicted_x0,
    check_output_type,
    to_output_type,
)
from minidiff.pipelines.compatibility import (
    DiffusersCompatibilityMixin,
    correct_outdated_scheduler_config,
    refuse_unsupported_arguments,
    warn_unused_parts,
)
from minidiff.pipelines.devices import SCHEDULE_DEVICE, DevicePlacementMixin
from minidiff.pipelines.input_checks import check_finite, check_image_size
from minidiff.pipelines.loading import StableDiffusionLoadingMixin
from minidiff.schedulers.ddim import DDIMScheduler
from minidiff.schedulers.flow_match_euler import FlowMatchEulerDiscreteScheduler
from minidiff.schedulers.parameterization import x0_from_flow_velocity
from minidiff.utils.torch_utils import randn_tensor


class StableDiffusionPipeline(StableDiffusionLoadingMixin, TextualInversionLoaderMixin, DiffusersCompatibilityMixin,
                              StableDiffusionLoraLoaderMixin, DevicePlacementMixin, ProgressBarMixin):
    """Text-to-image with Stable Diffusion 1.x: tokenizer, CLIP text encoder, UNet, scheduler, VAE.

    The precision is the models' dtype (`from_pretrained(..., dtype=torch.bfloat16)`): bfloat16 is the
    fast path on CPUs with AMX or AVX512-BF16 (see `fastest_cpu_dtype` and docs/performance.md), float16 on a
    GPU. As in diffusers' SD 1.x pipelines, every model keeps that dtype, the VAE included: SD 1.5's VAE decodes
    fine in float16 (its config's `force_upcast` is read only by SDXL's pipelines, whose VAE overflows);
    `pipe.upcast_vae()` puts it in float32 if you want.
    """

    # What `callback_on_step_end` may read and replace, as in diffusers.
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    _cpu_layout_models = ("unet", "vae")  # channels-last conv weights on a CPU (pipelines/devices.py)

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None, feature_extractor=None,
                 requires_safety_checker: bool = False, image_encoder=None):
        warn_unused_parts(safety_checker, feature_extractor, image_encoder)
        correct_outdated_scheduler_config(scheduler)
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.unet = unet
        self.scheduler = scheduler
        self._set_conv_layout()  # no copy if loaded that way

    def compile(self) -> None:
        """Opt-in: `torch.compile` the UNet and the VAE decoder in place, with inductor's `freezing` (weights
        become constants: oneDNN prepacks them once instead of on every call, and fuses conv + bias + add).

        The first UNet call and the first decode then compile (about a minute each on 2 CPU cores; see
        docs/performance.md for the measured gain). The code that runs is still the models' own `forward`.
        """
        for module in (self.unet, self.vae.decoder):
            module.forward = torch.compile(module.forward, options={"freezing": True})  # state-dict names unchanged

    @property
    def vae_scale_factor(self) -> int:
        """8 for SD: the VAE halves the resolution once per block but the last."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ----- the steps of the tutorial -----

    def check_inputs(self, prompt, height: int, width: int, output_type: str = "pil", prompt_embeds=None,
                     callback_on_step_end_tensor_inputs=None) -> None:
        if prompt is None and prompt_embeds is None:
            raise ValueError("give a prompt, or prompt_embeds (e.g. from pipe.encode_prompt)")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("give a prompt or prompt_embeds, not both")
        if prompt is not None and (
            not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and not all(isinstance(p, str) for p in prompt))
        ):
            raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        if height % 8 or width % 8 or height <= 0 or width <= 0:
            raise ValueError(
                f"height and width must be positive multiples of 8 (the VAE works on 8x8 patches), got {height}x{width}; "
                f"try {max(8, height // 8 * 8)}x{max(8, width // 8 * 8)}"
            )
        check_output_type(output_type)
        unknown = [name for name in callback_on_step_end_tensor_inputs or [] if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown}: a callback can have {self._callback_tensor_inputs}")

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device=None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompts -> CLIP text embeddings, as diffusers' `encode_prompt`: returns (prompt_embeds, negative_prompt_embeds),
        each (B*n, 77, 768) for SD 1.5 (negative None without guidance). Embeddings given are used as they are.

        `clip_skip=k` takes the hidden states k layers before the last, through CLIP's final layer norm.
        `lora_scale` multiplies the text encoder's LoRA layers for this call (cross_attention_kwargs["scale"]).
        """
        if lora_scale is not None:
            self._lora_scale = lora_scale
        with scaled_lora(self.text_encoder, lora_scale):
            return self._encode_prompt_embeds(prompt, device, num_images_per_prompt, do_classifier_free_guidance,
                                              negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip)

    def _encode_prompt_embeds(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt,
                              prompt_embeds, negative_prompt_embeds, clip_skip):
        if prompt_embeds is None:
            prompt = [prompt] if isinstance(prompt, str) else prompt
            prompt_embeds = self._text_embeddings(self.maybe_convert_prompt(prompt), clip_skip)
        prompt_embeds = prompt_embeds.to(dtype=self.text_encoder.dtype, device=device or self._execution_device)
        batch = prompt_embeds.shape[0]
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if negative_prompt is None:
                uncond_tokens = [""] * batch
            elif isinstance(negative_prompt, str):
                uncond_tokens = [negative_prompt] * batch
            elif len(negative_prompt) != batch:
                raise ValueError(
                    f"negative_prompt has {len(negative_prompt)} entries but prompt has {batch}; give one per prompt"
                )
            else:
                uncond_tokens = list(negative_prompt)
            uncond_tokens = self.maybe_convert_prompt(uncond_tokens)
            negative_prompt_embeds = self._text_embeddings(uncond_tokens, clip_skip=None, max_length=prompt_embeds.shape[1])
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(dtype=self.text_encoder.dtype, device=device or self._execution_device)
            if negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError(
                    f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} and prompt_embeds "
                    f"{tuple(prompt_embeds.shape)} must have the same shape"
                )
        # n images per prompt: each embedding repeated n times in a row, (B, 77, D) -> (B*n, 77, D)
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        if negative_prompt_embeds is not None and do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds

    def _text_embeddings(self, texts: list[str], clip_skip: int | None = None, max_length: int | None = None) -> torch.Tensor:
        """Token ids -> CLIP's last hidden state (or, with clip_skip, an earlier layer's, layer-normed)."""
        tokens = self.tokenizer(
            texts, padding="max_length", max_length=max_length or self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        )
        input_ids = tokens.input_ids.to(self._execution_device)
        if clip_skip is None:
            return self.text_encoder(input_ids)[0]
        hidden_states = self.text_encoder(input_ids, output_hidden_states=True).hidden_states
        return self.text_encoder.text_model.final_layer_norm(hidden_states[-(clip_skip + 1)])

    def prepare_latents(self, batch_size: int, height: int, width: int, dtype, generator=None, latents=None) -> torch.Tensor:
        """x_T ~ N(0, I) of shape (B, 4, H/8, W/8), scaled by the scheduler's `init_noise_sigma`."""
        shape = (batch_size, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for this prompt batch and size, got {tuple(latents.shape)}")
        return latents.to(self._execution_device) * self.scheduler.init_noise_sigma

    def step_kwargs(self, generator, eta: float) -> dict:
        """Every scheduler's `step` takes `generator` (the deterministic ones ignore it); `eta` goes to the schedulers
        whose step has one, as diffusers' `prepare_extra_step_kwargs`: DDIM's noise weight (eq. 16), TCD's gamma
        (so TCD under this pipeline runs with eta=0, deterministic, unless you pass eta=0.3 as TCD's authors do)."""
        if "eta" in inspect.signature(self.scheduler.step).parameters:
            return {"generator": generator, "eta": eta}
        if eta != 0:
            raise ValueError(
                f"eta={eta} is the noise weight of DDIM (Song et al. 2020, eq. 16) and TCD's gamma; "
                f"{type(self.scheduler).__name__} has no eta. Leave eta=0, or use DDIMScheduler or TCDScheduler"
            )
        return {"generator": generator}

    def uses_classifier_free_guidance(self, guidance_scale: float) -> bool:
        """CFG (a batch of two: unconditional and text) only when guidance_scale > 1 and the UNet has no guidance
        embedding (`time_cond_proj_dim`): an LCM-distilled UNet takes the guidance scale as an input instead."""
        return guidance_scale > 1.0 and self.unet.config.time_cond_proj_dim is None

    def get_guidance_scale_embedding(self, w: torch.Tensor, embedding_dim: int = 512, dtype: torch.dtype = torch.float32):
        """diffusers' pipeline method: (N,) guidance scales -> (N, embedding_dim) (`layers.guidance_scale_embedding`)."""
        return guidance_scale_embedding(w, embedding_dim, dtype)

    def guidance_condition(self, guidance_scale: float, batch_size: int, like: torch.Tensor) -> torch.Tensor | None:
        """The UNet's `timestep_cond` for an LCM-distilled UNet, None for any other: the embedding of w = guidance_scale - 1
        (the pipelines write guidance as eps_u + s (eps_c - eps_u); LCM's paper as eps_c + w (eps_c - eps_u), w = s - 1)."""
        dim = self.unet.config.time_cond_proj_dim
        if dim is None:
            return None
        w = torch.tensor(guidance_scale - 1).repeat(batch_size)
        return self.get_guidance_scale_embedding(w, embedding_dim=dim).to(device=like.device, dtype=like.dtype)

    def prepare_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """`scheduler.set_timesteps` for this loop. A flow-matching scheduler gets the levels of the rectified-flow
        sampler (and of diffusers' Flux pipeline): sigma = 1, 1 - 1/N, ..., 1/N, then 0, i.e. timesteps 1000 (1 - i/N)
        and steps of dt = -1/N; its `shift` config still applies on top (docs/flow_matching.md)."""
        if isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler):
            N = num_inference_steps
            self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / N, N), device=SCHEDULE_DEVICE)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=SCHEDULE_DEVICE)
        return self.scheduler.timesteps

    def model_output_for_scheduler(self, model_output: torch.Tensor) -> torch.Tensor:
        """The (guided) UNet output as the scheduler reads it; the identity here. RectifiedFlowPipeline flips the
        sign: its checkpoints predict data - noise, diffusers' flow scheduler expects noise - data."""
        return model_output

    def denoising_loop(self, latents, timesteps, prompt_embeds, negative_prompt_embeds, guidance_scale: float,
                       step_kwargs: dict, callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",),
                       cross_attention_kwargs: dict | None = None, preview_vae=None):
        """The loop of the tutorial. Yields a DenoisingStep after each scheduler step.

        `callback_on_step_end(pipe, i, t, {name: tensor})`, as in diffusers, is called after each step with the
        tensors named in `callback_on_step_end_tensor_inputs`, and may return new ones to continue with. As in
        diffusers, "prompt_embeds" is the text batch the UNet sees: [negative; prompt] under guidance, (2B, 77, D).
        `cross_attention_kwargs` go to the UNet's attention processors (models/attention_processor.py).
        `preview_vae` (e.g. TAESD) decodes each step's predicted x0 of the first image into `step.preview`."""
        do_classifier_free_guidance = self.uses_classifier_free_guidance(guidance_scale)
        timestep_cond = self.guidance_condition(guidance_scale, latents.shape[0], latents)  # LCM UNets only
        # one batch instead of two forward passes: the first half is unconditional, (2B, 77, 768)
        if do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        for step_index, t in enumerate(self.progress_bar(timesteps)):
            # expand the latents for classifier-free guidance: (2B, 4, H/8, W/8)
            latent_model_input = torch.cat([latents] * 2) if do_classifier_free_guidance else latents
            latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)

            # predict the noise residual
            with torch.no_grad():
                noise_pred = self.unet(latent_model_input, t, encoder_hidden_states=prompt_embeds,
                                       timestep_cond=timestep_cond, cross_attention_kwargs=cross_attention_kwargs).sample

            # perform guidance
            if do_classifier_free_guidance:
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)

            # compute the previous noisy sample x_t -> x_t-1
            model_output = self.model_output_for_scheduler(noise_pred)
            output = self.scheduler.step(model_output, t, latents, **step_kwargs)
            x0_pred = predicted_x0(output)  # pred_original_sample, or LCM's denoised, or TCD's pred_noised_sample
            if x0_pred is None and isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler):
                # the flow scheduler's output has no x_0 estimate (as diffusers'); the line back from x: x - sigma u
                sigma = self.scheduler.sigmas[self.scheduler.step_index - 1].to(latents.device)
                x0_pred = x0_from_flow_velocity(model_output, latents, sigma)
            latents = output.prev_sample

            if callback_on_step_end is not None:
                current = {"latents": latents, "prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}
                changed = callback_on_step_end(self, step_index, t, {name: current[name] for name in callback_on_step_end_tensor_inputs})
                latents = changed.pop("latents", latents)
                prompt_embeds = changed.pop("prompt_embeds", prompt_embeds)
                negative_prompt_embeds = changed.pop("negative_prompt_embeds", negative_prompt_embeds)
            step = DenoisingStep(step_index, len(timesteps), t, latents, noise_pred, x0_pred)
            if preview_vae is not None:
                step.preview = self.preview_image(x0_pred, preview_vae)
            yield step

    def denoise(
        self,
        prompt: str | list[str] | None = None,
        *,
        negative_prompt: str | list[str] | None = None,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        cross_attention_kwargs: dict | None = None,
        preview_vae=None,
    ):
        """The whole text-to-image loop as a generator of `DenoisingStep`s: stop at any step, inspect, resume.
        Only the prompt is positional (a subclass such as img2img adds its own positional inputs after it).

        preview_vae: an autoencoder (typically `AutoencoderTiny`, TAESD) that decodes each step's predicted x0 of the
        first image into `step.preview`, a PIL image: a live preview at a small fraction of a full VAE decode."""
        self.check_inputs(prompt, height, width, prompt_embeds=prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        prompts = len(prompt) if isinstance(prompt, list) else 1 if prompt is not None else len(prompt_embeds)
        check_image_size(height, width, prompts * num_images_per_prompt, getattr(self.vae, "use_tiling", False))
        check_finite(guidance_scale=guidance_scale, eta=eta)
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, self._execution_device, num_images_per_prompt, self.uses_classifier_free_guidance(guidance_scale), negative_prompt,
            prompt_embeds, negative_prompt_embeds, clip_skip=clip_skip,
            lora_scale=(cross_attention_kwargs or {}).get("scale"),
        )
        timesteps = self.prepare_timesteps(num_inference_steps)
        latents = self.prepare_latents(prompt_embeds.shape[0], height, width, prompt_embeds.dtype, generator, latents)
        yield from self.denoising_loop(
            latents, timesteps, prompt_embeds, negative_prompt_embeds, guidance_scale,
            self.step_kwargs(generator, eta), callback_on_step_end, callback_on_step_end_tensor_inputs,
            cross_attention_kwargs, preview_vae,
        )

    @torch.no_grad()
    def preview_image(self, latents: torch.Tensor, vae) -> Image.Image:
        """The first latent of a batch decoded by `vae` (any autoencoder with `decode` and `config.scaling_factor`).
        TAESD's scaling_factor is 1.0: it decodes SD's scaled latents as they are, so dividing by it changes nothing."""
        parameter = next(vae.parameters())
        latents = (latents[:1] / vae.config.scaling_factor).to(device=parameter.device, dtype=parameter.dtype)
        return to_output_type(vae.decode(latents).sample.float(), "pil")[0]

    @torch.no_grad()
    def latents_to_output(self, latents: torch.Tensor, output_type: str = "pil"):
        """z -> image: undo the latent scaling (1 / 0.18215 for SD 1.5), decode with the VAE, convert to `output_type`."""
        if output_type == "latent":
            return latents
        latents = (latents / self.vae.config.scaling_factor).to(self.vae.dtype)  # float32 after upcast_vae()
        image = self.vae.decode(latents).sample  # (B, 3, H, W) in [-1, 1]
        return to_output_type(image, output_type)

    def latents_to_image(self, latents: torch.Tensor) -> Image.Image:
        """The first image of a latent batch, decoded to PIL (for traces and step-through tutorials)."""
        return self.latents_to_output(latents[:1], "pil")[0]

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int = 512,
        width: int = 512,
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
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ) -> StableDiffusionPipelineOutput | tuple:
        """Text to image: the `denoise` loop run to the end, then decoded (`output_type` "pil", "np", "pt" or "latent").

        The arguments and their positions are diffusers 0.42.1's, so `pipe("a cat", 512, 512, 20)` is height, width and
        steps there and here. timesteps, sigmas, the IP-Adapter's and guidance_rescale are not implemented: they
        are in the signature only to keep those positions, and refused unless left at their default."""
        refuse_unsupported_arguments(timesteps=timesteps, sigmas=sigmas, ip_adapter_image=ip_adapter_image,
                                     ip_adapter_image_embeds=ip_adapter_image_embeds, guidance_rescale=guidance_rescale)
        check_output_type(output_type)  # the other inputs: check_inputs, first thing in denoise
        step = None
        for step in self.denoise(
            prompt, negative_prompt=negative_prompt, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents, eta=eta,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, clip_skip=clip_skip,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            cross_attention_kwargs=cross_attention_kwargs,
        ):
            pass
        images = self.latents_to_output(step.latents, output_type)
        self.maybe_free_model_hooks()  # with CPU offload: the VAE goes back to the CPU
        return StableDiffusionPipelineOutput(images=images) if return_dict else (images, None)
