"""The one place LoRA layers (models/lora.py) are put into a network and taken out again, by module name.

    add_lora_layer(unet, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "pixel", r=4, lora_alpha=4)
    inject_adapter(unet, LoraConfig(r=4, target_modules=["to_q", "to_k"]), "pixel")   # every module the config names
    set_adapters(unet, ["pixel", "style"], [0.7, 0.4]); with lora_scale(unet, 0.5): unet(...)
    fuse(unet); unfuse(unet); remove_lora_layers(unet)    # the original nn.Linear / nn.Conv2d back in place

Injecting swaps the module `parent.child` for `LoraLayer(child)`, which keeps `child` as `base_layer`: its
weight tensor is not copied or touched, so removing the layers gives back the base weights bit for bit.
The same functions serve the UNet and the CLIP text encoder (any nn.Module); `LoraAdapterMixin` puts them
on a model as diffusers' / peft's methods (`unet.add_adapter(config)`, `unet.set_adapters(...)`, ...).
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch import nn

from minidiff.models.lora import LoraConfig, LoraLayer


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """(name, layer) of every LoRA layer of `model`, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name present in `model`, in the order they were added."""
    names: list[str] = []
    for _, layer in lora_layers(model):
        names += [name for name in layer.r if name not in names]
    return names


def active_adapters(model: nn.Module) -> list[str]:
    layers = lora_layers(model)
    return list(layers[0][1].active_adapters) if layers else []


def add_lora_layer(model: nn.Module, module_name: str, adapter_name: str, r: int, lora_alpha: float,
                   init_lora_weights: bool | str = True, lora_dropout: float = 0.0, use_rslora: bool = False) -> LoraLayer:
    """Adds adapter `adapter_name` to the Linear / Conv2d called `module_name`, wrapping it on its first adapter."""
    module = model.get_submodule(module_name)
    if not isinstance(module, LoraLayer):
        parent_name, _, child = module_name.rpartition(".")
        module = LoraLayer(module)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    module.update_layer(adapter_name, r, lora_alpha, init_lora_weights, lora_dropout, use_rslora)
    return module


def lora_targets(model: nn.Module) -> dict[str, nn.Module]:
    """Every module LoRA can wrap (Linear and Conv2d, or one wrapped already), by name."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d, LoraLayer)) and ".base_layer" not in f".{name}"
            and ".lora_A." not in f".{name}." and ".lora_B." not in f".{name}."}


def _matches(name: str, pattern: str) -> bool:
    """peft's rule: a target "to_q" names a module "to_q" or any "...something.to_q"; a string target is a regex."""
    pattern = pattern.removeprefix("^")
    return name == pattern or name.endswith("." + pattern)


def _pattern_value(name: str, patterns: dict, default):
    for pattern, value in patterns.items():
        if _matches(name, pattern):
            return value
    return default


def inject_adapter(model: nn.Module, config, adapter_name: str = "default") -> list[str]:
    """Wraps every module `config.target_modules` names with a new adapter (peft's `inject_adapter_in_model`).

    `config`: a minidiff `LoraConfig` or peft's (read by field name). Returns the names of the wrapped modules."""
    if getattr(config, "use_dora", False) or getattr(config, "lora_bias", False):
        raise NotImplementedError("DoRA (use_dora) and lora_bias are not implemented in minidiff's LoRA")
    if adapter_name in adapter_names(model):
        raise ValueError(f"adapter name {adapter_name!r} is already in use in the model: pick a new adapter_name")
    targets = config.target_modules
    if not targets:
        raise ValueError("the LoRA config names no target_modules, e.g. target_modules=['to_k', 'to_q', 'to_v', 'to_out.0']")
    candidates = lora_targets(model)
    if isinstance(targets, str):  # a regex over the whole name, as in peft
        chosen = [name for name in candidates if re.fullmatch(targets, name)]
    else:
        chosen = [name for name in candidates if any(_matches(name, target) for target in targets)]
    if not chosen:
        raise ValueError(f"target_modules {targets!r} match no Linear or Conv2d of {type(model).__name__}; "
                         f"its layers are named like {list(candidates)[:5]}")
    for name in chosen:
        r = _pattern_value(name, dict(config.rank_pattern or {}), config.r)
        alpha = _pattern_value(name, dict(config.alpha_pattern or {}), config.lora_alpha)
        add_lora_layer(model, name, adapter_name, r, alpha, config.init_lora_weights, config.lora_dropout,
                       getattr(config, "use_rslora", False))
    set_adapters(model, [adapter_name], [1.0])  # the new adapter alone is active, as after diffusers' add_adapter
    return chosen


def remove_lora_layers(model: nn.Module) -> None:
    """Puts every wrapped Linear / Conv2d back in its place (diffusers' `unload_lora`). A fused adapter stays in
    the weights, as in diffusers: unfuse first to get the base weights back."""
    for name, layer in lora_layers(model):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base_layer)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Removes one adapter from every layer; a layer left without adapters is unwrapped. If the adapter was active,
    the remaining adapters become the active ones (as in diffusers' `delete_adapters`)."""
    remaining = [name for name in adapter_names(model) if name != adapter_name]
    for name, layer in lora_layers(model):
        layer.delete_adapter(adapter_name)
        if not layer.r:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base_layer)
        elif not layer.active_adapters:
            layer.active_adapters = list(remaining)


def set_adapters(model: nn.Module, names: list[str], weights: list[float]) -> None:
    """Makes `names` the active adapters, each with its weight (scaling = weight * alpha / r)."""
    for _, layer in lora_layers(model):
        layer.active_adapters = list(names)  # also names this layer lacks (they add nothing), as in peft
        for name, weight in zip(names, weights):
            layer.set_scale(name, weight)


def enable_adapters(model: nn.Module, enabled: bool = True) -> None:
    for _, layer in lora_layers(model):
        layer.disable_adapters = not enabled


@contextlib.contextmanager
def lora_scale(model: nn.Module, scale: float | None):
    """Multiplies every LoRA update of `model` by `scale` inside the block (cross_attention_kwargs["scale"])."""
    layers = [layer for _, layer in lora_layers(model)] if scale is not None and scale != 1.0 else []
    for layer in layers:
        layer.scale = scale
    try:
        yield
    finally:
        for layer in layers:
            layer.scale = 1.0


def fuse(model: nn.Module, lora_scale: float = 1.0, adapter_names: list[str] | None = None) -> None:
    """W0 <- W0 + lora_scale * scaling * B A in every layer (fuse_lora). As in diffusers, `lora_scale` stays in the
    adapters' scaling afterwards (peft's `scale_layer`): after `unfuse` the unfused LoRA acts with it too."""
    for _, layer in lora_layers(model):
        if lora_scale != 1.0:
            for name in layer.active_adapters:
                if name in layer.scaling:
                    layer.scaling[name] *= lora_scale
        layer.merge(adapter_names)


def unfuse(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def get_peft_model_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The LoRA weights of one adapter as peft writes them: `<module>.lora_A.weight`, `<module>.lora_B.weight`
    (the adapter's name left out). Default: the first adapter of the model."""
    names = adapter_names(model)
    adapter_name = adapter_name or (names[0] if names else None)
    if adapter_name not in names:
        raise ValueError(f"the model has no LoRA adapter {adapter_name!r}; it has {names}")
    state_dict = {}
    for name, layer in lora_layers(model):
        if adapter_name in layer.r:
            state_dict[f"{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight
            state_dict[f"{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight
    return state_dict


class LoraAdapterMixin:
    """diffusers' `PeftAdapterMixin` for minidiff models: LoRA adapters added, mixed, fused and removed by name.

    `add_adapter(config)` is what diffusers' training scripts call: it wraps the target modules and, as peft does,
    leaves only the LoRA matrices A and B trainable (every other parameter gets requires_grad=False)."""

    def add_adapter(self, adapter_config, adapter_name: str = "default") -> None:
        inject_adapter(self, adapter_config, adapter_name)
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(".lora_A." in name or ".lora_B." in name)
        self.peft_config = {**getattr(self, "peft_config", {}), adapter_name: adapter_config}

    def set_adapters(self, adapter_names: list[str] | str, weights: list[float] | float | None = None) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        set_adapters(self, names, _weights_list(names, weights))

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        self.set_adapters(adapter_name)

    def active_adapters(self) -> list[str]:
        return active_adapters(self)

    def disable_adapters(self) -> None:
        enable_adapters(self, False)

    def enable_adapters(self) -> None:
        enable_adapters(self, True)

    def delete_adapters(self, adapter_names: list[str] | str) -> None:
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            delete_adapter(self, name)
            getattr(self, "peft_config", {}).pop(name, None)

    def fuse_lora(self, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names: list[str] | None = None) -> None:
        fuse(self, lora_scale, adapter_names)

    def unfuse_lora(self) -> None:
        unfuse(self)

    def unload_lora(self) -> None:
        remove_lora_layers(self)
        self.peft_config = {}


def _weights_list(names: list[str], weights) -> list[float]:
    """set_adapters' weights as one float per adapter (None: 1.0 each; one number: the same for all)."""
    if weights is None:
        return [1.0] * len(names)
    if isinstance(weights, (int, float)):
        return [float(weights)] * len(names)
    weights = list(weights)
    if any(isinstance(weight, dict) for weight in weights):
        raise NotImplementedError("per-block adapter weights (dicts) are not implemented in minidiff; give one number per adapter")
    if len(weights) != len(names):
        raise ValueError(f"{len(names)} adapter names but {len(weights)} weights: give one weight per adapter")
    return [1.0 if weight is None else float(weight) for weight in weights]
