"""`minidiff generate --lora FILE[:SCALE]` and `minidiff download lora REPO` (offline: the hub is a fake)."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import load_weights_script
from minidiff import StableDiffusionPipeline
from minidiff.checkpoints import download
from minidiff.cli import main


def test_generate_with_two_loras_equals_the_pipeline_with_set_adapters_fused(tiny_sd15_folder, tmp_path, capsys):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder)
    pipe.set_progress_bar_config(disable=True)
    random_lora = load_weights_script("make_random_lora").random_lora
    files = []
    for seed, layout in ((1, "kohya"), (2, "peft")):
        files.append(tmp_path / f"{layout}.safetensors")
        save_file(random_lora(pipe.unet, pipe.text_encoder, layout, seed=seed), str(files[-1]))
    out = tmp_path / "image.png"
    code = main(["generate", "a cat", "--weights", str(tiny_sd15_folder), "--size", "64x64", "--steps", "2",
                 "--dtype", "fp32", "--lora", f"{files[0]}:0.7", "--lora", str(files[1]), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    pipe.load_lora_weights(files[0], adapter_name="a")
    pipe.load_lora_weights(files[1], adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.7, 1.0])
    pipe.fuse_lora()  # the command fuses, for speed
    expected = pipe("a cat", height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))


def test_a_missing_lora_is_refused_before_loading_the_model(tmp_path, capsys):
    code = main(["generate", "a cat", "--weights", str(tmp_path / "nothing"), "--lora", "./missing.safetensors:0.5",
                 "--out", str(tmp_path / "x.png")])
    assert code == 2
    assert "--lora ./missing.safetensors:0.5" in capsys.readouterr().err


def test_download_lora_picks_the_file_of_the_repo(monkeypatch, tmp_path, capsys):
    fetched = []

    def fake_download(repo_id, name, local_dir=None, **kwargs):
        fetched.append((repo_id, name))
        (tmp_path / name).write_bytes(b"")
        return str(tmp_path / name)

    monkeypatch.setattr(download, "list_repo_files", lambda repo_id: ["README.md", "pytorch_lora_weights.safetensors"])
    monkeypatch.setattr(download, "download_file", fake_download)
    assert main(["download", "lora", "latent-consistency/lcm-lora-sdv1-5", "--out", str(tmp_path)]) == 0
    assert fetched == [("latent-consistency/lcm-lora-sdv1-5", "pytorch_lora_weights.safetensors")]
    assert "--lora " in capsys.readouterr().out
    monkeypatch.setattr(download, "list_repo_files", lambda repo_id: ["a.safetensors", "b.safetensors"])
    assert main(["download", "lora", "someone/two-loras", "--out", str(tmp_path)]) == 2
    assert "--weight-name" in capsys.readouterr().err


def test_sweep_spec_loras_are_part_of_the_job_id(tiny_sd15_folder, tmp_path):
    from minidiff.sweep.runner import use_loras
    from minidiff.sweep.spec import SpecError, expand_jobs, load_spec

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder)
    lora = tmp_path / "pixel.safetensors"
    save_file(load_weights_script("make_random_lora").random_lora(pipe.unet, pipe.text_encoder, "peft", seed=3), str(lora))
    spec = {"weights": str(tiny_sd15_folder), "prompts": ["a cat"], "schedulers": ["DDIM"], "steps": [2]}
    plain = expand_jobs(load_spec(spec))
    jobs = expand_jobs(load_spec({**spec, "loras": [[], [[str(lora), 0.8]], [[str(lora), 0.5]]]}))
    assert len(jobs) == 3 and len({job.job_id for job in jobs}) == 3
    assert jobs[0].job_id == plain[0].job_id  # a job without LoRA keeps its id
    with pytest.raises(SpecError, match="'loras'"):
        load_spec({**spec, "loras": [[[str(lora)]]]})
    with pytest.raises(SpecError, match="is not a file"):
        load_spec({**spec, "loras": [[["missing.safetensors", 1.0]]]})
    use_loras(pipe, jobs[1].loras)
    assert pipe.get_active_adapters() == ["lora_0"]
    layer = next(module for module in pipe.unet.modules() if hasattr(module, "lora_A"))
    assert layer.scaling["lora_0"] == 0.8  # weight 0.8 * alpha / r, alpha = r
    use_loras(pipe, jobs[0].loras)
    assert pipe.get_list_adapters() == {}
