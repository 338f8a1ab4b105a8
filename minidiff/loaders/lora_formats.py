"""The LoRA file formats of SD 1.5, recognised from their keys and read into one form: per module, A, B, alpha.

Every format stores, for each adapted layer, the down-projection A (r x d_in), the up-projection B (d_out x r)
and sometimes alpha (the update is (alpha / r) B A, Hu et al. 2021 eq. 3; see models/lora.py). They differ
only in how they name the layer and the two matrices (docs/lora.md has them side by side):

    kohya / A1111   lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight  (.lora_up, .alpha)
                    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight
                    the module name with "." -> "_"; some trainers use the original (SGM) block names:
                    lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight
    diffusers/PEFT  unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight  (lora_B)
                    text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight (or without text_model.)
                    alpha: the file's safetensors header, "lora_adapter_metadata" (JSON of the LoraConfig,
                    keys "unet.lora_alpha", ...); without it alpha = r
    diffusers, older unet.down_blocks...attn1.processor.to_q_lora.down.weight (.up; to_out_lora is to_out.0)
                    unet.down_blocks...to_q.lora.down.weight, text_encoder...mlp.fc1.lora_linear_layer.down.weight

A kohya name is undone by looking it up in a table of the model's own module names with "." replaced by
"_" (the underscore in `to_q` makes the reverse replacement ambiguous); the SGM names come from the
single-file key map (checkpoints/key_map.py). Nothing here touches a model: `read_lora` only returns tensors
and the errors say what was wrong before anything is changed.
"""

from __future__ import annotations

import collections
import json
import re
from dataclasses import dataclass

import torch
from torch import nn

from minidiff.checkpoints.key_map import UNET_PREFIX, unet_key_map
from minidiff.models.lora_adapters import lora_targets

COMPONENTS = ("unet", "text_encoder")


class LoraFormatError(ValueError):
    """A LoRA file minidiff cannot load into this SD 1.5 pipeline; the message names the format and the keys."""


@dataclass
class LoraWeights:
    """One adapted layer: A (`down`), B (`up`), alpha (None: the file does not say), and whether to use rsLoRA."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    use_rslora: bool = False

    @property
    def rank(self) -> int:
        return self.down.shape[0]


# Keys of adapters other than LoRA, and of other base models: (what it is, a regex that finds it).
OTHER_FORMATS = [
    ("LyCORIS LoHa (Hadamard product), not LoRA", re.compile(r"hada_w[12]_[ab]|hada_t[12]")),
    ("LyCORIS LoKr (Kronecker product), not LoRA", re.compile(r"lokr_w[12]|lokr_t[12]")),
    ("DoRA (magnitude vectors), not plain LoRA", re.compile(r"dora_scale|lora_magnitude_vector")),
    ("a LoRA for SDXL (two text encoders)", re.compile(r"^lora_te[12]_|^text_encoder_2\.|^conditioner\.|add_embedding")),
    ("a LoRA for Flux or SD3 (a transformer, no UNet)",
     re.compile(r"^lora_transformer_|^transformer\.|double_blocks|single_blocks|joint_blocks|^diffusion_model\.")),
]


def read_lora(state_dict: dict[str, torch.Tensor], unet: nn.Module, text_encoder: nn.Module | None,
              metadata: dict | None = None) -> tuple[str, dict[str, dict[str, LoraWeights]]]:
    """(format name, {"unet": {module name: LoraWeights}, "text_encoder": {...}}) from a LoRA state dict.

    `metadata`: the JSON of the safetensors header's "lora_adapter_metadata", if any. Raises LoraFormatError
    naming the format and up to ten offending keys for: another adapter type or base model, keys that match no
    layer, an A and B of different rank, tensors whose shape does not fit the layer."""
    if not state_dict:
        raise LoraFormatError("the LoRA state dict is empty")
    for what, pattern in OTHER_FORMATS:
        found = [key for key in state_dict if pattern.search(key)]
        if found:
            raise LoraFormatError(f"this file is {what}; minidiff loads LoRA for SD 1.x only. Offending keys: "
                                  f"{_first_ten(found)}")
    name, parts = _split_keys(state_dict, unet, text_encoder)
    layers = {component: _pair_up(name, entries, metadata_for(metadata, component))
              for component, entries in parts.items() if entries}
    models = {"unet": unet, "text_encoder": text_encoder}
    for component, weights in layers.items():
        _check_shapes(name, component, weights, lora_targets(models[component]))
    return name, layers


def metadata_for(metadata: dict | None, component: str) -> dict | None:
    """The LoraConfig fields saved for one component ("unet.lora_alpha" -> "lora_alpha"), or None."""
    if not metadata:
        return None
    fields = {key.removeprefix(f"{component}."): value for key, value in metadata.items() if key.startswith(f"{component}.")}
    return fields or None


def parse_metadata(raw: str | None) -> dict | None:
    return json.loads(raw) if raw else None


# ----- naming: key -> (component, module name, role) -----

def kohya_names(model: nn.Module, prefix: str) -> dict[str, str]:
    """{kohya name: module name} for every Linear / Conv2d: "lora_unet_" + name with "." -> "_"."""
    return {prefix + name.replace(".", "_"): name for name in lora_targets(model)}


def sgm_names(unet: nn.Module) -> dict[str, str]:
    """{kohya name in the original (SGM / LDM) block names: module name}, e.g. lora_unet_input_blocks_1_1_proj_in."""
    key_map = unet_key_map(dict(unet.config)) if hasattr(unet, "config") else None
    names = {}
    for name in lora_targets(unet) if key_map else ():
        original = key_map.to_original(f"{name}.weight")
        if original is not None:
            module = original.removeprefix(UNET_PREFIX).removesuffix(".weight")
            names["lora_unet_" + module.replace(".", "_")] = name
    return names


KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<role>A|B)(\.[^.]+)?\.weight$")  # lora_A.weight, lora_A.<adapter>.weight
OLD_DIFFUSERS_KEY = re.compile(
    r"^(?P<module>.+?)(\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$")
OLD_LINEAR_KEY = re.compile(r"^(?P<module>.+)\.(lora|lora_linear_layer)\.(?P<role>down|up)\.weight$")
TEXT_ENCODER_PROJECTIONS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _split_keys(state_dict, unet, text_encoder) -> tuple[str, dict[str, dict[str, dict[str, torch.Tensor]]]]:
    """Recognises the format and sorts every tensor as parts[component][module][role] (role: down, up, alpha)."""
    keys = list(state_dict)
    if all(key.startswith(("lora_unet_", "lora_te_")) for key in keys):
        name, locate = "kohya", _kohya_locator(unet, text_encoder)
    elif any(".lora_A." in key or ".lora_B." in key for key in keys):
        name, locate = "diffusers/PEFT", _peft_locator
    elif any(OLD_DIFFUSERS_KEY.match(key) or OLD_LINEAR_KEY.match(key) for key in keys):
        name, locate = "diffusers (attention processors)", _old_diffusers_locator
    else:
        raise LoraFormatError(
            "not a LoRA file minidiff knows (kohya/A1111 'lora_unet_...lora_down.weight', diffusers/PEFT "
            f"'unet....lora_A.weight', or diffusers' older '...to_q_lora.down.weight'). Keys: {_first_ten(keys)}")
    parts = {component: {} for component in COMPONENTS}
    unmatched = []
    targets = {"unet": lora_targets(unet), "text_encoder": lora_targets(text_encoder) if text_encoder is not None else {}}
    for key in keys:
        found = locate(key)
        if found is None:
            unmatched.append(key)
            continue
        component, module, role = found
        if component == "text_encoder" and module not in targets[component] and f"text_model.{module}" in targets[component]:
            module = f"text_model.{module}"  # transformers 5 writes CLIP's names without "text_model."
        if module not in targets[component]:
            unmatched.append(key)
            continue
        parts[component].setdefault(module, {})[role] = state_dict[key]
    if unmatched:
        raise LoraFormatError(
            f"{len(unmatched)} key(s) of this {name} LoRA match no Linear or Conv2d layer of SD 1.5's UNet or text "
            f"encoder (is it for another base model, e.g. SD 2.x or SDXL?): {_first_ten(unmatched)}")
    return name, parts


def _kohya_locator(unet, text_encoder):
    names = {**sgm_names(unet), **kohya_names(unet, "lora_unet_")}
    if text_encoder is not None:
        names.update(kohya_names(text_encoder, "lora_te_"))
        names.update({key.replace("lora_te_text_model_", "lora_te_"): value  # written without "text_model"
                      for key, value in kohya_names(text_encoder, "lora_te_").items()})

    def locate(key: str):
        module, _, role = key.partition(".")
        if module not in names or role not in KOHYA_ROLES:
            return None
        return ("unet" if module.startswith("lora_unet_") else "text_encoder"), names[module], KOHYA_ROLES[role]

    return locate


def _component(key: str) -> tuple[str, str]:
    """("unet" | "text_encoder", the key without its prefix); a key without a prefix is the UNet's (old files)."""
    for component in COMPONENTS:
        if key.startswith(component + "."):
            return component, key[len(component) + 1:]
    return "unet", key


def _peft_locator(key: str):
    component, rest = _component(key)
    match = PEFT_KEY.match(rest)
    if match is None:
        return None
    return component, match["module"], "down" if match["role"] == "A" else "up"


def _old_diffusers_locator(key: str):
    component, rest = _component(key)
    match = OLD_DIFFUSERS_KEY.match(rest)
    if match is not None:
        proj = match["proj"]
        leaf = TEXT_ENCODER_PROJECTIONS[proj] if component == "text_encoder" else ("to_out.0" if proj == "to_out" else proj)
        return component, f"{match['module']}.{leaf}", match["role"]
    match = OLD_LINEAR_KEY.match(rest)
    if match is not None:
        return component, match["module"], match["role"]
    return None


# ----- pairing A with B, and alpha -----

def _pair_up(name: str, entries: dict[str, dict[str, torch.Tensor]], config: dict | None) -> dict[str, LoraWeights]:
    """LoraWeights per module; alpha from the file (kohya's .alpha, PEFT metadata), or as diffusers decides."""
    lonely = [f"{module} ({'no up/B' if 'up' not in roles else 'no down/A'})"
              for module, roles in entries.items() if "up" not in roles or "down" not in roles]
    if lonely:
        raise LoraFormatError(f"this {name} LoRA has layers with only one of the two matrices: {_first_ten(lonely)}")
    mismatched = [f"{module}: A {tuple(roles['down'].shape)}, B {tuple(roles['up'].shape)}"
                  for module, roles in entries.items() if roles["down"].shape[0] != roles["up"].shape[1]]
    if mismatched:
        raise LoraFormatError(f"this {name} LoRA has layers whose A and B disagree on the rank (A's rows must equal "
                              f"B's columns): {_first_ten(mismatched)}")
    alphas = [float(roles["alpha"]) for roles in entries.values() if "alpha" in roles]
    # diffusers (get_peft_kwargs): a layer without its own alpha gets the most common alpha of the file's layers;
    # with no alpha anywhere, alpha = r, i.e. the update is B A unscaled.
    common_alpha = collections.Counter(alphas).most_common(1)[0][0] if alphas else None
    weights = {}
    for module, roles in entries.items():
        down, up = roles["down"], roles["up"]
        alpha = float(roles["alpha"]) if "alpha" in roles else common_alpha
        use_rslora = False
        if config is not None:
            alpha = _from_pattern(module, config.get("alpha_pattern") or {}, config.get("lora_alpha", down.shape[0]))
            use_rslora = bool(config.get("use_rslora", False))
        weights[module] = LoraWeights(down, up, alpha, use_rslora)
    return weights


def _from_pattern(module: str, patterns: dict, default):
    for pattern, value in patterns.items():
        pattern = pattern.removeprefix("^")
        if module == pattern or module.endswith("." + pattern):
            return value
    return default


def _check_shapes(name: str, component: str, weights: dict[str, LoraWeights], targets: dict[str, nn.Module]) -> None:
    """A must be (r, d_in) / (r, d_in, k, k) and B (d_out, r) / (d_out, r, 1, 1) for the layer it adapts."""
    wrong = []
    for module, lora in weights.items():
        layer = targets[module]
        base = getattr(layer, "base_layer", layer)
        if isinstance(base, nn.Linear):
            expected_down, expected_up = (lora.rank, base.in_features), (base.out_features, lora.rank)
        else:
            expected_down = (lora.rank, base.in_channels, *base.kernel_size)
            expected_up = (base.out_channels, lora.rank, 1, 1)
        down, up = tuple(lora.down.shape), tuple(lora.up.shape)
        if isinstance(base, nn.Conv2d) and down == (lora.rank, base.in_channels) and base.kernel_size == (1, 1):
            lora.down, lora.up = lora.down[:, :, None, None], lora.up[:, :, None, None]  # linear-shaped 1x1 conv LoRA
            down, up = expected_down, tuple(lora.up.shape)
        if (down, up) != (expected_down, expected_up):
            wrong.append(f"{component}.{module}: A {down}, B {up}, expected A {expected_down}, B {expected_up}")
    if wrong:
        raise LoraFormatError(
            f"this {name} LoRA does not fit this model's layers (a LoRA for another base? SD 2.x's text width is 1024, "
            f"SDXL's 2048, SD 1.5's 768): {_first_ten(wrong)}")


def _first_ten(items: list[str]) -> str:
    shown = ", ".join(str(item) for item in items[:10])
    return shown + (f", ... ({len(items)} in all)" if len(items) > 10 else "")
