"""Small torch helpers: seeded noise drawn as diffusers draws it (one seed, the same numbers), and the two
spellings of the dtype argument."""

from __future__ import annotations

import warnings

import torch


def randn_tensor(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise drawn as diffusers' `randn_tensor` draws it, so one seed gives the same numbers.

    The noise is drawn on the generator's device (a CPU generator gives CPU noise, then moved to
    `device`). A list of generators draws one sample of the batch from each, in order.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one generator per sample")
        draws = [randn_tensor((1, *shape[1:]), one, device, dtype) for one in generator]
        return torch.cat(draws, dim=0)
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


TORCH_DTYPE_DEPRECATION = "`torch_dtype` is deprecated and will be removed in version 1.0.0. Please use `dtype` instead."


def resolve_dtype(dtype: torch.dtype | None, torch_dtype: torch.dtype | None, deprecated: bool) -> torch.dtype | None:
    """diffusers 0.42 renamed `torch_dtype=` to `dtype=`; both spellings are read, with diffusers' precedence.

    Its pipelines' `from_pretrained` (`deprecated=True`) refuse both at once and warn (FutureWarning) on the old
    name; its models' `from_pretrained` and every `from_single_file` take `dtype` when both are given, silently.
    """
    if torch_dtype is None:
        return dtype
    if not deprecated:
        return dtype if dtype is not None else torch_dtype
    if dtype is not None:
        raise ValueError(
            "You have passed both `dtype` and `torch_dtype`. Please only pass `dtype`, `torch_dtype` is deprecated."
        )
    warnings.warn(TORCH_DTYPE_DEPRECATION, FutureWarning, stacklevel=3)
    return torch_dtype
