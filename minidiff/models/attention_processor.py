"""Attention processors: the function an `Attention` layer calls to do its attention, swappable per layer.

This is diffusers' design (and its names), so that the attention maps of SD can be read and edited, as
prompt-to-prompt (Hertz et al. 2022, arXiv 2208.01626) and DAAM (Tang et al. 2022, arXiv 2210.04885) do:

    class StoreCrossAttention(AttnProcessor):
        def __init__(self):
            self.maps = []
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
            if attn.is_cross_attention:
                query = attn.head_to_batch_dim(attn.to_q(hidden_states))           # (B*heads, H*W, dim_head)
                key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))     # (B*heads, 77, dim_head)
                self.maps.append(attn.get_attention_scores(query, key))           # (B*heads, H*W, 77)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    unet.set_attn_processor(StoreCrossAttention())

A processor is called as `processor(attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
temb=None, **cross_attention_kwargs)`, with `attn` the `Attention` module (models/attention.py), whose
attributes and helpers carry diffusers' names: `to_q`, `to_k`, `to_v`, `to_out`, `heads`, `scale`,
`is_cross_attention`, `group_norm`, `residual_connection`, `rescale_output_factor`, `head_to_batch_dim`,
`batch_to_head_dim`, `get_attention_scores`, `prepare_attention_mask`. A processor written for diffusers
against those names (diffusers' own `AttnProcessor` included) runs on minidiff's layers unchanged.

`AttentionMixin` gives a model diffusers' `attn_processors`, `set_attn_processor` and
`set_default_attn_processor`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AttnProcessor:
    """The default: multi-head attention (Vaswani et al. 2017, arXiv 1706.03762, eq. 1) through
    `torch.nn.functional.scaled_dot_product_attention`, which never writes out the (N, M) probabilities.

        Q = to_q(x),  K = to_k(c),  V = to_v(c)          c = encoder_hidden_states, or x itself
        head_h = softmax(Q_h K_h^T / sqrt(dim_head)) V_h
        out = to_out(concat_h head_h)  [+ x]  / rescale_output_factor

    A subclass that needs the probabilities computes them with `attn.get_attention_scores` (see the
    module docstring); diffusers calls this SDPA processor `AttnProcessor2_0` (an alias below).
    """

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        spatial_shape = None
        if hidden_states.ndim == 4:
            batch, channels, height, width = hidden_states.shape
            spatial_shape = hidden_states.shape
            hidden_states = hidden_states.reshape(batch, channels, height * width).transpose(1, 2)  # (B, H*W, C)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)  # GroupNorm over C

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = split_heads(attn.to_q(hidden_states), attn.heads)  # (B, heads, N, dim_head)
        key = split_heads(attn.to_k(context), attn.heads)  # (B, heads, M, dim_head)
        value = split_heads(attn.to_v(context), attn.heads)  # (B, heads, M, dim_head)
        if attention_mask is not None:
            # (B, 1 or N, M) additive mask -> (B, heads, 1 or N, M)
            attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[2], query.shape[0])
            attention_mask = attention_mask.view(query.shape[0], attn.heads, -1, attention_mask.shape[-1])

        # The upcast flags (the VAE's upcast_softmax, SD 2.x's upcast_attention) are honoured in bfloat16 only,
        # whose 8-bit mantissa is minidiff's CPU fast path (docs/performance.md). In float16 this is diffusers'
        # AttnProcessor2_0, which leaves them to scaled_dot_product_attention (fp32 accumulation inside its GPU
        # kernels), so float16 results are diffusers' to the bit; docs/gpu.md lists where each library upcasts.
        upcast = attn.upcast_attention or attn.upcast_softmax
        if upcast and query.dtype == torch.bfloat16:
            mask = None if attention_mask is None else attention_mask.float()
            attended = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), attn_mask=mask)
            attended = attended.to(query.dtype)
        else:
            attended = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)  # (B, heads, N, dim_head)
        batch, heads, tokens, dim_head = attended.shape
        attended = attended.transpose(1, 2).reshape(batch, tokens, heads * dim_head)  # (B, N, inner_dim)

        out = attn.to_out[1](attn.to_out[0](attended))  # linear, dropout: (B, N, query_dim)
        if spatial_shape is not None:
            out = out.transpose(1, 2).reshape(spatial_shape)  # (B, C, H, W)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


# diffusers' name for its scaled_dot_product_attention processor, which is minidiff's default.
AttnProcessor2_0 = AttnProcessor


def split_heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads * dim_head) -> (B, heads, N, dim_head), the layout scaled_dot_product_attention takes."""
    batch, tokens, inner_dim = tensor.shape
    return tensor.view(batch, tokens, heads, inner_dim // heads).transpose(1, 2)


class AttentionMixin:
    """diffusers' model-level processor API (its `AttentionMixin`), for a module tree holding `Attention` layers.

    The processors are keyed by the module path of their layer plus ".processor", e.g.
    `down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor` (attn1: self-, attn2: cross-attention).
    """

    @property
    def attn_processors(self) -> dict:
        """{"<path of the Attention layer>.processor": its processor}, in module order."""
        return {
            f"{name}.processor": module.get_processor()
            for name, module in self.named_modules()
            if name and hasattr(module, "get_processor")
        }

    def set_attn_processor(self, processor) -> None:
        """Give every Attention layer `processor` (one object shared by all), or a dict with exactly one
        processor per layer, keyed as `attn_processors`."""
        layers = {name: module for name, module in self.named_modules() if name and hasattr(module, "set_processor")}
        if not isinstance(processor, dict):
            for module in layers.values():
                module.set_processor(processor)
            return
        expected = {f"{name}.processor" for name in layers}
        missing, unknown = sorted(expected - set(processor)), sorted(set(processor) - expected)
        if len(processor) != len(expected) or missing or unknown:
            raise ValueError(
                f"A dict of processors was passed with {len(processor)} entries, but {type(self).__name__} has "
                f"{len(expected)} attention layers; give one processor per layer, keyed as model.attn_processors. "
                f"Missing keys: {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                f"unknown keys: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
            )
        for name, module in layers.items():
            module.set_processor(processor[f"{name}.processor"])

    def set_default_attn_processor(self) -> None:
        """Back to the default processor (`AttnProcessor`: scaled_dot_product_attention) in every layer.

        diffusers' method puts its non-SDPA `AttnProcessor` there (the same attention, with the probabilities
        written out), and refuses to when a layer has a processor of a kind it does not know; this one always
        restores minidiff's default."""
        self.set_attn_processor(AttnProcessor())
