"""Seeded Gaussian noise, drawn the way diffusers draws it so that one seed gives the same numbers."""

from __future__ import annotations

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
