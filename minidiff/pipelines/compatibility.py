"""What a Stable Diffusion pipeline does only so that code written for diffusers runs unchanged.

None of it is the denoising loop:
- `correct_outdated_scheduler_config`: diffusers' SD pipelines fix two fields of an old scheduler config when
  they are built (steps_offset -> 1, clip_sample -> False), with its deprecation warnings;
- `warn_unused_parts`: a safety checker, feature extractor or image encoder is accepted and not used;
- `refuse_unsupported_arguments`: arguments of diffusers' `__call__` that minidiff does not implement sit in our
  signatures only so that diffusers' positional order holds; given a value other than their default, they are refused;
- `DiffusersCompatibilityMixin`: diffusers' deprecated spellings (`_encode_prompt`, `decode_latents`), its
  helpers (`numpy_to_pil`) and switches that are pipeline-level there (attention slicing, VAE tiling).
"""

from __future__ import annotations

import warnings

import torch
from PIL import Image


def correct_outdated_scheduler_config(scheduler) -> None:
    """As diffusers' `StableDiffusionPipeline.__init__` (and img2img's): a config from before SD 1.4's release
    (`steps_offset` != 1, or `clip_sample=True`, both the defaults of DDIM, DDPM and PNDM) is corrected in place,
    each with diffusers' FutureWarning. So a scheduler built with its defaults in a pipeline visits 831, 665, ... 1,
    not 830, 664, ... 0, and does not clamp its x0 estimate to [-1, 1], a range SD's scaled latents often leave."""
    if scheduler is None:
        return
    if getattr(scheduler.config, "steps_offset", 1) != 1:
        warnings.warn(
            f"The configuration file of this scheduler: {scheduler} is outdated. `steps_offset`"
            f" should be set to 1 instead of {scheduler.config.steps_offset}. Please make sure "
            "to update the config accordingly as leaving `steps_offset` might led to incorrect results"
            " in future versions. If you have downloaded this checkpoint from the Hugging Face Hub,"
            " it would be very nice if you could open a Pull request for the `scheduler/scheduler_config.json`"
            " file",
            FutureWarning,
            stacklevel=3,
        )
        scheduler.register_to_config(steps_offset=1)
    if getattr(scheduler.config, "clip_sample", False) is True:
        warnings.warn(
            f"The configuration file of this scheduler: {scheduler} has not set the configuration `clip_sample`."
            " `clip_sample` should be set to False in the configuration file. Please make sure to update the"
            " config accordingly as not setting `clip_sample` in the config might lead to incorrect results in"
            " future versions. If you have downloaded this checkpoint from the Hugging Face Hub, it would be very"
            " nice if you could open a Pull request for the `scheduler/scheduler_config.json` file",
            FutureWarning,
            stacklevel=3,
        )
        scheduler.register_to_config(clip_sample=False)


def warn_unused_parts(safety_checker=None, feature_extractor=None, image_encoder=None) -> None:
    """diffusers' SD pipelines take these three parts; minidiff has none of them and says so once."""
    if safety_checker is not None or feature_extractor is not None or image_encoder is not None:
        warnings.warn(
            "minidiff has no safety checker, feature extractor or image encoder: the one given is not used. "
            "Pass safety_checker=None (as diffusers' SD 1.5 users who disable it do) to silence this.",
            stacklevel=3,
        )


# diffusers 0.42.1 `__call__` arguments minidiff has no implementation of, with the default that means "not used".
UNSUPPORTED_CALL_ARGUMENTS = {
    "timesteps": None,
    "sigmas": None,
    "ip_adapter_image": None,
    "ip_adapter_image_embeds": None,
    "guidance_rescale": 0.0,
}


def refuse_unsupported_arguments(**values) -> None:
    """Each keyword must be left at its default in UNSUPPORTED_CALL_ARGUMENTS: a value is an error, never ignored."""
    given = [name for name, value in values.items()
             if value is not None and (UNSUPPORTED_CALL_ARGUMENTS[name] is None or value != UNSUPPORTED_CALL_ARGUMENTS[name])]
    if given:
        raise ValueError(
            f"minidiff does not implement {', '.join(given)} (an argument of diffusers' pipeline, kept in the signature "
            "so that positional arguments mean what they mean in diffusers); leave it at its default"
        )


class DiffusersCompatibilityMixin:
    """diffusers' pipeline methods that are not the loop: deprecated spellings, helpers, memory switches."""

    def _encode_prompt(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt=None,
                       prompt_embeds=None, negative_prompt_embeds=None, lora_scale=None):
        """The old spelling: [negative; prompt] as one batch. Deprecated, as in diffusers: use encode_prompt."""
        warnings.warn(
            "`_encode_prompt()` is deprecated and it will be removed in a future version. Use `encode_prompt()` instead. "
            "Also, be aware that the output format changed from a concatenated tensor to a tuple.",
            FutureWarning,
            stacklevel=2,
        )
        positive, negative = self.encode_prompt(prompt, device, num_images_per_prompt, do_classifier_free_guidance,
                                                negative_prompt, prompt_embeds, negative_prompt_embeds, lora_scale)
        return torch.cat([negative, positive]) if negative is not None else positive

    def decode_latents(self, latents: torch.Tensor):
        """diffusers' (deprecated) decode_latents: a float (B, H, W, 3) numpy array in [0, 1]."""
        warnings.warn(
            "The decode_latents method is deprecated and will be removed in 1.0.0. Please use "
            "VaeImageProcessor.postprocess(...) instead (in minidiff: pipe.latents_to_output(latents, output_type))",
            FutureWarning,
            stacklevel=2,
        )
        return self.latents_to_output(latents, "np")

    @staticmethod
    def numpy_to_pil(images) -> list[Image.Image]:
        """A (B, H, W, 3) (or (H, W, 3)) float array in [0, 1] -> PIL images, as diffusers' numpy_to_pil."""
        images = images[None] if images.ndim == 3 else images
        return [Image.fromarray(pixels) for pixels in (images * 255).round().astype("uint8")]

    def enable_attention_slicing(self, slice_size="auto") -> None:
        """Accepted for diffusers' API; changes nothing here. Slicing computes attention a few heads at a time to
        save GPU memory; minidiff's attention is torch's scaled_dot_product_attention, which on a CPU already
        works without materialising the whole (tokens x tokens) matrix of every head at once."""

    def disable_attention_slicing(self) -> None:
        """See enable_attention_slicing: nothing to undo."""

    def enable_vae_tiling(self, tile_size: int = 64, tile_overlap: int = 16) -> None:
        """Decode large images tile by tile (memory of one 512x512 tile for SD 1.5); see AutoencoderKL.tiled_decode."""
        self.vae.enable_tiling(tile_size, tile_overlap)

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    def enable_vae_slicing(self) -> None:
        """Decode (and encode) a batch one image at a time: the VAE's memory of one image, for the same result.
        diffusers 0.42 moved this switch to the VAE (`pipe.vae.enable_slicing()`); older notebooks call it here."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    def upcast_vae(self) -> None:
        """Put the VAE in float32 (the other models keep their dtype); encode and decode cast to it and back."""
        self.vae.to(torch.float32)
