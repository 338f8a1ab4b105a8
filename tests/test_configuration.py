"""Configs across all schedulers: diffusers' JSON files, from_config between classes, and invariants (hypothesis)."""

import json
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minidiff
from minidiff.configuration import FrozenConfig
from minidiff.hub import HubUnavailableError

SCHEDULERS = [
    minidiff.PNDMScheduler, minidiff.DDIMScheduler, minidiff.DDPMScheduler, minidiff.LMSDiscreteScheduler,
    minidiff.EulerDiscreteScheduler, minidiff.EulerAncestralDiscreteScheduler,
    minidiff.DPMSolverMultistepScheduler, minidiff.UniPCMultistepScheduler, minidiff.DPMSolverSDEScheduler,
    minidiff.HeunDiscreteScheduler, minidiff.KDPM2DiscreteScheduler, minidiff.KDPM2AncestralDiscreteScheduler,
    minidiff.DPMSolverSinglestepScheduler, minidiff.DEISMultistepScheduler,
]
STOCHASTIC = [minidiff.DDPMScheduler, minidiff.EulerAncestralDiscreteScheduler]

# SD 1.5's scheduler/scheduler_config.json, as published (docs/schedulers.md §1): note, no timestep_spacing.
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}


def quietly(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


def public(config) -> dict:
    return {key: value for key, value in config.items() if not key.startswith("_")}


# ----- the config object -----------------------------------------------------------------------------


def test_config_is_a_read_only_mapping_with_attribute_access():
    scheduler = minidiff.DDIMScheduler(beta_schedule="scaled_linear")
    assert isinstance(scheduler.config, FrozenConfig)
    assert scheduler.config.beta_schedule == scheduler.config["beta_schedule"] == "scaled_linear"
    with pytest.raises(TypeError, match="read-only"):
        scheduler.config["beta_schedule"] = "linear"
    with pytest.raises(TypeError, match="read-only"):
        scheduler.config.beta_schedule = "linear"
    with pytest.raises(AttributeError, match="no field 'betaschedule'"):
        scheduler.config.betaschedule


@pytest.mark.parametrize("scheduler_class", SCHEDULERS)
def test_config_records_every_init_argument(scheduler_class):
    import inspect

    names = [name for name in inspect.signature(scheduler_class.__init__).parameters if name != "self"]
    assert set(names) <= set(scheduler_class().config)


# ----- SD 1.5's real file, and switching classes ----------------------------------------------------------


def test_sd15_config_gives_each_class_its_own_default_spacing(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER_CONFIG))
    pndm = minidiff.PNDMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert pndm.config.timestep_spacing == "leading" and pndm.config.skip_prk_steps is True
    euler = minidiff.EulerDiscreteScheduler.from_config(pndm.config)
    assert euler.config.timestep_spacing == "linspace"
    assert minidiff.DPMSolverMultistepScheduler.from_config(pndm.config).config.timestep_spacing == "linspace"
    assert minidiff.DDIMScheduler.from_config(pndm.config).config.timestep_spacing == "leading"
    assert euler.config.beta_schedule == "scaled_linear" and euler.config.steps_offset == 1
    pndm.set_timesteps(50)
    assert pndm.timesteps[:4].tolist() == [981, 961, 961, 941] and pndm.timesteps[-1] == 1


def test_use_default_values_in_a_file_is_understood():
    config = {**SD15_SCHEDULER_CONFIG, "timestep_spacing": "leading", "_use_default_values": ["timestep_spacing"]}
    assert minidiff.EulerDiscreteScheduler.from_config(config).config.timestep_spacing == "linspace"
    config["_use_default_values"] = []
    assert minidiff.EulerDiscreteScheduler.from_config(config).config.timestep_spacing == "leading"


def test_other_classes_keys_survive_a_round_trip_through_another_class():
    pndm = minidiff.PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    euler = minidiff.EulerDiscreteScheduler.from_config(pndm.config)
    back = minidiff.PNDMScheduler.from_config(euler.config)
    assert back.config.skip_prk_steps is True and back.config.set_alpha_to_one is False
    assert public(back.config) == public(pndm.config)


def test_unknown_keys_are_kept_and_reported_in_one_warning():
    with pytest.warns(UserWarning) as caught:
        scheduler = minidiff.DDIMScheduler.from_config({"beta_start": 0.001, "flux_capacitor": 88, "warp": True})
    messages = [str(w.message) for w in caught if "not expected" in str(w.message)]
    assert len(messages) == 1
    assert messages[0] == (
        "The config attributes {'flux_capacitor': 88, 'warp': True} were passed to DDIMScheduler, but are not expected "
        "and will be ignored. Please verify your scheduler_config.json configuration file."
    )
    assert scheduler.config["flux_capacitor"] == 88 and scheduler.config.beta_start == 0.001


def test_overrides_replace_config_values_and_unknown_overrides_are_refused():
    scheduler = minidiff.DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG, clip_sample=True, steps_offset=0)
    assert scheduler.config.clip_sample is True and scheduler.config.steps_offset == 0
    with pytest.raises(TypeError, match="unknown argument.*'clip_smaple'"):
        minidiff.DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG, clip_smaple=True)


# ----- bad config files -------------------------------------------------------------------------------------


def test_a_file_that_is_not_json_says_so(tmp_path):
    (tmp_path / "scheduler_config.json").write_text("{ beta_start: 0.1 ")
    with pytest.raises(ValueError, match="scheduler_config.json is not valid JSON"):
        minidiff.DDIMScheduler.from_pretrained(tmp_path)
    (tmp_path / "scheduler_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        minidiff.DDIMScheduler.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "key, value", [("num_train_timesteps", "1000"), ("beta_start", "small"), ("clip_sample", 1), ("timestep_spacing", 3)]
)
def test_a_wrong_type_names_the_key(key, value):
    with pytest.raises(ValueError, match=f"config key '{key}' must be a"):
        minidiff.DDIMScheduler.from_config({key: value})


def test_a_missing_folder_file_and_an_unreachable_hub_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no scheduler_config.json in"):
        minidiff.DDIMScheduler.from_pretrained(tmp_path)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnavailableError, match="from the Hugging Face hub.*local folder"):
        minidiff.DDIMScheduler.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", subfolder="scheduler")


def test_unknown_choices_are_refused_at_construction():
    with pytest.raises(ValueError, match="unknown beta_schedule 'cubic'"):
        minidiff.EulerDiscreteScheduler(beta_schedule="cubic")
    with pytest.raises(ValueError, match="prediction_type"):
        minidiff.DDIMScheduler(prediction_type="noise")
    with pytest.raises(ValueError, match="timestep_spacing"):
        minidiff.UniPCMultistepScheduler(timestep_spacing="middle")
    with pytest.raises(ValueError, match="algorithm_type"):
        minidiff.DPMSolverMultistepScheduler(algorithm_type="dpmsolver+++")


# ----- the oracle: diffusers reads our files and we read theirs ------------------------------------------


@pytest.mark.parametrize("scheduler_class", SCHEDULERS)
def test_config_files_are_interchangeable_with_diffusers(scheduler_class, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    ours = quietly(scheduler_class.from_config, SD15_SCHEDULER_CONFIG)
    ours.save_config(tmp_path / "ours")
    theirs = quietly(getattr(diffusers, scheduler_class.__name__).from_pretrained, tmp_path / "ours")
    shared = set(public(ours.config)) & set(public(theirs.config))
    assert {key: theirs.config[key] for key in shared} == {key: _jsonable(ours.config[key]) for key in shared}
    theirs.save_config(tmp_path / "theirs")
    again = quietly(scheduler_class.from_pretrained, tmp_path / "theirs")
    assert public(again.config) == {key: _jsonable(value) for key, value in public(ours.config).items()}


def _jsonable(value):
    return json.loads(json.dumps(value.tolist() if hasattr(value, "tolist") else value))


def test_compatibles_lists_every_scheduler_from_the_class_and_the_instance():
    for scheduler_class in SCHEDULERS:
        assert set(scheduler_class.compatibles) == set(SCHEDULERS)
        assert set(scheduler_class().compatibles) == set(SCHEDULERS)


# ----- properties -----------------------------------------------------------------------------------------

configs = st.fixed_dictionaries(
    {
        "num_train_timesteps": st.sampled_from([100, 1000]),
        "beta_schedule": st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"]),
        "prediction_type": st.sampled_from(["epsilon", "v_prediction"]),
        "timestep_spacing": st.sampled_from(["leading", "linspace", "trailing"]),
        "steps_offset": st.sampled_from([0, 1]),
        "skip_prk_steps": st.just(True),  # PNDM's PLMS mode, as SD uses it (other classes keep it as hidden config)
    }
)


@settings(max_examples=40, deadline=None)
@given(config=configs, scheduler_class=st.sampled_from(SCHEDULERS), fraction=st.floats(0.0, 1.0))
def test_timesteps_lie_in_range_and_decrease(config, scheduler_class, fraction):
    """Also for the step counts where diffusers' float arange adds a t = -1 (trailing, N = 61 at T = 1000)."""
    scheduler = quietly(scheduler_class.from_config, config)
    T = config["num_train_timesteps"]
    steps = max(1, int(fraction * (T // 2)))
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.double().numpy()
    assert timesteps.min() >= 0 and timesteps.max() <= T - 1 + config["steps_offset"]
    differences = np.diff(timesteps)
    if scheduler_class is minidiff.PNDMScheduler:
        # PLMS repeats its second timestep (981, 961, 961, ...); nothing else may repeat
        assert (differences <= 0).all() and (differences == 0).sum() <= 1
    elif scheduler_class in (
        minidiff.DPMSolverMultistepScheduler, minidiff.UniPCMultistepScheduler,
        minidiff.DPMSolverSinglestepScheduler, minidiff.DEISMultistepScheduler,
    ):
        assert (differences <= 0).all()  # rounding N+1 points may collapse two (diffusers does the same)
    elif scheduler_class is minidiff.HeunDiscreteScheduler:
        assert (differences <= 0).all()  # each noise level but the first is visited twice: end of a step, start of the next
    elif scheduler_class is minidiff.KDPM2AncestralDiscreteScheduler:
        # the midpoint lies between sigma_i and sigma_down < sigma_{i+1}: only the steps' own timesteps must decrease
        assert (np.diff(timesteps[0::2]) < 0).all()
    else:
        assert (differences < 0).all()


@settings(max_examples=30, deadline=None)
@given(config=configs, source=st.sampled_from(SCHEDULERS), target=st.sampled_from(SCHEDULERS))
def test_from_config_to_any_compatible_class_and_back_keeps_the_config(config, source, target):
    first = quietly(source.from_config, config)
    back = quietly(source.from_config, quietly(target.from_config, first.config).config)
    assert public(back.config) == public(first.config)


@settings(max_examples=30, deadline=None)
@given(config=configs, scheduler_class=st.sampled_from(SCHEDULERS))
def test_config_json_round_trips(config, scheduler_class, tmp_path_factory):
    scheduler = quietly(scheduler_class.from_config, config)
    folder = scheduler.save_config(tmp_path_factory.mktemp("config")).parent
    again = quietly(scheduler_class.from_pretrained, folder)
    assert public(again.config) == {key: _jsonable(value) for key, value in public(scheduler.config).items()}


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scheduler_class=st.sampled_from(STOCHASTIC))
def test_same_seed_same_output(seed, scheduler_class):
    def run():
        scheduler = scheduler_class()
        scheduler.set_timesteps(5)
        generator = torch.Generator().manual_seed(seed)
        x = torch.ones(1, 2, 4, 4) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.step(0.1 * scheduler.scale_model_input(x, t), t, x, generator=generator).prev_sample
        return x

    torch.testing.assert_close(run(), run(), rtol=0, atol=0)


@pytest.mark.parametrize("scheduler_class", SCHEDULERS)
def test_trailing_spacing_never_gives_a_negative_timestep(scheduler_class):
    """diffusers 0.42 gives 62 timesteps ending at t = -1 for trailing spacing with N = 61; we give 61."""
    scheduler = quietly(scheduler_class.from_config, {"timestep_spacing": "trailing", "skip_prk_steps": True})
    scheduler.set_timesteps(61)
    expected = 62 if scheduler_class is minidiff.PNDMScheduler else 61  # PLMS adds its repeated second step
    expected = 2 * 61 - 1 if scheduler_class.order == 2 else expected  # two model calls per step, one for the last
    assert len(scheduler.timesteps) == expected and scheduler.timesteps.min() >= 0 and scheduler.timesteps[0] == 999


@pytest.mark.parametrize("scheduler_class", SCHEDULERS)
def test_get_velocity_is_the_v_target_at_the_timesteps_own_noise_level(scheduler_class):
    """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 (Salimans & Ho 2022), for every scheduler."""
    scheduler = quietly(scheduler_class.from_config, SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(10)
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    timesteps = scheduler.timesteps[[2, 7]]
    alpha_bar = scheduler.alphas_cumprod[timesteps.round().long()].reshape(2, 1, 1, 1)  # integer or integer-valued t
    if scheduler_class in (minidiff.LMSDiscreteScheduler, minidiff.EulerDiscreteScheduler, minidiff.EulerAncestralDiscreteScheduler):
        sigma = scheduler.sigmas[[2, 7]].reshape(2, 1, 1, 1)  # float timesteps: the interpolated noise level
        alpha_bar = 1 / (sigma**2 + 1)
    if scheduler_class in (minidiff.HeunDiscreteScheduler, minidiff.KDPM2DiscreteScheduler, minidiff.KDPM2AncestralDiscreteScheduler):
        sigma = torch.stack([scheduler._model_sigma(2), scheduler._model_sigma(7)]).reshape(2, 1, 1, 1)  # entry 7: a 2nd call
        alpha_bar = 1 / (sigma**2 + 1)
    if scheduler_class is minidiff.DPMSolverSDEScheduler:  # entry 2: sigma_1; entry 7: the midpoint of sigma_3, sigma_4
        sigma_1, sigma_3, sigma_4 = scheduler.sigmas[2], scheduler.sigmas[6], scheduler.sigmas[7]
        sigma = torch.stack([sigma_1, (sigma_3 * sigma_4) ** 0.5]).reshape(2, 1, 1, 1)  # midpoint in log-sigma
        alpha_bar = 1 / (sigma**2 + 1)
    expected = alpha_bar**0.5 * eps - (1 - alpha_bar) ** 0.5 * x0
    torch.testing.assert_close(scheduler.get_velocity(x0, eps, timesteps), expected, rtol=1e-5, atol=1e-6)


# ----- from_config("a/folder"): deprecated in diffusers, still accepted ---------------------------------


@pytest.mark.parametrize("scheduler_class", SCHEDULERS)
def test_from_config_of_a_folder_loads_it_with_diffusers_future_warning(scheduler_class, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    written = quietly(scheduler_class.from_config, SD15_SCHEDULER_CONFIG)
    written.save_pretrained(tmp_path / "scheduler")
    their_class = getattr(diffusers, scheduler_class.__name__)
    for source in (tmp_path / "scheduler", str(tmp_path / "scheduler")):
        with pytest.warns(FutureWarning) as ours_warned:
            ours = scheduler_class.from_config(source)
        with pytest.warns(FutureWarning) as theirs_warned:
            theirs = their_class.from_config(source)
        ours_message = [str(w.message) for w in ours_warned if "from_config" in str(w.message)]
        theirs_message = [str(w.message) for w in theirs_warned if "from_config" in str(w.message)]
        assert len(ours_message) == len(theirs_message) == 1
        assert ours_message[0] == theirs_message[0].replace(str(their_class), str(scheduler_class))
        assert public(ours.config) == public(written.config)
        shared = set(public(ours.config)) & set(public(theirs.config))
        assert {key: theirs.config[key] for key in shared} == {key: _jsonable(ours.config[key]) for key in shared}
    # a pipeline folder: subfolder= and overrides, as diffusers passes them on to load_config and __init__
    written.save_pretrained(tmp_path / "pipeline" / "scheduler")
    with pytest.warns(FutureWarning, match="deprecated to pass a pretrained model name or path"):
        ours = scheduler_class.from_config(tmp_path / "pipeline", subfolder="scheduler", num_train_timesteps=500)
    assert ours.config.num_train_timesteps == 500 and ours.config.beta_schedule == "scaled_linear"
    with pytest.warns(FutureWarning):
        assert public(scheduler_class.from_config(pretrained_model_name_or_path=tmp_path / "scheduler").config) == public(written.config)


def test_from_config_of_a_model_folder_warns_as_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    config = dict(sample_size=8, block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, layers_per_block=1)
    minidiff.UNet2DModel(**config).save_pretrained(tmp_path)
    with pytest.warns(FutureWarning) as ours_warned:
        ours = minidiff.UNet2DModel.from_config(tmp_path)
    with pytest.warns(FutureWarning) as theirs_warned:
        diffusers.UNet2DModel.from_config(str(tmp_path))
    assert str(ours_warned[0].message) == str(theirs_warned[0].message).replace(
        str(diffusers.UNet2DModel), str(minidiff.UNet2DModel))
    assert list(ours.config.block_out_channels) == [8, 16]
    with pytest.raises(TypeError, match="takes a config mapping"):
        minidiff.DDIMScheduler.from_config(42)
