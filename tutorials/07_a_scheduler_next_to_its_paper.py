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
# # 07 · A scheduler next to its paper
#
# A scheduler class has a lot of code: configs, timestep spacings, a step index, warm-up, output
# dataclasses. The algorithm itself is a few lines. Here we write three samplers as short loops,
# straight from their papers' equations, and check that `scheduler.step` gives the **same numbers**
# at every step:
#
# - DDIM (Song et al. 2020, arXiv 2010.02502, eq. 12),
# - Euler in sigma (Karras et al. 2022, arXiv 2206.00364, Algorithm 2, on the ODE of their eq. 1),
# - DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Algorithm 2).
#
# Having rebuilt them, you can trust the classes: they do what the papers say, plus bookkeeping.
# Then we draw what each one does: the exact paths from noise to data, with each sampler's steps on top.
# The model is the exact denoiser of a 2-D Gaussian mixture (as in tutorial 04), so it is fast and
# every number is meaningful. minidiff's classes call the same arithmetic from two small files:
# `minidiff/schedulers/parameterization.py` (model output -> x_0 or eps) and
# `minidiff/schedulers/update_rules.py` (one function per update rule). Open them next to this.
#
# **Run it:** `python tutorials/07_a_scheduler_next_to_its_paper.py` (about 6 s of CPU time, no weights), or
# open it as a notebook. Pictures go to `tutorials/out/07_a_scheduler_next_to_its_paper/`.

# %%
import math

import numpy as np
import torch

import tutorial_helpers as helpers

torch.set_num_threads(1)  # 2-D points: more threads only add overhead on a shared CPU
OUT = helpers.output_folder("07_a_scheduler_next_to_its_paper")

# %% [markdown]
# ## 1. The model and the noise schedule
#
# SD 1.5's training schedule: alpha_bar_t = prod_{s <= t} (1 - beta_s), t = 0..999. Two ways to
# write a noisy sample (see `parameterization.py` for the names used everywhere in minidiff):
#
#     VP (DDPM, DDIM, DPM-Solver):  x_t = alpha_t x_0 + sigma_t eps,   alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t)
#     VE (Euler, Karras et al.):    x   = x_0 + sigma eps,             sigma = sigma_t / alpha_t,    x = x_t / alpha_t
#
# **A warning on names.** The DDIM paper writes x_t = sqrt(alpha_t) x_0 + sqrt(1 - alpha_t) eps: its
# alpha_t is DDPM's (and diffusers' and minidiff's) alpha_bar_t = `alphas_cumprod[t]`, the cumulative
# product, not DDPM's per-step alpha_t = 1 - beta_t. Reading eq. 12 with DDPM's alpha_t gives wrong
# numbers. The alpha_t = sqrt(alpha_bar_t) of the VP line above is a third meaning, DPM-Solver's (section 4).
#
# The model predicts eps from x_t. We work in float32, as SD does, so that "the same numbers" can
# mean bit for bit.

# %%
from minidiff import schedulers
from minidiff.lab import accuracy

model = accuracy.mixture_2d(torch.float32)  # exact eps-prediction for a 4-component mixture, (B, 2, 1, 1)
config = accuracy.SD15_SCHEDULER_CONFIG  # SD 1.5's scheduler_config.json
noise = torch.randn(256, 2, 1, 1, generator=torch.Generator().manual_seed(0))
alphas_cumprod = schedulers.DDIMScheduler.from_config(config).alphas_cumprod  # (1000,) float32
print("alpha_bar_0 =", alphas_cumprod[0].item(), " alpha_bar_999 =", alphas_cumprod[-1].item())

assert abs(alphas_cumprod[-1].item() - 0.0046601) < 1e-6


def eps_model(x: torch.Tensor, t) -> torch.Tensor:
    """The exact eps_theta(x_t, t) of the mixture."""
    return model(x, t).sample


# %% [markdown]
# ## 2. DDIM, eq. 12 with eta = 0
#
# With timesteps t, each step predicts x_0 from eps and moves to the previous timestep with the
# same eps:
#
#     x0_pred = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)              "predicted x_0"
#     x_prev  = sqrt(alpha_bar_prev) x0_pred + sqrt(1 - alpha_bar_prev) eps         "direction pointing to x_t"
#
# SD's config uses "leading" timesteps, t = 901, 801, ..., 1 for 10 steps (stride 100, offset 1),
# and, since set_alpha_to_one is false, alpha_bar_prev = alpha_bar_0 after the last step.

# %%
ddim = schedulers.DDIMScheduler.from_config(config)
ddim.set_timesteps(10)
stride = 1000 // 10
timesteps = [t + 1 for t in range(900, -1, -stride)]  # leading spacing, steps_offset 1
assert ddim.timesteps.tolist() == timesteps

x = noise.clone()
for t in timesteps:
    eps = eps_model(x, t)
    alpha_bar_t = alphas_cumprod[t]
    alpha_bar_prev = alphas_cumprod[t - stride] if t - stride >= 0 else alphas_cumprod[0]
    x0_pred = (x - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t**0.5
    x_prev = alpha_bar_prev**0.5 * x0_pred + (1 - alpha_bar_prev) ** 0.5 * eps

    output = ddim.step(eps, t, x)  # the class, on the same x and eps
    assert torch.equal(output.prev_sample, x_prev) and torch.equal(output.pred_original_sample, x0_pred), t
    x = x_prev
print("DDIM: 10 steps, every one equal to DDIMScheduler.step, bit for bit")

# %% [markdown]
# ## 3. Euler in sigma, Karras et al. Algorithm 2 without churn
#
# In the VE frame with sigma(t) = t, the probability-flow ODE of Karras et al. (eq. 1,
# dx = -sigma_dot(t) sigma(t) grad_x log p(x; sigma(t)) dt; Song et al. 2021, arXiv 2011.13456, eq. 13, in
# their variables) becomes, with the score (D(x; sigma) - x) / sigma^2 of their eq. 3,
# dx/dsigma = (x - D(x; sigma)) / sigma, where the denoiser is D(x; sigma) = x - sigma eps. The model
# wants x_t = x / sqrt(sigma^2 + 1) as input.
# Euler's method from sigma_i to sigma_{i+1}:
#
#     d_i     = (x_i - D(x_i; sigma_i)) / sigma_i
#     x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_i
#
# Euler's default ("linspace") visits the fractional timesteps linspace(0, 999, N) reversed, with
# sigma interpolated linearly between training timesteps, and ends at sigma = 0. We build that
# schedule from alpha_bar, and check it against the class's first.

# %%
euler = schedulers.EulerDiscreteScheduler.from_config(config)
euler.set_timesteps(10)
train_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # (1000,) sigma at each training timestep
timesteps = np.linspace(0, 999, 10)[::-1].astype(np.float32)
sigmas = np.interp(timesteps, np.arange(1000), train_sigmas.numpy())
sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))  # (11,): ten levels, then 0
assert torch.equal(euler.timesteps, torch.from_numpy(timesteps)) and torch.equal(euler.sigmas, sigmas)

x = noise * sigmas[0]  # x_T = sigma_max eps
for i, t in enumerate(euler.timesteps):
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    eps = eps_model(x / (sigma**2 + 1) ** 0.5, t)  # the model sees x_t = x / sqrt(sigma^2 + 1)
    denoised = x - sigma * eps  # D(x; sigma)
    d = (x - denoised) / sigma  # dx/dsigma, the ODE's slope
    x_next = x + d * (sigma_next - sigma)  # Euler step

    euler.scale_model_input(x, t)  # the class's own bookkeeping (it warns if this is skipped)
    assert torch.equal(euler.step(eps, t, x).prev_sample, x_next), i
    x = x_next
print("Euler: 10 steps, every one equal to EulerDiscreteScheduler.step, bit for bit")

# %% [markdown]
# ## 4. DPM-Solver++(2M), Algorithm 2 of arXiv 2211.01095
#
# DPM-Solver++ changes variable to the half log-SNR lambda = log(alpha_t / sigma_t) and integrates the
# linear part of the ODE exactly; only the model's x_0 prediction is approximated, by a line through
# the last two predictions. From the current level s to the next level t, with h = lambda_t - lambda_s
# and r = (the previous h) / h:
#
#     x0_s = (x_s - sigma_s eps) / alpha_s
#     D    = x0_s + (x0_s - x0_previous) / (2 r)                       (D = x0_s on the first step)
#     x_t  = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) D
#
# minidiff's DPMSolverMultistepScheduler keeps its sigmas in the VE form and turns each into
# (alpha_t, sigma_t, lambda_t). The last step goes to sigma = 0 (lambda = inf), where only the
# first-order step is possible: it lands on x0_s.

# %%
dpm = schedulers.DPMSolverMultistepScheduler.from_config(config)
dpm.set_timesteps(10)


def vp(sigma):
    """alpha_t, sigma_t, lambda_t of a VE noise level sigma."""
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    return alpha_t, sigma * alpha_t, torch.log(alpha_t) - torch.log(sigma * alpha_t)


x, x0_previous, h_previous = noise.clone(), None, None
for i, t in enumerate(dpm.timesteps):
    (alpha_s, sigma_s, lambda_s), (alpha_t, sigma_t, lambda_t) = vp(dpm.sigmas[i]), vp(dpm.sigmas[i + 1])
    eps = eps_model(x, t)
    x0 = (x - sigma_s * eps) / alpha_s
    h = lambda_t - lambda_s
    first_order = x0_previous is None or i == len(dpm.timesteps) - 1  # warm-up, and the step to sigma = 0
    D = x0 if first_order else x0 + (x0 - x0_previous) / (2 * (h_previous / h))
    x_next = (sigma_t / sigma_s) * x - alpha_t * (torch.exp(-h) - 1.0) * D

    output = dpm.step(eps, t, x)
    torch.testing.assert_close(output.prev_sample, x_next, rtol=1e-5, atol=1e-5)
    x, x0_previous, h_previous = x_next, x0, h
print("DPM-Solver++(2M): 10 steps, every one equal to DPMSolverMultistepScheduler.step (to float32 round-off)")

# %% [markdown]
# The class writes the second-order step as two terms, (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) x0_s
# - 0.5 alpha_t (e^-h - 1) D1 with D1 = (x0_s - x0_previous) / r: the same number up to float32
# rounding (diffusers' order of operations, which minidiff keeps for bit-exact parity). The pure
# functions of `update_rules.py` take exactly the quantities of our loop, and give the class's bits:

# %%
from minidiff.schedulers import update_rules

x, x0_previous = noise.clone(), None
lambdas = [vp(sigma)[2] for sigma in dpm.sigmas]
dpm.set_timesteps(10)  # a fresh run of the class
for i, t in enumerate(dpm.timesteps):
    (alpha_s, sigma_s, _), (alpha_t, sigma_t, _) = vp(dpm.sigmas[i]), vp(dpm.sigmas[i + 1])
    eps = eps_model(x, t)
    x0 = (x - sigma_s * eps) / alpha_s
    if x0_previous is None or i == len(dpm.timesteps) - 1:
        x_next = update_rules.dpm_solver_pp_first_order(x, x0, alpha_t, sigma_t, sigma_s, lambdas[i + 1], lambdas[i])
    else:
        x_next = update_rules.dpm_solver_pp_second_order(
            x, x0, x0_previous, alpha_t, sigma_t, sigma_s, lambdas[i + 1], lambdas[i], lambdas[i - 1]
        )
    assert torch.equal(dpm.step(eps, t, x).prev_sample, x_next), i
    x, x0_previous = x_next, x0
print("update_rules.dpm_solver_pp_*_order: equal to the class, bit for bit")

# %% [markdown]
# ## 5. What the steps do: the exact paths, with each sampler's points on top
#
# A cloud of final samples hides what a sampler does: ten steps of DDIM, Euler and DPM-Solver++(2M)
# all land near the mixture's means, and three clouds of 256 points look alike. So draw the paths
# instead. From 8 starting noises, `minidiff.lab.trajectories` solves the exact probability-flow ODE
# (the lab's float64 solver, through every noise level the sampler visits) and runs the sampler,
# keeping its sample after every step. Both are drawn in the VP frame x_t = x / sqrt(sigma^2 + 1),
# which stays bounded from the N(0, I) noise to the data. The exact path from the sampler's own start
# is the wide gray curve, its end the ring; the sampler's steps are the dots. Heun (Karras et al.
# Algorithm 1: Euler, then a correction with the slope at the step's end) joins the three, with 5 and
# 20 steps. DDIM starts later than the others (SD's "leading" timesteps: t = 801 at 5 steps), so its
# exact paths are shorter.
#
# The fifth column is `FlowMatchEulerDiscreteScheduler`, Euler on the flow ODE of flow matching
# (tutorial 13, docs/flow_matching.md), on the mixture's exact velocity. Its sample is
# x_flow = x_t / (alpha + sigma) at the level s = sigma / (alpha + sigma) (in VE terms s = sigma_VE / (1 + sigma_VE)),
# so we give it DDIM's levels and DDIM's start in those coordinates, and map its points back to x_t
# (`lab.trajectories.to_vp_frame`). The flow scheduler always ends at s = 0, where SD's DDIM stops at
# alpha_bar_0 (sigma 0.029): its last step goes a little further.

# %%
from minidiff.lab.trajectories import exact_trajectory, scheduler_trajectory
from minidiff.viz.plotting import PALETTE
from minidiff.viz.trajectories import trajectory_plot

model_64 = accuracy.mixture_2d(torch.float64)  # float64: the exact paths are solved to 1e-8
path_noise = torch.randn(8, 2, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
samplers = [
    accuracy.SchedulerSetup("DDIM", "DDIMScheduler", step_kwargs={"eta": 0.0}),
    accuracy.SchedulerSetup("Euler", "EulerDiscreteScheduler"),
    accuracy.SchedulerSetup("Heun", "HeunDiscreteScheduler"),
    accuracy.SchedulerSetup("DPM++ 2M", "DPMSolverMultistepScheduler", {"solver_order": 2}),
]
flow_setup = accuracy.SchedulerSetup("Flow Euler", "FlowMatchEulerDiscreteScheduler")


def flow_euler_on_ddims_levels(ddim_steps):
    """Flow Euler from DDIM's start, through DDIM's levels, in flow coordinates: s = sigma / (1 + sigma) (VE sigma),
    x_flow = x_t / (alpha + sigma_t) with alpha + sigma_t = (1 + sigma) / sqrt(sigma^2 + 1)."""
    sigma_start = ddim_steps.sigmas[0]
    flow_start = ddim_steps.points[0] * math.sqrt(sigma_start**2 + 1) / (1 + sigma_start)
    levels = [sigma / (1 + sigma) for sigma in ddim_steps.sigmas[:-1]]  # the scheduler appends s = 0 itself
    return scheduler_trajectory(accuracy.make_scheduler(flow_setup), model_64, flow_start, None, sigmas=levels)


panels, colors, end_error, shortfall, trajectories = {}, {}, {}, {}, {}
for num_steps in (5, 20):
    for color, setup in zip(PALETTE, samplers + [flow_setup]):
        if setup is flow_setup:
            steps = flow_euler_on_ddims_levels(trajectories["DDIM", num_steps])
        else:
            steps = scheduler_trajectory(accuracy.make_scheduler(setup), model_64, path_noise, num_steps, setup.step_kwargs)
        trajectories[setup.label, num_steps] = steps
        exact = exact_trajectory(model_64, steps.points[0], steps.sigmas)
        start, end, exact_end = steps.points[0], steps.points[-1], exact.points[-1]
        end_error[setup.label, num_steps] = accuracy.rms(end - exact_end)
        # how far along the exact path's straight line from start to end the sampler got: < 1 stops short
        travelled = ((end - start) * (exact_end - start)).flatten(1).sum(1) / (exact_end - start).flatten(1).pow(2).sum(1)
        shortfall[setup.label, num_steps] = travelled
        title = f"{setup.label}, {num_steps} steps"
        panels[title], colors[title] = (exact.points, steps.points), color
        print(f"{title:20s} RMS distance of the last point from the exact end {end_error[setup.label, num_steps]:.3f}; "
              f"fraction of the way travelled {travelled.min():.2f}-{travelled.max():.2f}")
trajectory_plot(panels, OUT / "trajectories.png", columns=5, bounds=(-4.5, 4.5, -4.5, 4.5),
                marks=model_64.means.reshape(-1, 2), colors=colors,
                title="exact probability-flow paths (gray, ring = exact end) and each sampler's steps")
print("wrote", OUT / "trajectories.png")

# %% [markdown]
# What the picture shows, and the numbers say:
#
# - **5 steps.** The first-order samplers fall short: DDIM and Euler follow the slope at the start of
#   each step, the path bends away from it, and every one of the 8 samples stops before the ring
#   ("fraction of the way": the last point projected on the straight line from the start to the exact
#   end; none gets beyond 85%). Heun corrects with the slope at the step's end and overshoots instead,
#   on all 8 paths. DPM-Solver++(2M) lands closest, less than half as far off as Euler.
# - **20 steps.** Every sampler's points sit on its gray path, and every error is at least 3x smaller
#   than at 5 steps. DDIM and Euler still stop short (RMS ~0.09 from the exact end), where Heun
#   (~0.01) and DPM-Solver++(2M) (~0.02) land on the ring's centre: the difference of order that
#   tutorial 04 measures from 5 to 200 steps.

# %%
for label in ("DDIM", "Euler"):
    assert shortfall[label, 5].max() < 0.85 and shortfall[label, 20].max() < 1, label  # every sample stops short
assert shortfall["Heun", 5].min() > 1  # Heun overshoots on every path
assert end_error["DPM++ 2M", 5] < end_error["Euler", 5] / 2 and end_error["DPM++ 2M", 5] < end_error["DDIM", 5]
for setup in samplers:
    assert end_error[setup.label, 20] < end_error[setup.label, 5] / 3, setup.label
for label in ("DDIM", "Euler"):
    assert 0.05 < end_error[label, 20] < 0.15 and end_error[label, 20] > 4 * end_error["Heun", 20], label
assert end_error["Heun", 20] < 0.02 and end_error["DPM++ 2M", 20] < 0.03

# %% [markdown]
# **Flow Euler is DDIM.** After the change of variables, the flow scheduler's points are DDIM's at every
# level both visit, to float32 rounding of its levels (tutorial 13 shows why: both take the same
# straight-line step in these coordinates). Only its last step differs: it goes on to s = 0, where DDIM stops
# at alpha_bar_0, about 1e-3 away on this mixture.

# %%
for num_steps in (5, 20):
    ddim, flow = trajectories["DDIM", num_steps], trajectories["Flow Euler", num_steps]
    same_levels = torch.tensor(flow.sigmas[:-1]) / torch.tensor(ddim.sigmas[:-1])
    gap = (flow.points[:-1] - ddim.points[:-1]).abs().max().item()
    last_gap = (flow.points[-1] - ddim.points[-1]).abs().max().item()
    print(f"{num_steps} steps: flow Euler vs DDIM, largest difference {gap:.1e} before the last step, {last_gap:.1e} after it")
    assert torch.allclose(same_levels, torch.ones(len(same_levels), dtype=same_levels.dtype), rtol=1e-6, atol=0)
    assert gap < 1e-5 and flow.sigmas[-1] == 0 and 1e-4 < last_gap < 1e-2

# %% [markdown]
# ## What to read next
#
# - `minidiff/schedulers/update_rules.py`: every update rule of minidiff, each a short function
#   naming its paper, equation or algorithm box (DDPM, PNDM, LMS, Euler ancestral, UniPC, ...).
# - `minidiff/schedulers/parameterization.py`: how "epsilon", "v_prediction" and "sample" models
#   are turned into x_0 and eps, in the VP and the VE frame.
# - `minidiff/schedulers/ddim.py`, `euler.py`, `dpm_solver_multistep.py`: the classes. Each `step`
#   is the bookkeeping above (which timestep, which noise level, which history), then one call into
#   the core.
