"""What every model shares: a config, and `from_pretrained` / `save_pretrained` in diffusers' folder layout.

    unet = UNet2DConditionModel.from_pretrained("path/to/stable-diffusion-v1-5", subfolder="unet")

reads `unet/config.json`, builds the module on the meta device (no memory for weights yet), reads
`unet/diffusion_pytorch_model.safetensors` memory-mapped, checks every key and shape (one error lists
all that do not fit), casts each tensor once to `torch_dtype`, and hands the tensors to the module
with `load_state_dict(assign=True)`, so weights are never allocated twice.

Modules must keep all their state in parameters and persistent buffers (derived constants, such as
position ids, are computed in `forward`), so nothing is left on the meta device after loading.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from minidiff.checkpoints.errors import CheckpointError, check_state_dict
from minidiff.checkpoints.folder import weight_files_in_folder, with_variant
from minidiff.checkpoints.hub import HubOptions, download_component
from minidiff.checkpoints.reader import CheckpointFile, converted, read_state_dict
from minidiff.checkpoints.single_file_layout import (
    PART_OF_CLASS,
    check_is_sd1,
    check_part_fits,
    component_config,
    config_for_file,
    key_map_for,
    stored_keys,
)
from minidiff.configuration import ConfigMixin, deprecated_config_attribute, is_deprecated_config_attribute
from minidiff.utils.cpu import skip_init
from minidiff.utils.torch_utils import resolve_dtype


class ModelMixin(torch.nn.Module, ConfigMixin):
    """A torch module with a diffusers-style config and folder loading."""

    config_name = "config.json"
    # File names tried in a component folder, in order (variants and shard indexes are derived from them).
    weights_names = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"]
    # Bookkeeping keys that other tools write into config.json; never reported as unknown.
    _quiet_keys = ("_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype")

    def __init__(self):
        super().__init__()

    def __getattr__(self, name: str):
        """torch's lookup of parameters, buffers and submodules, after diffusers' deprecated reading of a
        config key as an attribute (`unet.in_channels`: the value, with a FutureWarning; see configuration.py)."""
        if is_deprecated_config_attribute(self, name):
            return deprecated_config_attribute(self, name, "unet", stacklevel=3)
        return super().__getattr__(name)

    # ----- training -----

    _supports_gradient_checkpointing = False  # True on the models whose blocks can recompute their activations

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether gradient checkpointing is on (`enable_gradient_checkpointing`)."""
        return any(getattr(module, "gradient_checkpointing", False) for module in self.modules())

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the activations of each resnet and transformer block (VAE: each encoder/decoder block) in
        the backward pass instead of storing them (layers.checkpointed): less memory for training, about one
        more forward pass of compute, the same gradients. As diffusers' ModelMixin."""
        self._set_gradient_checkpointing(True)

    def disable_gradient_checkpointing(self) -> None:
        """Store the activations again (the default)."""
        if self._supports_gradient_checkpointing:
            self._set_gradient_checkpointing(False)

    def _set_gradient_checkpointing(self, enabled: bool) -> None:
        blocks = [module for module in self.modules() if hasattr(module, "gradient_checkpointing")]
        if not self._supports_gradient_checkpointing or not blocks:
            raise ValueError(f"{type(self).__name__} does not support gradient checkpointing; "
                             "UNet2DModel, UNet2DConditionModel and AutoencoderKL do")
        for module in blocks:
            module.gradient_checkpointing = enabled

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @classmethod
    def checkpoint_to_module_keys(cls, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename a checkpoint's keys to this module's names where files differ (identity by default)."""
        return state_dict

    # ----- loading -----

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        memory_format: torch.memory_format | None = None,
        *,
        dtype: torch.dtype | None = None,
        use_safetensors: bool | None = None,
        low_cpu_mem_usage: bool = True,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
    ):
        """Load config and weights from a diffusers-layout folder (or a hub repo id, through huggingface_hub).

        Keyword arguments as diffusers' (0.42.1):
        - `dtype` (or its old name `torch_dtype`; `dtype` wins when both are given, as in diffusers' models);
        - `variant` ("fp16": `*.fp16.safetensors`), `subfolder`;
        - `use_safetensors`: None takes `.safetensors` and falls back to `.bin`, True only `.safetensors`,
          False only `.bin` (read with `torch.load(weights_only=True)`);
        - `revision`, `cache_dir`, `local_files_only`: for a hub repo id, handed to huggingface_hub; a local
          folder ignores them;
        - `low_cpu_mem_usage`: has no effect here. minidiff always builds the module on the meta device and
          assigns the checkpoint's tensors (what diffusers does with True), so False loads the same way.

        `torch_dtype` is the dtype of the loaded floating-point weights; as in diffusers, it defaults to
        torch's default dtype (float32), whatever the file holds, so `variant="fp16"` alone gives an
        fp32 model and `variant="fp16", torch_dtype=torch.float16` an fp16 one.
        `memory_format=torch.channels_last` lays the 4-D (conv) weights out channels-last while loading.
        """
        torch_dtype = resolve_dtype(dtype, torch_dtype, deprecated=False)
        _check_dtype(cls, torch_dtype)
        if not isinstance(low_cpu_mem_usage, bool):
            raise TypeError(f"low_cpu_mem_usage must be True or False, got {low_cpu_mem_usage!r}")
        weights_names = _weights_names(cls, use_safetensors)
        hub = HubOptions(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
        folder = _component_folder(path_or_repo_id, subfolder, cls, variant, weights_names, hub)
        config = cls.load_config(folder)
        _check_class_name(cls, config, folder)
        files = weight_files_in_folder(folder, weights_names, variant)
        source = str(files[0]) if len(files) == 1 else f"{folder} ({len(files)} shards)"
        # cast and lay out each tensor while reading: its file pages go back once converted (reader.py)
        state_dict = read_state_dict(files, torch_dtype or torch.get_default_dtype(), memory_format)
        return cls.from_state_dict(config, state_dict, torch_dtype, source=source, memory_format=memory_format)

    @classmethod
    def from_state_dict(
        cls,
        config: dict,
        state_dict: dict[str, torch.Tensor],
        torch_dtype: torch.dtype | None = None,
        source: str = "checkpoint",
        memory_format: torch.memory_format | None = None,
    ):
        """Build the module from `config` on the meta device and assign `state_dict`'s tensors to it.

        Each floating-point tensor is cast once, to `torch_dtype` (default: torch's default dtype), and each
        4-D one laid out in `memory_format` (default: as it is); a tensor that needs neither is used as it is
        (for safetensors: a view of the memory map).
        """
        _check_dtype(cls, torch_dtype)
        torch_dtype = torch_dtype or torch.get_default_dtype()
        model = build_on_meta(cls, config)
        state_dict = cls.checkpoint_to_module_keys(state_dict)
        check_state_dict(model, state_dict, source)
        state_dict = {key: converted(value, torch_dtype, memory_format) for key, value in state_dict.items()}
        model.load_state_dict(state_dict, strict=True, assign=True)
        left_on_meta = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
        if left_on_meta:
            raise CheckpointError(f"{cls.__name__} has tensors the checkpoint does not set: {left_on_meta[:10]}")
        return model.eval()

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike | CheckpointFile,
        config=None,
        torch_dtype: torch.dtype | None = None,
        use_ema: bool = False,
        memory_format: torch.memory_format | None = None,
        *,
        dtype: torch.dtype | None = None,
    ):
        """Load this network (UNet2DConditionModel, AutoencoderKL or CLIPTextModel) from an original one-file
        SD 1.x checkpoint such as `v1-5-pruned-emaonly.safetensors`, offline. `config` (a dict or a
        diffusers-layout folder) defaults to SD 1.5's bundled config; `use_ema` takes the UNet's EMA copy;
        `dtype` (or `torch_dtype`; `dtype` wins, as in diffusers) is the weights' dtype.

        The file's keys under the network's prefix are renamed by the key map and checked against the module
        (built on the meta device) before any tensor is read; then each tensor is read, cast and laid out in one
        copy where needed (checkpoints/single_file_layout.py has the file's layout, key_map.py the names).
        """
        part = next((PART_OF_CLASS[klass.__name__] for klass in cls.__mro__ if klass.__name__ in PART_OF_CLASS), None)
        if part is None:
            raise ValueError(f"{cls.__name__} cannot be loaded from a single file; only {', '.join(PART_OF_CLASS)} can")
        torch_dtype = resolve_dtype(dtype, torch_dtype, deprecated=False)
        _check_dtype(cls, torch_dtype)
        checkpoint = path if isinstance(path, CheckpointFile) else CheckpointFile(path)
        check_is_sd1(checkpoint)
        config = config_for_file(part, component_config(part, config), checkpoint)  # e.g. 9 channels: inpainting
        key_map = key_map_for(part, config)
        stored_key = stored_keys(checkpoint, part, key_map, use_ema)  # the module's name -> the key in the file
        check_part_fits(build_on_meta(cls, config), checkpoint, stored_key, key_map, part)
        dtype = torch_dtype or torch.get_default_dtype()
        state_dict = {
            name: key_map.tensor_to_diffusers(name, checkpoint.tensor(key, dtype, memory_format)) for name, key in stored_key.items()
        }
        return cls.from_state_dict(config, state_dict, dtype, source=f"{checkpoint.path} ({part})")

    # ----- writing -----

    def save_pretrained(self, folder: str | os.PathLike, variant: str | None = None) -> Path:
        """Write `config.json` and the weights (safetensors) into `folder`, in diffusers' layout.

        The weights are written in the module's dtype: for an fp16 variant, `model.half()` first.
        """
        folder = Path(folder)
        self.save_config(folder)
        name = with_variant(self.weights_names[0], variant)  # e.g. diffusion_pytorch_model.fp16.safetensors
        tensors = {key: value.detach().contiguous() for key, value in self.state_dict().items()}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        return folder


def build_on_meta(cls, config: dict):
    """`cls.from_config(config)` on the meta device: shapes only, no memory, and no random initialisation.

    The initialisation would be thrown away (every tensor comes from the checkpoint), and on the meta
    device it is not free: `normal_` (nn.Embedding's init) imports torch._dynamo, seconds the first time.
    So torch.nn.init's functions are no-ops while the module is built (not thread-safe: build one at a time).
    """
    with torch.device("meta"), skip_init():
        return cls.from_config(config)


def _check_dtype(cls, torch_dtype) -> None:
    if torch_dtype is not None and not (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
        raise ValueError(
            f"{cls.__name__}: torch_dtype must be a floating torch.dtype such as torch.float16, "
            f"got {torch_dtype!r}"
        )


def _check_class_name(cls, config: dict, folder: Path) -> None:
    """A config written for another model class (e.g. the VAE's, read as a UNet) is refused up front."""
    written_by = config.get("_class_name")
    if isinstance(written_by, str) and written_by != cls.__name__:
        raise ValueError(
            f"{folder / cls.config_name} describes a {written_by}, not a {cls.__name__}: "
            f"load it with {written_by}.from_pretrained(...), or pick the right subfolder"
        )


def _weights_names(cls, use_safetensors: bool | None) -> list[str]:
    """The weights file names to look for, in order: `use_safetensors` None both (safetensors first), True / False one kind."""
    if use_safetensors is None:
        return cls.weights_names
    if not isinstance(use_safetensors, bool):
        raise TypeError(f"use_safetensors must be None, True or False, got {use_safetensors!r}")
    return [name for name in cls.weights_names if name.endswith(".safetensors") == use_safetensors]


def _component_folder(path_or_repo_id, subfolder: str | None, cls, variant: str | None, weights_names: list[str],
                      hub: HubOptions) -> Path:
    """The local folder of one component; a hub repo id is downloaded (only that component's files)."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise FileNotFoundError(f"{path} has no subfolder {subfolder!r}; expected a diffusers-layout folder")
        return folder
    if path.exists() or str(path_or_repo_id).startswith((".", "/", "~")) or str(path_or_repo_id).count("/") != 1:
        raise FileNotFoundError(
            f"{path_or_repo_id} is neither a local folder nor a hub repo id (owner/name); "
            "for a single .safetensors file use from_single_file(...)"
        )
    return download_component(str(path_or_repo_id), subfolder, [cls.config_name, *weights_names], variant, hub)
