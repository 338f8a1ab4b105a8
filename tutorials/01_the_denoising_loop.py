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
# # 01 · The denoising loop, line by line
#
# Every diffusion pipeline is the same five lines: set the timesteps, draw noise, ask the model for
# the noise in the sample, let the scheduler take one step back, repeat. This is the loop of
# diffusers' tutorial "Understanding pipelines, models and schedulers" (section "Deconstruct a basic
# pipeline"), run here with minidiff and looked at step by step.
#
# **The model.** The diffusers tutorial uses `google/ddpm-cat-256`, a trained UNet. Here the model is
# the *exact* denoiser of a small data set: eight 32x32 pictures (a circle, a square, ..., a boat),
# each blurred into a Gaussian with standard deviation 0.1 per pixel. For such a mixture of
# Gaussians the best possible noise prediction E[eps | x_t] has a closed form
# (`minidiff/lab/gaussian_mixture.py`), so the "model" is perfect, needs no weights, runs in
# microseconds, and its pictures mean something. It is called exactly like a UNet: `model(x, t).sample`.
#
# **Run it:** `python tutorials/01_the_denoising_loop.py` (or open it as a notebook in Jupyter or VS
# Code: it is a jupytext "percent" file). Pictures go to `tutorials/out/01_the_denoising_loop/`
# (`MINIDIFF_TUTORIAL_OUT` changes the folder). Set `MINIDIFF_DDPM=/path/to/ddpm-cat-256` to run
# the same loop on the trained cat UNet at the end. Every claim below is an `assert`: running the
# file checks it.

# %%
import torch

import tutorial_helpers as helpers

torch.set_num_threads(1)  # the tensors are small: more threads only add overhead on a shared CPU
OUT = helpers.output_folder("01_the_denoising_loop")

# %% [markdown]
# ## 1. The scheduler and the model
#
# The scheduler is `google/ddpm-cat-256`'s: DDPM (Ho et al. 2020, arXiv 2006.11239) with a linear
# beta schedule from 1e-4 to 0.02 over 1000 training steps. The model must use the same noise
# schedule as the scheduler (it has to know how noisy x_t is at each t), so it is built from the
# scheduler's config.

# %%
from minidiff import DDPMScheduler
from minidiff.lab.gaussian_mixture import GaussianMixtureDenoiser
from minidiff.lab.prototypes import PROTOTYPE_NAMES, prototype_images, prototype_means, tensor_to_pil
from minidiff.viz.grid import image_grid, tile

ddpm_cat_256_scheduler_config = {  # google/ddpm-cat-256/scheduler_config.json
    "_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
    "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_small",
}
scheduler = DDPMScheduler.from_config(ddpm_cat_256_scheduler_config)

means = prototype_means(size=32)  # the eight pictures mu_k: (8, 3, 32, 32) in [-1, 1]
model = GaussianMixtureDenoiser.from_components(means, data_std=0.1, scheduler_config=scheduler.config)
helpers.describe("means", means)
print("the data set:", ", ".join(PROTOTYPE_NAMES))
tile([helpers.enlarge(image, 64) for image in prototype_images(32)], columns=8).save(OUT / "data_set.png")

assert means.shape == (8, 3, 32, 32) and -1 <= means.min() and means.max() <= 1

# %% [markdown]
# ## 2. `set_timesteps`: which of the 1000 training timesteps to visit
#
# 50 evenly spaced timesteps, from the noisiest to the cleanest. DDPM's default spacing is
# "leading": `arange(50) * (1000 // 50)`, reversed.

# %%
scheduler.set_timesteps(50)
print(scheduler.timesteps)

assert scheduler.timesteps.tolist() == list(range(980, -1, -20))  # the tensor diffusers' tutorial prints

# %% [markdown]
# ## 3. The noise: x_T ~ N(0, I), shaped like one picture
#
# A generator makes the run reproducible (the diffusers tutorial uses the global random state).

# %%
generator = torch.Generator().manual_seed(0)
sample_size = model.config.sample_size
noise = torch.randn((1, 3, sample_size, sample_size), generator=generator)
helpers.describe("noise", noise)

assert noise.shape == (1, 3, 32, 32)

# %% [markdown]
# ## 4. The loop
#
# At each timestep t the model predicts the noise eps in x_t (the "noisy residual"), and
# `scheduler.step` uses it to go one timestep back. DDPM's step (`minidiff/schedulers/ddpm.py`):
#
#     x0_pred = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)                    (eq. 15)
#     x_prev  = mean of q(x_prev | x_t, x0_pred) + sigma_t z,   z ~ N(0, I)             (eqs. 6-7)
#
# `step` returns both: `prev_sample` is x_prev, `pred_original_sample` is x0_pred, the scheduler's
# estimate of the clean picture. We keep both at a few steps to look at them.
#
# Because the model is exact, we can also ask it *which* picture it thinks x_t is heading to: the
# responsibilities r_k(x_t) = p(picture k | x_t). We print the most likely one.

# %%
snapshots = {0: None, 10: None, 20: None, 30: None, 40: None, 49: None}  # step index -> (x_{t-1}, predicted x0)
most_likely_picture = []  # (name, probability) at every step

input = noise
for step_index, t in enumerate(scheduler.timesteps):
    with torch.no_grad():
        noisy_residual = model(input, t).sample
    output = scheduler.step(noisy_residual, t, input, generator=generator)
    previous_noisy_sample = output.prev_sample

    assert noisy_residual.shape == input.shape == previous_noisy_sample.shape  # (1, 3, 32, 32) all along
    a, b = model.vp_coefficients(t, batch_size=1)  # sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)
    responsibilities = model.posterior(input, a, b).responsibilities[0]  # p(picture k | x_t), (8,)
    most_likely_picture.append((PROTOTYPE_NAMES[responsibilities.argmax()], responsibilities.max().item()))
    if step_index in snapshots:
        snapshots[step_index] = (previous_noisy_sample, output.pred_original_sample)
    if step_index % 10 == 0 or step_index == 49:
        name, probability = most_likely_picture[-1]
        print(
            f"step {step_index:2d}  t={int(t):3d}  std(x_t)={input.std().item():.3f}  "
            f"std(noisy_residual)={noisy_residual.std().item():.3f}  most likely picture: {name} ({probability:.2f})"
        )
    input = previous_noisy_sample

# %% [markdown]
# At t=980 the noise hides almost everything: the model cannot tell the eight pictures apart and
# predicts their average. Its mind is made up long before the end, and the last steps only remove
# the remaining grain.

# %%
first_name, first_probability = most_likely_picture[0]
last_name, last_probability = most_likely_picture[-1]
print(f"first step: {first_name} with p={first_probability:.3f}; last step: {last_name} with p={last_probability:.6f}")
decided_at = next(i for i, (name, p) in enumerate(most_likely_picture) if p > 0.99 and name == last_name)
print(f"p > 0.99 for the final picture from step {decided_at} (t={int(scheduler.timesteps[decided_at])}) on")

assert first_probability < 0.5  # at t=980 no picture is likely
assert last_probability > 0.999  # at the end one picture is certain
assert decided_at < 45

# %% [markdown]
# The result is one of the eight pictures plus a little grain, and far from every other picture.
# The grain is finer than the data's own (each picture is blurred with std 0.1 per pixel): with 50
# of the 1000 training steps, DDPM removes a little too much noise. Section 7 measures it with all
# 1000 steps. That gap is the scheduler's error, not the model's: tutorial 04 is about it.

# %%
distances = (input - means).pow(2).mean(dim=(1, 2, 3)).sqrt()  # RMS distance to each picture, (8,)
for name, distance in zip(PROTOTYPE_NAMES, distances):
    print(f"  RMS distance to {name:8s} {distance.item():.3f}")
nearest = int(distances.argmin())

assert PROTOTYPE_NAMES[nearest] == last_name
assert 0.03 < distances[nearest] < 0.1  # some grain, but less than the data's 0.1
assert all(distances[k] > 0.3 for k in range(8) if k != nearest)

# %% [markdown]
# ## 5. From the tensor to a picture
#
# The sample lives in [-1, 1] (with a little overshoot); a picture's pixels in 0..255.

# %%
import numpy as np
from PIL import Image

image = (input / 2 + 0.5).clamp(0, 1)
image = image.cpu().permute(0, 2, 3, 1).numpy()[0]  # (32, 32, 3)
image = Image.fromarray((image * 255).round().astype("uint8"))
helpers.enlarge(image, 128).save(OUT / "final.png")
print(f"final picture: {image.size} {image.mode}, saved to {OUT / 'final.png'}")

assert image.size == (32, 32) and image.mode == "RGB"

# %% [markdown]
# ## 6. The picture at several steps
#
# Top: x_{t-1}, what the loop carries out of the step at t. Bottom: the predicted x_0 at that
# step. The prediction is a blur of all eight pictures at first, then sharpens into one, long
# before x_t looks clean.

# %%
columns = [f"t={int(scheduler.timesteps[i])}" for i in snapshots]
rows = [
    [tensor_to_pil(x[0]) for x, _ in snapshots.values()],
    [tensor_to_pil(x0[0]) for _, x0 in snapshots.values()],
]
row_labels = ["x_{t-1} after the step", "predicted x0"]
grid_path = image_grid(rows, row_labels, columns, OUT / "steps.png", title="DDPM, 50 steps: the step at t", scale=3)
print("wrote", grid_path)

# %% [markdown]
# ## 7. The pipeline runs the same loop
#
# `DDPMPipeline(unet, scheduler)` is this loop behind `__call__`. Its `denoise(...)` is the loop as a
# generator: it yields a `DenoisingStep` (step index, t, x_{t-1}, noise prediction, predicted x_0)
# after every step. Same model, same seed, same random draws in the same order: the same picture,
# bit for bit.

# %%
from minidiff import DDPMPipeline
from minidiff.viz.trace import record, save_film_strip, save_gif

pipeline = DDPMPipeline(unet=model, scheduler=scheduler)
pipeline.set_progress_bar_config(disable=True)
steps = pipeline.denoise(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=50)
last_step = None
for last_step in steps:
    pass

assert torch.equal(last_step.latents, input)  # the hand-written loop and the pipeline agree exactly

# %% [markdown]
# With the pipeline it is one line to run all 1000 steps (1000 model calls: about a second here) and
# to see the grain come back towards the data's 0.1 per pixel. (The predicted x_0 is clipped to
# [-1, 1] at each step, `clip_sample=True`, which trims a little of the spread on the darkest and
# brightest pixels.)

# %%
grain = {}
for num_inference_steps in (50, 1000):
    generator = torch.Generator().manual_seed(0)
    steps = pipeline.denoise(batch_size=1, generator=generator, num_inference_steps=num_inference_steps)
    for last_step in steps:
        pass
    grain[num_inference_steps] = (last_step.latents - means).pow(2).mean(dim=(1, 2, 3)).sqrt().min().item()
    print(f"{num_inference_steps:4d} steps: RMS distance to the nearest picture {grain[num_inference_steps]:.3f}")

assert grain[50] < grain[1000] < 0.1 and grain[1000] > 0.085

# %% [markdown]
# `minidiff.viz.trace` records such a run: x_t and the predicted x_0 at evenly spaced steps, as a film
# strip (PNG) and an animation (GIF).

# %%
steps = pipeline.denoise(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=50)
frames = record(steps, to_image=lambda x: helpers.enlarge(tensor_to_pil(x[0]), 96), count=8)
strip_path = save_film_strip(frames, OUT / "trace.png")
gif_path = save_gif(frames, OUT / "trace.gif")
print(f"wrote {strip_path} and {gif_path}: steps {[frame.step_index for frame in frames]}")

assert [frame.step_index for frame in frames] == [0, 7, 14, 21, 28, 35, 42, 49]

# %% [markdown]
# ## 8. The same loop on a trained UNet (when you have it)
#
# With `MINIDIFF_DDPM` pointing at a `google/ddpm-cat-256` folder (`minidiff download ddpm-cat`),
# the exact same lines run on the trained cat model. (256x256 pixels: a minute or two on a CPU.)

# %%
ddpm_folder = helpers.weights_from_environment("MINIDIFF_DDPM")
if ddpm_folder is None:
    print("MINIDIFF_DDPM is not set: skipping the trained UNet")
else:
    trained = DDPMPipeline.from_pretrained(ddpm_folder)
    unet, cat_scheduler = trained.unet, trained.scheduler
    cat_scheduler.set_timesteps(25)
    size = unet.config.sample_size
    input = torch.randn((1, 3, size, size), generator=torch.Generator().manual_seed(0))
    for t in cat_scheduler.timesteps:
        with torch.no_grad():
            noisy_residual = unet(input, t).sample
        input = cat_scheduler.step(noisy_residual, t, input).prev_sample
    cat = tensor_to_pil(input[0])
    cat.save(OUT / "trained_unet.png")
    print("wrote", OUT / "trained_unet.png")
    assert cat.size == (size, size) and torch.isfinite(input).all()
