"""The scheduler core on its own: parameterization.py (model output -> x0 / eps) and update_rules.py.

These check the identities between the update rules that the papers state (DDIM with eta = 0 is the Euler
step in sigma; DPM-Solver-1 is DDIM; DDIM with eta = 1 has DDPM's posterior mean; PNDM's transfer with the
model's eps is DDIM), in float64 on random tensors. Parity with diffusers is in tests/test_schedulers_*.py.
"""

import inspect
import math
from types import SimpleNamespace

import pytest
import torch

import minidiff.schedulers as schedulers
from minidiff.pipelines.stable_diffusion import StableDiffusionPipeline
from minidiff.schedulers import parameterization as P
from minidiff.schedulers import update_rules as U

torch.manual_seed(0)


def random_state(alpha_bar: float, shape=(2, 3, 4, 4)):
    """x0, eps and the VP pair at alpha_bar, in float64."""
    x0, eps = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    alpha_t, sigma_t = P.vp_from_alpha_bar(torch.tensor(alpha_bar, dtype=torch.float64))
    return x0, eps, alpha_t, sigma_t


@pytest.mark.parametrize("alpha_bar", [0.999, 0.5, 0.01])
def test_parameterization_round_trips_x0_eps_v_in_the_vp_frame(alpha_bar):
    x0, eps, alpha_t, sigma_t = random_state(alpha_bar)
    sample = P.add_noise_vp(x0, eps, alpha_t, sigma_t)
    v = P.velocity(x0, eps, alpha_t, sigma_t)
    outputs = {"epsilon": eps, "v_prediction": v, "sample": x0}
    for prediction_type, model_output in outputs.items():
        torch.testing.assert_close(P.to_x0(model_output, sample, alpha_t, sigma_t, prediction_type), x0, rtol=0, atol=1e-12)
        torch.testing.assert_close(P.to_eps(model_output, sample, alpha_t, sigma_t, prediction_type), eps, rtol=0, atol=1e-10)
    torch.testing.assert_close(P.eps_from_x0(P.x0_from_eps(eps, sample, alpha_t, sigma_t), sample, alpha_t, sigma_t), eps)


@pytest.mark.parametrize("alpha_bar", [0.999, 0.5, 0.01])
def test_parameterization_round_trips_in_the_ve_frame(alpha_bar):
    x0, eps, alpha_t, sigma_t = random_state(alpha_bar)
    alpha_t2, sigma_t2, lambda_t = P.vp_from_sigma(sigma_t / alpha_t)  # VE sigma -> back to the VP pair
    torch.testing.assert_close((alpha_t2, sigma_t2), (alpha_t, sigma_t))
    assert lambda_t.item() == pytest.approx(math.log(alpha_t / sigma_t))
    sigma = sigma_t / alpha_t
    sample_ve = P.add_noise_ve(x0, eps, sigma)  # = x_t / alpha_t
    torch.testing.assert_close(sample_ve, P.add_noise_vp(x0, eps, alpha_t, sigma_t) / alpha_t)
    outputs = {"epsilon": eps, "v_prediction": P.velocity(x0, eps, alpha_t, sigma_t), "sample": x0}
    for prediction_type, model_output in outputs.items():
        torch.testing.assert_close(P.to_x0_ve(model_output, sample_ve, sigma, prediction_type), x0, rtol=0, atol=1e-10)
        torch.testing.assert_close(P.to_eps_ve(model_output, sample_ve, sigma, prediction_type), eps, rtol=0, atol=1e-8)


def test_unknown_prediction_type_is_refused():
    x = torch.zeros(1, 1, 2, 2)
    for convert in (P.to_x0, P.to_eps):
        with pytest.raises(ValueError, match="prediction_type"):
            convert(x, x, 1.0, 0.0, "flow_prediction")
    with pytest.raises(ValueError, match="prediction_type"):
        P.to_x0_ve(x, x, 1.0, "flow_prediction")


def test_limit_x0_thresholds_clips_or_leaves_alone():
    x0 = torch.linspace(-3, 3, 2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4)
    config = SimpleNamespace(thresholding=False, clip_sample=True, clip_sample_range=1.5)
    assert P.limit_x0(x0, config, clip_range=1.5).abs().max() == 1.5
    assert torch.equal(P.limit_x0(x0, config), x0)  # a clip_sample in the config alone does nothing (another class's)
    config.thresholding, config.dynamic_thresholding_ratio, config.sample_max_value = True, 0.9, 2.0
    limited = P.limit_x0(x0, config)
    assert limited.abs().max() <= 1.0 and torch.equal(limited, P.dynamic_threshold(x0, 0.9, 2.0))


@pytest.mark.parametrize("alpha_bar_t, alpha_bar_prev", [(0.3, 0.5), (0.01, 0.2), (0.9, 0.999)])
def test_ddim_with_eta_0_is_the_euler_step_in_sigma(alpha_bar_t, alpha_bar_prev):
    x0, eps, alpha_t, sigma_t = random_state(alpha_bar_t)
    alpha_prev, sigma_prev = P.vp_from_alpha_bar(torch.tensor(alpha_bar_prev, dtype=torch.float64))
    sample = P.add_noise_vp(x0, eps, alpha_t, sigma_t)
    x0_pred = P.to_x0(eps, sample, alpha_t, sigma_t, "epsilon")
    ddim = U.ddim_step(x0_pred, eps, torch.tensor(alpha_bar_prev, dtype=torch.float64))
    euler = U.euler_step(sample / alpha_t, x0_pred, sigma_t / alpha_t, sigma_prev / alpha_prev)  # x = x_t / alpha_t
    torch.testing.assert_close(ddim, euler * alpha_prev, rtol=0, atol=1e-12)


@pytest.mark.parametrize("alpha_bar_t, alpha_bar_prev", [(0.3, 0.5), (0.01, 0.2), (0.9, 0.999)])
def test_dpm_solver_first_order_is_ddim(alpha_bar_t, alpha_bar_prev):
    x0, eps, alpha_s0, sigma_s0 = random_state(alpha_bar_t)
    alpha_t, sigma_t = P.vp_from_alpha_bar(torch.tensor(alpha_bar_prev, dtype=torch.float64))
    lambda_s0, lambda_t = torch.log(alpha_s0 / sigma_s0), torch.log(alpha_t / sigma_t)
    sample = P.add_noise_vp(x0, eps, alpha_s0, sigma_s0) + 0.1 * torch.randn_like(x0)  # any x: the identity is exact
    x0_pred = P.to_x0(eps, sample, alpha_s0, sigma_s0, "epsilon")
    ddim = U.ddim_step(x0_pred, eps, torch.tensor(alpha_bar_prev, dtype=torch.float64))
    dpmpp = U.dpm_solver_pp_first_order(sample, x0_pred, alpha_t, sigma_t, sigma_s0, lambda_t, lambda_s0)
    dpm = U.dpm_solver_first_order(sample, eps, alpha_t, sigma_t, alpha_s0, lambda_t, lambda_s0)
    torch.testing.assert_close(dpmpp, ddim, rtol=0, atol=1e-12)
    torch.testing.assert_close(dpm, ddim, rtol=0, atol=1e-12)
    # UniP at order 1 (no history) is the same step, with e^-h - 1 computed by expm1
    h = lambda_t - lambda_s0
    h_phi_1, B_h, R, b = U.unipc_bh_coefficients(h, torch.ones(1, dtype=torch.float64), 1, True, "bh2")
    unip = U.uni_p_update(sample, x0_pred, None, R, b, h_phi_1, B_h, alpha_t, sigma_t, alpha_s0, sigma_s0, 1, True)
    torch.testing.assert_close(unip, ddim, rtol=0, atol=1e-12)


def test_higher_orders_reduce_to_first_order_when_the_model_output_is_constant():
    x0, eps, alpha_s0, sigma_s0 = random_state(0.3)
    alpha_t, sigma_t = P.vp_from_alpha_bar(torch.tensor(0.6, dtype=torch.float64))
    lambdas = [torch.log(alpha_t / sigma_t), torch.log(alpha_s0 / sigma_s0), torch.tensor(-0.9, dtype=torch.float64), torch.tensor(-1.4, dtype=torch.float64)]
    sample = P.add_noise_vp(x0, eps, alpha_s0, sigma_s0)
    first = U.dpm_solver_pp_first_order(sample, x0, alpha_t, sigma_t, sigma_s0, *lambdas[:2])
    for solver_type in ("midpoint", "heun"):
        second = U.dpm_solver_pp_second_order(sample, x0, x0, alpha_t, sigma_t, sigma_s0, *lambdas[:3], solver_type)
        torch.testing.assert_close(second, first, rtol=0, atol=1e-12)
    third = U.dpm_solver_pp_third_order(sample, x0, x0, x0, alpha_t, sigma_t, sigma_s0, *lambdas)
    torch.testing.assert_close(third, first, rtol=0, atol=1e-12)


def test_dpm_solver_pp_heun_is_exact_when_x0_is_linear_in_lambda():
    """With x0(lambda) linear, the exponential integrator of 2211.01095 eq. 6 has a closed form, which 2M-heun must give."""
    x0_a, x0_b, alpha_s0, sigma_s0 = random_state(0.3)
    alpha_t, sigma_t = P.vp_from_alpha_bar(torch.tensor(0.6, dtype=torch.float64))
    lambda_t, lambda_s0 = torch.log(alpha_t / sigma_t), torch.log(alpha_s0 / sigma_s0)
    lambda_s1 = lambda_s0 - 0.37
    x0_at = lambda lam: x0_a + (lam - lambda_s0) * x0_b  # noqa: E731
    sample = torch.randn_like(x0_a)
    h = lambda_t - lambda_s0
    # x_t = (sigma_t / sigma_s0) x_s0 + sigma_t int_{lambda_s0}^{lambda_t} e^lambda x0(lambda) dlambda
    exact = (sigma_t / sigma_s0) * sample + alpha_t * ((1 - torch.exp(-h)) * x0_a + (h - 1 + torch.exp(-h)) * x0_b)
    heun = U.dpm_solver_pp_second_order(sample, x0_at(lambda_s0), x0_at(lambda_s1), alpha_t, sigma_t, sigma_s0, lambda_t, lambda_s0, lambda_s1, "heun")
    torch.testing.assert_close(heun, exact, rtol=0, atol=1e-12)


def test_ddim_with_eta_1_has_the_ddpm_posterior_mean_and_variance():
    x0, eps, alpha_t, sigma_t = random_state(0.4)
    alpha_bar_t, alpha_bar_prev = torch.tensor(0.4, dtype=torch.float64), torch.tensor(0.55, dtype=torch.float64)
    sample = P.add_noise_vp(x0, eps, alpha_t, sigma_t)
    noise_std = U.ddim_noise_std(alpha_bar_t, alpha_bar_prev, eta=1.0)
    assert noise_std**2 == pytest.approx(U.posterior_variance(alpha_bar_t, alpha_bar_prev).item(), rel=1e-12)
    ddim_mean = U.ddim_step(x0, eps, alpha_bar_prev, noise_std)  # no noise: the mean
    torch.testing.assert_close(ddim_mean, U.ddpm_posterior_mean(x0, sample, alpha_bar_t, alpha_bar_prev), rtol=0, atol=1e-12)


def test_pndm_transfer_with_the_model_eps_is_a_ddim_step():
    x0, eps, alpha_t, sigma_t = random_state(0.2)
    alpha_bar_t, alpha_bar_prev = torch.tensor(0.2, dtype=torch.float64), torch.tensor(0.35, dtype=torch.float64)
    sample = P.add_noise_vp(x0, eps, alpha_t, sigma_t)
    torch.testing.assert_close(U.pndm_transfer(sample, eps, alpha_bar_t, alpha_bar_prev), U.ddim_step(x0, eps, alpha_bar_prev), rtol=0, atol=1e-12)


def test_linear_multistep_weights():
    ets = [torch.full((1,), 2.0)] * 4
    for order in range(1, 5):  # Adams-Bashforth weights sum to 1: a constant output stays itself
        assert U.plms_eps(ets[:order]).item() == pytest.approx(2.0)
    assert U.plms_eps([torch.tensor(0.0), torch.tensor(1.0)]).item() == 1.5  # linear extrapolation by half a step
    assert U.lms_coefficients([3.0], 2.0) == [-1.0]  # one node: the Euler step sigma_next - sigma
    sample, x0 = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    d = U.to_d(sample, x0, 3.0)
    torch.testing.assert_close(U.lms_step(sample, [d], [-1.0]), U.euler_step(sample, x0, 3.0, 2.0))


def test_ancestral_step_lands_at_sigma_to():
    sigma_from, sigma_to = torch.tensor(5.0), torch.tensor(2.0)
    sigma_down, sigma_up = U.ancestral_sigmas(sigma_from, sigma_to)
    assert (sigma_down**2 + sigma_up**2).item() == pytest.approx(sigma_to.item() ** 2, rel=1e-6)
    assert U.ancestral_sigmas(sigma_from, torch.tensor(0.0)) == (0.0, 0.0)


@pytest.mark.parametrize("predict_x0", [True, False])
def test_unipc_right_hand_side_is_factorial_times_h_phi(predict_x0):
    """b[i-1] = i! h phi_{i+1}(h) / B(h), with phi_2(h) = (e^h - 1 - h) / h^2 and phi_3(h) = (e^h - 1 - h - h^2/2) / h^3."""
    h = torch.tensor(0.7, dtype=torch.float64)
    hh = -h if predict_x0 else h
    _, B_h, _, b = U.unipc_bh_coefficients(h, torch.tensor([0.5, 1.0], dtype=torch.float64), 2, predict_x0, "bh2")
    phi_2 = (torch.exp(hh) - 1 - hh) / hh**2
    phi_3 = (torch.exp(hh) - 1 - hh - hh**2 / 2) / hh**3
    torch.testing.assert_close(b * B_h, torch.stack([1 * hh * phi_2, 2 * hh * phi_3]), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", [n for n in schedulers.__all__ if n != "SchedulerMixin" and not n.endswith("Output")])
def test_every_scheduler_step_accepts_a_generator(name):
    assert "generator" in inspect.signature(getattr(schedulers, name).step).parameters


def test_pipeline_passes_generator_always_and_eta_only_to_ddim():
    generator = torch.Generator().manual_seed(0)
    euler = SimpleNamespace(scheduler=schedulers.EulerDiscreteScheduler())
    ddim = SimpleNamespace(scheduler=schedulers.DDIMScheduler())
    assert StableDiffusionPipeline.step_kwargs(euler, generator, 0.0) == {"generator": generator}
    assert StableDiffusionPipeline.step_kwargs(ddim, generator, 0.5) == {"generator": generator, "eta": 0.5}
    with pytest.raises(ValueError, match="eta"):
        StableDiffusionPipeline.step_kwargs(euler, generator, 0.5)
