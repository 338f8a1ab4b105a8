"""benchmarks/run_all.py works with any --dtypes selection (a smoke test on tiny weights, not a measurement)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # several worker processes that each import diffusers: over a minute on 2 cores
def test_run_all_bf16_only_compares_quality_against_the_best_reference(tmp_path):
    # Without an fp32 run there is no minidiff fp32 image: the quality table must fall back to diffusers' bf16 one.
    # (The crash this guards against was in the quality section, after generation; compute is left out for time.)
    report = tmp_path / "report.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--tiny", "--repeats", "1", "--skip-compile",
         "--only", "generation,quality", "--dtypes", "bf16", "--weights", str(tmp_path / "weights"),
         "--out", str(report)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = report.read_text()
    assert "minidiff bf16 vs diffusers bf16" in text
    assert "4 steps 64x64, bf16: generation wall time" in text
    assert "fp32: generation" not in text  # only the dtypes asked for are run


def test_bench_schedulers_times_all_fourteen_against_diffusers():
    # A smoke test (2 steps, 1 repeat): every class of `compatibles` gets a row with both timings and a ratio.
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_schedulers.py"), "--steps", "2", "--repeats", "1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.endswith(tuple("0123456789")) and " us " in line]
    assert len(rows) == 14, result.stdout
    assert all(float(row[-1]) > 0 for row in rows)


def gpu_check(*arguments: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu", *arguments],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_gpu_check_runs_on_a_cpu_in_fp16_and_says_what_it_skipped(tiny_sd15_folder):
    # The GPU check's smoke test (fp16, two steps): every row prints, fp16 latents equal diffusers', CUDA-only cases say so.
    out = gpu_check("--weights", str(tiny_sd15_folder), "--dtypes", "fp16", "--steps", "2", "--colab-steps", "1")
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in out.splitlines() if line.startswith("| fp")}
    assert len(rows) == 4 + 5, out  # three samplers and img2img, then the five Colab calls
    assert all(rows[f"fp16 txt2img {name}"][0] == "0.00e+00" for name in ("DPM++ 2M", "Euler a", "DDIM")), out
    assert "skipped the CUDA generator and CPU offload" in out and "needs CUDA" in rows["fp32 model CPU offload, batch 2, 1 steps"][0]
    assert all(row[2] == "yes" for row in rows.values() if len(row) > 2), out


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_a_cpu(tmp_path):
    # The whole check as a user runs it on a CPU (fp32 and fp16, weights written by the script).
    out = gpu_check("--weights", str(tmp_path / "weights"))
    assert out.count("| fp32 txt2img") == 3 and out.count("| fp16 txt2img") == 3 and "img2img" in out
