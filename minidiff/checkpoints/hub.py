"""The one place minidiff talks to the Hugging Face hub: list a repo, fetch a file or a component's files, or say
clearly why not. Every other module (configs, models, tokenizer, `minidiff download`) goes through these functions."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path


class HubUnavailableError(ConnectionError):
    """The hub could not be reached (or the file is not there) and no local copy exists."""


@dataclass(frozen=True)
class HubOptions:
    """Where on the hub, and whether to ask it at all: `from_pretrained`'s keyword arguments of the same names,
    handed to huggingface_hub as they are. They matter only for a repo id; a local folder ignores them."""

    revision: str | None = None  # a branch, tag or commit of the repo
    cache_dir: str | os.PathLike | None = None  # instead of huggingface_hub's cache
    local_files_only: bool | None = None  # True: only the cache, never the network

    def as_kwargs(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}


def list_repo_files(repo_id: str) -> list[str]:
    """The path of every file in `repo_id` (to choose what to download); huggingface_hub's errors as they are."""
    import huggingface_hub

    return huggingface_hub.list_repo_files(repo_id)


def download_file(repo_id: str, filename: str, subfolder: str | None = None, hub: HubOptions | None = None,
                  local_dir: str | os.PathLike | None = None) -> str:
    """Returns the local path of `subfolder/filename` of `repo_id`, downloading it through huggingface_hub.

    Uses the local cache when it has the file (`local_dir`: a plain copy there instead). When the hub cannot be
    reached the error says so and names the local-folder alternative.
    """
    import huggingface_hub

    where = f"{repo_id}/{subfolder + '/' if subfolder else ''}{filename}"
    where_to = {"local_dir": str(local_dir)} if local_dir is not None else {}
    try:
        return huggingface_hub.hf_hub_download(repo_id, filename, subfolder=subfolder or None,
                                               **(hub or HubOptions()).as_kwargs(), **where_to)
    except Exception as error:  # offline, unknown repo, missing file, gated repo: all reported the same clear way
        raise HubUnavailableError(
            f"could not get {where} from the Hugging Face hub ({type(error).__name__}: {str(error).splitlines()[0]}). "
            f"If you have no network, pass a local folder instead (e.g. from_pretrained('path/to/stable-diffusion-v1-5', "
            f"subfolder=...)), or download the weights first with `minidiff download sd15` "
            f"(see weights_scripts/)."
        ) from None


def download_component(
    repo_id: str, subfolder: str | None, file_names: list[str], variant: str | None = None, hub: HubOptions | None = None
):
    """Downloads only the files one component needs; returns its local folder.

    `file_names` are the config file(s) (`*.json`, always fetched) and the weights names in order of
    preference: the first weights name the repo has (as one file, or as an index and its shards) is
    the only one downloaded, so a repo holding both .safetensors and .bin costs one download.
    """
    import huggingface_hub

    from minidiff.checkpoints.folder import weight_file_patterns

    prefix = f"{subfolder}/" if subfolder else ""
    config_names = [prefix + name for name in file_names if name.endswith(".json")]
    weights_names = [name for name in file_names if not name.endswith(".json")]
    try:
        for weights_name in weights_names:
            patterns = [prefix + pattern for pattern in weight_file_patterns(weights_name, variant)]
            allow = config_names + patterns
            root = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=allow, **(hub or HubOptions()).as_kwargs()))
            if any(file.is_file() for pattern in patterns for file in root.glob(pattern)):
                break
    except Exception as error:
        raise HubUnavailableError(
            f"could not download {repo_id}/{prefix} from the Hugging Face hub ({type(error).__name__}). "
            "The weights are not on this machine: download them first with the scripts in weights_scripts/ "
            "(`minidiff download sd15`), or pass the local folder that holds them."
        ) from None
    return root / subfolder if subfolder else root
