"""Write a random LoRA for SD 1.5 in one of the real key layouts (for tests and benchmarks; it draws nothing).

    python weights_scripts/make_random_lora.py --weights FOLDER --layout kohya --rank 4 --out lora.safetensors

Layouts (docs/lora.md shows them side by side):
    kohya       lora_unet_<module with _>.lora_down.weight / .lora_up.weight / .alpha, lora_te_... ; LoCon convs too
    sgm         kohya's, with the UNet's original block names (lora_unet_input_blocks_1_1_proj_in...)
    peft        unet.<module>.lora_A.weight / .lora_B.weight, text_encoder.<module>...
    processor   unet.<block>.attn1.processor.to_q_lora.down.weight, text_encoder...self_attn.to_q_lora.down.weight,
                text_encoder...mlp.fc1.lora_linear_layer.down.weight (diffusers' attention-processor format)

From Python: `random_lora(unet, text_encoder, "kohya", rank=4, seed=0)` returns the state dict.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

try:
    import minidiff  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minidiff.checkpoints.key_map import UNET_PREFIX, unet_key_map

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
# What kohya's LoCon and the LCM-LoRA scripts train besides attention.
LOCON = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj", "proj_in",
         "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_ENCODER = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def targets(model: nn.Module, leaves) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d)) and any(name.endswith("." + leaf) for leaf in leaves)}


def _pair(module: nn.Module, rank: int, generator: torch.Generator, size: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(down A, up B) of the right shapes for `module`, entries ~ N(0, size^2)."""
    if isinstance(module, nn.Linear):
        down_shape, up_shape = (rank, module.in_features), (module.out_features, rank)
    else:
        down_shape, up_shape = (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
    return (torch.randn(down_shape, generator=generator) * size, torch.randn(up_shape, generator=generator) * size)


def random_lora(unet: nn.Module, text_encoder: nn.Module | None, layout: str, rank: int = 4, seed: int = 0,
                locon: bool = True, alpha: float | None = None, size: float = 0.1) -> dict[str, torch.Tensor]:
    """A random LoRA state dict in `layout` for these networks (module names are diffusers')."""
    generator = torch.Generator().manual_seed(seed)
    unet_targets = targets(unet, ATTENTION + (LOCON if locon and layout in ("kohya", "sgm", "peft") else ()))
    te_targets = targets(text_encoder, TEXT_ENCODER) if text_encoder is not None else {}
    if layout == "processor":
        te_targets = {name: module for name, module in te_targets.items() if not name.endswith(("fc1", "fc2"))} | {
            name: module for name, module in te_targets.items() if name.endswith("fc1")}
    state_dict: dict[str, torch.Tensor] = {}
    key_map = unet_key_map(dict(unet.config)) if layout == "sgm" else None
    for component, found in (("unet", unet_targets), ("text_encoder", te_targets)):
        for index, (name, module) in enumerate(found.items()):
            down, up = _pair(module, rank, generator, size)
            if layout in ("kohya", "sgm"):
                if component == "unet" and key_map is not None:
                    name = key_map.to_original(f"{name}.weight").removeprefix(UNET_PREFIX).removesuffix(".weight")
                stem = ("lora_unet_" if component == "unet" else "lora_te_") + name.replace(".", "_")
                state_dict[f"{stem}.lora_down.weight"], state_dict[f"{stem}.lora_up.weight"] = down, up
                # alphas vary by layer, as in real files: rank/2 for even layers, the rank for odd ones
                state_dict[f"{stem}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank / (2 - index % 2)))
            elif layout == "peft":
                state_dict[f"{component}.{name}.lora_A.weight"], state_dict[f"{component}.{name}.lora_B.weight"] = down, up
            elif layout == "processor":
                parent, _, leaf = name.rpartition(".")
                if component == "unet":
                    parent, leaf = (name.removesuffix(".to_out.0"), "to_out") if name.endswith("to_out.0") else (parent, leaf)
                    stem = f"unet.{parent}.processor.{leaf}_lora"
                elif leaf.endswith("_proj"):
                    stem = f"text_encoder.{parent}.{'to_' + leaf[0] if leaf != 'out_proj' else 'to_out'}_lora"
                else:
                    stem = f"text_encoder.{name}.lora_linear_layer"
                state_dict[f"{stem}.down.weight"], state_dict[f"{stem}.up.weight"] = down, up
            else:
                raise ValueError(f"layout {layout!r}: one of kohya, sgm, peft, processor")
    return state_dict


def main(argv: list[str] | None = None) -> None:
    from safetensors.torch import save_file

    from minidiff.models.clip_text import CLIPTextModel
    from minidiff.models.unet_2d_condition import UNet2DConditionModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="an SD 1.5 diffusers folder (e.g. from make_random_sd15.py)")
    parser.add_argument("--layout", default="kohya", choices=["kohya", "sgm", "peft", "processor"])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; pick another --out")
    unet = UNet2DConditionModel.from_pretrained(args.weights, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(args.weights, subfolder="text_encoder")
    save_file(random_lora(unet, text_encoder, args.layout, args.rank, args.seed), str(out))
    print(f"wrote a random rank-{args.rank} {args.layout} LoRA to {out}")


if __name__ == "__main__":
    main()
