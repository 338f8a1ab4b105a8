"""The cost of a LoRA on a full-size SD 1.5 UNet step, and of fusing it: minidiff against diffusers + peft, one run.

    python benchmarks/bench_lora.py [--rank 64] [--repeats 2] [--dtype fp32|bf16] [--attention-only]

Both UNets hold the same random full-size weights (weights_scripts/make_random_sd15.py's `random_model`, built in
memory, nothing written) and load the same random LoRA (weights_scripts/make_random_lora.py; diffusers/PEFT key
layout). By default the LoRA adapts what LCM-LoRA adapts: attention, feed-forward, proj_in/out, time_emb_proj
and every ResNet / sampler convolution (LoCon); `--attention-only` adapts to_q/k/v/out only. Measured:

    base step        one guided UNet call (latents (2, 4, 64, 64), context (2, 77, 768)) without LoRA
    LoRA step        the same call with the LoRA active, unfused
    fuse / unfuse    pipe.fuse_lora() / unfuse_lora() on the UNet (W0 <- W0 +- (alpha/r) B A, every layer)

Each figure is the minimum of `--repeats` timed calls after one warm-up, the libraries alternating. Outputs are
compared (max abs difference) so the timings are of the same computation. Ratios: minidiff / diffusers.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "weights_scripts"))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def best_of(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--attention-only", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="tiny random weights: checks the script runs, measures nothing")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    import diffusers
    from make_random_lora import random_lora
    from make_random_sd15 import random_model, sd15_config

    from minidiff.loaders.lora_formats import read_lora
    from minidiff.models.lora_adapters import add_lora_layer, fuse, lora_layers, unfuse

    dtype = DTYPES[args.dtype]
    ours = random_model("unet", seed=0, tiny=args.tiny).to(dtype)
    config = sd15_config("unet", tiny=args.tiny)
    theirs = diffusers.UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    theirs.load_state_dict(ours.state_dict())
    theirs = theirs.to(dtype).eval()
    state_dict = random_lora(ours, None, "peft", rank=args.rank, seed=1, locon=not args.attention_only, size=0.02)
    count = sum(1 for key in state_dict if key.endswith("lora_A.weight"))

    generator = torch.Generator().manual_seed(0)
    size = 8 if args.tiny else 64
    latents = torch.randn(2, 4, size, size, generator=generator).to(dtype)
    context = torch.randn(2, 77, config["cross_attention_dim"], generator=generator).to(dtype)

    def step(model):
        with torch.no_grad():
            return model(latents, 500, encoder_hidden_states=context).sample

    results = {}
    results["base step"] = (best_of(lambda: step(ours), args.repeats), best_of(lambda: step(theirs), args.repeats))
    base_difference = (step(ours) - step(theirs)).abs().max().item()

    _, layers = read_lora(state_dict, ours, None)  # what pipe.load_lora_weights does, on the UNet alone
    for module_name, lora in layers["unet"].items():
        layer = add_lora_layer(ours, module_name, "bench", lora.rank, lora.rank, init_lora_weights=False)
        with torch.no_grad():
            layer.lora_A["bench"].weight.copy_(lora.down)
            layer.lora_B["bench"].weight.copy_(lora.up)
        layer.active_adapters = ["bench"]
    theirs.load_lora_adapter({key: value.to(dtype) for key, value in state_dict.items()}, prefix="unet",
                             adapter_name="bench")
    results["LoRA step (unfused)"] = (best_of(lambda: step(ours), args.repeats), best_of(lambda: step(theirs), args.repeats))
    lora_difference = (step(ours) - step(theirs)).abs().max().item()

    def timed(function) -> float:
        start = time.perf_counter()
        function()
        return time.perf_counter() - start

    fuse_times, unfuse_times = ([], []), ([], [])
    for _ in range(args.repeats):
        fuse_times[0].append(timed(lambda: fuse(ours)))
        fuse_times[1].append(timed(lambda: theirs.fuse_lora()))
        unfuse_times[0].append(timed(lambda: unfuse(ours)))
        unfuse_times[1].append(timed(lambda: theirs.unfuse_lora()))
    results["fuse_lora (UNet)"] = (min(fuse_times[0]), min(fuse_times[1]))
    results["unfuse_lora (UNet)"] = (min(unfuse_times[0]), min(unfuse_times[1]))
    assert len(lora_layers(ours)) == count

    print(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}; {args.dtype}; LoRA rank {args.rank} on {count} layers "
          f"({'attention only' if args.attention_only else 'attention, feed-forward, convolutions (LoCon)'})")
    print(f"max |minidiff - diffusers|: base {base_difference:.1e}, with LoRA {lora_difference:.1e}")
    print(f"| | minidiff | diffusers + peft | ratio |\n|---|---|---|---|")
    for name, (mine, other) in results.items():
        print(f"| {name} | {mine:.3f} s | {other:.3f} s | {mine / other:.2f} |")
    base, lora = results["base step"], results["LoRA step (unfused)"]
    print(f"unfused LoRA step / base step: minidiff {lora[0] / base[0]:.2f}, diffusers {lora[1] / base[1]:.2f}")


if __name__ == "__main__":
    main()
