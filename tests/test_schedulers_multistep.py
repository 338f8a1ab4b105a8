"""DPMSolverMultistepScheduler and UniPCMultistepScheduler: parity with diffusers 0.42.1, published numbers, errors.

Parity runs go through `scheduler_parity.run_parity` (whole loop, every prev_sample compared with
RTOL 1e-5 / ATOL 1e-6 in fp32, timesteps compared exactly). Option values are swept one family at a
time with a few step counts each (always 1, and 1000 where diffusers gives finite numbers), not as
the full cartesian product, to keep this file well under a minute on one core.

Two places where diffusers itself produces NaN are tested as such, not hidden:
- linspace/leading spacing with N close to T rounds two timesteps to the same value; h = 0 there and
  the next multistep update divides by it. minidiff mirrors this (both NaN at the same step).
- UniPC stepping to sigma = 0 (final_sigmas_type "zero") with bh1 or predict_x0=False computes inf * 0.
  minidiff returns the limit, x0_pred, instead; every earlier step still matches diffusers.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import minidiff
from minidiff import DPMSolverMultistepScheduler, UniPCMultistepScheduler
from scheduler_parity import assert_close, dummy_sample, fake_model, run_parity

diffusers = pytest.importorskip("diffusers")
TheirDPM = diffusers.DPMSolverMultistepScheduler
TheirUniPC = diffusers.UniPCMultistepScheduler

SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
TRAINED_BETAS = np.linspace(0.0002, 0.03, 1000).tolist()
BETA_SCHEDULES = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(trained_betas=TRAINED_BETAS),
]


@pytest.fixture(autouse=True)
def _quiet_deprecations():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers' and our deprecation of "dpmsolver"
        yield


def dpm_parity(config: dict, n: int, seed: int | None = None) -> None:
    assert run_parity(DPMSolverMultistepScheduler, TheirDPM, config, n, seed=seed) >= 1


def unipc_parity(config: dict, n: int) -> None:
    assert run_parity(UniPCMultistepScheduler, TheirUniPC, config, n) >= 1


def loop(scheduler, n: int, sample: torch.Tensor | None = None, model=fake_model, **step_kwargs) -> list[torch.Tensor]:
    """Our own loop (no oracle): every prev_sample."""
    scheduler.set_timesteps(n)
    sample = dummy_sample() if sample is None else sample
    outputs = []
    for t in scheduler.timesteps:
        sample = scheduler.step(model(sample, t), t, sample, **step_kwargs).prev_sample
        outputs.append(sample)
    return outputs


# ===== DPM-Solver multistep: parity ==================================================================

DPM_ALGORITHMS = [
    (algorithm, order, solver_type)
    for algorithm in ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")
    for order in (1, 2, 3)
    for solver_type in ("midpoint", "heun")
    if not (algorithm == "sde-dpmsolver" and order == 3)  # no third-order update in diffusers either
]


@pytest.mark.parametrize("algorithm, order, solver_type", DPM_ALGORITHMS)
@pytest.mark.parametrize("n", [1, 3, 10, 27])
def test_dpm_every_algorithm_order_and_solver_type(algorithm, order, solver_type, n):
    config = dict(algorithm_type=algorithm, solver_order=order, solver_type=solver_type)
    if algorithm in ("dpmsolver", "sde-dpmsolver"):
        config["final_sigmas_type"] = "sigma_min"  # required for the deprecated noise-prediction types
    dpm_parity(config, n, seed=0 if algorithm.startswith("sde-") else None)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 20, 25, 27, 50, 100])
@pytest.mark.parametrize("with_generator", [False, True])
def test_dpm_step_counts(n, with_generator):
    # a generator is accepted by the deterministic solver and changes nothing
    dpm_parity({}, n, seed=0 if with_generator else None)


@pytest.mark.parametrize("config", [dict(timestep_spacing="trailing"), dict(solver_order=1)])
def test_dpm_1000_steps(config):
    dpm_parity(config, 1000)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("n", [1, 5, 27, 100])
def test_dpm_spacing_and_offset(spacing, offset, n):
    dpm_parity(dict(timestep_spacing=spacing, steps_offset=offset), n)


@pytest.mark.parametrize("schedule", BETA_SCHEDULES, ids=["linear", "scaled_linear", "cosine", "trained"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("n", [1, 10, 25])
def test_dpm_beta_schedules_and_prediction_types(schedule, prediction_type, n):
    dpm_parity(dict(schedule, prediction_type=prediction_type), n)


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
@pytest.mark.parametrize("euler_at_final", [False, True])
@pytest.mark.parametrize("lower_order_final", [False, True])
@pytest.mark.parametrize("n", [1, 5, 20])
def test_dpm_final_step_options_and_karras(karras, final_sigmas_type, euler_at_final, lower_order_final, n):
    config = dict(
        SD15,
        use_karras_sigmas=karras,
        final_sigmas_type=final_sigmas_type,
        euler_at_final=euler_at_final,
        lower_order_final=lower_order_final,
        # order 3 exercises the second-to-last rule; with Karras + sigma_min the last two sigmas are equal (h = 0)
        # and a third-order last step is 0 * inf = NaN in diffusers too, so Karras runs at order 2
        solver_order=2 if karras else 3,
    )
    dpm_parity(config, n)


@pytest.mark.parametrize(
    "config",
    [
        dict(use_karras_sigmas=True),
        dict(use_exponential_sigmas=True),
        dict(use_lu_lambdas=True),
        dict(use_karras_sigmas=True, use_lu_lambdas=True),  # Karras wins, as in diffusers
        dict(SD15, use_exponential_sigmas=True, final_sigmas_type="sigma_min"),
        dict(SD15, use_lu_lambdas=True, solver_order=3),
        dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
        dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, timestep_spacing="trailing"),
        dict(beta_schedule="squaredcos_cap_v2", use_lu_lambdas=True),
        dict(rescale_betas_zero_snr=True, prediction_type="v_prediction"),
        dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing", solver_order=3),
        dict(thresholding=True, sample_max_value=1.5),
        dict(thresholding=True, prediction_type="sample", solver_order=3),
        dict(thresholding=True, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
        dict(algorithm_type="dpmsolver", prediction_type="v_prediction", final_sigmas_type="sigma_min"),
        dict(algorithm_type="dpmsolver", prediction_type="sample", final_sigmas_type="sigma_min", solver_type="heun"),
        dict(algorithm_type="deis", final_sigmas_type="sigma_min"),  # read as dpmsolver++ (diffusers refuses "zero")
        dict(solver_type="bh2"),  # read as midpoint
    ],
)
@pytest.mark.parametrize("n", [1, 2, 10, 50])
def test_dpm_sigma_ramps_and_options(config, n):
    dpm_parity(config, n)


def test_dpm_sd15_karras_duplicate_timesteps():
    """SD 1.5, 50 Karras steps: rounding gives ..., 2, 1, 1, 0 (docs/schedulers.md §2); the loop still matches."""
    config = dict(SD15, use_karras_sigmas=True)
    ours = DPMSolverMultistepScheduler(**config)
    ours.set_timesteps(50)
    assert ours.timesteps[-4:].tolist() == [2, 1, 1, 0]
    assert len(ours.sigmas.unique()) == 51  # the sigmas stay distinct, only the rounded timesteps repeat
    dpm_parity(config, 50)


def test_dpm_sd15_20_step_timesteps():
    """DPM++ 2M with SD 1.5's config: 20 linspace steps drop t = 0 and give 999, 949, ..., 50."""
    expected = [999, 949, 899, 849, 799, 749, 699, 649, 599, 549, 500, 450, 400, 350, 300, 250, 200, 150, 100, 50]
    config = dict(SD15, solver_order=2, timestep_spacing="linspace")
    ours, theirs = DPMSolverMultistepScheduler(**config), TheirDPM(**config)
    ours.set_timesteps(20)
    theirs.set_timesteps(20)
    assert ours.timesteps.tolist() == expected == theirs.timesteps.tolist()
    assert ours.timesteps.dtype == torch.int64
    assert ours.sigmas.shape == (21,) and ours.sigmas[-1] == 0  # final_sigmas_type "zero"
    dpm_parity(config, 20)


@pytest.mark.parametrize("cls, theirs_cls", [(DPMSolverMultistepScheduler, TheirDPM), (UniPCMultistepScheduler, TheirUniPC)])
def test_from_the_real_sd15_scheduler_config(cls, theirs_cls):
    """SD 1.5 ships a PNDM config without timestep_spacing: both classes read it with their own default (linspace)."""
    config = json.loads((Path(minidiff.__file__).parent / "data/sd15/scheduler/scheduler_config.json").read_text())
    assert config["_class_name"] == "PNDMScheduler" and "timestep_spacing" not in config
    ours, theirs = cls.from_config(config), theirs_cls.from_config(config)
    assert ours.config.timestep_spacing == "linspace" and ours.config.steps_offset == 1
    outputs_ours, outputs_theirs = loop(ours, 20), loop(theirs, 20)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist() == list(range(999, 500, -50)) + list(range(500, 0, -50))
    for i, (a, b) in enumerate(zip(outputs_ours, outputs_theirs)):
        assert_close(a, b, f"prev_sample at step {i}")


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("karras", [False, True])
def test_dpm_sde_noise_stream_matches_with_generator(order, karras):
    dpm_parity(dict(algorithm_type="sde-dpmsolver++", solver_order=order, use_karras_sigmas=karras), 12, seed=1234)


def test_dpm_sde_without_generator_uses_the_global_stream():
    """No generator: noise comes from torch's global RNG, drawn in the same order and dtype as diffusers."""
    config = dict(algorithm_type="sde-dpmsolver++")
    torch.manual_seed(7)
    ours = loop(DPMSolverMultistepScheduler(**config), 8)
    torch.manual_seed(7)
    theirs = loop(TheirDPM(**config), 8)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(a, b, f"prev_sample at step {i}")
    torch.manual_seed(8)
    assert not torch.allclose(loop(DPMSolverMultistepScheduler(**config), 8)[-1], ours[-1])  # the noise matters


def test_dpm_sde_variance_noise_replaces_the_generator():
    config = dict(algorithm_type="sde-dpmsolver++", solver_order=2)
    noises = [torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    results = []
    for cls in (DPMSolverMultistepScheduler, TheirDPM):
        scheduler, sample = cls(**config), dummy_sample()
        scheduler.set_timesteps(6)
        for t, noise in zip(scheduler.timesteps, noises):
            sample = scheduler.step(fake_model(sample, t), t, sample, variance_noise=noise).prev_sample
        results.append(sample)
    assert_close(results[0], results[1], "prev_sample with variance_noise")


def test_dpm_custom_timesteps():
    timesteps = [999, 800, 600, 420, 250, 100, 30, 1]
    outputs = []
    for cls in (DPMSolverMultistepScheduler, TheirDPM):
        scheduler, sample = cls(), dummy_sample()
        scheduler.set_timesteps(timesteps=timesteps)
        assert scheduler.timesteps.tolist() == timesteps
        for t in scheduler.timesteps:
            sample = scheduler.step(fake_model(sample, t), t, sample).prev_sample
        outputs.append((scheduler.sigmas, sample))
    assert_close(outputs[0][0], outputs[1][0], "sigmas")
    assert_close(outputs[0][1], outputs[1][1], "final sample")


def test_dpm_learned_variance_uses_the_mean_channels():
    """variance_type "learned_range": the model outputs [mean, variance] along channels; only the mean is used."""
    config = dict(variance_type="learned_range")
    sample0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))

    def model(x, t):  # (B, 3, H, W) -> (B, 6, H, W)
        return torch.cat([fake_model(x, t), torch.full_like(x, 5.0)], dim=1)

    ours = loop(DPMSolverMultistepScheduler(**config), 7, sample0.clone(), model)
    theirs = loop(TheirDPM(**config), 7, sample0.clone(), model)
    assert ours[-1].shape == sample0.shape
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(a, b, f"prev_sample at step {i}")


def test_dpm_cosine_karras_collapsed_timesteps_give_a_clear_error():
    """Cosine + Karras truncates the first timesteps to 998, 998 (diffusers #12771): diffusers starts at the
    second match, runs off the end and raises IndexError; minidiff matches every step until then and says why."""
    config = dict(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True)
    ours, theirs = DPMSolverMultistepScheduler(**config), TheirDPM(**config)
    ours.set_timesteps(5)
    theirs.set_timesteps(5)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist() == [998, 998, 997, 937, 0]
    sample_ours, sample_theirs = dummy_sample(), dummy_sample()
    for i, t in enumerate(theirs.timesteps[:-1]):
        sample_ours = ours.step(fake_model(sample_ours, t), t, sample_ours).prev_sample
        sample_theirs = theirs.step(fake_model(sample_theirs, t), t, sample_theirs).prev_sample
        assert_close(sample_ours, sample_theirs, f"prev_sample at step {i}")
    t = theirs.timesteps[-1]
    with pytest.raises(IndexError):
        theirs.step(fake_model(sample_theirs, t), t, sample_theirs)
    with pytest.raises(ValueError, match="after the last of its 5 timesteps"):
        ours.step(fake_model(sample_ours, t), t, sample_ours)


@pytest.mark.parametrize("cls, theirs_cls", [(DPMSolverMultistepScheduler, TheirDPM), (UniPCMultistepScheduler, TheirUniPC)])
@pytest.mark.parametrize("config", [dict(), dict(timestep_spacing="leading", steps_offset=1)])
def test_near_t_steps_repeat_a_timestep_and_give_nan_as_diffusers(cls, theirs_cls, config):
    """N = T: rounding repeats a timestep (linspace) or collapses all of them (leading); h = 0 makes the next
    multistep update divide by zero. diffusers returns NaN there; minidiff mirrors it step for step."""
    n = 1000
    ours, theirs = cls(**config), theirs_cls(**config)
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert len(ours.timesteps.unique()) < n
    sample_ours, sample_theirs = dummy_sample(), dummy_sample()
    for i, t in enumerate(theirs.timesteps):
        sample_ours = ours.step(fake_model(sample_ours, t), t, sample_ours).prev_sample
        sample_theirs = theirs.step(fake_model(sample_theirs, t), t, sample_theirs).prev_sample
        if sample_theirs.isnan().any():
            assert sample_ours.isnan().all() and sample_theirs.isnan().all(), f"step {i}"
            return
        assert_close(sample_ours, sample_theirs, f"prev_sample at step {i}")
    pytest.fail("expected diffusers to reach NaN")


# ===== UniPC: parity =================================================================================


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("predict_x0", [True, False])
@pytest.mark.parametrize("n", [1, 2, 3, 10, 27])
def test_unipc_every_order_solver_type_and_predict_x0(order, solver_type, predict_x0, n):
    # sigma_min: diffusers is finite for every combination (see test_unipc_step_to_sigma_zero_is_the_x0_limit)
    config = dict(solver_order=order, solver_type=solver_type, predict_x0=predict_x0, final_sigmas_type="sigma_min")
    unipc_parity(config, n)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 20, 25, 27, 50, 100])
def test_unipc_step_counts(n):
    unipc_parity({}, n)


def test_unipc_1000_steps():
    unipc_parity(dict(timestep_spacing="trailing", solver_order=3), 1000)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("n", [1, 5, 27])
def test_unipc_spacing_and_offset(spacing, offset, n):
    unipc_parity(dict(timestep_spacing=spacing, steps_offset=offset), n)


@pytest.mark.parametrize("schedule", BETA_SCHEDULES, ids=["linear", "scaled_linear", "cosine", "trained"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("predict_x0", [True, False])
@pytest.mark.parametrize("n", [1, 10])
def test_unipc_beta_schedules_and_prediction_types(schedule, prediction_type, predict_x0, n):
    unipc_parity(dict(schedule, prediction_type=prediction_type, predict_x0=predict_x0, final_sigmas_type="sigma_min"), n)


@pytest.mark.parametrize(
    "config",
    [
        dict(SD15, use_karras_sigmas=True),
        dict(SD15, use_karras_sigmas=True, final_sigmas_type="sigma_min", solver_order=3),
        dict(use_exponential_sigmas=True),
        dict(use_exponential_sigmas=True, final_sigmas_type="sigma_min"),
        dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0, final_sigmas_type="sigma_min"),
        dict(beta_schedule="squaredcos_cap_v2", final_sigmas_type="sigma_min", solver_order=3),
        dict(disable_corrector=[0, 1, 3]),
        dict(disable_corrector=[0], solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min"),
        dict(lower_order_final=False, final_sigmas_type="sigma_min"),
        dict(thresholding=True, sample_max_value=1.5),
        dict(thresholding=True, prediction_type="sample", solver_order=3),
        dict(rescale_betas_zero_snr=True, prediction_type="v_prediction"),
        dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
        dict(solver_type="midpoint"),  # read as bh2
    ],
)
@pytest.mark.parametrize("n", [1, 2, 10, 50])
def test_unipc_sigma_ramps_and_options(config, n):
    unipc_parity(config, n)


def test_unipc_sd15_karras_duplicate_timesteps():
    config = dict(SD15, use_karras_sigmas=True)
    ours = UniPCMultistepScheduler(**config)
    ours.set_timesteps(50)
    assert ours.timesteps[-4:].tolist() == [2, 1, 1, 0]
    unipc_parity(config, 50)


@pytest.mark.parametrize("config", [dict(solver_type="bh1"), dict(predict_x0=False), dict(lower_order_final=False)])
def test_unipc_step_to_sigma_zero_is_the_x0_limit(config):
    """Stepping to sigma = 0 computes inf * 0 or inf - inf in diffusers for these configs (NaN or inf on the last
    step only). minidiff matches every earlier step and returns the x0 prediction on the last one."""
    n = 6
    ours, theirs = UniPCMultistepScheduler(**config), TheirUniPC(**config)
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    sample_ours, sample_theirs = dummy_sample(), dummy_sample()
    for i, t in enumerate(theirs.timesteps):
        eps = fake_model(sample_ours, t)
        step = ours.step(eps, t, sample_ours)
        sample_ours = step.prev_sample
        sample_theirs = theirs.step(fake_model(sample_theirs, t), t, sample_theirs).prev_sample
        if i < n - 1:
            assert_close(sample_ours, sample_theirs, f"prev_sample at step {i}")
    assert not torch.isfinite(sample_theirs).any()  # if diffusers gets fixed, switch this test to plain parity
    assert torch.isfinite(sample_ours).all()
    # x0 from the (corrected) sample the last step starts from: (x - sigma_t eps) / alpha_t
    sigma = ours.sigmas[n - 1]
    alpha_t, sigma_t = 1 / (sigma**2 + 1) ** 0.5, sigma / (sigma**2 + 1) ** 0.5
    expected = step.pred_original_sample if ours.predict_x0 else (ours.last_sample - sigma_t * eps) / alpha_t
    assert_close(sample_ours, expected, "last step lands on x0_pred", rtol=1e-4)


def test_unipc_solver_p():
    """solver_p: another scheduler predicts (here DPM-Solver++), UniC corrects."""
    outputs = []
    for unipc_cls, dpm_cls in ((UniPCMultistepScheduler, DPMSolverMultistepScheduler), (TheirUniPC, TheirDPM)):
        outputs.append(loop(unipc_cls(solver_p=dpm_cls(solver_order=1)), 8))
    for i, (a, b) in enumerate(zip(*outputs)):
        assert_close(a, b, f"prev_sample at step {i}")


# ===== published full-loop numbers (diffusers' own tests), without the oracle ========================


def dummy_sample_deter() -> torch.Tensor:
    """diffusers' `dummy_sample_deter`: arange(4*3*8*8)/n as (3, 8, 8, 4), permuted to (4, 3, 8, 8)."""
    n = 4 * 3 * 8 * 8
    return (torch.arange(n).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)


def dummy_model(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """diffusers' dummy model: x * t / (t + 1), with t cast to the sample's dtype."""
    t = t.to(sample.dtype)
    return sample * t / (t + 1)


def full_loop_mean(scheduler, n: int = 10) -> float:
    return loop(scheduler, n, dummy_sample_deter(), dummy_model)[-1].abs().mean().item()


# diffusers' test config (tests/schedulers/test_scheduler_dpm_multi.py): lower_order_final False, sigma_min final
DPM_TEST_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    solver_order=2,
    prediction_type="epsilon",
    thresholding=False,
    sample_max_value=1.0,
    algorithm_type="dpmsolver++",
    solver_type="midpoint",
    lower_order_final=False,
    euler_at_final=False,
    lambda_min_clipped=-float("inf"),
    variance_type=None,
    final_sigmas_type="sigma_min",
)
# diffusers' test config (tests/schedulers/test_scheduler_unipc.py)
UNIPC_TEST_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    solver_order=2,
    solver_type="bh2",
    final_sigmas_type="sigma_min",
)
PUBLISHED_TOLERANCE = 1e-3  # diffusers' tests assert |mean - published| < 1e-3; the numbers have 4 decimals


def test_published_dpmpp_2m_mean():
    assert abs(full_loop_mean(DPMSolverMultistepScheduler(**DPM_TEST_CONFIG)) - 0.3301) < PUBLISHED_TOLERANCE


def test_published_unipc_mean():
    assert abs(full_loop_mean(UniPCMultistepScheduler(**UNIPC_TEST_CONFIG)) - 0.2464) < PUBLISHED_TOLERANCE


def test_published_means_survive_switching_between_the_two():
    """diffusers' test_switch: a config that goes DPM -> UniPC -> DPM (and back) gives the same numbers."""
    dpm = DPMSolverMultistepScheduler(**DPM_TEST_CONFIG)
    dpm_again = DPMSolverMultistepScheduler.from_config(UniPCMultistepScheduler.from_config(dpm.config).config)
    assert abs(full_loop_mean(dpm_again) - 0.3301) < PUBLISHED_TOLERANCE
    unipc = UniPCMultistepScheduler(**UNIPC_TEST_CONFIG)
    unipc_again = UniPCMultistepScheduler.from_config(DPMSolverMultistepScheduler.from_config(unipc.config).config)
    assert abs(full_loop_mean(unipc_again) - 0.2464) < PUBLISHED_TOLERANCE


# ===== img2img: set_begin_index + add_noise ==========================================================


@pytest.mark.parametrize("cls, theirs_cls", [(DPMSolverMultistepScheduler, TheirDPM), (UniPCMultistepScheduler, TheirUniPC)])
@pytest.mark.parametrize("karras", [False, True])
def test_img2img_begin_index_and_add_noise(cls, theirs_cls, karras):
    """As diffusers' img2img: start at t_start * order, noise the image at that timestep, then denoise."""
    n, strength = 25, 0.6
    config = dict(SD15, use_karras_sigmas=karras)
    image = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    results = []
    for scheduler in (cls(**config), theirs_cls(**config)):
        scheduler.set_timesteps(n)
        t_start = n - int(n * strength)
        begin = t_start * scheduler.order
        timesteps = scheduler.timesteps[begin:]
        scheduler.set_begin_index(begin)
        sample = scheduler.add_noise(image, noise, timesteps[:1].repeat(2))
        first = sample
        for t in timesteps:
            sample = scheduler.step(fake_model(sample, t), t, sample).prev_sample
        results.append((first, sample, scheduler.step_index))
    assert_close(results[0][0], results[1][0], "noised image")
    assert_close(results[0][1], results[1][1], "denoised image")
    assert results[0][2] == results[1][2] == n


@pytest.mark.parametrize("cls, theirs_cls", [(DPMSolverMultistepScheduler, TheirDPM), (UniPCMultistepScheduler, TheirUniPC)])
def test_add_noise_lookup_and_after_stepping(cls, theirs_cls):
    """Without set_begin_index each timestep is looked up (a repeated one takes its second match, a missing
    one the last index); once stepping with a begin index (inpainting), the current step_index is used."""
    config = dict(SD15, use_karras_sigmas=True)
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ours, theirs = cls(**config), theirs_cls(**config)
    ours.set_timesteps(50)
    theirs.set_timesteps(50)
    timesteps = torch.tensor([999, 1, 500, 3])  # 1 occurs twice; 500 is not in the Karras schedule
    assert_close(ours.add_noise(x0, noise, timesteps), theirs.add_noise(x0, noise, timesteps), "add_noise (lookup)")
    for scheduler in (ours, theirs):
        scheduler.set_begin_index(10)
        t = scheduler.timesteps[10]
        scheduler.step(fake_model(x0, t), t, x0)
    assert ours.step_index == theirs.step_index == 11
    assert_close(ours.add_noise(x0, noise, timesteps), theirs.add_noise(x0, noise, timesteps), "add_noise (after a step)")


# ===== API details =====================================================================================


@pytest.mark.parametrize("cls", [DPMSolverMultistepScheduler, UniPCMultistepScheduler])
def test_outputs_dtype_and_shapes(cls):
    scheduler = cls()
    scheduler.set_timesteps(10)
    assert scheduler.init_noise_sigma == 1.0 and scheduler.order == 1
    sample = dummy_sample()
    assert scheduler.scale_model_input(sample, scheduler.timesteps[0]) is sample
    t0 = scheduler.timesteps[0]
    as_dict = scheduler.step(fake_model(sample, t0), t0, sample)
    assert as_dict.prev_sample.shape == sample.shape == as_dict.pred_original_sample.shape
    again = cls()
    again.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)  # accepted by both, unused by these deterministic solvers
    as_tuple = again.step(fake_model(sample, t0), t0, sample, generator=generator, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], as_dict.prev_sample) and torch.equal(as_tuple[1], as_dict.pred_original_sample)
    half = loop(cls(), 5, dummy_sample().half())  # a whole fp16 loop stays fp16 (computed in fp32 inside DPM)
    assert all(x.dtype == torch.float16 and torch.isfinite(x).all() for x in half)


@pytest.mark.parametrize("cls", [DPMSolverMultistepScheduler, UniPCMultistepScheduler])
def test_pred_original_sample_is_x0_of_the_model_output(cls):
    """pred_original_sample = (x_t - sigma_t eps) / alpha_t at the step's own noise level (diffusers returns none)."""
    scheduler = cls(**SD15)
    scheduler.set_timesteps(10)
    sample, t = dummy_sample(), scheduler.timesteps[0]
    eps = fake_model(sample, t)
    alpha_bar = scheduler.alphas_cumprod[int(t)]  # sigma at a spaced (integer) timestep is that of alpha_bar_t
    expected = (sample - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5
    assert_close(scheduler.step(eps, t, sample).pred_original_sample, expected, "x0_pred", rtol=1e-4)


@pytest.mark.parametrize("cls, theirs_cls", [(DPMSolverMultistepScheduler, TheirDPM), (UniPCMultistepScheduler, TheirUniPC)])
def test_config_round_trip_and_diffusers_config(cls, theirs_cls, tmp_path):
    config = dict(SD15, use_karras_sigmas=True, solver_order=3)
    scheduler = cls(**config)
    scheduler.save_config(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config)
    theirs_cls(**config).save_config(tmp_path / "theirs")  # diffusers' own file reads as it is
    from_theirs = cls.from_pretrained(tmp_path / "theirs")
    for key, value in config.items():
        assert from_theirs.config[key] == value
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == cls.__name__


@pytest.mark.parametrize("cls, theirs_cls", [(DPMSolverMultistepScheduler, TheirDPM), (UniPCMultistepScheduler, TheirUniPC)])
def test_init_arguments_and_defaults_are_diffusers(cls, theirs_cls):
    import inspect

    ours = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    theirs = {k: p.default for k, p in inspect.signature(theirs_cls.__init__).parameters.items() if k != "self"}
    assert list(ours) == list(theirs)
    for key in ours:
        assert ours[key] == theirs[key] or (ours[key] != ours[key] and theirs[key] != theirs[key]), key


def test_solver_type_and_algorithm_type_from_other_configs():
    dpm = DPMSolverMultistepScheduler.from_config(UniPCMultistepScheduler(solver_type="bh1").config)
    assert dpm.config.solver_type == "midpoint"
    unipc = UniPCMultistepScheduler.from_config(DPMSolverMultistepScheduler(solver_type="heun").config)
    assert unipc.config.solver_type == "bh2"
    deis = DPMSolverMultistepScheduler(algorithm_type="deis", final_sigmas_type="sigma_min")
    assert deis.config.algorithm_type == "dpmsolver++"


def test_step_index_of_a_timestep_not_in_the_schedule_is_the_last():
    scheduler = DPMSolverMultistepScheduler()
    scheduler.set_timesteps(10)
    assert scheduler.index_for_timestep(12345) == 9
    sample = dummy_sample()
    scheduler.step(fake_model(sample, 12345), 12345, sample)
    assert scheduler.step_index == 10


# ===== bad input ======================================================================================

BOTH = [DPMSolverMultistepScheduler, UniPCMultistepScheduler]


@pytest.mark.parametrize("cls", BOTH)
def test_step_before_set_timesteps(cls):
    scheduler = cls()
    with pytest.raises(ValueError, match="before set_timesteps"):
        scheduler.step(torch.zeros(1, 4, 8, 8), 999, torch.zeros(1, 4, 8, 8))


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("n", [0, -3, 1001, 2.5])
def test_bad_num_inference_steps(cls, n):
    with pytest.raises(ValueError, match="num_inference_steps"):
        cls().set_timesteps(n)


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize(
    "field, value",
    [
        ("beta_schedule", "cosine"),
        ("prediction_type", "x0"),
        ("timestep_spacing", "uniform"),
        ("final_sigmas_type", "one"),
        ("solver_type", "rk4"),
        ("solver_order", 0),
    ],
)
def test_unknown_config_values(cls, field, value):
    with pytest.raises(ValueError, match=field):
        cls(**{field: value})


@pytest.mark.parametrize("value", ["dpm", "ddim"])
def test_unknown_algorithm_type(value):
    with pytest.raises(ValueError, match="algorithm_type"):
        DPMSolverMultistepScheduler(algorithm_type=value)


@pytest.mark.parametrize("algorithm", ["dpmsolver", "sde-dpmsolver"])
def test_deprecated_algorithms_warn_and_need_sigma_min(algorithm):
    with pytest.warns(FutureWarning, match="deprecated"):
        DPMSolverMultistepScheduler(algorithm_type=algorithm, final_sigmas_type="sigma_min")
    with pytest.raises(ValueError, match="sigma_min"):
        DPMSolverMultistepScheduler(algorithm_type=algorithm)


def test_sde_dpmsolver_has_no_third_order():
    with pytest.raises(ValueError, match="third-order"):
        DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min", solver_order=3)


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize(
    "options",
    [
        dict(use_flow_sigmas=True),
        dict(use_beta_sigmas=True),
        dict(use_dynamic_shifting=True),
        dict(prediction_type="flow_prediction"),
        dict(use_karras_sigmas=True, use_exponential_sigmas=True),
    ],
)
def test_unsupported_or_conflicting_options(cls, options):
    with pytest.raises(ValueError, match="use_|flow"):
        cls(**options)


def test_dpm_custom_timesteps_errors():
    scheduler = DPMSolverMultistepScheduler()
    with pytest.raises(ValueError, match="exactly one"):
        scheduler.set_timesteps(10, timesteps=[999, 500])
    with pytest.raises(ValueError, match="exactly one"):
        scheduler.set_timesteps()
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        scheduler.set_timesteps(timesteps=[1500, 500])
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        DPMSolverMultistepScheduler(use_karras_sigmas=True).set_timesteps(timesteps=[999, 500])
    with pytest.raises(ValueError, match="mu"):
        scheduler.set_timesteps(10, mu=0.5)


def test_unipc_flow_only_arguments():
    with pytest.raises(ValueError, match="flow"):
        UniPCMultistepScheduler().set_timesteps(10, sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="shift_terminal"):
        UniPCMultistepScheduler(shift_terminal=0.1)


@pytest.mark.parametrize("cls", BOTH)
def test_step_past_the_end(cls):
    scheduler = cls()
    loop(scheduler, 3)
    t, sample = scheduler.timesteps[-1], dummy_sample()
    with pytest.raises(ValueError, match="set_timesteps again"):
        scheduler.step(fake_model(sample, t), t, sample)
