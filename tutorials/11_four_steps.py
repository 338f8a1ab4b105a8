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
# # 11 · Four steps
#
# LCM-LoRA and LCM Dreamshaper make an SD 1.5 image in **4 steps** instead of 20-50, with one UNet call
# per step (no classifier-free guidance batch). Their sampler, `LCMScheduler`, is almost trivial:
#
#     denoised = f(x_t, t)                                                    one model call: a whole sample
#     x_next   = sqrt(alpha_bar_next) denoised + sqrt(1 - alpha_bar_next) z   forget x_t, re-noise (Luo et al. 2023, Alg. 3)
#
# The work is in the model: f must be a **consistency function** (Song et al. 2023, arXiv 2303.01469),
# which maps every point x_t of a probability-flow ODE trajectory to that trajectory's start x_0. An ordinary
# diffusion model predicts something else: E[x_0 | x_t], the *average* of all x_0 that could have led to x_t.
#
# This tutorial makes the difference measurable on the exact denoiser of a 2-D Gaussian mixture (as in
# tutorials 04 and 07):
#
# 1. LCM's step written by hand equals `LCMScheduler.step`, bit for bit; c_skip and c_out.
# 2. With the exact *denoiser* as the model, LCM fails: its samples are posterior means, and each re-noise
#    compounds the blur. DDIM and DPM++ 2M, which integrate the ODE, do better with the same model.
# 3. With the exact *consistency function* as the model (the exact ODE solution from x_t, which the lab
#    already integrates), LCM's sampler gives exact samples in **one** step.
# 4. TCD's gamma: how much of x_t each step keeps.
# 5. The pipeline: LCM on SD's loop, and cheap previews with the tiny autoencoder (TAESD).
#
# **Run it:** `python tutorials/11_four_steps.py` (about 15 s, no weights). Pictures go to
# `tutorials/out/11_four_steps/`.

# %%
import torch

import tutorial_helpers as helpers

torch.set_num_threads(1)  # 2-D points: more threads only add overhead on a shared CPU
OUT = helpers.output_folder("11_four_steps")

# %% [markdown]
# ## 1. LCM's step by hand
#
# The model predicts eps. LCM turns it into x_0 as DDIM does, then applies the consistency model's
# *boundary condition* (Song et al. 2023, eq. 7 and Appendix C; LCM eq. 5, with t scaled by 10):
#
#     x0_pred  = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
#     denoised = c_skip(t) x_t + c_out(t) x0_pred,   c_skip = 0.25 / ((10 t)^2 + 0.25),   c_out = 10 t / sqrt((10 t)^2 + 0.25)
#
# c_skip(0) = 1 and c_out(0) = 0, so f(x, 0) = x exactly: the parameterization guarantees the boundary
# condition a consistency model needs, whatever the network does. For every timestep LCM samples (t >= 19)
# c_skip is below 1e-5: in practice `denoised` is the x_0 prediction.

# %%
from minidiff import schedulers
from minidiff.lab import accuracy
from minidiff.lab.accuracy import distribution_stats, probability_flow_ode

model = accuracy.mixture_2d(torch.float64)  # exact eps-prediction of a 4-component 2-D mixture
config = accuracy.SD15_SCHEDULER_CONFIG
means = model.means.reshape(len(model.means), 2)

lcm = schedulers.LCMScheduler.from_config(config)
for t in (0, 19, 259, 999):
    c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(t)
    print(f"t={t:4d}   c_skip={c_skip:.3e}   c_out={c_out:.8f}")
assert lcm.get_scalings_for_boundary_condition_discrete(0) == (1.0, 0.0)
assert lcm.get_scalings_for_boundary_condition_discrete(19)[0] < 1e-5

lcm.set_timesteps(4)
print("LCM's 4 timesteps:", lcm.timesteps.tolist(), "(N of the 50 distillation timesteps 19, 39, ..., 999)")
assert lcm.timesteps.tolist() == [999, 759, 499, 259]

alphas_cumprod = lcm.alphas_cumprod  # float32, as the scheduler keeps it
x = torch.randn(8, 2, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
generator_class, generator_hand = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
for i, t in enumerate(lcm.timesteps):
    eps = model(x, t).sample
    alpha_bar_t = alphas_cumprod[t]
    x0_pred = (x - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t**0.5
    c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(int(t))
    denoised = c_out * x0_pred + c_skip * x
    if i < 3:  # re-noise to the next timestep; the last step returns denoised
        alpha_bar_next = alphas_cumprod[lcm.timesteps[i + 1]]
        z = torch.randn(x.shape, generator=generator_hand, dtype=x.dtype)
        x_next = alpha_bar_next**0.5 * denoised + (1 - alpha_bar_next) ** 0.5 * z
    else:
        x_next = denoised
    output = lcm.step(eps, t, x, generator=generator_class)
    assert torch.equal(output.denoised, denoised) and torch.equal(output.prev_sample, x_next), i
    x = x_next
print("LCM by hand == LCMScheduler.step at every step")

# %% [markdown]
# ## 2. LCM with the exact denoiser: 1, 2, 4, 8 steps against DDIM and DPM++ 2M
#
# The exact denoiser returns E[x_0 | x_t]. At t = 999, x_t is almost pure noise, so E[x_0 | x_t] is
# almost the mixture's mean: a one-step LCM with it puts every sample on the same blur. With more steps each
# `denoised` is a posterior mean, *narrower* than the data; re-noising it gives an x_t narrower than the true
# marginal, whose posterior mean is narrower still. DDIM and DPM++ 2M instead keep x_t and move it along the
# ODE, so their error shrinks with the steps.
#
# We sample 4000 points each and measure the distribution as tutorial 04 does (`distribution_stats`):
# each component's frequency, mean and variance against the truth, as z-scores (a correct sampler gives
# |z| of a few); and the within-component variance (the truth: 1).

# %%
NUM_SAMPLES = 4000


def sample(scheduler, num_steps: int, model_fn=None, **step_kwargs) -> torch.Tensor:
    """The denoising loop of every tutorial, on NUM_SAMPLES 2-D points; returns (N, 2, 1, 1) samples."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_SAMPLES, 2, 1, 1, generator=generator, dtype=torch.float64) * scheduler.init_noise_sigma
    scheduler.set_timesteps(num_steps)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        output = model_fn(model_input, t) if model_fn else model(model_input, t).sample
        x = scheduler.step(output, t, x, generator=generator, **step_kwargs).prev_sample
    return x


def measure(samples: torch.Tensor) -> tuple[float, float]:
    """(largest |z| over the components' frequency, mean and variance; mean within-component variance)."""
    stats = distribution_stats(model, samples, 0.0)
    worst = max(max(abs(c.frequency_z), abs(c.mean_z), abs(c.variance_z)) for c in stats)
    return worst, sum(c.variance for c in stats) / len(stats)


table = {}
runs = {}
for name, cls in [("LCM", schedulers.LCMScheduler), ("DDIM", schedulers.DDIMScheduler),
                  ("DPM++ 2M", schedulers.DPMSolverMultistepScheduler)]:
    for steps in (1, 2, 4, 8):
        runs[name, steps] = sample(cls.from_config(config), steps)
        table[name, steps] = measure(runs[name, steps])
print(f"{'':10s}" + "".join(f"{steps:>8d} steps     " for steps in (1, 2, 4, 8)))
for name in ("LCM", "DDIM", "DPM++ 2M"):
    print(f"{name:10s}" + "".join(f"  |z| {table[name, s][0]:6.1f} v {table[name, s][1]:.2f}" for s in (1, 2, 4, 8)))

lcm_one_step = runs["LCM", 1].reshape(-1, 2)
spread = (lcm_one_step - lcm_one_step.mean(0)).norm(dim=1).mean().item()
data = model.sample_data(NUM_SAMPLES, generator=torch.Generator().manual_seed(1))[0].reshape(-1, 2).double()
data_spread = (data - data.mean(0)).norm(dim=1).mean().item()
print(f"one LCM step: samples {spread:.2f} from their centre on average; the data {data_spread:.2f}")
assert spread < 0.15 * data_spread  # one step of E[x0 | x_T]: every sample near the same point
assert table["LCM", 8][0] > table["DDIM", 8][0] > table["DPM++ 2M", 8][0]  # at 8 steps LCM is the worst
assert table["LCM", 8][1] < table["LCM", 4][1] < 1.0  # and more LCM steps make it *narrower*: compounding blur
assert abs(table["DPM++ 2M", 8][1] - 1.0) < abs(table["LCM", 8][1] - 1.0)

# %% [markdown]
# ## 3. The consistency function itself: exact samples in one step
#
# What a consistency model learns is f(x_t, t) = the end, at t = 0, of the ODE trajectory through x_t. For
# the mixture we can compute it: `probability_flow_ode` integrates dx/dsigma = -sigma grad log p_sigma(x) to
# sigma = 0 (in the VE frame x = x_t / alpha_t, sigma = sigma_t / alpha_t). Used as the model (it predicts x_0,
# so `prediction_type="sample"`), LCM's sampler is exact at **1** step: the ODE carries N(0, I) onto the data.
# At 4 steps too: each re-noise of an exact sample gives an exact x_t, and the ODE brings it back.

# %%
def consistency_function(x_t: torch.Tensor, t) -> torch.Tensor:
    """f(x_t, t): the exact probability-flow ODE solution from (x_t, t) to t = 0 (an x_0 prediction)."""
    alpha_bar = alphas_cumprod[int(t)].double()
    alpha, sigma = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    return probability_flow_ode(model, x_t / alpha, float(sigma / alpha), 0.0, rtol=1e-6, atol=1e-6)


for steps in (1, 4):
    runs["consistency", steps] = sample(schedulers.LCMScheduler.from_config(config, prediction_type="sample"), steps,
                                        model_fn=consistency_function)
    table["consistency", steps] = measure(runs["consistency", steps])
    print(f"LCM with the exact consistency function, {steps} step(s): |z| {table['consistency', steps][0]:.1f}, "
          f"variance {table['consistency', steps][1]:.2f}")
    assert table["consistency", steps][0] < 4  # a correct sampler: every z-score within sampling noise
assert table["consistency", 1][0] < table["DPM++ 2M", 8][0]  # 1 call beats 8 DPM++ steps with the denoiser

helpers.draw_scatter_panels(
    {"data": data, "LCM + denoiser, 4 steps": runs["LCM", 4].reshape(-1, 2),
     "DPM++ 2M + denoiser, 4 steps": runs["DPM++ 2M", 4].reshape(-1, 2),
     "LCM + consistency fn, 1 step": runs["consistency", 1].reshape(-1, 2)},
    OUT / "samples.png", marks=means,
)

# %% [markdown]
# ## 4. TCD's gamma: keep part of x_t
#
# TCD (Zheng et al. 2024, arXiv 2402.19159) moves deterministically along the ODE from t to s = (1 - gamma) t_prev
# (a DDIM jump), then adds fresh noise from s up to t_prev. gamma = 0 is DDIM (no fresh noise), gamma = 1 is
# LCM's "predict x_0, re-noise". With the exact denoiser, the more each step forgets (larger gamma), the
# larger the error: re-noising throws away what x_t knew. (With a TCD-distilled model, a little gamma
# adds detail; diffusers' TCD default is eta = gamma = 0.3.)

# %%
tcd_errors = []
for gamma in (0.0, 0.3, 0.7, 1.0):
    tcd_errors.append(measure(sample(schedulers.TCDScheduler.from_config(config), 4, eta=gamma))[0])
    print(f"TCD, 4 steps, gamma = {gamma}: |z| {tcd_errors[-1]:.1f}")
assert tcd_errors == sorted(tcd_errors)  # error grows with gamma
first = sample(schedulers.TCDScheduler.from_config(config), 4, eta=0.0)
assert torch.equal(first, sample(schedulers.TCDScheduler.from_config(config), 4, eta=0.0))  # gamma 0: deterministic

# %% [markdown]
# ## 5. On SD's loop: four steps, one UNet call each, and TAESD previews
#
# LCM-LoRA is a LoRA on SD 1.5's UNet: load it, swap in `LCMScheduler`, and ask for 4 steps with
# guidance_scale = 1 (then `StableDiffusionPipeline` skips the unconditional batch: CFG runs only when
# guidance_scale > 1 and the UNet has no guidance embedding). `AutoencoderTiny` (TAESD) decodes each step's
# x_0 prediction for a preview; its `scaling_factor` is 1.0, because it decodes SD's scaled latents as they are.
#
# Without weights this runs on tiny random ones (noise, but every shape is real). With `MINIDIFF_SD15` set,
# and `MINIDIFF_LCM_LORA` pointing at `lcm-lora-sdv1-5`'s `pytorch_lora_weights.safetensors` and
# `MINIDIFF_TAESD` at a `madebyollin/taesd` folder (`minidiff download lcm-lora` / `taesd`), it makes a real image.

# %%
import os

from PIL import Image

from minidiff import AutoencoderTiny, LCMScheduler, StableDiffusionPipeline

weights, real = helpers.sd15_weights()
pipe = StableDiffusionPipeline.from_pretrained(weights) if weights.is_dir() else StableDiffusionPipeline.from_single_file(weights)
pipe.set_progress_bar_config(disable=True)
pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
lora = os.environ.get("MINIDIFF_LCM_LORA")
if lora and hasattr(pipe, "load_lora_weights"):
    pipe.load_lora_weights(lora)
    if hasattr(pipe, "fuse_lora"):
        pipe.fuse_lora()  # the LoRA folded into the UNet's weights: each step costs what a base step costs
elif lora:
    print("MINIDIFF_LCM_LORA is set, but this minidiff has no load_lora_weights yet: running without the LoRA")
taesd_folder = os.environ.get("MINIDIFF_TAESD")
taesd = AutoencoderTiny.from_pretrained(taesd_folder) if taesd_folder else AutoencoderTiny()  # random weights without it
assert taesd.config.scaling_factor == 1.0

unet_batches = []
pipe.unet.register_forward_hook(lambda module, args, output: unet_batches.append(args[0].shape[0]))
size = 512 if real else 64
steps = list(pipe.denoise("a photograph of an astronaut riding a horse", height=size, width=size, num_inference_steps=4,
                          guidance_scale=1.0, generator=torch.Generator().manual_seed(0), preview_vae=taesd))
print("UNet batch per step:", unet_batches, " previews:", [step.preview.size for step in steps])
assert unet_batches == [1, 1, 1, 1]  # four calls, no CFG batch
assert [int(step.t) for step in steps] == [999, 759, 499, 259]
assert all(step.preview.size == (size, size) for step in steps)
previews = [helpers.enlarge(step.preview, 128) for step in steps]
strip = Image.new("RGB", (128 * len(previews), 128), "white")
for i, preview in enumerate(previews):
    strip.paste(preview.convert("RGB"), (128 * i, 0))
strip.save(OUT / "previews.png")
pipe.latents_to_image(steps[-1].pred_original_sample).save(OUT / "image.png")
print("wrote", OUT / "samples.png", OUT / "previews.png", OUT / "image.png")
