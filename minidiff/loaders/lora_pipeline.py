"""diffusers' LoRA API on a pipeline: `StableDiffusionLoraLoaderMixin`, inherited by StableDiffusionPipeline.

    pipe.load_lora_weights("pixel-art.safetensors", adapter_name="pixel")        # kohya, diffusers/PEFT or older
    pipe.load_lora_weights("latent-consistency/lcm-lora-sdv1-5")                # a hub repo (its pytorch_lora_weights)
    pipe.set_adapters(["pixel", "default_1"], adapter_weights=[0.7, 0.4])       # mix two
    image = pipe(prompt, cross_attention_kwargs={"scale": 0.5}).images[0]      # half strength, this call only
    pipe.fuse_lora(); pipe.unfuse_lora(); pipe.unload_lora_weights()           # into W0, out again, removed

Each adapted layer computes W0 x + weight * scale * (alpha / r) * B A x (models/lora.py). A file is read and
checked completely (loaders/lora_formats.py) before any layer is added, so a refused file leaves the pipeline
as it was. The LoRA layers are minidiff's own (models/lora_adapters.py); peft is not used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from minidiff.checkpoints.hub import HubOptions, download_file
from minidiff.checkpoints.reader import CheckpointFile, safetensors_metadata
from minidiff.loaders.lora_formats import COMPONENTS, LoraFormatError, parse_metadata, read_lora
from minidiff.models import lora_adapters
from minidiff.models.lora_adapters import _weights_list

LORA_WEIGHT_NAME = "pytorch_lora_weights.bin"
LORA_WEIGHT_NAME_SAFE = "pytorch_lora_weights.safetensors"
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"


def read_lora_file(source: str | os.PathLike | dict, weight_name: str | None = None,
                   hub: HubOptions | None = None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict, lora_adapter_metadata or None) from a dict, a file, a folder holding one, or a hub repo id.

    Pickled files (.bin, .pt, .ckpt) are read with torch.load(weights_only=True) only (checkpoints/reader.py)."""
    if isinstance(source, dict):
        return dict(source), None
    path = Path(source)
    if path.is_dir():
        path = _file_in_folder(path, weight_name)
    elif not path.is_file():
        if path.exists() or str(source).count("/") != 1 or str(source).startswith((".", "/", "~")):
            raise FileNotFoundError(f"{source} is neither a LoRA file, a folder holding one, nor a hub repo id")
        path = Path(download_file(str(source), weight_name or LORA_WEIGHT_NAME_SAFE, hub=hub))
    checkpoint = CheckpointFile(path)
    state_dict = {key: checkpoint.tensor(key) for key in checkpoint.keys()}
    return state_dict, parse_metadata(safetensors_metadata(path).get(LORA_ADAPTER_METADATA_KEY))


def _file_in_folder(folder: Path, weight_name: str | None) -> Path:
    if weight_name:
        if not (folder / weight_name).is_file():
            raise FileNotFoundError(f"{folder} has no {weight_name}")
        return folder / weight_name
    for name in (LORA_WEIGHT_NAME_SAFE, LORA_WEIGHT_NAME):
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) != 1:
        raise FileNotFoundError(f"{folder} holds {len(candidates)} .safetensors files and no {LORA_WEIGHT_NAME_SAFE}: "
                                f"pass weight_name=... ({[c.name for c in candidates][:10]})")
    return candidates[0]


class StableDiffusionLoraLoaderMixin:
    """LoRA on the UNet and the text encoder, with diffusers 0.42's method names and defaults."""

    _lora_loadable_modules = ["unet", "text_encoder"]
    _lora_scale = 1.0

    @property
    def lora_scale(self) -> float:
        """The LoRA scale of the last call (cross_attention_kwargs["scale"]), as diffusers' `pipe.lora_scale`."""
        return self._lora_scale

    def _lora_models(self, components=None) -> dict[str, torch.nn.Module]:
        names = self._lora_loadable_modules if components is None else components
        unknown = [name for name in names if name not in self._lora_loadable_modules]
        if unknown:
            raise ValueError(f"components {unknown}: LoRA lives in {self._lora_loadable_modules}")
        return {name: getattr(self, name) for name in names if getattr(self, name, None) is not None}

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict, weight_name: str | None = None,
                        return_lora_metadata: bool = False, **hub_kwargs):
        """The file's tensors as stored (and its lora_adapter_metadata with return_lora_metadata=True)."""
        state_dict, metadata = read_lora_file(pretrained_model_name_or_path_or_dict, weight_name, HubOptions(**hub_kwargs))
        return (state_dict, metadata) if return_lora_metadata else state_dict

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          weight_name: str | None = None, **hub_kwargs) -> None:
        """Adds a LoRA (kohya/A1111, diffusers/PEFT or diffusers' older format, recognised from the keys) to the
        UNet and the text encoder as adapter `adapter_name` (default "default_<n>"), which becomes the only active
        adapter, as in diffusers. `hub_kwargs`: revision, cache_dir, local_files_only, for a hub repo id."""
        state_dict, metadata = read_lora_file(pretrained_model_name_or_path_or_dict, weight_name, HubOptions(**hub_kwargs))
        models = self._lora_models()
        existing = [name for model in models.values() for name in lora_adapters.adapter_names(model)]
        if adapter_name is None:  # diffusers counts the adapters already in the UNet
            adapter_name = f"default_{len(lora_adapters.adapter_names(self.unet))}"
        if adapter_name in existing:
            raise ValueError(f"adapter name {adapter_name!r} is already in use: pass another adapter_name, or "
                             "delete_adapters it first")
        _, layers = read_lora(state_dict, self.unet, getattr(self, "text_encoder", None), metadata)  # all checks
        for component, weights in layers.items():
            model = models[component]
            for module_name, lora in weights.items():
                layer = lora_adapters.add_lora_layer(model, module_name, adapter_name, lora.rank,
                                                     lora.alpha if lora.alpha is not None else lora.rank,
                                                     init_lora_weights=False, use_rslora=lora.use_rslora)
                with torch.no_grad():
                    layer.lora_A[adapter_name].weight.copy_(lora.down)
                    layer.lora_B[adapter_name].weight.copy_(lora.up)
            lora_adapters.set_adapters(model, [adapter_name], [1.0])

    def set_adapters(self, adapter_names: list[str] | str, adapter_weights: float | list[float] | None = None) -> None:
        """Activates `adapter_names` (the others are off) with a weight each (None: 1.0)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = _weights_list(names, adapter_weights)
        known = self.get_list_adapters()
        missing = [name for name in names if not any(name in listed for listed in known.values())]
        if missing:
            raise ValueError(f"adapter(s) {missing} not loaded; the pipeline has {known}")
        for model in self._lora_models().values():
            lora_adapters.set_adapters(model, names, weights)

    def get_active_adapters(self) -> list[str]:
        for model in self._lora_models().values():
            active = lora_adapters.active_adapters(model)
            if active:
                return active
        return []

    def get_list_adapters(self) -> dict[str, list[str]]:
        """{component: its adapter names}, components without LoRA left out (as diffusers)."""
        listed = {name: lora_adapters.adapter_names(model) for name, model in self._lora_models().items()}
        return {name: adapters for name, adapters in listed.items() if adapters}

    def disable_lora(self) -> None:
        for model in self._lora_models().values():
            lora_adapters.enable_adapters(model, False)

    def enable_lora(self) -> None:
        for model in self._lora_models().values():
            lora_adapters.enable_adapters(model, True)

    def delete_adapters(self, adapter_names: list[str] | str) -> None:
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            for model in self._lora_models().values():
                lora_adapters.delete_adapter(model, name)

    def fuse_lora(self, components: list[str] = ("unet", "text_encoder"), lora_scale: float = 1.0,
                  safe_fusing: bool = False, adapter_names: list[str] | None = None) -> None:
        """W0 <- W0 + lora_scale * weight * (alpha / r) B A in every adapted layer of `components`.

        As in diffusers, `lora_scale` stays in the adapters afterwards (an unfused adapter then acts scaled), and
        `safe_fusing` checks the fused weights for NaN before keeping them."""
        for model in self._lora_models(list(components)).values():
            lora_adapters.fuse(model, lora_scale, adapter_names)
            if safe_fusing and any(torch.isnan(layer.weight).any() for _, layer in lora_adapters.lora_layers(model)):
                lora_adapters.unfuse(model)
                raise ValueError("fusing the LoRA gave NaN weights; it was unfused again")

    def unfuse_lora(self, components: list[str] = ("unet", "text_encoder")) -> None:
        """W0 <- W0 - (the delta fused): the base weights again, up to float rounding."""
        for model in self._lora_models(list(components)).values():
            lora_adapters.unfuse(model)

    def unload_lora_weights(self) -> None:
        """Removes every LoRA layer: the original Linear / Conv2d modules, with their untouched weights, are back."""
        for model in self._lora_models().values():
            lora_adapters.remove_lora_layers(model)

    @classmethod
    def save_lora_weights(cls, save_directory: str | os.PathLike, unet_lora_layers: dict | torch.nn.Module | None = None,
                          text_encoder_lora_layers: dict | torch.nn.Module | None = None, is_main_process: bool = True,
                          weight_name: str | None = None, save_function=None, safe_serialization: bool = True,
                          unet_lora_adapter_metadata: dict | None = None,
                          text_encoder_lora_adapter_metadata: dict | None = None, *, overwrite: bool = False) -> Path | None:
        """Writes `save_directory/pytorch_lora_weights.safetensors` with keys "unet.<module>.lora_A.weight", ...
        (diffusers' layout; `diffusers.StableDiffusionPipeline.load_lora_weights` reads it), and the adapters'
        configs in the header's "lora_adapter_metadata". An existing file is kept unless `overwrite=True`."""
        layers = {"unet": unet_lora_layers, "text_encoder": text_encoder_lora_layers}
        if not any(value for value in layers.values()):
            raise ValueError("pass at least one of unet_lora_layers or text_encoder_lora_layers")
        state_dict = {}
        for prefix, weights in layers.items():
            if isinstance(weights, torch.nn.Module):
                weights = weights.state_dict()
            for key, tensor in (weights or {}).items():
                state_dict[f"{prefix}.{key}"] = tensor.detach().contiguous()
        metadata = {}
        for prefix, config in (("unet", unet_lora_adapter_metadata), ("text_encoder", text_encoder_lora_adapter_metadata)):
            config = config.to_dict() if hasattr(config, "to_dict") else config
            for key, value in (config or {}).items():
                metadata[f"{prefix}.{key}"] = sorted(value) if isinstance(value, set) else value
        if not is_main_process:
            return None
        if not safe_serialization:
            raise ValueError("minidiff writes LoRA weights as safetensors only (no pickles): leave safe_serialization=True")
        folder = Path(save_directory)
        if folder.is_file():
            raise ValueError(f"{folder} is a file: save_lora_weights takes a folder")
        path = folder / (weight_name or LORA_WEIGHT_NAME_SAFE)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it, or another folder / weight_name")
        folder.mkdir(parents=True, exist_ok=True)
        header = {"format": "pt"}
        if metadata:
            header[LORA_ADAPTER_METADATA_KEY] = json.dumps(metadata, indent=2, sort_keys=True, default=list)
        (save_function or (lambda tensors, file: save_file(tensors, file, metadata=header)))(state_dict, str(path))
        return path


__all__ = ["StableDiffusionLoraLoaderMixin", "LoraFormatError", "read_lora_file", "COMPONENTS"]
