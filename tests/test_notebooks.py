"""Every tutorial exports to a valid Jupyter notebook (nbformat 4) whose code is the tutorial's code, cell by cell."""

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from minidiff.lab.notebooks import export_tutorials, percent_to_notebook, split_cells

REPO = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((REPO / "tutorials").glob("[0-9][0-9]_*.py"))


def script_code(text: str) -> list[str]:
    """The tutorial's code lines: what Python runs (no cell markers, no markdown, no blank lines)."""
    lines, in_markdown = [], False
    for line in text.splitlines()[text.splitlines()[1:].index("# ---") + 2:]:
        if line.startswith("# %%"):
            in_markdown = "[markdown]" in line
        elif not in_markdown and line.strip():
            lines.append(line)
    return lines


GIT_URL = "https://example.org/minidiff.git"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("notebooks")
    export_tutorials(REPO / "tutorials", folder, GIT_URL)
    return folder


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=lambda path: path.stem)
def test_each_tutorial_becomes_a_valid_notebook_with_the_same_code(tutorial, exported):
    notebook = nbformat.read(str(exported / f"{tutorial.stem}.ipynb"), as_version=4)
    nbformat.validate(notebook)  # raises on any structural error
    setup, *cells = notebook.cells
    assert setup.cell_type == "code" and "google.colab" in setup.source and GIT_URL in setup.source
    code = [line for cell in cells if cell.cell_type == "code" for line in cell.source.splitlines() if line.strip()]
    assert code == script_code(tutorial.read_text())
    markdown = [cell.source for cell in cells if cell.cell_type == "markdown"]
    assert markdown[0].startswith("# ") and not any(line.startswith("# %%") for text in markdown for line in text.splitlines())


def test_export_is_stable_and_runs_from_the_command_line(tmp_path, exported):
    result = subprocess.run([sys.executable, "-m", "minidiff.cli", "tutorials", "--export", str(tmp_path), "--git-url", GIT_URL],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for path in TUTORIALS:  # the same bytes twice: stable cell ids, nothing time-dependent
        assert (tmp_path / f"{path.stem}.ipynb").read_bytes() == (exported / f"{path.stem}.ipynb").read_bytes()


def test_cells_split_on_markers_and_markdown_loses_its_comment_signs():
    text = "# ---\n# jupyter: {}\n# ---\n\n# %% [markdown]\n# # Title\n#\n# Some *text*.\n\n# %%\nx = 1\n\n# %%\nprint(x)\n"
    assert split_cells(text) == [("markdown", "# Title\n\nSome *text*."), ("code", "x = 1"), ("code", "print(x)")]
    notebook = percent_to_notebook(text, "demo")
    assert [cell["cell_type"] for cell in notebook["cells"]] == ["code", "markdown", "code", "code"]
    assert notebook["cells"][1]["source"] == ["# Title\n", "\n", "Some *text*."]


def test_a_folder_without_tutorials_says_where_they_are(tmp_path):
    with pytest.raises(FileNotFoundError, match="git checkout"):
        export_tutorials(tmp_path, tmp_path / "out")
