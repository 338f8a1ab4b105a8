"""Attention layers: SD's spatial transformer (self- and cross-attention), and the VAE's / DDPM's
single-head spatial self-attention.

All parameter names are diffusers' (`attn1.to_q`, `attn1.to_out.0`, `ff.net.0.proj`, `ff.net.2`,
`proj_in`, `group_norm`, ...), so checkpoints load without renaming.

API (constructor signatures are kept stable; other models build on them):

    Attention(query_dim, cross_attention_dim=None, heads=8, dim_head=64, dropout=0.0, bias=False,
              upcast_attention=False, upcast_softmax=False, out_bias=True, norm_num_groups=None,
              eps=1e-5, rescale_output_factor=1.0, residual_connection=False)
        forward(hidden_states, encoder_hidden_states=None, attention_mask=None, **cross_attention_kwargs)
          tokens (B, N, query_dim) -> (B, N, query_dim), or a feature map (B, C, H, W) -> (B, C, H, W).
        The VAE / DDPM spatial attention block is this class with
          heads=channels // head_dim, dim_head=head_dim, norm_num_groups=groups, bias=True,
          residual_connection=True, rescale_output_factor=..., upcast_softmax=True
        called on a (B, C, H, W) feature map.
        set_processor(processor) / get_processor(): the function doing the attention (attention_processor.py);
        head_to_batch_dim, batch_to_head_dim, get_attention_scores, prepare_attention_mask: diffusers' helpers.
    GEGLU(dim_in, dim_out)                                   # proj -> value * gelu(gate)
    FeedForward(dim, dim_out=None, mult=4, dropout=0.0, activation_fn="geglu")
    BasicTransformerBlock(dim, num_attention_heads, attention_head_dim, dropout=0.0,
                          cross_attention_dim=None, activation_fn="geglu", attention_bias=False,
                          only_cross_attention=False, double_self_attention=False,
                          upcast_attention=False, norm_elementwise_affine=True, norm_eps=1e-5)
        forward(hidden_states, encoder_hidden_states=None, cross_attention_kwargs=None)
    Transformer2DModel(num_attention_heads=16, attention_head_dim=88, in_channels=None, out_channels=None,
                       num_layers=1, dropout=0.0, norm_num_groups=32, cross_attention_dim=None,
                       attention_bias=False, activation_fn="geglu", use_linear_projection=False,
                       only_cross_attention=False, double_self_attention=False, upcast_attention=False,
                       norm_elementwise_affine=True, norm_eps=1e-5)
        forward(hidden_states, encoder_hidden_states=None, cross_attention_kwargs=None): (B, C, H, W) -> (B, C, H, W)
"""

from __future__ import annotations

import inspect
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.models.attention_processor import AttnProcessor, split_heads
from minidiff.models.layers import checkpointed
from minidiff.utils.cpu import conv_memory_format
from minidiff.utils.device import is_cpu


class Attention(nn.Module):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017, eq. 1), as SD and its VAE use it:

        Q = to_q(x),  K = to_k(c),  V = to_v(c)          c = encoder_hidden_states, or x itself
        head_h = softmax(Q_h K_h^T / sqrt(dim_head)) V_h  for each of `heads` heads
        out = to_out(concat_h head_h)

    Self-attention when `encoder_hidden_states` is None, cross-attention (on CLIP's text tokens)
    otherwise. A (B, C, H, W) input is attended over its H*W positions, with an optional GroupNorm
    first (`norm_num_groups`), an optional residual (`residual_connection`) and a final division
    by `rescale_output_factor`: that is the spatial attention block of the VAE and of DDPM.

    `upcast_attention` / `upcast_softmax` compute the attention itself in float32 when the weights
    are half precision (SD 2.1 overflows in fp16 otherwise); at float32 they change nothing.

    The computation itself is done by `self.processor` (attention_processor.py; by default `AttnProcessor`,
    torch's scaled_dot_product_attention); `set_processor` swaps it, e.g. for one that records the
    attention maps. The helpers below are diffusers' names, for processors to build on.
    """

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        bias: bool = False,
        upcast_attention: bool = False,
        upcast_softmax: bool = False,
        out_bias: bool = True,
        norm_num_groups: int | None = None,
        eps: float = 1e-5,
        rescale_output_factor: float = 1.0,
        residual_connection: bool = False,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.scale = dim_head**-0.5  # the 1 / sqrt(d_k) of eq. 1
        self.is_cross_attention = cross_attention_dim is not None
        self.upcast_attention = upcast_attention
        self.upcast_softmax = upcast_softmax
        self.rescale_output_factor = rescale_output_factor
        self.residual_connection = residual_connection
        context_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        # diffusers' Attention options SD does not use, kept as None/False so that its processors run here unchanged
        self.spatial_norm = self.norm_q = self.norm_k = None
        self.norm_cross = False

        self.group_norm = None
        if norm_num_groups is not None:
            self.group_norm = nn.GroupNorm(num_groups=norm_num_groups, num_channels=query_dim, eps=eps, affine=True)
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim, bias=out_bias), nn.Dropout(dropout)])
        self.processor = AttnProcessor()

    def set_processor(self, processor) -> None:
        """Use `processor` for this layer's attention (any callable with AttnProcessor's signature)."""
        if not callable(processor):
            raise TypeError(f"an attention processor must be callable as processor(attn, hidden_states, ...), got {processor!r}")
        if "processor" in self._modules and not isinstance(processor, nn.Module):
            del self._modules["processor"]  # a trainable (nn.Module) processor was registered as a submodule
        self.processor = processor

    def get_processor(self):
        return self.processor

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **cross_attention_kwargs,
    ) -> torch.Tensor:
        """tokens (B, N, query_dim) -> (B, N, query_dim), or a feature map (B, C, H, W) -> (B, C, H, W).

        `cross_attention_kwargs` go on to the processor; as in diffusers, only those its `__call__` names are
        passed, and the others are ignored with a warning.
        """
        if cross_attention_kwargs:
            accepted = inspect.signature(self.processor.__call__).parameters
            ignored = [name for name in cross_attention_kwargs if name not in accepted]
            if ignored:
                warnings.warn(f"cross_attention_kwargs {ignored} are not expected by "
                              f"{type(self.processor).__name__} and are ignored", stacklevel=2)
            cross_attention_kwargs = {name: value for name, value in cross_attention_kwargs.items() if name in accepted}
        return self.processor(self, hidden_states, encoder_hidden_states=encoder_hidden_states,
                              attention_mask=attention_mask, **cross_attention_kwargs)

    # ----- helpers for processors (diffusers' names and shapes) -----

    def head_to_batch_dim(self, tensor: torch.Tensor, out_dim: int = 3) -> torch.Tensor:
        """(B, N, heads * dim_head) -> (B * heads, N, dim_head), or (B, heads, N, dim_head) with out_dim=4."""
        tensor = split_heads(tensor, self.heads)  # (B, heads, N, dim_head)
        if out_dim == 3:
            batch, heads, tokens, dim_head = tensor.shape
            tensor = tensor.reshape(batch * heads, tokens, dim_head)
        return tensor

    def batch_to_head_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """(B * heads, N, dim_head) -> (B, N, heads * dim_head): the inverse of head_to_batch_dim."""
        batch_heads, tokens, dim_head = tensor.shape
        tensor = tensor.reshape(batch_heads // self.heads, self.heads, tokens, dim_head).permute(0, 2, 1, 3)
        return tensor.reshape(batch_heads // self.heads, tokens, self.heads * dim_head)

    def get_attention_scores(self, query: torch.Tensor, key: torch.Tensor,
                             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The attention probabilities softmax(Q K^T * scale [+ mask]) (eq. 1), each row summing to 1 over the
        M keys: query (B * heads, N, dim_head), key (B * heads, M, dim_head) -> (B * heads, N, M).
        Computed in float32 with upcast_attention / upcast_softmax, returned in the query's dtype."""
        dtype = query.dtype
        if self.upcast_attention:
            query, key = query.float(), key.float()
        scores = torch.bmm(query, key.transpose(-1, -2)) * self.scale  # (B * heads, N, M)
        if attention_mask is not None:
            scores = scores + attention_mask
        if self.upcast_softmax:
            scores = scores.float()
        return scores.softmax(dim=-1).to(dtype)

    def prepare_attention_mask(self, attention_mask: torch.Tensor | None, target_length: int, batch_size: int,
                               out_dim: int = 3) -> torch.Tensor | None:
        """An additive mask (B, 1 or N, M) repeated for the heads: (B * heads, 1 or N, M), or with out_dim=4
        (B, heads, 1 or N, M). None stays None."""
        if attention_mask is None:
            return None
        if attention_mask.shape[-1] != target_length:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} keys but the attention has "
                             f"{target_length}; give a mask of shape (B, 1 or N, {target_length})")
        if out_dim == 4:
            return attention_mask.unsqueeze(1).repeat_interleave(self.heads, dim=1)
        if attention_mask.shape[0] < batch_size * self.heads:
            attention_mask = attention_mask.repeat_interleave(self.heads, dim=0)
        return attention_mask


class GEGLU(nn.Module):
    """The gated GELU of Shazeer 2020 (arXiv 2002.05202): GEGLU(x) = (x W + b) * GELU(x V + c).

    One linear layer `proj` computes both halves: (B, N, dim_in) -> (B, N, 2*dim_out) -> (B, N, dim_out).
    """

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(hidden_states).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """The transformer's position-wise MLP: net = [GEGLU(dim -> mult*dim), Dropout, Linear(mult*dim -> dim)]."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, dropout: float = 0.0,
                 activation_fn: str = "geglu"):
        super().__init__()
        if activation_fn != "geglu":
            raise NotImplementedError(
                f"FeedForward supports activation_fn='geglu' (SD 1.x/2.x), got {activation_fn!r}"
            )
        inner_dim = int(dim * mult)
        self.net = nn.ModuleList([GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim_out or dim)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for module in self.net:
            hidden_states = module(hidden_states)
        return hidden_states


class BasicTransformerBlock(nn.Module):
    """One pre-norm transformer layer of SD's spatial transformer (LDM, Rombach et al. 2022, appendix):

        x = attn1(norm1(x)) + x          self-attention over the H*W latent positions
        x = attn2(norm2(x), c) + x       cross-attention to the text tokens c (B, 77, cross_attention_dim)
        x = ff(norm3(x)) + x             GEGLU feed-forward

    `only_cross_attention` makes attn1 a cross-attention too; without `cross_attention_dim`
    (and without `double_self_attention`) there is no attn2.
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        dropout: float = 0.0,
        cross_attention_dim: int | None = None,
        activation_fn: str = "geglu",
        attention_bias: bool = False,
        only_cross_attention: bool = False,
        double_self_attention: bool = False,
        upcast_attention: bool = False,
        norm_elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        attention = dict(heads=num_attention_heads, dim_head=attention_head_dim, dropout=dropout,
                         bias=attention_bias, upcast_attention=upcast_attention)

        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.attn1 = Attention(dim, cross_attention_dim if only_cross_attention else None, **attention)
        self.norm2 = self.attn2 = None
        if cross_attention_dim is not None or double_self_attention:
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
            self.attn2 = Attention(dim, None if double_self_attention else cross_attention_dim, **attention)
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.ff = FeedForward(dim, dropout=dropout, activation_fn=activation_fn)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                cross_attention_kwargs: dict | None = None) -> torch.Tensor:
        kwargs = cross_attention_kwargs or {}  # handed to both attention layers' processors, as in diffusers
        self_context = encoder_hidden_states if self.only_cross_attention else None
        hidden_states = self.attn1(self.norm1(hidden_states), self_context, **kwargs) + hidden_states
        if self.attn2 is not None:
            hidden_states = self.attn2(self.norm2(hidden_states), encoder_hidden_states, **kwargs) + hidden_states
        return self.ff(self.norm3(hidden_states)) + hidden_states


class Transformer2DModel(nn.Module):
    """SD's spatial transformer: a feature map becomes H*W tokens, goes through `num_layers`
    BasicTransformerBlocks, and is turned back and added to its input.

        h = proj_in(norm(x))                  GroupNorm(eps=1e-6), then a 1x1 conv (SD 1.x) or a linear
                                              layer on the tokens (SD 2.x, `use_linear_projection`)
        h = transformer_blocks(h, c)          (B, H*W, heads*head_dim)
        out = proj_out(h) + x                 back to (B, C, H, W)
    """

    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 88,
        in_channels: int | None = None,
        out_channels: int | None = None,
        num_layers: int = 1,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        cross_attention_dim: int | None = None,
        attention_bias: bool = False,
        activation_fn: str = "geglu",
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        double_self_attention: bool = False,
        upcast_attention: bool = False,
        norm_elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if in_channels is None:
            raise ValueError("Transformer2DModel needs in_channels (the channels of the feature map it attends over)")
        out_channels = out_channels or in_channels
        inner_dim = num_attention_heads * attention_head_dim
        self.use_linear_projection = use_linear_projection

        self.norm = nn.GroupNorm(num_groups=norm_num_groups, num_channels=in_channels, eps=1e-6, affine=True)
        if use_linear_projection:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim,
                num_attention_heads,
                attention_head_dim,
                dropout=dropout,
                cross_attention_dim=cross_attention_dim,
                activation_fn=activation_fn,
                attention_bias=attention_bias,
                only_cross_attention=only_cross_attention,
                double_self_attention=double_self_attention,
                upcast_attention=upcast_attention,
                norm_elementwise_affine=norm_elementwise_affine,
                norm_eps=norm_eps,
            )
            for _ in range(num_layers)
        )
        if use_linear_projection:
            self.proj_out = nn.Linear(inner_dim, out_channels)
        else:
            self.proj_out = nn.Conv2d(inner_dim, out_channels, kernel_size=1, stride=1, padding=0)
        self.gradient_checkpointing = False  # set by the model's enable_gradient_checkpointing()

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                cross_attention_kwargs: dict | None = None) -> torch.Tensor:
        residual = hidden_states
        batch, _, height, width = hidden_states.shape
        hidden_states = self.norm(hidden_states)
        if not self.use_linear_projection:
            hidden_states = self.proj_in(hidden_states)  # 1x1 conv: (B, C, H, W) -> (B, inner, H, W)
        hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(batch, height * width, -1)  # (B, H*W, channels)
        if self.use_linear_projection:
            hidden_states = self.proj_in(hidden_states)  # (B, H*W, C) -> (B, H*W, inner)

        for block in self.transformer_blocks:
            hidden_states = checkpointed(self.gradient_checkpointing, block, hidden_states, encoder_hidden_states,
                                         cross_attention_kwargs)

        if self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)  # (B, H*W, inner) -> (B, H*W, C_out)
        # (B, H*W, C) -> (B, C, H, W): contiguous, as diffusers, except in a channels-last CPU UNet, where the
        # channels-last view needs no copy (_memory_format)
        hidden_states = hidden_states.reshape(batch, height, width, -1).permute(0, 3, 1, 2)
        hidden_states = hidden_states.contiguous(memory_format=_memory_format(residual))
        if not self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)  # (B, inner, H, W) -> (B, C_out, H, W)
        return hidden_states + residual


def _memory_format(feature_map: torch.Tensor) -> torch.memory_format:
    """The layout of a transformer's output map: channels-last only for a channels-last map on a CPU whose UNet
    runs channels-last in this dtype (`conv_memory_format`: bfloat16), else contiguous, as diffusers' `.contiguous()`.

    The layout decides the numbers: on channels-last float16 maps (img2img latents keep the PIL array's layout)
    the CPU's GroupNorm sums in another order than on contiguous ones, and PNDM's sums carried that 1e-3 to 3e-2.
    """
    channels_last = feature_map.is_contiguous(memory_format=torch.channels_last)
    if channels_last and is_cpu(feature_map.device) and conv_memory_format("unet", feature_map.dtype) == torch.channels_last:
        return torch.channels_last
    return torch.contiguous_format
