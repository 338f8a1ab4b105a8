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
# # 04 · How accurate is each scheduler?
#
# "DPM-Solver++ needs 20 steps where Euler needs 100" is the kind of claim usually made by looking
# at pictures. With a trained UNet you cannot do better: the model's own error hides the
# scheduler's. Here the model is *exact* (the Bayes-optimal denoiser of a Gaussian mixture, as in
# tutorials 01 and 03), so whatever error is left is the scheduler's own, and it can be measured
# against the exact answer. This is `minidiff.lab.accuracy` (`minidiff/lab/accuracy.py`), the lab behind
# `minidiff demo`, opened up.
#
# Everything runs on SD 1.5's noise schedule and each scheduler's defaults, built the way a user
# builds them: `Class.from_config(sd15_config, **changes)`.
#
# **Run it:** `python tutorials/04_how_accurate_is_each_scheduler.py` (about 15 s of CPU time, no weights), or
# open it as a notebook. Pictures go to `tutorials/out/04_how_accurate_is_each_scheduler/`.

# %%
import math

import numpy as np
import torch

import tutorial_helpers as helpers

torch.set_num_threads(1)  # 2-D points: more threads only add overhead on a shared CPU
OUT = helpers.output_folder("04_how_accurate_is_each_scheduler")

# %% [markdown]
# ## 1. The data: a 2-D mixture with a known answer
#
# Four Gaussians of std 1 in the plane, with weights 0.4, 0.3, 0.2 and 0.1. Two dimensions keep
# every run to milliseconds, yet the components overlap enough to make the paths from noise to data
# bend, which is what separates a good ODE solver from a poor one.

# %%
from minidiff.lab import accuracy

model = accuracy.mixture_2d(torch.float64)  # GaussianMixtureDenoiser, each "image" is (2, 1, 1)
means = model.means.reshape(-1, 2)
data, _ = model.sample_data(4000, generator=torch.Generator().manual_seed(0))
print("means:", means.tolist(), " weights:", accuracy.MIXTURE_2D_WEIGHTS, " std:", accuracy.MIXTURE_2D_STD)
helpers.draw_scatter_panels({"the data (4000 draws)": data}, OUT / "data.png", marks=means)

# %% [markdown]
# ## 2. The exact answer: the probability-flow ODE, solved to 1e-10
#
# Every deterministic scheduler (DDIM with eta=0, PNDM, LMS, Euler, DPM-Solver++, UniPC) is a
# numerical method for one ODE, the probability-flow ODE (Song et al. 2021, arXiv 2011.13456,
# eq. 13). Karras et al. 2022 (arXiv 2206.00364) write it as dx = -sigma_dot(t) sigma(t) grad_x log p(x; sigma(t)) dt
# (their eq. 1); with sigma(t) = t and their eq. 3, grad_x log p = (D - x) / sigma^2, it reads
#
#     dx/dsigma = (x - D(x, sigma)) / sigma,        x = x_0 + sigma eps,   D(x, sigma) = E[x_0 | x]
#
# For the mixture, D is known in closed form, so the ODE can be solved to 1e-10 in float64 with an
# adaptive Runge-Kutta method (Dormand-Prince 5(4)). Each scheduler is compared with the exact end
# of *its own* path: from its first noise level to its last, from the same starting noise.

# %%
noise = torch.randn(64, 2, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # 64 paths
euler = accuracy.make_scheduler(accuracy.SchedulerSetup("Euler", "EulerDiscreteScheduler"))
initial, euler_end = accuracy.run_scheduler(euler, model, noise, num_inference_steps=20)
levels = accuracy.noise_levels(euler)
exact_end = accuracy.reference_endpoint(euler, model, initial)
print(f"Euler's path: sigma {levels.sigma_first:.4f} -> {levels.sigma_last}; 20 steps")
print(f"RMS error of Euler at 20 steps: {accuracy.rms(euler_end - exact_end):.4f}")

assert abs(levels.sigma_first - 14.6146) < 1e-3 and levels.sigma_last == 0.0
assert 0.01 < accuracy.rms(euler_end - exact_end) < 0.2

# %% [markdown]
# ## 3. Error against steps, for every deterministic scheduler
#
# 5 to 200 steps. The "sigma_min" rows are the same multistep solvers told to stop at the last
# training noise level (`final_sigmas_type="sigma_min"`) instead of jumping to sigma = 0.

# %%
steps = accuracy.DEFAULT_STEPS  # (5, 10, 20, 50, 100, 200)
cache = {}  # reference solves shared by schedulers with the same path (Euler and LMS)
results = [
    accuracy.measure_convergence(setup, model, noise, steps, cache=cache) for setup in accuracy.DETERMINISTIC_SETUPS
]
print(accuracy.format_convergence_table(results))
error = {result.label: dict(zip(result.steps, result.errors)) for result in results}
order = {result.label: result.order for result in results}
few_steps_order = {result.label: result.order_few_steps for result in results}

from minidiff.viz.plotting import GUIDE, loglog_panels

# Nineteen lines on one chart cannot be read: one panel per family (`accuracy.FAMILIES`; the flow-matching
# family is tutorial 13's), the same axes in every panel, and Euler (gray) in each as the yardstick.
FAMILIES = {family: labels for family, labels in accuracy.FAMILIES.items() if not family.startswith("flow matching")}
by_label = {r.label: r for r in results}
assert sorted(label for family in FAMILIES.values() for label in family) == sorted(by_label)  # every row, once


def line(label: str) -> str:
    return f"{label} ({by_label[label].order:.2f})"


panels = {
    family: {line(label): (by_label[label].steps, by_label[label].errors) for label in (("Euler",) + labels if "Euler" not in labels else labels)}
    for family, labels in FAMILIES.items()
}
loglog_panels(
    panels,
    OUT / "error_vs_steps.png",
    columns=2,
    title="Deterministic schedulers vs the exact probability-flow ODE (2-D mixture, SD 1.5 schedule; measured order)",
    x_label="number of steps",
    y_label="RMS error of the final sample",
    colors={line("Euler"): GUIDE},
)
print("wrote", OUT / "error_vs_steps.png")

assert all(error[label][200] < error[label][10] for label in error)  # more steps, less error, for every one

# %% [markdown]
# ## 4. Convergence order
#
# A method of order p has an error ~ C / steps^p: a straight line of slope -p on the log-log plot.
# The "order (asym)" column fits the last three step counts (50, 100, 200).
#
# - DDIM, Euler and DPM++ 1 (first-order DPM-Solver++, which is DDIM in other clothes) measure ~1,
#   as designed.
# - DPM++ 2M, 3M and UniPC are built to be of order 2 or 3, yet with SD's defaults they too measure
#   ~1. Not a bug: their *last* step jumps from the last timestep (sigma ~ 0.03-0.2) to sigma = 0,
#   where the ODE's log-sigma variable is infinite and only a first-order step is possible. That one
#   step dominates the error at many steps. Their error is still several times smaller than Euler's.
# - Told to stop at sigma_min instead, DPM++ 2M and 3M show more of their design order: ~1.6 and
#   ~2.2 here. (The uniform-in-t grid refines slowly in log-sigma near t = 0, which keeps them short
#   of 2 and 3.)
# - LMS (order up to 4) measures ~2.5; PNDM's pseudo-linear multistep ~1.4, flattening out at
#   ~8e-5 from 100 steps on.
#
# A caution when reading across rows: each row is measured against the exact end of *its own*
# path. PNDM and DDIM use "leading" timesteps (with 5 steps they start at t=801, sigma 4, not 14.6)
# and stop at sigma 0.03 instead of 0: a shorter, easier path, which is not the same as a better
# picture (tutorial 03 showed PNDM and DDIM picking other pictures than the exact ODE at 5 steps).

# %%
for label in order:
    print(f"{label:22s} measured order {order[label]:.2f}   design order {accuracy.DESIGN_ORDERS.get(label, '-')}")

for label in ("DDIM", "Euler", "DPM++ 1"):
    assert 0.85 < order[label] < 1.15, (label, order[label])
for label in ("DPM++ 2M", "DPM++ 3M", "UniPC bh1", "UniPC bh2"):
    assert 0.75 < order[label] < 1.15, (label, order[label])  # ~1 because of the first-order final jump
    assert error[label][20] < error["Euler"][20] / 3  # yet far more accurate than Euler
assert order["DPM++ 2M sigma_min"] > 1.45 and order["DPM++ 3M sigma_min"] > 1.95
assert 2.2 < order["LMS"] < 2.8 and 1.2 < order["PNDM (PLMS)"] < 1.6
assert error["PNDM (PLMS)"][200] > 0.8 * error["PNDM (PLMS)"][100] and error["PNDM (PLMS)"][100] < 1e-4  # flat at ~8e-5

# %% [markdown]
# ## 4b. Two model calls a step: Heun and DPM2
#
# Heun (Karras et al. 2022, arXiv 2206.00364, Algorithm 1) takes an Euler step, evaluates the model
# again at its end, and averages the two slopes. DPM2 (k-diffusion's `sample_dpm_2`) evaluates the
# model at a midpoint in log sigma instead. Both are second order and both cost two model calls a
# step. That is why `scheduler.timesteps` has 2N - 1 entries for N steps: the loop calls the UNet
# once per entry (the last step makes only one call).
#
# The order is still fitted against N: twice the calls is a constant factor, and a constant factor
# does not change the slope of a log-log line. To compare cost, compare a two-call method at N
# steps with a one-call method at 2N steps (the "calls/step" column of `minidiff demo`).

# %%
heun = accuracy.make_scheduler(accuracy.SchedulerSetup("Heun", "HeunDiscreteScheduler"))
heun.set_timesteps(10)
print("Heun, 10 steps:", len(heun.timesteps), "model calls")
for label in ("Heun", "DPM2"):
    print(f"{label}: order(few) {few_steps_order[label]:.2f}, order(asym) {order[label]:.2f}; "
          f"error at 10 steps {error[label][10]:.2e} vs Euler at 20 steps {error['Euler'][20]:.2e}")

assert len(heun.timesteps) == 2 * 10 - 1
assert few_steps_order["Heun"] > 2 and few_steps_order["DPM2"] > 1.8 and order["DPM2"] > 1.8
for label in ("Heun", "DPM2"):
    assert error[label][10] < error["Euler"][20] / 1.5  # better than Euler at the same number of model calls

# %% [markdown]
# Heun's asymptotic order reads ~1, though. Its last step, from the smallest sigma (~0.03) down to
# sigma = 0, cannot be a Heun step: the slope at sigma = 0 is undefined. So Algorithm 1 takes an
# Euler step there, from the same sigma for every N. The error of that one step is a floor under
# Heun's error. Measure it directly: start on the exact path at sigma_min and take the Euler step.
# The step lands on D(x, sigma_min).

# %%
heun.set_timesteps(200)
sigma_first, sigma_min = float(heun.sigmas[0]), float(heun.sigmas[-2])
x_first = noise * sigma_first
x_at_sigma_min = accuracy.probability_flow_ode(model, x_first, sigma_first, sigma_min)
x_at_zero = accuracy.probability_flow_ode(model, x_first, sigma_first, 0.0)
floor = accuracy.rms(model.denoise(x_at_sigma_min, sigma_min) - x_at_zero)
print(f"sigma_min = {sigma_min:.4f}; the final Euler step alone errs by {floor:.2e}; "
      f"Heun at 100 and 200 steps: {error['Heun'][100]:.2e}, {error['Heun'][200]:.2e}")

assert 0.5 < error["Heun"][200] / floor < 2  # the floor is that one step
assert order["Heun"] < 1.3 < few_steps_order["Heun"]

# %% [markdown]
# The rest of the fourteen: DPM++ 2S and 3S (Lu et al. 2022, the *singlestep* DPM-Solver) reach
# second and third order within each group of 2 or 3 steps instead of reusing past outputs, and end
# with the same first-order jump to sigma = 0 as DPM++ 2M. DEIS (Zhang & Chen 2022, arXiv 2204.13902)
# is a multistep exponential integrator like DPM++ 2M, with its weights integrated in log rho.
# DEIS 3's error *grows* beyond ~100 steps, in diffusers exactly as here: each weight is the
# difference of two nearly equal float32 antiderivatives, so the rounding error wins once the steps
# get small. An exact model shows it; a trained UNet's own error would hide it.

# %%
print("DEIS 3 error at 50, 100, 200 steps:", [f"{error['DEIS 3'][n]:.2e}" for n in (50, 100, 200)])
assert error["DEIS 3"][200] > error["DEIS 3"][100]
assert error["DEIS"][200] < error["DEIS"][100] < error["DEIS"][50]

# %% [markdown]
# ## 5. Why DPM-Solver needs fewer steps
#
# Read the plot sideways: how many steps does each scheduler need for a given error? DPM-Solver++
# (Lu et al. 2022, arXiv 2211.01095) rewrites the ODE in lambda = log(alpha / sigma) and integrates
# its linear part exactly (an "exponential integrator"); only the model's x_0 prediction is
# approximated, by a polynomial through the last 1-3 predictions. The x_0 prediction changes slowly
# along the path, so this approximation is good even with large steps. Euler approximates the whole
# right-hand side as constant over each step.

# %%
def steps_to_reach(result, target: float) -> float:
    """The step count at which `result`'s error falls to `target`, interpolated on the log-log curve."""
    log_steps, log_errors = np.log(result.steps), np.log(result.errors)
    for i in range(len(result.steps) - 1):
        if result.errors[i] >= target >= result.errors[i + 1]:
            fraction = (math.log(target) - log_errors[i]) / (log_errors[i + 1] - log_errors[i])
            return float(math.exp(log_steps[i] + fraction * (log_steps[i + 1] - log_steps[i])))
    return math.inf


target = 0.02
needed = {result.label: steps_to_reach(result, target) for result in results}
for label in ("Euler", "DDIM", "LMS", "PNDM (PLMS)", "DPM++ 2M", "DPM++ 3M", "UniPC bh2"):
    print(f"{label:14s} needs ~{needed[label]:5.0f} steps for an RMS error of {target}")

assert needed["Euler"] > 3 * needed["DPM++ 2M"]  # ~85 vs ~18 steps
assert needed["Euler"] > 3 * needed["UniPC bh2"]

# %% [markdown]
# Seen on the paths (as in tutorial 07): 8 of the 64 starting noises, the exact probability-flow path
# from each (gray, its end a ring) and the points of Euler, DPM-Solver++ 2M and LMS at 10 steps, drawn in
# the VP frame x / sqrt(sigma^2 + 1). Euler follows the slope at the start of each step and stops short
# of the ring; the other two land near its centre, their last points at most half as far off as Euler's.

# %%
from minidiff.lab.trajectories import exact_trajectory, scheduler_trajectory
from minidiff.viz.plotting import PALETTE
from minidiff.viz.trajectories import trajectory_plot

panels, colors, end_error, travelled = {}, {}, {}, {}
for color, label in zip(PALETTE, ("Euler", "DPM++ 2M", "LMS")):
    setup = next(setup for setup in accuracy.DETERMINISTIC_SETUPS if setup.label == label)
    steps = scheduler_trajectory(accuracy.make_scheduler(setup), model, noise[:8], 10, setup.step_kwargs)
    exact = exact_trajectory(model, steps.points[0], steps.sigmas)
    end_error[label] = accuracy.rms(steps.points[-1] - exact.points[-1])
    way, went = (exact.points[-1] - steps.points[0]).flatten(1), (steps.points[-1] - steps.points[0]).flatten(1)
    travelled[label] = (way * went).sum(1) / way.pow(2).sum(1)  # the way along the straight line to the exact end
    panels[f"{label}, 10 steps"], colors[f"{label}, 10 steps"] = (exact.points, steps.points), color
print("RMS distance of the last point from the exact end, 10 steps:", {k: round(v, 3) for k, v in end_error.items()})
trajectory_plot(panels, OUT / "trajectories.png", columns=3, bounds=(-4.5, 4.5, -4.5, 4.5), marks=means, colors=colors,
                title="exact paths (gray, ring = exact end) and 10 steps of each sampler")
print("wrote", OUT / "trajectories.png")

assert end_error["DPM++ 2M"] < end_error["Euler"] / 2 and end_error["LMS"] < end_error["Euler"] / 2
assert travelled["Euler"].max() < 1  # every Euler path stops short

# %% [markdown]
# Not the usual ranking: on this problem LMS (a 4th-order linear multistep method in sigma) needs
# fewer steps than DPM-Solver++ from 10 steps on, and PNDM fewer still (on its shorter path). A
# smooth 2-D mixture is the kind of problem where high-order multistep methods shine; whether the
# ranking carries over to a trained UNet in 16384 latent dimensions, where SD users report LMS
# artifacts at low step counts (diffusers issue #3598), is something an exact model cannot tell.

# %%
assert needed["LMS"] < needed["DPM++ 2M"] and error["LMS"][50] < error["DPM++ 2M"][50]

# %% [markdown]
# ## 6. Stochastic vs deterministic
#
# DDPM, Euler ancestral, DDIM with eta = 1, SDE-DPM-Solver++ (2M and 2S), DPM2 ancestral and DPM++
# SDE add fresh noise at every step: from
# the same starting noise, two runs with different generators end at different samples. So they
# cannot be compared with the ODE's endpoint; what they must get right is the *distribution*. The
# lab draws 4000 samples and compares, component by component, the frequency, mean and variance
# with the mixture's, in units of their standard error (|z| < 3 is within sampling error).

# %%
deterministic_setup = accuracy.SchedulerSetup("Euler", "EulerDiscreteScheduler")
stochastic_setup = accuracy.SchedulerSetup("Euler a", "EulerAncestralDiscreteScheduler", stochastic=True)
start = torch.randn(8, 2, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
runs = {}
for setup in (deterministic_setup, stochastic_setup):
    for seed in (0, 1):
        generator = torch.Generator().manual_seed(seed) if setup.stochastic else None
        scheduler = accuracy.make_scheduler(setup)
        runs[setup.label, seed] = accuracy.run_scheduler(scheduler, model, start, 20, generator=generator)[1]
print("Euler, same noise, two runs: identical?", torch.equal(runs["Euler", 0], runs["Euler", 1]))
print("Euler a, same noise, two generators: identical?", torch.equal(runs["Euler a", 0], runs["Euler a", 1]))

assert torch.equal(runs["Euler", 0], runs["Euler", 1])
assert not torch.equal(runs["Euler a", 0], runs["Euler a", 1])

# %%
model_32 = accuracy.mixture_2d(torch.float32)
dpm_2m_setup = next(setup for setup in accuracy.DETERMINISTIC_SETUPS if setup.label == "DPM++ 2M")
setups = list(accuracy.STOCHASTIC_SETUPS) + [deterministic_setup, dpm_2m_setup]  # + Euler, DPM++ 2M
distribution = [
    accuracy.measure_distribution(setup, model_32, num_inference_steps, num_samples=4000, seed=0)
    for setup in setups
    for num_inference_steps in (10, 100)
]
print(accuracy.format_distribution_table(distribution))
worst_z = {(r.label, r.num_inference_steps): r.max_abs_z for r in distribution}
variance_ratio = {
    (r.label, r.num_inference_steps): [c.variance / c.variance_target for c in r.components] for r in distribution
}

# %% [markdown]
# What the table shows:
# - With 10 steps the stochastic samplers are far off (|z| of 10 and more): each step's fresh noise
#   is right only in the limit of small steps, and with large steps the samples come out too
#   concentrated (variance 80-90% of the mixture's). With 100 steps they are close to sampling
#   error (|z| about 3 at worst).
# - The deterministic ones are closer at 10 steps (DPM++ 2M the closest), for the reason of
#   section 5.
# - The second-order stochastic solvers are the exception: SDE-DPM-Solver++ 2M, DPM2 ancestral and
#   DPM++ SDE (whose noise comes from a Brownian tree, so that both model calls of a step see the
#   same Brownian path) are far closer at 10 steps, |z| about 4.5 at worst against 13 and more for
#   the first-order ones, though not yet within sampling error. DPM2 ancestral errs the other way: its
#   variance comes out 11-14% too large. DPM++ 2S a, the singlestep SDE solver
#   (`algorithm_type="sde-dpmsolver++"`), is not: at 10 steps it is as far off as Euler ancestral,
#   and diffusers' class gives the same samples. Why a second-order SDE solver behaves like a
#   first-order one here is a question this table raises and does not answer.
# - What the exact model cannot show: the usual argument for stochastic samplers is that the fresh
#   noise *forgets* earlier errors, including a trained model's. Here there is no model error to
#   forget.

# %%
for label in ("DDPM", "Euler a", "DDIM eta=1"):
    assert worst_z[label, 10] > 5 and min(variance_ratio[label, 10]) < 0.9, label
    assert worst_z[label, 100] < 4, label  # within sampling error, give or take (4000 samples)
    assert worst_z[label, 10] > worst_z["Euler", 10] > worst_z["DPM++ 2M", 10], label
for label in ("SDE-DPM++ 2M", "DPM2 a", "DPM++ SDE"):
    assert worst_z[label, 10] < worst_z["Euler a", 10] / 2, label
    assert 3 < worst_z[label, 10] < 6, label  # closer, not yet within sampling error
    assert worst_z[label, 100] < 4, label
assert min(variance_ratio["DPM2 a", 10]) > 1.05  # too spread, where the first-order ones are too concentrated
assert worst_z["DPM++ 2S a", 10] > 5

# %% [markdown]
# Pictured: 4000 samples of the data, and of three schedulers with 10 steps and Euler ancestral
# with 100.

# %%
def samples_of(setup, num_inference_steps: int) -> torch.Tensor:
    """4000 samples of `setup` from seed 0 (the generator also drives a stochastic scheduler's noise)."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(4000, 2, 1, 1, generator=generator, dtype=torch.float64)
    scheduler, step_generator = accuracy.make_scheduler(setup), generator if setup.stochastic else None
    return accuracy.run_scheduler(scheduler, model, start, num_inference_steps, generator=step_generator)[1]


panels = {"the data": data}
for setup in (deterministic_setup, dpm_2m_setup, stochastic_setup):
    panels[f"{setup.label}, 10 steps"] = samples_of(setup, 10)
panels["Euler a, 100 steps"] = samples_of(stochastic_setup, 100)
helpers.draw_scatter_panels(panels, OUT / "samples.png", marks=means)
print("wrote", OUT / "samples.png")
