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
# # 03 · Swapping schedulers
#
# The model predicts the noise; the *scheduler* decides where on the noise scale to ask it, and how
# to step from one noise level to the next. Swapping it is one line, because every scheduler reads
# the same config and speaks the same API. This follows diffusers' "Schedulers" tutorial: look at
# `scheduler.config`, list `compatibles`, swap with `from_config`, compare the pictures from the
# same seed; then it opens the config to show what each field changes.
#
# **Weights.** `MINIDIFF_SD15=/path/to/stable-diffusion-v1-5` (folder or single file) makes the
# comparison grid of section 4 real pictures; without it the pipeline has tiny random weights (noise
# pictures). Section 5 compares the schedulers on the *exact* denoiser of eight pictures (see
# tutorial 01), where the differences mean something, offline.
#
# **Run it:** `python tutorials/03_swapping_schedulers.py`, or open it as a notebook. Pictures go to
# `tutorials/out/03_swapping_schedulers/` (`MINIDIFF_TUTORIAL_OUT` moves them).

# %%
import numpy as np
import torch

import tutorial_helpers as helpers

torch.set_num_threads(1)  # tiny models: more threads only add overhead on a shared CPU
OUT = helpers.output_folder("03_swapping_schedulers")
model_path, real_weights = helpers.sd15_weights()
print(f"weights: {model_path} ({'from MINIDIFF_SD15' if real_weights else 'tiny random: noise pictures'})")

# %% [markdown]
# ## 1. The pipeline's scheduler and its config
#
# SD 1.5 ships with `PNDMScheduler` (PLMS). Its `scheduler_config.json` holds the training noise
# schedule (1000 steps, "scaled_linear" betas from 0.00085 to 0.012) and a few sampling options.

# %%
from minidiff import StableDiffusionPipeline

pipeline = StableDiffusionPipeline.from_pretrained(model_path)
pipeline.set_progress_bar_config(disable=True)
print(pipeline.scheduler)
config = pipeline.scheduler.config

assert type(pipeline.scheduler).__name__ == "PNDMScheduler"
assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
assert config.num_train_timesteps == 1000

# %% [markdown]
# ## 2. `compatibles`: the schedulers that can read this config

# %%
for scheduler_class in pipeline.scheduler.compatibles:
    print(" ", scheduler_class.__name__)

names = {scheduler_class.__name__ for scheduler_class in pipeline.scheduler.compatibles}
assert names == {
    "PNDMScheduler", "DDIMScheduler", "DDPMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
    "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler",
    "DPMSolverSinglestepScheduler", "DEISMultistepScheduler",
}  # the fourteen the diffusers tutorial prints (diffusers' list also has EDMEulerScheduler, for EDM-trained models)

# %% [markdown]
# Four of them are *second-order single-step* methods: Heun, KDPM2 (DPM2), KDPM2 ancestral and DPM-Solver SDE.
# Each step needs the model's prediction at a second point that exists only after a first, Euler-like half
# step (Heun: at the end of the Euler step; DPM2: at the midpoint in log-sigma). So one step costs two model
# calls, and, as in diffusers, every model call is one `step`: `timesteps` has 2N - 1 entries for N steps, and
# `state_in_first_order` says which half the next `step` is. Compare them with other schedulers at the same
# number of *model calls*, not steps.

# %%
from minidiff import HeunDiscreteScheduler

heun = HeunDiscreteScheduler.from_config(pipeline.scheduler.config)
heun.set_timesteps(5)
print("Heun, 5 steps:", [round(float(t)) for t in heun.timesteps], "- order", heun.order)
assert len(heun.timesteps) == 2 * 5 - 1 and heun.order == 2 and heun.state_in_first_order

# %% [markdown]
# ## 3. `from_config`: one line to swap
#
# `NewScheduler.from_config(old.config)` keeps every field the two share (the noise schedule) and
# takes the new class's *own default* for the fields the config file never set. SD 1.5's file has
# no `timestep_spacing`, so PNDM runs "leading" timesteps (981, 961, ... for 50 steps) and Euler
# its default "linspace" (999, ...): diffusers records such defaulted keys in `_use_default_values` and drops
# them when switching class. Keys the new class does not know are kept, so a round trip
# PNDM -> Euler -> PNDM gives back the same config.

# %%
from minidiff import EulerDiscreteScheduler, PNDMScheduler

euler = EulerDiscreteScheduler.from_config(config)
print("defaulted in SD 1.5's PNDM config:", config["_use_default_values"])
print("PNDM timestep_spacing:", config.timestep_spacing, "  Euler timestep_spacing:", euler.config.timestep_spacing)

assert config.timestep_spacing == "leading" and euler.config.timestep_spacing == "linspace"
assert dict(PNDMScheduler.from_config(euler.config).config) == dict(config)  # the round trip loses nothing

# %% [markdown]
# What each scheduler makes of the same config, for 25 steps. `init_noise_sigma` is the std of the
# starting noise (1 for the variance-preserving schedulers, sigma_max = 14.6 for the sigma ones, see
# tutorial 02); PNDM calls the model 26 times for 25 steps (its second timestep repeats), the second-order
# single-step methods 49 times.

# (The singlestep DPM-Solver has no `timestep_spacing` field, in diffusers either: its timesteps are always
# spread evenly from 999 down, shown as "-".)

# %%
STOCHASTIC = {"DDPMScheduler", "EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler"}
TWO_CALLS_A_STEP = {"HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler"}
schedulers = {cls.__name__: cls.from_config(config) for cls in pipeline.scheduler.compatibles}
print(f"{'scheduler':32s}{'spacing':>10s}{'init sigma':>12s}{'model calls':>13s}  first timesteps        stochastic")
for name, scheduler in schedulers.items():
    scheduler.set_timesteps(25)
    first = ", ".join(f"{float(t):.1f}".removesuffix(".0") for t in scheduler.timesteps[:3])
    print(
        f"{name:32s}{scheduler.config.get('timestep_spacing', '-'):>10s}{float(scheduler.init_noise_sigma):>12.4f}"
        f"{len(scheduler.timesteps):>13d}  {first:22s} {name in STOCHASTIC}"
    )

assert len(schedulers["PNDMScheduler"].timesteps) == 26
assert schedulers["PNDMScheduler"].timesteps[:3].tolist() == [961, 921, 921]
assert all(len(s.timesteps) == 2 * 25 - 1 for name, s in schedulers.items() if name in TWO_CALLS_A_STEP)
assert all(len(s.timesteps) == 25 for name, s in schedulers.items() if name not in TWO_CALLS_A_STEP | {"PNDMScheduler"})

# %% [markdown]
# ## 4. The comparison grid: same prompt, same seed, every scheduler
#
# `pipeline.scheduler = X.from_config(pipeline.scheduler.config)` and run again. With the real
# weights this is diffusers' astronaut grid (fourteen full runs: expect a long wait on a CPU); with the
# tiny random ones it shows the code runs and that each scheduler takes its own path from the same
# noise.

# %%
from minidiff.viz.grid import labeled_grid

prompt = "A photograph of an astronaut riding a horse on Mars, high resolution, high definition."
size = 8 * pipeline.unet.config.sample_size  # 512 with SD 1.5, 64 with the tiny weights
original_config = pipeline.scheduler.config
cell = 256 if real_weights else 128
pictures, labels = [], []
for name in schedulers:
    pipeline.scheduler = type(schedulers[name]).from_config(original_config)
    generator = torch.Generator().manual_seed(8)
    result = pipeline(prompt, height=size, width=size, num_inference_steps=25, generator=generator)
    pictures.append(result.images[0].resize((cell, cell)))
    labels.append(name.removesuffix("Scheduler").removesuffix("Discrete").replace("Multistep", ""))
labeled_grid(pictures, labels, columns=4).save(OUT / "pipeline_grid.png")
print("wrote", OUT / "pipeline_grid.png")
pipeline.scheduler = PNDMScheduler.from_config(original_config)

assert len(pictures) == len(schedulers) == 14 and all(picture.size == (cell, cell) for picture in pictures)

# %% [markdown]
# ## 5. The same comparison on an exact model
#
# The exact denoiser of eight 32x32 pictures (tutorial 01) on SD 1.5's noise schedule, from the
# same four noise draws in every cell. The first row is the exact answer: the probability-flow ODE
# (the path every deterministic scheduler approximates) solved to high precision from t=999. Two
# things to look at: *which* picture each sample becomes, and its *grain* (each picture of the data
# carries noise of std 0.1 per pixel: a perfect sampler reproduces it).

# %%
from minidiff.lab import accuracy
from minidiff.lab.prototypes import PROTOTYPE_NAMES, prototype_means, tensor_to_pil
from minidiff.viz.grid import image_grid, tile

mixture = accuracy.prototype_mixture(size=32, data_std=0.1)  # GaussianMixtureDenoiser on SD 1.5's schedule
means = prototype_means(32)
noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
grid_steps = (5, 10, 25)


def nearest_pictures(samples: torch.Tensor) -> tuple[list[str], float]:
    """The picture each sample is closest to, and the mean RMS distance to it (the sample's grain)."""
    distances = (samples[:, None] - means[None]).pow(2).mean(dim=(2, 3, 4)).sqrt()  # (N, 8)
    return [PROTOTYPE_NAMES[k] for k in distances.argmin(1)], distances.min(1).values.mean().item()


sigma_max = float(mixture.train_sigmas[-1])
x_start = noise.double() * (sigma_max**2 + 1) ** 0.5  # the same noise, as x_0 + sigma_max eps
exact = accuracy.probability_flow_ode(mixture, x_start, sigma_max, 0.0, rtol=1e-6, atol=1e-6)
exact_pictures, exact_grain = nearest_pictures(exact.float())
rows, row_labels = [[tile([tensor_to_pil(x) for x in exact], 4), None, None]], ["exact PF-ODE"]
chosen, grain = {}, {}  # (scheduler, steps) -> pictures chosen, grain
for name, scheduler in schedulers.items():
    row = []
    for num_inference_steps in grid_steps:
        scheduler = type(scheduler).from_config(config)
        generator = torch.Generator().manual_seed(1) if name in STOCHASTIC else None
        _, samples = accuracy.run_scheduler(scheduler, mixture, noise, num_inference_steps, generator=generator)
        row.append(tile([tensor_to_pil(x) for x in samples], 4))
        chosen[name, num_inference_steps], grain[name, num_inference_steps] = nearest_pictures(samples)
    rows.append(row)
    row_labels.append(name.removesuffix("Scheduler"))
image_grid(rows, row_labels, [f"{n} steps" for n in grid_steps], OUT / "exact_model_grid.png",
           title="Same noise, every scheduler (exact denoiser)")
print("wrote", OUT / "exact_model_grid.png")
print(f"exact PF-ODE: {exact_pictures}, grain {exact_grain:.3f}")
for name in schedulers:
    cells = [f"{'=' if chosen[name, n] == exact_pictures else 'x'} {grain[name, n]:.3f}" for n in grid_steps]
    print(f"{name:34s}" + "".join(f"{cell:>10s}" for cell in cells))
print("(= the same pictures as the exact ODE, x not; then the grain, 0.100 in the data)")

# %% [markdown]
# What the table shows:
# - The deterministic schedulers that start at t=999 (LMS, Euler, DPM-Solver++, UniPC) pick the
#   exact ODE's pictures already at 5 steps. PNDM and DDIM use "leading" timesteps: with 5 steps
#   they start at t=801, not from pure noise, and some samples become another picture.
# - The stochastic ones (DDPM, Euler ancestral) add fresh noise at every step: their samples are
#   other, equally valid draws, not the ODE's.
# - Every scheduler leaves *less grain* than the data has, and gets closer to 0.1 with more steps:
#   with few steps the last jump to sigma = 0 lands on the model's *average* guess, which is
#   smoother than any one sample. (In Stable Diffusion this is the lost fine texture of few-step
#   samples.) Tutorial 04 measures these errors against the exact answer.
# - Not so Heun and DPM2, the two-calls-a-step methods: here they leave more grain than the data at 5 steps
#   (0.2-0.3) and come down towards 0.1 with more steps (the cell below prints them).

# %%
assert 0.095 < exact_grain < 0.105
STARTING_AT_999 = (
    "LMSDiscreteScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
)
for name in STARTING_AT_999:
    assert all(chosen[name, n] == exact_pictures for n in grid_steps), name
for name in ("PNDMScheduler", "DDIMScheduler"):
    assert chosen[name, 5] != exact_pictures and chosen[name, 10] == chosen[name, 25] == exact_pictures, name
for name in set(schedulers) - TWO_CALLS_A_STEP:
    assert all(grain[name, n] < 0.1 for n in grid_steps), name
    assert grain[name, 5] < grain[name, 10] < grain[name, 25], name
# Heun and DPM2 (deterministic, two model calls a step) leave *more* grain than the data at few steps, and come
# down towards 0.1 as the steps shrink: measured here, not explained by a general rule.
for name in ("HeunDiscreteScheduler", "KDPM2DiscreteScheduler"):
    assert grain[name, 5] > grain[name, 10] > grain[name, 25] > 0.1, name

# %% [markdown]
# ## 6. What the config fields do
#
# **`timestep_spacing` and `steps_offset`** pick which of the 1000 training timesteps to visit.
# "leading" never reaches t=999 (981 at best with 50 steps): the sampler starts from a slightly
# less noisy level than pure noise, a known cause of washed-out pictures (Lin et al. 2023, arXiv
# 2305.08891); "trailing" and "linspace" start at 999.

# %%
from minidiff import DDIMScheduler

spacings = {}
for spacing in ("leading", "linspace", "trailing"):
    for steps_offset in (0, 1):
        ddim = DDIMScheduler.from_config(config, timestep_spacing=spacing, steps_offset=steps_offset)
        ddim.set_timesteps(10)
        spacings[spacing, steps_offset] = ddim.timesteps.tolist()
        print(f"{spacing:9s} steps_offset={steps_offset}: {spacings[spacing, steps_offset]}")

assert spacings["leading", 1] == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]  # SD 1.5's own setting
assert spacings["leading", 0] == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
assert spacings["linspace", 0] == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
assert spacings["trailing", 0] == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]

# %% [markdown]
# **`use_karras_sigmas`** (Euler, LMS, DPM-Solver, UniPC) replaces the spacing by Karras et al.'s
# ramp (arXiv 2206.00364, eq. 5, rho = 7) between the same sigma_max and sigma_min: smaller steps
# at both ends of the log-sigma scale. With 10 linspace steps Euler jumps from sigma 0.37 straight
# to 0.03; the Karras ramp stops at 0.20 and 0.08 on the way, where the fine detail is decided.
# **`final_sigmas_type`** says where the last step lands: "zero" (the clean picture) or
# "sigma_min" (the last training noise level).
# **`beta_schedule`** sets the noise schedule itself: with "linear" instead of SD's "scaled_linear",
# the same beta_start and beta_end reach a noisier end (sigma_max 25 instead of 14.6), and a model
# trained on one schedule would be told the wrong noise level at every step.

# %%
from minidiff import DPMSolverMultistepScheduler

linspace_euler = EulerDiscreteScheduler.from_config(config)
karras_euler = EulerDiscreteScheduler.from_config(config, use_karras_sigmas=True)
for name, scheduler in (("linspace", linspace_euler), ("karras", karras_euler)):
    scheduler.set_timesteps(10)
    print(f"Euler {name:8s} sigmas: {np.round(scheduler.sigmas.double().numpy(), 3).tolist()}")
for final_sigmas_type in ("zero", "sigma_min"):
    dpm = DPMSolverMultistepScheduler.from_config(config, final_sigmas_type=final_sigmas_type)
    dpm.set_timesteps(10)
    print(f"DPM++ final_sigmas_type={final_sigmas_type:9s}: last sigma {float(dpm.sigmas[-1]):.4f}")
linear = EulerDiscreteScheduler.from_config(config, beta_schedule="linear")
print(f"sigma_max: scaled_linear {float(linspace_euler.sigmas[0]):.2f}, linear {float(linear.sigmas.max()):.2f}")

karras, uniform_in_t = karras_euler.sigmas.double().numpy(), linspace_euler.sigmas.double().numpy()
assert abs(karras[0] - 14.6146) < 1e-3 and abs(karras[-2] - 0.0292) < 1e-3 and karras[-1] == 0  # same ends
between = lambda sigmas: ((0.03 < sigmas) & (sigmas < 0.36)).sum()  # noqa: E731  stops between 0.36 and 0.03
assert between(karras) == 2 and between(uniform_in_t) == 0
largest_log_step = lambda sigmas: np.max(-np.diff(np.log(sigmas[:-1])))  # noqa: E731  (the last step to 0 aside)
assert largest_log_step(karras) < largest_log_step(uniform_in_t)
assert 20 < float(linear.sigmas.max()) < 30

# %% [markdown]
# **`prediction_type`** says what the model's output *means*: the noise eps ("epsilon", SD 1.5),
# the clean picture ("sample"), or the velocity v = alpha eps - sigma x_0 ("v_prediction", SD 2.x).
# The scheduler converts whichever it is into its update, so it must match the model. The exact
# denoiser can answer in any of the three: matched, the samples agree to float32 rounding; a
# v-prediction model read as epsilon gives noise.

# %%
from minidiff.lab.gaussian_mixture import GaussianMixtureDenoiser


def ddim_samples(model_prediction_type: str, scheduler_prediction_type: str) -> torch.Tensor:
    model = GaussianMixtureDenoiser.from_components(
        means, data_std=0.1, prediction_type=model_prediction_type, scheduler_config=config
    )
    scheduler = DDIMScheduler.from_config(config, prediction_type=scheduler_prediction_type)
    _, samples = accuracy.run_scheduler(scheduler, model, noise, 25)
    return samples


epsilon = ddim_samples("epsilon", "epsilon")
for prediction_type in ("sample", "v_prediction"):
    matched = ddim_samples(prediction_type, prediction_type)
    print(f"{prediction_type:13s} matched: largest difference from epsilon {(matched - epsilon).abs().max():.1e}")
    assert torch.allclose(matched, epsilon, atol=1e-5)  # float32 rounding through different formulas (measured ~5e-7)
mismatched = ddim_samples("v_prediction", "epsilon")
_, mismatch_grain = nearest_pictures(mismatched)
print(f"v_prediction model read as epsilon: RMS distance to the nearest picture {mismatch_grain:.2f}")

assert mismatch_grain > 0.3

# %% [markdown]
# ## 7. Where each scheduler asks the model
#
# Two rulers, one row per scheduler, a tick at each model call in 25 steps. The first on the
# timestep axis (t = 1000 on the left, 0 on the right); the second on the noise level
# sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) of those timesteps, on a log scale. There the
# evenly spaced timesteps turn out to crowd the middle noise levels; "leading" (PNDM, DDIM, DDPM)
# never asks at sigma_max; DPM-Solver++ and UniPC make their last call at sigma 0.2 and then jump
# to the clean picture; and the Karras ramp spreads its calls evenly down to sigma_min.

# %%
import math

from PIL import Image, ImageDraw

from minidiff.viz.plotting import PALETTE, font


def draw_ruler(values_by_name: dict, path, position, axis_ticks: dict, title: str, width=860, row_height=28):
    """One row per name: a tick at each value, placed at `position(value)` in [0, 1] along the row."""
    label_width, top = 230, 34
    height = top + row_height * len(values_by_name) + 34
    picture = Image.new("RGB", (label_width + width + 30, height), "white")
    draw = ImageDraw.Draw(picture)
    draw.text(((label_width + width) / 2, 8), title, fill=(20, 20, 20), font=font(15), anchor="mt")
    for row, (name, values) in enumerate(values_by_name.items()):
        y = top + row * row_height + row_height / 2
        draw.text((label_width - 10, y), name, fill=(20, 20, 20), font=font(13), anchor="rm")
        draw.line([(label_width, y), (label_width + width, y)], fill=(225, 225, 225))
        for value in values:
            x = label_width + position(value) * width
            draw.line([(x, y - 9), (x, y + 9)], fill=PALETTE[row % len(PALETTE)], width=2)
    for value, text in axis_ticks.items():
        x = label_width + position(value) * width
        draw.line([(x, height - 30), (x, height - 25)], fill=(90, 90, 90))
        draw.text((x, height - 22), text, fill=(90, 90, 90), font=font(12), anchor="mt")
    picture.save(path)


train_sigmas = ((1 - pipeline.scheduler.alphas_cumprod) / pipeline.scheduler.alphas_cumprod).sqrt().double().numpy()
timesteps_by_name, sigmas_by_name = {}, {}
classes = {name: type(scheduler) for name, scheduler in schedulers.items()}
classes["Euler (Karras sigmas)"] = EulerDiscreteScheduler
for name, cls in classes.items():
    scheduler = cls.from_config(config, use_karras_sigmas=True) if "Karras" in name else cls.from_config(config)
    scheduler.set_timesteps(25)
    label = name.removesuffix("Scheduler")
    timesteps_by_name[label] = scheduler.timesteps.double().numpy()
    sigmas_by_name[label] = np.interp(timesteps_by_name[label], np.arange(1000), train_sigmas)  # also at fractional t

draw_ruler(timesteps_by_name, OUT / "timesteps.png", position=lambda t: (1000 - t) / 1000,
           axis_ticks={t: str(t) for t in range(1000, -1, -100)}, title="Timesteps visited in 25 steps")
log_low, log_high = math.log(0.02), math.log(20.0)
draw_ruler(sigmas_by_name, OUT / "sigmas.png",
           position=lambda sigma: (log_high - math.log(sigma)) / (log_high - log_low),
           axis_ticks={value: f"{value:g}" for value in (20, 10, 5, 2, 1, 0.5, 0.2, 0.1, 0.05, 0.02)},
           title="Noise level sigma_t at each model call, 25 steps (log scale)")
print("wrote", OUT / "timesteps.png", "and", OUT / "sigmas.png")
for name in ("DDIM", "EulerDiscrete", "Euler (Karras sigmas)"):
    sigmas = sigmas_by_name[name]
    below = (sigmas < 0.5).sum()
    print(f"{name:22s} first sigma {sigmas[0]:6.3f}, last {sigmas[-1]:.3f}, model calls below sigma 0.5: {below}")

assert timesteps_by_name["DPMSolverMultistep"][0] == 999 and timesteps_by_name["PNDM"][0] == 961
assert sigmas_by_name["DDIM"][0] < sigmas_by_name["EulerDiscrete"][0]  # "leading" starts below sigma_max
calls_below = {name: (sigmas < 0.5).sum() for name, sigmas in sigmas_by_name.items()}
assert calls_below["Euler (Karras sigmas)"] >= calls_below["EulerDiscrete"] + 3  # 9 vs 5
