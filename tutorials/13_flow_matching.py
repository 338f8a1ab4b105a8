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
# # 13 · Flow matching is the same ODE
#
# Flow matching (Lipman et al. 2023, arXiv 2210.02747) and rectified flow (Liu et al. 2023, arXiv 2209.03003)
# are taught as a new family: a straight path from data to noise, a network that predicts its velocity, Euler
# steps. SD3 and Flux use them. Here we check, on a model with no training error (the exact denoiser of a
# Gaussian mixture, as in tutorials 04 and 07), how much of that is new:
#
# 1. eps-, x0-, v- and velocity-prediction are **one denoiser in four coordinates** (Karras et al. 2022's framework);
# 2. DDIM on SD's schedule, Euler in sigma, and Euler on the flow ODE take **the same step**, once the
#    sample is rescaled (x / (alpha + sigma)) and the time too (s = sigma / (alpha + sigma));
# 3. how straight the exact paths are, measured, and what that means for sampling in a few steps;
# 4. noise schedules and the signal-to-noise ratio: SD's terminal alpha_bar of 0.0047, zero terminal SNR,
#    "trailing" timesteps and v-prediction (Lin et al. 2023, arXiv 2305.08891), and what the leftover signal
#    does to the exact model's samples.
#
# The sign and time conventions of the papers, of diffusers and of the SD 1.5 rectified-flow checkpoints are
# set side by side in `docs/flow_matching.md`.
#
# **Run it:** `python tutorials/13_flow_matching.py` (seconds, no weights). Pictures go to
# `tutorials/out/13_flow_matching/`.

# %%
import math

import torch

import tutorial_helpers as helpers

torch.set_num_threads(1)  # 2-D points: more threads only add overhead on a shared CPU
OUT = helpers.output_folder("13_flow_matching")

from minidiff import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, accuracy
from minidiff.lab.gaussian_mixture import ExactVelocityModel, GaussianMixtureDenoiser
from minidiff.schedulers import parameterization
from minidiff.schedulers.base import make_betas, rescale_zero_terminal_snr, spaced_timesteps
from minidiff.viz import line_plot

config = accuracy.SD15_SCHEDULER_CONFIG  # SD 1.5's scheduler_config.json: scaled_linear betas, 1000 steps


def mixture(prediction_type: str) -> GaussianMixtureDenoiser:
    """The lab's 2-D mixture of four Gaussians (tutorial 04), predicting `prediction_type`, in float64."""
    means = torch.tensor(accuracy.MIXTURE_2D_MEANS, dtype=torch.float64)[:, :, None, None]
    return GaussianMixtureDenoiser.from_components(
        means, accuracy.MIXTURE_2D_WEIGHTS, data_std=accuracy.MIXTURE_2D_STD, prediction_type=prediction_type,
        scheduler_config=config,
    )


eps_model, x0_model, v_model = mixture("epsilon"), mixture("sample"), mixture("v_prediction")
velocity_model = ExactVelocityModel(eps_model)  # u(x, s) = E[eps - x_0 | x = (1 - s) x_0 + s eps], told t = 1000 s

# %% [markdown]
# ## 1. One denoiser, four coordinates
#
# Take a noisy point of SD's forward process, x_t = alpha_t x_0 + sigma_t eps (alpha_t = sqrt(alpha_bar_t),
# sigma_t = sqrt(1 - alpha_bar_t)), at t = 600. Four models answer four different questions about it:
#
#     eps-prediction      E[eps | x_t]                                  (DDPM, SD 1.5)
#     x0-prediction       E[x_0 | x_t]                                  (the denoiser D of Karras et al. 2022)
#     v-prediction        E[alpha_t eps - sigma_t x_0 | x_t]             (Salimans & Ho 2022; SD 2.x 768)
#     flow velocity       E[eps - x_0 | x_s],  x_s = (1 - s) x_0 + s eps (flow matching; diffusers' sign)
#
# The flow point is the same noisy sample rescaled: divide x_t by alpha_t + sigma_t and it *is*
# (1 - s) x_0 + s eps with s = sigma_t / (alpha_t + sigma_t). All four are linear in (x, E[x_0 | x]), so each
# one gives the other three exactly (Karras et al. 2022, Table 1, write every model as such a D).

# %%
t = 600
alpha_bar = eps_model.alphas_cumprod[t].double()
alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
generator = torch.Generator().manual_seed(0)
x0_true, _ = eps_model.sample_data(512, generator=generator)
noise = torch.randn(x0_true.shape, generator=generator, dtype=torch.float64)
x_t = alpha * x0_true + sigma * noise  # (512, 2, 1, 1)

eps_pred = eps_model(x_t, t).sample
x0_pred = x0_model(x_t, t).sample
v_pred = v_model(x_t, t).sample
s = sigma / (alpha + sigma)
x_flow = x_t / (alpha + sigma)
u_pred = velocity_model(x_flow, 1000 * s).sample

print(f"t = {t}: alpha_t = {alpha:.4f}, sigma_t = {sigma:.4f}  ->  flow time s = {s:.4f}, VE sigma = {sigma / alpha:.4f}")
for name, prediction in [("eps", eps_pred), ("x0", x0_pred), ("v", v_pred), ("flow velocity", u_pred)]:
    print(f"{name:14s} first sample {prediction[0].flatten().tolist()}")

# every prediction -> the same x_0 (to float64 round-off); the formulas are minidiff's parameterization.py
x0_from_eps = parameterization.to_x0(eps_pred, x_t, alpha, sigma, "epsilon")
x0_from_v = parameterization.to_x0(v_pred, x_t, alpha, sigma, "v_prediction")
x0_from_u = parameterization.x0_from_flow_velocity(u_pred, x_flow, s)
x0_from_karras = eps_model.denoise(x_t / alpha, sigma / alpha)  # D(x; sigma) on x = x_0 + sigma eps
for name, estimate in [("eps", x0_from_eps), ("v", x0_from_v), ("flow velocity", x0_from_u), ("Karras D", x0_from_karras)]:
    difference = (estimate - x0_pred).abs().max().item()
    print(f"x0 from {name:14s} max |difference| to the x0-model: {difference:.1e}")
    assert difference < 1e-10, name
# and the velocity is eps - x0 of the eps-model at the VP point: the same question
assert (u_pred - (eps_pred - x0_pred)).abs().max() < 1e-10
# not a tautology: the velocity at the *unscaled* point is another answer
assert (velocity_model(x_t, 1000 * s).sample - u_pred).abs().max() > 1e-2

# %% [markdown]
# ## 2. DDIM, Euler in sigma and Euler on the flow ODE take the same step
#
# One step of each, from noise level i to i+1, with the model's x_0 and eps at the current point:
#
#     DDIM (eq. 12):           x_{t'} = alpha_{t'} x0 + sigma_{t'} eps
#     Euler, VE (Karras):      x_{sigma'} = x_sigma + (sigma' - sigma) eps,          x = x_t / alpha_t
#     Euler, flow:             x_{s'} = x_s + (s' - s) (eps - x0),                   x = x_t / (alpha_t + sigma_t)
#
# Substitute and all three are the same point: each is exact when the denoiser's answer stays constant
# over the step. We run the three *classes* (`DDIMScheduler`, `EulerDiscreteScheduler`,
# `FlowMatchEulerDiscreteScheduler`) on the same exact model, on DDIM's 10 "trailing" timesteps translated to
# each one's noise levels, and compare after every step.

# %%
N = 10
ddim = DDIMScheduler.from_config(config, timestep_spacing="trailing", set_alpha_to_one=True)
ddim.set_timesteps(N)
alphas_cumprod = ddim.alphas_cumprod.double()
alpha_bars = torch.cat([alphas_cumprod[ddim.timesteps], torch.ones(1, dtype=torch.float64)])  # ... then alpha_bar = 1
alphas, sigmas = alpha_bars.sqrt(), (1 - alpha_bars).sqrt()
flow_levels = sigmas / (alphas + sigmas)  # s_i, the last one 0
ve_levels = sigmas / alphas  # sigma_i = sqrt((1 - alpha_bar) / alpha_bar), the last one 0

euler = EulerDiscreteScheduler.from_config(config)
euler.set_timesteps(sigmas=ve_levels.tolist())
flow = FlowMatchEulerDiscreteScheduler()
flow.set_timesteps(sigmas=flow_levels[:-1].tolist())  # the final 0 is appended by the class
print("DDIM timesteps      ", ddim.timesteps.tolist())
print("flow sigmas s_i     ", [round(v, 4) for v in flow.sigmas.tolist()])
print("Euler (VE) sigmas   ", [round(v, 3) for v in euler.sigmas.tolist()])

start = torch.randn(64, 2, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
x_ddim, x_euler, x_fm = start, start / alphas[0], start / (alphas[0] + sigmas[0])
flow_path_of_ddim, largest = [x_ddim / (alphas[0] + sigmas[0])], 0.0
for i in range(N):
    x_ddim = ddim.step(eps_model(x_ddim, ddim.timesteps[i]).sample, ddim.timesteps[i], x_ddim).prev_sample
    model_input = euler.scale_model_input(x_euler, euler.timesteps[i])
    x_euler = euler.step(eps_model(model_input, euler.timesteps[i]).sample, euler.timesteps[i], x_euler).prev_sample
    x_fm = flow.step(velocity_model(x_fm, flow.timesteps[i]).sample, flow.timesteps[i], x_fm).prev_sample
    as_vp_from_flow = x_fm * (alphas[i + 1] + sigmas[i + 1])  # back to x_t = alpha x_0 + sigma eps
    as_vp_from_euler = x_euler * alphas[i + 1]
    step_gap = max((as_vp_from_flow - x_ddim).abs().max().item(), (as_vp_from_euler - x_ddim).abs().max().item())
    largest = max(largest, step_gap)
    flow_path_of_ddim.append(x_ddim / (alphas[i + 1] + sigmas[i + 1]))
print(f"largest difference over the 10 steps, in DDIM's coordinates: {largest:.1e}")
# float32 noise levels in the classes (as diffusers keeps them): the same point to ~1e-6, not 1e-15
assert largest < 1e-4
x_ddim_end = x_ddim

# %% [markdown]
# Same steps, same answers: the flow scheduler is DDIM in other coordinates. What differs between "flow" and
# "diffusion" samplers in practice is (a) which noise levels they visit and (b) what the network learned, not
# the update. The picture shows the exact flow-ODE paths (lines) and the 10 DDIM steps drawn in flow
# coordinates (dots): the dots sit where the flow Euler steps land.

# %%
exact_path_levels = torch.linspace(1.0, 0.0, 201, dtype=torch.float64)


def exact_flow_path(x_start: torch.Tensor, levels: torch.Tensor, model: GaussianMixtureDenoiser) -> torch.Tensor:
    """x(s) at every entry of `levels` (from 1 down to 0), RK4 on dx/ds = u(x, s): (len(levels), B, 2)."""
    path, x = [x_start], x_start
    for s_now, s_next in zip(levels[:-1].tolist(), levels[1:].tolist()):
        h = s_next - s_now
        k1 = model.flow_velocity(x, s_now)
        k2 = model.flow_velocity(x + h / 2 * k1, s_now + h / 2)
        k3 = model.flow_velocity(x + h / 2 * k2, s_now + h / 2)
        k4 = model.flow_velocity(x + h * k3, s_next)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        path.append(x)
    return torch.stack(path).reshape(len(levels), len(x_start), 2)


shown = start[:12] / (alphas[0] + sigmas[0])
paths = exact_flow_path(shown, exact_path_levels[exact_path_levels <= flow_levels[0]], eps_model)
ddim_dots = torch.stack(flow_path_of_ddim).reshape(N + 1, 64, 2)[:, :12]
series, colors = {}, {}
for k in range(12):
    series[f"_exact {k}"], colors[f"_exact {k}"] = (paths[:, k, 0].tolist(), paths[:, k, 1].tolist()), 7
    series[f"_ddim {k}"], colors[f"_ddim {k}"] = (ddim_dots[:, k, 0].tolist(), ddim_dots[:, k, 1].tolist()), 3
means = torch.tensor(accuracy.MIXTURE_2D_MEANS)
for k, mean in enumerate(means.tolist()):  # one dot each
    series[f"_mean {k}"], colors[f"_mean {k}"] = ([mean[0]], [mean[1]]), 2
for label, color in [("exact flow-ODE path", 7), ("DDIM, 10 steps, in flow coordinates", 3), ("component means", 2)]:
    series[label], colors[label] = ([], []), color  # legend entries only
line_plot(
    series, OUT / "paths.png", title="Exact flow-ODE paths of the 2-D mixture and DDIM's steps in flow coordinates",
    x_label="x[0] / (alpha + sigma)", y_label="x[1] / (alpha + sigma)", colors=colors,
    markers=tuple(f"_ddim {k}" for k in range(12)) + tuple(f"_mean {k}" for k in range(4)), equal_aspect=True,
)
print("wrote", OUT / "paths.png")

# %% [markdown]
# ## 3. How straight are the exact paths?
#
# If every path were a straight line, one Euler step from pure noise would land exactly on its end. Liu et al.
# 2023 measure straightness as S = integral over s of E |(x(0) - x(1)) + u(x(s), s)|^2 (zero for straight
# paths; u points to the noise, so a straight path has u = x(1) - x(0)). We also report the chord / arc length of
# each path, in three coordinate systems of the same trajectories: flow (x / (alpha + sigma)), VE (x / alpha)
# and VP (x_t itself), over SD's range of noise levels (t <= 999, s <= 0.936).

# %%
noise_256 = torch.randn(256, 2, 1, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
P = exact_flow_path(noise_256, exact_path_levels, eps_model)  # (201, 256, 2), from s = 1 (pure noise) to 0
U = torch.stack([eps_model.flow_velocity(P[i].reshape(256, 2, 1, 1), level).reshape(256, 2)
                 for i, level in enumerate(exact_path_levels.tolist())])
straightness = ((P[-1] - P[0])[None] + U).pow(2).sum(-1).mean(1)  # (201,) E|(x0 - x1) + u|^2 at each s
S = torch.trapezoid(straightness, exact_path_levels.flip(0)).item()  # the integral over s from 0 to 1
speed = torch.trapezoid(U.pow(2).sum(-1).mean(1), exact_path_levels.flip(0)).item()
print(f"Liu et al.'s straightness S = {S:.3f}, against E|u|^2 = {speed:.3f}: far from straight")
assert 0.2 < S / speed < 0.8


def chord_over_arc(path: torch.Tensor) -> float:
    chord = (path[-1] - path[0]).norm(dim=-1)
    arc = (path[1:] - path[:-1]).norm(dim=-1).sum(0)
    return (chord / arc).mean().item()


s_max = flow_levels[0].item()  # SD's t = 999 as a flow time
in_sd_range = exact_path_levels <= s_max
levels = exact_path_levels[in_sd_range][:, None, None]
ve_sigma = levels / (1 - levels)  # s = sigma / (1 + sigma)
frames = {
    "flow x / (alpha + sigma)": P[in_sd_range],
    "VE   x / alpha": P[in_sd_range] * (1 + ve_sigma),
    "VP   x_t": P[in_sd_range] * (1 + ve_sigma) / (1 + ve_sigma**2).sqrt(),
}
ratios = {name: chord_over_arc(path) for name, path in frames.items()}
for name, ratio in ratios.items():
    print(f"{name:26s} mean chord / arc = {ratio:.3f}")
print(f"flow, all the way from s = 1: chord / arc = {chord_over_arc(P):.3f}")
assert ratios["VE   x / alpha"] > ratios["flow x / (alpha + sigma)"] < ratios["VP   x_t"]  # see below why

# %% [markdown]
# The mixture's exact paths are curved in every coordinate system (VE and VP look straighter only because their
# noise part, 14.6 and 1 times eps, dwarfs the turn at the end). Straight paths need a denoiser whose answer
# does not change along the path: a single data point. Then the flow path is a straight line, and the VP path
# of the same trajectory is still an arc:

# %%
point = GaussianMixtureDenoiser.from_components(torch.tensor([[[[2.0]], [[-1.0]]]], dtype=torch.float64),
                                                data_std=1e-3, scheduler_config=config)
P_point = exact_flow_path(noise_256, exact_path_levels, point)
point_flow = chord_over_arc(P_point)
point_vp = chord_over_arc(P_point[in_sd_range] * (1 + ve_sigma) / (1 + ve_sigma**2).sqrt())
print(f"one data point: flow chord / arc = {point_flow:.6f}, VP chord / arc = {point_vp:.3f}")
assert point_flow > 0.9999 and point_vp < 0.97 and ratios["flow x / (alpha + sigma)"] < 0.95
one_step = accuracy.run_scheduler(FlowMatchEulerDiscreteScheduler(), point, noise_256, 1)[1]
assert (one_step - point.means[0]).abs().max() < 1e-5  # one Euler step from pure noise is exact there

# %% [markdown]
# **What this means for few steps.** Every first-order update here (DDIM, Euler in sigma, flow Euler) is the
# same, and every one, run for a single step from pure noise, lands on E[x_0 | x_T], the posterior mean: for
# the mixture, nearly the data's mean, far from any sample. No choice of coordinates straightens the paths of
# a given model; rectified flow's *reflow* (and InstaFlow) retrains the model on its own noise-sample pairs so
# that the paths become straight, and only then does one step suffice.
#
# The noise levels still matter. diffusers' default flow schedule, linspace(1, 1/1000, N), spends a 2-step
# run on one step from 1 to 0.001 and a second, tiny one; the rectified-flow repos and diffusers' Flux pipeline
# use linspace(1, 1/N, N), equal steps of 1/N:

# %%
reference = accuracy.flow_ode(eps_model, noise_256, 1.0, 0.0)
errors = {"default": [], "1/N": []}
for steps in (1, 2, 4, 8):
    default = FlowMatchEulerDiscreteScheduler()
    errors["default"].append(accuracy.rms(accuracy.run_scheduler(default, eps_model, noise_256, steps)[1] - reference))
    equal = FlowMatchEulerDiscreteScheduler()
    x = noise_256
    equal.set_timesteps(sigmas=torch.linspace(1.0, 1 / steps, steps).tolist())
    for level in equal.timesteps:
        x = equal.step(velocity_model(x, level).sample, level, x).prev_sample
    errors["1/N"].append(accuracy.rms(x - reference))
data_mean = (torch.tensor(accuracy.MIXTURE_2D_WEIGHTS, dtype=torch.float64)[:, None] * means.double()).sum(0)
print("flow Euler RMS error vs the exact flow ODE, 1 / 2 / 4 / 8 steps")
for name, values in errors.items():
    print(f"  sigmas {name:8s}", " ".join(f"{value:.3f}" for value in values))
one_step_samples = accuracy.run_scheduler(FlowMatchEulerDiscreteScheduler(), eps_model, noise_256, 1)[1].reshape(256, 2)
print("data mean", data_mean.tolist(), "; one step lands within",
      f"{(one_step_samples - data_mean).abs().max():.1e} of it for all 256 noises")
assert (one_step_samples - data_mean).abs().max() < 1e-4
assert abs(errors["default"][1] - errors["default"][0]) < 0.01 * errors["default"][0]  # 2 default steps = 1 step
assert errors["1/N"][1] < 0.8 * errors["1/N"][0] and errors["1/N"][3] < errors["1/N"][2] < errors["1/N"][1]

# %% [markdown]
# ## 4. Noise schedules and the signal-to-noise ratio
#
# A schedule is alpha_bar_t, the fraction of the signal's variance left at step t; its signal-to-noise ratio is
# SNR_t = alpha_bar_t / (1 - alpha_bar_t), usually drawn as log-SNR. In flow coordinates alpha = 1 - s,
# sigma = s, so the flow schedule at t = 1000 s has SNR = ((1 - s) / s)^2 and the same alpha_bar
# (1 - s)^2 / ((1 - s)^2 + s^2) as a VP schedule.

# %%
T = 1000
steps_axis = torch.arange(T, dtype=torch.float64)
schedules = {
    "SD 1.5 (scaled_linear 0.00085-0.012)": make_betas("scaled_linear", 0.00085, 0.012, T),
    "DDPM (linear 1e-4-0.02)": make_betas("linear", 0.0001, 0.02, T),
    "cosine (squaredcos_cap_v2)": make_betas("squaredcos_cap_v2", 0.0001, 0.02, T),
    "SD 1.5, zero terminal SNR": rescale_zero_terminal_snr(make_betas("scaled_linear", 0.00085, 0.012, T)),
}
alpha_bar_of = {name: torch.cumprod(1 - betas.double(), 0) for name, betas in schedules.items()}
s_axis = (steps_axis + 1) / T  # the flow levels of diffusers' training grid, s = 0.001 ... 1
alpha_bar_of["flow matching (t = 1000 s)"] = (1 - s_axis) ** 2 / ((1 - s_axis) ** 2 + s_axis**2)
for name, values in alpha_bar_of.items():
    print(f"{name:38s} alpha_bar at t = 0: {values[0]:.5f}   at t = 999: {values[-1]:.2e}")
sd_terminal = alpha_bar_of["SD 1.5 (scaled_linear 0.00085-0.012)"][-1].item()
assert 0.0046 < sd_terminal < 0.0048  # SD's "pure noise" keeps sqrt(0.0047) = 6.8% of the signal
assert alpha_bar_of["SD 1.5, zero terminal SNR"][-1] == 0
assert abs(alpha_bar_of["SD 1.5, zero terminal SNR"][0] - alpha_bar_of["SD 1.5 (scaled_linear 0.00085-0.012)"][0]) < 1e-6
assert alpha_bar_of["DDPM (linear 1e-4-0.02)"][-1] < sd_terminal / 100  # DDPM ends 100x closer to pure noise

line_plot({name: (steps_axis.tolist(), values.tolist()) for name, values in alpha_bar_of.items()},
          OUT / "alpha_bar.png", title="alpha_bar_t: the signal left at each training step",
          x_label="training timestep t", y_label="alpha_bar_t")
log_snr = {name: (steps_axis.tolist(), (values / (1 - values)).log().tolist()) for name, values in alpha_bar_of.items()}
line_plot(log_snr, OUT / "log_snr.png", title="log-SNR = log(alpha_bar / (1 - alpha_bar)); -inf (not drawn) at zero SNR",
          x_label="training timestep t", y_label="log-SNR")
print("wrote", OUT / "alpha_bar.png", "and", OUT / "log_snr.png")

# %% [markdown]
# Which timesteps a sampler visits matters as much: SD's PNDM/DDIM config uses "leading" spacing with
# steps_offset = 1, which never visits t = 999: 10 steps start at t = 901, where alpha_bar is 0.011. Lin et al.
# 2023 (Table 2) ask for "trailing" spacing, which starts at t = 999.

# %%
leading = spaced_timesteps("leading", 10, T, steps_offset=1)
trailing = spaced_timesteps("trailing", 10, T)
print("leading, steps_offset 1:", leading.astype(int).tolist())
print("trailing:               ", trailing.astype(int).tolist())
sd_alpha_bar = alpha_bar_of["SD 1.5 (scaled_linear 0.00085-0.012)"]
assert leading[0] == 901 and trailing[0] == 999 and sd_alpha_bar[901] > 2 * sd_alpha_bar[999]

# %% [markdown]
# ### What the leftover signal does
#
# Samplers start from pure noise, x_T = eps. But at t = 999 the model was trained on
# x_T = sqrt(0.0047) x_0 + sqrt(0.9953) eps: 6.8% of the picture is still there, and in a 3 x 16 x 16 picture that
# is enough for the exact model to read it off the "noise". At t = 999 the posterior weighs picture k by
# exp(a x . mu_k - a^2 |mu_k|^2 / 2v): pure noise has no a mu_k in it, so every picture is penalised by its
# a^2 |mu_k|^2 and the ones nearest to mid-grey (smallest |mu_k|) win. Lin et al. 2023 saw this in SD as images
# that are never very bright or very dark; tutorial 05 met the same offset without naming it. We count which of
# the eight pictures the exact ODE (DDIM, 25 trailing steps) lands on, from pure noise and from the noise the
# model was trained on.

# %%
pictures = accuracy.prototype_mixture(16, data_std=0.1, dtype=torch.float64)
picture_means = pictures.means.reshape(len(pictures.means), -1)
brightness = picture_means.mean(1)
count = 800
generator = torch.Generator().manual_seed(3)
noise_pictures = torch.randn(count, 3, 16, 16, generator=generator, dtype=torch.float64)
x0_pictures, _ = pictures.sample_data(count, generator=generator)


def ddim_pictures(model, x_T, **changes):
    """DDIM (eta = 0, 25 trailing steps) from x_T; returns (which picture each lands nearest to, final samples)."""
    scheduler = DDIMScheduler.from_config(config, timestep_spacing="trailing", set_alpha_to_one=True, **changes)
    scheduler.set_timesteps(25)
    x = x_T
    for step_t in scheduler.timesteps:
        x = scheduler.step(model(x, step_t).sample, step_t, x).prev_sample
    nearest = ((x.reshape(len(x), 1, -1) - picture_means[None]) ** 2).sum(-1).argmin(1)
    return nearest, x


a_T, b_T = math.sqrt(sd_terminal), math.sqrt(1 - sd_terminal)
from_pure_noise, samples_pure = ddim_pictures(pictures, noise_pictures)
from_trained_x_T, samples_trained = ddim_pictures(pictures, a_T * x0_pictures + b_T * noise_pictures)
frequency_pure = torch.bincount(from_pure_noise, minlength=8).double() / count
frequency_trained = torch.bincount(from_trained_x_T, minlength=8).double() / count
print("picture |mu_k|^2        ", " ".join(f"{v:5.0f}" for v in picture_means.pow(2).sum(1).tolist()))
print("picture brightness      ", " ".join(f"{v:+.2f}" for v in brightness.tolist()))
print("frequency, pure noise   ", " ".join(f"{v:.3f}" for v in frequency_pure.tolist()))
print("frequency, trained x_T  ", " ".join(f"{v:.3f}" for v in frequency_trained.tolist()), "(each should be 0.125)")
data_brightness = brightness.mean().item()
print(f"mean brightness: data {data_brightness:.3f}, from pure noise {samples_pure.mean():.3f}, "
      f"from trained x_T {samples_trained.mean():.3f}")
strongest, plainest = picture_means.pow(2).sum(1).argmax(), picture_means.pow(2).sum(1).argmin()
# 0.125 each with the trained x_T (standard error ~0.012 at 800 samples); pure noise favours the plain pictures
assert frequency_pure[strongest] < 0.1 and frequency_pure[plainest] > 0.145
assert (frequency_trained - 0.125).abs().max() < 0.04
assert data_brightness - samples_pure.mean().item() > 0.03 > abs(data_brightness - samples_trained.mean().item())

# %% [markdown]
# **Zero terminal SNR** (Lin et al. 2023, Algorithm 1: `rescale_betas_zero_snr=True`) shifts and scales
# sqrt(alpha_bar) so that alpha_bar_999 = 0: pure noise is then exactly what the model was trained on. An
# eps-model cannot work there: at SNR 0 the best guess of eps is x itself (x = eps), which says nothing about
# the picture, and x_0 = (x - sigma eps) / alpha divides by alpha = 0. With v-prediction, v = alpha eps - sigma x_0
# = -x_0 at SNR 0: the model predicts the data's mean, a useful answer. The exact model shows both, and with the
# rescaled schedule and v-prediction the brightness comes back:

# %%
zero_snr = GaussianMixtureDenoiser.from_components(
    pictures.means, data_std=0.1, prediction_type="v_prediction", scheduler_config={**config, "rescale_betas_zero_snr": True}
)
eps_at_zero_snr = GaussianMixtureDenoiser.from_components(
    pictures.means, data_std=0.1, scheduler_config={**config, "rescale_betas_zero_snr": True}
)
x_T = noise_pictures[:4]
assert (eps_at_zero_snr(x_T, 999).sample - x_T).abs().max() < 1e-3  # eps* = x: no information
v_at_zero_snr = zero_snr(x_T, 999).sample
# v* = -E[x_0], the mean picture (to 1e-2: the model's alpha_bar_999 is 2^-24, as Euler's, not exactly 0)
assert (v_at_zero_snr + pictures.means.mean(0)).abs().max() < 1e-2
_, samples_zero_snr = ddim_pictures(zero_snr, noise_pictures, rescale_betas_zero_snr=True, prediction_type="v_prediction")
print(f"zero terminal SNR + v-prediction, from pure noise: mean brightness {samples_zero_snr.mean():.3f} "
      f"(data {data_brightness:.3f})")
assert abs(samples_zero_snr.mean().item() - data_brightness) < 0.03

# %% [markdown]
# ## Summary
#
# - eps, x_0, v and the flow velocity are one denoiser in four coordinates; `parameterization.py` converts.
# - DDIM, Euler in sigma and the flow scheduler's Euler are one update: the flow scheduler is DDIM after
#   x -> x / (alpha + sigma), t -> s = sigma / (alpha + sigma). Flow-matching models differ in what they learned
#   and in the noise levels they visit, not in the step.
# - The exact paths of a data set with more than one point are curved in every coordinate system; one step from
#   pure noise gives the posterior mean. Straight paths (one-step samplers) come from retraining (reflow), not
#   from the coordinates.
# - SD 1.5's schedule ends at alpha_bar = 0.0047, so "pure noise" is not what it was trained on; on the exact
#   model that alone skews the samples towards the plainest, mid-grey pictures (darker on average here). Zero terminal SNR with v-prediction and trailing
#   timesteps removes the offset. The flow schedule reaches SNR 0 at s = 1 by construction.
