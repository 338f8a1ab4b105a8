"""One clear error for a checkpoint that does not fit its module: every missing, unexpected and mis-shaped key."""

from __future__ import annotations

import torch


class CheckpointError(ValueError):
    """A checkpoint file cannot be loaded as it is; the message says what was wrong and what to do."""


def _listing(title: str, lines: list[str], limit: int = 20) -> str:
    shown = lines[:limit]
    more = f"\n    ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return f"  {title} ({len(lines)}):\n" + "\n".join(f"    {line}" for line in shown) + more


def check_state_dict(module: torch.nn.Module, state_dict: dict, source: str) -> None:
    """Raise one CheckpointError listing every key of `module` the checkpoint lacks, every key it has that
    `module` does not, and every shape that differs (expected vs found). Returns quietly when all fit."""
    expected = module.state_dict(keep_vars=True)
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    misshaped = [
        f"{key}: expected {tuple(expected[key].shape)}, found {tuple(state_dict[key].shape)}"
        for key in expected
        if key in state_dict and tuple(expected[key].shape) != tuple(state_dict[key].shape)
    ]
    if not (missing or unexpected or misshaped):
        return
    parts = [f"{source} does not fit {type(module).__name__} as configured:"]
    if missing:
        parts.append(_listing("missing keys", missing))
    if unexpected:
        parts.append(_listing("unexpected keys", unexpected))
    if misshaped:
        parts.append(_listing("keys with the wrong shape", misshaped))
    parts.append(
        "Check that config.json belongs to these weights (same model, same version), "
        "or that the file is complete."
    )
    raise CheckpointError("\n".join(parts))
