"""The few-step fast path of the command line (--scheduler LCM, --vae, --preview, --lora) on tiny random weights, and
`minidiff download lcm-lora / taesd / lcm-dreamshaper`'s choice of files (a fake listing, no network)."""

import pytest
import torch
from PIL import Image

from minidiff import AutoencoderTiny, download
from minidiff.cli import main
from test_download import SD15_LISTING


def run(capsys, *args) -> tuple[int, str]:
    """`minidiff ARGS` in this process (a subprocess would spend most of its time importing torch): (exit code, stderr)."""
    code = main([str(arg) for arg in args])
    return code, capsys.readouterr().err


def assert_clean_failure(capsys, fragment: str, *args) -> None:
    code, err = run(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("minidiff: error: ") and fragment in lines[0], err


@pytest.fixture(scope="module")
def taesd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("taesd")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoencoderTiny().save_pretrained(folder)
    return folder


def test_generate_fast_path_with_taesd_and_previews(tiny_sd15_folder, taesd_folder, tmp_path, capsys):
    out, previews = tmp_path / "cat.png", tmp_path / "previews"
    code, err = run(capsys, "generate", "a cat", "--weights", tiny_sd15_folder, "--size", "64x64", "--steps", "4",
                      "--scheduler", "LCM", "--guidance", "1", "--vae", taesd_folder, "--preview", previews,
                      "--out", out, "--dtype", "fp32", "--low-memory")  # --low-memory: leave this process's malloc settings alone
    assert code == 0, err
    assert Image.open(out).size == (64, 64)
    strip = Image.open(previews / "film_strip.png")
    assert strip.width == 4 * 64  # every one of the 4 steps, x_t and x0 through TAESD
    assert Image.open(previews / "denoising.gif").n_frames == 4


def test_fast_path_errors_are_one_clear_line(tiny_sd15_folder, tmp_path, capsys):
    assert_clean_failure(capsys, "TAESD", "generate", "a cat", "--weights", tiny_sd15_folder, "--vae", tmp_path / "nothing")
    assert_clean_failure(capsys, "minidiff download lcm-lora", "generate", "a cat", "--weights", tiny_sd15_folder,
                         "--lora", tmp_path / "missing.safetensors", "--low-memory")
    assert_clean_failure(capsys, "choose one", "generate", "a cat", "--weights", tiny_sd15_folder, "--trace", tmp_path,
                         "--preview", tmp_path)


def test_download_choices_for_the_few_step_weights():
    assert download.select_files(["README.md", "pytorch_lora_weights.safetensors"], [download.LCM_LORA_FILE],
                                 download.LCM_LORA_REPO) == ["pytorch_lora_weights.safetensors"]
    taesd_listing = ["config.json", "diffusion_pytorch_model.safetensors", "taesd_encoder.safetensors",
                     "taesd_decoder.safetensors", "taesd_encoder.pth"]
    assert download.select_files(taesd_listing, download.TAESD_FILES, download.TAESD_REPO) == download.TAESD_FILES
    with pytest.raises(FileNotFoundError, match="config.json not in madebyollin/taesd"):
        download.select_files(taesd_listing[1:], download.TAESD_FILES, download.TAESD_REPO)
    dreamshaper = [name for name in SD15_LISTING if not name.startswith("v1-5") and "fp16" not in name]
    chosen = download.select_sd15_files(dreamshaper, repo=download.LCM_DREAMSHAPER_REPO)
    assert "unet/diffusion_pytorch_model.safetensors" in chosen and "scheduler/scheduler_config.json" in chosen
    with pytest.raises(FileNotFoundError, match="SimianLuo/LCM_Dreamshaper_v7"):
        download.select_sd15_files(dreamshaper, variant="fp16", repo=download.LCM_DREAMSHAPER_REPO)


def test_offline_few_step_downloads_say_what_to_do(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for fetch, repo in [(download.download_lcm_lora, "lcm-lora-sdv1-5"), (download.download_taesd, "madebyollin/taesd"),
                        (download.download_lcm_dreamshaper, "LCM_Dreamshaper_v7")]:
        with pytest.raises(ConnectionError, match=repo):
            fetch()
