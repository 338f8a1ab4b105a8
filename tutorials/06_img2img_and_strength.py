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
# # 06 · Image-to-image: `add_noise`, `strength` and `set_begin_index`
#
# Image-to-image (SDEdit, Meng et al. 2021, arXiv 2108.01073) does not start from pure noise: it
# noises the input picture part of the way with `scheduler.add_noise` and runs only the rest of the
# loop. `strength` says how far: 0 keeps the picture, 1 starts (almost) from scratch. In between is
# a trade: the more noise, the more the model's idea of a good picture wins over the input.
#
# The model is again the exact denoiser of eight 32x32 pictures (tutorial 01), so "what the model
# thinks a good picture is" is known exactly. The last section runs `StableDiffusionImg2ImgPipeline`
# on tiny random SD weights, or on the real ones with `MINIDIFF_SD15=/path/to/stable-diffusion-v1-5`.
#
# **Run it:** `python tutorials/06_img2img_and_strength.py`, or open it as a notebook. Pictures go
# to `tutorials/out/06_img2img_and_strength/` (`MINIDIFF_TUTORIAL_OUT` moves them).

# %%
import torch

import tutorial_helpers as helpers

torch.set_num_threads(1)  # small tensors: more threads only add overhead on a shared CPU
OUT = helpers.output_folder("06_img2img_and_strength")

# %% [markdown]
# ## 1. The model and the input
#
# The input is the data set's house with its red roof painted blue: close to a picture the model
# knows, but not one of them.

# %%
import numpy as np
from PIL import Image, ImageDraw

from minidiff.lab import accuracy
from minidiff.lab.prototypes import PROTOTYPE_NAMES, draw_prototype, pil_to_tensor, prototype_means, tensor_to_pil
from minidiff.viz.grid import image_grid, tile

model = accuracy.prototype_mixture(size=32, data_std=0.1)  # exact denoiser, SD 1.5's noise schedule
pictures = prototype_means(32)  # (8, 3, 32, 32)
HOUSE = PROTOTYPE_NAMES.index("house")


def blue_roofed_house(size: int = 32) -> Image.Image:
    """The data set's house, drawn at size x size, with its roof painted blue."""
    house, k = draw_prototype("house", size), size / 32
    ImageDraw.Draw(house).polygon([(7 * k, 15 * k), (16 * k, 7 * k), (25 * k, 15 * k)], fill=(40, 60, 200))
    return house


sketch = blue_roofed_house(32)
roof_mask = Image.new("L", (32, 32), 0)
ImageDraw.Draw(roof_mask).polygon([(9, 14), (16, 9), (23, 14)], fill=255)  # well inside both roofs
roof = torch.from_numpy(np.asarray(roof_mask) > 127)  # (32, 32) bool
x0 = pil_to_tensor(sketch)[None]  # (1, 3, 32, 32) in [-1, 1]


def roof_color(image: torch.Tensor) -> str:
    """'blue' or 'red': which of the two channels is brighter on average inside the roof."""
    red, blue = image[0, 0][roof].mean(), image[0, 2][roof].mean()
    return "blue" if blue > red else "red"


house = pictures[HOUSE : HOUSE + 1]  # (1, 3, 32, 32)
print(f"input: {tuple(x0.shape)}, roof {roof_color(x0)} ({int(roof.sum())} roof pixels); "
      f"the house in the data set has a {roof_color(house)} roof")
side_by_side = [helpers.enlarge(sketch, 96), helpers.enlarge(tensor_to_pil(house[0]), 96)]
tile(side_by_side, columns=2).save(OUT / "input_and_house.png")

assert roof_color(x0) == "blue" and roof_color(house) == "red" and roof.sum() > 20

# %% [markdown]
# ## 2. `add_noise`: jump straight to timestep t
#
# Training noises pictures in one jump, and img2img does the same. For the variance-preserving
# schedulers (DDPM, DDIM, PNDM, DPM-Solver, UniPC) it is DDPM's eq. 4,
#
#     x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,
#
# and for the sigma schedulers (Euler, Euler ancestral, LMS), whose samples are x = x_0 + sigma eps,
#
#     x_t = x_0 + sigma_t eps.

# %%
from minidiff import DDIMScheduler, EulerDiscreteScheduler

config = accuracy.SD15_SCHEDULER_CONFIG
ddim = DDIMScheduler.from_config(config)
eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
noised = {}
for t in (1, 200, 400, 600, 800, 999):
    timestep = torch.tensor([t])
    noised[t] = ddim.add_noise(x0, eps, timestep)
    alpha_bar = ddim.alphas_cumprod[t]
    print(f"t={t:3d}: sqrt(alpha_bar) = {alpha_bar.sqrt():.3f}, sqrt(1 - alpha_bar) = {(1 - alpha_bar).sqrt():.3f}")
    assert torch.allclose(noised[t], alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps)

euler = EulerDiscreteScheduler.from_config(config)
euler.set_timesteps(50)
t = euler.timesteps[10:11]
assert torch.allclose(euler.add_noise(x0, eps, t), x0 + euler.sigmas[10] * eps)

noised_pictures = [helpers.enlarge(tensor_to_pil(x[0]), 96) for x in noised.values()]
tile(noised_pictures, columns=len(noised_pictures)).save(OUT / "add_noise.png")
print("wrote", OUT / "add_noise.png", "(t = 1, 200, 400, 600, 800, 999)")

# %% [markdown]
# ## 3. How `strength` picks the starting timestep
#
# `StableDiffusionImg2ImgPipeline.get_timesteps`, like diffusers', runs the last
# `int(num_inference_steps * strength)` steps of the schedule:
#
#     init_timestep = min(int(N * strength), N)
#     t_start       = N - init_timestep
#     timesteps     = scheduler.timesteps[t_start * scheduler.order:]
#
# and the input is noised to the first of them. With SD 1.5's "leading" timesteps even strength 1.0
# starts at t = 981, not 999: a little of the input (sqrt(alpha_bar_981) = 7.6%) survives.

# %%
N = 50
ddim.set_timesteps(N)
strengths = (0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
plans = {}
for strength in strengths:
    init_timestep = min(int(N * strength), N)
    t_start = max(N - init_timestep, 0)
    timesteps = ddim.timesteps[t_start * ddim.order :]
    plans[strength] = (t_start, timesteps)
    alpha_bar = ddim.alphas_cumprod[timesteps[0]]
    print(f"strength {strength:4}: skip {t_start:2d} steps, run {len(timesteps):2d}, start at t={int(timesteps[0]):3d} "
          f"(input kept at {alpha_bar.sqrt():.1%} strength under noise of std {(1 - alpha_bar).sqrt():.2f})")

assert [len(plans[s][1]) for s in strengths] == [1, 5, 15, 25, 35, 45, 50]
assert int(plans[0.5][1][0]) == 481 and int(plans[1.0][1][0]) == 981
kept = {strength: ddim.alphas_cumprod[plans[strength][1][0]].sqrt().item() for strength in (0.9, 1.0)}
assert abs(kept[1.0] - 0.076) < 0.0005 and abs(kept[0.9] - 0.131) < 0.0005  # 7.6% at t = 981, 13.1% at t = 881

# %% [markdown]
# ## 4. img2img by hand
#
# The pipeline's lines with the exact model: set the timesteps, cut them with `strength`, tell the
# scheduler where it starts (`set_begin_index`, next section), noise the input to the first
# timestep, run the rest of the loop.

# %%
def img2img(image: torch.Tensor, strength: float, num_inference_steps: int = 50, seed: int = 0):
    """SDEdit with DDIM on the exact model: returns (the noised start, the result)."""
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(num_inference_steps)
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init_timestep, 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    scheduler.set_begin_index(t_start * scheduler.order)
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed))
    latents = scheduler.add_noise(image, noise, timesteps[:1])
    start = latents
    for t in timesteps:
        noise_pred = model(scheduler.scale_model_input(latents, t), t).sample
        latents = scheduler.step(noise_pred, t, latents).prev_sample
    return start, latents


rows, distance_to_input, nearest, roofs = [[], []], {}, {}, {}
for strength in strengths:
    start, result = img2img(x0, strength)
    rows[0].append(tensor_to_pil(start[0]))
    rows[1].append(tensor_to_pil(result[0]))
    distance_to_input[strength] = (result - x0).pow(2).mean().sqrt().item()
    nearest[strength] = PROTOTYPE_NAMES[(result - pictures).pow(2).mean(dim=(1, 2, 3)).argmin()]
    roofs[strength] = roof_color(result)
    print(f"strength {strength:4}: RMS distance to the input {distance_to_input[strength]:.3f}, "
          f"nearest picture {nearest[strength]:8s}, roof {roofs[strength]}")
image_grid(rows, ["noised input", "result"], [f"strength {s}" for s in strengths], OUT / "strength.png",
           title="img2img of a blue-roofed house, exact model of 8 pictures (DDIM, 50 steps)", scale=3)
print("wrote", OUT / "strength.png")

# %% [markdown]
# - At strength 0.02 (one step from t = 1) the result is the input with a little noise taken off:
#   the roof stays blue. The model knows only red-roofed houses, but at that noise level the input
#   is still far more plausible than any change.
# - From 0.1 to 0.9 the roof turns red: the result is the data set's house. The noise was enough to
#   make "a house like the input" ambiguous, and the model resolved it to the house it knows.
# - At 0.9, 13.1% of the input under the noise is still enough to choose the house; at 1.0 (7.6%, and
#   from this noise) the result is another picture altogether.
#
# That is SDEdit's trade-off between faithfulness (low strength) and realism (high strength), and
# why the useful strengths in SD lie in between.

# %%
assert roofs[0.02] == "blue" and distance_to_input[0.02] < 0.1
assert all(nearest[s] == "house" and roofs[s] == "red" for s in (0.1, 0.3, 0.5, 0.7, 0.9))
assert nearest[1.0] != "house"
assert all(distance_to_input[a] < distance_to_input[b] for a, b in zip(strengths, strengths[1:]))  # monotonic

# %% [markdown]
# ## 5. Why `set_begin_index`
#
# Most schedulers keep a step counter (`step_index`). On the first `step` they find it by looking up
# the timestep in `scheduler.timesteps`. When a timestep appears twice, which happens with Karras
# sigmas rounded to integer timesteps, the lookup cannot tell the two apart: diffusers (and minidiff)
# take the *second* match (diffusers issue #5687). For an img2img run that starts at the *first*
# one, the counter is then one step ahead of the loop: every step uses the next step's noise levels
# and the last one falls off the end of the schedule. `set_begin_index(t_start)` says where the run
# starts, and no lookup happens.

# %%
from minidiff import DPMSolverMultistepScheduler


def step_indices(begin_index: int | None, t_start: int) -> tuple[list[int], str]:
    """The schedule entry each step of a run over timesteps[t_start:] used, and the error that ended it (if any)."""
    scheduler = DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)
    scheduler.set_timesteps(50)
    if begin_index is not None:
        scheduler.set_begin_index(begin_index)
    latents, indices = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), []
    for t in scheduler.timesteps[t_start:]:
        try:
            output = scheduler.step(model(latents, t).sample, t, latents)  # the first call sets step_index
        except ValueError as error:
            return indices, str(error)
        indices.append(scheduler.step_index - 1)  # step_index has moved on to the next entry
        latents = output.prev_sample
    return indices, ""


karras = DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)
karras.set_timesteps(50)
print("DPM++ with Karras sigmas, 50 steps, last timesteps:", karras.timesteps[-6:].tolist())
t_start = 50 - int(50 * 0.06)  # strength 0.06: the last 3 steps, from index 47
print(f"strength 0.06 runs timesteps[{t_start}:] = {karras.timesteps[t_start:].tolist()}")
(with_begin_index, _), (without, error) = step_indices(t_start, t_start), step_indices(None, t_start)
print("with set_begin_index(47): the steps use schedule entries", with_begin_index)
print("found by lookup:          the steps use schedule entries", without, "and then:")
print("  ValueError:", error)

assert karras.timesteps[47] == karras.timesteps[48] == 1
assert with_begin_index == [47, 48, 49]
assert without == [48, 49] and "called after the last" in error  # one step too far along: the run falls off the end

# %% [markdown]
# ## 6. The pipeline
#
# `StableDiffusionImg2ImgPipeline` does sections 3 to 5 in the VAE's latent space: it encodes the
# picture (times 0.18215), noises it with `add_noise`, and runs the text-to-image loop from there.
# Its `get_timesteps` is the same cut as ours. With tiny random weights the picture becomes noise;
# with real ones (`MINIDIFF_SD15`) the blue roof meets the prompt.

# %%
from minidiff import StableDiffusionImg2ImgPipeline
from minidiff.viz.trace import record, save_film_strip, save_gif

model_path, real_weights = helpers.sd15_weights()
pipe = StableDiffusionImg2ImgPipeline.from_pretrained(model_path)
pipe.set_progress_bar_config(disable=True)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
for strength in strengths:
    pipe.scheduler.set_timesteps(N)
    timesteps, num_steps = pipe.get_timesteps(N, strength)
    assert torch.equal(timesteps, plans[strength][1]) and num_steps == len(plans[strength][1])

size = 8 * pipe.unet.config.sample_size  # 512 with SD 1.5, 64 with the tiny weights
steps = pipe.denoise("a small house with a red roof, blue sky", image=blue_roofed_house(size), strength=0.6,
                     num_inference_steps=25, generator=torch.Generator().manual_seed(0))
frame_size = 192 if real_weights else 96
frames = record(steps, to_image=lambda z: pipe.latents_to_image(z).resize((frame_size, frame_size)), count=5)
save_film_strip(frames, OUT / "trace.png")
save_gif(frames, OUT / "trace.gif")
print(f"img2img at strength 0.6 ran {frames[-1].step_index + 1} of 25 steps; wrote trace.png and trace.gif")

assert frames[-1].step_index + 1 == int(25 * 0.6) and int(frames[0].timestep) == int(pipe.scheduler.timesteps[10])
