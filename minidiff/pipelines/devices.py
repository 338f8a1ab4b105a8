"""Where a pipeline's models live and compute: `to`, `device`, `dtype`, `_execution_device`, and the memory switches
that diffusers' GPU users call (Colab: `enable_model_cpu_offload`, `enable_sequential_cpu_offload`, VAE slicing,
`enable_xformers_memory_efficient_attention`).

Conv weights: on a CPU, SD's VAE (and a non-float32 UNet) run fastest with channels-last weights
(`utils.cpu.conv_memory_format`); on any other device the models are kept contiguous, as diffusers keeps them, so
float16 results on a GPU are diffusers' own.
"""

from __future__ import annotations

import warnings

import torch

from minidiff.pipelines.offload import ModelOffload, SequentialOffload
from minidiff.utils.cpu import conv_memory_format
from minidiff.utils.device import default_device

# Where the pipelines keep the scheduler's schedule (timesteps, sigmas: a few dozen numbers): on the CPU, whatever
# device the models compute on. Each step then reads t and looks up its index on the host, with no wait for the GPU
# (diffusers puts the schedule on the GPU, and its schedulers read it back there, a device sync per step); the
# scalars the update rules take from it combine with GPU tensors as Python numbers do. A hand-written loop may
# still call `scheduler.set_timesteps(n, device="cuda")`: every scheduler works on either.
SCHEDULE_DEVICE = torch.device("cpu")


def parse_to_arguments(args: tuple, kwargs: dict) -> tuple[torch.device | None, torch.dtype | None]:
    """The forms diffusers' `DiffusionPipeline.to` accepts: to(dtype), to(device), to(device, dtype), keywords
    `device=` / `dtype=`; and the old `torch_device=` / `torch_dtype=`, which minidiff still applies with a
    FutureWarning (diffusers 0.42.1 ignores them without a word, leaving the pipeline where it was)."""
    device = kwargs.pop("device", None)
    dtype = kwargs.pop("dtype", None)
    kwargs.pop("silence_dtype_warnings", None)
    for old, new in (("torch_device", "device"), ("torch_dtype", "dtype")):
        if old in kwargs:
            warnings.warn(f"`{old}=` is the old spelling of `{new}=` in pipeline.to(); use `{new}=`.", FutureWarning, stacklevel=3)
    if kwargs.get("torch_device") is not None:
        device = device if device is not None else kwargs["torch_device"]
    if kwargs.get("torch_dtype") is not None:
        dtype = dtype if dtype is not None else kwargs["torch_dtype"]
    unknown = sorted(set(kwargs) - {"torch_device", "torch_dtype"})
    if unknown:
        raise TypeError(f"pipeline.to() got unexpected keyword arguments {unknown}; it takes device=, dtype=")
    if len(args) > 2:
        raise ValueError("pass at most two arguments to pipeline.to(): a device and a dtype")
    positional_device = positional_dtype = None
    if len(args) == 1:
        if isinstance(args[0], torch.dtype):
            positional_dtype = args[0]
        else:
            positional_device = args[0]
    elif len(args) == 2:
        if isinstance(args[0], torch.dtype):
            raise ValueError("with two arguments, pipeline.to() takes the device first and the dtype second")
        positional_device, positional_dtype = args
    if device is not None and positional_device is not None:
        raise ValueError("the device was given twice to pipeline.to(), as an argument and as device=; give it once")
    if dtype is not None and positional_dtype is not None:
        raise ValueError("the dtype was given twice to pipeline.to(), as an argument and as dtype=; give it once")
    device = device if device is not None else positional_device
    dtype = dtype if dtype is not None else positional_dtype
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"pipeline.to(): dtype must be a torch.dtype such as torch.float16, got {dtype!r}")
    return (torch.device(device) if device is not None else None), dtype


class DevicePlacementMixin:
    """`to`, `device`, `dtype`, `_execution_device` and the offload switches, for a pipeline whose models are named
    in `model_cpu_offload_seq` (diffusers' attribute: the order in which they run, "text_encoder->unet->vae")."""

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _cpu_layout_models: tuple[str, ...] = ()  # models whose conv weights take `conv_memory_format` on a CPU
    _offload = None

    def _models(self) -> dict[str, torch.nn.Module]:
        names = self.model_cpu_offload_seq.split("->")
        return {name: getattr(self, name) for name in names if isinstance(getattr(self, name, None), torch.nn.Module)}

    def to(self, *args, **kwargs):
        """Move and/or cast every model, as diffusers' `pipe.to("cuda")`, `pipe.to(torch.float16)`,
        `pipe.to("cuda", torch.float16)`, `pipe.to(device=..., dtype=...)`. Returns the pipeline."""
        device, dtype = parse_to_arguments(args, dict(kwargs))
        if device is not None and device.type != "cpu" and isinstance(self._offload, SequentialOffload):
            raise ValueError(
                "this pipeline has sequential CPU offload on (enable_sequential_cpu_offload): its weights stay on the "
                "CPU and visit the GPU layer by layer. Call pipe.remove_all_hooks() before pipe.to(device)."
            )
        for model in self._models().values():
            model.to(device=device, dtype=dtype)
        self._set_conv_layout()
        return self

    def _set_conv_layout(self) -> None:
        """Channels-last conv weights for the UNet and VAE on a CPU where that is faster, contiguous elsewhere."""
        for name in self._cpu_layout_models:
            model = getattr(self, name, None)
            if isinstance(model, torch.nn.Module):
                on_cpu = model.device.type == "cpu"
                model.to(memory_format=conv_memory_format(name, model.dtype) if on_cpu else torch.contiguous_format)

    @property
    def device(self) -> torch.device:
        """Where the models are: the first one not on the CPU (or meta), else the first one's device."""
        devices = [model.device for model in self._models().values()]
        return next((device for device in devices if device.type not in ("cpu", "meta")), devices[0])

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first model (the text encoder), as diffusers' `pipe.dtype`."""
        return next(iter(self._models().values())).dtype

    @property
    def _execution_device(self) -> torch.device:
        """Where the pipeline makes its tensors: the GPU the offload hooks compute on, else `device`."""
        return self._offload.device if self._offload is not None else self.device

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """Keep every model on the CPU and move each to the GPU only while it runs (see pipelines/offload.py)."""
        self._offload_to(ModelOffload, gpu_id, device)

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """Copy each layer's weights to the GPU just for its forward: least GPU memory, slowest (pipelines/offload.py)."""
        self._offload_to(SequentialOffload, gpu_id, device)

    def _offload_to(self, kind, gpu_id, device) -> None:
        target = torch.device(device) if device is not None else default_device()
        if target.type == "cpu":
            raise RuntimeError(
                "CPU offload moves models between CPU memory and a GPU, but PyTorch sees no GPU here; "
                "on a CPU the models are in CPU memory already: just call the pipeline"
            )
        if gpu_id is not None and target.index is not None:
            raise ValueError(f"give the GPU once: gpu_id={gpu_id} and device={device} both name one")
        target = torch.device(target.type, gpu_id if gpu_id is not None else (target.index or 0))
        self.remove_all_hooks()
        self._offload = kind(list(self._models().values()), target)

    def maybe_free_model_hooks(self) -> None:
        """After an image: send the model that ran last back to the CPU (a no-op without offload)."""
        if self._offload is not None:
            self._offload.offload()

    def remove_all_hooks(self) -> None:
        """Turn CPU offload off; the models stay on the CPU (`pipe.to("cuda")` then moves them)."""
        if self._offload is not None:
            self._offload.remove()
            self._offload = None

    def enable_xformers_memory_efficient_attention(self, attention_op=None) -> None:
        """Accepted for diffusers' API and does nothing: minidiff's attention is PyTorch's
        scaled_dot_product_attention, which picks a memory-efficient (or flash) kernel on a GPU by itself."""
        warnings.warn(
            "minidiff has no xFormers path: its attention already runs torch's scaled_dot_product_attention, which "
            "uses memory-efficient or flash kernels on a GPU. Nothing was changed.",
            stacklevel=2,
        )

    def disable_xformers_memory_efficient_attention(self) -> None:
        """See enable_xformers_memory_efficient_attention: nothing to undo."""
