"""The update rules of the samplers: one short pure function per rule, each naming its paper and equation.

In the style of k-diffusion's `sampling.py`: no scheduler state, no config, no timestep bookkeeping. A rule takes
the current sample, the model's prediction (already turned into x_0 or eps by `parameterization.py`) and the
noise levels, and returns the next sample. The scheduler classes do the rest (which noise levels, which history).
Names follow `parameterization.py`: `alpha_t, sigma_t` the VP pair, `sigma` the VE noise level, `lambda_t` the
half log-SNR; `_s0, _s1, _s2` mark the current and two previous levels of a multistep solver, `_t` the next one.

Functions (stable names), grouped by the frame they work in, in the order of this file:

  alpha_bar frame: indexed by training timestep, x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
    DDPM (Ho et al. 2020, arXiv 2006.11239)
      posterior_variance(alpha_bar_t, alpha_bar_prev)                      beta~_t, eq. 7
      ddpm_posterior_mean(x0, sample, alpha_bar_t, alpha_bar_prev)         mu~_t, eq. 7
    DDIM (Song et al. 2020, arXiv 2010.02502)
      ddim_noise_std(alpha_bar_t, alpha_bar_prev, eta)                     eq. 16
      ddim_step(x0, eps, alpha_bar_prev, noise_std=0.0, noise=None)        eq. 12
    PNDM (Liu et al. 2022, arXiv 2202.09778)
      pndm_transfer(sample, eps, alpha_bar_t, alpha_bar_prev)              formula (9)
      plms_eps(ets)                                                        eq. 12 (Adams-Bashforth 1..4)
    Consistency models: LCM (Luo et al. 2023, arXiv 2310.04378), TCD (Zheng et al. 2024, arXiv 2402.19159)
      consistency_scalings(timestep, timestep_scaling, sigma_data=0.5)   -> c_skip, c_out (Song et al. 2023, App. C)
      consistency_function(x0, sample, c_skip, c_out)                    f(x_t, t) = c_skip x_t + c_out x0
      renoise(x0, alpha_bar, noise)                                      sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) z
      tcd_step(x0, eps, alpha_bar_s, alpha_bar_prev, noise=None)         strategic stochastic sampling, eq. 8

  sigma frame (VE): x = x_0 + sigma eps, d = (x - x0) / sigma (Karras et al. 2022, arXiv 2206.00364; k-diffusion)
    Euler, Euler ancestral
      to_d(sample, x0, sigma)                                              eq. 3
      euler_step(sample, x0, sigma, sigma_next)                            Algorithm 2 without lines 8-10
      churn(sample, sigma, sigma_hat, s_noise, noise)                      Algorithm 2, lines 5-6
      ancestral_sigmas(sigma_from, sigma_to)                               -> sigma_down, sigma_up
      euler_ancestral_step(sample, x0, sigma, sigma_down, sigma_up, noise)
    LMS (k-diffusion's sample_lms; Adams-Bashforth with non-uniform steps)
      lagrange_basis_integral(nodes, j, start, end)
      lms_coefficients(sigmas, sigma_next)
      lms_step(sample, derivatives, coefficients)
    Heun (Algorithm 1)
      heun_correction(sample, derivative, derivative_next, dt)             line 8
    DPM-Solver-2 in sigma (k-diffusion's sample_dpm_2 / _ancestral)
      dpm_solver_2_step(sample, sample_mid, x0_mid, sigma, sigma_mid, sigma_next)
    DPM++ SDE (k-diffusion's sample_dpmpp_sde), in log-sigma time t = -log(sigma)
      log_sigma_time(sigma), sigma_at(t)                                   t = -log(sigma) and back
      dpm_solver_pp_sde_stage(sample, x0, t, t_to, noise, s_noise=1.0)     2211.01095 eq. 8, k = 1, ancestral

  lambda frame (VP): x_t = alpha_t x_0 + sigma_t eps, lambda_t = log(alpha_t / sigma_t), h = lambda_t - lambda_s0
    DPM-Solver / DPM-Solver++ multistep (Lu et al. 2022, arXiv 2206.00927 and 2211.01095), x0 = data prediction
      dpm_solver_pp_first_order(x, x0_s0, alpha_t, sigma_t, sigma_s0, lambda_t, lambda_s0)
      dpm_solver_pp_second_order(x, x0_s0, x0_s1, alpha_t, sigma_t, sigma_s0, lambda_t, lambda_s0, lambda_s1, solver_type)
      dpm_solver_pp_third_order(x, x0_s0, x0_s1, x0_s2, alpha_t, sigma_t, sigma_s0, lambda_t, lambda_s0, lambda_s1, lambda_s2)
      dpm_solver_first_order, dpm_solver_second_order, dpm_solver_third_order
          (noise prediction: the same arguments with eps and alpha_s0)
      sde_dpm_solver_pp_first_order, sde_dpm_solver_pp_second_order, sde_dpm_solver_pp_third_order,
      sde_dpm_solver_first_order, sde_dpm_solver_second_order          (as above, plus `noise`)
    UniPC (Zhao et al. 2023, arXiv 2302.04867)
      unipc_differences(m_s0, previous_outputs, previous_lambdas, lambda_s0, h)   -> r_k, D_k
      unipc_bh_coefficients(h, rks, order, predict_x0, solver_type)         -> h phi_1, B(h), R, phi / B(h)
      uni_p_update(x, m_s0, D1s, R, b, h_phi_1, B_h, alpha_t, sigma_t, alpha_s0, sigma_s0, order, predict_x0)
      uni_c_update(x, m_s0, m_t, D1s, R, b, h_phi_1, B_h, alpha_t, sigma_t, alpha_s0, sigma_s0, order, predict_x0)
    DPM-Solver singlestep (2206.00927 Algorithms 1-2; 2211.01095 Algorithm 1): from the group's start s to t
      dpm_solver_pp_2s(x_s, x0_s, x0_r, alpha_t, sigma_t, sigma_s, lambda_t, lambda_s, lambda_r, solver_type)
      dpm_solver_pp_3s(x_s, x0_s, x0_r1, x0_r2, alpha_t, sigma_t, sigma_s, lambda_t, lambda_s, lambda_r1, lambda_r2, solver_type)
      dpm_solver_2s / dpm_solver_3s                     (noise prediction, alpha_s in place of sigma_s)
      sde_dpm_solver_pp_2s / sde_dpm_solver_pp_3s       (as the ++ rules, plus `noise`)
    DEIS (Zhang & Chen 2022, arXiv 2204.13902), in rho = sigma_t / alpha_t (the VE sigma) with alpha_t
      deis_logrho_coefficients(rho_t, rho_s0, rho_s1, rho_s2=None)         C_j, the "logrho" weights
      deis_multistep_update(x, eps_list, alpha_t, alpha_s0, coefficients)  x_t = alpha_t (x_s0 / alpha_s0 + sum C_j eps_sj)

  flow frame (velocity): x = (1 - sigma) x_0 + sigma eps, u = dx/dsigma (Lipman et al. 2023, arXiv 2210.02747;
  Liu et al. 2023, arXiv 2209.03003)
    flow_euler_step(sample, velocity, sigma, sigma_next)                 x + (sigma_next - sigma) u
    flow_stochastic_step(sample, velocity, sigma, sigma_next, noise)     re-noise the predicted x_0 to sigma_next

A new rule goes into the section of its frame, and into this index.
"""

from __future__ import annotations

import numpy as np
import torch

# ===== DDPM ======================================================================================


def posterior_variance(alpha_bar_t, alpha_bar_prev):
    """beta~_t = (1 - alpha_bar_prev) / (1 - alpha_bar_t) beta_t, with beta_t = 1 - alpha_bar_t / alpha_bar_prev:
    the variance of q(x_prev | x_t, x_0) (DDPM eq. 7). DDIM's eq. 16 at eta = 1 is the same number."""
    return (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)


def ddpm_posterior_mean(x0_pred: torch.Tensor, sample: torch.Tensor, alpha_bar_t, alpha_bar_prev) -> torch.Tensor:
    """mu~_t(x_t, x_0) = sqrt(alpha_bar_prev) beta_t / (1 - alpha_bar_t) x_0 + sqrt(alpha_t) (1 - alpha_bar_prev) / (1 - alpha_bar_t) x_t
    (DDPM eq. 7), where DDPM's one-step alpha_t = alpha_bar_t / alpha_bar_prev and beta_t = 1 - alpha_t."""
    alpha_step = alpha_bar_t / alpha_bar_prev  # DDPM's alpha_t (t - 1 = prev); not the VP alpha_t
    beta_step = 1 - alpha_step
    x0_coeff = alpha_bar_prev**0.5 * beta_step / (1 - alpha_bar_t)
    xt_coeff = alpha_step**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    return x0_coeff * x0_pred + xt_coeff * sample


# ===== DDIM ======================================================================================


def ddim_noise_std(alpha_bar_t, alpha_bar_prev, eta: float):
    """The std of the fresh noise of a DDIM step (the paper's sigma_t, eq. 16):
    eta sqrt( (1 - alpha_bar_prev) / (1 - alpha_bar_t) ) sqrt( 1 - alpha_bar_t / alpha_bar_prev )."""
    return eta * posterior_variance(alpha_bar_t, alpha_bar_prev) ** 0.5


def ddim_step(x0_pred, eps, alpha_bar_prev, noise_std=0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM, eq. 12:  x_prev = sqrt(alpha_bar_prev) x0_pred                         "predicted x_0"
                             + sqrt(1 - alpha_bar_prev - noise_std^2) eps          "direction pointing to x_t"
                             + noise_std z                                         "random noise" (if `noise`)"""
    direction = (1 - alpha_bar_prev - noise_std**2) ** 0.5 * eps
    prev_sample = alpha_bar_prev**0.5 * x0_pred + direction
    if noise is not None:
        prev_sample = prev_sample + noise_std * noise
    return prev_sample


# ===== PNDM ======================================================================================


def pndm_transfer(sample: torch.Tensor, eps: torch.Tensor, alpha_bar_t, alpha_bar_prev) -> torch.Tensor:
    """The transfer part phi(x_t, e, t, prev) of PNDM, formula (9):

    x_prev = sqrt(alpha_bar_prev / alpha_bar_t) x_t - (alpha_bar_prev - alpha_bar_t) e
             / ( sqrt(alpha_bar_t) ( sqrt((1 - alpha_bar_prev) alpha_bar_t) + sqrt((1 - alpha_bar_t) alpha_bar_prev) ) )

    With e the model's eps this is a DDIM step with eta = 0."""
    sample_coeff = (alpha_bar_prev / alpha_bar_t) ** 0.5
    eps_denominator = alpha_bar_t * (1 - alpha_bar_prev) ** 0.5 + (alpha_bar_t * (1 - alpha_bar_t) * alpha_bar_prev) ** 0.5
    return sample_coeff * sample - (alpha_bar_prev - alpha_bar_t) * eps / eps_denominator


def plms_eps(ets: list[torch.Tensor]) -> torch.Tensor:
    """The pseudo linear multi-step noise estimate of PNDM (eq. 12): Adams-Bashforth of order len(ets) <= 4
    over the past model outputs `ets`, oldest first."""
    if len(ets) == 1:
        return ets[-1]
    if len(ets) == 2:
        return (3 * ets[-1] - ets[-2]) / 2
    if len(ets) == 3:
        return (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
    return 1 / 24 * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])


# ===== Consistency models: LCM and TCD ===========================================================


def consistency_scalings(timestep, timestep_scaling: float, sigma_data: float = 0.5) -> tuple[float, float]:
    """The boundary condition of a consistency model (Song et al. 2023, arXiv 2303.01469, Appendix C), in LCM's
    discrete form (Luo et al. 2023, eq. 5) with the timestep stretched by `timestep_scaling`:

        c_skip(t) = sigma_data^2 / ((s t)^2 + sigma_data^2),   c_out(t) = s t / sqrt((s t)^2 + sigma_data^2)

    At t = 0, c_skip = 1 and c_out = 0, so f(x_0, 0) = x_0 exactly; at s t >> sigma_data, f is the x0 estimate."""
    scaled = timestep * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def consistency_function(x0_pred: torch.Tensor, sample: torch.Tensor, c_skip, c_out) -> torch.Tensor:
    """f_theta(x_t, t) = c_skip(t) x_t + c_out(t) x0_pred (Song et al. 2023, eq. 7): LCM's `denoised`."""
    return c_out * x0_pred + c_skip * sample


def renoise(x0: torch.Tensor, alpha_bar, noise: torch.Tensor) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1, line 5; LCM Algorithm 3): forget x_t and
    draw a fresh x_prev ~ q(x_prev | x0) = N(sqrt(alpha_bar_prev) x0, (1 - alpha_bar_prev) I)."""
    return alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise


def tcd_step(x0_pred: torch.Tensor, eps: torch.Tensor, alpha_bar_s, alpha_bar_prev, noise: torch.Tensor | None = None):
    """TCD's strategic stochastic sampling (Zheng et al. 2024, Algorithm 4 / eq. 8), from t to s = floor((1 - gamma) t_prev):

        x_s    = sqrt(alpha_bar_s) x0_pred + sqrt(1 - alpha_bar_s) eps                 DDIM's jump to s (the "pred_noised_sample")
        x_prev = sqrt(alpha_bar_prev / alpha_bar_s) x_s + sqrt(1 - alpha_bar_prev / alpha_bar_s) z   forward noise s -> prev

    gamma = 0 is a deterministic DDIM jump to t_prev; gamma = 1 jumps to x0 and re-noises as LCM does.
    Returns (x_prev, x_s); without `noise` x_prev is x_s."""
    pred_noised_sample = alpha_bar_s**0.5 * x0_pred + (1 - alpha_bar_s) ** 0.5 * eps
    if noise is None:
        return pred_noised_sample, pred_noised_sample
    ratio = alpha_bar_prev / alpha_bar_s
    return ratio**0.5 * pred_noised_sample + (1 - ratio) ** 0.5 * noise, pred_noised_sample


# ===== Euler, Euler ancestral (sigma, the VE frame) ==============================================


def to_d(sample: torch.Tensor, x0_pred: torch.Tensor, sigma) -> torch.Tensor:
    """dx/dsigma = (x - D(x; sigma)) / sigma, the probability-flow ODE of Karras et al. 2022 (eq. 3)."""
    return (sample - x0_pred) / sigma


def euler_step(sample: torch.Tensor, x0_pred: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One Euler step of the ODE from sigma to sigma_next (Karras et al. 2022, Algorithm 2, lines 7-8;
    k-diffusion's `sample_euler`)."""
    derivative = to_d(sample, x0_pred, sigma)
    return sample + derivative * (sigma_next - sigma)


def churn(sample: torch.Tensor, sigma, sigma_hat, s_noise: float, noise: torch.Tensor) -> torch.Tensor:
    """Raise the noise level from sigma to sigma_hat: x_hat = x + sqrt(sigma_hat^2 - sigma^2) s_noise z
    (Karras et al. 2022, Algorithm 2, lines 5-6)."""
    return sample + noise * s_noise * (sigma_hat**2 - sigma**2) ** 0.5


def ancestral_sigmas(sigma_from, sigma_to):
    """Split a step from sigma_from to sigma_to into a deterministic part down to sigma_down and fresh noise
    sigma_up, with sigma_down^2 + sigma_up^2 = sigma_to^2 (k-diffusion's `get_ancestral_step`, eta = 1)."""
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    # clamp: when sigma_to << sigma_from, fp32 round-off can make this sqrt(< 0) (diffusers then gives NaN)
    sigma_down = (sigma_to**2 - sigma_up**2).clamp(min=0) ** 0.5
    return sigma_down, sigma_up


def euler_ancestral_step(sample, x0_pred, sigma, sigma_down, sigma_up, noise: torch.Tensor) -> torch.Tensor:
    """k-diffusion's `sample_euler_ancestral`: an Euler step to sigma_down, then noise of std sigma_up."""
    return euler_step(sample, x0_pred, sigma, sigma_down) + noise * sigma_up


# ===== LMS =======================================================================================


def lagrange_basis_integral(nodes: list[float], j: int, start: float, end: float) -> float:
    """integral from `start` to `end` of L_j(tau) = prod_{k != j} (tau - nodes[k]) / (nodes[j] - nodes[k]), exactly.

    L_j is the Lagrange basis polynomial that is 1 at nodes[j] and 0 at the other nodes.
    """
    numerator, denominator = np.polynomial.Polynomial([1.0]), 1.0
    for k, node in enumerate(nodes):
        if k != j:
            numerator = numerator * np.polynomial.Polynomial([-node, 1.0])  # times (tau - nodes[k])
            denominator *= nodes[j] - node
    antiderivative = numerator.integ()
    return float(antiderivative(end) - antiderivative(start)) / denominator


def lms_coefficients(sigmas: list[float], sigma_next: float) -> list[float]:
    """c_j = integral from sigma_i to sigma_{i+1} of the Lagrange basis polynomial of node sigma_{i-j},
    over the nodes `sigmas` = [sigma_i, sigma_{i-1}, ..., sigma_{i-q+1}] (newest first)."""
    return [lagrange_basis_integral(sigmas, j, sigmas[0], sigma_next) for j in range(len(sigmas))]


def lms_step(sample: torch.Tensor, derivatives: list[torch.Tensor], coefficients: list[float]) -> torch.Tensor:
    """x_{i+1} = x_i + sum_j c_j d_{i-j}, with `derivatives` newest first (k-diffusion's `sample_lms`)."""
    return sample + sum(c_j * d for c_j, d in zip(coefficients, derivatives))


# ===== DPM++ SDE (Lu et al. 2022b; k-diffusion sample_dpmpp_sde), in log-sigma time =======================
# k-diffusion's DPM++ SDE works in log-sigma time t = -log(sigma) of the VE frame (t grows as the noise falls).


def log_sigma_time(sigma: torch.Tensor) -> torch.Tensor:
    """t = -log(sigma), k-diffusion's `t_fn`."""
    return sigma.log().neg()


def sigma_at(t: torch.Tensor) -> torch.Tensor:
    """sigma = e^-t, k-diffusion's `sigma_fn` (the inverse of `log_sigma_time`)."""
    return t.neg().exp()


def dpm_solver_pp_sde_stage(sample, x0_pred, t, t_to, noise: torch.Tensor, s_noise: float = 1.0) -> torch.Tensor:
    """One stage of k-diffusion's `sample_dpmpp_sde` (eta = 1): an ancestral DPM-Solver++(1) step from
    log-sigma time t to t_to. The step is split into a deterministic part down to sigma_down and fresh noise
    of std sigma_up (`ancestral_sigmas`); the deterministic part is DPM-Solver++(1) (2211.01095 eq. 8, k = 1,
    written in the VE frame, where it is exact for a constant x0_pred):

        x_to = (sigma_down / sigma) x - expm1(t - t_down) x0_pred + s_noise sigma_up z,   t_down = -log(sigma_down)

    Both stages of a DPM++ SDE step call this from the same x_i: stage 1 to the midpoint with D(x_i; sigma_i),
    stage 2 to t_{i+1} with D at the midpoint (2211.01095 Algorithm 1 with r_1 = 1/2)."""
    sigma = sigma_at(t)
    sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_at(t_to))
    t_down = log_sigma_time(sigma_down)
    deterministic = (sigma_at(t_down) / sigma) * sample - (t - t_down).expm1() * x0_pred
    return deterministic + noise * s_noise * sigma_up


# ===== Heun (Karras et al. 2022) ==================================================================


def heun_correction(sample: torch.Tensor, derivative: torch.Tensor, derivative_next: torch.Tensor, dt) -> torch.Tensor:
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (d_i + d'_i) / 2: Heun's trapezoidal correction of an Euler step,
    with d'_i the slope at the Euler step's end (Karras et al. 2022, arXiv 2206.00364, Algorithm 1, line 8)."""
    return sample + (derivative + derivative_next) / 2 * dt


# ===== DPM-Solver-2 in sigma (k-diffusion's sample_dpm_2 and sample_dpm_2_ancestral) ===============


def dpm_solver_2_step(sample: torch.Tensor, sample_mid: torch.Tensor, x0_mid: torch.Tensor, sigma, sigma_mid,
                      sigma_next) -> torch.Tensor:
    """x_{i+1} = x_i + (sigma_next - sigma_i) d_mid, with d_mid = (x_mid - D(x_mid; sigma_mid)) / sigma_mid the slope
    at the midpoint (DPM-Solver-2, Lu et al. 2022, arXiv 2206.00927, Algorithm 1 with r_1 = 1/2, in sigma as
    k-diffusion's `sample_dpm_2`). `sigma_next` is sigma_down for the ancestral variant."""
    return sample + to_d(sample_mid, x0_mid, sigma_mid) * (sigma_next - sigma)


# ===== DPM-Solver++ and DPM-Solver, multistep (the VP frame, in lambda) ==========================
# A step goes from lambda_s0 to lambda_t, h = lambda_t - lambda_s0; h_0, h_1 are the two previous steps.


def _first_difference(m_s0, m_s1, h, h_0):
    """D1 = (m_s0 - m_s1) / r0, r0 = h_0 / h: the slope in lambda, scaled by h (2211.01095, Algorithm 2)."""
    r0 = h_0 / h
    return (1.0 / r0) * (m_s0 - m_s1)


def _second_differences(m_s0, m_s1, m_s2, h, h_0, h_1):
    """D1 and D2 of the quadratic through the last three outputs (2206.00927 §3.3, multistep form)."""
    r0, r1 = h_0 / h, h_1 / h
    D1_0, D1_1 = (1.0 / r0) * (m_s0 - m_s1), (1.0 / r1) * (m_s1 - m_s2)
    D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)  # first derivative, second-order accurate
    D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)  # second derivative
    return D1, D2


def dpm_solver_pp_first_order(x, x0_s0, alpha_t, sigma_t, sigma_s0, lambda_t, lambda_s0):
    """DPM-Solver++(1) = DDIM: x_t = (sigma_t / sigma_s0) x_s0 - alpha_t (e^-h - 1) x0_s0  (2211.01095 eq. 8, k = 1)."""
    h = lambda_t - lambda_s0
    return (sigma_t / sigma_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0_s0


def dpm_solver_pp_second_order(x, x0_s0, x0_s1, alpha_t, sigma_t, sigma_s0, lambda_t, lambda_s0, lambda_s1, solver_type="midpoint"):
    """DPM-Solver++(2M) (2211.01095, Algorithm 2 for "midpoint"; "heun" integrates the linear term exactly)."""
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
    D0, D1 = x0_s0, _first_difference(x0_s0, x0_s1, h, h_0)
    x_t = (sigma_t / sigma_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * D0
    if solver_type == "midpoint":
        return x_t - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1
    return x_t + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1


def dpm_solver_pp_third_order(x, x0_s0, x0_s1, x0_s2, alpha_t, sigma_t, sigma_s0, lambda_t, lambda_s0, lambda_s1, lambda_s2):
    """DPM-Solver++(3M): the data prediction quadratic in lambda (2206.00927 §3.3 in data-prediction form)."""
    h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
    D1, D2 = _second_differences(x0_s0, x0_s1, x0_s2, h, h_0, h_1)
    return (
        (sigma_t / sigma_s0) * x
        - (alpha_t * (torch.exp(-h) - 1.0)) * x0_s0
        + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
        - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * D2
    )


def dpm_solver_first_order(x, eps_s0, alpha_t, sigma_t, alpha_s0, lambda_t, lambda_s0):
    """DPM-Solver-1: x_t = (alpha_t / alpha_s0) x_s0 - sigma_t (e^h - 1) eps_s0  (2206.00927 eq. 3.7)."""
    h = lambda_t - lambda_s0
    return (alpha_t / alpha_s0) * x - (sigma_t * (torch.exp(h) - 1.0)) * eps_s0


def dpm_solver_second_order(x, eps_s0, eps_s1, alpha_t, sigma_t, alpha_s0, lambda_t, lambda_s0, lambda_s1, solver_type="midpoint"):
    """DPM-Solver-2, multistep form (2206.00927 §3.3 and Algorithm 2 of 2211.01095 for noise prediction)."""
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
    D0, D1 = eps_s0, _first_difference(eps_s0, eps_s1, h, h_0)
    x_t = (alpha_t / alpha_s0) * x - (sigma_t * (torch.exp(h) - 1.0)) * D0
    if solver_type == "midpoint":
        return x_t - 0.5 * (sigma_t * (torch.exp(h) - 1.0)) * D1
    return x_t - (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1


def dpm_solver_third_order(x, eps_s0, eps_s1, eps_s2, alpha_t, sigma_t, alpha_s0, lambda_t, lambda_s0, lambda_s1, lambda_s2):
    """DPM-Solver-3, multistep form (2206.00927 §3.3)."""
    h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
    D1, D2 = _second_differences(eps_s0, eps_s1, eps_s2, h, h_0, h_1)
    return (
        (alpha_t / alpha_s0) * x
        - (sigma_t * (torch.exp(h) - 1.0)) * eps_s0
        - (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
        - (sigma_t * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5)) * D2
    )


def sde_dpm_solver_pp_first_order(x, x0_s0, alpha_t, sigma_t, sigma_s0, lambda_t, lambda_s0, noise):
    """SDE-DPM-Solver++(1) (2211.01095 §5): x_t = (sigma_t / sigma_s0) e^-h x_s0 + alpha_t (1 - e^-2h) x0_s0
    + sigma_t sqrt(1 - e^-2h) z."""
    h = lambda_t - lambda_s0
    return (
        (sigma_t / sigma_s0 * torch.exp(-h)) * x
        + (alpha_t * (1 - torch.exp(-2.0 * h))) * x0_s0
        + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
    )


def sde_dpm_solver_pp_second_order(x, x0_s0, x0_s1, alpha_t, sigma_t, sigma_s0, lambda_t, lambda_s0, lambda_s1, noise, solver_type="midpoint"):
    """SDE-DPM-Solver++(2M) (2211.01095 §5)."""
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
    D0, D1 = x0_s0, _first_difference(x0_s0, x0_s1, h, h_0)
    x_t = (sigma_t / sigma_s0 * torch.exp(-h)) * x + (alpha_t * (1 - torch.exp(-2.0 * h))) * D0
    if solver_type == "midpoint":
        x_t = x_t + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * D1
    else:
        x_t = x_t + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
    return x_t + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise


def sde_dpm_solver_pp_third_order(x, x0_s0, x0_s1, x0_s2, alpha_t, sigma_t, sigma_s0, lambda_t, lambda_s0, lambda_s1, lambda_s2, noise):
    """SDE-DPM-Solver++(3M) (2211.01095 §5, with the third-order differences of 2206.00927 §3.3)."""
    h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
    D1, D2 = _second_differences(x0_s0, x0_s1, x0_s2, h, h_0, h_1)
    return (
        (sigma_t / sigma_s0 * torch.exp(-h)) * x
        + (alpha_t * (1.0 - torch.exp(-2.0 * h))) * x0_s0
        + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
        + (alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * D2
        + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
    )


def sde_dpm_solver_first_order(x, eps_s0, alpha_t, sigma_t, alpha_s0, lambda_t, lambda_s0, noise):
    """SDE-DPM-Solver-1 (2211.01095 §5, noise prediction): x_t = (alpha_t / alpha_s0) x_s0
    - 2 sigma_t (e^h - 1) eps_s0 + sigma_t sqrt(e^2h - 1) z."""
    h = lambda_t - lambda_s0
    return (
        (alpha_t / alpha_s0) * x
        - 2.0 * (sigma_t * (torch.exp(h) - 1.0)) * eps_s0
        + sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0) * noise
    )


def sde_dpm_solver_second_order(x, eps_s0, eps_s1, alpha_t, sigma_t, alpha_s0, lambda_t, lambda_s0, lambda_s1, noise, solver_type="midpoint"):
    """SDE-DPM-Solver-2, multistep (2211.01095 §5, noise prediction)."""
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
    D0, D1 = eps_s0, _first_difference(eps_s0, eps_s1, h, h_0)
    x_t = (alpha_t / alpha_s0) * x - 2.0 * (sigma_t * (torch.exp(h) - 1.0)) * D0
    if solver_type == "midpoint":
        x_t = x_t - (sigma_t * (torch.exp(h) - 1.0)) * D1
    else:
        x_t = x_t - 2.0 * (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
    return x_t + sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0) * noise


# ===== UniPC (the VP frame, in lambda) ===========================================================
# m is what UniPC integrates: x0_pred when predict_x0 (as DPM-Solver++), eps otherwise.


def unipc_differences(m_s0, previous_outputs, previous_lambdas, lambda_s0, h):
    """r_k = (lambda_sk - lambda_s0) / h and D_k = (m_sk - m_s0) / r_k for the previous outputs m_s1, m_s2, ...
    (newest first), and r_p = 1 appended (§3.1). D_k stacked as (B, K, C, H, W), or None without history."""
    rks, D1s = [], []
    for m_sk, lambda_sk in zip(previous_outputs, previous_lambdas):
        rk = (lambda_sk - lambda_s0) / h
        rks.append(rk)
        D1s.append((m_sk - m_s0) / rk)
    rks.append(torch.ones((), device=m_s0.device))
    return torch.stack(rks), (torch.stack(D1s, dim=1) if D1s else None)


def unipc_bh_coefficients(h, rks, order: int, predict_x0: bool, solver_type: str):
    """h phi_1(h) = e^h - 1, B(h), and the order conditions R a = b of §3.2, one row per i = 1 .. order:

        sum_k r_k^(i-1) a_k = i! h phi_{i+1}(h) / B(h),   phi_{k+1}(h) = (phi_k(h) - 1/k!) / h,   phi_1(h) = (e^h - 1) / h

    For data prediction (predict_x0) h is replaced by -h. B(h) = h ("bh1") or e^h - 1 ("bh2")."""
    hh = -h if predict_x0 else h
    h_phi_1 = torch.expm1(hh)  # h phi_1(h) = e^h - 1
    B_h = hh if solver_type == "bh1" else torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1  # h phi_2(h) = (e^h - 1) / h - 1
    factorial_i = 1
    R, b = [], []
    for i in range(1, order + 1):
        R.append(torch.pow(rks, i - 1))  # r_k^(i-1)
        b.append(h_phi_k * factorial_i / B_h)  # i! h phi_{i+1}(h) / B(h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i  # h phi_{i+1}(h) -> h phi_{i+2}(h)
    return h_phi_1, B_h, torch.stack(R), torch.stack(b)


def uni_p_update(x, m_s0, D1s, R, b, h_phi_1, B_h, alpha_t, sigma_t, alpha_s0, sigma_s0, order: int, predict_x0: bool):
    """UniP-p, the predictor (§3.1, Algorithm 2 of the paper's appendix):
    x_t = (sigma_t / sigma_s0) x_s0 - alpha_t h phi_1 m_s0 - alpha_t B(h) sum_k a_k D_k   (data prediction)
    with a solving the first p - 1 order conditions (a_1 = 0.5 when p = 2)."""
    if D1s is None:
        pred_res = 0
    else:
        if order == 2:
            rhos_p = torch.ones(1, dtype=x.dtype, device=x.device) * 0.5  # fixed, not solved
        else:
            rhos_p = torch.linalg.solve(R[:-1, :-1], b[:-1]).to(x.device).to(x.dtype)
        pred_res = torch.einsum("k,bkc...->bc...", rhos_p, D1s)  # sum_k a_k D_k
    if predict_x0:
        x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m_s0 - alpha_t * B_h * pred_res
    else:
        x_t = alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m_s0 - sigma_t * B_h * pred_res
    return x_t.to(x.dtype)


def uni_c_update(x, m_s0, m_t, D1s, R, b, h_phi_1, B_h, alpha_t, sigma_t, alpha_s0, sigma_s0, order: int, predict_x0: bool):
    """UniC-p, the corrector (§3.1): the same step from x_s0 (`x`), with the model output m_t at the predicted x_t
    as one more point: - alpha_t B(h) (sum_k c_k D_k + c_p (m_t - m_s0)); c solves all p conditions (c_1 = 0.5 at p = 1)."""
    if order == 1:
        rhos_c = torch.ones(1, dtype=x.dtype, device=x.device) * 0.5  # fixed, not solved
    else:
        rhos_c = torch.linalg.solve(R, b).to(x.device).to(x.dtype)
    corr_res = 0 if D1s is None else torch.einsum("k,bkc...->bc...", rhos_c[:-1], D1s)  # sum_k c_k D_k
    D1_t = m_t - m_s0
    if predict_x0:
        x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m_s0 - alpha_t * B_h * (corr_res + rhos_c[-1] * D1_t)
    else:
        x_t = alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m_s0 - sigma_t * B_h * (corr_res + rhos_c[-1] * D1_t)
    return x_t.to(x.dtype)


# ===== DPM-Solver singlestep and DEIS (Lu et al. 2022; Zhang & Chen 2022), in lambda and rho ============
# Singlestep (DPM-Solver, arXiv 2206.00927, Algorithms 1-2; DPM-Solver++, arXiv 2211.01095, Algorithm 1): a step
# of order k goes from the level s where its group of k steps started (sample x_s, output m_s) to t, with
# h = lambda_t - lambda_s, using the outputs at the k - 1 levels r1 (, r2) between s and t that the group's
# earlier, lower-order steps reached. The positions of those levels, r_k = (lambda_rk - lambda_s) / h, lie in (0, 1).
# DEIS (arXiv 2204.13902): in rho = sigma_t / alpha_t the probability-flow ODE is d(x / alpha) / d rho = eps, so
# x_t / alpha_t = x_s0 / alpha_s0 + integral of eps over rho; AB-DEIS puts a polynomial through the past eps
# ("logrho": a polynomial in log rho) and integrates it exactly.


def dpm_solver_pp_2s(x_s, x0_s, x0_r, alpha_t, sigma_t, sigma_s, lambda_t, lambda_s, lambda_r, solver_type="midpoint"):
    """DPM-Solver++(2S) (2211.01095, Algorithm 1): with r = (lambda_r - lambda_s) / h,

        x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) (x0_s + (x0_r - x0_s) / (2 r))           ("midpoint")

    It is the 2M formula with the second point r ahead of s instead of behind it, so the 2M rule computes it
    (bit for bit: only signs change). "heun" is the 2M heun variant in the same way."""
    return dpm_solver_pp_second_order(x_s, x0_s, x0_r, alpha_t, sigma_t, sigma_s, lambda_t, lambda_s, lambda_r, solver_type)


def dpm_solver_2s(x_s, eps_s, eps_r, alpha_t, sigma_t, alpha_s, lambda_t, lambda_s, lambda_r, solver_type="midpoint"):
    """DPM-Solver-2 (2206.00927, Algorithm 1, final line, with the intermediate level r given):

        x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps_s - sigma_t / (2 r) (e^h - 1) (eps_r - eps_s)"""
    return dpm_solver_second_order(x_s, eps_s, eps_r, alpha_t, sigma_t, alpha_s, lambda_t, lambda_s, lambda_r, solver_type)


def sde_dpm_solver_pp_2s(x_s, x0_s, x0_r, alpha_t, sigma_t, sigma_s, lambda_t, lambda_s, lambda_r, noise, solver_type="midpoint"):
    """SDE-DPM-Solver++(2S) (2211.01095 §5): the SDE 2M rule with the second point ahead, as `dpm_solver_pp_2s`."""
    return sde_dpm_solver_pp_second_order(
        x_s, x0_s, x0_r, alpha_t, sigma_t, sigma_s, lambda_t, lambda_s, lambda_r, noise, solver_type
    )


def _singlestep_differences(m_s, m_r1, m_r2, h, lambda_s, lambda_r1, lambda_r2):
    """Slopes of the outputs over the step, scaled by h: D1_r2 = (m_r2 - m_s) / r2 (the secant to r2), and
    D1 = h m'(lambda_s), D2 = h^2 m''(lambda_s) of the quadratic through (0, m_s), (r1, m_r1), (r2, m_r2)."""
    r1, r2 = (lambda_r1 - lambda_s) / h, (lambda_r2 - lambda_s) / h
    D1_r1, D1_r2 = (1.0 / r1) * (m_r1 - m_s), (1.0 / r2) * (m_r2 - m_s)
    D1 = (r2 * D1_r1 - r1 * D1_r2) / (r2 - r1)
    D2 = 2.0 * (D1_r2 - D1_r1) / (r2 - r1)
    return D1_r2, D1, D2


def dpm_solver_pp_3s(x_s, x0_s, x0_r1, x0_r2, alpha_t, sigma_t, sigma_s, lambda_t, lambda_s, lambda_r1, lambda_r2, solver_type="midpoint"):
    """DPM-Solver++(3S), data prediction (DPM-Solver-3 of 2206.00927, Algorithm 2, in the form of 2211.01095):

        "midpoint": x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) x0_s + alpha_t ((e^-h - 1) / h + 1) D1_r2
        "heun":     the full quadratic: D1 in place of D1_r2, and - alpha_t ((e^-h - 1 + h) / h^2 - 1/2) D2"""
    h = lambda_t - lambda_s
    D1_r2, D1, D2 = _singlestep_differences(x0_s, x0_r1, x0_r2, h, lambda_s, lambda_r1, lambda_r2)
    x_t = (sigma_t / sigma_s) * x_s - (alpha_t * (torch.exp(-h) - 1.0)) * x0_s
    if solver_type == "midpoint":
        return x_t + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1_r2
    return x_t + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1 - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * D2


def dpm_solver_3s(x_s, eps_s, eps_r1, eps_r2, alpha_t, sigma_t, alpha_s, lambda_t, lambda_s, lambda_r1, lambda_r2, solver_type="midpoint"):
    """DPM-Solver-3 (2206.00927, Algorithm 2, final line; r2 = 2/3 there):

        "midpoint": x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps_s - sigma_t ((e^h - 1) / h - 1) D1_r2
        "heun":     the full quadratic: D1 in place of D1_r2, and - sigma_t ((e^h - 1 - h) / h^2 - 1/2) D2"""
    h = lambda_t - lambda_s
    D1_r2, D1, D2 = _singlestep_differences(eps_s, eps_r1, eps_r2, h, lambda_s, lambda_r1, lambda_r2)
    x_t = (alpha_t / alpha_s) * x_s - (sigma_t * (torch.exp(h) - 1.0)) * eps_s
    if solver_type == "midpoint":
        return x_t - (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1_r2
    return x_t - (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1 - (sigma_t * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5)) * D2


def sde_dpm_solver_pp_3s(x_s, x0_s, x0_r1, x0_r2, alpha_t, sigma_t, sigma_s, lambda_t, lambda_s, lambda_r1, lambda_r2, noise, solver_type="midpoint"):
    """SDE-DPM-Solver++(3S) (2211.01095 §5): as `dpm_solver_pp_3s` with the SDE's coefficients (h -> 2h in the
    data term) and fresh noise sigma_t sqrt(1 - e^-2h) z."""
    h = lambda_t - lambda_s
    D1_r2, D1, D2 = _singlestep_differences(x0_s, x0_r1, x0_r2, h, lambda_s, lambda_r1, lambda_r2)
    x_t = (sigma_t / sigma_s * torch.exp(-h)) * x_s + (alpha_t * (1.0 - torch.exp(-2.0 * h))) * x0_s
    if solver_type == "midpoint":
        x_t = x_t + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1_r2
    else:
        x_t = (
            x_t
            + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
            + (alpha_t * ((1.0 - torch.exp(-2.0 * h) + (-2.0 * h)) / (-2.0 * h) ** 2 - 0.5)) * D2
        )
    return x_t + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise


def _log(rho: torch.Tensor) -> torch.Tensor:
    """log rho as numpy computes it in float32 (diffusers' arithmetic). torch.log differs from it by one ulp for
    a few percent of inputs, and a DEIS weight, a difference of two nearly equal antiderivatives, magnifies that
    past 1e-5 at 25+ steps."""
    return torch.as_tensor(np.log(rho.detach().cpu().numpy()), device=rho.device)


def _logrho_integral_2(rho, rho_j, rho_k):
    """Antiderivative in rho of the Lagrange basis polynomial in log rho that is 1 at rho_j and 0 at rho_k:
    integral of (log rho - log rho_k) / (log rho_j - log rho_k) d rho = rho (log rho - log rho_k - 1) / (...)."""
    return rho * (-_log(rho_k) + _log(rho) - 1) / (_log(rho_j) - _log(rho_k))


def _logrho_integral_3(rho, rho_j, rho_k, rho_l):
    """As `_logrho_integral_2` for the quadratic basis (u - u_k)(u - u_l) / ((u_j - u_k)(u_j - u_l)), u = log rho,
    using integral of u^2 d rho = rho (u^2 - 2u + 2) and integral of u d rho = rho (u - 1)."""
    u, u_j, u_k, u_l = _log(rho), _log(rho_j), _log(rho_k), _log(rho_l)
    numerator = rho * (u_k * (u_l - u + 1) - u_l * u + u_l + u**2 - 2 * u + 2)
    return numerator / ((u_j - u_k) * (u_j - u_l))


def deis_logrho_coefficients(rho_t, rho_s0, rho_s1, rho_s2=None):
    """The AB-DEIS weights C_j = integral from rho_s0 to rho_t of the Lagrange basis polynomial (in log rho) of the
    past level s_j (2204.13902, AB-DEIS with the rho reparameterization): (C_0, C_1) or (C_0, C_1, C_2)."""
    if rho_s2 is None:
        bases = [(rho_s0, rho_s1), (rho_s1, rho_s0)]
        return [_logrho_integral_2(rho_t, *nodes) - _logrho_integral_2(rho_s0, *nodes) for nodes in bases]
    bases = [(rho_s0, rho_s1, rho_s2), (rho_s1, rho_s2, rho_s0), (rho_s2, rho_s0, rho_s1)]
    return [_logrho_integral_3(rho_t, *nodes) - _logrho_integral_3(rho_s0, *nodes) for nodes in bases]


def deis_multistep_update(x, eps_list, alpha_t, alpha_s0, coefficients):
    """AB-DEIS (2204.13902): x_t = alpha_t (x_s0 / alpha_s0 + sum_j C_j eps_sj), eps_list newest first.
    The first-order DEIS step is DPM-Solver-1 (`dpm_solver_first_order`)."""
    total = x / alpha_s0
    for C_j, eps_j in zip(coefficients, eps_list):
        total = total + C_j * eps_j
    return alpha_t * total


# ===== Flow matching (x = (1 - sigma) x_0 + sigma eps, u = dx/dsigma) =============================


def flow_euler_step(sample: torch.Tensor, velocity: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One Euler step of the flow ODE dx/dsigma = u(x, sigma) from sigma to sigma_next:
    x_next = x + (sigma_next - sigma) u. With u = (x - x0_pred) / sigma this is `euler_step` in the flow frame."""
    return sample + (sigma_next - sigma) * velocity


def flow_stochastic_step(sample: torch.Tensor, velocity: torch.Tensor, sigma, sigma_next, noise: torch.Tensor) -> torch.Tensor:
    """The stochastic variant of diffusers' FlowMatchEulerDiscreteScheduler: predict x_0 = x - sigma u, then put it
    back on the line at sigma_next with fresh noise, x_next = (1 - sigma_next) x_0 + sigma_next z (the flow-frame
    twin of DDPM-style ancestral sampling with all the noise renewed)."""
    x0_pred = sample - sigma * velocity
    return (1.0 - sigma_next) * x0_pred + sigma_next * noise
