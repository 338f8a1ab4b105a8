"""The tutorials run, offline, as scripts: each must exit 0 (its claims are asserts) and write its pictures.

Each tutorial runs in a subprocess with `sys.executable`, from a folder outside the checkout, with
no weights configured (exact denoiser and tiny random SD weights), HF_HUB_OFFLINE=1, and its output
folder under pytest's tmp_path (MINIDIFF_TUTORIAL_OUT). Also here: the trace module (frames,
film strip, GIF) on a hand-made step sequence, and the jupytext "percent" structure of each file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from minidiff.pipelines.stable_diffusion import DenoisingStep
from minidiff.viz.trace import CAPTION_HEIGHT, evenly_spaced, record, save_film_strip, save_gif

REPO = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((REPO / "tutorials").glob("[0-9][0-9]_*.py"))
TIMEOUT_SECONDS = 120  # the bar: each tutorial in under 2 minutes on 2 shared cores (README: each one's time)
# Tutorials that train a network get more: 08 took 335 s on 2 heavily shared cores (its 400 training steps 278 s).
TIMEOUT_SECONDS_OF = {"08_train_a_denoiser": 600}

# The pictures each tutorial must write (in <out>/<tutorial name>/).
PICTURES = {
    "01_the_denoising_loop": ["data_set.png", "final.png", "steps.png", "trace.png", "trace.gif"],
    "02_deconstructing_stable_diffusion": ["image.png", "trace.png", "trace.gif", "data_flow.png"],
    "03_swapping_schedulers": ["pipeline_grid.png", "exact_model_grid.png", "timesteps.png", "sigmas.png"],
    "04_how_accurate_is_each_scheduler": ["data.png", "error_vs_steps.png", "trajectories.png", "samples.png"],
    "05_classifier_free_guidance": ["guidance_scales.png", "guidance_on_pictures.png"],
    "06_img2img_and_strength": ["input_and_house.png", "add_noise.png", "strength.png", "trace.png", "trace.gif"],
    "07_a_scheduler_next_to_its_paper": ["trajectories.png"],
    "08_train_a_denoiser": ["data.png", "eps_error_vs_sigma.png", "samples.png"],
    "09_steering_the_loop": ["loss_guidance.png", "attention_maps.png"],
    "10_lora": ["rank_vs_fit.png"],
    "11_four_steps": ["samples.png", "previews.png", "image.png"],
    "12_inpainting_measured": ["methods.png"],
    "13_flow_matching": ["paths.png", "alpha_bar.png", "log_snr.png"],
}

# Traces written by the tutorials: (frames recorded, frame width = height in pixels).
TRACES = {
    "01_the_denoising_loop": (8, 96),
    "02_deconstructing_stable_diffusion": (6, 96),
    "06_img2img_and_strength": (5, 96),
}


def run_tutorial(path: Path, out: Path, cwd: Path, **environment) -> subprocess.CompletedProcess:
    timeout = TIMEOUT_SECONDS_OF.get(path.stem, TIMEOUT_SECONDS)
    env = {key: value for key, value in os.environ.items() if key not in ("MINIDIFF_SD15", "MINIDIFF_DDPM", "MINIDIFF_SD15_INPAINTING")}
    env.update(MINIDIFF_TUTORIAL_OUT=str(out), HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1", **environment)
    return subprocess.run(
        [sys.executable, str(path)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def failure_report(result: subprocess.CompletedProcess) -> str:
    return (
        f"exit code {result.returncode}\n--- stdout (end) ---\n{result.stdout[-3000:]}\n"
        f"--- stderr (end) ---\n{result.stderr[-3000:]}"
    )


@pytest.fixture(scope="module")
def out_root(tmp_path_factory) -> Path:
    """One output folder for the module, so the tiny random SD folder is written once and shared."""
    return tmp_path_factory.mktemp("tutorials-out")


def test_every_tutorial_is_listed():
    assert [path.stem for path in TUTORIALS] == list(PICTURES)


# Tutorials too slow for the default suite (they train a network): run with `pytest -m slow`.
SLOW_TUTORIALS = {"08_train_a_denoiser"}
RUNS = [pytest.param(path, marks=pytest.mark.slow) if path.stem in SLOW_TUTORIALS else path for path in TUTORIALS]


@pytest.mark.parametrize("path", RUNS, ids=[path.stem for path in TUTORIALS])
def test_tutorial_runs_offline_and_writes_its_pictures(path: Path, out_root: Path, tmp_path: Path):
    result = run_tutorial(path, out_root, cwd=tmp_path)
    assert result.returncode == 0, failure_report(result)
    folder = out_root / path.stem
    for name in PICTURES[path.stem]:
        picture_path = folder / name
        assert picture_path.is_file(), f"{path.name} did not write {name}"
        with Image.open(picture_path) as picture:
            picture.verify()  # a complete, readable PNG or GIF
        with Image.open(picture_path) as picture:
            assert picture.width >= 32 and picture.height >= 32
            assert len(picture.convert("RGB").getcolors(maxcolors=1 << 20) or range(1 << 20)) > 8  # not blank
    if path.stem in TRACES:
        count, size = TRACES[path.stem]
        with Image.open(folder / "trace.png") as strip:
            assert strip.size == (count * size, 2 * size + CAPTION_HEIGHT)  # x_t row and predicted-x0 row
        with Image.open(folder / "trace.gif") as gif:
            assert gif.n_frames == count and gif.size == (2 * size, size + CAPTION_HEIGHT)


def test_tutorial_02_uses_weights_named_by_minidiff_sd15(out_root: Path, tmp_path: Path):
    """The "real weights" branch (a folder given in MINIDIFF_SD15), exercised with the tiny random folder."""
    from conftest import load_weights_script

    folder = load_weights_script("make_random_sd15").make_random_sd15(tmp_path / "weights", seed=1, tiny=True)
    tutorial = REPO / "tutorials" / "02_deconstructing_stable_diffusion.py"
    result = run_tutorial(tutorial, tmp_path / "out", cwd=tmp_path, MINIDIFF_SD15=str(folder))
    assert result.returncode == 0, failure_report(result)
    assert f"weights: {folder}" in result.stdout
    with Image.open(tmp_path / "out" / "02_deconstructing_stable_diffusion" / "trace.gif") as gif:
        assert gif.n_frames == 6 and gif.size == (2 * 192, 192 + CAPTION_HEIGHT)  # larger frames for real weights


def test_tutorial_01_runs_the_loop_on_the_unet_named_by_minidiff_ddpm(tmp_path: Path):
    from conftest import load_weights_script

    folder = load_weights_script("make_random_ddpm").make_random_ddpm(tmp_path / "ddpm", seed=0, tiny=True)
    tutorial = REPO / "tutorials" / "01_the_denoising_loop.py"
    result = run_tutorial(tutorial, tmp_path / "out", cwd=tmp_path, MINIDIFF_DDPM=str(folder))
    assert result.returncode == 0, failure_report(result)
    with Image.open(tmp_path / "out" / "01_the_denoising_loop" / "trained_unet.png") as picture:
        assert picture.size == (32, 32)  # the tiny ddpm-cat-256 shape works at 32x32


def test_a_missing_weights_path_is_a_clear_error(tmp_path: Path):
    result = run_tutorial(
        REPO / "tutorials" / "02_deconstructing_stable_diffusion.py", tmp_path / "out", cwd=tmp_path,
        MINIDIFF_SD15=str(tmp_path / "no-such-folder"),
    )
    assert result.returncode != 0
    assert "ValueError: MINIDIFF_SD15=" in result.stderr
    assert "does not exist" in result.stderr and "unset it" in result.stderr


@pytest.mark.parametrize("path", TUTORIALS, ids=[path.stem for path in TUTORIALS])
def test_tutorial_is_a_jupytext_percent_file(path: Path):
    """Opens as a notebook: the jupytext header, code and markdown cells, markdown lines commented out."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# ---\n# jupyter:\n#   jupytext:\n") and "format_name: percent" in text.split("# ---")[1]
    cells = text.split("\n# %%")[1:]
    markdown = [cell for cell in cells if cell.startswith(" [markdown]")]
    code = [cell for cell in cells if not cell.startswith(" [markdown]")]
    assert len(markdown) >= 5 and len(code) >= 5
    assert markdown[0].splitlines()[1].startswith(f"# # {path.stem[:2]} ")  # the title cell comes first
    for cell in markdown:
        assert all(line.startswith("#") for line in cell.splitlines()[1:] if line.strip()), cell[:200]
    assert "tutorial_helpers" in code[0] and "set_num_threads(1)" in code[0]


# ----- the trace module, on a hand-made loop ----------------------------------------------------


def fake_steps(num_steps: int, with_x0: bool = True):
    """DenoisingSteps of a 10-step "loop" whose samples fade from noise to gray, (1, 3, 16, 16)."""
    noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for step_index in range(num_steps):
        fraction = 1 - (step_index + 1) / num_steps
        sample = fraction * noise
        x0 = torch.zeros_like(sample) if with_x0 else None
        yield DenoisingStep(step_index, num_steps, torch.tensor(999 - 100 * step_index), sample, sample, x0)


def to_image(x: torch.Tensor) -> Image.Image:
    from minidiff.lab.prototypes import tensor_to_pil

    return tensor_to_pil(x[0])


def test_evenly_spaced_includes_first_and_last():
    assert evenly_spaced(10, 4) == {0, 3, 6, 9}
    assert evenly_spaced(5, 8) == {0, 1, 2, 3, 4}  # more frames than steps: every step
    assert evenly_spaced(50, 1) == {49}


def test_record_keeps_count_frames_with_their_timesteps():
    frames = record(fake_steps(10), to_image=to_image, count=4)
    assert [frame.step_index for frame in frames] == [0, 3, 6, 9]
    assert [frame.timestep for frame in frames] == [999.0, 699.0, 399.0, 99.0]
    assert all(frame.sample.size == (16, 16) and frame.predicted_x0.size == (16, 16) for frame in frames)
    assert len(record(fake_steps(10), to_image=to_image)) == 10  # count=None: every step


def test_film_strip_and_gif_have_one_column_or_frame_per_recorded_step(tmp_path: Path):
    frames = record(fake_steps(10), to_image=to_image, count=4)
    strip = save_film_strip(frames, tmp_path / "a" / "strip.png")  # creates the folder
    gif = save_gif(frames, tmp_path / "b" / "steps.gif", milliseconds_per_frame=250)
    with Image.open(strip) as picture:
        assert picture.size == (4 * 16, 2 * 16 + CAPTION_HEIGHT)
        assert picture.getpixel((3 * 16 + 8, 16 + 8)) == (128, 128, 128)  # last column, x0 row: zeros -> mid gray
    with Image.open(gif) as animation:
        assert animation.n_frames == 4 and animation.size == (2 * 16, 16 + CAPTION_HEIGHT)
        assert animation.info["duration"] == 250


def test_film_strip_without_predicted_x0_has_one_row(tmp_path: Path):
    frames = record(fake_steps(6, with_x0=False), to_image=to_image, count=3)
    with Image.open(save_film_strip(frames, tmp_path / "strip.png")) as picture:
        assert picture.size == (3 * 16, 16 + CAPTION_HEIGHT)


def test_saving_no_frames_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="no frames"):
        save_film_strip([], tmp_path / "strip.png")
    with pytest.raises(ValueError, match="no frames"):
        save_gif([], tmp_path / "steps.gif")
