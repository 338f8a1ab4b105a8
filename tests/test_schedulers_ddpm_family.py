"""DDPMScheduler, DDIMScheduler, PNDMScheduler: parity with diffusers 0.42.1, diffusers' published
full-loop numbers (rebuilt here without the oracle), exact timestep arrays, errors, and a DDIM property.

Parity tolerance (fp32): |ours - theirs| <= 1e-6 + 1e-5 |theirs| for every tensor of every step
(`scheduler_parity.RTOL` / `ATOL`); timesteps must be equal exactly.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffusers
from minidiff import DDIMScheduler, DDPMScheduler, PNDMScheduler
from scheduler_parity import ATOL, RTOL, assert_close, dummy_sample, fake_model, run_parity

STEP_COUNTS = [1, 2, 3, 5, 10, 20, 25, 27, 50, 100, 1000]
SPACINGS = [("leading", 0), ("leading", 1), ("linspace", 0), ("linspace", 1), ("trailing", 0), ("trailing", 1)]
SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)  # SD 1.5's training schedule


def sd15_config(cls) -> dict:
    """SD 1.5's scheduler settings, as far as `cls` takes them (DDPM has no set_alpha_to_one, PNDM no clip_sample)."""
    config = dict(SD15)
    if cls is not DDPMScheduler:
        config["set_alpha_to_one"] = False
    if cls is not PNDMScheduler:
        config["clip_sample"] = False
    return config

# a made-up trained schedule (not any named one), to check `trained_betas` is used as given
TRAINED_BETAS = (np.linspace(1e-4**0.7, 0.02**0.7, 1000) ** (1 / 0.7)).tolist()

OURS = {"DDIMScheduler": DDIMScheduler, "DDPMScheduler": DDPMScheduler, "PNDMScheduler": PNDMScheduler}


def theirs_class(ours_cls):
    return getattr(diffusers, ours_cls.__name__)


def accepted(config: dict, n: int, prk: bool = False) -> bool:
    """Whether diffusers can run n steps with this config (leading + offset 1 at n = T indexes t = T)."""
    leading = config.get("timestep_spacing", "leading") == "leading"
    if leading and config.get("steps_offset", 0) == 1 and n == 1000:
        return False
    return not (prk and n < 4)


# ----- parity: every spacing and offset at every step count -------------------------------------

def long_unless(keep: bool, n: int) -> list:
    """The `long` mark (pytest -m long) for a 1000-step run, unless it is the one kept in the default suite."""
    return [pytest.mark.long] if n >= 1000 and not keep else []


SPACING_CASES = [
    pytest.param(cls, extra, spacing, offset, n, seed, id=f"{cls.__name__}-{tag}-{spacing}-{offset}-{n}",
                 marks=long_unless((spacing, offset) == ("leading", 1), n))  # SD 1.5's spacing stays at 1000 steps
    for cls, extra, seed, tag in [
        (DDIMScheduler, {}, None, "default"),
        (DDPMScheduler, {}, 0, "default"),
        (PNDMScheduler, {"skip_prk_steps": True}, None, "plms"),
        (PNDMScheduler, {"skip_prk_steps": False}, None, "prk"),
    ]
    for spacing, offset in SPACINGS
    # steps_offset only moves "leading"; for the other spacings offset 1 is checked at two counts
    for n in (STEP_COUNTS if spacing == "leading" or offset == 0 else [1, 27])
    if accepted({"timestep_spacing": spacing, "steps_offset": offset}, n, prk=extra.get("skip_prk_steps") is False)
]


@pytest.mark.parametrize("cls, extra, spacing, offset, n, seed", SPACING_CASES)
def test_parity_spacing(cls, extra, spacing, offset, n, seed):
    config = dict(extra, timestep_spacing=spacing, steps_offset=offset)
    run_parity(cls, theirs_class(cls), config, n, seed=seed)


# ----- parity: each option value, with step counts 1, 27 and 1000 ---------------------------------

DDIM_VARIANTS = {
    "v_prediction": ({"prediction_type": "v_prediction"}, {}, None),
    "sample": ({"prediction_type": "sample"}, {}, None),
    "scaled_linear": ({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, {}, None),
    "squaredcos_cap_v2": ({"beta_schedule": "squaredcos_cap_v2"}, {}, None),
    "trained_betas": ({"trained_betas": TRAINED_BETAS}, {}, None),
    "no_alpha_to_one": ({"set_alpha_to_one": False}, {}, None),
    "no_clip": ({"clip_sample": False}, {}, None),
    "clip_range_2": ({"clip_sample_range": 2.0}, {}, None),
    "thresholding_eps": ({"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 2.0}, {}, None),
    "thresholding_v": ({"thresholding": True, "prediction_type": "v_prediction", "sample_max_value": 1.5}, {}, None),
    "zero_snr_v_trailing": ({"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, {}, None),
    "zero_snr_sample": ({"rescale_betas_zero_snr": True, "prediction_type": "sample"}, {}, None),
    "eta_0.5_generator": ({}, {"eta": 0.5}, 0),
    "eta_1_generator": ({"clip_sample": False}, {"eta": 1.0}, 1),
    "eta_clipped_eps": ({}, {"eta": 0.5, "use_clipped_model_output": True}, 2),
    "sd15": (sd15_config(DDIMScheduler), {}, None),
}
DDPM_VARIANTS = {
    "v_prediction": ({"prediction_type": "v_prediction"}, {}, 0),
    "sample": ({"prediction_type": "sample"}, {}, 0),
    "fixed_small_log": ({"variance_type": "fixed_small_log"}, {}, 0),
    "fixed_large": ({"variance_type": "fixed_large"}, {}, 0),
    "scaled_linear": ({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, {}, 0),
    "squaredcos_cap_v2": ({"beta_schedule": "squaredcos_cap_v2"}, {}, 0),
    "trained_betas": ({"trained_betas": TRAINED_BETAS}, {}, 0),
    "no_clip": ({"clip_sample": False}, {}, 0),
    "clip_range_2": ({"clip_sample_range": 2.0}, {}, 0),
    "thresholding_eps": ({"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 2.0}, {}, 0),
    "thresholding_sample": ({"thresholding": True, "prediction_type": "sample", "sample_max_value": 1.5}, {}, 0),
    "zero_snr_v_trailing": ({"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, {}, 0),
    "sd15": (sd15_config(DDPMScheduler), {}, 3),
}
PNDM_VARIANTS = {
    f"{mode}_{name}": ({"skip_prk_steps": mode == "plms", **config}, {}, None)
    for mode in ("plms", "prk")
    for name, config in {
        "v_prediction": {"prediction_type": "v_prediction"},
        "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
        "trained_betas": {"trained_betas": TRAINED_BETAS},
        "alpha_to_one": {"set_alpha_to_one": True},
        "sd15": sd15_config(PNDMScheduler),
    }.items()
}

VARIANT_CASES = [
    pytest.param(cls, config, step_kwargs, seed, n, id=f"{cls.__name__}-{name}-{n}", marks=long_unless(False, n))
    for cls, variants in [(DDIMScheduler, DDIM_VARIANTS), (DDPMScheduler, DDPM_VARIANTS), (PNDMScheduler, PNDM_VARIANTS)]
    for name, (config, step_kwargs, seed) in variants.items()
    for n in ([4, 27, 1000] if config.get("skip_prk_steps") is False else [1, 27, 1000])
    if accepted(config, n)
]


@pytest.mark.parametrize("cls, config, step_kwargs, seed, n", VARIANT_CASES)
def test_parity_options(cls, config, step_kwargs, seed, n):
    run_parity(cls, theirs_class(cls), config, n, step_kwargs, seed)


# ----- parity: loops the harness cannot drive ----------------------------------------------------


def run_loop(scheduler, model, global_seed=None, **step_kwargs) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Step through `scheduler.timesteps` from `dummy_sample()`; returns every (prev_sample, x0_pred)."""
    if global_seed is not None:
        torch.manual_seed(global_seed)  # noise drawn from torch's global CPU stream (no generator)
    sample, outputs = dummy_sample(), []
    for t in scheduler.timesteps:
        out = scheduler.step(model(sample, t), t, sample, **step_kwargs)
        outputs.append((out.prev_sample, out.pred_original_sample))
        sample = out.prev_sample
    return outputs


def assert_loops_close(ours, theirs, rtol=RTOL, atol=ATOL):
    assert len(ours) == len(theirs)
    for i, ((prev_ours, x0_ours), (prev_theirs, x0_theirs)) in enumerate(zip(ours, theirs)):
        assert_close(prev_ours, prev_theirs, f"prev_sample at step {i}", rtol, atol)
        if x0_theirs is not None:
            assert_close(x0_ours, x0_theirs, f"pred_original_sample at step {i}", rtol, atol)


def both(cls, config, **set_timesteps_kwargs):
    ours, theirs = cls(**config), theirs_class(cls)(**config)
    ours.set_timesteps(**set_timesteps_kwargs)
    theirs.set_timesteps(**set_timesteps_kwargs)
    assert torch.equal(ours.timesteps, theirs.timesteps) and ours.timesteps.dtype == theirs.timesteps.dtype
    return ours, theirs


@pytest.mark.parametrize("n", [1, 27, 1000])
def test_ddpm_without_generator_uses_the_global_stream(n):
    ours, theirs = both(DDPMScheduler, {}, num_inference_steps=n)
    assert_loops_close(run_loop(ours, fake_model, global_seed=0), run_loop(theirs, fake_model, global_seed=0))


@pytest.mark.parametrize("n", [1, 27, 1000])
def test_ddim_eta_without_generator_uses_the_global_stream(n):
    ours, theirs = both(DDIMScheduler, {}, num_inference_steps=n)
    ours_out = run_loop(ours, fake_model, global_seed=5, eta=0.7)
    assert_loops_close(ours_out, run_loop(theirs, fake_model, global_seed=5, eta=0.7))


def test_ddim_variance_noise_is_used_as_given():
    ours, theirs = both(DDIMScheduler, {}, num_inference_steps=10)
    noise = dummy_sample(seed=7)
    assert_loops_close(
        run_loop(ours, fake_model, eta=1.0, variance_noise=noise),
        run_loop(theirs, fake_model, eta=1.0, variance_noise=noise),
    )


def learned_variance_model(variance_type):
    """The fake model plus C extra channels: a variance in (0, 1) for "learned", v in (-1, 1) for "learned_range"."""
    squash = torch.sigmoid if variance_type == "learned" else torch.tanh

    def model(sample, t):
        return torch.cat([fake_model(sample, t), squash(sample * 0.5)], dim=1)  # (B, 2C, H, W)

    return model


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
@pytest.mark.parametrize("n", [1, 27, 1000])
def test_ddpm_learned_variance_parity(variance_type, n):
    ours, theirs = both(DDPMScheduler, {"variance_type": variance_type}, num_inference_steps=n)
    model = learned_variance_model(variance_type)
    ours_out = run_loop(ours, model, generator=torch.Generator().manual_seed(0))
    assert_loops_close(ours_out, run_loop(theirs, model, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("n", [1, 27, 1000])
def test_ddpm_fixed_large_log_adds_sqrt_beta_noise(n):
    """fixed_large_log: sigma_t = exp(log(beta_t) / 2) = sqrt(beta_t), i.e. fixed_large computed in log space.

    diffusers 0.42.1 takes sqrt(log(beta_t)) here, which is NaN for every t > 0, so the oracle is
    its "fixed_large", the same variance. exp(log(b) / 2) and sqrt(b) round differently in float32
    (about 1 ulp per step), and x0_pred amplifies that by up to 1/sqrt(alpha_bar_999) ~ 160, so the
    tolerance here is 1e-4 relative + 1e-4 absolute (measured: 2.6e-5 absolute at worst over 1000 steps).
    """
    ours = DDPMScheduler(variance_type="fixed_large_log")
    theirs = diffusers.DDPMScheduler(variance_type="fixed_large")
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    ours_out = run_loop(ours, fake_model, generator=torch.Generator().manual_seed(0))
    their_out = run_loop(theirs, fake_model, generator=torch.Generator().manual_seed(0))
    assert_loops_close(ours_out, their_out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("timesteps", [[999, 500, 3], [100, 87, 50, 1, 0], [0], list(range(999, -1, -7))])
def test_ddpm_custom_timesteps_parity(timesteps):
    ours, theirs = both(DDPMScheduler, {}, timesteps=timesteps)
    ours_out = run_loop(ours, fake_model, generator=torch.Generator().manual_seed(0))
    assert_loops_close(ours_out, run_loop(theirs, fake_model, generator=torch.Generator().manual_seed(0)))
    expected_prev = timesteps[1:] + [-1]
    assert [ours.previous_timestep(t) for t in ours.timesteps] == expected_prev


def test_ddpm_generator_list_draws_one_sample_each():
    ours, theirs = both(DDPMScheduler, {}, num_inference_steps=5)
    def generators():  # one per sample of the batch of 2
        return [torch.Generator().manual_seed(seed) for seed in (3, 4)]

    assert_loops_close(run_loop(ours, fake_model, generator=generators()), run_loop(theirs, fake_model, generator=generators()))


# ----- the rest of the API, against diffusers ----------------------------------------------------


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler, PNDMScheduler])
def test_add_noise_and_velocity_parity(cls):
    ours, theirs = cls(**sd15_config(cls)), theirs_class(cls)(**sd15_config(cls))
    x0, noise = dummy_sample(seed=1), dummy_sample(seed=2)
    timesteps = torch.tensor([999, 3])  # one timestep per sample
    assert_close(ours.add_noise(x0, noise, timesteps), theirs.add_noise(x0, noise, timesteps), "add_noise")
    assert_close(ours.add_noise(x0, noise, timesteps[:1]), theirs.add_noise(x0, noise, timesteps[:1]), "add_noise")
    if cls is not PNDMScheduler:  # diffusers' PNDM has no get_velocity
        assert_close(ours.get_velocity(x0, noise, timesteps), theirs.get_velocity(x0, noise, timesteps), "get_velocity")


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler, PNDMScheduler])
def test_fp16_sample_stays_fp16_like_diffusers(cls):
    ours, theirs = both(cls, {"skip_prk_steps": True} if cls is PNDMScheduler else {}, num_inference_steps=10)
    sample = dummy_sample().half()
    t = ours.timesteps[0]
    kwargs = {} if cls is PNDMScheduler else {"generator": torch.Generator().manual_seed(0)}
    out_ours = ours.step(fake_model(sample, t), t, sample, **kwargs).prev_sample
    kwargs = {} if cls is PNDMScheduler else {"generator": torch.Generator().manual_seed(0)}
    out_theirs = theirs.step(fake_model(sample, t), t, sample, **kwargs).prev_sample
    assert out_ours.dtype == out_theirs.dtype == torch.float16
    assert_close(out_ours, out_theirs, "fp16 prev_sample", rtol=1e-3, atol=1e-3)  # fp16: ~3 significant digits


def test_variance_values_published_by_diffusers():
    """diffusers' test_variance numbers (default linear config), to within their 1e-5."""
    ddim = DDIMScheduler()
    for (t, prev), expected in {(0, 0): 0.0, (420, 400): 0.14771, (980, 960): 0.32460, (487, 486): 0.00979, (999, 998): 0.02}.items():
        assert abs(ddim._get_variance(t, prev).item() - expected) < 1e-5
    ddpm = DDPMScheduler(variance_type="fixed_small")
    ddpm.set_timesteps(1000)
    for t, expected in {0: 0.0, 487: 0.00979, 999: 0.02}.items():
        assert abs(ddpm._get_variance(t).item() - expected) < 1e-5


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler, PNDMScheduler])
def test_tuple_output_equals_dict_output(cls):
    sample = dummy_sample()
    outputs = []
    for return_dict in (True, False):
        scheduler = cls()
        scheduler.set_timesteps(10)
        t = scheduler.timesteps[0]
        kwargs = {} if cls is PNDMScheduler else {"generator": torch.Generator().manual_seed(0)}
        out = scheduler.step(fake_model(sample, t), t, sample, return_dict=return_dict, **kwargs)
        outputs.append(out.to_tuple() if return_dict else out)
    as_dict, as_tuple = outputs
    # PNDM's tuple is diffusers' (prev_sample,); its output object also has pred_original_sample (tests/test_scheduler_api.py)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == (1 if cls is PNDMScheduler else 2) and len(as_dict) == 2
    for a, b in zip(as_tuple, as_dict):
        assert a.shape == sample.shape and torch.equal(a, b)


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler, PNDMScheduler])
def test_config_round_trip_and_diffusers_files(cls, tmp_path):
    scheduler = cls(**sd15_config(cls))
    scheduler.save_config(tmp_path / "ours")
    again = cls.from_pretrained(tmp_path / "ours")
    assert {k: v for k, v in again.config.items() if not k.startswith("_")} == {
        k: v for k, v in scheduler.config.items() if not k.startswith("_")
    }
    # a config file written by diffusers reads as it is, and ours reads in diffusers
    theirs = theirs_class(cls)(**sd15_config(cls))
    theirs.save_config(tmp_path / "theirs")
    from_theirs = cls.from_pretrained(tmp_path / "theirs")
    their_from_ours = theirs_class(cls).from_pretrained(tmp_path / "ours")
    from_theirs.set_timesteps(50)
    their_from_ours.set_timesteps(50)
    assert torch.equal(from_theirs.timesteps, their_from_ours.timesteps)


SD15_SCHEDULER_CONFIG = {  # HDRJ-One/runwayml-stable-diffusion-v1-5: scheduler/scheduler_config.json (docs/schedulers.md §1)
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


@pytest.mark.parametrize("target", [DDIMScheduler, DDPMScheduler, PNDMScheduler])
def test_switching_from_sd15_config_matches_diffusers(target):
    ours = target.from_config(PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG).config)
    theirs = theirs_class(target).from_config(diffusers.PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG).config)
    init_keys = [k for k in inspect.signature(target.__init__).parameters if k != "self"]
    assert {k: ours.config[k] for k in init_keys} == {k: theirs.config[k] for k in init_keys}
    run_parity(target, theirs_class(target), {k: ours.config[k] for k in init_keys}, 50, seed=0 if target is DDPMScheduler else None)


# ----- exact timestep arrays ---------------------------------------------------------------------


def test_ddim_timesteps_5_steps_offset_1():
    scheduler = DDIMScheduler(steps_offset=1)
    scheduler.set_timesteps(5)
    assert scheduler.timesteps.tolist() == [801, 601, 401, 201, 1]
    assert scheduler.timesteps.dtype == torch.int64


def test_pndm_sd15_50_steps_runs_51_model_calls():
    scheduler = PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    assert scheduler.config.timestep_spacing == "leading"  # not in the file: PNDM's own default
    scheduler.set_timesteps(50)
    expected = [981, 961, 961] + list(range(941, 0, -20))
    assert scheduler.timesteps.tolist() == expected and len(expected) == 51
    sample, calls = dummy_sample(), 0
    for t in scheduler.timesteps:
        sample = scheduler.step(fake_model(sample, t), t, sample).prev_sample
        calls += 1
    assert calls == 51 and torch.isfinite(sample).all()


def test_pndm_prk_timesteps_10_steps_offset_1():
    scheduler = PNDMScheduler(steps_offset=1)
    scheduler.set_timesteps(10)
    expected = [901, 851, 851, 801, 801, 751, 751, 701, 701, 651, 651, 601, 601, 501, 401, 301, 201, 101, 1]
    assert scheduler.timesteps.tolist() == expected
    assert scheduler.prk_timesteps.tolist() == expected[:12] and scheduler.plms_timesteps.tolist() == expected[12:]


def test_no_duplicate_timesteps_at_n_equals_t():
    for cls in (DDIMScheduler, DDPMScheduler):
        scheduler = cls(timestep_spacing="linspace")
        scheduler.set_timesteps(1000)
        assert len(set(scheduler.timesteps.tolist())) == 1000


# ----- diffusers' published full-loop numbers, rebuilt without the oracle -------------------------
# From diffusers' tests/schedulers/test_scheduler_{ddim,pndm,ddpm}.py (docs/schedulers.md §5), with
# their tolerances: |sum - expected| < 1e-2 and |mean - expected| < 1e-3.

TEST_CONFIG = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")


def sample_deter() -> torch.Tensor:
    """diffusers' dummy_sample_deter: arange(4*3*8*8)/n, reshaped (3, 8, 8, 4), permuted to (4, 3, 8, 8)."""
    n = 4 * 3 * 8 * 8
    return (torch.arange(n).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)


def noise_deter() -> torch.Tensor:
    """diffusers' dummy_noise_deter: the same, from the flipped arange."""
    n = 4 * 3 * 8 * 8
    return (torch.arange(n).flip(-1).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)


def dummy_model(sample, t):
    return sample * t / (t + 1)


def assert_sum_mean(sample, expected_sum, expected_mean):
    total, mean = sample.abs().sum().item(), sample.abs().mean().item()
    assert abs(total - expected_sum) < 1e-2, f"sum |x| = {total}, published {expected_sum}"
    assert abs(mean - expected_mean) < 1e-3, f"mean |x| = {mean}, published {expected_mean}"


@pytest.mark.parametrize(
    "config, expected_sum, expected_mean",
    [
        ({}, 172.0067, 0.223967),
        ({"prediction_type": "v_prediction"}, 52.5302, 0.0684),
        ({"set_alpha_to_one": True, "beta_start": 0.01}, 149.8295, 0.1951),
        ({"set_alpha_to_one": False, "beta_start": 0.01}, 149.0784, 0.1941),
    ],
)
def test_ddim_published_full_loop(config, expected_sum, expected_mean):
    scheduler = DDIMScheduler(**{**TEST_CONFIG, "clip_sample": True, **config})
    scheduler.set_timesteps(10)
    sample = sample_deter()
    for t in scheduler.timesteps:
        sample = scheduler.step(dummy_model(sample, t), t, sample, eta=0.0).prev_sample
    assert_sum_mean(sample, expected_sum, expected_mean)


def test_ddim_published_full_loop_with_noise():
    scheduler = DDIMScheduler(**TEST_CONFIG, clip_sample=True)
    scheduler.set_timesteps(10)
    timesteps = scheduler.timesteps[8 * scheduler.order :]  # img2img: start at t_start = 8
    sample = scheduler.add_noise(sample_deter(), noise_deter(), timesteps[:1])
    for t in timesteps:
        sample = scheduler.step(dummy_model(sample, t), t, sample, eta=0.0).prev_sample
    assert_sum_mean(sample, 354.5418, 0.4616)


@pytest.mark.parametrize("use_step", [False, True])
@pytest.mark.parametrize(
    "config, expected_sum, expected_mean",
    [
        ({}, 198.1318, 0.2580),
        ({"prediction_type": "v_prediction"}, 67.3986, 0.0878),
        ({"set_alpha_to_one": True, "beta_start": 0.01}, 230.0399, 0.2995),
        ({"set_alpha_to_one": False, "beta_start": 0.01}, 186.9482, 0.2434),
    ],
)
def test_pndm_published_full_loop(config, expected_sum, expected_mean, use_step):
    """PRK then PLMS, 10 steps; diffusers' loop calls step_prk then step_plms, `step` picks them itself."""
    scheduler = PNDMScheduler(**{**TEST_CONFIG, **config})
    scheduler.set_timesteps(10)
    sample = sample_deter()
    if use_step:
        for t in scheduler.timesteps:
            sample = scheduler.step(dummy_model(sample, t), t, sample).prev_sample
    else:
        for t in scheduler.prk_timesteps:
            sample = scheduler.step_prk(dummy_model(sample, t), t, sample).prev_sample
        for t in scheduler.plms_timesteps:
            sample = scheduler.step_plms(dummy_model(sample, t), t, sample).prev_sample
    assert_sum_mean(sample, expected_sum, expected_mean)


@pytest.mark.parametrize("config, expected_sum, expected_mean", [({}, 258.9606, 0.3372), ({"prediction_type": "v_prediction"}, 202.0296, 0.2631)])
def test_ddpm_published_full_loop(config, expected_sum, expected_mean):
    """All 1000 steps with `torch.manual_seed(0)` (the global CPU generator) passed as generator.

    diffusers' test steps without set_timesteps (its default chain is t = 999..0); minidiff asks
    for set_timesteps first, and set_timesteps(1000) gives that same chain.
    """
    scheduler = DDPMScheduler(**TEST_CONFIG, variance_type="fixed_small", clip_sample=True, **config)
    scheduler.set_timesteps(1000)
    assert scheduler.timesteps.tolist() == list(range(999, -1, -1))
    sample, generator = sample_deter(), torch.manual_seed(0)
    for t in scheduler.timesteps:
        sample = scheduler.step(dummy_model(sample, t), t, sample, generator=generator).prev_sample
    assert_sum_mean(sample, expected_sum, expected_mean)


def test_ddpm_published_full_loop_with_noise():
    scheduler = DDPMScheduler(**TEST_CONFIG, variance_type="fixed_small", clip_sample=True)
    scheduler.set_timesteps(1000)
    timesteps = scheduler.timesteps[998 * scheduler.order :]  # t = 1, 0
    sample, generator = scheduler.add_noise(sample_deter(), noise_deter(), timesteps[:1]), torch.manual_seed(0)
    for t in timesteps:
        sample = scheduler.step(dummy_model(sample, t), t, sample, generator=generator).prev_sample
    assert_sum_mean(sample, 387.9466, 0.5051)


# ----- bad input ---------------------------------------------------------------------------------


# DDPM steps before set_timesteps (on all training timesteps), as diffusers: tests/test_scheduler_api.py.
@pytest.mark.parametrize("cls", [DDIMScheduler, PNDMScheduler])
def test_step_before_set_timesteps_raises(cls):
    scheduler = cls()
    sample = dummy_sample()
    with pytest.raises(ValueError, match="before set_timesteps"):
        scheduler.step(sample, 999, sample)


def test_pndm_stage_methods_before_set_timesteps_raise():
    scheduler = PNDMScheduler()
    sample = dummy_sample()
    for method in (scheduler.step_prk, scheduler.step_plms):
        with pytest.raises(ValueError, match="before set_timesteps"):
            method(sample, 999, sample)


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler, PNDMScheduler])
@pytest.mark.parametrize("n", [0, -3, 1001, 2.5])
def test_bad_num_inference_steps_raise(cls, n):
    with pytest.raises(ValueError, match="num_inference_steps"):
        cls().set_timesteps(n)


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler, PNDMScheduler])
@pytest.mark.parametrize(
    "field, value",
    [("beta_schedule", "cosine"), ("prediction_type", "x0"), ("timestep_spacing", "uniform")],
)
def test_unknown_config_values_raise_at_construction(cls, field, value):
    with pytest.raises(ValueError, match=f"unknown {field} '{value}'"):
        cls(**{field: value})


def test_unknown_variance_type_raises():
    """A deliberate difference: diffusers' DDPMScheduler accepts variance_type="other" (it fails later, or never, if
    no step reads it); minidiff refuses it at construction, naming the field and the allowed values."""
    diffusers.DDPMScheduler(variance_type="other")  # the oracle lets it through
    with pytest.raises(ValueError, match="unknown variance_type 'other'"):
        DDPMScheduler(variance_type="other")


def test_pndm_rejects_sample_prediction():
    with pytest.raises(ValueError, match="unknown prediction_type 'sample'"):
        PNDMScheduler(prediction_type="sample")


@pytest.mark.parametrize("n", [1, 2, 3])
def test_pndm_prk_needs_four_steps(n):
    with pytest.raises(ValueError, match="num_inference_steps >= 4"):
        PNDMScheduler(skip_prk_steps=False).set_timesteps(n)
    with pytest.raises(ValueError):  # diffusers fails too (a numpy broadcasting error)
        diffusers.PNDMScheduler(skip_prk_steps=False).set_timesteps(n)


def test_pndm_plms_without_past_residuals_raises():
    scheduler = PNDMScheduler(skip_prk_steps=False)
    scheduler.set_timesteps(10)
    sample = dummy_sample()
    with pytest.raises(ValueError, match="needs the 3 model outputs"):
        scheduler.step_plms(sample, 1, sample)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_inference_steps": 5, "timesteps": [100, 87, 50, 1, 0]}, "exactly one of"),
        ({}, "exactly one of"),
        ({"timesteps": [100, 87, 50, 51, 0]}, "descending"),
        ({"timesteps": [100, 100, 0]}, "descending"),
        ({"timesteps": [1000]}, "start below num_train_timesteps=1000"),
        ({"timesteps": [10, -1]}, ">= 0"),
        ({"timesteps": []}, "empty"),
    ],
)
def test_ddpm_custom_timesteps_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DDPMScheduler().set_timesteps(**kwargs)


def test_ddpm_learned_variance_needs_twice_the_channels():
    scheduler = DDPMScheduler(variance_type="learned_range")
    scheduler.set_timesteps(10)
    sample = dummy_sample()
    with pytest.raises(ValueError, match="2 x 4 channels"):
        scheduler.step(sample, scheduler.timesteps[0], sample)


def test_ddim_generator_and_variance_noise_together_raise():
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    sample = dummy_sample()
    with pytest.raises(ValueError, match="either `generator` or `variance_noise`"):
        scheduler.step(sample, 901, sample, eta=1.0, generator=torch.Generator(), variance_noise=sample)


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler, PNDMScheduler])
def test_fractional_timestep_raises(cls):
    scheduler = cls(skip_prk_steps=True) if cls is PNDMScheduler else cls()
    scheduler.set_timesteps(10)
    sample = dummy_sample()
    with pytest.raises(ValueError, match="integer training timesteps, got 900.5"):
        scheduler.step(sample, torch.tensor(900.5), sample)


def test_ddpm_unknown_timestep_raises():
    scheduler = DDPMScheduler()
    scheduler.set_timesteps(10)
    sample = dummy_sample()
    with pytest.raises(ValueError, match="timestep 901 is not one of"):
        scheduler.step(sample, 901, sample)


# ----- a property of DDIM ------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    num_inference_steps=st.integers(1, 100),
    index=st.integers(0, 99),
    spacing=st.sampled_from(["leading", "linspace", "trailing"]),
    set_alpha_to_one=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_ddim_step_with_the_true_noise_lands_on_the_forward_process(num_inference_steps, index, spacing, set_alpha_to_one, seed):
    """x_t = add_noise(x0, eps, t); one DDIM step (eta = 0) given the true eps returns x0_pred = x0 and
    x_prev = sqrt(alpha_bar_prev) x0 + sqrt(1 - alpha_bar_prev) eps (eq. 12 with sigma_t = 0).

    Tolerance 2e-5 absolute: float32 x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) loses about
    6e-8 / sqrt(alpha_bar_min) = 6e-8 / 0.068 ~ 1e-6 per unit of |x_t| on SD 1.5's schedule
    (measured worst over 300 random cases: 1.9e-6).
    """
    scheduler = DDIMScheduler(**{**sd15_config(DDIMScheduler), "set_alpha_to_one": set_alpha_to_one}, timestep_spacing=spacing)
    scheduler.set_timesteps(num_inference_steps)
    t = scheduler.timesteps[index % num_inference_steps]
    generator = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    x_t = scheduler.add_noise(x0, eps, t.reshape(1))
    out = scheduler.step(eps, t, x_t)

    prev_t = int(t) - 1000 // num_inference_steps
    alpha_bar_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    expected_prev = alpha_bar_prev**0.5 * x0 + (1 - alpha_bar_prev) ** 0.5 * eps
    torch.testing.assert_close(out.pred_original_sample, x0, rtol=0, atol=2e-5)
    torch.testing.assert_close(out.prev_sample, expected_prev, rtol=0, atol=2e-5)
    if prev_t < 0 and set_alpha_to_one:  # the final step returns x_0 itself
        torch.testing.assert_close(out.prev_sample, x0, rtol=0, atol=2e-5)


def test_pndm_pred_original_sample_recovers_x0_from_the_true_noise():
    """minidiff's PNDM also returns the x0 its step implies (diffusers' does not): x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar)."""
    scheduler = PNDMScheduler(skip_prk_steps=True)
    scheduler.set_timesteps(10)
    x0, eps = dummy_sample(), torch.randn(dummy_sample().shape, generator=torch.Generator().manual_seed(1))
    t = scheduler.timesteps[0]
    x_t = scheduler.add_noise(x0, eps, t.reshape(1))
    output = scheduler.step(eps, t, x_t)
    torch.testing.assert_close(output.pred_original_sample, x0, rtol=1e-4, atol=1e-4)  # fp32 division by sqrt(abar)
