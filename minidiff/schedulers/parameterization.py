"""What the model predicts, turned into what a sampler needs: x_0 or eps. Written once, used by every scheduler.

SD is trained on the forward process of DDPM (Ho et al. 2020, arXiv 2006.11239, eq. 4). minidiff writes it
in two frames, with these names everywhere in `schedulers/`:

- the VP frame ("variance preserving", DDPM, DDIM, PNDM, DPM-Solver, UniPC; Lu et al. 2022, arXiv 2206.00927 §2):

      x_t = alpha_t x_0 + sigma_t eps,   alpha_t = sqrt(alpha_bar_t),   sigma_t = sqrt(1 - alpha_bar_t),
      lambda_t = log(alpha_t / sigma_t)                                  (half log-SNR)

  `alpha_t, sigma_t` always mean this pair (so alpha_t^2 + sigma_t^2 = 1). `alpha_bar_t` is DDPM's cumulative
  product (`scheduler.alphas_cumprod[t]`).
- the VE frame ("variance exploding", the sigma schedulers Euler, Euler a, LMS; Karras et al. 2022, "EDM",
  arXiv 2206.00364, eq. 1 and Table 1):

      x = x_0 + sigma eps,   sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t) = sigma_t / alpha_t,   x = x_t / alpha_t

  `sigma` (no subscript; `sigma_next`, `sigma_hat`, ... for other levels) always means this noise level: the
  entries of `scheduler.sigmas`. DPM-Solver and UniPC also keep `scheduler.sigmas` in this VE form and turn
  each one into the VP pair with `vp_from_sigma`.

The model's output is one of (`prediction_type`, diffusers' names):
- "epsilon":      eps
- "sample":       x_0 itself
- "v_prediction": v = alpha_t eps - sigma_t x_0   (Salimans & Ho 2022, arXiv 2202.00512, §4 and Appendix D)

Functions (stable names; the update rules in `update_rules.py` take their results):
    vp_from_alpha_bar(alpha_bar)                         -> alpha_t, sigma_t
    vp_from_sigma(sigma)                                 -> alpha_t, sigma_t, lambda_t
    x0_from_eps(eps, sample, alpha_t, sigma_t)           -> x0           (DDPM eq. 15)
    eps_from_x0(x0, sample, alpha_t, sigma_t)            -> eps
    to_x0(model_output, sample, alpha_t, sigma_t, prediction_type)   -> x0   (VP frame)
    to_eps(model_output, sample, alpha_t, sigma_t, prediction_type)  -> eps  (VP frame)
    to_x0_ve(model_output, sample, sigma, prediction_type)           -> x0   (VE frame, x = x_0 + sigma eps)
    to_eps_ve(model_output, sample, sigma, prediction_type)          -> eps  (VE frame)
    dynamic_threshold(x0, ratio, max_value)              -> x0 in range (Imagen §2.3)
    limit_x0(x0, config, clip_range)                     -> thresholding, or clip_sample's clamp
    add_noise_vp(x0, noise, alpha_t, sigma_t)            -> x_t = alpha_t x_0 + sigma_t eps
    add_noise_ve(x0, noise, sigma)                       -> x = x_0 + sigma eps
    velocity(x0, noise, alpha_t, sigma_t)                -> v = alpha_t eps - sigma_t x_0
    add_noise_flow(x0, noise, sigma)                     -> x = (1 - sigma) x_0 + sigma eps   (flow matching)
    x0_from_flow_velocity(u, sample, sigma)              -> x0 = x - sigma u                  (flow matching)
    flow_velocity(x0, noise)                             -> u = eps - x_0                     (flow matching)

A third frame, the flow-matching one (rectified flow, Liu et al. 2023; SD3, Esser et al. 2024), lives next to these:

      x = (1 - sigma) x_0 + sigma eps,   sigma in [0, 1],   u = dx/dsigma = eps - x_0   ("velocity")

It is the VP frame rescaled: x = x_t / (alpha_t + sigma_t) with sigma = sigma_t / (alpha_t + sigma_t) (docs/flow_matching.md).

This is the role of k-diffusion's `external.py` (its `VDenoiser`, `DiscreteEpsDDPMDenoiser`). The floating-point
order of each formula is the one diffusers 0.42.1 uses, so the schedulers stay bit-exact with it.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# ----- the two frames ----------------------------------------------------------------------------


def vp_from_alpha_bar(alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t)  (DDPM eq. 4)."""
    return alpha_bar**0.5, (1 - alpha_bar) ** 0.5


def vp_from_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The VP pair of a VE noise level: alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha_t, and lambda_t."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    sigma_t = sigma * alpha_t
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)  # half log-SNR; +inf when sigma = 0
    return alpha_t, sigma_t, lambda_t


# ----- model output -> x_0 / eps, VP frame ---------------------------------------------------------


def x0_from_eps(eps: torch.Tensor, sample: torch.Tensor, alpha_t, sigma_t) -> torch.Tensor:
    """x_0 = (x_t - sigma_t eps) / alpha_t  (DDPM eq. 15; DDIM eq. 12, "predicted x_0")."""
    return (sample - sigma_t * eps) / alpha_t


def eps_from_x0(x0: torch.Tensor, sample: torch.Tensor, alpha_t, sigma_t) -> torch.Tensor:
    """eps = (x_t - alpha_t x_0) / sigma_t."""
    return (sample - alpha_t * x0) / sigma_t


def to_x0(model_output: torch.Tensor, sample: torch.Tensor, alpha_t, sigma_t, prediction_type: str) -> torch.Tensor:
    """The model's x_0 estimate at x_t (`sample`), whatever it predicts."""
    if prediction_type == "epsilon":
        return x0_from_eps(model_output, sample, alpha_t, sigma_t)
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":  # x_0 = alpha_t x_t - sigma_t v
        return alpha_t * sample - sigma_t * model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def to_eps(model_output: torch.Tensor, sample: torch.Tensor, alpha_t, sigma_t, prediction_type: str) -> torch.Tensor:
    """The model's eps estimate at x_t (`sample`), whatever it predicts."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return eps_from_x0(model_output, sample, alpha_t, sigma_t)
    if prediction_type == "v_prediction":  # eps = alpha_t v + sigma_t x_t
        return alpha_t * model_output + sigma_t * sample
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


# ----- model output -> x_0 / eps, VE frame (x = x_0 + sigma eps, model input x / sqrt(sigma^2 + 1)) -----------


def to_x0_ve(model_output: torch.Tensor, sample: torch.Tensor, sigma, prediction_type: str) -> torch.Tensor:
    """The denoiser D(x; sigma) of Karras et al. 2022 (Table 1) built from the model output at x = `sample`.

    epsilon:      D = x - sigma eps
    v_prediction: D = c_skip x + c_out v,  c_skip = 1 / (sigma^2 + 1),  c_out = -sigma / sqrt(sigma^2 + 1)
    sample:       D = the model output
    """
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def to_eps_ve(model_output: torch.Tensor, sample: torch.Tensor, sigma, prediction_type: str) -> torch.Tensor:
    """eps = (x - D(x; sigma)) / sigma: the derivative dx/dsigma of the probability-flow ODE (Karras eq. 3)."""
    if prediction_type == "epsilon":
        return model_output
    return (sample - to_x0_ve(model_output, sample, sigma, prediction_type)) / sigma


# ----- keeping x_0 in range ------------------------------------------------------------------------


def dynamic_threshold(x0_pred: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022, "Imagen", arXiv 2205.11487, §2.3), per sample:

    s = clamp( quantile(|x0_pred|, ratio), 1, max_value ),   x0_pred <- clamp(x0_pred, -s, s) / s

    With s clamped to 1 this is plain clipping to [-1, 1]. Meant for pixel-space models, not SD latents.
    """
    dtype = x0_pred.dtype
    batch, *rest = x0_pred.shape
    flat = x0_pred.reshape(batch, -1)  # (B, C*H*W)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # quantile needs float32/64
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)  # (B, 1)
    return (torch.clamp(flat, -s, s) / s).reshape(batch, *rest).to(dtype)


def limit_x0(x0_pred: torch.Tensor, config, clip_range: float | None = None) -> torch.Tensor:
    """Dynamic thresholding when `config.thresholding`; else a clamp to [-clip_range, clip_range] when the caller
    gives one (DDPM and DDIM, from their clip_sample fields); else x0_pred unchanged.

    The clip range is an argument, not read from the config: a config may carry another class's `clip_sample`
    as a hidden key (a DPM-Solver built from a DDPM config keeps DDPM's clip_sample=True), which must not act."""
    if config.thresholding:
        return dynamic_threshold(x0_pred, config.dynamic_thresholding_ratio, config.sample_max_value)
    if clip_range is not None:
        return x0_pred.clamp(-clip_range, clip_range)
    return x0_pred


# ----- the forward process -------------------------------------------------------------------------


def add_noise_vp(x0: torch.Tensor, noise: torch.Tensor, alpha_t, sigma_t) -> torch.Tensor:
    """x_t = alpha_t x_0 + sigma_t eps  (DDPM eq. 4)."""
    return alpha_t * x0 + sigma_t * noise


def add_noise_ve(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """x = x_0 + sigma eps  (Karras et al. 2022, eq. 1 with s(t) = 1)."""
    return x0 + noise * sigma


def velocity(x0: torch.Tensor, noise: torch.Tensor, alpha_t, sigma_t) -> torch.Tensor:
    """The v-prediction target v = alpha_t eps - sigma_t x_0  (Salimans & Ho 2022, §4)."""
    return alpha_t * noise - sigma_t * x0


# ----- the flow-matching frame: x = (1 - sigma) x_0 + sigma eps ---------------------------------------


def add_noise_flow(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """x = (1 - sigma) x_0 + sigma eps, the straight line from data (sigma = 0) to noise (sigma = 1)
    (Lipman et al. 2023, arXiv 2210.02747, eq. 20 with sigma_min = 0; Liu et al. 2023, arXiv 2209.03003, eq. 1)."""
    return sigma * noise + (1.0 - sigma) * x0


def flow_velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching target u = dx/dsigma = eps - x_0 along that line (diffusers' sign: it points to the noise)."""
    return noise - x0


def x0_from_flow_velocity(velocity: torch.Tensor, sample: torch.Tensor, sigma) -> torch.Tensor:
    """x_0 = x - sigma u: follow the straight line from x back to sigma = 0 (exact when u is the true velocity of
    this one line; for a learned u, the denoiser's estimate E[x_0 | x])."""
    return sample - sigma * velocity
