"""The files minidiff ships, and the one reader of SD 1.5's bundled configs.

    sd15/                          SD 1.5's configs in diffusers' folder layout (model_index.json, unet/config.json,
                                   vae/, text_encoder/, scheduler/scheduler_config.json): the one copy of them
    bpe_simple_vocab_16e6.txt.gz   CLIP's BPE vocabulary (read by minidiff/tokenizer.py)

A file layer at the very bottom: it imports nothing of minidiff.
"""

from __future__ import annotations

import json
from pathlib import Path

SD15_CONFIGS = Path(__file__).resolve().parent / "sd15"


def sd15_config(part: str) -> dict:
    """SD 1.5's bundled config of `part` ("unet", "vae", "text_encoder", "scheduler"), read from its JSON file."""
    parts = ("unet", "vae", "text_encoder", "scheduler")
    if part not in parts:
        raise ValueError(f"SD 1.5 has no bundled config for {part!r}; the parts are {parts}")
    name = "scheduler_config.json" if part == "scheduler" else "config.json"
    return json.loads((SD15_CONFIGS / part / name).read_text(encoding="utf-8"))
