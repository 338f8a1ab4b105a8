"""Turn the tutorials (jupytext "percent" .py files) into Jupyter notebooks (.ipynb) a student can open anywhere.

A percent file is a Python script whose cells start with a marker line:

    # %%                 a code cell
    # %% [markdown]      a markdown cell: every following line is a comment ("# text") holding the markdown

The notebook format (nbformat 4, https://nbformat.readthedocs.io/en/latest/format_description.html) is
a JSON object {"cells": [...], "metadata": {...}, "nbformat": 4, "nbformat_minor": 5}; each cell has a
`cell_type`, an `id`, `metadata` and its `source` as a list of lines; code cells also carry
`execution_count: null` and `outputs: []`. That is all this module writes: no dependency on jupytext.

Every notebook gets one extra code cell at the top that does nothing except on Google Colab, where it
clones minidiff, installs it and moves into its tutorials folder (the tutorials import
`tutorial_helpers` and use `weights_scripts/`, both from the checkout).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from minidiff.utils.no_clobber import refuse_to_replace

CELL_MARKER = re.compile(r"^# %%(?P<title>[^\[]*)(?:\[(?P<kind>\w+)\])?\s*$")
PLACEHOLDER_GIT_URL = "https://github.com/<owner>/minidiff"  # replaced by --git-url, or by `git remote get-url origin`


def colab_setup_source(git_url: str) -> str:
    """The first cell of every notebook: on Colab, fetch and install minidiff and move into its tutorials."""
    return (
        "# On Google Colab: fetch minidiff, install it, and run from its tutorials folder. Elsewhere this cell does nothing.\n"
        "import sys\n"
        "if \"google.colab\" in sys.modules:\n"
        f"    !git clone --depth 1 {git_url} /content/minidiff && pip install -q -e /content/minidiff\n"
        "    %cd /content/minidiff/tutorials"
    )


def split_cells(text: str) -> list[tuple[str, str]]:
    """A percent file -> [(cell_type, source)], dropping the jupytext header and the blank lines around cells."""
    lines = text.splitlines()
    if lines and lines[0] == "# ---":  # the jupytext/kernelspec header, a YAML block in comments
        end = lines.index("# ---", 1)
        lines = lines[end + 1:]
    cells: list[tuple[str, list[str]]] = []
    for line in lines:
        marker = CELL_MARKER.match(line)
        if marker:
            cells.append(("markdown" if marker["kind"] == "markdown" else "code", []))
        elif cells:
            cells[-1][1].append(line)
        elif line.strip():
            cells.append(("code", [line]))  # code before the first marker
    result = []
    for cell_type, body in cells:
        if cell_type == "markdown":
            body = [line[2:] if line.startswith("# ") else line.lstrip("#") for line in body]
        source = "\n".join(body).strip("\n")
        if source:
            result.append((cell_type, source))
    return result


def cell(cell_type: str, source: str, index: int, name: str) -> dict:
    lines = source.split("\n")
    as_list = [line + "\n" for line in lines[:-1]] + [lines[-1]]
    # a stable id, so exporting twice gives the same file (nbformat 4.5 ids: 1-64 of [a-zA-Z0-9-_])
    cell_id = hashlib.sha1(f"{name}:{index}".encode()).hexdigest()[:12]
    out = {"cell_type": cell_type, "id": cell_id, "metadata": {}, "source": as_list}
    if cell_type == "code":
        out.update(execution_count=None, outputs=[])
    return out


def percent_to_notebook(text: str, name: str, git_url: str = PLACEHOLDER_GIT_URL) -> dict:
    """The notebook (a JSON-ready dict, nbformat 4.5) of one percent-format tutorial."""
    cells = [("code", colab_setup_source(git_url))] + split_cells(text)
    return {
        "cells": [cell(cell_type, source, index, name) for index, (cell_type, source) in enumerate(cells)],
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def export_tutorials(source: Path, target: Path, git_url: str = PLACEHOLDER_GIT_URL, overwrite: bool = False) -> list[Path]:
    """Write target/NN_name.ipynb for every source/NN_*.py tutorial; returns the notebooks written. Notebooks
    already in `target` (perhaps run and edited) are replaced only with `overwrite` (`--overwrite`)."""
    tutorials = sorted(Path(source).glob("[0-9][0-9]_*.py"))
    if not tutorials:
        raise FileNotFoundError(
            f"no tutorials (NN_name.py files) in {source}; the tutorials come with minidiff's git checkout, "
            "not with the installed package: clone the repository and pass its tutorials/ folder with --source"
        )
    target = Path(target)
    refuse_to_replace([target / f"{path.stem}.ipynb" for path in tutorials], f"exporting the tutorials into {target}", overwrite)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for path in tutorials:
        notebook = percent_to_notebook(path.read_text(encoding="utf-8"), path.stem, git_url)
        out = target / f"{path.stem}.ipynb"
        out.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(out)
    return written
