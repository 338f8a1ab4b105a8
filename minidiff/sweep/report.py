"""What a person looks at after a sweep: one comparison grid per (prompt, negative prompt, guidance, seed) and
an index.html showing each grid and every image with its settings.

A grid has one row per scheduler and one column per step count, as in the reference tutorial's comparison of
schedulers on one prompt and seed. A job that failed, or is not done yet, is a grey tile with its error.
"""

from __future__ import annotations

import html
from pathlib import Path

from PIL import Image

from minidiff.viz.grid import labeled_grid
from minidiff.sweep.spec import Job

GRID_FOLDER = "grids"


def group_key(job: Job) -> tuple:
    return (job.prompt, job.negative_prompt, job.guidance_scale, job.seed)


def tile(out: Path, job: Job, entry: dict | None) -> tuple[Image.Image, str]:
    label = f"{job.scheduler}, {job.steps} steps"
    path = out / f"{job.job_id}.png"
    if entry is not None and "error" not in entry and path.is_file():
        return Image.open(path).convert("RGB"), label
    reason = "failed" if entry is not None and "error" in entry else "not done"
    return Image.new("RGB", (job.width, job.height), (200, 200, 200)), f"{label}: {reason}"


def write_report(out: Path, jobs: list[Job], manifest: list[dict]) -> Path:
    """Write out/grids/*.png and out/index.html; returns the index's path."""
    latest = {entry["job_id"]: entry for entry in manifest}  # a job retried after a failure: its last line counts
    (out / GRID_FOLDER).mkdir(exist_ok=True)
    sections = []
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:  # in the spec's order: rows keep the order the schedulers were listed in
        groups.setdefault(group_key(job), []).append(job)
    for number, (key, members) in enumerate(groups.items()):
        step_counts = sorted({job.steps for job in members})
        tiles = [tile(out, job, latest.get(job.job_id)) for job in members]
        grid = labeled_grid([image for image, _ in tiles], [label for _, label in tiles], columns=len(step_counts))
        grid_name = f"{GRID_FOLDER}/grid-{number:03d}.png"
        grid.save(out / grid_name)
        sections.append(section_html(key, grid_name, members, latest))
    index = out / "index.html"
    index.write_text(PAGE.format(count=len(jobs), done=sum("error" not in latest[job.job_id] for job in jobs if job.job_id in latest),
                                 sections="\n".join(sections)), encoding="utf-8")
    return index


def section_html(key: tuple, grid_name: str, members: list[Job], latest: dict) -> str:
    prompt, negative, guidance, seed = key
    figures = []
    for job in members:
        entry = latest.get(job.job_id, {})
        status = (f"{entry['seconds']:.1f} s on rank {entry['rank']}" if "sha256" in entry
                  else html.escape(entry.get("error", "not done")))
        figures.append(
            f'<figure><img src="{job.job_id}.png" alt="" width="{min(job.width, 256)}">'
            f"<figcaption>{html.escape(job.scheduler)}, {job.steps} steps<br>{status}<br><code>{job.job_id}</code></figcaption></figure>"
        )
    return (
        f"<section><h2>{html.escape(prompt)}</h2><p>negative prompt: {html.escape(negative) or '(none)'}; "
        f"guidance {guidance:g}; seed {seed}</p><img class=grid src=\"{grid_name}\" alt=\"comparison grid\">"
        f"<div class=images>{''.join(figures)}</div></section>"
    )


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>minidiff sweep</title>
<style>body{{font-family:sans-serif;margin:2em}} .grid{{max-width:100%}} .images{{display:flex;flex-wrap:wrap;gap:1em}}
figure{{margin:0;font-size:0.85em}} section{{margin-bottom:3em}}</style></head>
<body><h1>minidiff sweep</h1><p>{done} of {count} images done. Each image is named by its job id; manifest.jsonl has every setting.</p>
{sections}
</body></html>
"""
