"""Where the time of one guided SD 1.5 UNet step goes on a CPU: torch.profiler, grouped by kind of op.

    python benchmarks/profile_unet.py [--weights ~/.cache/minidiff/random-sd15] [--dtype bf16] [--library minidiff]

One UNet call at batch 2 (the uncond + text halves of classifier-free guidance), latents (2, 4, 64, 64),
context (2, 77, 768), full-size random SD 1.5 weights (weights_scripts/make_random_sd15.py). After two
warm-up calls, one call runs under `torch.profiler`; each aten op's *self* time (its own work, not its
children's) is put into one of the groups below, so the groups add up to the whole step:

    convolution   3x3 and 1x1 convs (resnets, down/upsamplers, proj_in/out)     oneDNN
    attention     scaled_dot_product_attention's fused kernel                   flash attention for CPU
    linear        q/k/v/out projections, feed-forward, time embedding           MKL / oneDNN GEMM
    norm          GroupNorm, LayerNorm
    elementwise   SiLU, GELU, add, mul, div
    copy/layout   copies, casts, cat, contiguous (memory traffic only)
    other         everything else (upsampling, views, allocation)

`profile_step(unet, dtype)` returns the table as rows; benchmarks/run_all.py prints it as part of its report.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the checkout's minidiff, without `pip install -e .`

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# aten op name -> group; an op not listed here is "other"
GROUPS = {
    "convolution": ("aten::mkldnn_convolution", "aten::_convolution", "aten::convolution", "aten::conv2d",
                    "aten::_nnpack_spatial_convolution", "aten::slow_conv2d_forward", "aten::thnn_conv2d"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention",
                  "aten::_scaled_dot_product_attention_math", "aten::_softmax", "aten::softmax", "aten::bmm",
                  "aten::baddbmm"),
    "linear": ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::_mkldnn_linear", "aten::mkldnn_linear"),
    "norm": ("aten::native_group_norm", "aten::group_norm", "aten::native_layer_norm", "aten::layer_norm"),
    "elementwise": ("aten::silu", "aten::silu_", "aten::gelu", "aten::add", "aten::add_", "aten::mul", "aten::mul_",
                    "aten::div", "aten::div_", "aten::sub", "aten::sin", "aten::cos", "aten::exp"),
    "copy/layout": ("aten::copy_", "aten::cat", "aten::contiguous", "aten::clone", "aten::_to_copy", "aten::to"),
}
GROUP_OF = {op: group for group, ops in GROUPS.items() for op in ops}
ORDER = [*GROUPS, "other"]


def example_inputs(dtype: torch.dtype, batch: int = 2, latent_size: int = 64, context_dim: int = 768):
    """The CFG batch of one SD 1.5 step: latents (2, 4, 64, 64), timestep, context (2, 77, 768)."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, latent_size, latent_size, generator=generator).to(dtype)
    context = torch.randn(batch, 77, context_dim, generator=generator).to(dtype)
    return latents, torch.tensor(981), context


def profile_step(unet, latents, timestep, context) -> tuple[list[tuple[str, float]], float]:
    """Rows (group, self seconds) for one UNet call, and the wall time of that profiled call."""
    with torch.no_grad():
        for _ in range(2):  # warm-up: oneDNN picks and caches its kernels on the first calls
            unet(latents, timestep, encoder_hidden_states=context)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            start = time.perf_counter()
            unet(latents, timestep, encoder_hidden_states=context)
            wall = time.perf_counter() - start
    seconds = defaultdict(float)
    for event in profiler.key_averages():
        seconds[GROUP_OF.get(event.key, "other")] += event.self_cpu_time_total / 1e6  # microseconds -> seconds
    return [(group, seconds[group]) for group in ORDER], wall


def format_profile(rows: list[tuple[str, float]], wall: float) -> str:
    total = sum(seconds for _, seconds in rows)
    lines = [f"{'group':14s} {'seconds':>8s} {'share':>6s}"]
    for group, seconds in rows:
        lines.append(f"{group:14s} {seconds:8.3f} {seconds / total:6.1%}")
    lines.append(f"{'total (self)':14s} {total:8.3f}        (wall time of the profiled call: {wall:.3f} s)")
    return "\n".join(lines)


def load_unet(library: str, folder: Path, dtype: torch.dtype):
    """The UNet as each library runs it: minidiff with channels-last weights (as its pipeline loads it), diffusers as it loads."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if library == "minidiff":
            from minidiff.models.unet_2d_condition import UNet2DConditionModel

            return UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype).to(memory_format=torch.channels_last)
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype).eval()


def fastest_dtype_name() -> str:
    """"bf16" on a CPU with bfloat16 units (AMX-BF16, AVX512-BF16), else "fp32": the CLI's --dtype auto."""
    from minidiff.utils.cpu import fastest_cpu_dtype

    return "bf16" if fastest_cpu_dtype() == torch.bfloat16 else "fp32"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="~/.cache/minidiff/random-sd15", help="random SD 1.5 folder")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bf16 on CPUs with AMX-BF16/AVX512-BF16, else fp32 (fastest_dtype_name)")
    parser.add_argument("--library", choices=["minidiff", "diffusers"], default="minidiff")
    parser.add_argument("--top", type=int, default=0, help="also print the N ops with the most self time")
    args = parser.parse_args()
    dtype_name = args.dtype or fastest_dtype_name()
    dtype = DTYPES[dtype_name]
    unet = load_unet(args.library, Path(args.weights).expanduser(), dtype)
    rows, wall = profile_step(unet, *example_inputs(dtype))
    print(f"{args.library} UNet step, {dtype_name}, batch 2, 64x64 latents, {torch.get_num_threads()} threads, "
          f"load average {Path('/proc/loadavg').read_text().split()[0]}")
    print(format_profile(rows, wall))
    if args.top:
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
            unet(*example_inputs(dtype)[:2], encoder_hidden_states=example_inputs(dtype)[2])
        print(profiler.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
