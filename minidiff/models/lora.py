"""LoRA: a low-rank update added to a frozen Linear or Conv2d (Hu et al. 2021, "LoRA", arXiv:2106.09685).

Eq. 3 of the paper: a pretrained weight W0 (d_out x d_in) stays frozen; training learns only
B (d_out x r) and A (r x d_in), with r << min(d_out, d_in), and the layer computes

    h = W0 x + (alpha / r) * B A x                                           (Hu et al. eq. 3, section 4.1)

A starts random, B at zero, so at the first step the layer is exactly W0. `alpha` fixes the update's
size when r changes ("we simply set alpha to the first r we try and do not tune it"), so what counts is
alpha / r, not alpha. diffusers (through peft) adds two user knobs on top, both plain multipliers:

    h = W0 x + sum_adapters  weight_a * scale * (alpha_a / r_a) * B_a A_a x

`weight_a` is the adapter's weight from `set_adapters` (several named adapters per layer, mixed), `scale`
is `cross_attention_kwargs={"scale": s}` for one call. `scaling[a]` below holds weight_a * alpha_a / r_a.

Convolutions (LoCon, as kohya's scripts and LCM-LoRA train them): A is a k x k convolution with the base
layer's stride and padding (d_in -> r channels), B a 1 x 1 convolution (r -> d_out). Their product is the
k x k kernel  delta_W[o, i, :, :] = sum_r B[o, r] A[r, i, :, :],  so fusing works for both kinds:

    W0 <- W0 + scaling * B A        (fuse_lora; unfuse_lora subtracts the same delta again)

Names follow peft's LoRA layer (`base_layer`, `lora_A[name]`, `lora_B[name]`, `r`, `lora_alpha`,
`scaling`, `merge`/`unmerge`), so a state dict of LoRA weights reads `to_q.lora_A.<adapter>.weight`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LoraConfig:
    """The fields of peft's `LoraConfig` that LoRA for Stable Diffusion uses, with peft's names and defaults.

    r: the rank; lora_alpha: alpha of eq. 3 (the update is scaled by lora_alpha / r); target_modules: module
    names, or their last parts ("to_q" matches every "...attn1.to_q"); rank_pattern / alpha_pattern: per-module
    exceptions {name: value}; init_lora_weights: True (A Kaiming-uniform, B zero, as peft), "gaussian" (A normal
    with std 1/r, B zero, as diffusers' training scripts use) or False (both random: a LoRA that changes the
    output from the start, for tests); lora_dropout: dropout on the input of A during training.
    peft's own `LoraConfig` object is accepted wherever this one is (the fields are read by name).
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    lora_dropout: float = 0.0
    init_lora_weights: bool | str = True
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False

    def to_dict(self) -> dict:
        """The fields as a dict (what `save_lora_weights` writes into the file's `lora_adapter_metadata`)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


class LoraLayer(nn.Module):
    """A `nn.Linear` or `nn.Conv2d` (`base_layer`, frozen) plus named low-rank adapters (module docstring, eq. 3)."""

    def __init__(self, base_layer: nn.Linear | nn.Conv2d):
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"LoRA wraps nn.Linear or nn.Conv2d, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}  # weight * alpha / r, per adapter
        self.use_rslora: dict[str, bool] = {}  # rsLoRA: alpha / sqrt(r) instead of alpha / r
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.scale = 1.0  # cross_attention_kwargs["scale"], set for one forward call by `lora_scale(...)`

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, init_lora_weights: bool | str = True,
                     lora_dropout: float = 0.0, use_rslora: bool = False) -> None:
        """Adds adapter `adapter_name` of rank r: A (r x d_in [x k x k]) and B (d_out x r [x 1 x 1]), on the base's
        device and dtype, initialised as `init_lora_weights` says (see LoraConfig)."""
        if r <= 0:
            raise ValueError(f"the LoRA rank r must be a positive integer, got {r}")
        base = self.base_layer
        where = {"device": base.weight.device, "dtype": base.weight.dtype}
        if isinstance(base, nn.Linear):
            lora_A = nn.Linear(base.in_features, r, bias=False, **where)
            lora_B = nn.Linear(r, base.out_features, bias=False, **where)
        else:
            lora_A = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
                               bias=False, **where)
            lora_B = nn.Conv2d(r, base.out_channels, 1, bias=False, **where)
            if base.weight.is_contiguous(memory_format=torch.channels_last):  # the base's layout (utils/cpu.py)
                lora_A.to(memory_format=torch.channels_last)
                lora_B.to(memory_format=torch.channels_last)
        self.lora_A[adapter_name], self.lora_B[adapter_name] = lora_A, lora_B
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.use_rslora[adapter_name] = use_rslora
        self.scaling[adapter_name] = lora_alpha / (r**0.5 if use_rslora else r)
        self.reset_lora_parameters(adapter_name, init_lora_weights)

    @torch.no_grad()
    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: bool | str) -> None:
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if init_lora_weights is False:
            return  # nn.Linear / nn.Conv2d's own random init for both: a LoRA that acts from the start
        if init_lora_weights == "gaussian":
            nn.init.normal_(A, std=1 / self.r[adapter_name])
        elif init_lora_weights is True:
            nn.init.kaiming_uniform_(A, a=5**0.5)  # nn.Linear's default, as peft
        else:
            raise ValueError(f"init_lora_weights={init_lora_weights!r}: minidiff knows True, 'gaussian' and False")
        nn.init.zeros_(B)

    def set_scale(self, adapter_name: str, weight: float) -> None:
        """scaling = weight * alpha / r: the adapter's weight in a mix (set_adapters)."""
        if adapter_name in self.scaling:
            rank = self.r[adapter_name] ** 0.5 if self.use_rslora[adapter_name] else self.r[adapter_name]
            self.scaling[adapter_name] = weight * self.lora_alpha[adapter_name] / rank

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """scaling * B A, shaped like the base weight: (d_out, d_in), or (d_out, d_in, k, k) for a convolution."""
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if A.ndim == 2:
            product = B @ A
        else:  # delta_W[o, i, kh, kw] = sum_r B[o, r] A[r, i, kh, kw]
            product = torch.einsum("or,rikl->oikl", B[:, :, 0, 0], A)
        return product * self.scaling[adapter_name]

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None) -> None:
        """W0 <- W0 + scaling * B A for each active (or named) adapter not merged yet (fuse_lora)."""
        for name in adapter_names if adapter_names is not None else list(self.active_adapters):
            if name in self.lora_A and name not in self.merged_adapters:
                self.base_layer.weight.data += self.delta_weight(name).to(self.base_layer.weight.dtype)
                self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtracts what `merge` added, last merged first (unfuse_lora). Equal to W0 up to float rounding."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self.base_layer.weight.data -= self.delta_weight(name).to(self.base_layer.weight.dtype)

    def delete_adapter(self, adapter_name: str) -> None:
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            if adapter_name in table:
                del table[adapter_name]
        for table in (self.r, self.lora_alpha, self.scaling, self.use_rslora):
            table.pop(adapter_name, None)
        if adapter_name in self.active_adapters:
            self.active_adapters.remove(adapter_name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """h = W0 x + sum over active adapters of scale * scaling_a * B_a(A_a(x)) (eq. 3); only W0 x when the
        adapters are fused into W0 (merged) or disabled (a disabled, fused layer is unfused first, as in peft)."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name in self.lora_A:
                result = result + self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x))) * (
                    self.scaling[name] * self.scale)
        return result

    def extra_repr(self) -> str:
        return f"adapters={ {name: self.r[name] for name in self.r} } active={self.active_adapters}"
