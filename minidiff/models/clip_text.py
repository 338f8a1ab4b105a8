"""CLIP's text transformer: the text encoder of Stable Diffusion 1.x.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision", section 2.4:
the text encoder is a GPT-2-style transformer (Radford et al. 2019): pre-LayerNorm blocks and masked
(causal) self-attention, so token i only sees tokens 0..i. For ids x_0..x_{L-1} (L <= 77):

    h^0_i   = E_token[x_i] + E_position[i]                                     token + position embeddings
    a^l     = h^{l-1} + SelfAttention_causal(LayerNorm_1(h^{l-1}))              for each layer l = 1..N
    h^l     = a^l + fc2(act(fc1(LayerNorm_2(a^l))))                             act = quick_gelu or gelu
    out     = LayerNorm_final(h^N)                                              last_hidden_state, (B, L, D)
    pooled  = out[at the <|endoftext|> token]                                   pooler_output, (B, D)

Stable Diffusion conditions its UNet on `out` (all 77 tokens, D = 768), not on the pooled vector.
quick_gelu(x) = x * sigmoid(1.702 x) is the sigmoid approximation of GELU (Hendrycks & Gimpel 2016)
that OpenAI's CLIP was trained with.

Config fields are transformers' `CLIPTextConfig` names, so a `text_encoder/config.json` reads as it is;
`dropout`, `initializer_range`, `initializer_factor` and `projection_dim` are accepted and kept but not
used (minidiff runs the encoder, it does not train it; the projection belongs to CLIPTextModelWithProjection).
Parameter names are those of SD 1.5's `text_encoder/model.safetensors`
(`text_model.encoder.layers.0.self_attn.q_proj.weight`, ...). See `CLIPTextModel.checkpoint_to_module_keys`
for the other layouts that load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from minidiff.checkpoints.errors import CheckpointError
from minidiff.configuration import register_to_config
from minidiff.models.modeling import ModelMixin
from minidiff.utils.outputs import BaseOutput

HIDDEN_ACTIVATIONS = ("quick_gelu", "gelu")
PREFIX = "text_model."
# The three top-level modules of the text transformer: how a state dict's keys start, with or without PREFIX.
TOP_LEVEL_MODULES = ("embeddings.", "encoder.", "final_layer_norm.")
# A constant buffer (arange(77)) that transformers < 4.31 saved into checkpoints; minidiff computes it (the
# `position_ids` property of CLIPTextEmbeddings).
POSITION_IDS_KEY = "text_model.embeddings.position_ids"


@dataclass
class BaseModelOutput(BaseOutput):
    """What `text_model.encoder` returns (transformers' name): `output[0]` / `.last_hidden_state` is the last layer's
    output (B, L, D), before the final LayerNorm; `.hidden_states` (its input + each layer's output) only with
    `output_hidden_states=True`."""

    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class BaseModelOutputWithPooling(BaseOutput):
    """What the text encoder returns (transformers' name): `output[0]` / `.last_hidden_state` is (B, L, D),
    `output[1]` / `.pooler_output` is (B, D); `.hidden_states` (embeddings + each layer, each (B, L, D))
    only with `output_hidden_states=True`."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): CLIP's approximation of GELU(x) = x * Phi(x)."""
    return x * torch.sigmoid(1.702 * x)


class CLIPTextEmbeddings(nn.Module):
    """h^0_i = E_token[x_i] + E_position[i]: (B, L) ids -> (B, L, D)."""

    def __init__(self, vocab_size: int, hidden_size: int, max_position_embeddings: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, hidden_size)
        self.position_embedding = nn.Embedding(max_position_embeddings, hidden_size)

    @property
    def position_ids(self) -> torch.Tensor:
        """(1, max_position_embeddings) int64: [[0, 1, ..., 76]], on the embeddings' device.

        transformers keeps this as a non-persistent buffer; here it is computed when read (so it is never
        left on the meta device by loading, and never in `state_dict()`), with the same shape, dtype and values.
        """
        positions = self.position_embedding.num_embeddings
        return torch.arange(positions, device=self.position_embedding.weight.device)[None]  # (1, 77)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (B, L), or their embeddings `inputs_embeds` (B, L, D), plus the position embeddings."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, L) and inputs_embeds (B, L, D)")
        length = input_ids.shape[-1] if input_ids is not None else inputs_embeds.shape[-2]
        if length > self.position_embedding.num_embeddings:
            raise ValueError(f"the text encoder reads at most {self.position_embedding.num_embeddings} tokens, got {length}")
        if position_ids is None:
            position_ids = self.position_ids[:, :length]  # (1, L)
        if inputs_embeds is None:
            inputs_embeds = self.token_embedding(input_ids)  # (B, L, D)
        return inputs_embeds + self.position_embedding(position_ids)  # (B, L, D)


class CLIPAttention(nn.Module):
    """Multi-head self-attention (Vaswani et al. 2017, eq. 1), causal in the text encoder:

        head_h = softmax(Q_h K_h^T / sqrt(head_dim) + M) V_h,    M_ij = -inf where key j is hidden from query i
        out    = out_proj(concat_h head_h)
    """

    def __init__(self, hidden_size: int, num_attention_heads: int, attention_dropout: float = 0.0):
        super().__init__()
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a multiple of num_attention_heads ({num_attention_heads})"
            )
        self.num_heads = num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.attention_dropout = attention_dropout
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, D) -> (B, L, D). `attention_mask`: M, an additive (B, 1, L, L) float mask (0 = seen, a large
        negative number = hidden), or a (B, 1, L, L) bool mask (True = seen), or None for no mask at all."""
        batch, length, _ = hidden_states.shape

        def split_heads(x: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, heads, L, head_dim)
            return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        query = split_heads(self.q_proj(hidden_states))
        key = split_heads(self.k_proj(hidden_states))
        value = split_heads(self.v_proj(hidden_states))
        dropout = self.attention_dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout)
        attended = attended.transpose(1, 2).reshape(batch, length, -1)  # (B, L, D): heads concatenated
        return self.out_proj(attended)


class CLIPMLP(nn.Module):
    """The position-wise feed-forward network: fc2(act(fc1(x))), D -> intermediate_size -> D."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.activation = quick_gelu if hidden_act == "quick_gelu" else F.gelu
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(hidden_states)))


class CLIPEncoderLayer(nn.Module):
    """One pre-LN transformer block: a = h + Attention(LN_1(h)); h' = a + MLP(LN_2(a))."""

    def __init__(self, hidden_size, intermediate_size, num_attention_heads, hidden_act, layer_norm_eps, attention_dropout):
        super().__init__()
        self.self_attn = CLIPAttention(hidden_size, num_attention_heads, attention_dropout)
        self.layer_norm1 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.mlp = CLIPMLP(hidden_size, intermediate_size, hidden_act)
        self.layer_norm2 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states), attention_mask)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class CLIPEncoder(nn.Module):
    """The stack of N encoder layers: h^l = layer_l(h^{l-1}) for l = 1..N (no final LayerNorm here).

    Called on its own, it takes transformers' keyword arguments, so that code which feeds it hand-made
    input embeddings (fast.ai's "Stable Diffusion Deep Dive") runs unchanged:

        mask = text_encoder.text_model._build_causal_attention_mask(batch, length, dtype=embeddings.dtype)
        out = text_encoder.text_model.encoder(inputs_embeds=embeddings, causal_attention_mask=mask)
        text_embeddings = text_encoder.text_model.final_layer_norm(out[0])   # == text_encoder(ids)[0]

    Both masks are additive (B, 1, L, L) float masks (0 = seen, finfo.min = hidden) and are summed, as in
    transformers; with no mask at all every token sees every other one (the encoder itself is not causal:
    the causal mask is what makes CLIP's text transformer a GPT-2-style one).
    """

    def __init__(self, num_hidden_layers: int, **layer_arguments):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(**layer_arguments) for _ in range(num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        causal_attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutput | tuple:
        """(B, L, D) embeddings -> last_hidden_state (B, L, D), and every layer's input/output if asked."""
        if output_attentions:
            raise NotImplementedError(
                "minidiff's CLIP encoder does not return attention maps (it runs torch's fused attention); "
                "pass output_attentions=None or False"
            )
        mask = _combined_mask(attention_mask, causal_attention_mask, inputs_embeds.shape)
        hidden_states = inputs_embeds
        all_hidden_states = [hidden_states]
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # recompute the layer's activations in the backward pass instead of keeping them
                hidden_states = torch.utils.checkpoint.checkpoint(layer, hidden_states, mask, use_reentrant=False)
            else:
                hidden_states = layer(hidden_states, mask)  # (B, L, D)
            all_hidden_states.append(hidden_states)
        output = BaseModelOutput(hidden_states, tuple(all_hidden_states) if output_hidden_states else None)
        return output if return_dict is None or return_dict else output.to_tuple()


def _combined_mask(attention_mask, causal_attention_mask, shape: torch.Size) -> torch.Tensor | None:
    """One mask for scaled_dot_product_attention: the sum of the additive masks given (or the one given).

    A single bool mask (True = seen) is passed on as it is: `CLIPTextModel.forward` gives one when prompts
    are padded, so that a query with no visible key gets a zero output as in transformers.
    """
    masks = [mask for mask in (attention_mask, causal_attention_mask) if mask is not None]
    batch, length = shape[0], shape[1]
    for mask in masks:
        if mask.dim() != 4 or mask.shape[1] != 1 or tuple(mask.shape[2:]) != (length, length) or mask.shape[0] not in (1, batch):
            raise ValueError(
                f"attention masks must have shape (batch, 1, {length}, {length}) for inputs_embeds of shape "
                f"{tuple(shape)}, got {tuple(mask.shape)}; build the causal one with "
                "text_model._build_causal_attention_mask(batch, length, dtype=...)"
            )
    if not masks:
        return None
    if len(masks) == 1:
        return masks[0]
    if masks[0].dtype == torch.bool or masks[1].dtype == torch.bool:
        raise ValueError("pass both masks as additive float masks (0 = seen, torch.finfo(dtype).min = hidden)")
    return masks[0] + masks[1]


class CLIPTextTransformer(nn.Module):
    """Embeddings, the encoder layers and the final LayerNorm: the `text_model.` of the checkpoint keys.

    `CLIPTextModel.forward` runs them, so the whole pass reads in one place.
    """

    def __init__(self, config):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config.vocab_size, config.hidden_size, config.max_position_embeddings)
        self.encoder = CLIPEncoder(
            config.num_hidden_layers,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_attention_heads=config.num_attention_heads,
            hidden_act=config.hidden_act,
            layer_norm_eps=config.layer_norm_eps,
            attention_dropout=config.attention_dropout,
        )
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @staticmethod
    def _build_causal_attention_mask(
        batch_size: int, length: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """M, the additive causal mask (B, 1, L, L): 0 where key j <= query i, torch.finfo(dtype).min above the
        diagonal (key j in the future of query i).

        The same tensor as old transformers' `text_model._build_causal_attention_mask(bsz, seq_len, dtype)`
        and current transformers' `_create_4d_causal_attention_mask((bsz, seq_len), dtype, device)`
        (transformers.modeling_attn_mask_utils); pass it to `text_model.encoder(causal_attention_mask=...)`.
        """
        mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)  # (L, L)
        return mask[None, None].expand(batch_size, 1, length, length)  # (B, 1, L, L)


class CLIPTextModel(ModelMixin):
    """The CLIP text encoder (module docstring), loadable from SD 1.5's `text_encoder/` folder:

        text_encoder = CLIPTextModel.from_pretrained("path/to/stable-diffusion-v1-5", subfolder="text_encoder")
        text_embeddings = text_encoder(input_ids)[0]          # (B, 77) ids -> (B, 77, 768)

    Textual inversion (Gal et al. 2022, arXiv:2208.01618) trains new rows of E_token: after
    `tokenizer.add_tokens`, `resize_token_embeddings(len(tokenizer))` and `get_input_embeddings()`; see also
    minidiff/loaders/textual_inversion.py. Hand-made input embeddings go through `text_model.encoder` (CLIPEncoder).

    Defaults are transformers' `CLIPTextConfig` defaults (so a config that leaves a key out means the
    same here as there); SD 1.5's config sets hidden_size 768, intermediate_size 3072, 12 heads.
    """

    weights_names = ["model.safetensors", "pytorch_model.bin"]
    _quiet_keys = (*ModelMixin._quiet_keys, "model_type")

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 49408,
        hidden_size: int = 512,
        intermediate_size: int = 2048,
        projection_dim: int = 512,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 8,
        max_position_embeddings: int = 77,
        hidden_act: str = "quick_gelu",
        layer_norm_eps: float = 1e-5,
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
        initializer_range: float = 0.02,
        initializer_factor: float = 1.0,
        pad_token_id: int = 1,
        bos_token_id: int = 49406,
        eos_token_id: int = 49407,
    ):
        super().__init__()
        if hidden_act not in HIDDEN_ACTIVATIONS:
            raise ValueError(f"hidden_act {hidden_act!r} is not supported; expected one of {HIDDEN_ACTIVATIONS}")
        self.text_model = CLIPTextTransformer(self.config)

    # ----- loading -----

    @classmethod
    def checkpoint_to_module_keys(cls, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Accepts the two layouts CLIP text encoders are saved in, and drops the stale `position_ids` buffer.

        - `text_model.embeddings.token_embedding.weight`: SD 1.5's `text_encoder/model.safetensors`
          (transformers 4), used as it is.
        - `embeddings.token_embedding.weight`: what transformers 5's `save_pretrained` writes; `text_model.`
          is prepended.
        - `text_model.embeddings.position_ids` (in files from transformers < 4.31) only holds arange(77),
          which `CLIPTextEmbeddings.forward` computes; it is dropped. (Some merged community checkpoints
          carry a damaged float copy of it; computing the positions sidesteps that.) Any other unknown key
          is reported by the strict check that follows.
        """
        has_prefix = any(key.startswith(PREFIX) for key in state_dict)
        lacks_prefix = any(key.startswith(TOP_LEVEL_MODULES) for key in state_dict)
        if lacks_prefix and not has_prefix:
            state_dict = {PREFIX + key: value for key, value in state_dict.items()}
        elif not has_prefix:
            example = next(iter(state_dict), "(the file is empty)")
            hint = " (an original single-file checkpoint: load it with from_single_file)" if "cond_stage_model" in example else ""
            raise CheckpointError(
                f"this is not a CLIP text encoder state dict: expected keys like "
                f"'text_model.embeddings.token_embedding.weight' (Stable Diffusion's text_encoder/ folder) or "
                f"'embeddings.token_embedding.weight' (transformers 5 save_pretrained), found e.g. {example!r}{hint}"
            )
        return {key: value for key, value in state_dict.items() if key != POSITION_IDS_KEY}

    # ----- the token embeddings (textual inversion) -----

    def get_input_embeddings(self) -> nn.Embedding:
        """E_token, the (vocab_size, D) table of token embeddings: what textual inversion trains."""
        return self.text_model.embeddings.token_embedding

    def set_input_embeddings(self, embedding: nn.Embedding) -> None:
        """Replaces E_token (config.vocab_size follows its number of rows)."""
        if not isinstance(embedding, nn.Embedding) or embedding.embedding_dim != self.config.hidden_size:
            raise ValueError(f"expected an nn.Embedding with embedding_dim {self.config.hidden_size}, got {embedding!r}")
        self.text_model.embeddings.token_embedding = embedding
        self.register_to_config(vocab_size=embedding.num_embeddings)

    def resize_token_embeddings(self, new_num_tokens: int, mean_resizing: bool = True) -> nn.Embedding:
        """Gives E_token `new_num_tokens` rows (after `tokenizer.add_tokens`: `resize_token_embeddings(len(tokenizer))`).

        The first rows keep their values. New rows are the mean of the old rows (`mean_resizing=True`, the
        default) or drawn from N(0, (0.02 * initializer_factor)^2) (`mean_resizing=False`), as transformers
        initialises them; transformers' mean resizing also adds a draw from N(0, 1e-9 * covariance of the
        old rows), a difference of ~1e-6 that minidiff leaves out, so the new rows are reproducible.
        Returns the new embedding module (its weight is a new parameter: build the optimizer afterwards).
        """
        old = self.get_input_embeddings()
        if not isinstance(new_num_tokens, int) or new_num_tokens < 1:
            raise ValueError(f"new_num_tokens must be a positive int (e.g. len(tokenizer)), got {new_num_tokens!r}")
        if new_num_tokens == old.num_embeddings:
            return old
        weight = old.weight.detach()
        new = nn.Embedding(new_num_tokens, old.embedding_dim, device=weight.device, dtype=weight.dtype)
        kept = min(new_num_tokens, old.num_embeddings)
        with torch.no_grad():
            new.weight[:kept] = weight[:kept]
            if new_num_tokens > kept:
                if mean_resizing:
                    new.weight[kept:] = weight.float().mean(dim=0).to(weight.dtype)
                else:
                    new.weight[kept:].normal_(mean=0.0, std=0.02 * self.config.initializer_factor)
        new.weight.requires_grad_(old.weight.requires_grad)
        self.set_input_embeddings(new)
        return new

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each encoder layer in the backward pass (less memory, ~1/3 more compute), in train mode."""
        self.text_model.encoder.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.text_model.encoder.gradient_checkpointing = False

    # ----- the forward pass -----

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ) -> BaseModelOutputWithPooling | tuple:
        """(B, L) token ids (L <= max_position_embeddings) -> last_hidden_state (B, L, D), pooler_output (B, D).

        attention_mask: optional (B, L), 1 for tokens and 0 for padding; padding keys are then hidden
        as well as future ones (SD 1.5 passes none: its padding tokens are attended, causally).
        output_hidden_states: also return the embeddings and every layer's output (for "CLIP skip",
        SD pipelines take hidden_states[-2] and apply `text_model.final_layer_norm`).
        """
        self._check_input_ids(input_ids)
        text_model = self.text_model
        batch, length = input_ids.shape
        hidden_states = text_model.embeddings(input_ids)  # (B, L, D)
        if attention_mask is None:
            causal_mask = text_model._build_causal_attention_mask(batch, length, hidden_states.dtype, input_ids.device)
            encoded = text_model.encoder(hidden_states, causal_attention_mask=causal_mask, output_hidden_states=output_hidden_states)
        else:
            visible = self._visible_keys(attention_mask, input_ids.shape)  # (B, 1, L, L) bool: causal and not padding
            encoded = text_model.encoder(hidden_states, attention_mask=visible, output_hidden_states=output_hidden_states)
        last_hidden_state = text_model.final_layer_norm(encoded.last_hidden_state)  # (B, L, D)
        pooler_output = last_hidden_state[torch.arange(batch, device=input_ids.device), self._end_positions(input_ids)]
        output = BaseModelOutputWithPooling(last_hidden_state, pooler_output, encoded.hidden_states)
        return output if return_dict else output.to_tuple()

    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            found = f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(
                f"input_ids must be a (batch, length) tensor of integer token ids, got {found}; "
                "use tokenizer(prompts, return_tensors='pt').input_ids (add a batch dimension with ids[None])"
            )
        length, limit = input_ids.shape[1], self.config.max_position_embeddings
        if length > limit:
            raise ValueError(
                f"the text encoder reads at most {limit} tokens, got {length}; tokenize with truncation=True, "
                f"max_length={limit}"
            )
        # Reading the range waits for the device (one sync on a GPU, before the embedding lookup would fail with an
        # opaque device-side assert); a meta tensor has no values to read.
        if input_ids.numel() and input_ids.device.type != "meta" and (
            input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size
        ):
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}), got ids from {int(input_ids.min())} to "
                f"{int(input_ids.max())}; were they made by this model's tokenizer?"
            )

    @staticmethod
    def _visible_keys(attention_mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """(B, 1, L, L) bool: key j is visible to query i when j <= i (causal) and key j is not padding.

        A query that sees no key at all (a padding position before the first token, with left padding)
        gets a zero attention output from torch's scaled_dot_product_attention (torch >= 2.5), as in
        transformers; the outputs at padding positions mean nothing either way.
        """
        if attention_mask.shape != shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(shape)}, got {tuple(attention_mask.shape)}")
        length = shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()  # (L, L)
        return causal[None, None] & attention_mask.bool()[:, None, None, :]  # (B, 1, L, L)

    def _end_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B,) index of each prompt's <|endoftext|>, by transformers' rule.

        A config with eos_token_id == 2 (SD 1.5's, written before transformers fixed that field) takes the
        largest id, which is <|endoftext|> = 49407 in CLIP's vocabulary; otherwise the first position
        holding eos_token_id (padding is also <|endoftext|>, so "first" matters).
        """
        if self.config.eos_token_id == 2:
            return input_ids.argmax(dim=-1)
        return (input_ids == self.config.eos_token_id).int().argmax(dim=-1)
