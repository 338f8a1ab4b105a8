"""The pure schedule functions: which noise levels a scheduler visits, as functions of numbers, no state.

- The training schedule: betas -> alpha_bar_t = prod_{s<=t} (1 - beta_s) of DDPM (Ho et al. 2020, arXiv
  2006.11239, eq. 4), and the VE noise level sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t) of the sigma
  schedulers (Karras et al. 2022, "EDM", arXiv 2206.00364).
- Timestep spacing: which N of the T training timesteps to visit (leading / linspace / trailing).
- Noise ramps that replace the spaced sigmas: Karras (EDM eq. 5), exponential, Beta quantiles (Lee et al. 2024)
  with the regularized incomplete beta function written out; one function chooses the ramp from the config,
  one checks that at most one is chosen.

Functions (stable names):
  training schedule   make_betas, betas_for_alpha_bar (cosine_alpha_bar, exp_alpha_bar), rescale_zero_terminal_snr,
                      check_training_schedule, sigmas_from_alphas_cumprod
  spacing             spaced_timesteps, sigma_to_t, spaced_sigmas
  noise ramps         check_one_noise_ramp, chosen_noise_ramp, check_no_ramp_for_custom_timesteps, ramp_sigmas,
                      replace_by_noise_ramp, karras_sigmas, exponential_sigmas, beta_sigmas
                      (beta_ppf, regularized_incomplete_beta)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from minidiff.configuration import check_choice

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


# ----- the training noise schedule ---------------------------------------------------------------


def cosine_alpha_bar(t: float) -> float:
    """Nichol & Dhariwal 2021 (arXiv 2102.09672, eq. 17): alpha_bar(t) = cos^2( (t + 0.008) / 1.008 * pi/2 )."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def exp_alpha_bar(t: float) -> float:
    """alpha_bar(t) = exp(-12 t): diffusers' "exp" schedule (offered by Heun only), log alpha_bar linear in t."""
    return math.exp(t * -12.0)


def betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999, alpha_bar=cosine_alpha_bar) -> torch.Tensor:
    """The betas of a continuous alpha_bar(t), t in [0, 1] (Nichol & Dhariwal 2021, arXiv 2102.09672, eq. 17 with
    the cosine, "squaredcos_cap_v2"; `exp_alpha_bar` for "exp"):

    beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta)
    """
    T = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023, arXiv 2305.08891, Algorithm 1).

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first value is unchanged.
    """
    sqrt_alpha_bar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[0:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def check_training_schedule(num_train_timesteps, trained_betas=None) -> None:
    """Refuse, at construction, a training schedule no model was trained on: T must be a positive integer and
    `trained_betas`, when given, must hold one beta per training timestep."""
    T = num_train_timesteps
    if not isinstance(T, (int, np.integer)) or isinstance(T, bool) or T < 1:
        raise ValueError(f"num_train_timesteps must be a positive integer (1000 for SD), got {T!r}")
    if trained_betas is not None and len(trained_betas) != T:
        raise ValueError(
            f"trained_betas holds {len(trained_betas)} values but num_train_timesteps is {T}: give one beta per "
            "training timestep, or set num_train_timesteps to len(trained_betas)"
        )


def make_betas(
    beta_schedule: str,
    beta_start: float,
    beta_end: float,
    num_train_timesteps: int,
    trained_betas=None,
    rescale_betas_zero_snr: bool = False,
    beta_schedules: tuple[str, ...] = BETA_SCHEDULES,
) -> torch.Tensor:
    """beta_1..beta_T in float32, from `trained_betas` when given, else from the named schedule (one of
    `beta_schedules`, the ones the calling class offers):

    linear:            beta_t = linspace(beta_start, beta_end, T)
    scaled_linear:     beta_t = linspace(sqrt(beta_start), sqrt(beta_end), T)^2      (latent diffusion, SD 1.x)
    squaredcos_cap_v2: the cosine schedule (`betas_for_alpha_bar`)
    exp:               alpha_bar(t) = exp(-12 t) (`betas_for_alpha_bar` with `exp_alpha_bar`)
    """
    check_training_schedule(num_train_timesteps, trained_betas)
    if trained_betas is not None:
        betas = torch.tensor(np.asarray(trained_betas), dtype=torch.float32)
    else:
        check_choice("beta_schedule", beta_schedule, beta_schedules)
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        elif beta_schedule == "exp":
            betas = betas_for_alpha_bar(num_train_timesteps, alpha_bar=exp_alpha_bar)
        else:
            betas = betas_for_alpha_bar(num_train_timesteps)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t) (VE) for every training timestep t, as float32 numpy.

    Computed in float32, as diffusers does: Karras/exponential timesteps come from `sigma_to_t` on
    `np.log` of these values, and float64 sigmas shift those timesteps by a float32 ulp often enough
    to break exact timestep parity.
    """
    alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float32)
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


# ----- which timesteps to visit --------------------------------------------------------------------


def spaced_timesteps(spacing: str, num_inference_steps: int, num_train_timesteps: int, steps_offset: int = 0) -> np.ndarray:
    """The N timesteps to visit, from noisiest to cleanest, as float64 (each scheduler rounds/casts as it needs).

    leading:  t_i = i * (T // N) + steps_offset, i = N-1..0       (DDIM paper; never reaches T-1)
    linspace: t_i = linspace(0, T-1, N), reversed                   (not rounded here)
    trailing: t_i = round(T - i * T/N) - 1, i = 0..N-1              (Lin et al. 2023, Table 2; starts at T-1)
    See docs/schedulers.md §2 for the examples these reproduce (e.g. trailing, 4 steps: 999, 749, 499, 249).
    """
    check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    T, N = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        return np.linspace(0, T - 1, N)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, N) * (T // N)).round()[::-1].astype(np.float64) + steps_offset
    timesteps = np.round(np.arange(T, 0, -T / N)) - 1
    # For some N (61, 103, 121, ... at T=1000) float round-off gives arange one point too many, just above 0,
    # which becomes t = -1 (diffusers 0.42 keeps it: N+1 steps, the last at t = -1). We drop it.
    return timesteps[timesteps >= 0]


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep whose noise level is `sigma`: linear interpolation in log-sigma."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    distances = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(distances >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    t = (1 - w) * low + w * high
    return t.reshape(np.shape(sigma))


# ----- noise ramps that replace the spaced sigmas ---------------------------------------------------


NOISE_RAMP_FLAGS = {"use_karras_sigmas": "karras", "use_exponential_sigmas": "exponential", "use_beta_sigmas": "beta"}


def check_one_noise_ramp(config) -> None:
    """At most one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas may be set (checked at construction)."""
    chosen = [flag for flag in NOISE_RAMP_FLAGS if config.get(flag)]
    if len(chosen) > 1:
        raise ValueError(
            f"{' and '.join(chosen)} are both set, but each replaces the noise levels: set at most one of "
            "use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas to True"
        )


def chosen_noise_ramp(config) -> str | None:
    """The ramp that replaces the spaced noise levels: "karras", "exponential", "beta", or None (keep them)."""
    return next((ramp for flag, ramp in NOISE_RAMP_FLAGS.items() if config.get(flag)), None)


def check_no_ramp_for_custom_timesteps(ramp: str | None) -> None:
    """Custom timesteps replace the spacing, and a noise ramp (`chosen_noise_ramp`, or "lu" for DPM-Solver's
    use_lu_lambdas) picks its own timesteps: the two cannot go together."""
    if ramp is not None:
        flag = "use_lu_lambdas" if ramp == "lu" else f"use_{ramp}_sigmas"
        raise ValueError(f"custom `timesteps` cannot be used with {flag}=True, which picks its own noise levels")


def ramp_sigmas(ramp: str, sigma_min: float, sigma_max: float, num_inference_steps: int, config=None) -> np.ndarray:
    """N noise levels from sigma_max down to sigma_min on the named ramp (`karras_sigmas`, `exponential_sigmas`,
    `beta_sigmas`). As in diffusers, a config carrying sigma_min / sigma_max (Euler's and UniPC's fields, or keys
    kept from such a config) bounds the ramp instead."""
    if config is not None and config.get("sigma_min") is not None:
        sigma_min = config.get("sigma_min")
    if config is not None and config.get("sigma_max") is not None:
        sigma_max = config.get("sigma_max")
    ramp_function = {"karras": karras_sigmas, "exponential": exponential_sigmas, "beta": beta_sigmas}[ramp]
    return ramp_function(sigma_min, sigma_max, num_inference_steps)


def replace_by_noise_ramp(config, sigmas: np.ndarray, timesteps: np.ndarray, log_train_sigmas: np.ndarray,
                          num_inference_steps: int, karras_takes_config_bounds: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas, timesteps) of the sigma schedulers: unchanged, or, when the config chooses a ramp, N noise levels
    on it between the ends of `sigmas` (or the config's sigma_min / sigma_max) and the (fractional) timesteps they
    sit at (`sigma_to_t`). diffusers' LMS and DPM++ SDE ignore the config's bounds for the Karras ramp only (their
    exponential and beta ramps honour them): `karras_takes_config_bounds=False` does the same."""
    ramp = chosen_noise_ramp(config)
    if ramp is None:
        return sigmas, timesteps
    bounds = config if ramp != "karras" or karras_takes_config_bounds else None
    sigmas = ramp_sigmas(ramp, float(sigmas[-1]), float(sigmas[0]), num_inference_steps, bounds)
    return sigmas, sigma_to_t(sigmas, log_train_sigmas)


def spaced_sigmas(config, train_sigmas: np.ndarray, log_train_sigmas: np.ndarray, num_inference_steps: int,
                  num_train_timesteps: int, timestep_dtype=np.float32,
                  karras_takes_config_bounds: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) of N steps for the k-diffusion schedulers (LMS, Heun, DPM2, DPM++ SDE): the spaced
    timesteps (cast to `timestep_dtype`, as the diffusers class does), sigma interpolated linearly between
    training timesteps, then the config's noise ramp, if any (`replace_by_noise_ramp`)."""
    timesteps = spaced_timesteps(config.timestep_spacing, num_inference_steps, num_train_timesteps, config.steps_offset)
    timesteps = timesteps.astype(timestep_dtype)
    sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)  # (N,) float64
    sigmas, timesteps = replace_by_noise_ramp(config, sigmas, timesteps, log_train_sigmas, num_inference_steps,
                                              karras_takes_config_bounds)
    return timesteps, sigmas


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    ramp = np.linspace(0, 1, num_inference_steps)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int) -> np.ndarray:
    """Noise levels evenly spaced in log-sigma, from sigma_max down to sigma_min."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_inference_steps))


def beta_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """Lee et al. 2024, "Beta Sampling is All You Need" (arXiv 2407.12173): noise levels at the quantiles
    of a Beta(alpha, beta) distribution, dense near both ends of the schedule:

    sigma_i = sigma_min + F^-1(1 - i/(N-1)) (sigma_max - sigma_min),   F = the Beta(alpha, beta) CDF
    """
    quantiles = 1 - np.linspace(0, 1, num_inference_steps)
    return np.array([sigma_min + beta_ppf(q, alpha, beta) * (sigma_max - sigma_min) for q in quantiles])


# ----- the Beta distribution's quantiles, written out (no scipy) ---------------------------------------


def beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse of the Beta(a, b) CDF, by bisection on `regularized_incomplete_beta` (monotone in x)."""
    if q <= 0 or q >= 1:
        return float(q >= 1)
    low, high = 0.0, 1.0
    for _ in range(60):  # 2^-60 < 1e-18: as exact as a float64 allows
        middle = (low + high) / 2
        low, high = (middle, high) if regularized_incomplete_beta(middle, a, b) < q else (low, middle)
    return (low + high) / 2


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """The Beta(a, b) CDF, I_x(a, b) = B(x; a, b) / B(a, b), by its continued fraction
    (Abramowitz & Stegun 26.5.8), evaluated with the modified Lentz method.

    The fraction converges fast for x < (a+1)/(a+b+2); above that, I_x(a, b) = 1 - I_{1-x}(b, a).
    """
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):
        return 1.0 - regularized_incomplete_beta(1.0 - x, b, a)
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - log_beta) / a

    def nonzero(value: float) -> float:  # Lentz's guard against dividing by zero
        return value if abs(value) > 1e-300 else 1e-300

    c, d = 1.0, 1 / nonzero(1 - (a + b) * x / (a + 1))
    fraction = d
    for m in range(1, 300):
        for numerator in (  # the terms d_{2m} and d_{2m+1} of the fraction
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 / nonzero(1 + numerator * d)
            c = nonzero(1 + numerator / c)
            fraction *= c * d
        if abs(c * d - 1) < 1e-16:
            break
    return front * fraction
