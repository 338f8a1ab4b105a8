"""What makes Stable Diffusion fast on a CPU, in one place: the dtype, the conv weights' layout, the allocator,
and building a model without initialising weights that a checkpoint will overwrite.

Each choice was measured against the alternative (docs/performance.md has the figures and the machines).
"""

from __future__ import annotations

import contextlib
import ctypes

import torch


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); an empty set elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def fastest_cpu_dtype() -> torch.dtype:
    """bfloat16 on a CPU with bfloat16 matrix instructions (AMX-BF16, or AVX512-BF16), else float32.

    Without those instructions oneDNN has no fast bfloat16 kernels and torch runs bfloat16 (and float16)
    through generic code, many times slower than float32; float32 is then the safe choice.
    """
    return torch.bfloat16 if {"amx_bf16", "avx512_bf16"} & cpu_flags() else torch.float32


def conv_memory_format(model: str, dtype: torch.dtype) -> torch.memory_format:
    """The layout of the conv weights of the pipeline's "vae" or "unet" in `dtype`.

    Channels-last, (C_out, kH, kW, C_in): oneDNN's CPU convolutions run fastest on it, their outputs keep it, and
    the reshapes around attention become views. The float32 UNet runs as fast either way, so it keeps the file's
    layout: its weights stay views of the memory-mapped file, with no copy to make. float16, which no fast path
    picks on a CPU, stays contiguous too: its results are then diffusers' to the bit.
    """
    if dtype == torch.float16 or (model == "unet" and dtype == torch.float32):
        return torch.contiguous_format
    return torch.channels_last


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve every allocation from its heap and keep freed memory for the next one.

    By default each block above 32 MB gets its own mmap and goes back to the kernel when freed, so every
    large activation ((2, 4096, 1280) is 42 MB in float32; the VAE's reach 512 MB) is page-faulted in again
    on the next call. It is a setting of the whole process, so a program sets it (the CLI, the benchmarks),
    not the library. Returns False where there is no glibc (macOS, musl): nothing changes.
    """
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, from <malloc.h>
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


# The torch.nn.init functions that layers' `reset_parameters` call.
INIT_FUNCTIONS = ["uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                  "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_"]


@contextlib.contextmanager
def skip_init():
    """While it is open, torch.nn.init's functions do nothing (not thread-safe: build one model at a time).

    For modules built on the meta device whose every tensor will come from a checkpoint: the random
    initialisation would be thrown away, and on the meta device it is not free (`normal_`, nn.Embedding's
    initialisation, imports torch._dynamo the first time, which takes seconds).
    """
    with contextlib.ExitStack() as restore:
        for name in INIT_FUNCTIONS:
            original = getattr(torch.nn.init, name)
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
            restore.callback(setattr, torch.nn.init, name, original)
        yield
