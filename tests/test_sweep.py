"""`minidiff sweep`: spec checking, one process vs torchrun (2 ranks, gloo), resuming after a kill, failing jobs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minidiff.sweep import expand_jobs, load_spec
from minidiff.sweep import runner
from minidiff.sweep.spec import SpecError

REPO = Path(__file__).resolve().parent.parent


def write_spec(folder: Path, weights: Path, **fields) -> Path:
    spec = {"weights": str(weights), "prompts": ["a cat", "a dog"], "schedulers": ["DDIM", "Euler a"], "steps": [2, 3],
            "seeds": [0], "size": "64x64", **fields}
    path = folder / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def sweep_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "minidiff.cli", "sweep", *arguments, "--no-progress"]


def environment() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def successes(out: Path) -> dict[str, dict]:
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    return {entry["job_id"]: entry for entry in lines if "sha256" in entry}


def test_one_process_and_two_torchrun_ranks_give_identical_images(tmp_path, tiny_sd15_folder):
    spec = write_spec(tmp_path, tiny_sd15_folder)
    single, double = tmp_path / "one", tmp_path / "two"
    subprocess.run(sweep_command(str(spec), "--out", str(single)), check=True, env=environment(), timeout=300)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "minidiff",
                "sweep", str(spec), "--out", str(double), "--no-progress"]  # --standalone: a free port, chosen at run time
    subprocess.run(torchrun, check=True, env=environment(), timeout=300, capture_output=True)
    one, two = successes(single), successes(double)
    jobs = expand_jobs(load_spec(spec))
    assert set(one) == set(two) == {job.job_id for job in jobs}
    assert {entry["rank"] for entry in two.values()} == {0, 1}  # both ranks worked
    for job_id in one:
        assert (single / f"{job_id}.png").read_bytes() == (double / f"{job_id}.png").read_bytes(), job_id
    index = (double / "index.html").read_text()
    assert all(f"{job_id}.png" in index for job_id in two) and (double / "grids" / "grid-000.png").is_file()


def test_a_killed_sweep_resumes_and_does_every_job_exactly_once(tmp_path, tiny_sd15_folder):
    spec = write_spec(tmp_path, tiny_sd15_folder, prompts=["a cat", "a dog", "a boat"], seeds=[0, 1, 2], steps=[3])
    total = len(expand_jobs(load_spec(spec)))  # 18 jobs
    out = tmp_path / "out"
    process = subprocess.Popen(sweep_command(str(spec), "--out", str(out)), env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest, deadline = out / "manifest.jsonl", time.monotonic() + 240
    while time.monotonic() < deadline and (not manifest.is_file() or len(manifest.read_text().splitlines()) < 3):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished_before = len(successes(out))
    assert 3 <= finished_before < total, "the sweep must be killed halfway for this test to mean anything"

    subprocess.run(sweep_command(str(spec), "--out", str(out)), check=True, env=environment(), timeout=300)
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    job_ids = [entry["job_id"] for entry in lines if "sha256" in entry]
    assert sorted(job_ids) == sorted({job.job_id for job in expand_jobs(load_spec(spec))})  # each once, none twice
    assert not list(out.glob(".*.tmp"))
    assert all((out / f"{job_id}.png").is_file() for job_id in job_ids)


def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_sd15_folder, monkeypatch):
    spec = load_spec(json.loads(write_spec(tmp_path, tiny_sd15_folder).read_text()))
    doomed = expand_jobs(spec)[1]
    real_run_job = runner.run_job

    def run_job(pipeline, config, job, out):
        if job == doomed:
            raise RuntimeError("out of memory (simulated)")
        return real_run_job(pipeline, config, job, out)

    monkeypatch.setattr(runner, "run_job", run_job)
    counts = runner.run_sweep(spec, tmp_path / "out", progress=False)
    assert counts == {"total": 8, "skipped": 0, "done": 7, "failed": 1}
    failures = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines() if "error" in line]
    assert [entry["job_id"] for entry in failures] == [doomed.job_id]
    assert "out of memory (simulated)" in failures[0]["error"]
    assert "out of memory (simulated)" in (tmp_path / "out" / "index.html").read_text()
    monkeypatch.setattr(runner, "run_job", real_run_job)  # a rerun retries only the failed job
    assert runner.run_sweep(spec, tmp_path / "out", progress=False)["done"] == 1


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"schedulers": ["DDIM", "Eular a"]}, "spec field 'schedulers': unknown scheduler 'Eular a'. Did you mean 'Euler a'"),
        ({"schedulers": ["DDIM", "Flow Euler"]}, "'Flow Euler' steps a velocity model"),
        ({"size": "500x512"}, "spec field 'size' is 500x512"),
        ({"prompts": []}, "spec field 'prompts' is an empty list"),
        ({"steps": [2000]}, "cannot take 2000 steps"),
        ({"dtype": "int8"}, "spec field 'dtype'"),
        ({"colour": "red"}, "unknown spec field(s) ['colour']"),
    ],
)
def test_a_bad_spec_is_refused_before_any_weights_are_loaded(tmp_path, fields, message):
    spec = write_spec(tmp_path, tmp_path / "no-such-weights", **fields)  # loading would fail: the spec must fail first
    with pytest.raises(SpecError, match=re.escape(message)):
        load_spec(spec)


def test_the_command_refuses_a_bad_spec_before_writing_anything(tmp_path):
    message = "spec field 'size' is 500x512"  # one of the cases above, through `minidiff sweep` as a user runs it
    spec = write_spec(tmp_path, tmp_path / "no-such-weights", size="500x512")
    result = subprocess.run(sweep_command(str(spec), "--out", str(tmp_path / "out")), env=environment(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_the_jobs_and_a_measured_estimate(tmp_path, tiny_sd15_folder):
    spec = write_spec(tmp_path, tiny_sd15_folder)
    result = subprocess.run(sweep_command(str(spec), "--dry-run"), env=environment(), capture_output=True, text=True,
                            timeout=120, check=True)
    for job in expand_jobs(load_spec(spec)):
        assert job.job_id in result.stdout
    assert "8 jobs, 20 UNet calls; one call measured at" in result.stdout  # DDIM and Euler a: 2 + 3 steps, twice each
