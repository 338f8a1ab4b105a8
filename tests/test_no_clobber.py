"""Never replace a user's files without a flag (issue 22): convert, tutorials --export, download --out."""

from pathlib import Path

import pytest

from minidiff.checkpoints import download
from minidiff.cli import main
from minidiff.lab.notebooks import export_tutorials
from minidiff.utils.no_clobber import WouldOverwriteError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def single_file(tiny_sd15_folder, tmp_path_factory):
    file = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    assert main(["convert", str(tiny_sd15_folder), str(file)]) == 0
    return file


def test_convert_into_a_folder_holding_a_model_is_refused_unless_overwrite(single_file, tiny_sd15_folder, tmp_path, capsys):
    folder = tmp_path / "my-model"
    (folder / "unet").mkdir(parents=True)
    mine = folder / "unet" / "diffusion_pytorch_model.safetensors"
    mine.write_bytes(b"my fine-tuned weights")
    config = ["--config", str(tiny_sd15_folder)]
    assert main(["convert", str(single_file), str(folder), *config]) == 2
    error = capsys.readouterr().err
    assert f"converting {single_file} into the folder {folder} would replace 1 existing file(s): {mine}" in error
    assert "pass --overwrite" in error and mine.read_bytes() == b"my fine-tuned weights"
    assert main(["convert", str(single_file), str(folder), *config, "--overwrite"]) == 0
    assert mine.read_bytes() != b"my fine-tuned weights"


def test_convert_onto_an_existing_file_is_refused_unless_overwrite(tiny_sd15_folder, tmp_path, capsys):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"precious")
    assert main(["convert", str(tiny_sd15_folder), str(target)]) == 2
    assert "would replace 1 existing file(s)" in capsys.readouterr().err and target.read_bytes() == b"precious"
    assert main(["convert", str(tiny_sd15_folder), str(target), "--overwrite"]) == 0
    assert target.stat().st_size > 1000


def test_tutorial_export_keeps_existing_notebooks_unless_overwrite(tmp_path):
    written = export_tutorials(REPO / "tutorials", tmp_path, "https://example.org/minidiff")
    written[0].write_text("my edited notebook")
    with pytest.raises(WouldOverwriteError, match=rf"exporting the tutorials into {tmp_path} would replace {len(written)}"):
        export_tutorials(REPO / "tutorials", tmp_path, "https://example.org/minidiff")
    assert written[0].read_text() == "my edited notebook"
    export_tutorials(REPO / "tutorials", tmp_path, "https://example.org/minidiff", overwrite=True)
    assert written[0].read_text() != "my edited notebook"


def test_download_into_a_folder_with_other_files_is_refused(tmp_path, monkeypatch):
    fetched = []
    monkeypatch.setattr(download, "list_repo_files", lambda repo: ["config.json", "diffusion_pytorch_model.safetensors"])
    monkeypatch.setattr(download, "download_file", lambda repo, name, local_dir: fetched.append(name) or str(Path(local_dir) / name))
    (tmp_path / "config.json").write_text("{}")  # the user's own file
    with pytest.raises(WouldOverwriteError, match=r"downloading google/ddpm-cat-256 into .* would replace 1 existing file"):
        download.download_ddpm_cat(tmp_path)
    assert fetched == []
    metadata = tmp_path / ".cache" / "huggingface" / "download" / "config.json.metadata"
    metadata.parent.mkdir(parents=True)
    metadata.write_text("commit\netag\n0\n")  # an earlier download of the same file: resumed, not refused
    download.download_ddpm_cat(tmp_path)
    assert fetched == ["config.json", "diffusion_pytorch_model.safetensors"]
