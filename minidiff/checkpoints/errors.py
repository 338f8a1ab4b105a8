"""One clear error for a checkpoint that does not fit its module: every missing, unexpected and mis-shaped key."""

from __future__ import annotations

from typing import Callable

import torch

FOLDER_ADVICE = "Check that config.json belongs to these weights (same model, same version), or that the file is complete."


class CheckpointError(ValueError):
    """A checkpoint file cannot be loaded as it is; the message says what was wrong and what to do."""


def _listing(title: str, lines: list[str], limit: int = 20) -> str:
    shown = lines[:limit]
    more = f"\n    ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return f"  {title} ({len(lines)}):\n" + "\n".join(f"    {line}" for line in shown) + more


def check_state_dict(
    module: torch.nn.Module,
    found: dict[str, torch.Tensor],
    source: str,
    label: Callable[[str], str] | None = None,
    advice: str = FOLDER_ADVICE,
) -> None:
    """Raise one CheckpointError listing every key of `module` that `found` lacks, every key it has that `module`
    does not, and every shape that differs (expected vs found). Returns quietly when all fit.

    `found` maps the module's names to tensors (meta tensors will do: only shapes are read); `label` names a key
    in the messages (e.g. "the file's key (the module's name)"); `advice` ends the message.
    """
    label = label or (lambda name: name)
    expected = module.state_dict(keep_vars=True)
    missing = [label(key) for key in expected if key not in found]
    unexpected = [label(key) for key in found if key not in expected]
    misshaped = [
        f"{label(key)}: expected {tuple(expected[key].shape)}, found {tuple(found[key].shape)}"
        for key in expected
        if key in found and tuple(expected[key].shape) != tuple(found[key].shape)
    ]
    if not (missing or unexpected or misshaped):
        return
    parts = [f"{source} does not fit {type(module).__name__} as configured:"]
    for title, lines in (("missing keys", missing), ("unexpected keys", unexpected), ("keys with the wrong shape", misshaped)):
        if lines:
            parts.append(_listing(title, lines))
    parts.append(advice)
    raise CheckpointError("\n".join(parts))
