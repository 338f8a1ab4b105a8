"""CLIP's tokenizer: a prompt becomes the 77 token ids that Stable Diffusion's text encoder reads.

CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision",
section 2.4) uses a lower-cased byte-pair encoding (Sennrich et al. 2016) with 49,152 entries, plus
two special tokens that open and close every text:

    "a photograph of an astronaut riding a horse"
      1. normalize:       NFC, collapse runs of whitespace, lower-case
      2. pre-tokenize:    split into words, digits and punctuation runs with CLIP's regex (CLIP_SPLIT_PATTERN)
      3. byte-pair merge: each word's UTF-8 bytes, written as printable characters, the last one marked
                          with "</w>", are merged pair by pair in the order of the merges list
                          "photograph</w>" -> ["photograph</w>"],  "astronaut</w>" -> ["astronaut</w>"]
      4. add specials:    <|startoftext|> (49406)  ...  <|endoftext|> (49407)
      5. truncate / pad:  to `model_max_length` = 77, padding with <|endoftext|>

    -> [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407, 49407, ..., 49407]   (77 ids)

Steps 1-3 run in the `tokenizers` library (fast Rust code); steps 4-5 are plain Python below, so a
reader can see exactly what truncation keeps and drops.

The vocabulary is derived from the BPE merges file exactly as OpenAI's CLIP `SimpleTokenizer` does
(see `clip_vocab_from_bpe_file`): 256 byte characters, the same 256 with "</w>", one entry per merge,
then the two special tokens: 49,408 ids.

Textual inversion adds whole words after the 49,408 ids with `add_tokens(["<cat-toy>"])` (id 49408, ...):
they are matched in the normalized prompt before step 2, so never split, exactly as transformers does, and
`save_pretrained` / `from_pretrained` keep them in transformers' files (added_tokens.json, tokenizer_config.json's
added_tokens_decoder; transformers 5's tokenizer.json when reading).

Deliberate differences from other CLIP tokenizers (all invisible on ordinary prompts):
- OpenAI's CLIP (and transformers' *slow* tokenizer when `ftfy` is installed) first repairs mojibake
  with `ftfy.fix_text` and un-escapes HTML entities (`&amp;` -> `&`). minidiff does neither, exactly
  like transformers 5's `CLIPTokenizer` (the fast one), which is what diffusers' pipelines use; both
  apply Unicode NFC, which is also what ftfy's default normalization does. The test suite checks
  minidiff's ids against transformers 5's `CLIPTokenizer` on several hundred prompts.
- The text "<|endoftext|>" (or "<|startoftext|>") inside a prompt is read as that special token, in any
  letter case, as in OpenAI's CLIP and transformers' slow tokenizer. transformers 5's fast tokenizer
  does so only for the exact lower-case "<|endoftext|>" and byte-pair-encodes "<|ENDOFTEXT|>" as
  punctuation and letters.
- When a prompt is truncated minidiff warns, naming how many tokens were dropped and their text
  (transformers truncates silently; diffusers' pipeline warns in the same way).
"""

from __future__ import annotations

import gzip
import json
import os
import warnings
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's pre-tokenization (OpenAI's `SimpleTokenizer.pat`): the special tokens, English contractions,
# runs of letters, single digits, and runs of anything that is neither space, letter nor digit.
CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
BUNDLED_BPE_FILE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
# OpenAI's CLIP keeps the first 49152 - 256 - 2 merges of the file, so that 2 * 256 byte tokens, the
# merges and the 2 special tokens make 49408 ids (see clip_vocab_from_bpe_file).
NUMBER_OF_MERGES = 49152 - 256 - 2
PADDING_STRATEGIES = (False, True, "longest", "max_length", "do_not_pad")


# ----- the vocabulary ------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """A printable character for each of the 256 byte values (GPT-2's byte-level BPE alphabet).

    Printable Latin-1 bytes ("!".."~", "¡".."¬", "®".."ÿ") stand for themselves; the remaining 68
    (control characters, space, ...) are mapped to chr(256), chr(257), ... in byte order. BPE then
    works on strings without whitespace or control characters, and every byte sequence is
    representable, so no text is ever out of vocabulary.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters = {byte: chr(byte) for byte in printable}
    unprintable = [byte for byte in range(256) if byte not in characters]
    for offset, byte in enumerate(unprintable):
        characters[byte] = chr(256 + offset)
    return characters


def clip_vocab_from_bpe_file(bpe_file: str | os.PathLike = BUNDLED_BPE_FILE) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) from CLIP's `bpe_simple_vocab_16e6.txt.gz`, the way OpenAI's `SimpleTokenizer` builds them.

    vocab = the 256 byte characters (in `bytes_to_unicode` order), the same with "</w>" appended,
    the concatenation of each merge pair, then <|startoftext|> and <|endoftext|>: 49,408 entries.
    """
    lines = gzip.open(bpe_file, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUMBER_OF_MERGES + 1]]  # line 0 is "#version: 0.2"
    byte_characters = list(bytes_to_unicode().values())
    tokens = [*byte_characters, *(character + END_OF_WORD for character in byte_characters)]
    tokens += [first + second for first, second in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


def read_merges_file(path: str | os.PathLike) -> list[tuple[str, str]]:
    """The merge pairs of a `merges.txt` (one "first second" pair a line, after a "#version" header)."""
    merges = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or (number == 1 and line.startswith("#version")):
            continue
        pair = line.split()
        if len(pair) != 2:
            raise ValueError(f"{path}, line {number}: expected a merge pair 'first second', found {line!r}")
        merges.append((pair[0], pair[1]))
    return merges


def read_tokenizer_json(path: str | os.PathLike) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) from a `tokenizers` file `tokenizer.json` of a BPE model (merges as pairs or "a b" strings)."""
    model = _read_json(str(path)).get("model", {})
    if model.get("type") != "BPE" or "vocab" not in model or "merges" not in model:
        raise ValueError(f"{path} does not describe a BPE tokenizer (model.type {model.get('type')!r}); it is not CLIP's")
    merges = [tuple(pair.split(" ")) if isinstance(pair, str) else tuple(pair) for pair in model["merges"]]
    return dict(model["vocab"]), merges


def read_added_tokens_of_tokenizer_json(path: str | os.PathLike) -> dict[str, int]:
    """token -> id of the `added_tokens` a `tokenizer.json` lists (transformers 5 keeps added tokens there)."""
    return {entry["content"]: int(entry["id"]) for entry in _read_json(str(path)).get("added_tokens", [])}


# ----- the output ----------------------------------------------------------------------------


class BatchEncoding(dict):
    """The tokenizer's output: `out.input_ids` or `out["input_ids"]`, and `attention_mask` (1 = token, 0 = padding)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no field {name!r}; its fields are {sorted(self)}") from None


# ----- the tokenizer -------------------------------------------------------------------------


class CLIPTokenizer:
    """CLIP's byte-pair tokenizer with transformers' `CLIPTokenizer` call signature.

        tokenizer = CLIPTokenizer()                     # the bundled CLIP vocabulary, offline
        tokenizer = CLIPTokenizer.from_pretrained("path/to/stable-diffusion-v1-5", subfolder="tokenizer")
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids      # (B, 77) int64
    """

    bos_token = BOS_TOKEN
    eos_token = EOS_TOKEN
    pad_token = EOS_TOKEN  # CLIP pads with <|endoftext|>
    unk_token = EOS_TOKEN  # never produced: every byte has a token

    def __init__(
        self,
        vocab: dict[str, int] | None = None,
        merges: list[tuple[str, str]] | None = None,
        model_max_length: int = 77,
    ):
        if (vocab is None) != (merges is None):
            raise ValueError("pass both `vocab` and `merges`, or neither (to use the bundled CLIP vocabulary)")
        if vocab is None:
            vocab, merges = clip_vocab_from_bpe_file()
        for token in (BOS_TOKEN, EOS_TOKEN):
            if token not in vocab:
                raise ValueError(f"the vocabulary has no {token!r}: this is not a CLIP vocabulary (vocab.json)")
        if not isinstance(model_max_length, int) or model_max_length < 2:
            raise ValueError(f"model_max_length must be an int >= 2 (room for the two special tokens), got {model_max_length!r}")
        self.encoder = dict(vocab)  # token -> id
        self.merges = [tuple(pair) for pair in merges]
        self.model_max_length = model_max_length
        self._added_tokens: dict[str, int] = {}  # token -> id, after the vocabulary (see add_tokens)
        self._tokenizer = self._build_bpe_pipeline()

    def _build_bpe_pipeline(self) -> Tokenizer:
        """Steps 1-3 of the module docstring, as a `tokenizers.Tokenizer`."""
        bpe = BPE(vocab=self.encoder, merges=self.merges, end_of_word_suffix=END_OF_WORD, unk_token=EOS_TOKEN)
        tokenizer = Tokenizer(bpe)
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(), normalizers.Lowercase()]
        )
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                # keep the regex matches, drop what lies between them (the spaces)
                pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
                # UTF-8 bytes -> the printable characters of bytes_to_unicode (no further splitting)
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tokenizer.decoder = decoders.ByteLevel()
        # A literal "<|endoftext|>" in a prompt is that special token (as in OpenAI's CLIP), matched after normalization.
        tokenizer.add_special_tokens([AddedToken(token, normalized=True, special=True) for token in (BOS_TOKEN, EOS_TOKEN)])
        return tokenizer

    # ----- loading and saving -----

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, subfolder: str | None = None, hub=None) -> "CLIPTokenizer":
        """Reads a tokenizer folder, e.g. `from_pretrained("stable-diffusion-v1-5", subfolder="tokenizer")`, or a hub repo.

        The folder holds `vocab.json` + `merges.txt` (Stable Diffusion's layout) or a `tokenizer.json`
        (what transformers 5's `save_pretrained` writes); `model_max_length` comes from
        `tokenizer_config.json` when it is there, else 77.
        """
        files = _tokenizer_files(path_or_repo_id, subfolder, hub)
        added: dict[str, int] = {}  # token -> id, for tokens added after the BPE vocabulary (textual inversion)
        if files.get("vocab.json"):
            vocab = _read_json(files["vocab.json"])
            merges = read_merges_file(files["merges.txt"])
        else:
            vocab, merges = read_tokenizer_json(files["tokenizer.json"])
            added.update(read_added_tokens_of_tokenizer_json(files["tokenizer.json"]))
        config = _read_json(files["tokenizer_config.json"]) if files.get("tokenizer_config.json") else {}
        added.update({entry["content"]: int(index) for index, entry in config.get("added_tokens_decoder", {}).items()})
        if files.get("added_tokens.json"):
            added.update({token: int(index) for token, index in _read_json(files["added_tokens.json"]).items()})
        tokenizer = cls(vocab, merges, model_max_length=int(config.get("model_max_length", 77)))
        tokenizer._add_saved_tokens({token: index for token, index in added.items() if token not in (BOS_TOKEN, EOS_TOKEN)})
        return tokenizer

    def _add_saved_tokens(self, added: dict[str, int]) -> None:
        """Adds tokens read from a saved folder, checking that they get the ids they were saved with."""
        for token, index in sorted(added.items(), key=lambda item: item[1]):
            expected = self.encoder.get(token, len(self))
            if index != expected:
                raise ValueError(
                    f"the saved added token {token!r} has id {index}, but here it would get id {expected}: the new "
                    "tokens must follow the vocabulary without gaps; save the tokenizer again"
                )
            self.add_tokens(token)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Writes vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json, the layout of
        Stable Diffusion's `tokenizer/` folder, which transformers' `CLIPTokenizer.from_pretrained` reads.

        Tokens added with `add_tokens` go where transformers 4 puts them and transformers 4 and 5 read them:
        `added_tokens.json` ({token: id}) and `added_tokens_decoder` in tokenizer_config.json ({id: token entry}).
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.encoder, ensure_ascii=False), encoding="utf-8")
        merge_lines = ["#version: 0.2", *(f"{first} {second}" for first, second in self.merges)]
        (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
        special_tokens = {
            name: {"content": token, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
            for name, token in [("bos_token", BOS_TOKEN), ("eos_token", EOS_TOKEN), ("unk_token", EOS_TOKEN)]
        }
        special_tokens["pad_token"] = EOS_TOKEN
        added_tokens_decoder = {
            str(index): {"content": token, "lstrip": False, "normalized": not special, "rstrip": False,
                         "single_word": False, "special": special}
            for token, index, special in [*((t, self.encoder[t], True) for t in (BOS_TOKEN, EOS_TOKEN)),
                                          *((t, i, False) for t, i in self._added_tokens.items())]
        }
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.model_max_length,
            "do_lower_case": True,
            "add_prefix_space": False,
            "added_tokens_decoder": added_tokens_decoder,
            # plain strings here (their entries are in added_tokens_decoder), as transformers >= 4.34 writes them
            **{name: EOS_TOKEN if name != "bos_token" else BOS_TOKEN for name in special_tokens},
        }
        new_ids = {token: index for token, index in self._added_tokens.items() if index >= self.vocab_size}
        if new_ids:
            (folder / "added_tokens.json").write_text(json.dumps(new_ids, ensure_ascii=False) + "\n", encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (folder / "special_tokens_map.json").write_text(json.dumps(special_tokens, indent=2) + "\n", encoding="utf-8")
        return folder

    # ----- ids of the vocabulary -----

    @property
    def vocab_size(self) -> int:
        """The size of the BPE vocabulary, without added tokens (transformers' meaning); see len(tokenizer)."""
        return len(self.encoder)

    def __len__(self) -> int:
        """The number of ids, added tokens included: the rows the text encoder's token embedding needs."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int:
        return self.encoder[BOS_TOKEN]

    @property
    def eos_token_id(self) -> int:
        return self.encoder[EOS_TOKEN]

    @property
    def pad_token_id(self) -> int:
        return self.encoder[EOS_TOKEN]

    @property
    def unk_token_id(self) -> int:
        return self.encoder[EOS_TOKEN]

    @property
    def all_special_ids(self) -> list[int]:
        return [self.bos_token_id, self.eos_token_id]

    def get_vocab(self) -> dict[str, int]:
        """token -> id for the whole vocabulary, added tokens included."""
        return {**self.encoder, **self._added_tokens}

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        """token -> id of the tokens matched before byte-pair encoding: the two special tokens, then added ones."""
        return {BOS_TOKEN: self.bos_token_id, EOS_TOKEN: self.eos_token_id, **self._added_tokens}

    @property
    def added_tokens_decoder(self) -> dict[int, str]:
        return {index: token for token, index in self.added_tokens_encoder.items()}

    @property
    def decoder(self) -> dict[int, str]:
        """id -> token (transformers' slow CLIPTokenizer's table: `tokenizer.decoder.get(320)` is "a</w>")."""
        return {index: token for token, index in self.get_vocab().items()}

    def add_tokens(self, new_tokens: str | list[str], special_tokens: bool = False) -> int:
        """Adds whole-word tokens such as textual inversion's placeholder "<cat-toy>"; returns how many were added.

        Each token not yet in the vocabulary takes the next id (49408, 49409, ... for CLIP). Every added token is
        matched in the lower-cased prompt before byte-pair encoding, so it is never split. As in transformers,
        a token already in the BPE vocabulary ("cat") is added too (and counted) with its own id, and from then
        on matched as a whole, even inside words; a token added before is skipped (not counted).
        The text encoder then needs `text_encoder.resize_token_embeddings(len(tokenizer))`.
        """
        tokens = [new_tokens] if isinstance(new_tokens, str) else list(new_tokens)
        if not all(isinstance(token, str) and token for token in tokens):
            raise ValueError(f"add_tokens takes a non-empty string or a list of them, got {new_tokens!r}")
        added = 0
        for token in tokens:
            if token in self.added_tokens_encoder:
                continue
            entry = AddedToken(token, normalized=not special_tokens, special=special_tokens)
            (self._tokenizer.add_special_tokens if special_tokens else self._tokenizer.add_tokens)([entry])
            self._added_tokens[token] = self._tokenizer.token_to_id(token)  # its vocabulary id, or the next free one
            added += 1
        return added

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        """The id of a token ("a</w>" -> 320, "<cat-toy>" -> 49408), or of each token of a list; unknown
        tokens give unk_token_id (<|endoftext|>), as in transformers."""
        vocabulary = self.get_vocab()
        if isinstance(tokens, str):
            return vocabulary.get(tokens, self.unk_token_id)
        return [vocabulary.get(token, self.unk_token_id) for token in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False) -> str | list[str]:
        """The token of an id (an int gives a str), or of each id of a list or 1-D tensor."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            return self._token_of(ids)
        return [self._token_of(int(index)) for index in ids if not (skip_special_tokens and index in self.all_special_ids)]

    def _token_of(self, index: int) -> str:
        token = self._tokenizer.id_to_token(index)
        if token is None:
            raise ValueError(f"token id {index} is outside the vocabulary [0, {len(self)})")
        return token

    # ----- text -> ids -----

    def tokenize(self, text: str) -> list[str]:
        """The BPE tokens of `text`, without special tokens: "a horse" -> ["a</w>", "horse</w>"]."""
        return self._tokenizer.encode(_checked_text(text), add_special_tokens=False).tokens

    def __call__(
        self,
        text: str | list[str],
        padding: bool | str = False,
        truncation: bool | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
    ) -> BatchEncoding:
        """Token ids and attention mask of one prompt or a list of prompts (transformers' semantics).

        padding: False / "do_not_pad" (none), True / "longest" (to the longest in the batch),
                 "max_length" (to `max_length`, default `model_max_length`; longer prompts stay longer
                 unless truncated).
        truncation: True cuts each prompt to `max_length` (default `model_max_length`), keeping
                 <|endoftext|> last, and warns about what was dropped. None (the default) truncates only
                 when `max_length` is given without padding, as transformers does.
        return_tensors: None (Python lists), "pt" (torch.int64 tensors, (B, L)) or "np".
        A single string gives unbatched lists, or tensors of shape (1, L).
        """
        is_batch = isinstance(text, (list, tuple))
        texts = [_checked_text(item) for item in text] if is_batch else [_checked_text(text)]
        if is_batch and not texts:
            raise ValueError("the tokenizer got an empty list of prompts; pass at least one string (it may be \"\")")
        if padding not in PADDING_STRATEGIES:
            raise ValueError(f"padding must be one of {PADDING_STRATEGIES}, got {padding!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < (2 if add_special_tokens else 1)):
            raise ValueError(f"max_length must be a positive int with room for the special tokens, got {max_length!r}")
        if truncation is None:
            truncation = max_length is not None and padding in (False, "do_not_pad")
        length_limit = max_length if max_length is not None else self.model_max_length

        bodies = [encoding.ids for encoding in self._tokenizer.encode_batch(texts, add_special_tokens=False)]
        sequences = []
        for body in bodies:
            if truncation:
                body = self._truncate(body, length_limit - (2 if add_special_tokens else 0))
            sequences.append([self.bos_token_id, *body, self.eos_token_id] if add_special_tokens else body)

        if padding in (True, "longest"):
            sequences, masks = self._pad(sequences, max(len(ids) for ids in sequences))
        elif padding == "max_length":
            sequences, masks = self._pad(sequences, length_limit)
        else:
            masks = [[1] * len(ids) for ids in sequences]
        encoding = BatchEncoding(input_ids=sequences, attention_mask=masks)
        return _as_tensors(encoding, return_tensors, is_batch)

    def _truncate(self, body: list[int], keep: int) -> list[int]:
        """The first `keep` ids of `body`; warns with the number and text of the dropped ones."""
        if len(body) <= keep:
            return body
        dropped = body[keep:]
        warnings.warn(
            f"The prompt is longer than CLIP's {keep} tokens (+ 2 special tokens): {len(dropped)} token(s) were "
            f"dropped: {self.decode(dropped)!r}. Shorten the prompt to keep them.",
            stacklevel=3,
        )
        return body[:keep]

    def _pad(self, sequences: list[list[int]], length: int) -> tuple[list[list[int]], list[list[int]]]:
        """Appends <|endoftext|> up to `length`; the attention mask is 1 on tokens, 0 on padding."""
        padded = [ids + [self.pad_token_id] * max(0, length - len(ids)) for ids in sequences]
        masks = [[1] * len(ids) + [0] * max(0, length - len(ids)) for ids in sequences]
        return padded, masks

    def encode(
        self,
        text: str,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | None = None,
        max_length: int | None = None,
    ) -> list[int]:
        """The ids of one prompt as a list: "a horse" -> [49406, 320, 4558, 49407]."""
        if not isinstance(text, str):
            raise ValueError(f"encode takes one string, got {type(text).__name__}; call the tokenizer itself for a batch")
        encoding = self(text, padding=padding, truncation=truncation, max_length=max_length, add_special_tokens=add_special_tokens)
        return encoding["input_ids"]

    # ----- ids -> text -----

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """The text of `ids` (an int, a list, or a 0-D / 1-D tensor): tokens joined, bytes decoded, "</w>" read as a space.

        Lower-casing and whitespace clean-up cannot be undone, so decode(encode(text)) is the normalized
        text, with a space after each word: "A Horse!" -> "<|startoftext|>a horse ! <|endoftext|>".
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], list):
            raise ValueError("decode takes the ids of one prompt; use batch_decode for a batch")
        text = self._tokenizer.decode([int(index) for index in ids], skip_special_tokens=skip_special_tokens)
        return text.replace(END_OF_WORD, " ").strip()

    def batch_decode(self, batch, skip_special_tokens: bool = False) -> list[str]:
        if hasattr(batch, "tolist"):
            batch = batch.tolist()
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

    def __repr__(self) -> str:
        added = f", added_tokens={list(self._added_tokens)}" if self._added_tokens else ""
        return f"CLIPTokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length}{added})"


def _checked_text(text) -> str:
    if not isinstance(text, str):
        raise ValueError(f"the tokenizer takes a string or a list of strings, got {type(text).__name__}: {text!r:.80}")
    return text


def _as_tensors(encoding: BatchEncoding, return_tensors: str | None, is_batch: bool) -> BatchEncoding:
    """Lists (unbatched for a single prompt), or (B, L) tensors of int64."""
    if return_tensors is None:
        if not is_batch:
            return BatchEncoding({key: value[0] for key, value in encoding.items()})
        return encoding
    if return_tensors not in ("pt", "np"):
        raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")
    lengths = {len(ids) for ids in encoding["input_ids"]}
    if len(lengths) > 1:
        raise ValueError(
            f"the prompts have different lengths {sorted(lengths)}, so they cannot form one tensor; "
            "pass padding=True (to the longest) or padding='max_length' with truncation=True"
        )
    if return_tensors == "pt":
        import torch

        return BatchEncoding({key: torch.tensor(value, dtype=torch.int64) for key, value in encoding.items()})
    import numpy

    return BatchEncoding({key: numpy.array(value, dtype=numpy.int64) for key, value in encoding.items()})


def _read_json(path: str) -> dict:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); download the tokenizer files again") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(value).__name__}")
    return value


def _tokenizer_files(path_or_repo_id, subfolder: str | None, hub=None) -> dict[str, str | None]:
    """Local paths of vocab.json + merges.txt (or tokenizer.json) and of the optional tokenizer_config.json."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        names = ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "added_tokens.json"]
        files = {name: str(folder / name) if (folder / name).is_file() else None for name in names}
        if not (files["vocab.json"] and files["merges.txt"]) and not files["tokenizer.json"]:
            hint = " (for a Stable Diffusion folder pass subfolder='tokenizer')" if (path / "tokenizer").is_dir() else ""
            raise FileNotFoundError(
                f"{folder} holds no CLIP tokenizer: expected vocab.json and merges.txt (or tokenizer.json){hint}"
            )
        if files["vocab.json"] and files["merges.txt"]:
            files["tokenizer.json"] = None
        return files
    if path.exists() or str(path_or_repo_id).count("/") != 1 or str(path_or_repo_id).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{path_or_repo_id} is neither a local tokenizer folder nor a hub repo id (owner/name)")
    from minidiff.checkpoints.hub import HubUnavailableError, download_file

    files = {name: download_file(str(path_or_repo_id), name, subfolder, hub) for name in ("vocab.json", "merges.txt")}
    for optional in ("tokenizer_config.json", "added_tokens.json"):
        try:
            files[optional] = download_file(str(path_or_repo_id), optional, subfolder, hub)
        except HubUnavailableError:
            files[optional] = None
    return files
