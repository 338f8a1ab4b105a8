"""The sampler names people type (A1111 / k-diffusion, the CLI's short names, class names) -> class + config."""

from pathlib import Path

import pytest

import minidiff.schedulers as schedulers
from minidiff.schedulers.names import SAMPLER_NAMES, find_sampler

# diffusers' docs, "Schedulers" overview, the A1111/k-diffusion -> diffusers table (rows minidiff has), and the two
# rows names.py keeps on purpose (see its docstring).
DIFFUSERS_TABLE = {
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    # the page says DPMSolverSinglestepScheduler; k-diffusion's sample_dpmpp_sde is DPMSolverSDEScheduler (names.py)
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
}


@pytest.mark.parametrize("name", sorted(DIFFUSERS_TABLE))
def test_a1111_names_mean_what_diffusers_docs_say(name):
    class_name, overrides = DIFFUSERS_TABLE[name]
    row = find_sampler(name)
    assert row.scheduler_class.__name__ == class_name and row.overrides == overrides
    base = schedulers.PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    built = row.from_config(base.config)  # the tutorial's swap, with the name's settings on top
    assert type(built).__name__ == class_name
    assert all(built.config[key] == value for key, value in overrides.items())
    assert built.config.beta_schedule == "scaled_linear"


@pytest.mark.parametrize("typed", ["dpm++ 2m karras", "DPM++_2M_KARRAS", "  dpm++-2m-karras "])
def test_case_spaces_and_separators_do_not_matter(typed):
    assert find_sampler(typed).name == "DPM++ 2M Karras"


def test_aliases_and_class_names():
    assert find_sampler("euler_a").name == "Euler a"
    assert find_sampler("PLMS").scheduler_class is schedulers.PNDMScheduler
    for row in SAMPLER_NAMES:
        by_class = find_sampler(row.scheduler_class.__name__)
        assert by_class.scheduler_class is row.scheduler_class and by_class.overrides == {}


def test_every_name_is_unique_and_every_class_is_named():
    keys = [name.lower() for row in SAMPLER_NAMES for name in (row.name, *row.aliases)]
    assert len(keys) == len(set(keys))
    named = {row.scheduler_class.__name__ for row in SAMPLER_NAMES if row.family == "diffusion"}
    assert named == {cls.__name__ for cls in schedulers.PNDMScheduler.compatibles}
    flow = [row for row in SAMPLER_NAMES if row.family == "flow"]  # not in SD 1.5's compatibles, as in diffusers
    assert [row.scheduler_class for row in flow] == [schedulers.FlowMatchEulerDiscreteScheduler]
    assert schedulers.FlowMatchEulerDiscreteScheduler not in schedulers.PNDMScheduler.compatibles
    assert find_sampler("flow").scheduler_class is schedulers.FlowMatchEulerDiscreteScheduler
    few_step = [row.scheduler_class for row in SAMPLER_NAMES if row.family == "consistency"]  # named, in no compatibles
    assert few_step == [schedulers.LCMScheduler, schedulers.TCDScheduler]
    assert not set(few_step) & set(schedulers.PNDMScheduler.compatibles)


def test_unknown_names_suggest_the_closest():
    with pytest.raises(ValueError, match="Did you mean 'Euler a'"):
        find_sampler("Eular a")


def test_the_readme_table_lists_every_name_with_its_class():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for sampler in SAMPLER_NAMES:
        assert f"| {sampler.name} | `{sampler.scheduler_class.__name__}` |" in readme, sampler.name
