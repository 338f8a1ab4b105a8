"""Write a google/ddpm-cat-256-shaped folder filled with seeded random weights, using minidiff alone.

    python weights_scripts/make_random_ddpm.py --out ~/.cache/minidiff/random-ddpm-cat [--seed 0] [--tiny]

The layout is google/ddpm-cat-256's own: everything at the root of the folder, so the tutorial's
`UNet2DModel.from_pretrained(folder)` and `DDPMScheduler.from_pretrained(folder)` (no subfolder) work:

    model_index.json                       DDPMPipeline: unet + scheduler
    config.json                            UNet2DModel, ddpm-cat-256's config (256x256 pixels)
    diffusion_pytorch_model.safetensors    default PyTorch init drawn from torch.manual_seed(seed)
    scheduler_config.json                  DDPMScheduler, ddpm-cat-256's (linear betas 1e-4 .. 0.02, 1000 steps)

so `DDPMPipeline.from_pretrained(folder)` reads it, in minidiff and in diffusers. `--tiny` keeps every config
field and block type but narrows the channels and works at 32x32 pixels, for fast tests. The weights
produce noise, not cats; they are for tests and benchmarks. Never commit them.

From Python: `from make_random_ddpm import make_random_ddpm; make_random_ddpm(folder, seed=0, tiny=True)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

try:
    import minidiff  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`: use the checkout's minidiff
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minidiff.models.unet_2d import UNet2DModel
from minidiff.schedulers.ddpm import DDPMScheduler

# google/ddpm-cat-256/config.json and scheduler_config.json, as published (bookkeeping keys included).
DDPM_CAT_256_UNET = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 128, 256, 256, 512, 512], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 256,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
}
DDPM_CAT_256_SCHEDULER = {
    "_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02, "beta_schedule": "linear",
    "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None,
    "variance_type": "fixed_small",
}
MODEL_INDEX = {
    "_class_name": "DDPMPipeline", "_diffusers_version": "0.1.1",
    "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"],
}
# Same fields and block types, narrow: six levels from 32x32 down to 1x1 pixels.
TINY_CHANGES = {"block_out_channels": [16, 16, 32, 32, 64, 64], "norm_num_groups": 8, "sample_size": 32}


def ddpm_cat_config(tiny: bool = False) -> dict:
    return {**DDPM_CAT_256_UNET, **TINY_CHANGES} if tiny else dict(DDPM_CAT_256_UNET)


def make_random_ddpm(out: str | Path, seed: int = 0, tiny: bool = False) -> Path:
    """Write the random ddpm-cat-256-shaped folder (module docstring) into `out`; returns `out`."""
    out = Path(out).expanduser()
    with torch.random.fork_rng(devices=[]):  # seeded, and the caller's random state is left untouched
        torch.manual_seed(seed)
        unet = UNet2DModel.from_config(ddpm_cat_config(tiny))
    unet.save_pretrained(out)
    (out / "scheduler_config.json").write_text(json.dumps(DDPM_CAT_256_SCHEDULER, indent=2) + "\n")
    (out / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    DDPMScheduler.from_pretrained(out)  # it reads as ddpm-cat-256's scheduler
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write (outside git)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="narrow channels, 32x32 pixels (for fast tests)")
    args = parser.parse_args(argv)
    where = make_random_ddpm(args.out, seed=args.seed, tiny=args.tiny)
    print(f"wrote a random {'tiny ' if args.tiny else ''}ddpm-cat-256-shaped folder to {where}")


if __name__ == "__main__":
    main()
