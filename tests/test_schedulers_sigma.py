"""EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, LMSDiscreteScheduler: parity with diffusers
0.42.1 over their whole config surface, diffusers' published full-loop numbers (rebuilt here without
the oracle), img2img/inpainting `add_noise`, the LMS coefficients, the Beta quantiles, and the errors.

Tolerances (fp32):
- Euler, Euler ancestral: |ours - theirs| <= 1e-6 + 1e-5 |theirs| for every tensor of every step
  (`scheduler_parity.RTOL` / `ATOL`); timesteps must be equal exactly.
- LMS: rtol 1e-5 as above, but atol = 1e-6 * sigma_max (see `LMS_ATOL_PER_SIGMA`): diffusers
  evaluates the LMS integrand in float32 inside scipy's quadrature, so its coefficients differ from
  the exact ones by up to ~5e-7 relative (measured); that rounding, at the scale of the starting
  noise (sigma_max = 157 for the linear schedule, 2e4 for the cosine one), shows up as absolute error
  where x0_pred = x - sigma eps cancels to ~0.
"""

from __future__ import annotations

import itertools
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import diffusers
from minidiff import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LMSDiscreteScheduler
from minidiff.schedulers.base import velocity_vp
from minidiff.schedulers.schedules import beta_ppf, regularized_incomplete_beta
from minidiff.schedulers.lms import lagrange_basis_integral
from scheduler_parity import ATOL, RTOL, assert_close, dummy_sample, fake_model, run_parity

THEIRS = {
    EulerDiscreteScheduler: diffusers.EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler: diffusers.EulerAncestralDiscreteScheduler,
    LMSDiscreteScheduler: diffusers.LMSDiscreteScheduler,
}
ALL = list(THEIRS)
STOCHASTIC = {EulerDiscreteScheduler, EulerAncestralDiscreteScheduler}  # take a `generator`

SPACINGS = ["linspace", "leading", "trailing"]
OFFSETS = [0, 1]
# a made-up trained schedule (not any named one), to check `trained_betas` is used as given
TRAINED_BETAS = (np.linspace(1e-4**0.7, 0.02**0.7, 1000) ** (1 / 0.7)).tolist()
SCHEDULES = {
    "linear": {},  # diffusers' default 1e-4 .. 0.02
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),  # SD 1.5
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
    "trained_betas": dict(trained_betas=TRAINED_BETAS),
}
SD15 = SCHEDULES["scaled_linear"]
SMALL_STEP_COUNTS = [1, 2, 3, 5, 10, 20, 25, 27, 50, 100]
LMS_ATOL_PER_SIGMA = 1e-6  # LMS absolute tolerance per unit of init_noise_sigma (module docstring)


def predictions(cls) -> list[str]:
    # diffusers' Euler ancestral raises NotImplementedError for "sample" (minidiff supports it: tested below)
    return ["epsilon", "v_prediction"] if cls is EulerAncestralDiscreteScheduler else ["epsilon", "v_prediction", "sample"]


def parity(cls, config: dict, n: int, step_kwargs: dict | None = None, seed: int | None = 0) -> None:
    """`run_parity` with a generator for the stochastic schedulers and the LMS tolerance for LMS."""
    if cls is LMSDiscreteScheduler:
        theirs = THEIRS[cls](**config)
        theirs.set_timesteps(n)
        atol = LMS_ATOL_PER_SIGMA * max(1.0, float(theirs.init_noise_sigma))
        run_parity(cls, THEIRS[cls], config, n, step_kwargs, seed=None, atol=atol)
    else:
        run_parity(cls, THEIRS[cls], config, n, step_kwargs, seed=seed)


# ----- the shared config surface: every spacing x offset x prediction x beta schedule ---------------


def grid_cases() -> list:
    """The full product spacing x offset x prediction x schedule per class, each combination run at one
    step count from a cycle (so every option value meets several step counts) and again at 1 step.
    LMS's oracle is slow (a scipy quad per coefficient), so its cycle stops at 27 steps; its longer
    runs are in test_parity_options_long (100 steps) and test_parity_1000_steps."""
    cases = []
    for cls in ALL:
        step_counts = [n for n in SMALL_STEP_COUNTS if n <= 27 or cls is not LMSDiscreteScheduler]
        combos = itertools.product(SPACINGS, OFFSETS, predictions(cls), SCHEDULES)
        for i, (spacing, offset, prediction, schedule) in enumerate(combos):
            for n in sorted({1, step_counts[i % len(step_counts)]}):
                cases.append(pytest.param(cls, spacing, offset, prediction, schedule, n, id=f"{cls.__name__}-{spacing}-{offset}-{prediction}-{schedule}-{n}"))
    return cases


@pytest.mark.parametrize("cls, spacing, offset, prediction, schedule, n", grid_cases())
def test_parity_grid(cls, spacing, offset, prediction, schedule, n):
    config = dict(SCHEDULES[schedule], timestep_spacing=spacing, steps_offset=offset, prediction_type=prediction)
    if cls is EulerAncestralDiscreteScheduler and diffusers_sigma_down_is_nan(config, n):
        check_finite_where_diffusers_is_nan(config, n)
    else:
        parity(cls, config, n)


def diffusers_sigma_down_is_nan(config: dict, n: int) -> bool:
    """diffusers' Euler ancestral computes sigma_down = sqrt(sigma_to^2 - sigma_up^2) in fp32; when
    sigma_to << sigma_from (the cosine schedule's sigma_max is 2e4) round-off makes it sqrt(< 0) = NaN."""
    theirs = diffusers.EulerAncestralDiscreteScheduler(**config)
    theirs.set_timesteps(n)
    sigma_from, sigma_to = theirs.sigmas[:-1], theirs.sigmas[1:]
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    return bool(torch.isnan((sigma_to**2 - sigma_up**2) ** 0.5).any())


def check_finite_where_diffusers_is_nan(config: dict, n: int) -> None:
    """minidiff clamps sigma_to^2 - sigma_up^2 at 0: the loop stays finite, and each step lands where
    the float64 formula (sigma_down = sigma_to^2 / sigma_from, algebraically the same) puts it."""
    scheduler = EulerAncestralDiscreteScheduler(**config)
    scheduler.set_timesteps(n)
    sample = dummy_sample() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        i = scheduler.step_index or 0
        model_output = fake_model(scheduler.scale_model_input(sample, t), t)
        noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(i))
        output = scheduler.step(model_output, t, sample, generator=torch.Generator().manual_seed(i))
        sigma_from, sigma_to = scheduler.sigmas[i].double(), scheduler.sigmas[i + 1].double()
        sigma_down, sigma_up = sigma_to**2 / sigma_from, (sigma_to**2 * (sigma_from**2 - sigma_to**2)).sqrt() / sigma_from
        x0_pred = output.pred_original_sample.double()
        expected = sample.double() + (sample.double() - x0_pred) / sigma_from * (sigma_down - sigma_from) + noise * sigma_up
        assert torch.isfinite(output.prev_sample).all()
        # fp32 vs fp64: the step from sigma_from to sigma_down cancels x to ~1e-4 of its size, so compare at that scale
        assert_close(output.prev_sample, expected, f"step {i}", rtol=1e-5, atol=1e-6 * float(sigma_from))
        sample = output.prev_sample


# Each value of spacing, offset, prediction and schedule once at 1000 steps (LMS: one run, its oracle takes ~10 s).
THOUSAND_STEP_CASES = [
    ("linspace", 0, "epsilon", "linear"),
    ("leading", 1, "v_prediction", "scaled_linear"),
    ("trailing", 0, "sample", "squaredcos_cap_v2"),
    ("linspace", 1, "epsilon", "trained_betas"),
]


@pytest.mark.parametrize(
    "cls, case",
    [pytest.param(cls, case, marks=[] if case == THOUSAND_STEP_CASES[1] else [pytest.mark.long])  # SD's config by default
     for cls in (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler) for case in THOUSAND_STEP_CASES]
    + [pytest.param(LMSDiscreteScheduler, ("linspace", 1, "epsilon", "scaled_linear"), marks=pytest.mark.long)],
)
def test_parity_1000_steps(cls, case):
    spacing, offset, prediction, schedule = case
    if prediction not in predictions(cls):
        prediction = "epsilon"
    config = dict(SCHEDULES[schedule], timestep_spacing=spacing, steps_offset=offset, prediction_type=prediction)
    parity(cls, config, 1000)


# ----- options particular to one class -------------------------------------------------------------

EULER_OPTIONS = {
    "karras": dict(use_karras_sigmas=True),
    "exponential": dict(use_exponential_sigmas=True),
    "beta": dict(use_beta_sigmas=True),
    "karras_sigma_range": dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0),
    "exponential_sigma_range": dict(use_exponential_sigmas=True, sigma_min=0.05, sigma_max=14.0),
    "beta_sigma_range": dict(use_beta_sigmas=True, sigma_min=0.1, sigma_max=12.0),
    "log_linear": dict(interpolation_type="log_linear"),
    "continuous_v": dict(timestep_type="continuous", prediction_type="v_prediction"),
    "continuous_eps": dict(timestep_type="continuous"),
    "final_sigma_min": dict(final_sigmas_type="sigma_min"),
    "zero_snr": dict(rescale_betas_zero_snr=True),
    "zero_snr_v_trailing": dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    "karras_final_sigma_min": dict(use_karras_sigmas=True, final_sigmas_type="sigma_min"),
}
LMS_OPTIONS = {
    "karras": dict(use_karras_sigmas=True),
    "exponential": dict(use_exponential_sigmas=True),
    "beta": dict(use_beta_sigmas=True),
}
EULER_A_OPTIONS = {
    "zero_snr": dict(rescale_betas_zero_snr=True),
    "zero_snr_v_trailing": dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
}


def option_cases() -> list:
    """Each class-specific option with every spacing (SD 1.5's schedule first, then the others) at 1, 10
    and 27 steps (LMS: 1 and 10)."""
    cases = []
    for cls, options in ((EulerDiscreteScheduler, EULER_OPTIONS), (LMSDiscreteScheduler, LMS_OPTIONS), (EulerAncestralDiscreteScheduler, EULER_A_OPTIONS)):
        for k, (name, option) in enumerate(options.items()):
            for j, spacing in enumerate(SPACINGS):
                schedule = "scaled_linear" if j == 0 else list(SCHEDULES)[(k + j) % len(SCHEDULES)]
                config = dict(SCHEDULES[schedule], timestep_spacing=spacing, steps_offset=j % 2)
                config.update(option)
                for n in (1, 10) if cls is LMSDiscreteScheduler else (1, 10, 27):  # LMS's oracle is slow
                    cases.append(pytest.param(cls, config, n, id=f"{cls.__name__}-{name}-{spacing}-{schedule}-{n}"))
    return cases


# Every class-specific option at a long schedule too, several options per run to keep the file fast
# (a 1000-step run costs ~1 s; LMS's oracle ~10 s, so LMS's options run at 100 steps).
LONG_OPTION_CASES = [
    (EulerDiscreteScheduler, dict(SD15, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0, final_sigmas_type="sigma_min", prediction_type="v_prediction"), 1000),
    (EulerDiscreteScheduler, dict(SD15, use_exponential_sigmas=True, timestep_type="continuous", prediction_type="v_prediction", timestep_spacing="leading"), 1000),
    (EulerDiscreteScheduler, dict(SD15, use_beta_sigmas=True, rescale_betas_zero_snr=True, timestep_spacing="trailing"), 1000),
    (EulerDiscreteScheduler, dict(interpolation_type="log_linear", timestep_type="continuous", rescale_betas_zero_snr=True, prediction_type="sample"), 1000),
    (EulerAncestralDiscreteScheduler, dict(SD15, rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"), 1000),
    (LMSDiscreteScheduler, dict(SD15, use_karras_sigmas=True), 100),
    (LMSDiscreteScheduler, dict(SD15, use_exponential_sigmas=True), 100),  # trailing: see test_lms_coefficients_are_exact
    (LMSDiscreteScheduler, dict(use_beta_sigmas=True, timestep_spacing="leading", steps_offset=1, prediction_type="v_prediction"), 100),
]


@pytest.mark.long
@pytest.mark.parametrize("cls, config, n", LONG_OPTION_CASES)
def test_parity_options_long(cls, config, n):
    parity(cls, config, n)


@pytest.mark.parametrize("cls, config, n", option_cases())
def test_parity_options(cls, config, n):
    parity(cls, config, n)


@pytest.mark.parametrize(
    "step_kwargs, config, n",
    [
        (dict(s_churn=1.0), SD15, 10),
        (dict(s_churn=40.0, s_noise=1.003), SD15, 27),  # gamma capped at sqrt(2) - 1
        (dict(s_churn=80.0, s_tmin=0.5, s_tmax=5.0), dict(SD15, timestep_spacing="trailing"), 25),  # churn in a window only
        (dict(s_churn=10.0), dict(SD15, use_karras_sigmas=True, prediction_type="v_prediction"), 20),
        (dict(s_churn=100.0), {}, 1000),
        (dict(s_churn=5.0), dict(SD15, timestep_spacing="leading", steps_offset=1), 1),
    ],
)
def test_euler_churn_parity(step_kwargs, config, n):
    """s_churn > 0 draws noise: same generator seed, same numbers as diffusers."""
    parity(EulerDiscreteScheduler, config, n, step_kwargs, seed=0)


def run_both_after(ours, theirs, step_kwargs=None, global_seed=None):
    """A whole loop on two schedulers whose timesteps are already set; compares every output.

    With `global_seed`, each loop starts from `torch.manual_seed(global_seed)` and passes no generator
    (the noise then comes from torch's global generator, in the same order on both sides)."""
    assert_close(ours.timesteps, theirs.timesteps, "timesteps", rtol=0, atol=0)
    assert_close(ours.sigmas, theirs.sigmas, "sigmas")
    assert_close(float(ours.init_noise_sigma), float(theirs.init_noise_sigma), "init_noise_sigma")
    results = []
    for scheduler in (ours, theirs):
        if global_seed is not None:
            torch.manual_seed(global_seed)
        sample, outputs = dummy_sample() * float(theirs.init_noise_sigma), []
        for t in scheduler.timesteps:
            model_output = fake_model(scheduler.scale_model_input(sample, t), t)
            output = scheduler.step(model_output, t, sample, **(step_kwargs or {}))
            outputs.append((output.prev_sample, output.pred_original_sample))
            sample = output.prev_sample
        results.append(outputs)
    for i, ((ours_prev, ours_x0), (theirs_prev, theirs_x0)) in enumerate(zip(*results)):
        assert_close(ours_prev, theirs_prev, f"prev_sample at step {i}")
        assert_close(ours_x0, theirs_x0, f"pred_original_sample at step {i}")


@pytest.mark.parametrize(
    "cls, config, step_kwargs",
    [
        (EulerAncestralDiscreteScheduler, SD15, {}),
        (EulerAncestralDiscreteScheduler, dict(SD15, prediction_type="v_prediction", timestep_spacing="leading"), {}),
        (EulerDiscreteScheduler, SD15, dict(s_churn=2.0)),
    ],
)
def test_noise_without_generator_follows_global_seed(cls, config, step_kwargs):
    ours, theirs = cls(**config), THEIRS[cls](**config)
    ours.set_timesteps(12)
    theirs.set_timesteps(12)
    run_both_after(ours, theirs, step_kwargs, global_seed=1234)


@pytest.mark.parametrize(
    "config, kwargs",
    [
        (SD15, dict(timesteps=[999, 800.5, 613, 402, 201, 50, 3])),
        (dict(SD15, prediction_type="v_prediction", final_sigmas_type="sigma_min"), dict(timesteps=[950, 500, 20])),
        (dict(SD15, interpolation_type="log_linear"), dict(timesteps=[999, 700, 300, 10])),
        (SD15, dict(sigmas=[14.6, 9.0, 4.2, 1.7, 0.6, 0.1, 0.0])),
        ({}, dict(sigmas=[150.0, 20.0, 2.0, 0.2, 0.02])),
        (dict(SD15, timestep_type="continuous", prediction_type="v_prediction"), dict(sigmas=[14.0, 3.0, 0.5, 0.0])),
    ],
)
def test_euler_custom_timesteps_and_sigmas(config, kwargs):
    ours, theirs = EulerDiscreteScheduler(**config), diffusers.EulerDiscreteScheduler(**config)
    ours.set_timesteps(**kwargs)
    theirs.set_timesteps(**kwargs)
    assert ours.num_inference_steps == theirs.num_inference_steps
    run_both_after(ours, theirs)


@pytest.mark.parametrize("cls", ALL)
def test_schedule_before_set_timesteps_matches(cls):
    """Before `set_timesteps` the schedule is every training timestep (what `add_noise` in training uses)."""
    ours, theirs = cls(**SD15), THEIRS[cls](**SD15)
    assert_close(ours.sigmas, theirs.sigmas, "sigmas")
    assert_close(ours.timesteps, theirs.timesteps.float(), "timesteps", rtol=0, atol=0)
    assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, "alphas_cumprod", rtol=0, atol=0)


# ----- LMS coefficients: exact polynomial integrals vs diffusers' scipy quadrature --------------------

LMS_COEFFICIENT_RTOL = 1e-6  # diffusers' integrand is evaluated in float32; measured worst ~5e-7 relative


@pytest.mark.parametrize("config, n", [(SD15, 10), (SD15, 50), ({}, 27), (dict(use_karras_sigmas=True, **SD15), 25), (SCHEDULES["squaredcos_cap_v2"], 20)])
def test_lms_coefficients_match_diffusers(config, n):
    ours, theirs = LMSDiscreteScheduler(**config), diffusers.LMSDiscreteScheduler(**config)
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    for t in range(n):
        for order in range(1, min(t + 1, 4) + 1):
            for j in range(order):
                ours_c, theirs_c = ours.get_lms_coefficient(order, t, j), theirs.get_lms_coefficient(order, t, j)
                assert abs(ours_c - theirs_c) <= LMS_COEFFICIENT_RTOL * abs(theirs_c) + 1e-12, (t, order, j, ours_c, theirs_c)


def exact_lagrange_integral(nodes: list[float], j: int, start: float, end: float) -> float:
    """The same integral in exact rational arithmetic (the reference for the float64 one)."""
    nodes, start, end = [Fraction(node) for node in nodes], Fraction(start), Fraction(end)
    coefficients, denominator = [Fraction(1)], Fraction(1)  # of prod_{k != j} (tau - nodes[k]), lowest power first
    for k, node in enumerate(nodes):
        if k != j:
            shifted = [Fraction(0), *coefficients]
            coefficients = [high - node * low for high, low in zip(shifted, [*coefficients, Fraction(0)])]
            denominator *= nodes[j] - node
    antiderivative = lambda x: sum(c * x ** (p + 1) / (p + 1) for p, c in enumerate(coefficients))  # noqa: E731
    return float((antiderivative(end) - antiderivative(start)) / denominator)


def test_lms_coefficients_are_exact():
    """minidiff's coefficients equal exact rational integrals to ~1e-11 (float64 round-off), including the badly
    conditioned last step of an exponential schedule (nodes 0.06..0.07 extrapolated to 0: coefficients
    ~100 that cancel to ~0.06). There diffusers' fp32-evaluated quadrature is off by up to 4e-6, which
    the cancellation turns into ~1e-4 relative error in its last prev_sample, so that config (trailing,
    100 steps) is checked here against the exact values instead of against diffusers."""
    scheduler = LMSDiscreteScheduler(**SD15, use_exponential_sigmas=True, timestep_spacing="trailing")
    scheduler.set_timesteps(100)
    for t in (3, 50, 98, 99):
        nodes = [float(scheduler.sigmas[t - k]) for k in range(4)]
        for j in range(4):
            exact = exact_lagrange_integral(nodes, j, float(scheduler.sigmas[t]), float(scheduler.sigmas[t + 1]))
            assert scheduler.get_lms_coefficient(4, t, j) == pytest.approx(exact, rel=1e-10, abs=1e-15)  # float64 round-off


def test_lagrange_basis_integrals_are_exact():
    """The basis polynomials sum to 1 (so the coefficients sum to the step), and integrate x^k exactly."""
    nodes, start, end = [3.0, 4.5, 7.0, 11.0], 3.0, 1.25
    coefficients = [lagrange_basis_integral(nodes, j, start, end) for j in range(4)]
    assert sum(coefficients) == pytest.approx(end - start, rel=1e-14)
    for power in range(4):  # sum_j c_j f(node_j) integrates any cubic f exactly
        integral = sum(c * node**power for c, node in zip(coefficients, nodes))
        assert integral == pytest.approx((end ** (power + 1) - start ** (power + 1)) / (power + 1), rel=1e-12)
    assert lagrange_basis_integral([2.0], 0, 2.0, 0.5) == -1.5  # order 1: plain Euler


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0.01, 200.0), min_size=1, max_size=4, unique=True),
    st.floats(0.0, 200.0),
    st.lists(st.floats(-2.0, 2.0), min_size=4, max_size=4),
)
def test_lms_quadrature_is_exact_for_cubics(nodes, end, cubic):
    """Property: the weights c_j = int L_j integrate every polynomial of degree < len(nodes) exactly
    (here: a random one), since L_j is the Lagrange basis on the nodes."""
    nodes = sorted(nodes, reverse=True)
    assume(all(a - b > 0.05 for a, b in zip(nodes, nodes[1:])))  # near-coincident nodes: round-off dominates
    cubic = cubic[: len(nodes)]  # degree len(nodes) - 1
    start = nodes[0]
    weights = [lagrange_basis_integral(nodes, j, start, end) for j in range(len(nodes))]
    by_weights = sum(w * sum(c * node**p for p, c in enumerate(cubic)) for w, node in zip(weights, nodes))
    exact = sum(c * (end ** (p + 1) - start ** (p + 1)) / (p + 1) for p, c in enumerate(cubic))
    scale = sum(abs(w) for w in weights) * max(1.0, max(nodes)) ** len(nodes)
    assert abs(by_weights - exact) <= 1e-9 * scale


def test_lms_order_argument_matches_diffusers():
    """`step(order=2)` keeps two derivatives, as diffusers."""
    ours, theirs = LMSDiscreteScheduler(**SD15), diffusers.LMSDiscreteScheduler(**SD15)
    ours.set_timesteps(15)
    theirs.set_timesteps(15)
    atol = LMS_ATOL_PER_SIGMA * float(theirs.init_noise_sigma)
    sample_ours = sample_theirs = dummy_sample() * float(theirs.init_noise_sigma)
    for t in theirs.timesteps:
        model_output = fake_model(theirs.scale_model_input(sample_theirs, t), t)
        ours.scale_model_input(sample_ours, t)
        sample_ours = ours.step(model_output, t, sample_ours, order=2).prev_sample
        sample_theirs = theirs.step(model_output, t, sample_theirs, order=2).prev_sample
        assert_close(sample_ours, sample_theirs, f"prev_sample at t={float(t)}", atol=atol)
    assert len(ours.derivatives) == 2


# ----- Beta(0.6, 0.6) quantiles without scipy -------------------------------------------------------


def test_beta_quantiles_match_scipy():
    from scipy import stats  # scipy is only an oracle here

    xs = np.concatenate([np.linspace(0, 1, 201), [1e-12, 1e-6, 1 - 1e-6, 1 - 1e-12]])
    for a, b in ((0.6, 0.6), (2.5, 0.7), (3.0, 5.0)):
        ours = np.array([regularized_incomplete_beta(x, a, b) for x in xs])
        np.testing.assert_allclose(ours, stats.beta.cdf(xs, a, b), rtol=0, atol=1e-13)  # float64 round-off
    quantiles = 1 - np.linspace(0, 1, 101)
    ours = np.array([beta_ppf(q, 0.6, 0.6) for q in quantiles])
    np.testing.assert_allclose(ours, stats.beta.ppf(quantiles, 0.6, 0.6), rtol=0, atol=1e-13)


# ----- diffusers' published full-loop numbers, rebuilt without the oracle ------------------------------


def dummy_sample_deter() -> torch.Tensor:
    """diffusers' `dummy_sample_deter`: arange(4*3*8*8)/n laid out as (3, 8, 8, 4), permuted to (4, 3, 8, 8)."""
    n = 4 * 3 * 8 * 8
    return (torch.arange(n) / n).reshape(3, 8, 8, 4).permute(3, 0, 1, 2)


def published_loop(scheduler, generator=None) -> torch.Tensor:
    """diffusers' test loop for these schedulers: note `sample` is *reassigned* to the scaled model
    input, and that scaled sample is what `step` gets."""
    scheduler.set_timesteps(10)
    sample = dummy_sample_deter() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        sample = scheduler.scale_model_input(sample, t)
        model_output = sample * t / (t + 1)  # diffusers' dummy model
        kwargs = {"generator": generator} if generator is not None else {}
        sample = scheduler.step(model_output, t, sample, **kwargs).prev_sample
    return sample


PUBLISHED_CONFIG = dict(num_train_timesteps=1100, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
# (class name, seeded?, sum |x|, mean |x|), from diffusers' tests; checked to 1e-2 / 1e-3 as they are
PUBLISHED = [
    ("EulerDiscreteScheduler", True, 10.0807, 0.0131),
    ("EulerAncestralDiscreteScheduler", True, 152.3192, 0.1983),
    ("LMSDiscreteScheduler", False, 1006.388, 1.31),
]


@pytest.mark.parametrize("library", ["minidiff", "diffusers"])
@pytest.mark.parametrize("name, seeded, expected_sum, expected_mean", PUBLISHED)
def test_published_full_loop(library, name, seeded, expected_sum, expected_mean):
    """minidiff reproduces the published numbers; the same loop on diffusers checks the loop itself."""
    import minidiff

    cls = getattr(minidiff if library == "minidiff" else diffusers, name)
    generator = torch.Generator().manual_seed(0) if seeded else None  # the tests' torch.manual_seed(0) stream
    sample = published_loop(cls(**PUBLISHED_CONFIG), generator)
    assert abs(sample.abs().sum().item() - expected_sum) < 1e-2
    assert abs(sample.abs().mean().item() - expected_mean) < 1e-3


# ----- add_noise: training, img2img (set_begin_index), inpainting ------------------------------------


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("config, n, strength", [(SD15, 10, 0.6), (dict(SD15, timestep_spacing="leading", steps_offset=1), 25, 0.3), (dict(SD15, use_karras_sigmas=True), 20, 0.75)])
def test_img2img_add_noise_after_set_begin_index(cls, config, n, strength):
    """The img2img pipeline: skip the first steps with set_begin_index(t_start * order), noise the image
    to the first remaining timestep with add_noise, then denoise; equal to diffusers all the way."""
    if "use_karras_sigmas" in config and cls is EulerAncestralDiscreteScheduler:
        config = SD15
    ours, theirs = cls(**config), THEIRS[cls](**config)
    latents = {}
    x0 = dummy_sample(seed=1)
    noise = dummy_sample(seed=2)
    for name, scheduler in (("ours", ours), ("theirs", theirs)):
        scheduler.set_timesteps(n)
        t_start = n - min(int(n * strength), n)
        timesteps = scheduler.timesteps[t_start * scheduler.order :]
        scheduler.set_begin_index(t_start * scheduler.order)
        sample = scheduler.add_noise(x0, noise, timesteps[:1].repeat(x0.shape[0]))
        generator = torch.Generator().manual_seed(0)
        kwargs = {"generator": generator} if cls in STOCHASTIC else {}
        for t in timesteps:
            model_output = fake_model(scheduler.scale_model_input(sample, t), t)
            sample = scheduler.step(model_output, t, sample, **kwargs).prev_sample
            if name == "ours" and t == timesteps[0]:
                assert scheduler.step_index == t_start + 1
        latents[name] = sample
    atol = LMS_ATOL_PER_SIGMA * 15 if cls is LMSDiscreteScheduler else ATOL
    assert_close(latents["ours"], latents["theirs"], "img2img result", atol=atol)


@pytest.mark.parametrize("cls", ALL)
def test_add_noise_training_and_inpainting(cls):
    """Without set_begin_index each timestep is searched (x + sigma_t eps per sample); after a step
    (inpainting re-noises the known region) the current step index is used; as diffusers."""
    ours, theirs = cls(**SD15), THEIRS[cls](**SD15)
    x0, noise = dummy_sample(batch=3, seed=3), dummy_sample(batch=3, seed=4)
    ours.set_timesteps(20)
    theirs.set_timesteps(20)
    timesteps = theirs.timesteps[[0, 7, 19]]
    assert_close(ours.add_noise(x0, noise, timesteps), theirs.add_noise(x0, noise, timesteps), "add_noise (search)")
    expected = x0 + noise * ours.sigmas[[0, 7, 19]].reshape(3, 1, 1, 1)
    assert_close(ours.add_noise(x0, noise, timesteps), expected, "x0 + sigma eps")
    for scheduler in (ours, theirs):  # inpainting: a pipeline with set_begin_index, one step taken
        scheduler.set_begin_index(0)
        t = scheduler.timesteps[0]
        model_output = fake_model(scheduler.scale_model_input(x0, t), t)
        kwargs = {"generator": torch.Generator().manual_seed(0)} if cls in STOCHASTIC else {}
        scheduler.step(model_output, t, x0, **kwargs)
    later = theirs.timesteps[[1, 1, 1]]
    assert_close(ours.add_noise(x0, noise, later), theirs.add_noise(x0, noise, later), "add_noise (after a step)")


def test_index_for_timestep_takes_the_second_match():
    ours, theirs = EulerDiscreteScheduler(), diffusers.EulerDiscreteScheduler()
    schedule = torch.tensor([999.0, 500.0, 500.0, 10.0])
    assert ours.index_for_timestep(torch.tensor(500.0), schedule) == theirs.index_for_timestep(torch.tensor(500.0), schedule) == 2
    assert ours.index_for_timestep(torch.tensor(10.0), schedule) == 3


def test_euler_get_velocity_at_training_timesteps():
    """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0, read from the timestep's own noise level.

    With every training timestep visited, sigma_t is the training sigma, so this equals the DDPM-form
    velocity indexed by t (diffusers 0.42.1 indexes alphas_cumprod by the position instead: not compared)."""
    scheduler = EulerDiscreteScheduler(**SD15)
    scheduler.set_timesteps(1000)
    x0, noise = dummy_sample(batch=3, seed=5), dummy_sample(batch=3, seed=6)
    timesteps = scheduler.timesteps[[0, 500, 990]]
    expected = velocity_vp(scheduler.alphas_cumprod, x0, noise, timesteps.long())
    assert_close(scheduler.get_velocity(x0, noise, timesteps), expected, "velocity", rtol=1e-5, atol=1e-5)


# ----- behaviour that is not a number: outputs, dtypes, configs --------------------------------------


def test_euler_ancestral_sample_prediction():
    """diffusers' Euler ancestral raises for prediction_type="sample"; minidiff takes x0 from the model.
    Fed x0 = x - sigma eps, it must match the epsilon run exactly (same generator)."""
    eps_scheduler, x0_scheduler = EulerAncestralDiscreteScheduler(**SD15), EulerAncestralDiscreteScheduler(**SD15, prediction_type="sample")
    samples = []
    for scheduler in (eps_scheduler, x0_scheduler):
        scheduler.set_timesteps(8)
        generator, sample = torch.Generator().manual_seed(0), dummy_sample() * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            eps = fake_model(scheduler.scale_model_input(sample, t), t)
            sigma = scheduler.sigmas[scheduler.step_index]
            model_output = eps if scheduler is eps_scheduler else sample - sigma * eps
            sample = scheduler.step(model_output, t, sample, generator=generator).prev_sample
        samples.append(sample)
    assert_close(samples[1], samples[0], "sample-prediction run")


@pytest.mark.parametrize("cls", ALL)
def test_tuple_output_equals_dataclass_and_shape(cls):
    outputs = []
    for return_dict in (True, False):
        scheduler = cls(**SD15)
        scheduler.set_timesteps(5)
        t, sample = scheduler.timesteps[0], dummy_sample(batch=1)
        kwargs = {"generator": torch.Generator().manual_seed(0)} if cls in STOCHASTIC else {}
        output = scheduler.step(fake_model(scheduler.scale_model_input(sample, t), t), t, sample, return_dict=return_dict, **kwargs)
        outputs.append(output.to_tuple() if return_dict else output)
    assert outputs[0][0].shape == sample.shape
    for ours, tuple_value in zip(*outputs):
        assert torch.equal(ours, tuple_value)


@pytest.mark.parametrize("cls", [EulerDiscreteScheduler, EulerAncestralDiscreteScheduler])
def test_fp16_model_output_keeps_dtype_and_matches_diffusers(cls):
    """Euler and Euler ancestral update in fp32 and cast back to the model's dtype, as diffusers."""
    results = []
    for scheduler in (cls(**SD15), THEIRS[cls](**SD15)):
        scheduler.set_timesteps(6)
        generator, sample = torch.Generator().manual_seed(0), (dummy_sample() * scheduler.init_noise_sigma).half()
        for t in scheduler.timesteps:
            model_output = fake_model(scheduler.scale_model_input(sample, t).float(), t).half()
            sample = scheduler.step(model_output, t, sample, generator=generator).prev_sample
            assert sample.dtype == torch.float16
        results.append(sample)
    assert torch.equal(results[0], results[1])


def test_default_arguments_match_diffusers():
    import inspect

    for cls, theirs in THEIRS.items():
        ours_params = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"}
        theirs_params = {name: p.default for name, p in inspect.signature(theirs.__init__).parameters.items() if name != "self"}
        assert ours_params == theirs_params, cls.__name__
        assert cls.order == theirs.order


@pytest.mark.parametrize("cls", ALL)
def test_config_round_trip_and_sd15_defaults(cls, tmp_path):
    scheduler = cls(**SD15, timestep_spacing="trailing", steps_offset=1)
    scheduler.save_config(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    # SD 1.5's scheduler_config.json has no timestep_spacing: these classes then use their own default
    sd15_json = dict(_class_name="PNDMScheduler", num_train_timesteps=1000, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, **SD15)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PNDM's own keys are reported
        from_sd15 = cls.from_config(sd15_json)
    assert from_sd15.config.timestep_spacing == "linspace"
    assert cls in cls.compatibles


@pytest.mark.parametrize("cls", ALL)
def test_step_warns_when_scale_model_input_was_skipped(cls):
    scheduler = cls(**SD15)
    scheduler.set_timesteps(3)
    t, sample = scheduler.timesteps[0], dummy_sample(batch=1)
    with pytest.warns(UserWarning, match="scale_model_input"):
        scheduler.step(sample, t, sample)


# ----- errors -------------------------------------------------------------------------------------


# Euler, Euler Ancestral and LMS step before set_timesteps (on all training timesteps), as diffusers:
# tests/test_scheduler_api.py.


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("n", [0, -3, 1001])
def test_bad_num_inference_steps_raises(cls, n):
    with pytest.raises(ValueError, match="num_inference_steps must be between 1 and num_train_timesteps=1000"):
        cls().set_timesteps(n)


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize(
    "field, value",
    [("beta_schedule", "cosine"), ("prediction_type", "x0"), ("timestep_spacing", "uniform")],
)
def test_unknown_choice_raises_at_construction(cls, field, value):
    with pytest.raises(ValueError, match=f"unknown {field} '{value}'; expected one of"):
        cls(**{field: value})


@pytest.mark.parametrize(
    "field, value",
    [("interpolation_type", "cubic"), ("timestep_type", "karras"), ("final_sigmas_type", "one")],
)
def test_unknown_euler_choice_raises_at_construction(field, value):
    with pytest.raises(ValueError, match=f"unknown {field} '{value}'"):
        EulerDiscreteScheduler(**{field: value})


@pytest.mark.parametrize("cls", [EulerDiscreteScheduler, LMSDiscreteScheduler])
def test_two_sigma_schedules_raise(cls):
    with pytest.raises(ValueError, match="at most one"):
        cls(use_karras_sigmas=True, use_beta_sigmas=True)


# Only Euler and Euler a: diffusers' LMS takes an integer timestep, and so does minidiff's (test_scheduler_contract.py).
@pytest.mark.parametrize("cls", [EulerDiscreteScheduler, EulerAncestralDiscreteScheduler])
@pytest.mark.parametrize("timestep", [3, torch.tensor(3), torch.tensor([999], dtype=torch.int32)[0], np.int64(3)])
def test_integer_timestep_to_step_raises(cls, timestep):
    scheduler = cls()
    scheduler.set_timesteps(5)
    sample = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="pass the float values of `scheduler.timesteps`"):
        scheduler.step(sample, timestep, sample)


def test_integer_timesteps_to_get_velocity_raise():
    scheduler = EulerDiscreteScheduler()
    sample = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="get_velocity got the integer timestep"):
        scheduler.get_velocity(sample, sample, torch.tensor([3]))


@pytest.mark.parametrize(
    "config, kwargs, message",
    [
        ({}, {}, "exactly one of num_inference_steps, timesteps or sigmas"),
        ({}, dict(num_inference_steps=5, timesteps=[900, 100]), "exactly one of"),
        ({}, dict(timesteps=[900, 100], sigmas=[3.0, 1.0, 0.0]), "exactly one of"),
        (dict(use_karras_sigmas=True), dict(timesteps=[900, 100]), "use_karras_sigmas=True"),
        (dict(timestep_type="continuous", prediction_type="v_prediction"), dict(timesteps=[900, 100]), "pass custom `sigmas` instead"),
        ({}, dict(sigmas=[1.0]), "at least two values"),
        ({}, dict(timesteps=[]), "at least one timestep"),
    ],
)
def test_euler_bad_set_timesteps_arguments_raise(config, kwargs, message):
    with pytest.raises(ValueError, match=message):
        EulerDiscreteScheduler(**config).set_timesteps(**kwargs)


def test_lms_repeated_noise_level_raises():
    """'leading' + steps_offset=1 at N = T visits t = 1000, clamped to sigma_999 like t = 999 (diffusers: inf/NaN)."""
    with pytest.raises(ValueError, match="LMS needs distinct noise levels, but timesteps 1000.0 and 999.0"):
        LMSDiscreteScheduler(timestep_spacing="leading", steps_offset=1).set_timesteps(1000)


def test_timestep_not_in_schedule_raises():
    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    sample = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="not one of this scheduler's timesteps"):
        scheduler.scale_model_input(sample, torch.tensor(123.25))
