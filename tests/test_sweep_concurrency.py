"""Sweep folders shared by several runners, and specs too large to list (issue 22): a claim per job, manifests
with duplicate lines, --dry-run on a million jobs, the job-count limit."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
from PIL import Image

from minidiff.cli import main
from minidiff.sweep import expand_jobs, load_spec
from minidiff.sweep import claims, runner
from minidiff.sweep.spec import MAX_JOBS, SpecError, job_count
from test_sweep import environment, sweep_command, write_spec


@pytest.mark.slow  # two fresh processes loading torch and a pipeline: ~20 s on 2 busy cores; the threaded test below is the fast one
def test_two_runs_started_together_do_every_job_exactly_once(tmp_path, tiny_sd15_folder):
    spec = write_spec(tmp_path, tiny_sd15_folder, prompts=["a cat"], steps=[2, 3])  # 2 schedulers x 2 steps: 4 jobs
    out = tmp_path / "out"
    processes = [subprocess.Popen(sweep_command(str(spec), "--out", str(out)), env=environment(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    jobs = {job.job_id for job in expand_jobs(load_spec(spec))}
    assert sorted(entry["job_id"] for entry in lines) == sorted(jobs)  # each job once: no duplicates, no errors
    for entry in lines:
        png = out / f"{entry['job_id']}.png"
        assert hashlib.sha256(png.read_bytes()).hexdigest() == entry["sha256"]
        with Image.open(png) as image:
            image.verify()
    assert not list(out.glob(".*.claim*")) and not list(out.glob(".*.tmp"))


def test_four_runners_at_once_share_the_jobs_through_claims(tmp_path, monkeypatch):
    """The same race in one process, fast: four threads run the sweep on one folder, with a stand-in for the model
    (a slow one, so that the runners really overlap)."""
    spec = load_spec(write_spec(tmp_path, tmp_path / "weights", prompts=["a cat", "a dog"], steps=[2, 3]))  # 8 jobs
    out = tmp_path / "out"
    made = []

    def run_job(pipeline, config, job, folder):
        made.append(job.job_id)
        time.sleep(0.05)
        Image.new("RGB", (8, 8), (len(made), 0, 0)).save(folder / f"{job.job_id}.png")
        return (folder / f"{job.job_id}.png").read_bytes()

    monkeypatch.setattr(runner, "load_pipeline_for", lambda spec, device: SimpleNamespace(scheduler=SimpleNamespace(config={})))
    monkeypatch.setattr(runner, "run_job", run_job)
    monkeypatch.setattr("minidiff.sweep.report.write_report", lambda *args: None)
    threads = [threading.Thread(target=runner.run_sweep, args=(spec, out), kwargs={"progress": False}) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    jobs = sorted(job.job_id for job in expand_jobs(spec))
    assert sorted(made) == jobs  # each job generated exactly once
    assert sorted(entry["job_id"] for entry in runner.read_manifest(out)) == jobs
    assert not list(out.glob(".*.claim*"))


def test_a_claim_is_exclusive_and_a_stale_one_is_taken_over(tmp_path, monkeypatch):
    first = claims.try_claim(tmp_path, "job")
    assert first is not None and claims.try_claim(tmp_path, "job") is None  # held by a live process (this one)
    owner = json.loads(first.read_text())
    assert owner["pid"] == os.getpid() and owner["host"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    first.write_text(json.dumps({**owner, "pid": int(dead.stdout)}))  # its owner is gone: stale
    (tmp_path / ".job.12345.png.tmp").write_bytes(b"half a png")
    second = claims.try_claim(tmp_path, "job")
    assert second is not None and json.loads(second.read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".job.12345.png.tmp").exists()  # the killed owner's half-written PNG is gone
    second.write_text(json.dumps({"host": "another-host", "pid": 1, "time": time.time()}))
    assert claims.try_claim(tmp_path, "job") is None  # another host's recent claim: respected
    second.write_text(json.dumps({"host": "another-host", "pid": 1, "time": time.time() - claims.STALE_AFTER_SECONDS - 1}))
    assert claims.try_claim(tmp_path, "job") is not None  # too old: taken over


def test_manifest_readers_tolerate_duplicate_lines(tmp_path, tiny_sd15_folder):
    spec = load_spec(json.loads(write_spec(tmp_path, tiny_sd15_folder, prompts=["a cat"], steps=[2],
                                           schedulers=["DDIM"]).read_text()))
    out = tmp_path / "out"
    runner.run_sweep(spec, out, progress=False)
    manifest = out / "manifest.jsonl"
    manifest.write_text(manifest.read_text() * 3)  # e.g. two runners of an older minidiff
    assert runner.done_job_ids(out) == {expand_jobs(spec)[0].job_id}
    assert runner.run_sweep(spec, out, progress=False) == {"total": 1, "skipped": 1, "done": 0, "failed": 0}
    assert "1 of 1 images done" in (out / "index.html").read_text()


def million_job_spec(tmp_path, weights):
    return write_spec(tmp_path, weights, prompts=[f"prompt {i}" for i in range(100)], seeds=list(range(100)),
                      guidance_scales=[1.0 + i / 10 for i in range(100)], schedulers=["DDIM"], steps=[2])


def test_dry_run_of_a_million_jobs_summarises_without_listing(tmp_path, tiny_sd15_folder, capsys):
    spec = million_job_spec(tmp_path, tiny_sd15_folder)
    assert job_count(load_spec(spec)) == 10**6
    assert main(["sweep", str(spec), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("1000000 jobs = 100 prompts x 1 negative_prompts x 1 schedulers x 1 steps x 100 guidance_scales x 100 seeds")
    assert "seeds                 100: 0, 1, 2, 3, 4, ... (95 more)" in printed
    assert "first 10 jobs:" in printed and f"more than {MAX_JOBS} jobs: a run refuses" in printed
    assert "1000000 jobs, 2000000 UNet calls; one call measured at" in printed
    assert len(printed.splitlines()) < 30


def test_too_many_jobs_are_refused_unless_asked_for(tmp_path, capsys):
    spec = million_job_spec(tmp_path, tmp_path / "no-such-weights")
    out = tmp_path / "out"
    assert main(["sweep", str(spec), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "the spec makes 1000000 jobs (100 prompts x" in error and "pass --allow-many-jobs if you mean it" in error
    assert not out.exists()
    with pytest.raises(SpecError, match="more than 100000"):
        runner.run_sweep(load_spec(spec), out)


@pytest.mark.parametrize(
    "fields, message",
    [({"guidance_scales": [float("nan")]}, "NaN and infinity are refused"), ({"size": "512x1000000"}, "at most 4096 pixels per side")],
)
def test_a_spec_with_nan_guidance_or_a_runaway_size_is_refused(tmp_path, fields, message):
    with pytest.raises(SpecError, match=message):
        load_spec(write_spec(tmp_path, tmp_path / "w", **fields))
