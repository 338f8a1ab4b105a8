"""`run_demo`, the function behind `minidiff demo`, with fewer steps: its files exist and hold what they claim."""

from __future__ import annotations

import csv

import pytest
from PIL import Image

from minidiff.lab import accuracy
from minidiff.lab.demo import run_demo

ALL_LABELS = [s.label for s in accuracy.DETERMINISTIC_SETUPS + accuracy.FLOW_SETUPS + accuracy.STOCHASTIC_SETUPS]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    printed = []
    out_dir = tmp_path_factory.mktemp("demo") / "out"  # created by run_demo
    result = run_demo(
        out_dir, steps=(4, 8, 16), stochastic_steps=(6,), grid_steps=(3, 6), num_trajectories=8,
        num_samples=300, image_size=16, progress=False, echo=printed.append,
    )
    return result, printed


def test_demo_writes_every_file_and_valid_pngs(demo):
    result, _ = demo
    assert sorted(result.files) == [
        "accuracy.csv", "accuracy.png", "accuracy.txt", "distribution.csv", "samples.png", "trace.gif", "trace.png"
    ]
    assert all(path.is_file() and path.parent == result.out_dir for path in result.files.values())
    for name in ("accuracy.png", "samples.png"):
        with Image.open(result.files[name]) as image:
            image.verify()  # raises on a truncated or corrupt file
        with Image.open(result.files[name]) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 300
            assert len(image.convert("L").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 10  # not a blank canvas
    with Image.open(result.files["accuracy.png"]) as image:  # one panel (400 high) per family, two per row
        families = [f for f, labels in accuracy.FAMILIES.items() if set(labels) & {r.label for r in result.convergence}]
        assert len(families) == len(accuracy.FAMILIES) and image.width % 2 == 0 and image.width >= 2 * 760
        assert image.height == 40 + (len(families) + 1) // 2 * 400
    with Image.open(result.files["samples.png"]) as image:
        rows = 1 + len(ALL_LABELS)  # the exact PF-ODE row, then one row per scheduler
        assert image.height > rows * 2 * 16 * 2  # each cell: 2 rows of 16-pixel samples, enlarged twice


def test_demo_tables_cover_every_scheduler_and_are_printed(demo):
    result, printed = demo
    assert not result.missing, f"minidiff lacks {result.missing}"
    text = result.files["accuracy.txt"].read_text()
    assert text == result.report and printed[0] == result.report and "wrote" in printed[1]
    for label in ALL_LABELS:
        assert label in text
    rows = list(csv.DictReader(result.files["accuracy.csv"].open()))
    assert len(rows) == len(accuracy.DETERMINISTIC_SETUPS + accuracy.FLOW_SETUPS) * 3
    flow = {int(row["steps"]): float(row["rms_error"]) for row in rows if row["scheduler"] == "Flow Euler"}
    assert flow[16] < flow[8] < flow[4]  # Euler on the flow ODE converges to the flow-ODE reference
    assert all(float(row["rms_error"]) > 0 for row in rows)
    by_steps = {int(row["steps"]): float(row["rms_error"]) for row in rows if row["scheduler"] == "Euler"}
    assert by_steps[16] < by_steps[8] < by_steps[4]  # the exact denoiser leaves only the scheduler's error, which falls
    distribution = list(csv.DictReader(result.files["distribution.csv"].open()))
    assert len(distribution) == len(accuracy.STOCHASTIC_SETUPS) * len(accuracy.MIXTURE_2D_MEANS)
    assert {row["scheduler"] for row in distribution} == {s.label for s in accuracy.STOCHASTIC_SETUPS}


def test_demo_rejects_bad_arguments(tmp_path):
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        run_demo(not_a_folder, progress=False, echo=None)
    with pytest.raises(ValueError, match="at least 3 increasing step counts"):
        run_demo(tmp_path / "a", steps=(10, 5, 20), progress=False, echo=None)
    with pytest.raises(ValueError, match="integers from 1 to 500"):
        run_demo(tmp_path / "b", grid_steps=(0,), progress=False, echo=None)
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        run_demo(tmp_path / "c", num_samples=0, progress=False, echo=None)


def test_demo_trace_has_eight_frames_of_x_t_and_predicted_x0(demo):
    result, _ = demo
    with Image.open(result.files["trace.gif"]) as gif:
        assert gif.n_frames == 8
    with Image.open(result.files["trace.png"]) as strip:
        side = 4 * 16  # the fixture's 16x16 pictures, shown 4x
        assert strip.size[0] == 8 * side and strip.size[1] > 2 * side  # two rows (x_t, x0) and the captions
