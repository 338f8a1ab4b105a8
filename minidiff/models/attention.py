"""Attention layers: SD's spatial transformer (self- and cross-attention), and the VAE's / DDPM's
single-head spatial self-attention.

All parameter names are diffusers' (`attn1.to_q`, `attn1.to_out.0`, `ff.net.0.proj`, `ff.net.2`,
`proj_in`, `group_norm`, ...), so checkpoints load without renaming.

API (constructor signatures are kept stable; other models build on them):

    Attention(query_dim, cross_attention_dim=None, heads=8, dim_head=64, dropout=0.0, bias=False,
              upcast_attention=False, upcast_softmax=False, out_bias=True, norm_num_groups=None,
              eps=1e-5, rescale_output_factor=1.0, residual_connection=False)
        forward(hidden_states, encoder_hidden_states=None)
          tokens (B, N, query_dim) -> (B, N, query_dim), or a feature map (B, C, H, W) -> (B, C, H, W).
        The VAE / DDPM spatial attention block is this class with
          heads=channels // head_dim, dim_head=head_dim, norm_num_groups=groups, bias=True,
          residual_connection=True, rescale_output_factor=..., upcast_softmax=True
        called on a (B, C, H, W) feature map.
    GEGLU(dim_in, dim_out)                                   # proj -> value * gelu(gate)
    FeedForward(dim, dim_out=None, mult=4, dropout=0.0, activation_fn="geglu")
    BasicTransformerBlock(dim, num_attention_heads, attention_head_dim, dropout=0.0,
                          cross_attention_dim=None, activation_fn="geglu", attention_bias=False,
                          only_cross_attention=False, double_self_attention=False,
                          upcast_attention=False, norm_elementwise_affine=True, norm_eps=1e-5)
        forward(hidden_states, encoder_hidden_states=None)
    Transformer2DModel(num_attention_heads=16, attention_head_dim=88, in_channels=None, out_channels=None,
                       num_layers=1, dropout=0.0, norm_num_groups=32, cross_attention_dim=None,
                       attention_bias=False, activation_fn="geglu", use_linear_projection=False,
                       only_cross_attention=False, double_self_attention=False, upcast_attention=False,
                       norm_elementwise_affine=True, norm_eps=1e-5)
        forward(hidden_states, encoder_hidden_states=None): (B, C, H, W) -> (B, C, H, W)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
    The attention is `torch.nn.functional.scaled_dot_product_attention`.
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
        self.upcast = upcast_attention or upcast_softmax
        self.rescale_output_factor = rescale_output_factor
        self.residual_connection = residual_connection
        context_dim = cross_attention_dim if cross_attention_dim is not None else query_dim

        self.group_norm = None
        if norm_num_groups is not None:
            self.group_norm = nn.GroupNorm(num_groups=norm_num_groups, num_channels=query_dim, eps=eps, affine=True)
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim, bias=out_bias), nn.Dropout(dropout)])

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        residual = hidden_states
        spatial_shape = None
        if hidden_states.ndim == 4:
            batch, channels, height, width = hidden_states.shape
            spatial_shape = hidden_states.shape
            hidden_states = hidden_states.reshape(batch, channels, height * width).transpose(1, 2)  # (B, H*W, C)
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)  # GroupNorm over C

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = self._split_heads(self.to_q(hidden_states))  # (B, heads, N, dim_head)
        key = self._split_heads(self.to_k(context))  # (B, heads, M, dim_head)
        value = self._split_heads(self.to_v(context))  # (B, heads, M, dim_head)

        if self.upcast and query.dtype in (torch.float16, torch.bfloat16):
            attended = F.scaled_dot_product_attention(query.float(), key.float(), value.float()).to(query.dtype)
        else:
            attended = F.scaled_dot_product_attention(query, key, value)  # (B, heads, N, dim_head)
        batch, heads, tokens, dim_head = attended.shape
        attended = attended.transpose(1, 2).reshape(batch, tokens, heads * dim_head)  # (B, N, inner_dim)

        out = self.to_out[1](self.to_out[0](attended))  # (B, N, query_dim)
        if spatial_shape is not None:
            out = out.transpose(1, 2).reshape(spatial_shape)  # (B, C, H, W)
        if self.residual_connection:
            out = out + residual
        return out / self.rescale_output_factor

    def _split_heads(self, tensor: torch.Tensor) -> torch.Tensor:
        batch, tokens, inner_dim = tensor.shape
        return tensor.view(batch, tokens, self.heads, inner_dim // self.heads).transpose(1, 2)


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

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        self_context = encoder_hidden_states if self.only_cross_attention else None
        hidden_states = self.attn1(self.norm1(hidden_states), self_context) + hidden_states
        if self.attn2 is not None:
            hidden_states = self.attn2(self.norm2(hidden_states), encoder_hidden_states) + hidden_states
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

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        residual = hidden_states
        batch, _, height, width = hidden_states.shape
        hidden_states = self.norm(hidden_states)
        if not self.use_linear_projection:
            hidden_states = self.proj_in(hidden_states)  # 1x1 conv: (B, C, H, W) -> (B, inner, H, W)
        hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(batch, height * width, -1)  # (B, H*W, channels)
        if self.use_linear_projection:
            hidden_states = self.proj_in(hidden_states)  # (B, H*W, C) -> (B, H*W, inner)

        for block in self.transformer_blocks:
            hidden_states = block(hidden_states, encoder_hidden_states)

        if self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)  # (B, H*W, inner) -> (B, H*W, C_out)
        # (B, H*W, C) -> (B, C, H, W), in the layout the block was given: for a channels-last map that is this
        # very view (no copy); for a contiguous one, one copy (mixed layouts would slow every later op)
        hidden_states = hidden_states.reshape(batch, height, width, -1).permute(0, 3, 1, 2)
        hidden_states = hidden_states.contiguous(memory_format=_memory_format(residual))
        if not self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)  # (B, inner, H, W) -> (B, C_out, H, W)
        return hidden_states + residual


def _memory_format(feature_map: torch.Tensor) -> torch.memory_format:
    """torch.channels_last if the (B, C, H, W) map is stored channels-last, else torch.contiguous_format."""
    return torch.channels_last if feature_map.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
