"""The public scheduler API diffusers users rely on, beyond `set_timesteps`/`step`: parity with diffusers 0.42.1.

- `save_pretrained` / `from_pretrained` (the same file as diffusers, the same config keys);
- `step` before `set_timesteps` (DDPM, Euler, Euler Ancestral, LMS step on all training timesteps, as in
  the Hugging Face diffusion course; the others refuse, as diffusers does);
- swapping DDPM <-> DPM-Solver configs (`variance_type`);
- deprecated config access as attributes (`scheduler.num_train_timesteps`, `unet.in_channels`);
- `use_beta_sigmas` wherever diffusers has it; `previous_timestep`'s return type; `_deprecated_kwargs`;
- `step(..., return_dict=False)` tuples and the output's key/index access.

Numbers are compared with `scheduler_parity.assert_close` (fp32: rtol 1e-5, atol 1e-6; LMS's atol scales with
sigma_max, see tests/test_schedulers_sigma.py).
"""

from __future__ import annotations

import inspect
import json
import warnings

import pytest
import torch

import minidiff
from scheduler_parity import ATOL, RTOL, assert_close, dummy_sample, fake_model, run_parity

diffusers = pytest.importorskip("diffusers")

from test_unet_2d import TINY_CAT  # noqa: E402
from test_unet_2d_condition import TINY_SD1  # noqa: E402

NAMES = [
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
]
STEPS_BEFORE_SET_TIMESTEPS = ["DDPMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler"]
STOCHASTIC = ("DDPMScheduler", "EulerAncestralDiscreteScheduler")
SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
LMS_ATOL_PER_SIGMA = 1e-6  # as tests/test_schedulers_sigma.py: diffusers' LMS coefficients are float32 quadratures


def pair(name: str, **config):
    return getattr(minidiff, name)(**config), getattr(diffusers, name)(**config)


def atol_for(theirs) -> float:
    if type(theirs).__name__ == "LMSDiscreteScheduler":
        return LMS_ATOL_PER_SIGMA * max(1.0, float(theirs.init_noise_sigma))
    return ATOL


def run_loop(ours, theirs, max_steps: int | None = None, seed: int = 0) -> int:
    """The course's loop `for t in scheduler.timesteps: ...step(model(x, t), t, x)` on both, compared at each step.
    Works on whatever schedule each scheduler holds (set or not); returns the steps taken."""
    name = type(theirs).__name__
    atol = atol_for(theirs)
    sample_ours = dummy_sample() * float(theirs.init_noise_sigma)
    sample_theirs = sample_ours.clone()
    generators = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    timesteps = list(zip(ours.timesteps, theirs.timesteps))[:max_steps]
    for i, (t_ours, t_theirs) in enumerate(timesteps):
        scaled_ours = ours.scale_model_input(sample_ours, t_ours)
        scaled_theirs = theirs.scale_model_input(sample_theirs, t_theirs)
        assert_close(scaled_ours, scaled_theirs, f"{name} scale_model_input at step {i}", RTOL, atol)
        output = fake_model(scaled_theirs, t_theirs)
        kwargs = [{"generator": g} if name in STOCHASTIC else {} for g in generators]
        step_ours = ours.step(output.clone(), t_ours, sample_ours, **kwargs[0])
        step_theirs = theirs.step(output.clone(), t_theirs, sample_theirs, **kwargs[1])
        assert_close(step_ours.prev_sample, step_theirs.prev_sample, f"{name} prev_sample at step {i}", RTOL, atol)
        sample_ours, sample_theirs = step_ours.prev_sample, step_theirs.prev_sample
    return len(timesteps)


# ----- save_pretrained / from_pretrained -------------------------------------------------------------


def test_save_pretrained_has_diffusers_signature():
    ours = inspect.signature(minidiff.DDPMScheduler.save_pretrained).parameters
    theirs = inspect.signature(diffusers.DDPMScheduler.save_pretrained).parameters
    assert list(ours)[:3] == list(theirs)[:3] == ["self", "save_directory", "push_to_hub"]
    assert ours["push_to_hub"].default is theirs["push_to_hub"].default is False


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("config", [{}, dict(SD15, steps_offset=1, timestep_spacing="trailing")], ids=["default", "sd15"])
def test_save_pretrained_writes_diffusers_file_and_reloads_equal_config(name, config, tmp_path):
    ours, theirs = pair(name, **config)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    written = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    assert written.pop("_minidiff_version") == minidiff.__version__
    assert written == json.loads((tmp_path / "theirs" / "scheduler_config.json").read_text())

    reloaded_ours = getattr(minidiff, name).from_pretrained(tmp_path / "ours")
    reloaded_theirs = getattr(diffusers, name).from_pretrained(tmp_path / "theirs")
    # A reloaded config equals the new one's in every key and value, private ones included, except
    # `_use_default_values`, which (as in diffusers) only the new object has: the file gives every key.
    assert set(ours.config) ^ set(reloaded_ours.config) == set(theirs.config) ^ set(reloaded_theirs.config) == {"_use_default_values"}
    assert dict(reloaded_ours.config) == {key: value for key, value in ours.config.items() if key != "_use_default_values"}
    assert dict(reloaded_ours.config) == dict(reloaded_theirs.config)


@pytest.mark.parametrize("name", NAMES)
def test_fresh_config_keys_match_diffusers(name, tmp_path):
    """diffusers adds `_class_name` and `_diffusers_version` when the config is first written; minidiff from the start."""
    ours, theirs = pair(name, beta_schedule="scaled_linear")
    theirs.save_pretrained(tmp_path)
    assert set(ours.config) == set(theirs.config)
    assert ours.config["_class_name"] == theirs.config["_class_name"] == name
    assert ours.config["_diffusers_version"] == theirs.config["_diffusers_version"]
    assert set(ours.config["_use_default_values"]) == set(theirs.config["_use_default_values"])
    assert "beta_schedule" not in ours.config["_use_default_values"]


def test_save_pretrained_refuses_push_to_hub(tmp_path):
    scheduler = minidiff.DDPMScheduler()
    with pytest.raises(NotImplementedError, match="push_to_hub=True is not supported.*upload_folder"):
        scheduler.save_pretrained(tmp_path, push_to_hub=True, repo_id="me/my-ddpm")
    with pytest.raises(TypeError, match="safe_serialization"):
        scheduler.save_pretrained(tmp_path, safe_serialization=True)
    # diffusers' upload arguments are accepted (and unused) without push_to_hub
    path = scheduler.save_pretrained(tmp_path, push_to_hub=False, commit_message="unused", private=True)
    assert path == tmp_path / "scheduler_config.json" and path.is_file()


# ----- step before set_timesteps ------------------------------------------------------------------


@pytest.mark.parametrize("name", STEPS_BEFORE_SET_TIMESTEPS)
@pytest.mark.parametrize("config", [{}, SD15], ids=["default", "sd15"])
def test_fresh_schedule_state_matches_diffusers(name, config):
    ours, theirs = pair(name, **config)
    assert_close(ours.timesteps, theirs.timesteps, "timesteps", rtol=0, atol=0)
    assert ours.timesteps.dtype == theirs.timesteps.dtype
    assert ours.num_inference_steps == theirs.num_inference_steps  # None, but 1000 for LMS (set at init)
    if hasattr(theirs, "sigmas"):
        assert_close(ours.sigmas, theirs.sigmas, "sigmas")
    assert_close(float(ours.init_noise_sigma), float(theirs.init_noise_sigma), "init_noise_sigma")


@pytest.mark.parametrize("name", STEPS_BEFORE_SET_TIMESTEPS)
def test_step_without_set_timesteps_matches_diffusers(name):
    """The diffusion course samples a fresh DDPM with `for t in scheduler.timesteps: scheduler.step(...)`."""
    ours, theirs = pair(name)
    # LMS's oracle integrates its coefficients with scipy at every step (~14 s for all 1000): 60 steps there.
    max_steps = 60 if name == "LMSDiscreteScheduler" else None
    steps = run_loop(ours, theirs, max_steps=max_steps)
    assert steps == (60 if max_steps else 1000)


def test_ddpm_without_set_timesteps_other_config_matches_diffusers():
    ours, theirs = pair("DDPMScheduler", beta_schedule="squaredcos_cap_v2", variance_type="fixed_large", clip_sample=False)
    assert run_loop(ours, theirs) == 1000


def test_lms_schedule_repeating_a_noise_level_starts_unset():
    """'leading' with steps_offset=1 over all T steps repeats sigma_max (diffusers then steps to inf/NaN):
    minidiff keeps the plain training schedule and leaves num_inference_steps None until set_timesteps."""
    scheduler = minidiff.LMSDiscreteScheduler(timestep_spacing="leading", steps_offset=1)
    assert scheduler.num_inference_steps is None
    assert torch.equal(scheduler.timesteps, torch.arange(999, -1, -1, dtype=torch.float32))
    with pytest.raises(ValueError, match="distinct noise levels"):
        scheduler.set_timesteps(1000)


@pytest.mark.parametrize("name", ["DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_step_before_set_timesteps_still_raises_where_diffusers_does(name):
    ours, theirs = pair(name)
    sample = dummy_sample()
    with pytest.raises((ValueError, TypeError)):  # PNDM: a TypeError from len(None) inside diffusers
        theirs.step(sample, 999, sample)
    with pytest.raises(ValueError, match="before set_timesteps; call `scheduler.set_timesteps"):
        ours.step(sample, 999, sample)


# ----- swapping DDPM <-> DPM-Solver: variance_type ----------------------------------------------------


def test_ddpm_dpm_ddpm_round_trip_matches_diffusers(tmp_path):
    """The tutorial's swap in a DDPM pipeline, through files as a hub DDPM repo gives them (every key explicit)."""
    ours_ddpm, theirs_ddpm = pair("DDPMScheduler", variance_type="fixed_small", beta_schedule="squaredcos_cap_v2")
    ours_ddpm.save_pretrained(tmp_path / "ours")
    theirs_ddpm.save_pretrained(tmp_path / "theirs")
    ours_config = minidiff.DDPMScheduler.load_config(tmp_path / "ours")
    theirs_config = diffusers.DDPMScheduler.load_config(tmp_path / "theirs")
    assert ours_config["variance_type"] == "fixed_small"

    ours_dpm = minidiff.DPMSolverMultistepScheduler.from_config(ours_config)
    theirs_dpm = diffusers.DPMSolverMultistepScheduler.from_config(theirs_config)
    assert ours_dpm.config.variance_type == theirs_dpm.config.variance_type == "fixed_small"  # kept, and unused
    for n in (10, 25):
        ours_dpm.set_timesteps(n)
        theirs_dpm.set_timesteps(n)
        assert run_loop(ours_dpm, theirs_dpm) == n

    ours_dpm.save_pretrained(tmp_path / "ours_dpm")
    theirs_dpm.save_pretrained(tmp_path / "theirs_dpm")
    ours_back = minidiff.DDPMScheduler.from_pretrained(tmp_path / "ours_dpm")
    theirs_back = diffusers.DDPMScheduler.from_pretrained(tmp_path / "theirs_dpm")
    assert dict(ours_back.config) == dict(theirs_back.config)
    ddpm_keys = [key for key in inspect.signature(minidiff.DDPMScheduler.__init__).parameters if key != "self"]
    assert {key: ours_back.config[key] for key in ddpm_keys} == {key: ours_ddpm.config[key] for key in ddpm_keys}
    ours_back.set_timesteps(50)
    theirs_back.set_timesteps(50)
    assert run_loop(ours_back, theirs_back, seed=3) == 50


@pytest.mark.parametrize("name", ["DDPMScheduler", "DPMSolverMultistepScheduler"])
def test_from_config_of_the_other_with_explicit_variance_type(name):
    """DPM-Solver's config has `"variance_type": null`, DDPM's "fixed_small": each class takes the other's value."""
    other = "DPMSolverMultistepScheduler" if name == "DDPMScheduler" else "DDPMScheduler"
    config = {**dict(getattr(minidiff, other)(**SD15).config), "_use_default_values": []}  # every key explicit, as a file
    ours = getattr(minidiff, name).from_config(config)
    theirs = getattr(diffusers, name).from_config(config)
    assert ours.config.variance_type == theirs.config.variance_type
    ours.set_timesteps(20)
    theirs.set_timesteps(20)
    assert run_loop(ours, theirs, seed=1) == 20


@pytest.mark.parametrize("variance_type", [None, "fixed_small", "fixed_large", "fixed_small_log"])
def test_ddpm_variance_type_none_is_fixed_small(variance_type):
    ours, theirs = pair("DDPMScheduler", variance_type=variance_type)
    assert ours.variance_type == theirs.variance_type == variance_type  # a real attribute in both (no warning)
    ours.set_timesteps(25)
    theirs.set_timesteps(25)
    assert run_loop(ours, theirs, seed=2) == 25


def test_dpm_solver_unknown_variance_type_is_refused():
    with pytest.raises(ValueError, match="unknown variance_type 'fixed_smal'"):
        minidiff.DPMSolverMultistepScheduler(variance_type="fixed_smal")


# ----- deprecated config access as attributes ---------------------------------------------------------


def deprecation_messages(read) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = read()
    return value, [str(w.message) for w in caught if w.category is FutureWarning]


@pytest.mark.parametrize("name", NAMES)
def test_scheduler_config_key_as_attribute_warns_as_diffusers(name):
    ours, theirs = pair(name, num_train_timesteps=500)
    value_ours, messages_ours = deprecation_messages(lambda: ours.num_train_timesteps)
    value_theirs, messages_theirs = deprecation_messages(lambda: theirs.num_train_timesteps)
    assert value_ours == value_theirs == 500
    assert messages_ours == messages_theirs and len(messages_ours) == 1
    assert "scheduler.config.num_train_timesteps" in messages_ours[0]


def test_deprecated_attribute_warning_points_at_the_caller():
    scheduler = minidiff.EulerDiscreteScheduler()
    with pytest.warns(FutureWarning, match="Accessing config attribute `timestep_spacing` directly") as record:
        scheduler.timestep_spacing
    assert record[0].filename == __file__


@pytest.mark.parametrize("name", NAMES)
def test_real_attributes_and_methods_do_not_warn(name):
    ours, theirs = pair(name)
    ours.set_timesteps(10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails
        ours.timesteps, ours.order, ours.config, ours.compatibles, ours.step, ours.init_noise_sigma, ours.step_index
        ours.config.num_train_timesteps
    # The config keys that are plain attributes in diffusers (e.g. DDPM's variance_type) are so in minidiff.
    real = [key for key in theirs.config if key in theirs.__dict__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [getattr(ours, key) for key in real] == [getattr(theirs, key) for key in real]


@pytest.mark.parametrize("name", NAMES)
def test_missing_attribute_raises_attribute_error(name):
    """(The exact message, for all fourteen classes: test_scheduler_contract.py.)"""
    scheduler = getattr(minidiff, name)()
    assert not hasattr(scheduler, "no_such_thing")
    assert getattr(scheduler, "no_such_thing", 7) == 7


@pytest.mark.parametrize("cls_name, config", [("UNet2DModel", TINY_CAT), ("UNet2DConditionModel", TINY_SD1)])
def test_model_config_key_as_attribute_warns_as_diffusers(cls_name, config):
    torch.manual_seed(0)
    ours = getattr(minidiff, cls_name)(**config)
    theirs = getattr(diffusers, cls_name)(**config)
    for key in ("in_channels", "layers_per_block", "block_out_channels"):
        value_ours, messages_ours = deprecation_messages(lambda: getattr(ours, key))
        value_theirs, messages_theirs = deprecation_messages(lambda: getattr(theirs, key))
        assert value_ours == value_theirs == config.get(key, value_theirs)
        assert messages_ours == messages_theirs and len(messages_ours) == 1
        assert f"unet.config.{key}" in messages_ours[0]
    with pytest.warns(FutureWarning) as record:
        ours.in_channels
    assert record[0].filename == __file__  # the warning points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ours.sample_size == theirs.sample_size == config["sample_size"]  # a plain attribute in both
        ours.conv_in, ours.dtype, ours.device, ours.config.in_channels, ours.forward, ours.time_embedding
        assert isinstance(ours.conv_in.weight, torch.nn.Parameter)
        assert len(list(ours.parameters())) == len(list(theirs.parameters()))
    with pytest.raises(AttributeError, match=f"'{cls_name}' object has no attribute 'no_such_layer'"):
        ours.no_such_layer


# ----- use_beta_sigmas ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_use_beta_sigmas_offered_where_diffusers_has_it(name):
    has_it = "use_beta_sigmas" in inspect.signature(getattr(diffusers, name).__init__).parameters
    assert ("use_beta_sigmas" in inspect.signature(getattr(minidiff, name).__init__).parameters) == has_it
    if has_it:
        getattr(minidiff, name)(use_beta_sigmas=True)


BETA_CASES = [
    ("EulerDiscreteScheduler", {}),
    ("LMSDiscreteScheduler", {}),
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", dict(final_sigmas_type="sigma_min")),
    ("DPMSolverMultistepScheduler", dict(solver_order=3, lower_order_final=False)),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),
    ("UniPCMultistepScheduler", {}),
    ("UniPCMultistepScheduler", dict(final_sigmas_type="sigma_min")),
    ("UniPCMultistepScheduler", dict(sigma_min=0.1, sigma_max=10.0)),
]


@pytest.mark.parametrize("name, options", BETA_CASES)
@pytest.mark.parametrize("n", [1, 2, 10, 25])
def test_use_beta_sigmas_matches_diffusers(name, options, n):
    ours_cls, theirs_cls = getattr(minidiff, name), getattr(diffusers, name)
    config = dict(SD15, use_beta_sigmas=True, **options)
    probe = theirs_cls(**config)
    probe.set_timesteps(n)
    atol = atol_for(probe)
    seed = 0 if options.get("algorithm_type") == "sde-dpmsolver++" else None
    assert run_parity(ours_cls, theirs_cls, config, n, seed=seed, atol=atol) == n


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_use_beta_sigmas_conflicts(name):
    with pytest.raises(ValueError, match="set at most one"):
        getattr(minidiff, name)(use_beta_sigmas=True, use_exponential_sigmas=True)


def test_dpm_custom_timesteps_refused_with_beta_sigmas():
    with pytest.raises(ValueError, match="use_beta_sigmas"):
        minidiff.DPMSolverMultistepScheduler(use_beta_sigmas=True).set_timesteps(timesteps=[999, 500])


# ----- DDPMScheduler.previous_timestep ----------------------------------------------------------------


def same_value_and_type(ours, theirs) -> bool:
    if isinstance(theirs, torch.Tensor):
        same_kind = isinstance(ours, torch.Tensor) and ours.dtype == theirs.dtype and ours.shape == theirs.shape
        return same_kind and torch.equal(ours, theirs)
    return type(ours) is type(theirs) and ours == theirs


@pytest.mark.parametrize("schedule", ["fresh", "set", "custom"])
def test_previous_timestep_matches_diffusers(schedule):
    ours, theirs = pair("DDPMScheduler")
    if schedule == "set":
        ours.set_timesteps(10)
        theirs.set_timesteps(10)
    elif schedule == "custom":
        ours.set_timesteps(timesteps=[999, 500, 20])
        theirs.set_timesteps(timesteps=[999, 500, 20])
    for t in list(theirs.timesteps[:2]) + list(theirs.timesteps[-2:]):
        for given in (int(t), t.clone(), t.float()):
            result_ours, result_theirs = ours.previous_timestep(given), theirs.previous_timestep(given)
            assert same_value_and_type(result_ours, result_theirs), (schedule, given, result_ours, result_theirs)


# ----- _deprecated_kwargs, return_dict=False, output access ---------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_deprecated_kwargs_as_diffusers(name):
    assert getattr(minidiff, name)._deprecated_kwargs == getattr(diffusers, name)._deprecated_kwargs


@pytest.mark.parametrize("name", NAMES)
def test_return_dict_false_gives_diffusers_tuple(name):
    ours, theirs = pair(name, **SD15)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    sample = dummy_sample() * float(theirs.init_noise_sigma)
    generators = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for i in range(3):
        t = theirs.timesteps[i]
        output = fake_model(theirs.scale_model_input(sample, t), t)
        ours.scale_model_input(sample, ours.timesteps[i])
        kwargs = [{"generator": g} if name in STOCHASTIC else {} for g in generators]
        tuple_ours = ours.step(output, ours.timesteps[i], sample, return_dict=False, **kwargs[0])
        tuple_theirs = theirs.step(output, t, sample, return_dict=False, **kwargs[1])
        assert type(tuple_ours) is tuple and len(tuple_ours) == len(tuple_theirs)
        for j, (a, b) in enumerate(zip(tuple_ours, tuple_theirs)):
            assert_close(a, b, f"{name} tuple[{j}] at step {i}", RTOL, atol_for(theirs))
        sample = tuple_theirs[0]


@pytest.mark.parametrize("name", NAMES)
def test_step_output_key_index_and_keys(name):
    ours, theirs = pair(name)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    sample = dummy_sample()
    output = fake_model(sample, theirs.timesteps[0])
    kwargs = [{"generator": torch.Generator().manual_seed(0)} if name in STOCHASTIC else {} for _ in range(2)]
    out_ours = ours.step(output, ours.timesteps[0], sample, **kwargs[0])
    out_theirs = theirs.step(output, theirs.timesteps[0], sample, **kwargs[1])
    # PNDM, DPM-Solver and UniPC also give pred_original_sample (a minidiff extra; diffusers' has prev_sample only)
    extra = ["pred_original_sample"] if name in ("PNDMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler") else []
    assert list(out_ours.keys()) == list(out_theirs.keys()) + extra
    assert out_ours["prev_sample"] is out_ours.prev_sample is out_ours[0]
    assert_close(out_ours[0], out_theirs[0], f"{name} out[0]", RTOL, atol_for(theirs))
    assert len(out_ours.to_tuple()) == len(out_theirs.to_tuple()) + len(extra)
