"""Inpainting on the exact picture mixture: the true conditional, and three samplers measured against it.

The data is p(x_0) = sum_k pi_k N(x_0; mu_k, s^2 I) (gaussian_mixture.py). Split the pixels into known ones O
(mask 0: keep) and unknown ones U (mask 1: repaint) and observe x_0[O] = y. Because each component is an isotropic
Gaussian, conditioning is closed form (Bishop, PRML §2.3.1 with a diagonal covariance, and Bayes' rule on k):

    posterior weight     w_k = p(k | y) = softmax_k( log pi_k - |y - mu_k[O]|^2 / (2 s^2) )
    unknown pixels       x_0[U] | y, k ~ N(mu_k[U], s^2 I)          (independent of y given k: no cross-covariance)
    so                   E[x_0[U] | y]   = sum_k w_k mu_k[U]
                         Var[x_0[U] | y] = s^2 + sum_k w_k mu_k[U]^2 - (sum_k w_k mu_k[U])^2     (per pixel)

A perfect inpainting sampler draws from exactly this: picture k with probability w_k, then that picture's pixels.
The samplers below use only the denoiser (as SD does) and are measured against it, from the same starting noise:

* `blend_inpaint`: what StableDiffusionInpaintPipeline does with a 4-channel UNet (pipelines/inpaint.py): a DDIM
  step on the whole image, then the known pixels overwritten by y re-noised to the next level with the *same* noise.
* `repaint_inpaint`: RePaint (Lugmayr et al. 2022, arXiv 2201.09865, Algorithm 1): ancestral DDPM steps, the known
  pixels re-noised with *fresh* noise, and each step repeated r times after jumping back one level
  (x_t = sqrt(alpha_bar_t / alpha_bar_{t-1}) x_{t-1} + sqrt(1 - alpha_bar_t / alpha_bar_{t-1}) z), so the unknown
  region is denoised again knowing what the known region became.
* `guided_inpaint`: reconstruction guidance (Chung et al. 2023, DPS, arXiv 2209.14687, Algorithm 1): a DDIM step,
  then x <- x - zeta grad_x |y - x0_hat(x)[O]| with x0_hat the denoiser's E[x_0 | x_t]; y pasted in at the end.

`measure` says how far a set of samples is from the truth: which picture each lands on (vs w), the per-pixel mean
and spread of the filled region (vs the exact ones, also by distance from the kept region), and the seam jump:
how much neighbouring pixels across the mask's edge differ (a filled region from another picture than the kept
one shows up there: the blend's known inconsistency).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minidiff.lab.accuracy import SD15_SCHEDULER_CONFIG
from minidiff.lab.gaussian_mixture import GaussianMixtureDenoiser
from minidiff.schedulers.ddim import DDIMScheduler
from minidiff.schedulers.ddpm import DDPMScheduler


@dataclass
class ExactConditional:
    """p(x_0 | x_0[O] = y) of the mixture: posterior weights (K,), per-pixel mean and std (C, H, W; std 0 where known)."""

    weights: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def _pixels(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (H, W) or (1, H, W) mask, 1 = repaint, as a float (1, H, W) tensor on `like`'s device and dtype."""
    mask = torch.as_tensor(mask)
    mask = mask[None] if mask.ndim == 2 else mask
    if mask.ndim != 3 or mask.shape[0] != 1 or mask.shape[1:] != like.shape[-2:]:
        raise ValueError(f"mask must be (H, W) = {tuple(like.shape[-2:])} with 1 = repaint, got {tuple(mask.shape)}")
    mask = mask.to(device=like.device, dtype=like.dtype)
    if not bool(((mask == 0) | (mask == 1)).all()) or not bool((mask == 1).any()) or not bool((mask == 0).any()):
        raise ValueError("mask must hold 0s (keep) and 1s (repaint), with at least one of each")
    return mask


def exact_conditional(model: GaussianMixtureDenoiser, known: torch.Tensor, mask: torch.Tensor) -> ExactConditional:
    """The closed form of the module docstring, in float64. known: (C, H, W), its pixels where mask == 0 are y."""
    means = model.means.double()  # (K, C, H, W)
    known = known.double().to(means.device)
    mask = _pixels(mask, known)
    s2 = model.config.data_std**2
    squared = (((known[None] - means) ** 2) * (1 - mask)).flatten(1).sum(1)  # |y - mu_k[O]|^2, (K,)
    weights = torch.softmax(model.log_weights.double() - squared / (2 * s2), dim=0)
    mean = torch.einsum("k,kchw->chw", weights, means)
    second = torch.einsum("k,kchw->chw", weights, means**2) + s2
    std = (second - mean**2).clamp(min=0).sqrt()
    return ExactConditional(weights, mask * mean + (1 - mask) * known, mask * std)


def sample_exact_conditional(model: GaussianMixtureDenoiser, known: torch.Tensor, mask: torch.Tensor, num_samples: int,
                             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws from p(x_0 | y): a picture k ~ w, its unknown pixels mu_k[U] + s eps, the known ones y.
    Returns (samples (N, C, H, W) in the model's dtype, the picture of each (N,))."""
    exact = exact_conditional(model, known, mask)
    components = torch.multinomial(exact.weights.cpu(), num_samples, replacement=True, generator=generator)
    noise = torch.randn((num_samples, *known.shape), generator=generator, dtype=torch.float64)
    mask = _pixels(mask, known.double())
    samples = mask * (model.means.double().cpu()[components] + model.config.data_std * noise) + (1 - mask) * known.double()
    return samples.to(model.dtype), components


def conditional_model(model: GaussianMixtureDenoiser, known: torch.Tensor, mask: torch.Tensor) -> GaussianMixtureDenoiser:
    """What a perfectly trained 9-channel inpainting UNet computes for this y and mask: the exact denoiser of
    p(x_0 | y) itself, a mixture with weights w_k and means mu_k on the repainted pixels, y on the kept ones
    (which get the same spread s; paste y back at the end). Plain sampling from it needs no blend."""
    exact = exact_conditional(model, known, mask)
    m = _pixels(mask, model.means.double())
    means = m * model.means.double() + (1 - m) * known.double().to(model.means.device)
    weights = exact.weights.clamp(min=1e-300)  # from_components needs positive weights
    config = {key: model.config[key] for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}
    return GaussianMixtureDenoiser.from_components(means.to(model.dtype), weights, data_std=model.config.data_std,
                                                   scheduler_config=config)


# ----- three samplers that only call the denoiser ---------------------------------------------------


def _known_batch(known: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return known.to(device=noise.device, dtype=noise.dtype).expand_as(noise)


@torch.no_grad()
def blend_inpaint(model: GaussianMixtureDenoiser, known: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor,
                  num_inference_steps: int = 50) -> torch.Tensor:
    """The 4-channel pipeline's loop (DDIM, strength 1): step, then overwrite the known pixels with y noised to the
    next timestep by the starting noise itself. noise: (N, C, H, W) -> samples (N, C, H, W)."""
    scheduler = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    y, m = _known_batch(known, noise), _pixels(mask, noise)
    x = noise * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
        known_now = scheduler.add_noise(y, noise, timesteps[i + 1 : i + 2]) if i < len(timesteps) - 1 else y
        x = m * x + (1 - m) * known_now
    return x


@torch.no_grad()
def repaint_inpaint(model: GaussianMixtureDenoiser, known: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor,
                    num_inference_steps: int = 50, resample: int = 5, generator: torch.Generator | None = None) -> torch.Tensor:
    """RePaint (Algorithm 1, jump length 1): DDPM ancestral steps, known pixels re-noised with fresh noise, each
    step done `resample` times (r = 1: the plain ancestral blend, no resampling)."""
    scheduler = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    y, m = _known_batch(known, noise), _pixels(mask, noise)
    alphas_cumprod = scheduler.alphas_cumprod.to(device=noise.device, dtype=torch.float64)
    x = noise
    for t in scheduler.timesteps:
        prev_t = int(scheduler.previous_timestep(t))
        for u in range(resample):
            fresh = torch.randn(noise.shape, generator=generator, dtype=noise.dtype).to(noise.device)
            known_prev = scheduler.add_noise(y, fresh, torch.tensor([prev_t])) if prev_t >= 0 else y
            unknown_prev = scheduler.step(model(x, t).sample, t, x, generator=generator).prev_sample
            x_prev = m * unknown_prev + (1 - m) * known_prev
            if u < resample - 1 and prev_t >= 0:  # jump back to t: the forward process from prev_t to t
                ratio = (alphas_cumprod[int(t)] / alphas_cumprod[prev_t]).to(noise.dtype)
                z = torch.randn(noise.shape, generator=generator, dtype=noise.dtype).to(noise.device)
                x = ratio.sqrt() * x_prev + (1 - ratio).sqrt() * z
        x = x_prev
    return x


def guided_inpaint(model: GaussianMixtureDenoiser, known: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor,
                   num_inference_steps: int = 50, zeta: float = 1.0) -> torch.Tensor:
    """DPS-style reconstruction guidance on DDIM: after each step, x <- x - zeta grad_x |y - x0_hat(x_t)[O]|
    (the norm, not its square, as Chung et al.'s Algorithm 1); the known pixels are pasted in at the end."""
    scheduler = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    y, m = _known_batch(known, noise), _pixels(mask, noise)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = x.detach().requires_grad_(True)
        scale, noise_std = model.vp_coefficients(t, len(x))
        x0_hat = model.posterior(x, scale, noise_std).x0.reshape(x.shape).to(x.dtype)
        distance = (((y - x0_hat) * (1 - m)) ** 2).flatten(1).sum(1).sqrt()  # (N,)
        (gradient,) = torch.autograd.grad(distance.sum(), x)
        with torch.no_grad():
            eps = model(x, t).sample
            x = scheduler.step(eps, t, x).prev_sample - zeta * gradient
    return (m * x + (1 - m) * y).detach()


# ----- measuring samples against the truth ---------------------------------------------------------


@dataclass
class InpaintingReport:
    """How a set of inpainted samples compares with the exact conditional (filled region only)."""

    landed: torch.Tensor  # (K,) fraction of samples whose filled region is nearest picture k
    total_variation: float  # 1/2 sum_k |landed_k - w_k|: 0 = right proportions, 1 = all on impossible pictures
    impossible: float  # fraction landed on pictures with w_k < 1e-3 given the known pixels
    mean_error: float  # RMS over filled pixels of (sample mean - exact mean)
    spread_ratio: float  # mean over filled pixels of sample std / exact std
    mean_error_by_distance: dict  # distance from the kept region (pixels) -> RMS of (mean - exact mean) there
    seam_jump: float  # mean |x_p - x_q| over neighbours p filled, q kept: how abruptly the picture changes at the seam


def distance_to_known(mask: torch.Tensor) -> torch.Tensor:
    """(H, W): for each repainted pixel, its chessboard distance to the nearest kept pixel (0 on kept pixels)."""
    mask = torch.as_tensor(mask).reshape(mask.shape[-2:]).bool()
    distance = torch.zeros(mask.shape, dtype=torch.long)
    region = ~mask
    step = 0
    while bool((~region).any()):
        step += 1
        grown = torch.nn.functional.max_pool2d(region[None, None].float(), 3, stride=1, padding=1)[0, 0].bool()
        distance[grown & ~region] = step
        region = grown
    return distance


SEAM_BINS = ((1, 1), (2, 2), (3, 4), (5, 10_000))


def seam_jump(samples: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean |x_p - x_q| over horizontally or vertically adjacent pixel pairs with p repainted and q kept."""
    m = torch.as_tensor(mask).reshape(mask.shape[-2:]).bool()
    jumps = []
    for dim in (-1, -2):
        a, b = samples.narrow(dim, 0, samples.shape[dim] - 1), samples.narrow(dim, 1, samples.shape[dim] - 1)
        ma, mb = m.narrow(dim, 0, m.shape[dim] - 1), m.narrow(dim, 1, m.shape[dim] - 1)
        across = (ma != mb).expand_as(a[0])  # (C, H', W')
        jumps.append((a - b).abs()[:, across].flatten())
    return float(torch.cat(jumps).mean())


def measure(model: GaussianMixtureDenoiser, samples: torch.Tensor, known: torch.Tensor, mask: torch.Tensor) -> InpaintingReport:
    """The InpaintingReport of `samples` (N, C, H, W) for the known picture and mask."""
    exact = exact_conditional(model, known, mask)
    samples = samples.double().cpu()
    m = _pixels(mask, samples)  # (1, H, W)
    means = model.means.double().cpu()
    filled = m.bool().expand(samples.shape[1:])  # (C, H, W)
    distances = (((samples[:, None] - means[None]) ** 2) * m).flatten(2).sum(2)  # (N, K) on the filled pixels
    landed = torch.bincount(distances.argmin(1), minlength=len(means)).double() / len(samples)
    weights = exact.weights.cpu()
    mean_error = (samples.mean(0) - exact.mean.cpu()) ** 2  # (C, H, W)
    seam_of = distance_to_known(m[0])
    by_distance = {}
    for low, high in SEAM_BINS:
        ring = ((seam_of >= low) & (seam_of <= high))[None].expand(samples.shape[1:])
        if bool(ring.any()):
            label = f"{low}" if low == high else f"{low}-{high}" if high < 10_000 else f"{low}+"
            by_distance[label] = float(mean_error[ring].mean().sqrt())
    return InpaintingReport(
        landed=landed,
        total_variation=float((landed - weights).abs().sum() / 2),
        impossible=float(landed[weights < 1e-3].sum()),
        mean_error=float(mean_error[filled].mean().sqrt()),
        spread_ratio=float((samples.std(0)[filled] / exact.std.cpu()[filled]).mean()),
        mean_error_by_distance=by_distance,
        seam_jump=seam_jump(samples, m[0]),
    )
