"""The `minidiff` command, through subprocess: what it writes, and one clear line (never a traceback) on bad input."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image


def minidiff(*args, cwd=None):
    env_args = [sys.executable, "-m", "minidiff.cli", *map(str, args)]
    return subprocess.run(env_args, capture_output=True, text=True, cwd=cwd, timeout=600)


def assert_clean_failure(result, fragment: str):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minidiff: error: "), result.stderr
    assert fragment in lines[0]


def test_schedulers_lists_every_name_with_order_and_kind():
    from minidiff.schedulers.names import SAMPLER_NAMES

    result = minidiff("schedulers", "-v")
    assert result.returncode == 0, result.stderr
    for row in SAMPLER_NAMES:
        assert f"\n{row.name} " in "\n" + result.stdout
    for alias in ("PLMS", "euler_a", "dpm"):  # the short names of earlier versions still work (listed as aliases)
        assert alias in result.stdout
    assert "stochastic" in result.stdout and "deterministic" in result.stdout and "order 2" in result.stdout
    assert "use_karras_sigmas=True; default config: {'num_train_timesteps': 1000" in result.stdout


def test_generate_writes_the_image_and_a_trace(tiny_sd15_folder, tmp_path):
    out = tmp_path / "astronaut.png"
    result = minidiff(
        "generate", "an astronaut", "--weights", tiny_sd15_folder, "--size", "64x48", "--steps", "3",
        "--scheduler", "euler_a", "--seed", "1", "--out", out, "--trace", tmp_path / "trace",
    )
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (64, 48)
    assert Image.open(tmp_path / "trace" / "film_strip.png").size[0] == 3 * 64  # one column per step (3 <= 8 frames)
    assert Image.open(tmp_path / "trace" / "denoising.gif").n_frames == 3


def test_generate_takes_the_names_people_type(tiny_sd15_folder, tmp_path):
    for name in ("dpm++_2m_sde_karras",):  # one run: the spellings themselves are tested in test_scheduler_names.py
        out = tmp_path / "image.png"
        result = minidiff("generate", "a cat", "--weights", tiny_sd15_folder, "--size", "64x64", "--steps", "2",
                          "--scheduler", name, "--out", out)
        assert result.returncode == 0, result.stderr
        assert Image.open(out).size == (64, 64)


def test_compare_writes_one_labeled_grid(tiny_sd15_folder, tmp_path):
    out = tmp_path / "grid.png"
    result = minidiff("compare", "a cat", "--schedulers", "ddim,dpm", "--weights", tiny_sd15_folder, "--size", "64x64",
                      "--steps", "2", "--out", out)
    assert result.returncode == 0, result.stderr
    width, height = Image.open(out).size
    assert width == 2 * 64 and height > 64  # two images side by side, captions below


def test_convert_folder_to_single_file_and_back(tiny_sd15_folder, tmp_path):
    single = tmp_path / "model.safetensors"
    assert minidiff("convert", tiny_sd15_folder, single).returncode == 0
    result = minidiff("convert", single, tmp_path / "folder", "--config", tiny_sd15_folder)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "folder" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        tiny_sd15_folder / "unet" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()


BAD_INPUT = [
    pytest.param(*case, id=f"args{i}-{case[1]}")
    for i, case in enumerate([
        (["generate", "x", "--scheduler", "heunn"], "unknown scheduler 'heunn'"),
        (["generate", "x", "--scheduler", "DPM++ 2M Karas"], "Did you mean 'DPM++ 2M Karras'"),
        (["generate", "x", "--size", "500x512"], "multiples of 8"),
        (["generate", "x", "--size", "large"], "--size must look like 512x512"),
        (["generate", "x", "--steps", "-3"], "--steps must be at least 1"),
        (["compare", "x", "--schedulers", "ddim,nope"], "unknown scheduler 'nope'"),
        (["generate", "x", "--scheduler", "flow"], "steps a velocity model"),
        (["compare", "x", "--schedulers", "ddim,Flow Euler"], "use minidiff.RectifiedFlowPipeline"),
        (["generate", "x", "--weights", "/no/such/folder"], "no such file or folder"),
        (["generate", "x", "--out", "/proc/minidiff/out.png"], "cannot write to /proc/minidiff"),
        (["convert", "/no/such/file.safetensors", "out"], "does not exist"),
    ])
]


@pytest.mark.parametrize("args, fragment", BAD_INPUT)
def test_bad_input_ends_with_one_clear_line(args, fragment, bad_input_results):
    assert_clean_failure(bad_input_results[tuple(args)], fragment)


@pytest.fixture(scope="module")
def bad_input_results(request) -> dict:
    """Every bad command line of the test above, run by `minidiff.cli.main` in one fresh Python process (one
    start-up instead of nine): {args: CompletedProcess-like result with its exit code and stderr}."""
    cases = [tuple(param.values[0]) for param in BAD_INPUT]
    driver = (
        "import contextlib, io, json, sys\n"
        "from minidiff.cli import main\n"
        "results = []\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    stderr = io.StringIO()\n"
        "    with contextlib.redirect_stderr(stderr):\n"
        "        try:\n"
        "            code = main(args)\n"
        "        except SystemExit as exit:\n"
        "            code = exit.code\n"
        "    results.append([code, stderr.getvalue()])\n"
        "print(json.dumps(results))\n"
    )
    process = subprocess.run([sys.executable, "-c", driver, json.dumps(cases)], capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr
    return {args: subprocess.CompletedProcess(args, code, "", stderr)
            for args, (code, stderr) in zip(cases, json.loads(process.stdout.splitlines()[-1]))}


def test_missing_weights_offline_say_so(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "minidiff.cli", "generate", "x", "--weights", "someone/not-downloaded", "--out", tmp_path / "x.png"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert_clean_failure(result, "weights_scripts")


def test_download_offline_says_so():
    result = subprocess.run(
        [sys.executable, "-m", "minidiff.cli", "download", "ddpm-cat"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert_clean_failure(result, "cannot reach the Hugging Face hub")


def test_python_dash_m_minidiff_is_the_minidiff_command():
    as_module = subprocess.run([sys.executable, "-m", "minidiff", "schedulers"], capture_output=True, text=True, timeout=300)
    as_cli = minidiff("schedulers")
    assert as_module.returncode == 0 and as_module.stdout == as_cli.stdout
    bad = subprocess.run([sys.executable, "-m", "minidiff", "generate", "x", "--size", "500x512"],
                         capture_output=True, text=True, timeout=300)
    assert_clean_failure(bad, "multiples of 8")


def test_inpaint_writes_the_picture_pasted_back_and_a_trace(tiny_sd15_folder, tmp_path, capsys):
    import numpy as np

    picture = Image.fromarray((np.random.default_rng(0).random((56, 72, 3)) * 255).astype("uint8"))
    mask = Image.new("L", (72, 56), 0)
    mask.paste(255, (20, 16, 44, 40))
    picture.save(tmp_path / "picture.png")
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "inpainted.png"
    args = ["inpaint", tmp_path / "picture.png", tmp_path / "mask.png", "a red cube", "--weights", tiny_sd15_folder,
            "--steps", "3", "--padding-mask-crop", "4", "--out", out, "--trace", tmp_path / "trace"]
    result = minidiff(*args)
    assert result.returncode == 0, result.stderr
    assert "4-channel UNet, blended each step" in result.stdout
    inpainted = np.asarray(Image.open(out))
    assert inpainted.shape == (56, 72, 3)
    kept = np.asarray(mask) == 0
    np.testing.assert_array_equal(inpainted[kept], np.asarray(picture)[kept])  # the black part comes back unchanged
    assert not np.array_equal(inpainted[~kept], np.asarray(picture)[~kept])
    assert Image.open(tmp_path / "trace" / "denoising.gif").n_frames == 4  # SD 1.5's PNDM (PLMS): N + 1 steps for N
    # the refusals, in-process (each a subprocess would cost a second interpreter start)
    from minidiff.cli import main

    def refused(argv, fragment):
        assert main([str(arg) for arg in argv]) == 2
        line = capsys.readouterr().err.strip()
        assert line.startswith("minidiff: error: ") and fragment in line, line

    refused(args, "exists; choose another --out, or pass --overwrite")  # never overwritten silently
    small = tmp_path / "small.png"
    mask.resize((36, 28)).save(small)
    refused(["inpaint", tmp_path / "picture.png", small, "x", "--weights", tiny_sd15_folder], "MASK is 36x28 but IMAGE is 72x56")
    refused(["inpaint", tmp_path / "nothing.png", small, "x", "--weights", tiny_sd15_folder], "nothing.png: no such file")
    refused(["inpaint", small, tmp_path / "trace", "x", "--weights", tiny_sd15_folder], "not a picture Pillow can read")
