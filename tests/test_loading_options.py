"""from_pretrained / from_single_file keyword arguments as diffusers 0.42.1 takes them: `dtype` and its old name
`torch_dtype` (same precedence and warning as diffusers), use_safetensors, the hub options, low_cpu_mem_usage."""

from __future__ import annotations

import shutil
import warnings

import diffusers
import pytest
import torch

from minidiff import DDPMPipeline, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from minidiff.checkpoints import hub as minidiff_hub
from minidiff.loaders import convert


def recorded(call):
    """(result, [(category, message), ...]) of `call()`, every warning recorded."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [(w.category, str(w.message)) for w in caught if "dtype" in str(w.message)]


@pytest.fixture(scope="module")
def single_file(tiny_sd15_folder, tmp_path_factory):
    return convert(tiny_sd15_folder, tmp_path_factory.mktemp("single") / "tiny.safetensors")


@pytest.mark.parametrize("ours, theirs", [(StableDiffusionPipeline, diffusers.StableDiffusionPipeline),
                                          (DiffusionPipeline, diffusers.DiffusionPipeline)])
def test_pipelines_take_dtype_and_warn_on_torch_dtype_as_diffusers_does(tiny_sd15_folder, ours, theirs):
    pipeline, ours_warnings = recorded(lambda: ours.from_pretrained(tiny_sd15_folder, dtype=torch.bfloat16))
    assert pipeline.unet.dtype == torch.bfloat16 and pipeline.text_encoder.dtype == torch.bfloat16 and not ours_warnings
    pipeline, ours_warnings = recorded(lambda: ours.from_pretrained(tiny_sd15_folder, torch_dtype=torch.bfloat16))
    _, theirs_warnings = recorded(lambda: theirs.from_pretrained(tiny_sd15_folder, torch_dtype=torch.bfloat16, safety_checker=None))
    assert pipeline.unet.dtype == torch.bfloat16
    assert ours_warnings == theirs_warnings and ours_warnings[0][0] is FutureWarning  # the same text, word for word
    for library in (ours, theirs):
        with pytest.raises(ValueError, match="passed both `dtype` and `torch_dtype`"):
            library.from_pretrained(tiny_sd15_folder, dtype=torch.float32, torch_dtype=torch.bfloat16)


def test_models_and_single_files_take_dtype_first_silently_as_diffusers_does(tiny_sd15_folder, single_file):
    both = dict(dtype=torch.bfloat16, torch_dtype=torch.float16)
    unet, ours_warnings = recorded(lambda: UNet2DConditionModel.from_pretrained(tiny_sd15_folder, subfolder="unet", **both))
    theirs, theirs_warnings = recorded(
        lambda: diffusers.UNet2DConditionModel.from_pretrained(tiny_sd15_folder, subfolder="unet", **both))
    assert unet.dtype == theirs.dtype == torch.bfloat16 and ours_warnings == theirs_warnings == []
    old_name = UNet2DConditionModel.from_pretrained(tiny_sd15_folder, subfolder="unet", torch_dtype=torch.bfloat16)
    assert old_name.dtype == torch.bfloat16
    pipeline, ours_warnings = recorded(lambda: StableDiffusionPipeline.from_single_file(single_file, config=tiny_sd15_folder, **both))
    assert pipeline.unet.dtype == pipeline.vae.dtype == torch.bfloat16 and ours_warnings == []
    assert StableDiffusionPipeline.from_single_file(single_file, config=tiny_sd15_folder, torch_dtype=torch.bfloat16).unet.dtype == torch.bfloat16
    assert UNet2DConditionModel.from_single_file(single_file, config=tiny_sd15_folder, **both).dtype == torch.bfloat16


def test_use_safetensors_chooses_the_file_kind(tiny_sd15_folder, tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(tiny_sd15_folder, folder)
    reference = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    state = {key: value + 1.0 for key, value in reference.state_dict().items()}  # a .bin that differs on purpose
    torch.save(state, folder / "unet" / "diffusion_pytorch_model.bin")
    default = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")  # None: safetensors first
    from_bin = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=False)
    assert torch.equal(default.conv_in.weight, reference.conv_in.weight)
    assert torch.equal(from_bin.conv_in.weight, reference.conv_in.weight + 1.0)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"looked for \['diffusion_pytorch_model.safetensors'\]"):
        UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
    with pytest.raises(TypeError, match="use_safetensors must be None, True or False"):
        UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors="yes")


def test_low_cpu_mem_usage_is_accepted_and_changes_nothing(tiny_sd15_folder):
    a = UNet2DConditionModel.from_pretrained(tiny_sd15_folder, subfolder="unet", low_cpu_mem_usage=False)
    b = UNet2DConditionModel.from_pretrained(tiny_sd15_folder, subfolder="unet", low_cpu_mem_usage=True)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder, low_cpu_mem_usage=False)
    assert pipeline.unet.dtype == torch.float32


def test_hub_options_reach_huggingface_hub(tiny_sd15_folder, monkeypatch, tmp_path):
    """For a repo id, revision / cache_dir / local_files_only are handed to huggingface_hub as they are."""
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append(("snapshot", repo_id, kwargs))
        return str(tiny_sd15_folder)

    def hf_hub_download(repo_id, filename, subfolder=None, **kwargs):
        calls.append(("file", repo_id, kwargs))
        path = tiny_sd15_folder / (subfolder or "") / filename
        if not path.is_file():  # as the hub answers for a file the repo does not have
            raise FileNotFoundError(f"{repo_id} has no {filename}")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    options = dict(revision="v1", cache_dir=str(tmp_path), local_files_only=True)
    StableDiffusionPipeline.from_pretrained("someone/tiny-sd", **options)
    assert calls and all(kwargs == options for _, _, kwargs in calls)
    assert {kind for kind, _, _ in calls} == {"snapshot", "file"}  # models, and the tokenizer's / scheduler's files
    calls.clear()
    StableDiffusionPipeline.from_pretrained("someone/tiny-sd")
    assert all(kwargs == {} for _, _, kwargs in calls)  # nothing is passed that was not asked for
    assert minidiff_hub.HubOptions(revision="main").as_kwargs() == {"revision": "main"}


def test_ddpm_pipeline_takes_both_spellings(tmp_path):
    from conftest import load_weights_script

    folder = load_weights_script("make_random_ddpm").make_random_ddpm(tmp_path / "ddpm", seed=0, tiny=True)
    assert DDPMPipeline.from_pretrained(folder, dtype=torch.bfloat16).unet.dtype == torch.bfloat16
    with pytest.warns(FutureWarning, match="Please use `dtype` instead"):
        assert DDPMPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16).unet.dtype == torch.bfloat16
