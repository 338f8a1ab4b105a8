"""CPU offload without accelerate: the models live in CPU memory and visit the GPU only while they compute.

diffusers' `enable_model_cpu_offload` and `enable_sequential_cpu_offload` are built on accelerate's hooks; minidiff
has no such dependency, so here are the two ideas in a few lines of our own, on PyTorch's module hooks:

- **model offload** (`ModelOffload`): a whole model is moved to the GPU just before it runs and stays there until
  the next model runs, which sends it back. SD's three models run one after another (text encoder, then the UNet
  for every step, then the VAE), so the GPU holds one model at a time: for SD 1.5 in float16 the UNet's 1.7 GB
  instead of all 2.1 GB, for the price of moving each model once per image (about 0.2 s over a T4's PCIe link).
- **sequential offload** (`SequentialOffload`): every layer's own weights are copied to the GPU just before that
  layer runs and dropped right after. The GPU then holds one layer's weights at a time, but every UNet step copies
  all 1.7 GB again: several times slower; for GPUs with very little memory.

The pipeline creates its tensors (noise, token ids, timesteps) on the GPU: see `_execution_device`.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn


class ModelOffload:
    """Keeps `models` on the CPU; the first call into one of them moves it to `device`, sending the last one back.

    A model is entered through its own `forward` or through one of its children's (the VAE runs through `encode`
    and `decode`, which call its encoder, decoder and quant convs directly), so each of those gets the hook.
    """

    def __init__(self, models: list[nn.Module], device: torch.device):
        self.device = torch.device(device)
        self.models = models
        self.active: nn.Module | None = None
        self.handles = []
        for model in models:
            model.to("cpu")
            for entry in (model, *model.children()):
                self.handles.append(entry.register_forward_pre_hook(partial(self._onload, model)))

    def _onload(self, model: nn.Module, module: nn.Module, args) -> None:
        if self.active is model:
            return
        self.offload()
        model.to(self.device)
        self.active = model

    def offload(self) -> None:
        """Send the model on the GPU back to the CPU (the pipeline calls this at the end of each image)."""
        if self.active is not None:
            self.active.to("cpu")
            self.active = None

    def remove(self) -> None:
        self.offload()
        for handle in self.handles:
            handle.remove()
        self.handles = []


class SequentialOffload:
    """Every module's own parameters and buffers stay in CPU memory; a copy goes to `device` for its forward only.

    The CPU tensors are the ones the model had (no copy is made of them): the GPU copies are made before and
    dropped after each module's forward, so the weights are read-only while this is on (as in diffusers, whose
    sequential offload keeps the state dict on the CPU and the modules on the meta device).
    """

    def __init__(self, models: list[nn.Module], device: torch.device):
        self.device = torch.device(device)
        self.handles = []
        for model in models:
            model.to("cpu")
            for module in model.modules():
                own = {**module._parameters, **module._buffers}
                own = {name: tensor for name, tensor in own.items() if tensor is not None}
                if own:
                    self.handles.append(module.register_forward_pre_hook(partial(self._place, own, self.device)))
                    self.handles.append(module.register_forward_hook(partial(self._place_back, own)))

    @staticmethod
    def _place(cpu_tensors: dict, device: torch.device, module: nn.Module, args) -> None:
        for name, tensor in cpu_tensors.items():
            if isinstance(tensor, nn.Parameter):
                module._parameters[name] = nn.Parameter(tensor.to(device, non_blocking=True), tensor.requires_grad)
            else:
                module._buffers[name] = tensor.to(device, non_blocking=True)

    @staticmethod
    def _place_back(cpu_tensors: dict, module: nn.Module, args, output) -> None:
        for name, tensor in cpu_tensors.items():
            (module._parameters if isinstance(tensor, nn.Parameter) else module._buffers)[name] = tensor

    def offload(self) -> None:
        """Nothing stays on the GPU between layers: nothing to do at the end of an image."""

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
