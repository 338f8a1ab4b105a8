"""Write a Stable Diffusion 1.5 folder filled with seeded random weights, using minidiff alone.

    python weights_scripts/make_random_sd15.py --out ~/.cache/minidiff/random-sd15 [--seed 0] [--tiny] [--variant fp16] [--inpainting]

The folder has SD 1.5's diffusers layout and real configs (minidiff/data/sd15/: UNet 859.52M
parameters, VAE, CLIP ViT-L/14 text encoder, PNDM scheduler), so everything that reads a real SD 1.5
folder reads this one: minidiff, diffusers' StableDiffusionPipeline, transformers' CLIPTextModel.

    model_index.json
    unet/          config.json  diffusion_pytorch_model[.fp16].safetensors     (3.4 GB in fp32)
    vae/           config.json  diffusion_pytorch_model[.fp16].safetensors
    text_encoder/  config.json  model[.fp16].safetensors
    tokenizer/     vocab.json  merges.txt  tokenizer_config.json  special_tokens_map.json
    scheduler/     scheduler_config.json

The weights are each model's default PyTorch initialisation, drawn from `torch.manual_seed(seed + k)`
for the k-th model, so the same seed gives the same files, bit for bit. They produce noise, not
pictures: they are for parity tests and benchmarks. `--tiny` writes the same layout with narrow
configs (a few MB; fast tests). `--inpainting` writes SD 1.5 inpainting's layout instead: a UNet whose conv_in
takes 9 channels (latents, mask, masked-image latents) and model_index.json naming StableDiffusionInpaintPipeline. Weights are never committed: write them outside git.

From Python: `from make_random_sd15 import make_random_sd15; make_random_sd15(folder, seed=0, tiny=True)`.
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

from minidiff.checkpoints.single_file_layout import SD15_CONFIGS
from minidiff.models.clip_text import CLIPTextModel
from minidiff.models.unet_2d_condition import UNet2DConditionModel
from minidiff.models.vae import AutoencoderKL
from minidiff.schedulers.pndm import PNDMScheduler
from minidiff.tokenizer import CLIPTokenizer

MODELS = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}

# Narrow versions of SD 1.5's three networks: same block types, same folder layout, same vocabulary
# (the tokenizer is the real one), VAE still downscaling by 8, a few MB in all.
TINY_CHANGES = {
    "unet": dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, norm_num_groups=8, attention_head_dim=2,
                 cross_attention_dim=32, sample_size=8),
    "vae": dict(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4, sample_size=64),
    "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         projection_dim=32),
}


def sd15_config(part: str, tiny: bool = False) -> dict:
    """SD 1.5's `<part>/config.json` (bundled with minidiff), narrowed when `tiny`."""
    config = json.loads((SD15_CONFIGS / part / "config.json").read_text(encoding="utf-8"))
    return {**config, **TINY_CHANGES[part]} if tiny else config


def random_model(part: str, seed: int, tiny: bool = False, inpainting: bool = False) -> torch.nn.Module:
    """One network of SD 1.5, default-initialised from `seed` (the caller's random state is left untouched)."""
    config = sd15_config(part, tiny)
    if inpainting and part == "unet":
        config["in_channels"] = INPAINTING_UNET_CHANNELS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[part].from_config(config).eval()


INPAINTING_UNET_CHANNELS = 9  # latents (4) + mask (1) + masked-image latents (4)


def make_random_sd15(out: str | Path, seed: int = 0, tiny: bool = False, variant: str | None = None,
                     inpainting: bool = False) -> Path:
    """Write the random SD 1.5 folder (module docstring) into `out`; returns `out`.

    `variant="fp16"` writes half-precision `*.fp16.safetensors` weight files instead of float32 ones
    (load them with `variant="fp16"`, as diffusers does)."""
    if variant not in (None, "fp16"):
        raise ValueError(f"variant must be None or 'fp16', got {variant!r}")
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for offset, part in enumerate(MODELS):
        model = random_model(part, seed + offset, tiny, inpainting)
        if variant == "fp16":
            model = model.half()
        model.save_pretrained(out / part, variant=variant)
        del model  # the full-size UNet is 3.4 GB: free it before building the next network
    CLIPTokenizer().save_pretrained(out / "tokenizer")
    # The scheduler config is SD 1.5's file as it is, not `PNDMScheduler(...).save_config()`: that would
    # write every default, e.g. timestep_spacing="leading", and the real file has no timestep_spacing, so
    # that each scheduler class loaded from it uses its own default (Euler: "linspace").
    for name in ["scheduler/scheduler_config.json", "model_index.json"]:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text((SD15_CONFIGS / name).read_text(encoding="utf-8"), encoding="utf-8")
    if inpainting:
        index = json.loads((out / "model_index.json").read_text(encoding="utf-8"))
        index["_class_name"] = "StableDiffusionInpaintPipeline"
        (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    PNDMScheduler.from_pretrained(out, subfolder="scheduler")  # it reads as SD 1.5's PNDM (PLMS) scheduler
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write (outside git; e.g. ~/.cache/minidiff/random-sd15)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="narrow configs, same layout (for fast tests)")
    parser.add_argument("--variant", choices=["fp16"], default=None, help="write half-precision *.fp16.safetensors")
    parser.add_argument("--inpainting", action="store_true", help="a 9-channel inpainting UNet (SD 1.5 inpainting's layout)")
    args = parser.parse_args(argv)
    where = make_random_sd15(args.out, seed=args.seed, tiny=args.tiny, variant=args.variant, inpainting=args.inpainting)
    kind = "inpainting " if args.inpainting else ""
    print(f"wrote a random {'tiny ' if args.tiny else ''}SD 1.5 {kind}folder to {where}")


if __name__ == "__main__":
    main()
