"""Never replace what a user made without being told to: one check for every command that writes files.

    refuse_to_replace([dst / "unet" / "config.json", ...], "convert v1-5.safetensors into sd15/")

raises WouldOverwriteError (a FileExistsError, so the CLI prints it as one line) listing the files that exist,
unless `overwrite` is set (`--overwrite` on the command line).
"""

from __future__ import annotations

from pathlib import Path


class WouldOverwriteError(FileExistsError):
    """Writing would replace existing files; the message lists them and names the flag that allows it."""


def refuse_to_replace(paths: list[Path], action: str, overwrite: bool = False, flag: str = "--overwrite") -> None:
    existing = [Path(path) for path in paths if Path(path).exists()]
    if existing and not overwrite:
        shown = ", ".join(str(path) for path in existing[:8]) + (f" and {len(existing) - 8} more" if len(existing) > 8 else "")
        raise WouldOverwriteError(
            f"{action} would replace {len(existing)} existing file(s): {shown}. Nothing was written. Choose another "
            f"destination, or pass {flag} to replace them"
        )
