"""Which device and dtype to run on, and how to measure time and memory on it: one place for the CPU/GPU choice.

minidiff is developed on CPUs, but many of its users run it on a GPU (Colab's T4: CUDA, float16, 15 GB). The
rules below are the ones diffusers' users expect:

- the device: CUDA when there is one, else the CPU (`default_device`);
- the dtype for `--dtype auto`: float16 on CUDA (what every SD 1.5 GPU recipe uses), bfloat16 on a CPU with
  bfloat16 matrix units, float32 on every other CPU (`auto_dtype`, with `fastest_cpu_dtype` for the CPU);
- CPU-only speed tricks (channels-last conv weights, glibc's malloc setting) apply only when the device is the
  CPU (`is_cpu`).
"""

from __future__ import annotations

import torch

from minidiff.utils.cpu import fastest_cpu_dtype


def default_device() -> torch.device:
    """CUDA (the current GPU) when PyTorch sees one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def as_device(device: str | torch.device | int | None) -> torch.device:
    """A device from what users type: None (the default device), "cuda", "cuda:1", 0 (GPU 0), a torch.device."""
    if device is None:
        return default_device()
    if isinstance(device, int):
        return torch.device("cuda", device)
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} is not a device torch knows; use e.g. 'cpu', 'cuda' or 'cuda:0'") from error


def is_cpu(device: str | torch.device) -> bool:
    return torch.device(device).type == "cpu"


def auto_dtype(device: str | torch.device) -> torch.dtype:
    """float16 on CUDA, the fastest dtype of this CPU on the CPU (`fastest_cpu_dtype`), float32 elsewhere."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.float16
    if kind == "cpu":
        return fastest_cpu_dtype()
    return torch.float32


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work to finish (CUDA runs asynchronously): call it before reading a clock."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_gpu_memory_mib(device: str | torch.device) -> float | None:
    """The most memory PyTorch's allocator has held on a CUDA device (MiB), None on any other device."""
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
