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
# # 05 · Classifier-free guidance, measured
#
# Stable Diffusion runs the UNet twice per step, with the prompt and with the empty prompt, and
# combines the two noise predictions with the guidance line (Ho & Salimans 2022, arXiv 2207.12598):
#
#     eps_guided = eps_uncond + s * (eps_cond - eps_uncond)
#
# s = 1 is the plain conditional model; SD's default s = 7.5 goes far past it. Ho & Salimans write
# the line as (1 + w) eps_cond - w eps_uncond (their eq. 6): our s (diffusers' `guidance_scale`) is
# their 1 + w, so their w = 0 is s = 1, and SD's 7.5 is their w = 6.5. What does that do to
# the distribution of samples? With a trained model one can only look at pictures. With the *exact*
# conditional and unconditional predictions of a Gaussian mixture, it can be measured.
#
# **Run it:** `python tutorials/05_classifier_free_guidance.py` (a few seconds, no weights), or
# open it as a notebook. Pictures go to `tutorials/out/05_classifier_free_guidance/`.

# %%
import torch

import tutorial_helpers as helpers

torch.set_num_threads(1)  # small tensors: more threads only add overhead on a shared CPU
OUT = helpers.output_folder("05_classifier_free_guidance")

# %% [markdown]
# ## 1. Exact conditional and unconditional predictions
#
# The 2-D mixture of tutorial 04: four Gaussians of std 1 with weights 0.4, 0.3, 0.2 and 0.1, each
# component its own class. "The prompt" is class c = 2, the component at (0, 2) with weight 0.2.
# `class_labels=2` restricts the mixture to that class: the exact eps_cond. `class_labels=-1` is
# the whole mixture: the exact eps_uncond. As in SD, both go through the model as one batch.

# %%
from minidiff.lab import accuracy

model = accuracy.mixture_2d(torch.float64)  # GaussianMixtureDenoiser on SD 1.5's noise schedule
means = model.means.reshape(-1, 2)
c = 2
print("class", c, "is the component at", means[c].tolist())

t = torch.tensor(700)
x_t = torch.tensor([[0.5], [-0.3]], dtype=torch.float64).reshape(1, 2, 1, 1)  # one noisy point at t = 700
eps_uncond, eps_cond = model(torch.cat([x_t, x_t]), t, class_labels=torch.tensor([-1, c])).sample.chunk(2)
a, b = (value.item() for value in model.vp_coefficients(t, 1))  # x_t = a x_0 + b eps
for scale in (0, 1, 3, 7.5):
    eps_guided = eps_uncond + scale * (eps_cond - eps_uncond)
    x0_guided = (x_t - b * eps_guided) / a  # the x_0 the guided prediction implies
    print(f"s = {scale:3}: eps = {eps_guided.flatten().numpy().round(3)}, "
          f"implied x_0 = {x0_guided.flatten().numpy().round(2)}")

# %% [markdown]
# The guided noise is the noise of a *tilted* density: since eps = -b * grad log p_t(x),
#
#     eps_uncond + s (eps_cond - eps_uncond) = -b * grad log [ p_t(x | c)^s  p_t(x)^(1 - s) ]
#
# so at every noise level, guidance follows the score of p_t(x|c)^s p_t(x)^(1-s), which for s > 1
# favours the places where the class is *likely*, p_t(c|x) = p_t(x|c) p(c) / p_t(x), raised to the
# power s - 1. We check that identity with autograd on the exact log-densities.

# %%
x = x_t.clone().requires_grad_(True)
log_tilted = 7.5 * model.log_prob(x, a, b, class_labels=torch.tensor(c)) + (1 - 7.5) * model.log_prob(x, a, b)
(score_tilted,) = torch.autograd.grad(log_tilted.sum(), x)
eps_guided = eps_uncond + 7.5 * (eps_cond - eps_uncond)
print("guided eps:", eps_guided.flatten().numpy(), "  -b * grad log tilted:", (-b * score_tilted).flatten().numpy())

assert torch.allclose(eps_guided, -b * score_tilted, atol=1e-10)  # float64: exact up to rounding

# %% [markdown]
# ## 2. Sampling with guidance
#
# The loop of tutorial 02, with the exact model in place of the UNet and DPM-Solver++ 2M (50
# steps): the batch is [uncond; cond], the guidance line combines the halves. 4000 samples per
# scale, from the same starting noise.

# %%
from minidiff import DPMSolverMultistepScheduler


def sample_with_guidance(guidance_scale: float, noise: torch.Tensor, num_inference_steps: int = 50) -> torch.Tensor:
    """SD's guided loop on the exact model: returns (N, 2) samples of class c."""
    scheduler = DPMSolverMultistepScheduler.from_config(accuracy.SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(num_inference_steps)
    labels = torch.cat([torch.full((len(noise),), -1), torch.full((len(noise),), c)])  # [uncond; cond]
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)  # (2N, 2, 1, 1)
        noise_pred_uncond, noise_pred_cond = model(model_input, t, class_labels=labels).sample.chunk(2)
        noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_cond - noise_pred_uncond)
        latents = scheduler.step(noise_pred, t, latents).prev_sample
    return latents.reshape(-1, 2)


def fraction_of_class(points: torch.Tensor) -> float:
    """How many samples the exact posterior p(class | x) assigns to class c rather than to another."""
    responsibilities = model.posterior(points.reshape(-1, 2, 1, 1), 1.0, 0.0).responsibilities  # (N, 4)
    return (responsibilities.argmax(dim=1) == c).double().mean().item()


noise = torch.randn(4000, 2, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
scales = (1, 3, 7.5, 15)
samples = {0: sample_with_guidance(0, noise)}  # s = 0: the unconditional model alone, for comparison
samples.update({scale: sample_with_guidance(scale, noise) for scale in scales})
exact_conditional, _ = model.sample_data(4000, generator=torch.Generator().manual_seed(1), class_labels=torch.tensor(c))
exact_conditional = exact_conditional.reshape(-1, 2)

print(f"{'':22s}{'mean':>18s}{'std':>18s}{'of class c':>12s}")
rows = {"exact p(x | c)": exact_conditional, **{f"s = {scale}": points for scale, points in samples.items()}}
for name, points in rows.items():
    mean, spread = str(points.mean(0).numpy().round(3)), str(points.std(0).numpy().round(3))
    print(f"{name:22s}{mean:>18s}{spread:>18s}{fraction_of_class(points):>12.3f}")

# %% [markdown]
# - s = 1 samples the conditional distribution: std 1, the right share of points in the class's
#   region. (The mean sits 0.1-0.2 below (0, 2): SD's schedule keeps a little signal at t = 999,
#   alpha = 0.068, so the true x_T of class c is centred at 0.068 * (0, 2), not at 0; the sampler
#   starts from N(0, I) and carries that offset to the end.)
# - As s grows, every sample lands in the class's region, the spread shrinks (std about 0.5 at
#   s = 3, 0.2-0.4 at 7.5), and the whole cloud is pushed *away from the other classes*: its mean
#   climbs from y = 1.8 to 3.1, 4.4 and 5.6. Guidance does not just pick the class; it exaggerates
#   what separates the class from the rest.

# %%
std = {scale: points.std(0) for scale, points in samples.items()}
mean_y = {scale: points[:, 1].mean().item() for scale, points in samples.items()}
fraction = {scale: fraction_of_class(points) for scale, points in samples.items()}

assert (std[1] - 1).abs().max() < 0.05  # s = 1: the conditional spread
assert abs(fraction[1] - fraction_of_class(exact_conditional)) < 0.03
assert (samples[1].mean(0) - means[c]).norm() < 0.25
for smaller, larger in zip(scales, scales[1:]):
    assert (std[larger] < std[smaller]).all() and mean_y[larger] > mean_y[smaller]
    assert fraction[larger] >= fraction[smaller]
assert fraction[3] > 0.99 and std[7.5].max() < 0.5

# %% [markdown]
# ## 3. Guidance does not sample the tilted distribution
#
# Since guidance follows the score of p_t(x|c)^s p_t(x)^(1-s) at every noise level, one might
# expect its samples to follow p_0(x|c)^s p_0(x)^(1-s). They do not: the family of tilted densities
# is not the noising of any one distribution, so the sampler never follows one path of marginals
# (see e.g. Chidambaram et al. 2024, arXiv 2403.01639; Bradley & Nakkiran 2024, arXiv 2408.09000).
# The tilted density at t = 0 is known here, so its mean and std can be computed on a fine grid.

# %%
grid = torch.linspace(-10, 14, 481, dtype=torch.float64)
points = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), dim=-1).reshape(-1, 2, 1, 1)  # (481^2, 2, 1, 1)
log_cond = model.log_prob(points, 1.0, 0.0, class_labels=torch.tensor(c))
log_uncond = model.log_prob(points, 1.0, 0.0)
tilted = {}
for scale in scales:
    weights = torch.softmax(scale * log_cond + (1 - scale) * log_uncond, dim=0)  # the tilted density on the grid
    mean = weights @ points.reshape(-1, 2)
    tilted[scale] = (mean, (weights @ (points.reshape(-1, 2) - mean) ** 2).sqrt())
    print(f"s = {scale:4}: tilted p_0 mean {mean.numpy().round(2)}, std {tilted[scale][1].numpy().round(2)};   "
          f"guided samples mean {samples[scale].mean(0).numpy().round(2)}, std {std[scale].numpy().round(2)}")

assert (tilted[1][1] - 1).abs().max() < 1e-3  # s = 1: the tilted density is p(x | c) itself
assert (std[7.5] < 0.6 * tilted[7.5][1]).all()  # guidance concentrates far more (0.24, 0.43 vs 0.70, 0.81)
assert mean_y[7.5] > tilted[7.5][0][1] + 1  # and pushes much further away from the other classes

# %% [markdown]
# Pictured: the unconditional samples, and the guided ones at each scale (crosses: the four
# components' means; class c is the one at (0, 2)).

# %%
panels = {"s = 0 (unconditional)": samples[0], **{f"s = {scale}": samples[scale] for scale in scales}}
helpers.draw_scatter_panels(panels, OUT / "guidance_scales.png", bounds=(-6, 6, -4, 8), marks=means)
print("wrote", OUT / "guidance_scales.png")

# %% [markdown]
# ## 4. On pictures: guidance acts while the class is undecided
#
# The eight 32x32 pictures of tutorial 01, now in two classes: "shapes" (circle, square, triangle,
# smiley) and "scenes" (house, tree, mountain, boat). We ask for a scene. Left columns: the x_0
# that the guided prediction implies at t = 999 and t = 759. At t = 999 the two predictions differ
# by a few percent, but x_0 = (x_t - b eps) / a divides by a = 0.068: guidance with s = 7.5 turns
# that small difference into an x_0 far outside the picture range [-1, 1], the over-saturation SD
# shows at high guidance. Then the class is decided, eps_cond = eps_uncond, and guidance no longer
# does anything: the final pictures barely differ across scales.

# %%
from minidiff.lab.gaussian_mixture import GaussianMixtureDenoiser
from minidiff.lab.prototypes import PROTOTYPE_NAMES, prototype_means, tensor_to_pil
from minidiff.viz.grid import image_grid

pictures = prototype_means(32)
SHAPES, SCENES = 0, 1
picture_model = GaussianMixtureDenoiser.from_components(
    pictures, component_classes=torch.tensor([SHAPES] * 4 + [SCENES] * 4), data_std=0.1,
    scheduler_config=accuracy.SD15_SCHEDULER_CONFIG,
)
labels = torch.tensor([-1, SCENES])  # [uncond; cond]
picture_noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
grid_rows, outside_range, relative_difference, final_picture = [], {}, {}, {}
for scale in scales:
    scheduler = DPMSolverMultistepScheduler.from_config(accuracy.SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(25)
    latents, row, differences = picture_noise.clone(), [], []
    for step_index, t in enumerate(scheduler.timesteps):
        noise_pred = picture_model(torch.cat([latents] * 2), t, class_labels=labels).sample
        noise_pred_uncond, noise_pred_cond = noise_pred.chunk(2)
        differences.append(((noise_pred_cond - noise_pred_uncond).norm() / noise_pred_uncond.norm()).item())
        output = scheduler.step(noise_pred_uncond + scale * (noise_pred_cond - noise_pred_uncond), t, latents)
        if step_index == 0:
            outside_range[scale] = (output.pred_original_sample.abs() > 1).float().mean().item()
        if step_index in (0, 6):
            row.append(tensor_to_pil(output.pred_original_sample[0]))
        latents = output.prev_sample
    row.append(tensor_to_pil(latents[0]))
    grid_rows.append(row)
    relative_difference[scale] = differences
    distances = (latents - pictures).pow(2).mean(dim=(1, 2, 3)).sqrt()
    final_picture[scale] = PROTOTYPE_NAMES[distances.argmin()]
    print(f"s = {scale:4}: x_0 at t=999 outside [-1, 1]: {outside_range[scale]:6.1%};  "
          f"final picture: {final_picture[scale]}")
print("|eps_cond - eps_uncond| / |eps_uncond| at the first 5 steps:", [f"{d:.2g}" for d in relative_difference[1][:5]])
image_grid(grid_rows, [f"s = {scale}" for scale in scales], ["x0 at t=999", "x0 at t=759", "final sample"],
           OUT / "guidance_on_pictures.png", title='Asking for a "scene", same noise', scale=3)
print("wrote", OUT / "guidance_on_pictures.png")

assert outside_range[1] == 0 and outside_range[3] < outside_range[7.5] < outside_range[15] and outside_range[7.5] > 0.5
assert relative_difference[1][0] > 0.01 and max(relative_difference[1][5:]) < 1e-6  # decided within 5 of 25 steps
assert all(PROTOTYPE_NAMES.index(name) >= 4 for name in final_picture.values())  # always a scene
