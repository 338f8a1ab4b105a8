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
# # 12 · Inpainting, measured
#
# Inpainting repaints the white part of a mask and keeps the black part. With an ordinary Stable Diffusion
# UNet it is done by changing the loop, not the model: after every step the kept pixels are overwritten by
# the original picture, noised to the current level (the "blend"). Does that sample the right thing? On
# real pictures nobody can say, because nobody knows the true distribution of completions. On the exact
# picture mixture of tutorials 04-09 we do:
#
# 1. the **exact conditional** p(x_0 | kept pixels), in closed form;
# 2. three samplers that only call the denoiser, from the same noise: the **blend** (what
#    `StableDiffusionInpaintPipeline` does with a 4-channel UNet), **RePaint**'s resampling (Lugmayr et al.
#    2022), and **reconstruction guidance** (DPS, Chung et al. 2023), measured against the truth;
# 3. the **9-channel inpainting model**'s idea: a denoiser that sees the mask samples the conditional
#    directly, with no blend;
# 4. `StableDiffusionInpaintPipeline` on tiny random weights (shapes, `padding_mask_crop`, the paste-back),
#    and on real ones with `MINIDIFF_SD15` and `MINIDIFF_SD15_INPAINTING`.
#
# **Run it:** `python tutorials/12_inpainting_measured.py` (about a minute, no weights). Pictures go to
# `tutorials/out/12_inpainting_measured/`.

# %%
import torch

import tutorial_helpers as helpers

torch.set_num_threads(1)  # small tensors: more threads only add overhead on a shared CPU
OUT = helpers.output_folder("12_inpainting_measured")

# %% [markdown]
# ## 1. The exact conditional
#
# The data is a mixture of eight 16x16 pictures, p(x_0) = sum_k pi_k N(mu_k, s^2 I) with s = 0.1. Observe
# the kept pixels O of a picture, x_0[O] = y. Each component is an isotropic Gaussian, so its pixels are
# independent: the kept ones say *which picture* it is, and nothing else about the repainted ones U.
# Bayes' rule gives
#
#     w_k = p(k | y) = softmax_k( log pi_k - |y - mu_k[O]|^2 / (2 s^2) )
#     x_0[U] | y ~ sum_k w_k N(mu_k[U], s^2 I)
#
# (`minidiff.lab.inpainting.exact_conditional`; tests/test_lab_inpainting.py checks it against a brute-force
# integration of the full density). Three cases: only the bottom two rows (grass) of a tree are kept, which
# the house shares; the left half of a house is kept; a hole in the middle of a house.

# %%
from minidiff.lab import accuracy
from minidiff.lab.inpainting import exact_conditional, sample_exact_conditional
from minidiff.lab.prototypes import PROTOTYPE_NAMES, tensor_to_pil

SIZE = 16
model = accuracy.prototype_mixture(SIZE)  # GaussianMixtureDenoiser: 8 pictures, s = 0.1
pictures = model.means + 0.1 * torch.randn(model.means.shape, generator=torch.Generator().manual_seed(0))  # one draw each
HOUSE, TREE = PROTOTYPE_NAMES.index("house"), PROTOTYPE_NAMES.index("tree")

grass = torch.ones(SIZE, SIZE)
grass[-2:, :] = 0  # 1 = repaint, 0 = keep
right = torch.zeros(SIZE, SIZE)
right[:, SIZE // 2 :] = 1
hole = torch.zeros(SIZE, SIZE)
hole[4:12, 4:12] = 1
CASES = {"grass kept": (pictures[TREE], grass), "left half kept": (pictures[HOUSE], right), "hole": (pictures[HOUSE], hole)}

exact = {name: exact_conditional(model, known, mask) for name, (known, mask) in CASES.items()}
for name, conditional in exact.items():
    likely = {PROTOTYPE_NAMES[k]: round(w, 3) for k, w in enumerate(conditional.weights.tolist()) if w > 1e-3}
    print(f"{name:15s} posterior weights: {likely}")

assert abs(exact["grass kept"].weights[HOUSE] - 0.5) < 0.1 and abs(exact["grass kept"].weights[TREE] - 0.5) < 0.1
assert exact["left half kept"].weights[HOUSE] > 0.999 and exact["hole"].weights[HOUSE] > 0.999

# %% [markdown]
# With only the grass kept, a perfect inpainter makes a house about half the time and a tree the other half;
# with half a house kept, always a house. Samples of the truth (`sample_exact_conditional`):

# %%
N = 96
truth = {name: sample_exact_conditional(model, known, mask, N, torch.Generator().manual_seed(3))[0]
         for name, (known, mask) in CASES.items()}
grass_truth = truth["grass kept"]
landed_truth = torch.bincount(((grass_truth[:, None] - model.means[None]) ** 2).flatten(2).sum(2).argmin(1), minlength=8)
print("exact samples, grass kept: houses", int(landed_truth[HOUSE]), "trees", int(landed_truth[TREE]), "of", N)
assert int(landed_truth[HOUSE] + landed_truth[TREE]) == N and 0.35 < float(landed_truth[HOUSE]) / N < 0.65

# %% [markdown]
# ## 2. Three samplers against the truth, from the same noise
#
# * **blend** (`blend_inpaint`): DDIM, and after each step `x = m * x + (1 - m) * add_noise(y, eps, t_next)`
#   with the starting noise eps: the 4-channel pipeline's loop, line for line.
# * **RePaint** (`repaint_inpaint`, r = 1 and r = 5): ancestral DDPM steps, the kept pixels noised with fresh
#   noise, and each step done r times, jumping back one level in between so the repainted region is denoised
#   again knowing what the kept region became.
# * **guided** (`guided_inpaint`): DDIM plus a step down the gradient of |y - x0_hat(x_t)[O]|, pasting y at the end.
#
# `measure` reports: the share of samples landing on a picture the kept pixels rule out ("impossible"), the
# total variation between landings and the posterior weights, the error of the per-pixel mean of the filled
# region, the ratio of its per-pixel spread to the exact one, and the **seam jump**: the mean difference
# between neighbouring pixels across the mask's edge.

# %%
from minidiff.lab.inpainting import blend_inpaint, guided_inpaint, measure, repaint_inpaint

METHODS = {
    "blend": lambda known, mask, noise, steps: blend_inpaint(model, known, mask, noise, steps),
    "RePaint r=1": lambda known, mask, noise, steps: repaint_inpaint(model, known, mask, noise, steps, 1, torch.Generator().manual_seed(2)),
    "RePaint r=5": lambda known, mask, noise, steps: repaint_inpaint(model, known, mask, noise, steps, 5, torch.Generator().manual_seed(2)),
    "guided": lambda known, mask, noise, steps: guided_inpaint(model, known, mask, noise, steps),
}
STEPS = (10, 25)
noise = torch.randn((N, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(1))  # the same for every method
reports, samples = {}, {}
for case, (known, mask) in CASES.items():
    reports[case, "exact", None] = measure(model, truth[case], known, mask)
    for method, run in METHODS.items():
        for steps in STEPS:
            samples[case, method, steps] = run(known, mask, noise, steps)
            reports[case, method, steps] = measure(model, samples[case, method, steps], known, mask)

print("| case | method | steps | impossible | total variation | mean error | spread ratio | seam jump |")
print("|---|---|---|---|---|---|---|---|")
for (case, method, steps), r in reports.items():
    print(f"| {case} | {method} | {steps or '-'} | {r.impossible:.2f} | {r.total_variation:.2f} | {r.mean_error:.3f} | "
          f"{r.spread_ratio:.2f} | {r.seam_jump:.3f} |")

# %% [markdown]
# What the table says (asserted below, so a change that breaks a claim fails the tutorial):
#
# * **The blend lands on impossible pictures**, in every case, and more steps do not help: its repainted
#   region commits to a picture while it is still mostly noise, seeing the kept region only through a
#   denoiser that also trusts that noise. Its seam jump is far above the truth's: the two sides of the seam
#   belong to different pictures.
# * **RePaint's resampling fixes it where the kept region is informative** (half a house, a hole): at r = 5
#   almost every sample is a house. Plain ancestral sampling (r = 1) already helps: fresh noise each step.
# * **No sampler gets the ambiguous case right**: with only the grass kept, the blend and RePaint spread
#   their samples over pictures with no grass; guidance with enough steps comes closest.

# %%
def report(case, method, steps):
    return reports[case, method, steps]


for case in CASES:
    exact_jump = report(case, "exact", None).seam_jump
    assert report(case, "exact", None).total_variation < 3 * (0.25 / N) ** 0.5  # sampling error only (3 standard errors)
    for steps in STEPS:
        assert report(case, "blend", steps).impossible > 0.3, (case, steps)
        assert report(case, "RePaint r=5", steps).total_variation < report(case, "blend", steps).total_variation
    assert report(case, "blend", STEPS[-1]).impossible > report(case, "blend", STEPS[0]).impossible - 0.1  # steps don't help
for case in ("grass kept", "left half kept"):
    assert report(case, "blend", STEPS[-1]).seam_jump > 1.5 * report(case, "exact", None).seam_jump
for case in ("left half kept", "hole"):
    assert report(case, "RePaint r=5", STEPS[-1]).impossible < 0.05
    assert report(case, "RePaint r=1", STEPS[-1]).impossible < report(case, "blend", STEPS[-1]).impossible
assert abs(report("left half kept", "RePaint r=5", STEPS[-1]).seam_jump / report("left half kept", "exact", None).seam_jump - 1) < 0.2
assert report("grass kept", "guided", STEPS[-1]).total_variation < min(
    report("grass kept", method, STEPS[-1]).total_variation for method in ("blend", "RePaint r=1", "RePaint r=5"))

# %% [markdown]
# Where the blend goes wrong: the error of its per-pixel mean by distance from the kept region. It is not
# confined to the seam; the whole repainted region is another picture.

# %%
for case in CASES:
    by_distance = report(case, "blend", STEPS[-1]).mean_error_by_distance
    print(f"{case:15s} blend's mean error by distance from the kept pixels:",
          {distance: round(error, 3) for distance, error in by_distance.items()},
          "(exact samples:", round(report(case, "exact", None).mean_error, 3), ")")

# %% [markdown]
# The picture: for each case, the kept pixels (the repainted ones grey), then eight samples of each method,
# all from the same eight noises.

# %%
from minidiff.viz.grid import image_grid


def show(x):
    return helpers.enlarge(tensor_to_pil(x), 64)


rows, labels = [], []
for case, (known, mask) in CASES.items():
    shown = known * (1 - mask) + mask * 0.0
    for method in ("exact", *METHODS):
        batch = truth[case] if method == "exact" else samples[case, method, STEPS[-1]]
        rows.append([show(shown)] + [show(x) for x in batch[:8]])
        labels.append(f"{case}: {method}")
image_grid(rows, row_labels=labels, column_labels=["kept"] + [f"noise {i}" for i in range(8)],
           path=OUT / "methods.png", scale=1)
print("wrote", OUT / "methods.png")

# %% [markdown]
# ## 3. The 9-channel model: a denoiser that sees the mask
#
# SD 1.5 inpainting (Rombach et al. 2022) was fine-tuned with 5 more input channels: the mask and the VAE
# latents of the masked picture. It is trained to predict the noise of x_t *given* them, so a perfect one
# is the exact denoiser of p(x_0 | y), and plain sampling from it needs no blend. On the mixture that
# denoiser is known: `conditional_model` builds it (weights w_k, means mu_k on U and y on O). DDIM with it,
# from the same noise:

# %%
from minidiff import DDIMScheduler
from minidiff.lab.inpainting import conditional_model

nine_channel = {}
for case, (known, mask) in CASES.items():
    scheduler = DDIMScheduler.from_config(accuracy.SD15_SCHEDULER_CONFIG)
    _, sampled = accuracy.run_scheduler(scheduler, conditional_model(model, known, mask), noise, STEPS[-1])
    nine_channel[case] = measure(model, mask * sampled + (1 - mask) * known, known, mask)
    print(f"{case:15s} conditional denoiser, DDIM {STEPS[-1]} steps: impossible {nine_channel[case].impossible:.2f}, "
          f"total variation {nine_channel[case].total_variation:.2f}, seam jump {nine_channel[case].seam_jump:.3f}")
    assert nine_channel[case].impossible < 0.02 and nine_channel[case].total_variation < 0.12
    assert nine_channel[case].total_variation < report(case, "blend", STEPS[-1]).total_variation

# %% [markdown]
# ## 4. `StableDiffusionInpaintPipeline`
#
# The same two ideas in SD's latent space. The pipeline picks the path from `unet.config.in_channels`:
# 4 (blend after each `scheduler.step`) or 9 (conv_in takes `cat([latents, mask, masked_image_latents])`).
# Tiny random weights make noise, but every shape is real; the kept pixels come back exactly only with
# `padding_mask_crop`, whose `apply_overlay` pastes the original over the result (diffusers does not
# paste back otherwise: the VAE's round trip changes kept pixels slightly).

# %%
import numpy as np
from PIL import Image, ImageDraw

from minidiff import StableDiffusionInpaintPipeline

tiny_inpainting = helpers.output_folder("tiny-random-sd15-inpainting")
if not (tiny_inpainting / "model_index.json").is_file():
    helpers.load_weights_script("make_random_sd15").make_random_sd15(tiny_inpainting, tiny=True, inpainting=True)

photo = Image.fromarray((np.random.default_rng(0).random((64, 80, 3)) * 255).astype("uint8"))
mask_image = Image.new("L", photo.size, 0)
ImageDraw.Draw(mask_image).rectangle((24, 16, 55, 47), fill=255)

for folder in (helpers.tiny_sd15_folder(), tiny_inpainting):
    pipe = StableDiffusionInpaintPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    helpers.describe(f"{pipe.unet.config.in_channels}-channel UNet, conv_in.weight", pipe.unet.conv_in.weight)
    seen = {}
    calls = pipe.unet.forward

    def spy(sample, *args, **kwargs):
        seen["unet input"] = sample.shape
        return calls(sample, *args, **kwargs)

    pipe.unet.forward = spy
    result = pipe("a red door", image=photo, mask_image=mask_image, padding_mask_crop=4, num_inference_steps=4,
                  generator=torch.Generator().manual_seed(0)).images[0]
    del pipe.unet.forward
    print(f"  the UNet saw {tuple(seen['unet input'])} (batch 2: classifier-free guidance); result {result.size}")
    kept = np.asarray(mask_image) == 0
    assert seen["unet input"][1] == pipe.unet.config.in_channels and result.size == photo.size
    assert np.array_equal(np.asarray(result)[kept], np.asarray(photo)[kept])  # apply_overlay: kept pixels exact
    assert not np.array_equal(np.asarray(result)[~kept], np.asarray(photo)[~kept])

# %% [markdown]
# Without `padding_mask_crop` the result is the VAE's decoding of the whole picture, kept pixels included: they
# drift (a little with real weights, completely with random ones). `image_processor.apply_overlay` is the
# paste-back, callable on its own:

# %%
drifted = pipe("a red door", image=photo, mask_image=mask_image, height=64, width=80, num_inference_steps=4,
               generator=torch.Generator().manual_seed(0)).images[0]
drift = np.abs(np.asarray(drifted, dtype=int) - np.asarray(photo, dtype=int))[kept].mean()
pasted = pipe.image_processor.apply_overlay(mask_image, photo, drifted)
print(f"kept pixels without the paste-back: mean drift {drift:.1f} of 255; after apply_overlay: "
      f"{np.abs(np.asarray(pasted, dtype=int) - np.asarray(photo, dtype=int))[kept].mean():.1f}")
assert drift > 1 and np.array_equal(np.asarray(pasted)[kept], np.asarray(photo)[kept])

# %% [markdown]
# With real weights: `MINIDIFF_SD15` (any SD 1.5) runs the blend, `MINIDIFF_SD15_INPAINTING` (a folder or
# single file of stable-diffusion-v1-5/stable-diffusion-inpainting) the 9-channel model, on a picture drawn
# here: a house whose door is repainted. Minutes on a CPU; skipped when the variables are unset.

# %%
from minidiff.lab.prototypes import draw_prototype

real = {name: helpers.weights_from_environment(name) for name in ("MINIDIFF_SD15", "MINIDIFF_SD15_INPAINTING")}
house_picture = draw_prototype("house", 512)
door = Image.new("L", (512, 512), 0)
ImageDraw.Draw(door).rectangle((176, 256, 336, 480), fill=255)
for name, path in real.items():
    if path is None:
        print(f"{name} is not set: skipping the real example")
        continue
    loader = StableDiffusionInpaintPipeline.from_single_file if path.is_file() else StableDiffusionInpaintPipeline.from_pretrained
    pipe = loader(path)
    image = pipe("a house with a big red wooden door", image=house_picture, mask_image=door, num_inference_steps=25,
                 padding_mask_crop=32, generator=torch.Generator().manual_seed(0)).images[0]
    image.save(OUT / f"real_{name.lower()}.png")
    kept = np.asarray(door) == 0
    assert np.array_equal(np.asarray(image)[kept], np.asarray(house_picture.convert("RGB"))[kept])
    print("wrote", OUT / f"real_{name.lower()}.png")
