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
# # 08 · Train a denoiser and measure it against the exact one
#
# Every course trains a small UNet on a data set and then looks at its samples: do they look like
# the data? What no course can say is *how wrong* the trained network is, and where: it has no
# exact answer to compare with. We have one. The data here is one of our Gaussian mixtures (the
# eight prototype pictures, each blurred with std 0.1 per pixel), whose best possible noise
# prediction E[eps | x_t] is known in closed form (`GaussianMixtureDenoiser`, tutorials 01-04).
#
# So we train a small `UNet2DModel` on samples of that mixture, on a CPU, with the training loop
# of Hugging Face's diffusion-models-class (unit 1), and then
# 1. measure its noise prediction against the exact one at every noise level,
# 2. sample it with a few schedulers, and split the error of the final picture into the
#    network's part and the sampler's part.
#
# **Run it:** `python tutorials/08_train_a_denoiser.py` (minutes on a CPU, most of it training: 335 s
# on 2 heavily shared cores; no weights), or open it as a notebook. Pictures go to
# `tutorials/out/08_train_a_denoiser/`. Every measured claim below is an `assert`, with margins wide
# enough to hold from run to run and machine to machine; what is only suggested to try is said so.

# %%
import time

import torch

import tutorial_helpers as helpers

torch.set_num_threads(1)  # a small network and a shared CPU: one thread is as fast as two
torch.manual_seed(0)  # the network's initial weights, the batches, the timesteps: one reproducible run
OUT = helpers.output_folder("08_train_a_denoiser")

# %% [markdown]
# ## 1. The data: samples of an exact mixture
#
# Eight 16x16 pictures mu_k (circle, square, ..., boat), each the mean of a Gaussian with std 0.1
# per pixel. A training sample is x_0 = mu_k + 0.1 z with k drawn uniformly: the training set is
# endless, every batch fresh. The noise schedule is Stable Diffusion 1.5's (scaled linear betas,
# 1000 timesteps), shared by the exact model, the scheduler that adds the noise and the samplers.

# %%
from minidiff import DDPMScheduler, UNet2DModel
from minidiff.lab import accuracy
from minidiff.lab.prototypes import PROTOTYPE_NAMES, tensor_to_pil
from minidiff.training import EMAModel
from minidiff.viz.grid import image_grid, tile

SIZE = 16
exact = accuracy.prototype_mixture(SIZE, data_std=0.1)  # the exact denoiser: eps*(x_t, t) = E[eps | x_t]
noise_scheduler = DDPMScheduler.from_config(accuracy.SD15_SCHEDULER_CONFIG)
data, components = exact.sample_data(16, generator=torch.Generator().manual_seed(0))
tile([helpers.enlarge(tensor_to_pil(x), 64) for x in data], columns=8).save(OUT / "data.png")
helpers.describe("a batch of data", data)
print("the pictures:", ", ".join(PROTOTYPE_NAMES))

assert data.shape == (16, 3, SIZE, SIZE)

# %% [markdown]
# ## 2. The network: a small `UNet2DModel`
#
# Three resolutions (16, 8, 4), one ResNet block per level, self-attention at the lowest one;
# diffusers' constructor arguments, as in the course.

# %%
net = UNet2DModel(
    sample_size=SIZE,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(16, 32, 64),
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)
num_parameters = sum(p.numel() for p in net.parameters())
print(f"UNet2DModel: {num_parameters / 1e6:.2f}M parameters")

assert 0.3e6 < num_parameters < 1.5e6

# %% [markdown]
# ## 3. The training loop
#
# The course's loop, line for line: draw clean samples, draw noise, draw a random timestep per
# sample, noise the samples with `add_noise` (x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,
# DDPM eq. 4), ask the network for the noise, and take an AdamW step on the mean squared error
# (DDPM's "simple" loss, Ho et al. 2020, arXiv 2006.11239, Algorithm 1). An exponential moving
# average of the weights (`EMAModel`, as diffusers' training scripts keep one) is what we sample
# with: it smooths out the last steps' noise.

# %%
NUM_STEPS, BATCH_SIZE = 400, 32
optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
ema = EMAModel(net.parameters(), decay=0.99)
data_generator = torch.Generator().manual_seed(1)
losses = []

start = time.perf_counter()
net.train()
for step in range(NUM_STEPS):
    clean_images, _ = exact.sample_data(BATCH_SIZE, generator=data_generator)  # (32, 3, 16, 16)
    noise = torch.randn(clean_images.shape)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (BATCH_SIZE,)).long()
    noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)

    noise_pred = net(noisy_images, timesteps, return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(noise_pred, noise)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    ema.step(net.parameters())

    losses.append(loss.item())
    if step % 100 == 0 or step == NUM_STEPS - 1:
        print(f"step {step:5d}  loss (mean of the last 50) {sum(losses[-50:]) / len(losses[-50:]):.4f}")
training_seconds = time.perf_counter() - start
print(f"{NUM_STEPS} steps of batch {BATCH_SIZE} in {training_seconds:.0f} s")

ema.copy_to(net.parameters())  # from here on, the network is the averaged one
net.eval()

assert sum(losses[-100:]) / 100 < sum(losses[:100]) / 100 / 2  # it learned something

# %% [markdown]
# ## 4. How wrong is the network, at each noise level?
#
# On held-out noisy samples x_t (fresh data, fresh noise eps) at a range of timesteps, three
# errors (RMS per pixel):
#
# - the network against the truth, |eps_net - eps|: what the training loss measures;
# - the exact denoiser against the truth, |eps* - eps|: the part of the noise that *cannot* be
#   recovered from x_t (the floor: no network can do better on average, since eps* = E[eps | x_t]);
# - the network against the exact denoiser, |eps_net - eps*|: the network's own error, which
#   only an exact model can show. (The squares add up: |eps_net - eps|^2 = |eps_net - eps*|^2 +
#   |eps* - eps|^2 on average, because eps - eps* is uncorrelated with anything computed from x_t.)

# %%
timesteps_measured = [1, 5, 10, 25, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999]
held_out = torch.Generator().manual_seed(2)
clean, _ = exact.sample_data(512, generator=held_out)
noise = torch.randn(clean.shape, generator=held_out)

sigmas, net_vs_true, exact_vs_true, net_vs_exact = [], [], [], []
for t in timesteps_measured:
    timestep = torch.full((len(clean),), t, dtype=torch.long)
    noisy = noise_scheduler.add_noise(clean, noise, timestep)
    with torch.no_grad():
        eps_net = net(noisy, t).sample
        eps_exact = exact(noisy, t).sample
    sigmas.append(exact.sigma_at(t, 1).item())
    net_vs_true.append(accuracy.rms(eps_net - noise))
    exact_vs_true.append(accuracy.rms(eps_exact - noise))
    net_vs_exact.append(accuracy.rms(eps_net - eps_exact))
    print(
        f"t={t:4d}  sigma={sigmas[-1]:7.3f}   |eps_net - eps| {net_vs_true[-1]:.4f}   "
        f"|eps* - eps| {exact_vs_true[-1]:.4f}   |eps_net - eps*| {net_vs_exact[-1]:.4f}"
    )
error_at = dict(zip(timesteps_measured, net_vs_exact))
floor_at = dict(zip(timesteps_measured, exact_vs_true))

# The squares add up (to the sampling noise of 512 held-out samples):
for total, own, floor in zip(net_vs_true, net_vs_exact, exact_vs_true):
    assert abs(total**2 - (own**2 + floor**2)) < 0.03 * total**2, (total, own, floor)
print("|eps_net - eps|^2 = |eps_net - eps*|^2 + |eps* - eps|^2 at every t, to 3%")

from minidiff.viz.plotting import loglog_plot

loglog_plot(
    {
        "network vs exact |eps_net - eps*|": (sigmas, net_vs_exact),
        "network vs true noise |eps_net - eps|": (sigmas, net_vs_true),
        "exact vs true noise |eps* - eps| (the floor)": (sigmas, exact_vs_true),
    },
    OUT / "eps_error_vs_sigma.png",
    title=f"Trained UNet ({num_parameters / 1e6:.2f}M, {NUM_STEPS} steps) vs the exact denoiser",
    x_label="noise level sigma",
    y_label="RMS error of the noise prediction",
    dashed=("exact vs true noise |eps* - eps| (the floor)",),
    guide_orders=(),
)
print("wrote", OUT / "eps_error_vs_sigma.png")

# %% [markdown]
# What the curves show (measured with 400 training steps; the asserts keep wide margins):
#
# - **The floor.** At large sigma the data is a small part of x_t and the noise almost all of it:
#   eps* recovers eps nearly exactly, the floor is low (~0.04). At small sigma the picture is almost
#   all of x_t, and the noise is a tiny perturbation of a picture which itself varies by 0.1 per
#   pixel: the 0.1 z of the data and the sigma eps of the noise look alike, and eps* can only guess
#   their split. The floor rises towards 1 (knowing nothing about eps).
# - **The network, in eps.** Its error against eps* is largest at small sigma (~0.2-0.25 for
#   t <= 50): there eps* = (x_t - a x0*) / b divides the small residual of the picture by a small
#   b, so to predict the noise the network must know the picture to a precision of b. The training
#   loss hardly sees that error, because |eps_net - eps| is dominated by the floor there, which no
#   training removes.
# - **The network, relative to the floor.** At large sigma its error (~0.12) is 3x the floor:
#   eps* is nearly x_t itself there, and 400 steps have not taught it that near-identity to better
#   than ~0.1. Turned into a prediction of the picture, x0 = (x_t - b eps) / a, that error is
#   multiplied by sigma: at t=999 the network's x0 is more than 1 per pixel off. It hurts little
#   when sampling, because each step's update at large sigma is (x - x0) / sigma: the same
#   division undoes it.

# %%
small, large = [t for t in timesteps_measured if t <= 50], [t for t in timesteps_measured if t >= 600]
print(f"network error: at t <= 50 {max(error_at[t] for t in small):.3f} (worst), at t >= 600 {max(error_at[t] for t in large):.3f} (worst)")
x0_error_at = {t: sigma * error for t, sigma, error in zip(timesteps_measured, sigmas, net_vs_exact)}  # |x0_net - x0*|
print(f"network error in x0: at t=1 {x0_error_at[1]:.3f}, at t=999 {x0_error_at[999]:.3f}")

assert all(floor_at[t] > 0.35 for t in small)  # little sigma: much of eps is unknowable
assert all(floor_at[t] < 0.1 for t in large)  # large sigma: eps* is almost all of eps
assert max(error_at[t] for t in small) > 1.3 * max(error_at[t] for t in large)  # in eps, worst at small sigma
assert all(error_at[t] > 1.5 * floor_at[t] for t in large)  # at large sigma, far above what is possible
assert x0_error_at[999] > 10 * x0_error_at[1] and x0_error_at[999] > 1  # in x0, worst at large sigma: > 1 per pixel
assert all(error_at[t] < 0.5 for t in timesteps_measured)  # but it learned the rough shape everywhere

# %% [markdown]
# ## 5. Sampling: the network's error and the sampler's error
#
# Now sample with three deterministic schedulers (DDIM, DPM-Solver++ 2M, Euler; 20 steps each,
# SD 1.5 defaults), from the same 16 starting noises, once with the trained network and once with
# the exact denoiser. The exact probability-flow ODE from the same start (tutorial 04) is the
# answer both try to reach. Then, per scheduler, three distances (RMS per pixel):
#
# - **sampler error**: exact denoiser + scheduler vs the exact ODE: the scheduler's discretization
#   alone (tutorial 04's measurement);
# - **network error**: network + scheduler vs exact denoiser + scheduler: what the network's
#   mistakes cost, with the sampler held fixed;
# - **total error**: network + scheduler vs the exact ODE.

# %%
samplers = [
    accuracy.SchedulerSetup("DDIM", "DDIMScheduler", step_kwargs={"eta": 0.0}),
    accuracy.SchedulerSetup("DPM++ 2M", "DPMSolverMultistepScheduler", {"solver_order": 2}),
    accuracy.SchedulerSetup("Euler", "EulerDiscreteScheduler"),
]
start_noise = torch.randn(16, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
split, finals = {}, {}
for setup in samplers:
    with torch.no_grad():
        _, with_net = accuracy.run_scheduler(accuracy.make_scheduler(setup), net, start_noise, 20, setup.step_kwargs)
    scheduler = accuracy.make_scheduler(setup)
    initial, with_exact = accuracy.run_scheduler(scheduler, exact, start_noise, 20, setup.step_kwargs)
    ode = accuracy.reference_endpoint(scheduler, exact, initial).float()
    split[setup.label] = {
        "sampler": accuracy.rms(with_exact - ode),
        "network": accuracy.rms(with_net - with_exact),
        "total": accuracy.rms(with_net - ode),
    }
    finals[setup.label] = (with_net, with_exact)
    print(f"{setup.label:9s}  " + "   ".join(f"{part} error {value:.4f}" for part, value in split[setup.label].items()))

# %% [markdown]
# At 20 steps the network's error is the larger part for every scheduler: about 3 times DDIM's
# sampler error, and more than 10 times Euler's and DPM++ 2M's. With this network a better scheduler
# changes the pictures little: the total error stays within 10% of the network's part alone. (Tutorial 04
# ranks the schedulers by their own error; that ranking only matters once the model is good enough.)
#
# Note the sampler errors themselves: Euler's is *smaller* than DPM++ 2M's here, the reverse of
# tutorial 04's 2-D mixture. Both end with the same kind of step, from sigma_min = 0.029 to 0, which
# lands on D(x, sigma_min); with pictures that vary by only 0.1 per pixel, that one step's error is of
# the size of the whole: told to stop at sigma_min instead (`final_sigmas_type="sigma_min"`), DPM++ 2M
# is more than 3 times closer to the exact ODE at sigma_min than it is, with the last step, at 0. Which sampler
# wins at 20 steps depends on the data, not on the order alone.

# %%
sigma_min_setup = accuracy.SchedulerSetup("DPM++ 2M sigma_min", "DPMSolverMultistepScheduler",
                                          {"solver_order": 2, "final_sigmas_type": "sigma_min"})
scheduler = accuracy.make_scheduler(sigma_min_setup)
initial, stopped = accuracy.run_scheduler(scheduler, exact, start_noise, 20)
sampler_error_at_sigma_min = accuracy.rms(stopped - accuracy.reference_endpoint(scheduler, exact, initial).float())
print(f"DPM++ 2M stopping at sigma_min: sampler error {sampler_error_at_sigma_min:.4f}; "
      f"network / sampler error: " + ", ".join(f"{label} {parts['network'] / parts['sampler']:.1f}" for label, parts in split.items()))

for label, parts in split.items():
    assert parts["network"] > 2.5 * parts["sampler"], (label, parts)
    assert abs(parts["total"] - parts["network"]) < 0.1 * parts["network"], (label, parts)
for label in ("Euler", "DPM++ 2M"):
    assert split[label]["network"] > 10 * split[label]["sampler"], label
assert split["Euler"]["sampler"] < split["DPM++ 2M"]["sampler"]  # the reverse of tutorial 04
assert sampler_error_at_sigma_min < split["DPM++ 2M"]["sampler"] / 3

# %% [markdown]
# Do the samples still *look* right? For each sample, the nearest of the eight pictures and the
# RMS distance to it. Measured: the exact denoiser's samples sit within the data's 0.1 (0.04-0.07);
# after 400 training steps the network's are ~0.5-0.6 away: blurs and mixtures of pictures, not
# yet the data. (To try, not measured here: train longer, e.g. NUM_STEPS = 4000, ten times the
# training time, and see whether the network's part shrinks.)

# %%
means = exact.means


def distance_to_nearest(samples: torch.Tensor) -> torch.Tensor:
    """RMS distance of each sample to the nearest of the eight pictures, (N,)."""
    return (samples[:, None] - means[None]).pow(2).mean(dim=(2, 3, 4)).sqrt().min(dim=1).values


for label, (with_net, with_exact) in finals.items():
    print(
        f"{label:9s}  median distance to the nearest picture: network {distance_to_nearest(with_net).median():.3f}, "
        f"exact {distance_to_nearest(with_exact).median():.3f}"
    )

rows = [[tensor_to_pil(x) for x in finals["DPM++ 2M"][0][:8]], [tensor_to_pil(x) for x in finals["DPM++ 2M"][1][:8]]]
image_grid(
    rows, ["trained network", "exact denoiser"], [f"#{i}" for i in range(8)], OUT / "samples.png",
    title="DPM++ 2M, 20 steps, same starting noise", scale=4,
)
print("wrote", OUT / "samples.png")

for label, (with_net, with_exact) in finals.items():
    assert distance_to_nearest(with_exact).median() < 0.1  # within the data's spread
    assert 0.4 < distance_to_nearest(with_net).median() < 0.7  # ~0.5-0.6: not yet the data
