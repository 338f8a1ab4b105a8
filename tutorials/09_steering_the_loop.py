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
# # 09 · Steering the loop: loss guidance, textual inversion, attention maps
#
# Three ways the coursework steers Stable Diffusion without retraining it, each taken apart here:
#
# 1. **Loss guidance** (fast.ai's "Stable Diffusion Deep Dive"): at each step, decode the predicted x0,
#    score it with any differentiable loss (the notebook's: "how blue is it?"), and nudge the latents
#    down that loss's gradient.
# 2. **Textual inversion** (Gal et al. 2022, arXiv 2208.01618; diffusers' `textual_inversion.py`): learn
#    one new row of the text encoder's token table, and nothing else.
# 3. **Attention maps**: record the cross-attention probabilities with an attention processor, to see
#    which pixels look at which word.
#
# Section 1 runs on the exact picture mixture of tutorials 04 and 05, where the pictures mean
# something and every effect can be measured; sections 2 and 3 run on tiny random SD weights (real
# weights with `MINIDIFF_SD15` for section 3).
#
# **Run it:** `python tutorials/09_steering_the_loop.py` (about 7 s of CPU time, no weights), or open it as a
# notebook. Pictures go to `tutorials/out/09_steering_the_loop/`.

# %%
import torch

import tutorial_helpers as helpers

torch.set_num_threads(1)  # small tensors: more threads only add overhead on a shared CPU
OUT = helpers.output_folder("09_steering_the_loop")

# %% [markdown]
# ## 1. Loss guidance on the predicted x0
#
# The Deep Dive's loop, with LMSDiscreteScheduler as the notebook uses. At step i, with noise level
# sigma_i, the latents are x = x0 + sigma_i * eps, so the UNet's eps gives a guess of the clean picture,
#
#     x0_hat = x - sigma_i * eps_hat,
#
# a differentiable function of x. Any loss on x0_hat has a gradient with respect to x, and the notebook
# moves x against it, scaled by sigma_i^2, before the scheduler's step:
#
#     x <- x - loss_scale * sigma_i^2 * grad_x loss(x0_hat)
#
# Where sigma_i^2 comes from: classifier guidance (Dhariwal & Nichol 2021, arXiv 2105.05233, sec. 4.2,
# the DDIM form) replaces the model's eps by eps - sqrt(1 - alpha_bar_t) grad_{x_t} log p(y | x_t). In the
# sigma frame x = x_t / sqrt(alpha_bar_t) that is eps - sigma grad_x log p(y | x) (the chain rule gives
# grad_{x_t} = grad_x / sqrt(alpha_bar_t), and sigma = sqrt(1 - alpha_bar_t) / sqrt(alpha_bar_t)). Put a
# loss in place of -log p(y | x) (Bansal et al. 2023, arXiv 2302.07121, call this universal guidance), and
# an Euler step x + (sigma_{i+1} - sigma_i) eps then moves x by an extra
#
#     - (sigma_i - sigma_{i+1}) * sigma_i * grad_x loss:
#
# one factor sigma_i turns a score into an eps, the other, (sigma_i - sigma_{i+1}), is the step. The Deep
# Dive's sigma_i^2 keeps the first factor and puts sigma_i in place of the step: a push larger than
# classifier guidance's by sigma_i / (sigma_i - sigma_{i+1}): measured below, 3 to 9.4 times with LMS's 30
# steps, except on the last two (1.2, and 1 on the step to sigma = 0). It is a heuristic with the right
# scaling in sigma, not the same update: in effect, a loss scale several times larger.
#
# The notebook's loss is `blue_loss`: the mean distance of the blue channel from 0.9. Like the notebook
# we keep eps_hat fixed (computed under no_grad), so the gradient flows through x0_hat only, and
# d x0_hat / d x is the identity. Here, with no VAE between x0_hat and the loss, the gradient is then
# loss_scale * sign(blue - 0.9) / (2 * 32 * 32) on each blue pixel and 0 on red and green: every
# guided step pushes each blue pixel by the same amount, its sign set by which side of 0.9 the pixel's
# prediction is (with SD the decoder's Jacobian makes it vary).
#
# One difference from the notebook, measured at the end of this section: it guides every 5th of 50
# steps (`if i % 5 == 0`); our main runs guide every one of 30 steps (`guide_every=1`).
#
# Here there is no VAE: the "model" is the exact denoiser of a mixture of eight 32x32 pictures (pixels
# in [-1, 1]; tutorial 04), so x0_hat is a picture and we can say which one each sample became.

# %%
from minidiff import LMSDiscreteScheduler
from minidiff.lab import accuracy
from minidiff.lab.prototypes import PROTOTYPE_NAMES, prototype_means, tensor_to_pil
from minidiff.viz.grid import image_grid

picture_model = accuracy.prototype_mixture(32)  # GaussianMixtureDenoiser: 8 pictures, std 0.1 around each
pictures = prototype_means(32)  # (8, 3, 32, 32) in [-1, 1]
blue_of_picture = (pictures[:, 2] / 2 + 0.5).mean(dim=(1, 2))
print("mean blue of each picture:", {name: round(value, 3) for name, value in zip(PROTOTYPE_NAMES, blue_of_picture.tolist())})


def blue_loss(images: torch.Tensor) -> torch.Tensor:
    """The Deep Dive's colour loss, per image: mean |blue - 0.9| over the pixels of images in [0, 1]. (B,)"""
    return torch.abs(images[:, 2] - 0.9).mean(dim=(1, 2))


def loss_guided_sample(
    loss_scale: float, noise: torch.Tensor, num_inference_steps: int = 30, guide_every: int = 1
) -> torch.Tensor:
    """The Deep Dive's loop on the exact model, loss guidance at every `guide_every`-th step (the notebook: 50
    steps, every 5th); returns the samples (B, 3, 32, 32)."""
    scheduler = LMSDiscreteScheduler.from_config(accuracy.SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(num_inference_steps)
    latents = noise * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i]
        with torch.no_grad():
            noise_pred = picture_model(scheduler.scale_model_input(latents, t), t).sample
        if loss_scale > 0 and i % guide_every == 0:
            latents = latents.detach().requires_grad_()
            latents_x0 = latents - sigma * noise_pred  # the predicted clean picture, in [-1, 1]
            loss = blue_loss(latents_x0 / 2 + 0.5).sum() * loss_scale  # a sum: each sample its own loss
            cond_grad = torch.autograd.grad(loss, latents)[0]
            latents = latents.detach() - cond_grad * sigma**2
        latents = scheduler.step(noise_pred, t, latents).prev_sample
    return latents


loss_of_picture = blue_loss(pictures / 2 + 0.5)
print("blue_loss of each picture:", {name: round(value, 3) for name, value in zip(PROTOTYPE_NAMES, loss_of_picture.tolist())})
assert PROTOTYPE_NAMES[loss_of_picture.argmin()] == "mountain"  # its sky is blue = 230/255 = 0.902

# The gradient, with eps detached: the same size on every blue pixel, 0 elsewhere.
probe = pictures[:2].clone().requires_grad_()
gradient = torch.autograd.grad(blue_loss(probe / 2 + 0.5).sum() * 200, probe)[0]
step_size = 200 / (2 * 32 * 32)
print(f"blue_loss gradient, loss_scale 200: {gradient[:, 2].abs().unique().tolist()} on the blue channel "
      f"(200 / (2 * 32 * 32) = {step_size:.4f}), {gradient[:, :2].abs().max().item()} on red and green")
assert torch.equal(gradient[:, :2], torch.zeros_like(gradient[:, :2]))
torch.testing.assert_close(gradient[:, 2].abs(), torch.full_like(gradient[:, 2], step_size))  # no blue pixel is at 0.9 exactly

# How much larger the Deep Dive's sigma_i^2 is than classifier guidance's (sigma_i - sigma_{i+1}) sigma_i, with LMS's levels.
lms_sigmas = LMSDiscreteScheduler.from_config(accuracy.SD15_SCHEDULER_CONFIG)
lms_sigmas.set_timesteps(30)
ratio = lms_sigmas.sigmas[:-1] / (lms_sigmas.sigmas[:-1] - lms_sigmas.sigmas[1:])
print(f"sigma_i / (sigma_i - sigma_(i+1)), 30 steps: {ratio.min():.1f} to {ratio.max():.1f} (last step: {ratio[-1]:.1f})")
assert ratio[:-2].min() > 3 and ratio.max() < 9.5 and ratio[-1] == 1  # to sigma = 0 the two agree

noise = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
loss_scales = (0, 5, 20, 200)
samples = {scale: loss_guided_sample(scale, noise) for scale in loss_scales}


def nearest_picture(images: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """(name of the nearest of the eight pictures, RMS distance to it) for each image."""
    distances = (images[:, None] - pictures[None]).pow(2).mean(dim=(2, 3, 4)).sqrt()  # (B, 8)
    return [PROTOTYPE_NAMES[k] for k in distances.argmin(dim=1)], distances.min(dim=1).values


blue = {scale: (images[:, 2] / 2 + 0.5).mean(dim=(1, 2)) for scale, images in samples.items()}  # (16,) each
nearest = {scale: nearest_picture(images) for scale, images in samples.items()}
for scale in loss_scales:
    names, distance = nearest[scale]
    counts = {name: names.count(name) for name in PROTOTYPE_NAMES if name in names}
    print(f"loss_scale {scale:3}: mean blue {blue[scale].mean():.3f}, blue_loss {blue_loss(samples[scale] / 2 + 0.5).mean():.3f}, "
          f"RMS distance to the nearest picture {distance.mean():.2f}, pictures {counts}")

# %% [markdown]
# What steering does depends on how hard one pushes:
#
# - Gently (5, 20), it *chooses*: while the picture is undecided (large sigma), the push tips each
#   sample towards the picture with the least blue loss (the mountain, whose sky is blue = 230/255 = 0.902), and
#   the sample still ends on that picture, 0.09 from it as unguided samples are (the mixture's own spread).
# - Hard (200), it *overrides*: the push keeps going after the picture is decided, and the samples end
#   ~0.37 from every picture: mostly a square whose yellow background has been washed towards blue.
#   The blue channel is higher than in any of the eight pictures. With SD this is the Deep Dive's
#   blue-washed image: the loss, not the model, had the last word.
#
# Asserted below, on the same 16 noises: the blue channel rises with the loss scale, sample by sample
# for the gentle scales; gentle guidance still lands on a picture, hard guidance does not.

# %%
for smaller, larger in zip(loss_scales, loss_scales[1:]):
    assert blue[larger].mean() > blue[smaller].mean()
for scale in (5, 20):
    assert (blue[scale] >= blue[0] - 1e-3).all()  # no sample gets less blue
assert nearest[0][1].max() < 0.15 and nearest[20][1].max() < 0.15  # pictures, up to the mixture's spread
assert nearest[20][0].count("mountain") >= 12  # the bluest picture by blue_loss wins most samples
assert nearest[200][1].min() > 0.25  # off the pictures: the loss, not the model, decided the end
assert blue[200].mean() > blue_of_picture.max()  # bluer than any picture

rows = [[tensor_to_pil(image) for image in samples[scale][:6]] for scale in loss_scales]
image_grid(rows, [f"loss_scale {scale}" for scale in loss_scales], None, OUT / "loss_guidance.png",
           title="blue_loss guidance, same noise per column", scale=3)
print("wrote", OUT / "loss_guidance.png")

# %% [markdown]
# **The notebook's schedule.** The Deep Dive guides only every 5th of 50 steps (10 guided steps), and
# its last guided step (i = 45) is followed by 4 steps of the model alone. Measured on the same 16 noises
# at loss scale 200, against our every-step run:

# %%
deep_dive = loss_guided_sample(200, noise, num_inference_steps=50, guide_every=5)
deep_dive_names, deep_dive_distance = nearest_picture(deep_dive)
deep_dive_blue = (deep_dive[:, 2] / 2 + 0.5).mean(dim=(1, 2))
print(f"every 5th of 50 steps, loss_scale 200: mean blue {deep_dive_blue.mean():.3f}, RMS distance to the nearest "
      f"picture {deep_dive_distance.mean():.2f}, pictures {dict((n, deep_dive_names.count(n)) for n in set(deep_dive_names))}")
print(f"every one of 30 steps, loss_scale 200: mean blue {blue[200].mean():.3f}, distance {nearest[200][1].mean():.2f}")

# %% [markdown]
# The notebook's schedule pushes far less: the samples end about half as far from a picture as with
# every-step guidance, and less blue. The choice of *which* steps to guide matters as much as the scale;
# the notebook's 200 is tuned for its schedule (and for SD's latents and decoder), not for ours.

# %%
assert deep_dive_distance.mean() < nearest[200][1].mean() / 1.5
assert deep_dive_blue.mean() < blue[200].mean() - 0.1

# %% [markdown]
# With SD the loop is the same with two more lines: x0_hat goes through `vae.decode(x0_hat / 0.18215)`
# before the loss, and the gradient flows back through the decoder. `tests/test_coursework_flows.py`
# runs exactly the notebook's step on tiny SD weights in minidiff and in diffusers and compares the
# losses and gradients.
#
# ## 2. Textual inversion: one new row, and nothing else moves
#
# diffusers' `textual_inversion.py`, step by step, on the tiny random SD weights: add a placeholder token,
# grow the token table by one row (initialised from a related word), freeze everything except the
# token table, train with the diffusion loss, and after every optimizer step put back the rows that
# must not change. Random weights learn nothing useful; what we check is the mechanics.

# %%
from minidiff import DDPMScheduler, StableDiffusionPipeline

sd_folder = helpers.tiny_sd15_folder()
pipe = StableDiffusionPipeline.from_pretrained(sd_folder)
tokenizer, text_encoder, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

placeholder_token, initializer_token = "<blue-square>", "square"
tokenizer.add_tokens([placeholder_token])
placeholder_token_id = tokenizer.convert_tokens_to_ids(placeholder_token)
initializer_token_id = tokenizer.encode(initializer_token, add_special_tokens=False)[0]
text_encoder.resize_token_embeddings(len(tokenizer))  # (49408, D) -> (49409, D)
token_embeds = text_encoder.get_input_embeddings().weight
with torch.no_grad():
    token_embeds[placeholder_token_id] = token_embeds[initializer_token_id]
print(f"{placeholder_token} is token {placeholder_token_id}, starting from {initializer_token!r} ({initializer_token_id});",
      "token table", tuple(token_embeds.shape))

# %% [markdown]
# Freezing, as the script does: the VAE and the UNet entirely, and in the text encoder everything but
# the token table (`requires_grad_(False)` on the encoder layers, the final layer norm and the position
# embeddings). The token table stays trainable as a whole, so two things move rows other than the new one:
#
# - **gradients**: every row the prompt looks up gets one. "a photo of a <blue-square>" looks up
#   `<|startoftext|>`, `a`, `photo`, `of`, the new token and `<|endoftext|>` (which is also the padding
#   token up to 77): six rows, five of them rows of the old vocabulary;
# - **AdamW's weight decay**, which shrinks *every* row it is given, gradient or not.
#
# Hence the script's step after each update: copy the original rows back (`index_no_updates`). It is
# needed even with weight_decay=0, for the five old rows that received a gradient.

# %%
vae.requires_grad_(False)
unet.requires_grad_(False)
text_encoder.text_model.encoder.requires_grad_(False)
text_encoder.text_model.final_layer_norm.requires_grad_(False)
text_encoder.text_model.embeddings.position_embedding.requires_grad_(False)
trainable = [name for name, parameter in text_encoder.named_parameters() if parameter.requires_grad]
print("trainable:", trainable)
assert trainable == ["text_model.embeddings.token_embedding.weight"]

before = {f"{part}.{name}": value.detach().clone() for part, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))
          for name, value in model.state_dict().items()}
orig_embeds_params = text_encoder.get_input_embeddings().weight.detach().clone()
index_no_updates = torch.ones(len(tokenizer), dtype=torch.bool)
index_no_updates[placeholder_token_id] = False

# One picture to learn: the "square" prototype at 64x64 (the tiny VAE's size), encoded as the script does.
pixel_values = prototype_means(64)[1:2]  # (1, 3, 64, 64) in [-1, 1]
input_ids = tokenizer([f"a photo of a {placeholder_token}"], padding="max_length", truncation=True,
                      max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
optimizer = torch.optim.AdamW(text_encoder.get_input_embeddings().parameters(), lr=1e-2, weight_decay=1e-2)
generator = torch.Generator().manual_seed(0)
text_encoder.train()
for step in range(4):
    latents = vae.encode(pixel_values).latent_dist.sample(generator) * vae.config.scaling_factor  # (1, 4, 8, 8)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,), generator=generator)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    encoder_hidden_states = text_encoder(input_ids)[0]  # (1, 77, D)
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
    loss = torch.nn.functional.mse_loss(model_pred, noise)
    loss.backward()
    table = text_encoder.get_input_embeddings().weight
    rows_with_gradient = (table.grad != 0).any(dim=1).nonzero().flatten().tolist()
    if step == 0:  # what the same update would move without weight decay: Adam moves exactly the rows with a gradient
        probe_table = torch.nn.Parameter(table.detach().clone())
        probe_table.grad = table.grad.clone()
        torch.optim.AdamW([probe_table], lr=1e-2, weight_decay=0.0).step()
        rows_moved_without_decay = (probe_table.detach() != table.detach()).any(dim=1).nonzero().flatten().tolist()
    optimizer.step()
    optimizer.zero_grad()
    rows_moved = (table.detach() != orig_embeds_params).any(dim=1).sum().item()
    with torch.no_grad():  # the script's repair: the original rows back
        table[index_no_updates] = orig_embeds_params[index_no_updates]
    print(f"step {step}: loss {loss.item():.4f}; rows with a gradient {rows_with_gradient}; rows AdamW changed "
          f"{rows_moved} of {len(table)}, after the repair {(table.detach() != orig_embeds_params).any(dim=1).sum().item()}")

prompt_rows = sorted(set(input_ids[0].tolist()))
print("rows the prompt looks up:", prompt_rows, tokenizer.convert_ids_to_tokens(prompt_rows))
print("rows an AdamW step with weight_decay=0 would move:", rows_moved_without_decay)
assert rows_with_gradient == prompt_rows and len(prompt_rows) == 6 and placeholder_token_id in prompt_rows
assert rows_moved_without_decay == prompt_rows  # five old rows move without weight decay: the repair is needed
assert rows_moved == len(table)  # with weight decay, every row

# %% [markdown]
# Every row moved under AdamW (weight decay), one row after the repair. Now the whole check: every
# parameter of the UNet, the VAE and the text encoder except the token table is bit-for-bit what it
# was, the table's old rows too, and the new row moved away from "square".

# %%
text_encoder.eval()
after = {f"{part}.{name}": value for part, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))
         for name, value in model.state_dict().items()}
token_table_key = "text_encoder.text_model.embeddings.token_embedding.weight"
unchanged = [key for key in before if key != token_table_key and torch.equal(before[key], after[key])]
print(f"{len(unchanged)} of {len(before) - 1} other tensors unchanged")
assert len(unchanged) == len(before) - 1
learned = after[token_table_key]
assert torch.equal(learned[index_no_updates], orig_embeds_params[index_no_updates])
assert not torch.equal(learned[placeholder_token_id], orig_embeds_params[placeholder_token_id])
print("the new row moved by", (learned[placeholder_token_id] - orig_embeds_params[placeholder_token_id]).norm().item())

# %% [markdown]
# What the script saves is that one row, `{token: tensor}` in learned_embeds.safetensors, and
# `pipe.load_textual_inversion(file)` puts it into another pipeline (diffusers' API; it also reads
# AUTOMATIC1111's .pt files). A fresh pipeline with the loaded concept encodes the prompt exactly as the
# trained text encoder does.

# %%
from safetensors.torch import save_file

save_file({placeholder_token: learned[placeholder_token_id][None].clone()}, str(OUT / "learned_embeds.safetensors"))
fresh = StableDiffusionPipeline.from_pretrained(sd_folder)
print("loaded tokens:", fresh.load_textual_inversion(OUT / "learned_embeds.safetensors"))
with torch.no_grad():
    loaded_embeds, _ = fresh.encode_prompt(f"a photo of a {placeholder_token}", do_classifier_free_guidance=False)
    trained_embeds = text_encoder(input_ids)[0]
assert torch.equal(loaded_embeds, trained_embeds)

# %% [markdown]
# ## 3. Attention maps, recorded by an attention processor
#
# Each cross-attention layer of the UNet (`attn2` in every transformer block) lets each pixel of its
# feature map look at the 77 token embeddings of the prompt: a softmax over the tokens, one
# distribution per pixel and per head (Vaswani et al. 2017, arXiv 1706.03762, eq. 1). Where a word's
# column is large, that word shaped those pixels: prompt-to-prompt (Hertz et al. 2022, arXiv
# 2208.01626) edits these maps, DAAM (Tang et al. 2022, arXiv 2210.04885) sums them into heat maps.
#
# The layer does its attention through a *processor* (diffusers' design): a callable we can replace,
# per layer or everywhere, with `unet.set_attn_processor`. Ours does the default work and, on the side,
# keeps the probabilities of the conditional half of the batch, averaged over heads, summed per resolution.
#
# **On the tiny random weights the maps are noise**: nothing was learned, so no word attends to any
# particular place. With `MINIDIFF_SD15` pointing to real SD 1.5 weights the same code draws the
# familiar maps: "horse" lights up the horse. (Minutes on a CPU at 512x512.)

# %%
from PIL import Image

from minidiff.models.attention_processor import AttnProcessor


class StoreCrossAttention(AttnProcessor):
    """The default processor, which also adds up each cross-attention layer's probabilities for the last
    (the conditional) prompt of the batch, averaged over heads: `sums[H*W]` is (H*W, 77)."""

    def __init__(self):
        self.sums, self.calls = {}, {}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attn.is_cross_attention and encoder_hidden_states is not None:
            query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B*heads, H*W, dim_head)
            key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))  # (B*heads, 77, dim_head)
            probabilities = attn.get_attention_scores(query, key)  # (B*heads, H*W, 77), rows sum to 1
            pixels = probabilities.shape[1]
            conditional = probabilities.reshape(-1, attn.heads, pixels, probabilities.shape[2])[-1].mean(dim=0)
            self.sums[pixels] = self.sums.get(pixels, 0) + conditional.detach()
            self.calls[pixels] = self.calls.get(pixels, 0) + 1
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


model_path, real_weights = helpers.sd15_weights()
print(f"weights: {model_path} ({'from MINIDIFF_SD15' if real_weights else 'tiny random: the maps will be noise'})")
attention_pipe = StableDiffusionPipeline.from_pretrained(model_path)
attention_pipe.set_progress_bar_config(disable=True)
cross_attention_layers = [key for key in attention_pipe.unet.attn_processors if key.endswith("attn2.processor")]
print(len(attention_pipe.unet.attn_processors), "attention layers, of which cross-attention:", len(cross_attention_layers))

# %% [markdown]
# First, the processor changes nothing in the computation: one UNet call with it and one with the
# default give the same noise prediction, bit for bit (the recorded probabilities are a side product).

# %%
unet = attention_pipe.unet
side = unet.config.sample_size  # the latents' side: 64 for SD 1.5, 8 for the tiny weights
probe_latents = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(1)).to(unet.dtype)
probe_embeds = torch.cat(attention_pipe.encode_prompt("a horse on a beach", do_classifier_free_guidance=True)[::-1])
with torch.no_grad():
    unet.set_attn_processor(AttnProcessor())
    default_prediction = unet(probe_latents, 500, probe_embeds).sample
    recorder = StoreCrossAttention()
    unet.set_attn_processor(recorder)
    recorded_prediction = unet(probe_latents, 500, probe_embeds).sample
assert torch.equal(default_prediction, recorded_prediction)
assert sum(recorder.calls.values()) == len(cross_attention_layers)  # one call per cross-attention layer
print("cross-attention calls per resolution:", {f"{round(p ** 0.5)}x{round(p ** 0.5)}": n for p, n in recorder.calls.items()})

# %% [markdown]
# The pipeline stacks the batch as [unconditional, conditional] (`torch.cat([negative, positive])`), so
# index [-1] is the conditional half. Check that the recorder keeps that half: run the conditional
# latents and prompt alone (a batch of one) and the unconditional ones alone; the recorded maps must
# equal the first and differ from the second.

# %%
def recorded_maps(latents: torch.Tensor, embeds: torch.Tensor) -> dict:
    probe = StoreCrossAttention()
    unet.set_attn_processor(probe)
    with torch.no_grad():
        unet(latents, 500, embeds)
    unet.set_attn_processor(AttnProcessor())
    return probe.sums


conditional_alone = recorded_maps(probe_latents[1:], probe_embeds[1:])
unconditional_alone = recorded_maps(probe_latents[:1], probe_embeds[:1])
for pixels, total in recorder.sums.items():
    torch.testing.assert_close(total, conditional_alone[pixels], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(total, unconditional_alone[pixels], rtol=1e-4, atol=1e-6)
print("the recorded maps are the conditional half's")

# %% [markdown]
# Now a whole generation, recording every step. We show the finest resolution up to 16x16 (SD's
# 16x16 maps are the ones prompt-to-prompt shows), averaged over layers and steps, one map per word of
# the prompt, each scaled to its own maximum. (Token 0 is `<|startoftext|>`, which takes most of the
# attention in trained models: a "no-op" place to put it.)

# %%
prompt = "a horse on a beach"
recorder = StoreCrossAttention()
unet.set_attn_processor(recorder)
size = 512 if real_weights else 64
image = attention_pipe(prompt, height=size, width=size, num_inference_steps=20 if real_weights else 10,
                       generator=torch.Generator().manual_seed(0)).images[0]
unet.set_attn_processor(AttnProcessor())
pixels = max(p for p in recorder.sums if p <= 256)
average = recorder.sums[pixels] / recorder.calls[pixels]  # (H*W, 77)
map_side = round(pixels**0.5)
words = attention_pipe.tokenizer.tokenize(prompt)  # the prompt's tokens, at positions 1..len(words)
print(f"{map_side}x{map_side} maps, averaged over {recorder.calls[pixels]} layer calls; words: {words}")


def heat_map(column: torch.Tensor, cell: int = 128) -> Image.Image:
    """One token's attention (H*W,) as a grey picture, scaled to its own maximum and enlarged."""
    values = column.reshape(map_side, map_side).float()
    values = (values / values.max() * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(values, mode="L").convert("RGB").resize((cell, cell), Image.Resampling.BILINEAR)


cells = [image.resize((128, 128))] + [heat_map(average[:, position]) for position in range(1, len(words) + 1)]
image_grid([cells], None, ["image"] + [word.replace("</w>", "") for word in words], OUT / "attention_maps.png",
           title=f"cross-attention, {map_side}x{map_side}, {'SD 1.5' if real_weights else 'tiny random weights'}", scale=1)
print("wrote", OUT / "attention_maps.png")
share = average[:, 1 : len(words) + 1].sum(dim=1).mean().item()
start_share = average[:, 0].mean().item()
print(f"attention on the words of the prompt: {share:.1%}, on <|startoftext|>: {start_share:.1%} "
      f"(the rest: <|endoftext|> and padding); an even spread would give the words {len(words) / 77:.1%}")

# %% [markdown]
# With the tiny random weights nothing stands out: each token gets about an even share of the attention,
# 1/77 = 1.3%, so the five words together about 5/77 = 6.5% and `<|startoftext|>` about 1.3%. With real
# SD 1.5 weights `<|startoftext|>` takes more attention than all the words together.

# %%
if real_weights:
    assert start_share > share
else:
    assert abs(share - len(words) / 77) < 0.02 and abs(start_share - 1 / 77) < 0.01
