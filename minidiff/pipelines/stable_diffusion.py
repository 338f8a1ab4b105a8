"""StableDiffusionPipeline: the deconstruction tutorial's loop, behind `__call__`.

    prompt -> tokenizer -> text encoder -> (loop: scheduler <-> UNet, guidance) -> VAE decoder -> image

`denoise(...)` is the loop itself, as a generator: it yields a `DenoisingStep` after every step so
a tutorial can stop, look at the latents, the guided noise prediction and the predicted x0, and
resume. `__call__` runs it to the end and decodes. The order of operations (and of random draws)
is diffusers', so the same weights, prompt and seed give the same image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

import minidiff.schedulers as schedulers
from minidiff.checkpoints.single_file import load_single_file
from minidiff.utils.torch_utils import randn_tensor
from minidiff.models.clip_text import CLIPTextModel
from minidiff.models.unet_2d_condition import UNet2DConditionModel
from minidiff.models.vae import AutoencoderKL
from minidiff.tokenizer import CLIPTokenizer
from minidiff.utils.outputs import BaseOutput


@dataclass
class StableDiffusionPipelineOutput(BaseOutput):
    """`images`: a list of PIL images, a (B, H, W, 3) numpy array in [0, 1], a (B, 3, H, W) tensor, or latents."""

    images: list | np.ndarray | torch.Tensor
    nsfw_content_detected: list | None = None  # minidiff has no safety checker; kept for diffusers' API


@dataclass
class DenoisingStep:
    """What the loop yields after step `step_index` (x_t -> x_{t-1}) at timestep `t`."""

    step_index: int
    num_steps: int  # len(timesteps): steps in the whole loop (PNDM runs N+1 for N)
    t: torch.Tensor
    latents: torch.Tensor  # x_{t-1}, after the scheduler step: (B, 4, H/8, W/8) (pixels for DDPMPipeline)
    noise_pred: torch.Tensor  # the guided prediction eps_uncond + s * (eps_text - eps_uncond)
    pred_original_sample: torch.Tensor  # the scheduler's estimate of x_0 from this step


def to_output_type(image: torch.Tensor, output_type: str):
    """(B, 3, H, W) in [-1, 1] -> "pt" (B, 3, H, W) in [0, 1], "np" (B, H, W, 3) in [0, 1], or "pil" images."""
    image = (image / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    array = image.cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return array
    return [Image.fromarray(pixels) for pixels in (array * 255).round().astype("uint8")]


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class StableDiffusionPipeline:
    """Text-to-image with Stable Diffusion 1.x: tokenizer, CLIP text encoder, UNet, scheduler, VAE.

    The precision is the models' dtype (`from_pretrained(..., torch_dtype=torch.bfloat16)`): bfloat16 is the
    fast path on CPUs with AMX or AVX512-BF16 (see `fastest_cpu_dtype` and docs/performance.md). In float16
    the VAE is kept in float32 when its config says `force_upcast` (SD 1.5's does): its activations reach
    beyond float16's range on some images, and on a CPU an fp16 decode is no faster anyway.
    """

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler):
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.unet = unet
        self.scheduler = scheduler
        self._progress_bar_config: dict = {}
        self._upcast_vae_if_float16()
        self.vae.to(memory_format=conv_memory_format("vae", self.vae.dtype))  # no copy if loaded that way
        self.unet.to(memory_format=conv_memory_format("unet", self.unet.dtype))

    def _upcast_vae_if_float16(self) -> None:
        if self.vae.dtype == torch.float16 and self.vae.config.force_upcast:
            self.vae.to(torch.float32)

    # ----- loading -----

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, torch_dtype: torch.dtype | None = None, variant: str | None = None):
        """Load every component of a diffusers-layout folder (or hub repo id): unet/, vae/, text_encoder/, tokenizer/, scheduler/."""
        path = Path(path_or_repo_id)
        if path.is_file():
            return cls.from_single_file(path, torch_dtype=torch_dtype)
        load = dict(torch_dtype=torch_dtype, variant=variant)
        dtype = torch_dtype or torch.get_default_dtype()
        return cls(
            vae=AutoencoderKL.from_pretrained(path_or_repo_id, subfolder="vae", memory_format=conv_memory_format("vae", dtype), **load),
            text_encoder=CLIPTextModel.from_pretrained(path_or_repo_id, subfolder="text_encoder", **load),
            tokenizer=CLIPTokenizer.from_pretrained(path_or_repo_id, subfolder="tokenizer"),
            unet=UNet2DConditionModel.from_pretrained(
                path_or_repo_id, subfolder="unet", memory_format=conv_memory_format("unet", dtype), **load
            ),
            scheduler=scheduler_from_folder(path_or_repo_id),
        )

    @classmethod
    def from_single_file(
        cls, path: str | os.PathLike, torch_dtype: torch.dtype | None = None, use_ema: bool = False, config: str | os.PathLike | None = None
    ):
        """Load an original one-file checkpoint (e.g. v1-5-pruned-emaonly.safetensors), offline.

        `config`: a diffusers-layout folder whose configs describe the file (default: SD 1.5's, bundled)."""
        dtype = torch_dtype or torch.get_default_dtype()
        memory_formats = {model: conv_memory_format(model, dtype) for model in ("unet", "vae")}
        parts = load_single_file(path, torch_dtype=torch_dtype, use_ema=use_ema, config=config, memory_formats=memory_formats)
        return cls(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet, scheduler=parts.scheduler)

    def to(self, device=None, dtype: torch.dtype | None = None, memory_format: torch.memory_format | None = None):
        """Move and/or cast every model; `memory_format` sets the conv weights' layout (see `_convolutions_channels_last`)."""
        for module in (self.vae, self.text_encoder, self.unet):
            module.to(device=device, dtype=dtype, memory_format=memory_format)
        self._upcast_vae_if_float16()
        return self

    def compile(self) -> None:
        """Opt-in: `torch.compile` the UNet and the VAE decoder in place, with inductor's `freezing` (weights
        become constants: oneDNN prepacks them once instead of on every call, and fuses conv + bias + add).

        The first UNet call and the first decode then compile (about a minute each on 2 CPU cores; see
        docs/performance.md for the measured gain). The code that runs is still the models' own `forward`.
        """
        for module in (self.unet, self.vae.decoder):
            module.forward = torch.compile(module.forward, options={"freezing": True})  # state-dict names unchanged

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def vae_scale_factor(self) -> int:
        """8 for SD: the VAE halves the resolution once per block but the last."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ----- progress bars -----

    def set_progress_bar_config(self, **kwargs) -> None:
        """Options for tqdm, e.g. `disable=True` to turn the progress bars off."""
        self._progress_bar_config = kwargs

    def progress_bar(self, iterable):
        return tqdm(iterable, **self._progress_bar_config)

    # ----- the steps of the tutorial -----

    def check_inputs(self, prompt, height: int, width: int, output_type: str = "pil") -> None:
        if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and not all(isinstance(p, str) for p in prompt)):
            raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        if height % 8 or width % 8 or height <= 0 or width <= 0:
            raise ValueError(
                f"height and width must be positive multiples of 8 (the VAE works on 8x8 patches), got {height}x{width}; "
                f"try {max(8, height // 8 * 8)}x{max(8, width // 8 * 8)}"
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; expected one of {OUTPUT_TYPES}")

    @torch.no_grad()
    def encode_prompt(self, prompt: list[str], num_images_per_prompt: int, do_classifier_free_guidance: bool, negative_prompt=None):
        """Token ids -> CLIP's last hidden state, (B*n, 77, 768); with guidance, [uncond; text] as one batch (2B*n, 77, 768)."""
        text_input = self.tokenizer(
            prompt, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        text_embeddings = self.text_encoder(text_input.input_ids.to(self.text_encoder.device))[0]
        text_embeddings = text_embeddings.repeat_interleave(num_images_per_prompt, dim=0)
        if not do_classifier_free_guidance:
            return text_embeddings

        if negative_prompt is None:
            uncond_tokens = [""] * len(prompt)
        elif isinstance(negative_prompt, str):
            uncond_tokens = [negative_prompt] * len(prompt)
        elif len(negative_prompt) != len(prompt):
            raise ValueError(f"negative_prompt has {len(negative_prompt)} entries but prompt has {len(prompt)}; give one per prompt")
        else:
            uncond_tokens = list(negative_prompt)
        max_length = text_input.input_ids.shape[-1]
        uncond_input = self.tokenizer(uncond_tokens, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        uncond_embeddings = self.text_encoder(uncond_input.input_ids.to(self.text_encoder.device))[0]
        uncond_embeddings = uncond_embeddings.repeat_interleave(num_images_per_prompt, dim=0)
        # one batch instead of two forward passes: the first half is unconditional
        return torch.cat([uncond_embeddings, text_embeddings])

    def prepare_latents(self, batch_size: int, height: int, width: int, dtype, generator=None, latents=None) -> torch.Tensor:
        """x_T ~ N(0, I) of shape (B, 4, H/8, W/8), scaled by the scheduler's `init_noise_sigma`."""
        shape = (batch_size, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for this prompt batch and size, got {tuple(latents.shape)}")
        return latents.to(self.device) * self.scheduler.init_noise_sigma

    def step_kwargs(self, generator, eta: float) -> dict:
        """Every scheduler's `step` takes `generator` (the deterministic ones ignore it); `eta` is DDIM's (eq. 16)."""
        if eta == 0:
            return {"generator": generator}
        if not isinstance(self.scheduler, schedulers.DDIMScheduler):
            raise ValueError(
                f"eta={eta} is the noise weight of DDIM (Song et al. 2020, eq. 16); {type(self.scheduler).__name__} "
                "has no eta. Leave eta=0, or use DDIMScheduler"
            )
        return {"generator": generator, "eta": eta}

    def denoising_loop(self, latents, timesteps, text_embeddings, guidance_scale: float, step_kwargs: dict):
        """The loop of the tutorial. Yields a DenoisingStep after each scheduler step."""
        do_classifier_free_guidance = guidance_scale > 1.0
        for step_index, t in enumerate(self.progress_bar(timesteps)):
            # expand the latents for classifier-free guidance: (2B, 4, H/8, W/8)
            latent_model_input = torch.cat([latents] * 2) if do_classifier_free_guidance else latents
            latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)

            # predict the noise residual
            with torch.no_grad():
                noise_pred = self.unet(latent_model_input, t, encoder_hidden_states=text_embeddings).sample

            # perform guidance
            if do_classifier_free_guidance:
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)

            # compute the previous noisy sample x_t -> x_t-1
            output = self.scheduler.step(noise_pred, t, latents, **step_kwargs)
            latents = output.prev_sample
            yield DenoisingStep(step_index, len(timesteps), t, latents, noise_pred, output.pred_original_sample)

    def denoise(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
    ):
        """The whole text-to-image loop as a generator of `DenoisingStep`s: stop at any step, inspect, resume."""
        self.check_inputs(prompt, height, width)
        prompt = [prompt] if isinstance(prompt, str) else prompt
        text_embeddings = self.encode_prompt(prompt, num_images_per_prompt, guidance_scale > 1.0, negative_prompt)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        latents = self.prepare_latents(
            len(prompt) * num_images_per_prompt, height, width, text_embeddings.dtype, generator, latents
        )
        yield from self.denoising_loop(
            latents, self.scheduler.timesteps, text_embeddings, guidance_scale, self.step_kwargs(generator, eta)
        )

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, output_type: str = "pil"):
        """z -> image: undo the latent scaling (1 / 0.18215 for SD 1.5), decode with the VAE, convert."""
        if output_type == "latent":
            return latents
        latents = (latents / self.vae.config.scaling_factor).to(self.vae.dtype)  # the VAE may be float32 (upcast)
        image = self.vae.decode(latents).sample  # (B, 3, H, W) in [-1, 1]
        return to_output_type(image, output_type)

    def enable_vae_tiling(self, tile_size: int = 64, tile_overlap: int = 16) -> None:
        """Decode large images tile by tile (memory of one 512x512 tile for SD 1.5); see AutoencoderKL.tiled_decode."""
        self.vae.enable_tiling(tile_size, tile_overlap)

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    def latents_to_image(self, latents: torch.Tensor) -> Image.Image:
        """The first image of a latent batch, decoded to PIL (for traces and step-through tutorials)."""
        return self.decode_latents(latents[:1], "pil")[0]

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
    ) -> StableDiffusionPipelineOutput:
        self.check_inputs(prompt, height, width, output_type)
        step = None
        for step in self.denoise(
            prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
            num_images_per_prompt, generator, latents, eta,
        ):
            pass
        return StableDiffusionPipelineOutput(images=self.decode_latents(step.latents, output_type))


def conv_memory_format(model: str, dtype: torch.dtype) -> torch.memory_format:
    """The layout of the conv weights of the pipeline's "vae" or "unet" in `dtype`.

    Channels-last, (C_out, kH, kW, C_in): oneDNN's CPU convolutions run fastest on it, their outputs keep it, and
    the reshapes around attention become views. Measured (docs/performance.md): the VAE decode 1.2x (fp32) to
    2.9x (bf16) faster, the bf16 UNet step 10%. The float32 UNet runs as fast either way, so it keeps the file's
    layout: its weights stay views of the memory-mapped file, with no copy to make.
    """
    return torch.contiguous_format if model == "unet" and dtype == torch.float32 else torch.channels_last


def fastest_cpu_dtype() -> torch.dtype:
    """bfloat16 on a CPU with bfloat16 matrix instructions (AMX-BF16, or AVX512-BF16), else float32.

    Measured on 2 Sapphire Rapids cores (docs/performance.md): a guided SD 1.5 UNet step takes about 2 s in
    bfloat16 against 7 s in float32, and the bfloat16 image stays within 30 dB PSNR of the float32 one. Without
    those instructions oneDNN has no fast bfloat16 kernels, so float32 is the safe choice; float16 on this CPU
    (no AMX-FP16) was slower than float32.
    """
    flags = _cpu_flags()
    return torch.bfloat16 if {"amx_bf16", "avx512_bf16"} & flags else torch.float32


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); an empty set elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def scheduler_from_folder(path_or_repo_id, subfolder: str | None = "scheduler") -> schedulers.SchedulerMixin:
    """The scheduler named in `scheduler/scheduler_config.json` (`_class_name`), built from that config."""
    config = schedulers.SchedulerMixin.load_config(path_or_repo_id, subfolder=subfolder)
    name = config.get("_class_name", "PNDMScheduler")
    scheduler_class = getattr(schedulers, str(name), None)
    if scheduler_class is None:
        raise ValueError(
            f"the scheduler config names {name!r}, which minidiff does not implement; minidiff has "
            f"{', '.join(cls.__name__ for cls in schedulers.SchedulerMixin.compatibles)}. Swap it with e.g. `pipe.scheduler = EulerDiscreteScheduler.from_config(config)`."
        )
    return scheduler_class.from_config(config)
