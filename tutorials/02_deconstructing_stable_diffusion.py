# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Deconstructing Stable Diffusion
#
# Stable Diffusion is the loop of tutorial 01 run on a small *latent* picture, steered by a prompt:
#
#     prompt -> tokenizer -> text encoder -> (loop: scheduler <-> UNet, guidance) -> VAE decoder -> image
#
# This is the walk-through of diffusers' tutorial "Understanding pipelines, models and schedulers"
# (section "Deconstruct the Stable Diffusion pipeline"), line by line with minidiff, printing every
# shape on the way.
#
# **Weights.** With `MINIDIFF_SD15=/path/to/stable-diffusion-v1-5` (a diffusers folder, or one
# checkpoint file such as `v1-5-pruned-emaonly.safetensors`) it runs on the real model at 512x512
# (a few minutes on a CPU). Without it, it runs offline on *tiny random* weights in SD 1.5's layout
# (same tokenizer, same block types, narrow layers, 64x64 pictures): the pictures are noise, but
# every line, shape and number of the loop is the real thing, in a few seconds.
#
# **Run it:** `python tutorials/02_deconstructing_stable_diffusion.py`, or open it as a notebook.
# Pictures go to `tutorials/out/02_deconstructing_stable_diffusion/` (`MINIDIFF_TUTORIAL_OUT` moves them).

# %%
import torch

import tutorial_helpers as helpers

torch.set_num_threads(1)  # tiny models: more threads only add overhead on a shared CPU
OUT = helpers.output_folder("02_deconstructing_stable_diffusion")
model_path, real_weights = helpers.sd15_weights()
print(f"weights: {model_path} ({'from MINIDIFF_SD15' if real_weights else 'tiny random: the pictures will be noise'})")

# %% [markdown]
# ## 1. The parts
#
# Three networks with weights (the VAE, the CLIP text encoder, the UNet), the tokenizer, and a
# scheduler. As in the diffusers tutorial we swap SD 1.5's default scheduler (PNDM) for UniPC,
# built from the same `scheduler_config.json`.

# %%
from minidiff import AutoencoderKL, CLIPTextModel, CLIPTokenizer, UNet2DConditionModel, UniPCMultistepScheduler

if model_path.is_file():  # one original checkpoint: the same parts, read through the single-file key map
    from minidiff.loaders.single_file import load_single_file

    parts = load_single_file(model_path)
    vae, tokenizer, text_encoder, unet = parts.vae, parts.tokenizer, parts.text_encoder, parts.unet
    default_scheduler = type(parts.scheduler).__name__
    scheduler = UniPCMultistepScheduler.from_config(parts.scheduler.config)
else:
    model_id = model_path
    vae = AutoencoderKL.from_pretrained(model_id, subfolder="vae")
    tokenizer = CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model_id, subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(model_id, subfolder="unet")
    default_scheduler = UniPCMultistepScheduler.load_config(model_id, subfolder="scheduler")["_class_name"]
    scheduler = UniPCMultistepScheduler.from_pretrained(model_id, subfolder="scheduler")

torch_device = "cuda" if torch.cuda.is_available() else "cpu"  # as diffusers' tutorial: the GPU when there is one
for part in (vae, text_encoder, unet):
    part.to(torch_device)
    print(f"{type(part).__name__:22s} {sum(p.numel() for p in part.parameters()) / 1e6:8.2f} M parameters")
print(f"scheduler: {type(scheduler).__name__}, built from the config of SD 1.5's default, {default_scheduler}")

# %% [markdown]
# ## 2. The settings
#
# `height` and `width` are SD 1.5's 512 with the real weights; the tiny UNet was configured for 64x64.

# %%
prompt = ["a photograph of an astronaut riding a horse"]
height = width = 8 * unet.config.sample_size  # 512 for SD 1.5, 64 for the tiny weights
num_inference_steps = 25  # denoising steps
guidance_scale = 7.5  # the scale of classifier-free guidance
generator = torch.manual_seed(0)  # the seed of the initial latent noise
batch_size = len(prompt)
print(f"{height}x{width}, {num_inference_steps} steps, guidance {guidance_scale}")

# %% [markdown]
# ## 3. The prompt: token ids
#
# CLIP's tokenizer splits the prompt into byte-pair tokens, adds a start token (49406) and an end
# token (49407), and pads with the end token to 77 ids: the text encoder always reads 77 positions.

# %%
text_input = tokenizer(
    prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
)
ids = text_input.input_ids
helpers.describe("input_ids", ids)
print("first 12 ids:", ids[0, :12].tolist())
print("as tokens:   ", tokenizer.convert_ids_to_tokens(ids[0, :10].tolist()))
num_prompt_tokens = len(tokenizer.tokenize(prompt[0]))

assert ids.shape == (1, 77) and tokenizer.model_max_length == 77
assert ids[0, 0] == tokenizer.bos_token_id == 49406  # <|startoftext|>
assert ids[0, 1 + num_prompt_tokens] == tokenizer.eos_token_id == 49407  # <|endoftext|> right after the prompt
assert (ids[0, 2 + num_prompt_tokens :] == tokenizer.pad_token_id).all()  # then padding (SD pads with <|endoftext|>)

# %% [markdown]
# ## 4. Text embeddings: one vector per position
#
# The text encoder's last hidden state, (batch, 77, hidden): 768 numbers per token for SD 1.5's
# CLIP ViT-L/14 (32 for the tiny one). The UNet reads them through cross-attention.

# %%
with torch.no_grad():
    text_embeddings = text_encoder(text_input.input_ids.to(torch_device))[0]
helpers.describe("text_embeddings", text_embeddings)
hidden_size = text_encoder.config.hidden_size

assert text_embeddings.shape == (batch_size, 77, hidden_size)
assert hidden_size == unet.config.cross_attention_dim  # what the UNet's cross-attention expects

# %% [markdown]
# ## 5. Unconditional embeddings: the empty prompt
#
# Classifier-free guidance needs a second prediction without the prompt. "Without" means the
# embedding of the empty prompt `""` (start token, end token, padding), which is *not* zero. Both
# go through the UNet as one batch of 2: `[uncond; text]`.

# %%
max_length = text_input.input_ids.shape[-1]
uncond_input = tokenizer([""] * batch_size, padding="max_length", max_length=max_length, return_tensors="pt")
with torch.no_grad():
    uncond_embeddings = text_encoder(uncond_input.input_ids.to(torch_device))[0]
print("empty prompt ids:", uncond_input.input_ids[0, :4].tolist(), "...")
text_embeddings = torch.cat([uncond_embeddings, text_embeddings])  # (2B, 77, hidden): [uncond; text]
helpers.describe("text_embeddings after the cat", text_embeddings)

assert uncond_input.input_ids[0, :3].tolist() == [49406, 49407, 49407]
assert text_embeddings.shape == (2 * batch_size, 77, hidden_size)
assert uncond_embeddings.abs().amax(dim=-1).min() > 0  # not zero, at any of the 77 positions
assert not torch.allclose(uncond_embeddings, text_embeddings[batch_size:])  # and not the prompt's: an embedding of its own

# %% [markdown]
# ## 6. The initial latents: (B, 4, H/8, W/8)
#
# The loop runs in the VAE's latent space: 4 channels at 1/8 of the resolution (the VAE halves the
# size in each of its blocks but the last), 64x64x4 for a 512x512 picture: 48 times fewer numbers.

# %%
vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
latents = torch.randn(
    (batch_size, unet.config.in_channels, height // vae_scale_factor, width // vae_scale_factor),
    generator=generator,
    device=torch_device,
)
helpers.describe("latents", latents)

assert vae_scale_factor == 8
assert latents.shape == (batch_size, 4, height // 8, width // 8)

# %% [markdown]
# ## 7. `init_noise_sigma` and `scale_model_input`
#
# Schedulers disagree on how the noisy sample is scaled. The "variance preserving" ones (DDPM, DDIM,
# PNDM, DPM-Solver, UniPC) keep x_t at unit variance: x_T is plain N(0, I) and the model reads x_t
# as it is. The sigma schedulers (Euler, Euler ancestral, LMS) carry x = x_0 + sigma eps, which at
# t=999 has std sigma_max = 14.6; `scale_model_input` divides by sqrt(sigma^2 + 1) to hand the UNet
# the unit-variance input it was trained on. Calling both, always, makes a loop work with any scheduler.

# %%
from minidiff import EulerDiscreteScheduler

euler = EulerDiscreteScheduler.from_config(scheduler.config)
euler.set_timesteps(num_inference_steps)
print(f"init_noise_sigma: UniPC {float(scheduler.init_noise_sigma):.4f}, Euler {float(euler.init_noise_sigma):.4f}")
sigma_max = float(euler.sigmas[0])
scaled = euler.scale_model_input(latents * euler.init_noise_sigma, euler.timesteps[0])
divisor = (sigma_max**2 + 1) ** 0.5
print(f"Euler at t=999: scale_model_input divides by sqrt({sigma_max:.4f}^2 + 1) = {divisor:.4f}")

assert scheduler.init_noise_sigma == 1.0
assert abs(float(euler.init_noise_sigma) - 14.6146) < 1e-3 and float(euler.timesteps[0]) == 999  # sigma_max, t=999
assert torch.allclose(scaled, latents * sigma_max / (sigma_max**2 + 1) ** 0.5)  # float32 rounding only

latents = latents * scheduler.init_noise_sigma

# %% [markdown]
# ## 8. The loop, with guidance
#
# Each step: duplicate the latents for the `[uncond; text]` batch, scale them, ask the UNet for the
# noise in both, combine them with the guidance line
#
#     noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
#
# (Ho & Salimans 2022, arXiv 2207.12598, eq. 6: move from the unconditional prediction past the
# conditional one), and take one scheduler step. Tutorial 05 measures what the scale does. The paper
# writes the same line as (1 + w) eps_cond - w eps_uncond: diffusers' (and our) guidance_scale is 1 + w,
# so SD's 7.5 is the paper's w = 6.5, and the paper's w = 0 (no guidance) is guidance_scale 1.

# %%
scheduler.set_timesteps(num_inference_steps)
print("timesteps:", scheduler.timesteps.tolist())
predicted_x0 = []  # the scheduler's estimate of the clean latents at each step

for step_index, t in enumerate(scheduler.timesteps):
    # expand the latents for classifier-free guidance, to avoid two forward passes
    latent_model_input = torch.cat([latents] * 2)  # (2B, 4, H/8, W/8)
    latent_model_input = scheduler.scale_model_input(latent_model_input, timestep=t)

    # predict the noise residual
    with torch.no_grad():
        noise_pred = unet(latent_model_input, t, encoder_hidden_states=text_embeddings).sample  # (2B, 4, H/8, W/8)

    # perform guidance
    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)  # each (B, 4, H/8, W/8)
    noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)

    # compute the previous noisy sample x_t -> x_t-1
    output = scheduler.step(noise_pred, t, latents)
    latents = output.prev_sample
    predicted_x0.append(output.pred_original_sample)

    assert latent_model_input.shape == (2 * batch_size, 4, height // 8, width // 8)
    assert noise_pred.shape == latents.shape == (batch_size, 4, height // 8, width // 8)
    if step_index % 8 == 0 or step_index == num_inference_steps - 1:
        difference = (noise_pred_text - noise_pred_uncond).norm() / noise_pred_uncond.norm()
        print(
            f"step {step_index:2d} t={int(t):3d}  |eps_text - eps_uncond| / |eps_uncond| = {difference:.3f}  "
            f"std(latents) = {latents.std():.3f}"
        )

helpers.describe("final latents", latents)
assert torch.isfinite(latents).all()

# %% [markdown]
# ## 9. Decoding: undo the latent scale, run the VAE decoder
#
# The latents the UNet works on are the VAE's latents times 0.18215 (`vae.config.scaling_factor`),
# a constant that gave them roughly unit variance on the training images. Dividing by it gives the
# decoder what it expects; the decoder returns a (B, 3, H, W) picture in [-1, 1].

# %%
print("vae.config.scaling_factor =", vae.config.scaling_factor)
assert vae.config.scaling_factor == 0.18215

final_latents = latents  # kept to compare with the pipeline below
latents = 1 / 0.18215 * latents
with torch.no_grad():
    image = vae.decode(latents).sample
helpers.describe("decoded image", image)
decoded_shape = tuple(image.shape)  # (B, 3, H, W)
assert decoded_shape == (batch_size, 3, height, width)

# %%
from PIL import Image

image = (image / 2 + 0.5).clamp(0, 1)
image = image.detach().cpu().permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
images = (image * 255).round().astype("uint8")
pil_images = [Image.fromarray(image) for image in images]
pil_images[0].save(OUT / "image.png")
print("wrote", OUT / "image.png", pil_images[0].size)

assert pil_images[0].size == (width, height)

# %% [markdown]
# ## 10. `StableDiffusionPipeline` is this loop
#
# The pipeline holds the same five parts; `denoise(...)` is sections 3 to 8 as a generator that
# yields after every step, `__call__` runs it and decodes. Same parts, same seed: the same latents.

# %%
from minidiff import StableDiffusionPipeline

fresh_scheduler = UniPCMultistepScheduler.from_config(scheduler.config)  # a scheduler keeps state: start clean
pipe = StableDiffusionPipeline(vae, text_encoder, tokenizer, unet, fresh_scheduler)
pipe.set_progress_bar_config(disable=True)
for step in pipe.denoise(prompt, height=height, width=width, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, generator=torch.manual_seed(0)):
    pass
print("pipeline vs the hand-written loop: same final latents?", torch.equal(step.latents, final_latents))

assert torch.equal(step.latents, final_latents)  # the same operations in the same order, bit for bit

# %% [markdown]
# `minidiff.viz.trace` records x_t and the predicted x_0 at a few steps, decoded by the VAE.

# %%
from minidiff.viz.trace import record, save_film_strip, save_gif

frame_size = 192 if real_weights else 96  # the tiny weights' 64x64 pictures, enlarged so the captions fit
steps = pipe.denoise(prompt, height=height, width=width, num_inference_steps=num_inference_steps,
                     guidance_scale=guidance_scale, generator=torch.manual_seed(0))
frames = record(steps, to_image=lambda z: pipe.latents_to_image(z).resize((frame_size, frame_size)), count=6)
save_film_strip(frames, OUT / "trace.png")
save_gif(frames, OUT / "trace.gif")
print("wrote", OUT / "trace.png", "and", OUT / "trace.gif", "at steps", [frame.step_index for frame in frames])

assert len(frames) == 6 and frames[-1].step_index == num_inference_steps - 1

# %% [markdown]
# ## 11. What we did, with the shapes we measured

# %%
from PIL import ImageDraw

from minidiff.viz.plotting import font


def draw_data_flow(stages: list[tuple[str, str]], path, box_width: int = 178, box_height: int = 64, gap: int = 34):
    """A row of boxes joined by arrows: each box holds a stage's name and the shape it produced."""
    width = len(stages) * box_width + (len(stages) - 1) * gap + 20
    picture = Image.new("RGB", (width, box_height + 20), "white")
    draw = ImageDraw.Draw(picture)
    for index, (name, shape) in enumerate(stages):
        left = 10 + index * (box_width + gap)
        box = [left, 10, left + box_width, 10 + box_height]
        draw.rounded_rectangle(box, radius=8, outline=(60, 60, 60), fill=(240, 245, 255), width=2)
        center = left + box_width / 2
        draw.text((center, 10 + box_height / 3), name, fill=(20, 20, 20), font=font(14), anchor="mm")
        draw.text((center, 10 + 2 * box_height / 3), shape, fill=(31, 119, 180), font=font(13), anchor="mm")
        if index:
            y = 10 + box_height / 2
            draw.line([(left - gap + 4, y), (left - 6, y)], fill=(60, 60, 60), width=2)
            draw.polygon([(left - 4, y), (left - 12, y - 5), (left - 12, y + 5)], fill=(60, 60, 60))
    picture.save(path)
    return picture


def shape_text(shape) -> str:
    return "(" + ", ".join(str(size) for size in shape) + ")"


stages = [
    ("prompt", f'"{prompt[0][:18]}..."'),
    ("token ids", shape_text(ids.shape)),
    ("[uncond; text] emb.", shape_text(text_embeddings.shape)),
    (f"UNet x {num_inference_steps} steps", shape_text(step.latents.shape)),
    ("/ 0.18215, VAE decode", shape_text(decoded_shape)),
    ("PIL image", f"{pil_images[0].size[0]}x{pil_images[0].size[1]} RGB"),
]
draw_data_flow(stages, OUT / "data_flow.png")
print("wrote", OUT / "data_flow.png")
