"""An exponential moving average (EMA) of a model's weights, as diffusers' training scripts keep one.

Diffusion models are sampled with averaged weights (DDPM, Ho et al. 2020, arXiv 2006.11239, Appendix B:
"we used EMA on model parameters with a decay factor of 0.9999"). After every optimizer step,

    theta_ema <- theta_ema - (1 - d) (theta_ema - theta)          (= d theta_ema + (1 - d) theta)

with a decay d that grows with the step count n (counted from `update_after_step`, k = n - update_after_step - 1):

    d = 0                                   while k <= 0
    d = 1 - (1 + k / inv_gamma) ** -power   with use_ema_warmup (the warm-up of Karras's "EMA warmup")
    d = (1 + k) / (10 + k)                  otherwise
    then clamped to [min_decay, decay]

so early weights, which are far from good, are soon forgotten. Parameters that do not train are copied.
The API is diffusers' `EMAModel` (`step`, `copy_to`, `store`/`restore`, `state_dict`/`load_state_dict`,
`to`, `cur_decay_value`), so the course's training loop runs as it is.
"""

from __future__ import annotations

from typing import Iterable

import torch


class EMAModel:
    """Shadow copies of `parameters`, moved towards them by `step(parameters)` after each optimizer step."""

    def __init__(
        self,
        parameters: Iterable[torch.nn.Parameter],
        decay: float = 0.9999,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        use_ema_warmup: bool = False,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        model_cls: type | None = None,
        model_config: dict | None = None,
    ):
        if isinstance(parameters, torch.nn.Module):
            raise TypeError("EMAModel takes the model's parameters: EMAModel(model.parameters(), ...)")
        self.shadow_params = [parameter.clone().detach() for parameter in parameters]
        self.decay, self.min_decay, self.update_after_step = decay, min_decay, update_after_step
        self.use_ema_warmup, self.inv_gamma, self.power = use_ema_warmup, inv_gamma, power
        self.model_cls, self.model_config = model_cls, model_config  # kept for the caller, as in diffusers
        self.optimization_step = 0
        self.cur_decay_value: float | None = None
        self.temp_stored_params: list[torch.Tensor] | None = None

    def get_decay(self, optimization_step: int) -> float:
        """The decay d after `optimization_step` steps (module docstring)."""
        k = max(0, optimization_step - self.update_after_step - 1)
        if k <= 0:
            return 0.0
        d = 1 - (1 + k / self.inv_gamma) ** -self.power if self.use_ema_warmup else (1 + k) / (10 + k)
        return max(min(d, self.decay), self.min_decay)

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """theta_ema <- theta_ema - (1 - d) (theta_ema - theta), for every trained parameter."""
        self.optimization_step += 1
        self.cur_decay_value = self.get_decay(self.optimization_step)
        one_minus_decay = 1 - self.cur_decay_value
        for shadow, parameter in zip(self.shadow_params, parameters, strict=True):
            if parameter.requires_grad:
                shadow.sub_(one_minus_decay * (shadow - parameter))
            else:
                shadow.copy_(parameter)

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Write the averaged weights into `parameters` (e.g. before sampling or saving)."""
        for shadow, parameter in zip(self.shadow_params, parameters, strict=True):
            parameter.copy_(shadow.to(parameter.device))

    def store(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Keep a copy of the current (trained) weights, to `restore` after evaluating with the EMA ones."""
        self.temp_stored_params = [parameter.detach().cpu().clone() for parameter in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        if self.temp_stored_params is None:
            raise RuntimeError("EMAModel.restore: nothing stored; call store(parameters) before copy_to(parameters)")
        for stored, parameter in zip(self.temp_stored_params, parameters, strict=True):
            parameter.copy_(stored)
        self.temp_stored_params = None

    def to(self, device=None, dtype=None) -> None:
        self.shadow_params = [
            shadow.to(device=device, dtype=dtype) if shadow.is_floating_point() else shadow.to(device=device)
            for shadow in self.shadow_params
        ]

    def state_dict(self) -> dict:
        """The settings, the step count and (references to) the shadow weights, under diffusers' keys."""
        return {
            "decay": self.decay, "min_decay": self.min_decay, "optimization_step": self.optimization_step,
            "update_after_step": self.update_after_step, "use_ema_warmup": self.use_ema_warmup,
            "inv_gamma": self.inv_gamma, "power": self.power, "shadow_params": self.shadow_params,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        for key in ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power"):
            setattr(self, key, state_dict.get(key, getattr(self, key)))
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"EMAModel: decay must be between 0 and 1, got {self.decay}")
        shadow = state_dict.get("shadow_params")
        if shadow is not None:
            if not isinstance(shadow, list) or len(shadow) != len(self.shadow_params):
                raise ValueError(f"EMAModel: shadow_params must be a list of {len(self.shadow_params)} tensors")
            self.shadow_params = [tensor.clone() for tensor in shadow]
