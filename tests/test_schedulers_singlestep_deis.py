"""DPMSolverSinglestepScheduler and DEISMultistepScheduler: parity with diffusers 0.42.1, errors, pipelines.

Parity runs go through `scheduler_parity.run_parity` (whole loop; timesteps compared exactly, sigmas,
init_noise_sigma and every prev_sample with RTOL 1e-5 / ATOL 1e-6 in fp32). Options are swept one family at
a time with several step counts each; the singlestep order list (1, 2, 1, 2, ... or 1, 2, 3, ...) depends on
N, so many odd and even N are run, and the order lists themselves are compared for N = 1..120.

Where diffusers itself fails, the test says so instead of hiding it:
- singlestep "dpmsolver" + thresholding: diffusers 0.42.1 indexes alpha_t by a None timestep (a shape error);
  minidiff thresholds at the step's own noise level, checked against the DPM-Solver++ form of the same step.
- DEIS "trailing" spacing with N where float round-off adds a t = -1 step: minidiff drops it (as base.py does).
"""

from __future__ import annotations

import inspect
import json
import logging
import warnings

import numpy as np
import pytest
import torch

import minidiff
from minidiff import DEISMultistepScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, UniPCMultistepScheduler
from scheduler_parity import assert_close, dummy_sample, fake_model, run_parity

diffusers = pytest.importorskip("diffusers")
TheirSingle = diffusers.DPMSolverSinglestepScheduler
TheirDEIS = diffusers.DEISMultistepScheduler
PAIRS = [(DPMSolverSinglestepScheduler, TheirSingle), (DEISMultistepScheduler, TheirDEIS)]

SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
BETA_SCHEDULES = [
    dict(beta_schedule="linear"),
    dict(SD15),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(trained_betas=np.linspace(0.0002, 0.03, 1000).tolist()),
]
SCHEDULE_IDS = ["linear", "scaled_linear", "cosine", "trained"]


@pytest.fixture(autouse=True)
def _quiet():
    """diffusers' and our FutureWarning for "dpmsolver"; the logged lower_order_final switch (tested on its own)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        logging.disable(logging.WARNING)
        yield
        logging.disable(logging.NOTSET)


def single_parity(config: dict, n: int, seed: int | None = None) -> None:
    assert run_parity(DPMSolverSinglestepScheduler, TheirSingle, config, n, seed=seed) == n


def deis_parity(config: dict, n: int) -> None:
    assert run_parity(DEISMultistepScheduler, TheirDEIS, config, n) >= 1


def loop(scheduler, n: int, sample: torch.Tensor | None = None, model=fake_model, **step_kwargs) -> list[torch.Tensor]:
    """Our own loop (no oracle): every prev_sample."""
    scheduler.set_timesteps(n)
    sample = dummy_sample() if sample is None else sample
    outputs = []
    for t in scheduler.timesteps:
        sample = scheduler.step(model(sample, t), t, sample, **step_kwargs).prev_sample
        outputs.append(sample)
    return outputs


# ===== DPM-Solver singlestep: parity ==================================================================


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 12])
def test_single_every_algorithm_order_and_solver_type(algorithm, order, solver_type, n):
    config = dict(algorithm_type=algorithm, solver_order=order, solver_type=solver_type)
    if algorithm == "dpmsolver":
        config["final_sigmas_type"] = "sigma_min"  # required for the deprecated noise-prediction type
    single_parity(config, n, seed=0 if algorithm.startswith("sde-") else None)


STEP_COUNTS = list(range(1, 14)) + [24, 25, 26, 99, 100, 101]


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
@pytest.mark.parametrize("lower_order_final", [False, True])
@pytest.mark.parametrize("n", STEP_COUNTS)
def test_single_step_counts_and_final_options(order, final_sigmas_type, lower_order_final, n):
    config = dict(solver_order=order, final_sigmas_type=final_sigmas_type, lower_order_final=lower_order_final)
    single_parity(config, n)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
@pytest.mark.parametrize("lower_order_final", [False, True])
def test_single_order_lists_and_the_lower_order_final_switch(order, final_sigmas_type, lower_order_final):
    """The order of each step for N = 1..120, and the config switch set_timesteps makes, as diffusers."""
    config = dict(solver_order=order, final_sigmas_type=final_sigmas_type, lower_order_final=lower_order_final)
    for n in range(1, 121):
        ours, theirs = DPMSolverSinglestepScheduler(**config), TheirSingle(**config)
        ours.set_timesteps(n)
        theirs.set_timesteps(n)
        assert ours.order_list == theirs.order_list, n
        assert ours.config.lower_order_final == theirs.config.lower_order_final, n


def test_single_lower_order_final_switch_is_logged(caplog):
    logging.disable(logging.NOTSET)
    scheduler = DPMSolverSinglestepScheduler(final_sigmas_type="sigma_min")
    with caplog.at_level(logging.WARNING, logger="minidiff.schedulers.dpm_solver_singlestep"):
        scheduler.set_timesteps(7)
    assert scheduler.config.lower_order_final is True
    assert "lower_order_final=True" in caplog.text and "not a multiple of solver_order=2" in caplog.text


@pytest.mark.parametrize("schedule", BETA_SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("n", [1, 10])
def test_single_beta_schedules_and_prediction_types(schedule, prediction_type, algorithm, n):
    config = dict(schedule, prediction_type=prediction_type, algorithm_type=algorithm, solver_order=3)
    if algorithm == "dpmsolver":
        config["final_sigmas_type"] = "sigma_min"
    single_parity(config, n)


@pytest.mark.parametrize(
    "config",
    [
        dict(SD15, use_karras_sigmas=True),
        dict(SD15, use_karras_sigmas=True, solver_order=3, final_sigmas_type="sigma_min"),
        dict(use_karras_sigmas=True, algorithm_type="sde-dpmsolver++", solver_type="heun"),
        dict(use_exponential_sigmas=True),
        dict(SD15, use_exponential_sigmas=True, solver_order=3, solver_type="heun"),
        dict(use_beta_sigmas=True),
        dict(SD15, use_beta_sigmas=True, solver_order=3, final_sigmas_type="sigma_min"),
        dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
        dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, solver_order=3, solver_type="heun"),
        dict(thresholding=True, sample_max_value=1.5),
        dict(thresholding=True, prediction_type="sample", solver_order=3, solver_type="heun"),
        dict(thresholding=True, algorithm_type="sde-dpmsolver++", dynamic_thresholding_ratio=0.9),
        dict(algorithm_type="deis", final_sigmas_type="sigma_min"),  # read as dpmsolver++ (diffusers refuses "zero")
        dict(solver_type="logrho"),  # read as midpoint
        dict(solver_type="bh2", solver_order=3),
    ],
)
@pytest.mark.parametrize("n", [1, 2, 9, 25])  # 50 beta sigmas of SD 1.5 repeat t = 998 (see the collapsed test)
def test_single_sigma_ramps_and_options(config, n):
    single_parity(config, n, seed=3 if config.get("algorithm_type") == "sde-dpmsolver++" else None)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1234])
@pytest.mark.parametrize("n", [6, 11])
def test_single_sde_noise_stream_matches_with_generator(order, seed, n):
    single_parity(dict(algorithm_type="sde-dpmsolver++", solver_order=order, use_karras_sigmas=True), n, seed=seed)


def test_single_sde_without_generator_uses_the_global_stream():
    config = dict(algorithm_type="sde-dpmsolver++", solver_order=3)
    torch.manual_seed(7)
    ours = loop(DPMSolverSinglestepScheduler(**config), 9)
    torch.manual_seed(7)
    theirs = loop(TheirSingle(**config), 9)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(a, b, f"prev_sample at step {i}")
    torch.manual_seed(8)
    assert not torch.allclose(loop(DPMSolverSinglestepScheduler(**config), 9)[-1], ours[-1])  # the noise matters


def test_single_custom_timesteps():
    timesteps = [999, 800, 600, 420, 250, 100, 30]
    outputs = []
    for cls in (DPMSolverSinglestepScheduler, TheirSingle):
        scheduler, sample = cls(solver_order=3), dummy_sample()
        scheduler.set_timesteps(timesteps=timesteps)
        assert scheduler.timesteps.tolist() == timesteps
        for t in scheduler.timesteps:
            sample = scheduler.step(fake_model(sample, t), t, sample).prev_sample
        outputs.append((scheduler.sigmas, scheduler.order_list, sample))
    assert_close(outputs[0][0], outputs[1][0], "sigmas")
    assert outputs[0][1] == outputs[1][1]
    assert_close(outputs[0][2], outputs[1][2], "final sample")


def test_single_learned_variance_uses_the_mean_channels():
    """variance_type "learned_range": the model outputs [mean, variance]; only the mean is used (diffusers keeps
    3 channels, so the comparison uses 3-channel samples)."""
    sample0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))

    def model(x, t):  # (B, 3, H, W) -> (B, 6, H, W)
        return torch.cat([fake_model(x, t), torch.full_like(x, 5.0)], dim=1)

    config = dict(variance_type="learned_range", solver_order=3)
    ours = loop(DPMSolverSinglestepScheduler(**config), 7, sample0.clone(), model)
    theirs = loop(TheirSingle(**config), 7, sample0.clone(), model)
    assert ours[-1].shape == sample0.shape
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(a, b, f"prev_sample at step {i}")


def test_single_dpmsolver_thresholding_where_diffusers_fails():
    """diffusers 0.42.1 fails here (alpha_t indexed by a None timestep); minidiff thresholds x0 at the step's level.
    First order, the noise- and data-prediction forms are the same step, so they must agree."""
    config = dict(thresholding=True, sample_max_value=1.2, final_sigmas_type="sigma_min", solver_order=1)
    theirs = TheirSingle(**config, algorithm_type="dpmsolver")
    with pytest.raises(RuntimeError):
        loop(theirs, 4)
    noise_form = loop(DPMSolverSinglestepScheduler(**config, algorithm_type="dpmsolver"), 6)
    data_form = loop(DPMSolverSinglestepScheduler(**config, algorithm_type="dpmsolver++"), 6)
    for i, (a, b) in enumerate(zip(noise_form, data_form)):
        assert_close(a, b, f"prev_sample at step {i}", rtol=1e-4, atol=1e-5)


# ===== DEIS: parity ==================================================================================


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("n", [1, 2, 3, 8, 27, 100])
def test_deis_orders_spacings_and_offsets(order, spacing, offset, n):
    deis_parity(dict(solver_order=order, timestep_spacing=spacing, steps_offset=offset), n)


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("lower_order_final", [False, True])
@pytest.mark.parametrize("n", [4, 5, 13, 14, 15, 16, 51])
def test_deis_lower_order_final(order, lower_order_final, n):
    deis_parity(dict(solver_order=order, lower_order_final=lower_order_final), n)


@pytest.mark.parametrize("schedule", BETA_SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("n", [1, 10, 25])
def test_deis_beta_schedules_and_prediction_types(schedule, prediction_type, n):
    deis_parity(dict(schedule, prediction_type=prediction_type, solver_order=3), n)


@pytest.mark.parametrize(
    "config",
    [
        dict(SD15, use_karras_sigmas=True),
        dict(SD15, use_karras_sigmas=True, solver_order=3, lower_order_final=False),
        dict(use_exponential_sigmas=True, solver_order=3),
        dict(use_beta_sigmas=True),
        dict(SD15, use_beta_sigmas=True, solver_order=3, timestep_spacing="trailing"),
        dict(thresholding=True, sample_max_value=1.5),
        dict(thresholding=True, prediction_type="sample", solver_order=3),
        dict(algorithm_type="dpmsolver++", solver_type="midpoint"),  # a DPM-Solver config, read as deis/logrho
        dict(algorithm_type="dpmsolver", solver_type="bh2"),
    ],
)
@pytest.mark.parametrize("n", [1, 2, 10, 25])
def test_deis_sigma_ramps_and_options(config, n):
    deis_parity(config, n)


def test_deis_trailing_drops_the_t_minus_one_step():
    """Trailing spacing with 61 steps: float round-off makes diffusers' arange one point too long, ending at t = -1
    (62 steps). minidiff keeps the 61 real timesteps (base.spaced_timesteps) and matches every one of them."""
    config = dict(timestep_spacing="trailing", solver_order=3)
    ours, theirs = DEISMultistepScheduler(**config), TheirDEIS(**config)
    ours.set_timesteps(61)
    theirs.set_timesteps(61)
    assert theirs.timesteps[-1] == -1 and len(theirs.timesteps) == 62
    assert ours.timesteps.tolist() == theirs.timesteps[:-1].tolist()
    sample_ours, sample_theirs = dummy_sample(), dummy_sample()
    for i, t in enumerate(ours.timesteps[:-1]):  # the last step differs: ours goes to sigma_min, theirs to t = -1
        sample_ours = ours.step(fake_model(sample_ours, t), t, sample_ours).prev_sample
        sample_theirs = theirs.step(fake_model(sample_theirs, t), t, sample_theirs).prev_sample
        assert_close(sample_ours, sample_theirs, f"prev_sample at step {i}")


@pytest.mark.parametrize("cls, theirs_cls", PAIRS)
def test_collapsed_first_timesteps_give_a_clear_error(cls, theirs_cls):
    """SD 1.5 with 50 beta sigmas: truncation gives 998, 998, ... The loop starts at the second match (as diffusers),
    so it runs off the end: diffusers raises IndexError there, minidiff matches every step until then and says why."""
    config = dict(SD15, use_beta_sigmas=True)
    ours, theirs = cls(**config), theirs_cls(**config)
    ours.set_timesteps(50)
    theirs.set_timesteps(50)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist() and ours.timesteps[:2].tolist() == [998, 998]
    sample_ours, sample_theirs = dummy_sample(), dummy_sample()
    for i, t in enumerate(theirs.timesteps[:-1]):
        sample_ours = ours.step(fake_model(sample_ours, t), t, sample_ours).prev_sample
        sample_theirs = theirs.step(fake_model(sample_theirs, t), t, sample_theirs).prev_sample
        assert_close(sample_ours, sample_theirs, f"prev_sample at step {i}")
    t = theirs.timesteps[-1]
    with pytest.raises(IndexError):
        theirs.step(fake_model(sample_theirs, t), t, sample_theirs)
    with pytest.raises(ValueError, match="after the last of its 50 timesteps"):
        ours.step(fake_model(sample_ours, t), t, sample_ours)


# ===== img2img: set_begin_index + add_noise ============================================================


@pytest.mark.parametrize("cls, theirs_cls", PAIRS)
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("strength", [0.5, 0.6, 0.75])
def test_img2img_begin_index_and_add_noise(cls, theirs_cls, karras, strength):
    """As diffusers' img2img: start at t_start * order (possibly inside a singlestep group), noise the image there."""
    n = 25
    config = dict(SD15, use_karras_sigmas=karras, solver_order=3)
    image = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    results = []
    for scheduler in (cls(**config), theirs_cls(**config)):
        scheduler.set_timesteps(n)
        begin = (n - int(n * strength)) * scheduler.order
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


@pytest.mark.parametrize("cls, theirs_cls", PAIRS)
def test_add_noise_lookup_and_after_stepping(cls, theirs_cls):
    """Without set_begin_index each timestep is looked up (a repeated one takes its second match, a missing one the
    last index); once stepping with a begin index, the current step_index is used."""
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


# ===== API and configs ==================================================================================


@pytest.mark.parametrize("cls", [DPMSolverSinglestepScheduler, DEISMultistepScheduler])
def test_outputs_dtype_and_shapes(cls):
    scheduler = cls()
    scheduler.set_timesteps(10)
    assert scheduler.init_noise_sigma == 1.0 and scheduler.order == 1
    sample, t0 = dummy_sample(), scheduler.timesteps[0]
    assert scheduler.scale_model_input(sample, t0) is sample
    as_dict = scheduler.step(fake_model(sample, t0), t0, sample)
    assert as_dict.prev_sample.shape == sample.shape == as_dict.pred_original_sample.shape
    again = cls()
    again.set_timesteps(10)
    as_tuple = again.step(fake_model(sample, t0), t0, sample, return_dict=False)
    assert len(as_tuple) == 1 and torch.equal(as_tuple[0], as_dict.prev_sample)  # diffusers' 1-tuple
    half = loop(cls(), 5, dummy_sample().half())  # as diffusers, no upcast: a whole fp16 loop stays fp16
    assert all(x.dtype == torch.float16 and torch.isfinite(x).all() for x in half)


@pytest.mark.parametrize("cls", [DPMSolverSinglestepScheduler, DEISMultistepScheduler])
def test_pred_original_sample_is_x0_of_the_model_output(cls):
    scheduler = cls(**SD15)
    scheduler.set_timesteps(10)
    sample, t = dummy_sample(), scheduler.timesteps[0]
    eps = fake_model(sample, t)
    alpha_bar = scheduler.alphas_cumprod[int(t)]
    expected = (sample - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5
    assert_close(scheduler.step(eps, t, sample).pred_original_sample, expected, "x0_pred", rtol=1e-4)


@pytest.mark.parametrize("cls, theirs_cls", PAIRS)
def test_init_arguments_and_defaults_are_diffusers(cls, theirs_cls):
    """Every diffusers __init__ argument is an __init__ argument or a refused field, with diffusers' default."""
    ours = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    ours.update(cls._refused_config)
    theirs = {k: p.default for k, p in inspect.signature(theirs_cls.__init__).parameters.items() if k != "self"}
    assert set(ours) == set(theirs)
    for key in ours:
        assert ours[key] == theirs[key] or (ours[key] != ours[key] and theirs[key] != theirs[key]), key


@pytest.mark.parametrize("cls, theirs_cls", PAIRS)
def test_config_round_trip_and_diffusers_config(cls, theirs_cls, tmp_path):
    config = dict(SD15, use_karras_sigmas=True, solver_order=3)
    scheduler = cls(**config)
    scheduler.save_config(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config)
    theirs_cls(**config).save_config(tmp_path / "theirs")  # diffusers' own file, flow fields included, reads as it is
    from_theirs = cls.from_pretrained(tmp_path / "theirs")
    for key, value in config.items():
        assert from_theirs.config[key] == value
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["_class_name"] == cls.__name__


SOURCES = [
    (DPMSolverMultistepScheduler, diffusers.DPMSolverMultistepScheduler, dict(SD15, solver_type="heun", steps_offset=1)),
    (UniPCMultistepScheduler, diffusers.UniPCMultistepScheduler, dict(SD15, solver_type="bh1", timestep_spacing="trailing")),
    (DPMSolverSinglestepScheduler, TheirSingle, dict(SD15, solver_order=3, use_karras_sigmas=True)),
    (DEISMultistepScheduler, TheirDEIS, dict(SD15, solver_order=3, timestep_spacing="leading")),
    (minidiff.PNDMScheduler, diffusers.PNDMScheduler, dict(SD15, steps_offset=1, skip_prk_steps=True)),
    (minidiff.EulerDiscreteScheduler, diffusers.EulerDiscreteScheduler, dict(SD15, use_karras_sigmas=True)),
]


@pytest.mark.parametrize("source, theirs_source, config", SOURCES, ids=lambda x: getattr(x, "__name__", ""))
@pytest.mark.parametrize("cls, theirs_cls", PAIRS)
def test_from_config_of_other_schedulers_as_diffusers(source, theirs_source, config, cls, theirs_cls):
    """X.from_config(other.config), as the tutorials swap schedulers: the same config and the same loop as diffusers."""
    ours = cls.from_config(source(**config).config)
    theirs = theirs_cls.from_config(theirs_source(**config).config)
    for key, value in theirs.config.items():
        if not key.startswith("_"):
            assert ours.config[key] == value or (value != value and ours.config[key] != ours.config[key]), key
    assert cls in source.compatibles and source in cls.compatibles
    for i, (a, b) in enumerate(zip(loop(ours, 8), loop(theirs, 8))):
        assert_close(a, b, f"prev_sample at step {i}")


def test_single_and_deis_read_each_other():
    single = DPMSolverSinglestepScheduler.from_config(DEISMultistepScheduler().config, final_sigmas_type="sigma_min")
    assert single.config.algorithm_type == "dpmsolver++" and single.config.solver_type == "midpoint"
    deis = DEISMultistepScheduler.from_config(DPMSolverSinglestepScheduler(solver_type="heun").config)
    assert deis.config.algorithm_type == "deis" and deis.config.solver_type == "logrho"


def test_step_index_of_a_timestep_not_in_the_schedule_is_the_last():
    for cls in (DPMSolverSinglestepScheduler, DEISMultistepScheduler):
        scheduler = cls()
        scheduler.set_timesteps(10)
        assert scheduler.index_for_timestep(12345) == 9


# ===== bad input ======================================================================================

BOTH = [DPMSolverSinglestepScheduler, DEISMultistepScheduler]


@pytest.mark.parametrize("cls", BOTH)
def test_step_before_set_timesteps(cls):
    with pytest.raises(ValueError, match="before set_timesteps"):
        cls().step(torch.zeros(1, 4, 8, 8), 999, torch.zeros(1, 4, 8, 8))


@pytest.mark.parametrize("cls", BOTH)
def test_step_past_the_end(cls):
    scheduler = cls()
    loop(scheduler, 3)
    t, sample = scheduler.timesteps[-1], dummy_sample()
    with pytest.raises(ValueError, match="set_timesteps again"):
        scheduler.step(fake_model(sample, t), t, sample)


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("n", [0, -3, 1001, 2.5])
def test_bad_num_inference_steps(cls, n):
    with pytest.raises(ValueError, match="num_inference_steps"):
        cls().set_timesteps(n)


@pytest.mark.parametrize(
    "cls, field, value",
    [
        (DPMSolverSinglestepScheduler, "algorithm_type", "sde-dpmsolver"),
        (DPMSolverSinglestepScheduler, "solver_type", "rk4"),
        (DPMSolverSinglestepScheduler, "final_sigmas_type", "one"),
        (DPMSolverSinglestepScheduler, "variance_type", "fixed"),
        (DEISMultistepScheduler, "algorithm_type", "sde-dpmsolver++"),
        (DEISMultistepScheduler, "solver_type", "rk4"),
        (DEISMultistepScheduler, "timestep_spacing", "uniform"),
    ]
    + [(cls, "beta_schedule", "cosine") for cls in BOTH]
    + [(cls, "prediction_type", "x0") for cls in BOTH]
    + [(cls, "solver_order", 4) for cls in BOTH],
)
def test_unknown_config_values(cls, field, value):
    with pytest.raises(ValueError, match=field):
        cls(**{field: value})


def test_deprecated_dpmsolver_warns_and_needs_sigma_min():
    with pytest.warns(FutureWarning, match="deprecated"):
        DPMSolverSinglestepScheduler(algorithm_type="dpmsolver", final_sigmas_type="sigma_min")
    with pytest.raises(ValueError, match="sigma_min"):
        DPMSolverSinglestepScheduler(algorithm_type="dpmsolver")


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize(
    "field, value", [("use_flow_sigmas", True), ("flow_shift", 3.0), ("use_dynamic_shifting", True), ("time_shift_type", "linear")]
)
def test_flow_matching_fields_are_refused(cls, field, value):
    cls(**{field: cls._refused_config[field]})  # the supported value is accepted, as in every SD 1.x config
    with pytest.raises(NotImplementedError, match=field):
        cls(**{field: value})


@pytest.mark.parametrize("cls", BOTH)
def test_flow_prediction_mu_and_conflicting_ramps(cls):
    with pytest.raises(ValueError, match="flow"):
        cls(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="mu"):
        cls().set_timesteps(10, mu=0.5)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        cls(use_karras_sigmas=True, use_beta_sigmas=True)


def test_single_custom_timesteps_errors():
    scheduler = DPMSolverSinglestepScheduler()
    with pytest.raises(ValueError, match="exactly one"):
        scheduler.set_timesteps(10, timesteps=[999, 500])
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        scheduler.set_timesteps(timesteps=[1500, 500])
    with pytest.raises(ValueError, match="use_beta_sigmas"):
        DPMSolverSinglestepScheduler(use_beta_sigmas=True).set_timesteps(timesteps=[999, 500])


# ===== the tiny SD pipeline, as in the tutorial: pipe.scheduler = X.from_config(pipe.scheduler.config) ======


@pytest.fixture(scope="module")
def both_pipelines(tiny_sd15_folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = diffusers.StableDiffusionPipeline.from_pretrained(
            str(tiny_sd15_folder), safety_checker=None, requires_safety_checker=False
        )
    ours = minidiff.StableDiffusionPipeline.from_pretrained(tiny_sd15_folder)
    theirs.set_progress_bar_config(disable=True)
    ours.set_progress_bar_config(disable=True)
    return ours, theirs


@pytest.mark.parametrize("scheduler_name", ["DPMSolverSinglestepScheduler", "DEISMultistepScheduler"])
def test_txt2img_equals_diffusers(both_pipelines, scheduler_name):
    ours, theirs = both_pipelines
    ours.scheduler = getattr(minidiff, scheduler_name).from_config(ours.scheduler.config)
    theirs.scheduler = getattr(diffusers, scheduler_name).from_config(theirs.scheduler.config)
    kwargs = dict(prompt="a photograph of an astronaut riding a horse", height=64, width=64, num_inference_steps=5, output_type="np")
    a = ours(generator=torch.Generator().manual_seed(0), **kwargs).images
    b = theirs(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert a.shape == b.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)  # tests/test_pipelines.py's tolerance


@pytest.mark.parametrize("target, theirs_target", [(DPMSolverMultistepScheduler, diffusers.DPMSolverMultistepScheduler), PAIRS[0]])
def test_a_deis_config_needs_sigma_min_for_dpm_solver_as_in_diffusers(target, theirs_target):
    """DPM-Solver reads an explicit algorithm_type "deis" as "dpmsolver++" but, as diffusers, refuses it with "zero".
    (A DEIS config left at its defaults reads fine: defaulted fields are not passed on, `_use_default_values`.)"""
    with pytest.raises(ValueError, match="sigma_min"):
        target.from_config(DEISMultistepScheduler(algorithm_type="deis").config)
    with pytest.raises(ValueError, match="sigma_min"):
        theirs_target.from_config(TheirDEIS(algorithm_type="deis").config)
    explicit = DEISMultistepScheduler(algorithm_type="deis").config
    assert target.from_config(explicit, final_sigmas_type="sigma_min").config.algorithm_type == "dpmsolver++"
    assert target.from_config(DEISMultistepScheduler().config).config.algorithm_type == "dpmsolver++"
