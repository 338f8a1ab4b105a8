"""The accuracy lab: the reference ODE solve, the noise levels of each scheduler, the measured orders and sample statistics.

The convergence table is computed once (module fixture) with minidiff's own schedulers, exactly as
`minidiff demo` computes it; the thresholds below are the claims the lab makes about it.
"""

from __future__ import annotations

import csv
import math
import types

import numpy as np
import pytest
import torch
from PIL import Image

from minidiff.lab import accuracy
from minidiff.lab.gaussian_mixture import GaussianMixtureDenoiser
from minidiff.viz.grid import image_grid
from minidiff.viz.plotting import loglog_plot

FIRST_ORDER = ("DDIM", "Euler", "DPM++ 1")
HIGHER_ORDER_SMOOTH_END = ("LMS", "DPM++ 2M sigma_min", "DPM++ 3M sigma_min")  # no first-order jump to sigma = 0
HIGHER_ORDER_SD_DEFAULT = ("PNDM (PLMS)", "DPM++ 2M", "DPM++ 3M", "UniPC bh1", "UniPC bh2")
SD_DEFAULT_ROWS = FIRST_ORDER + ("LMS",) + HIGHER_ORDER_SD_DEFAULT


@pytest.fixture(scope="module")
def convergence() -> dict[str, accuracy.ConvergenceResult]:
    model = accuracy.mixture_2d(torch.float64)
    noise = torch.randn(64, 2, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cache: dict = {}
    results = {}
    for setup in accuracy.DETERMINISTIC_SETUPS:
        if setup.label not in SD_DEFAULT_ROWS + HIGHER_ORDER_SMOOTH_END:
            continue  # the other rows (Heun, DPM2, DPM++ 2S/3S, DEIS) are measured and asserted in tutorial 04
        result = accuracy.measure_convergence(setup, model, noise, accuracy.DEFAULT_STEPS, cache=cache)
        assert result is not None, f"minidiff has no {setup.class_name}"
        results[setup.label] = result
    print("\n" + accuracy.format_convergence_table(list(results.values())))  # shown with pytest -s
    return results


# ----- the reference ----------------------------------------------------------------------------------------


def test_pf_ode_solver_matches_the_closed_form_for_a_single_gaussian():
    """One component: x(sigma) - mu = (x(sigma_1) - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma_1^2)) exactly."""
    mu = torch.tensor([[0.7, -1.2, 0.3]], dtype=torch.float64)[:, :, None, None]
    model = GaussianMixtureDenoiser.from_components(mu, data_std=0.4)
    x_start = torch.randn(5, 3, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 14.6
    for sigma_to in (3.0, 0.05, 0.0):
        x_end = accuracy.probability_flow_ode(model, x_start, 14.6, sigma_to)
        expected = mu + (x_start - mu) * math.sqrt((0.4**2 + sigma_to**2) / (0.4**2 + 14.6**2))
        torch.testing.assert_close(x_end, expected, rtol=0, atol=1e-9)  # solver tolerance 1e-10


def test_pf_ode_solver_matches_scipy_dop853_on_the_mixture():
    from scipy.integrate import solve_ivp

    model = accuracy.mixture_2d()
    x_start = torch.randn(3, 2, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 14.6

    def velocity(sigma, flat):
        x = torch.from_numpy(flat).reshape(3, 2, 1, 1)
        return (-sigma * model.posterior(x, 1.0, sigma).score).reshape(-1).numpy()

    scipy_end = solve_ivp(velocity, (14.6, 0.0), x_start.reshape(-1).numpy(), method="DOP853", rtol=1e-12, atol=1e-12).y[:, -1]
    ours = accuracy.probability_flow_ode(model, x_start, 14.6, 0.0)
    np.testing.assert_allclose(ours.reshape(-1).numpy(), scipy_end, rtol=0, atol=1e-8)  # both ~1e-10 accurate


def test_noise_levels_follow_each_scheduler_path():
    sd = accuracy.SD15_SCHEDULER_CONFIG
    ddim = accuracy.make_scheduler(accuracy.SchedulerSetup("DDIM", "DDIMScheduler"))
    ddim.set_timesteps(50)
    levels = accuracy.noise_levels(ddim)
    alphas_cumprod = ddim.alphas_cumprod.double()
    assert int(ddim.timesteps[0]) == 981  # leading spacing, steps_offset 1
    assert levels.sigma_first == pytest.approx(math.sqrt((1 - alphas_cumprod[981]) / alphas_cumprod[981]), rel=1e-12)
    assert levels.sigma_last == pytest.approx(math.sqrt((1 - alphas_cumprod[0]) / alphas_cumprod[0]), rel=1e-12)  # final_alpha_cumprod
    assert not levels.variance_exploding
    euler = accuracy.make_scheduler(accuracy.SchedulerSetup("Euler", "EulerDiscreteScheduler"))
    euler.set_timesteps(10)
    levels = accuracy.noise_levels(euler)
    assert levels.variance_exploding and levels.sigma_last == 0.0 and levels.sigma_first == pytest.approx(14.6146, abs=1e-3)
    dpm = accuracy.make_scheduler(accuracy.SchedulerSetup("x", "DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min"}))
    dpm.set_timesteps(10)
    assert accuracy.noise_levels(dpm).sigma_last == pytest.approx(math.sqrt((1 - alphas_cumprod[0]) / alphas_cumprod[0]), rel=1e-6)
    ddpm = accuracy.make_scheduler(accuracy.SchedulerSetup("DDPM", "DDPMScheduler"))
    ddpm.set_timesteps(10)
    assert accuracy.noise_levels(ddpm).sigma_last == 0.0
    assert sd["beta_schedule"] == "scaled_linear" and ddim.config.set_alpha_to_one is False
    with pytest.raises(ValueError, match="does not know where"):
        accuracy.noise_levels(object())


def test_reference_endpoint_in_the_scheduler_scaling_and_cached():
    """VP-scaled schedulers get x / sqrt(sigma^2 + 1) back; a second call with the same start is a cache hit."""
    model = accuracy.mixture_2d()
    noise = torch.randn(4, 2, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dpm = accuracy.make_scheduler(accuracy.SchedulerSetup("x", "DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min"}))
    dpm.set_timesteps(10)
    levels = accuracy.noise_levels(dpm)
    cache: dict = {}
    vp_end = accuracy.reference_endpoint(dpm, model, noise, cache=cache)
    ve_end = accuracy.probability_flow_ode(model, noise * math.sqrt(levels.sigma_first**2 + 1), levels.sigma_first, levels.sigma_last)
    torch.testing.assert_close(vp_end, ve_end / math.sqrt(levels.sigma_last**2 + 1))
    assert accuracy.reference_endpoint(dpm, model, noise.clone(), cache=cache) is vp_end and len(cache) == 1


# ----- deterministic schedulers: the measured orders ------------------------------------------------------


def test_first_order_methods_measure_order_one(convergence):
    for label in FIRST_ORDER:
        assert 0.8 <= convergence[label].order <= 1.3, f"{label}: order {convergence[label].order:.2f}"


def test_higher_order_methods_without_the_final_jump_measure_clearly_above_first_order(convergence):
    best_first_order = max(convergence[label].order for label in FIRST_ORDER)
    for label in HIGHER_ORDER_SMOOTH_END:
        assert convergence[label].order >= best_first_order + 0.4, f"{label}: {convergence[label].order:.2f} vs {best_first_order:.2f}"


def test_higher_order_methods_with_sd_defaults_are_more_accurate_at_every_step_count(convergence):
    """With final_sigmas_type "zero", DPM-Solver++/UniPC end with a first-order jump to sigma = 0 (their asymptotic
    order is ~1, as the lab's notes explain), but they stay well below every first-order method at every step count."""
    for index, steps in enumerate(accuracy.DEFAULT_STEPS):
        best_first_order = min(convergence[label].errors[index] for label in FIRST_ORDER)
        for label in HIGHER_ORDER_SD_DEFAULT:
            assert convergence[label].errors[index] <= 0.6 * best_first_order, f"{label} at {steps} steps"
    for label in ("DPM++ 2M", "DPM++ 3M", "UniPC bh2"):
        assert 0.7 <= convergence[label].order <= 1.3, f"{label}: the final jump should make it first order asymptotically"
        assert convergence[label].order_few_steps > max(convergence[f].order_few_steps for f in FIRST_ORDER)


def test_every_deterministic_error_falls_as_steps_grow(convergence):
    for label in SD_DEFAULT_ROWS:
        errors = convergence[label].errors
        assert all(np.isfinite(errors)), f"{label} diverged: {errors}"
        assert all(later < earlier for earlier, later in zip(errors, errors[1:])), f"{label}: {errors}"
    for label in HIGHER_ORDER_SMOOTH_END:  # the sigma_min variants wobble at 10-20 steps (a huge last lambda-step)
        assert convergence[label].errors[-1] < convergence[label].errors[0] / 50


def test_fit_order():
    steps = [10, 20, 40, 80]
    assert accuracy.fit_order(steps, [3.0 * n**-2 for n in steps]) == pytest.approx(2.0, abs=1e-12)
    assert math.isnan(accuracy.fit_order(steps, [1.0, float("nan"), 0.1, 0.01]))


def test_tables_and_csv(convergence, tmp_path):
    results = list(convergence.values())
    table = accuracy.format_convergence_table(results)
    assert all(label in table for label in convergence) and "order" in table
    path = accuracy.write_convergence_csv(results, tmp_path / "accuracy.csv")
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == len(results) * len(accuracy.DEFAULT_STEPS)
    euler_200 = next(r for r in rows if r["scheduler"] == "Euler" and r["steps"] == "200")
    assert float(euler_200["rms_error"]) == pytest.approx(convergence["Euler"].errors[-1], rel=1e-5)


# ----- stochastic schedulers: sample statistics -----------------------------------------------------------


def test_distribution_stats_are_unbiased_on_exact_samples_and_detect_a_wrong_variance():
    model = accuracy.mixture_2d()
    samples, _ = model.sample_data(4000, torch.Generator().manual_seed(0))
    stats = accuracy.distribution_stats(model, samples)
    assert max(abs(z) for c in stats for z in (c.frequency_z, c.mean_z, c.variance_z)) < 4  # 12 z-scores of N(0, 1)
    assert sum(c.frequency for c in stats) == pytest.approx(1.0, abs=1e-12)
    widened = accuracy.distribution_stats(model, samples * 1.15)  # 15% too wide and shifted away from 0
    assert max(abs(c.variance_z) for c in widened) > 6


@pytest.mark.parametrize("setup", accuracy.STOCHASTIC_SETUPS, ids=lambda s: s.label)
def test_stochastic_schedulers_sample_the_mixture(setup):
    """At 200 steps the sample statistics match the mixture within sampling error (|z| < 4 for 12 statistics of
    2000 samples); at 10 steps (5 for the second-order SDE-DPM++ 2M, DPM2 a and DPM++ SDE) the same statistics see
    the discretization error."""
    model = accuracy.mixture_2d(torch.float32)
    good = accuracy.measure_distribution(setup, model, 200, num_samples=2000, seed=0)
    assert good.max_abs_z < 4, accuracy.format_distribution_table([good])
    few_steps = 5 if setup.label in ("SDE-DPM++ 2M", "DPM2 a", "DPM++ SDE") else 10
    poor = accuracy.measure_distribution(setup, model, few_steps, num_samples=2000, seed=0)
    assert poor.max_abs_z > 5, accuracy.format_distribution_table([poor])


# ----- building schedulers, plots ---------------------------------------------------------------------------


def test_make_scheduler_uses_the_sd15_config_and_reports_missing_classes():
    scheduler = accuracy.make_scheduler(accuracy.SchedulerSetup("DPM++ 3M", "DPMSolverMultistepScheduler", {"solver_order": 3}))
    assert scheduler.config.solver_order == 3 and scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.timestep_spacing == "linspace"  # the class's default: SD 1.5's config has no timestep_spacing
    assert accuracy.make_scheduler(accuracy.DETERMINISTIC_SETUPS[0], library=types.SimpleNamespace()) is None


def test_loglog_plot_and_image_grid_write_valid_pngs(tmp_path):
    path = loglog_plot(
        {"a": ([5, 10, 20], [1e-1, 5e-2, 2.5e-2]), "diverged": ([5, 10], [float("nan"), float("nan")])},
        tmp_path / "plot.png", title="t", x_label="steps", y_label="error", dashed=("a",),
    )
    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG"
    tile_image = Image.new("RGB", (8, 8), "red")
    grid = image_grid([[tile_image, None], [None, tile_image]], ["r1", "r2"], ["c1", "c2"], tmp_path / "grid.png")
    with Image.open(grid) as image:
        assert image.format == "PNG" and image.size[0] > 2 * 16
    with pytest.raises(ValueError, match="one per label"):
        image_grid([[tile_image]], ["r1", "r2"], ["c1"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="at least one positive, finite point"):
        loglog_plot({"x": ([1, 2], [float("nan"), 0.0])}, tmp_path / "empty.png")


def test_the_lab_covers_all_fourteen_schedulers_of_compatibles():
    """`minidiff demo` and tutorial 04 measure every class that SD 1.5's `scheduler.compatibles` lists."""
    from minidiff import DDIMScheduler

    measured = {s.class_name for s in accuracy.DETERMINISTIC_SETUPS + accuracy.STOCHASTIC_SETUPS}
    assert measured == {c.__name__ for c in DDIMScheduler.compatibles}
    assert len(measured) == 14
    for setup in accuracy.DETERMINISTIC_SETUPS + accuracy.STOCHASTIC_SETUPS:
        scheduler = accuracy.make_scheduler(setup)
        scheduler.set_timesteps(10)
        accuracy.noise_levels(scheduler)  # each class has a known start, end and scaling
