"""Textual inversion: a new word whose token embedding was learned, loaded into the tokenizer and the text encoder.

Gal et al. 2022, "An Image is Worth One Word" (arXiv:2208.01618), section 4: a placeholder word S* gets a new
token embedding v*, optimized with the diffusion loss while every other weight stays frozen (eq. 2):

    v* = argmin_v  E_{z, y, eps, t} || eps - eps_theta(z_t, t, c_theta(y with S* embedded as v)) ||^2

The result is a file holding only v* (one row of E_token, or several for a multi-vector concept). To use it:

    load_textual_inversion(tokenizer, text_encoder, "learned_embeds.safetensors")   # adds "<cat-toy>"
    ids = tokenizer("a photo of <cat-toy>", padding="max_length", truncation=True, return_tensors="pt").input_ids

The files it reads (what diffusers' `load_textual_inversion` reads):
- diffusers' training script: {"<cat-toy>": tensor (n, D) or (D,)} in learned_embeds.safetensors or .bin;
- AUTOMATIC1111's embeddings: {"name": ..., "string_to_param": {"*": tensor (n, D)}, ...} in a .pt / .bin.
Pickled files are read with torch.load(weights_only=True): tensors, numbers and strings only, no code.
A concept of n > 1 vectors becomes n tokens "<tok>", "<tok>_1", ..., "<tok>_{n-1}"; a prompt that names
"<tok>" must then spell them all out, which `maybe_convert_prompt` does.

`TextualInversionLoaderMixin` (at the end) gives a pipeline diffusers' two methods on top of these functions:
`pipe.load_textual_inversion(...)` and `pipe.maybe_convert_prompt(...)`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from minidiff.checkpoints.hub import download_file
from minidiff.checkpoints.reader import read_state_dict

# The file names diffusers' training script writes, tried in this order in a folder or hub repo.
TEXTUAL_INVERSION_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")


def load_textual_inversion(
    tokenizer,
    text_encoder,
    pretrained_model_name_or_path_or_state_dict: str | os.PathLike | dict | torch.Tensor | list,
    token: str | list[str] | None = None,
    weight_name: str | None = None,
) -> list[str]:
    """Adds the concept's token(s) to `tokenizer` and writes its embedding row(s) into `text_encoder`.

    pretrained_model_name_or_path_or_state_dict: a file, a folder or hub repo holding learned_embeds.safetensors /
        learned_embeds.bin (or `weight_name`), a loaded state dict, a bare tensor (n, D) or (D,) (then `token`
        is required), or a list of these (then `token`, if given, is a list of the same length).
    token: the word to use in prompts; default the one stored in the file. A list of n tokens with one (n, D)
        tensor gives each row its own token, as diffusers does.
    Returns the tokens added (one per vector). As diffusers: a token already in the vocabulary is refused, and
    the embeddings must have the text encoder's width D. Everything is checked before the tokenizer or the
    text encoder changes, so a refused list leaves both as they were.
    """
    sources = pretrained_model_name_or_path_or_state_dict
    sources = list(sources) if isinstance(sources, list) else [sources]
    if isinstance(token, str) and len(sources) > 1:
        raise ValueError(f"one token {token!r} for {len(sources)} embeddings: pass a list of tokens, one per embedding")
    tokens = list(token) if isinstance(token, list) else [token] * len(sources)
    state_dicts = [_read_embeddings(source, weight_name) for source in sources]
    if len(tokens) > 1 and len(state_dicts) == 1:  # n tokens for the n rows of one tensor
        if not isinstance(state_dicts[0], torch.Tensor) or len(state_dicts[0]) != len(tokens):
            raise ValueError(
                f"{len(tokens)} tokens were given for one embedding: several tokens need a list of as many files / "
                "state dicts, or one (n, D) tensor with n = the number of tokens"
            )
        state_dicts = list(state_dicts[0])
    if len(tokens) != len(state_dicts):
        raise ValueError(f"{len(state_dicts)} embeddings but {len(tokens)} tokens: pass one token per embedding, or none")
    new_tokens, new_vectors = [], []
    for state_dict, name in zip(state_dicts, tokens):
        name, embedding = _token_and_embedding(state_dict, name)
        vectors = embedding if embedding.dim() == 2 else embedding[None]  # (n, D)
        new_tokens += [name] + [f"{name}_{index}" for index in range(1, len(vectors))]
        new_vectors += list(vectors)
    _check_new_tokens(tokenizer, text_encoder, new_tokens, new_vectors)
    tokenizer.add_tokens(new_tokens)
    token_ids = tokenizer.convert_tokens_to_ids(new_tokens)
    table = text_encoder.resize_token_embeddings(len(tokenizer)).weight  # (vocab + n, D)
    with torch.no_grad():
        for token_id, vector in zip(token_ids, new_vectors):
            table[token_id] = vector.to(device=table.device, dtype=table.dtype)
    return new_tokens


def _check_new_tokens(tokenizer, text_encoder, tokens: list[str], vectors: list[torch.Tensor]) -> None:
    """Refuses tokens the vocabulary already has (or that repeat), and vectors of the wrong width."""
    vocabulary = tokenizer.get_vocab()
    # "<tok>_1" left from another concept would be spelled out after "<tok>" in every prompt (maybe_convert_prompt)
    taken = [name for name in tokens if name in vocabulary or f"{name}_1" in vocabulary]
    if taken:
        raise ValueError(
            f"token(s) {taken} (or their multi-vector '_1' companions) already in the tokenizer's vocabulary; "
            "pass another name with token=..., "
            "or load the concept into a fresh tokenizer and text encoder"
        )
    repeated = sorted({name for name in tokens if tokens.count(name) > 1})
    if repeated:
        raise ValueError(f"token(s) {repeated} would be added twice: give each embedding its own token=...")
    width = text_encoder.get_input_embeddings().embedding_dim
    for name, vector in zip(tokens, vectors):
        if vector.shape[-1] != width:
            raise ValueError(
                f"the embedding of {name!r} has width {vector.shape[-1]}, but this text encoder's tokens have width "
                f"{width}: it was trained for another model (SD 1.x embeddings are 768 wide, SD 2.x 1024)"
            )


def maybe_convert_prompt(prompt: str, tokenizer) -> str:
    """Spells out multi-vector concepts: "a <tok> cat" -> "a <tok> <tok>_1 <tok>_2 cat" when "<tok>_1" exists."""
    added = tokenizer.added_tokens_encoder
    for token in set(tokenizer.tokenize(prompt)) & set(added):
        count = 1
        while f"{token}_{count}" in added:
            count += 1
        if count > 1:
            prompt = prompt.replace(token, " ".join([token, *(f"{token}_{index}" for index in range(1, count))]))
    return prompt


def _read_embeddings(source, weight_name: str | None) -> dict | torch.Tensor:
    """The state dict (or tensor) of a concept from a dict, a tensor, a file, a folder or a hub repo id."""
    if isinstance(source, (dict, torch.Tensor)):
        return source
    path = Path(source)
    if path.is_dir():
        names = [weight_name] if weight_name else TEXTUAL_INVERSION_NAMES
        found = [path / name for name in names if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{path} holds none of {list(names)}; pass the embedding file itself, or weight_name=...")
        path = found[0]
    elif not path.is_file():
        if path.exists() or str(source).count("/") != 1 or str(source).startswith((".", "/", "~")):
            raise FileNotFoundError(f"{source} is neither an embedding file, a folder holding one, nor a hub repo id")
        path = Path(_download(str(source), weight_name))
    if path.suffix == ".safetensors":
        return read_state_dict([path])  # the one reader: validated, errors name the file and say what to do
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"{path} could not be read as tensors with torch.load(weights_only=True) ({type(error).__name__}); "
            "minidiff does not unpickle code: convert the file to safetensors where you trust it"
        ) from None


def _download(repo_id: str, weight_name: str | None) -> str:
    """The local path of the repo's embedding file: `weight_name`, else the first of TEXTUAL_INVERSION_NAMES it has."""
    names = [weight_name] if weight_name else list(TEXTUAL_INVERSION_NAMES)
    for name in names[:-1]:
        try:
            return download_file(repo_id, name)
        except OSError:  # not in this repo (or no network): try the next name, whose error is the one reported
            continue
    return download_file(repo_id, names[-1])


def _token_and_embedding(state_dict: dict | torch.Tensor, token: str | None) -> tuple[str, torch.Tensor]:
    """(token, embedding (n, D) or (D,)) from the formats of the module docstring."""
    if isinstance(state_dict, torch.Tensor):
        if token is None:
            raise ValueError("a bare embedding tensor has no token name: pass token='<my-concept>'")
        return token, state_dict.detach()
    if len(state_dict) == 1:  # diffusers: {token: embedding}
        loaded_token, embedding = next(iter(state_dict.items()))
    elif "string_to_param" in state_dict:  # AUTOMATIC1111
        loaded_token, embedding = state_dict.get("name"), state_dict["string_to_param"]["*"]
    else:
        raise ValueError(
            f"not a textual inversion state dict: expected {{token: tensor}} (diffusers) or a 'string_to_param' entry "
            f"(AUTOMATIC1111), found keys {list(state_dict)[:5]}"
        )
    if not isinstance(embedding, torch.Tensor) or embedding.dim() not in (1, 2):
        raise ValueError(f"the embedding must be a (D,) or (n, D) tensor, found {type(embedding).__name__} "
                         f"{tuple(getattr(embedding, 'shape', ()))}")
    token = token if token is not None else loaded_token
    if not isinstance(token, str) or not token:
        raise ValueError("the file names no token: pass token='<my-concept>'")
    return token, embedding.detach()


class TextualInversionLoaderMixin:
    """diffusers' pipeline methods for textual inversion, on a pipeline that has `tokenizer` and `text_encoder`."""

    def load_textual_inversion(
        self,
        pretrained_model_name_or_path: str | os.PathLike | dict | torch.Tensor | list,
        token: str | list[str] | None = None,
        tokenizer=None,
        text_encoder=None,
        weight_name: str | None = None,
    ) -> list[str]:
        """Add learned concepts to this pipeline's tokenizer and text encoder (or the ones given), as diffusers'
        `load_textual_inversion`: see `load_textual_inversion` above for what it reads. A concept of n vectors
        becomes tokens "<tok>", "<tok>_1", ...; prompts naming "<tok>" get them all (`maybe_convert_prompt`).
        Returns the tokens added (diffusers returns None)."""
        return load_textual_inversion(tokenizer or self.tokenizer, text_encoder or self.text_encoder,
                                      pretrained_model_name_or_path, token=token, weight_name=weight_name)

    def maybe_convert_prompt(self, prompt: str | list[str], tokenizer=None) -> str | list[str]:
        """Spell out multi-vector concepts in a prompt (or a list of prompts): "a <tok>" -> "a <tok> <tok>_1"."""
        tokenizer = tokenizer or self.tokenizer
        if isinstance(prompt, str):
            return maybe_convert_prompt(prompt, tokenizer)
        return [maybe_convert_prompt(text, tokenizer) for text in prompt]
