"""minidiff.CLIPTokenizer: exact ids, parity with transformers 5's CLIPTokenizer, truncation, loading and saving.

The oracle is transformers' `CLIPTokenizer` (in transformers 5, the `tokenizers`-backed "fast" one)
loaded from the vocab.json / merges.txt that minidiff's `save_pretrained` writes. Parity means equal
ids and attention masks, element for element (integers: no tolerance).
"""

from __future__ import annotations

import json
import unicodedata
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minidiff.tokenizer import BatchEncoding, CLIPTokenizer, bytes_to_unicode, clip_vocab_from_bpe_file

transformers = pytest.importorskip("transformers")

ASTRONAUT = "a photograph of an astronaut riding a horse"
ASTRONAUT_IDS = [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def saved_folder(tokenizer, tmp_path_factory):
    return tokenizer.save_pretrained(tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.fixture(scope="module")
def oracle(saved_folder):
    """transformers' CLIPTokenizer built from the files minidiff wrote."""
    return transformers.CLIPTokenizer.from_pretrained(str(saved_folder))


# ----- the prompt corpus -----------------------------------------------------------------------

BASE_PROMPTS = [
    ASTRONAUT,
    "A Photograph Of An Astronaut Riding A Horse",
    "a cat, a dog; a bird: a fish!",
    "photo of a red car... beautiful?!?",
    "(masterpiece:1.2), [worst quality], {detailed}, <lora:foo:0.8>",
    "portrait, 8k, uhd, dslr, soft lighting, high quality, film grain, Fujifilm XT3",
    "1234567890",
    "the year 2023, 3.14159, 1,000,000 people, 2nd place, 10x zoom",
    "x^2 + y_1 = z / 3 * 4 - 5 % 6",
    "email me at someone@example.com or visit https://example.com/path?q=1&r=2#frag",
    "don't stop, it's fine, we're here, they've gone, I'm done, you'll see, he'd say",
    "DON'T SHOUT IT'S LOUD",
    "rock'n'roll ''s 't 're 'quoted' \"double\" `back`",
    "o’clock with a curly apostrophe’s",
    "café crème brûlée, naïve résumé, façade, Ångström, Øresund",
    "cafe\u0301 (decomposed accent) and n\u0303",
    "Straße groß ß ẞ",
    "İstanbul ıi Iİ",
    "ΣΟΦΟΣ σοφός Ελληνικά",
    "москва Россия пример текста",
    "عربي نص تجريبي",
    "עברית טקסט",
    "हिन्दी पाठ",
    "ภาษาไทย ข้อความ",
    "宇航员骑马的照片",
    "日本語のテキスト、カタカナ、ひらがな。",
    "한국어 텍스트입니다",
    "full-width ＡＢＣ１２３ and ideographic space\u3000here",
    "ligatures ﬁ ﬂ and roman numerals Ⅻ ⅷ and superscripts x² ₃",
    "emoji 🐴🚀👩‍🚀 and flags 🇫🇷🇯🇵 and skin tones 👍🏽",
    "family 👨‍👩‍👧‍👦 heart ❤️ star ⭐ 🙂🙃",
    "🐴",
    "math symbols ∑ ∫ √ ∞ ≠ ≤ ≥ ± × ÷ → ← ⇒",
    "currency $100 €50 £30 ¥2000 ₹10 ₿",
    "multiple     spaces    between   words",
    "tabs\tbetween\t\twords",
    "new\nlines\n\nand\r\nwindows\rreturns",
    "   leading and trailing spaces   ",
    "\t\n mixed whitespace \u00a0nbsp\u2003em space\u2009thin\u202fnarrow ",
    "zero\u200bwidth\u200cjoiner\u200dsoft\u00adhyphen",
    "control chars \x00 \x07 \x1b[31m end",
    "",
    " ",
    "\n\t",
    "!!!???...,,,;;;",
    "-_-_-_-",
    "a",
    "A",
    "I",
    "<|startoftext|>",
    "<|endoftext|>",
    "text <|endoftext|> more text",
    "x<|startoftext|>y<|endoftext|>z",
    "&amp; &lt;html&gt; entities stay as they are",
    "def f(x): return x ** 2  # python code",
    "C:\\Users\\name\\file.txt and /usr/bin/env",
    "hashtags #sunset #nofilter @mention",
    "quotes «guillemets» „german“ 「japanese」",
    "a\u0300\u0301\u0302 stacked combining marks",
    "Hello World HELLO world hello WORLD",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "a-b_c.d,e;f:g!h?i",
    "black and white photo of a 1950s diner at night, neon signs, rain, reflections",
    "Isometric voxel art of a tiny island with a lighthouse, trending on artstation",
    "oil painting by Vincent van Gogh, starry night over the Rhône",
    "an astronaut riding a horse on mars, hd, dramatic lighting",
    "a bowl of ramen 🍜 with chopsticks, studio ghibli style",
    "a watercolor of a fox in the snow",
    "cyberpunk city at night, 4k, octane render",
    "a dog wearing sunglasses.",
    "1 2 3 4 5 6 7 8 9 10 11 12",
    "it'll be ok, she's fine, that'd work",
    "ALL CAPS PROMPT WITH NUMBERS 2024",
    "mixed CASE wOrDs iN a PrOmPt",
    "Pokémon Zürich São Paulo Kraków Reykjavík",
    "tiếng Việt có dấu",
    "Ελλάδα Αθήνα",
    "emoji only 😀😃😄😁😆😅😂🤣",
    "a,b,c,d,e,f,g",
    "under_score and hyphen-ated and dot.ted words",
    "\"quoted prompt\" with 'single' quotes",
    "trailing punctuation!!!",
    "...leading dots",
]

LONG_PROMPTS = [
    " ".join(["a red apple on a wooden table"] * 15),
    ", ".join(f"detail {number}" for number in range(60)),
    "🐴" * 80,
    "supercalifragilistic " * 30,
    "a " * 76,  # exactly 76 words: 78 tokens with the specials, one dropped
    "a " * 75,  # exactly 77 tokens: nothing dropped
]


def _variants(prompt: str) -> list[str]:
    """The prompt, upper-cased, decomposed (NFD), with its spaces widened into tabs/newlines, and wrapped in punctuation."""
    return [
        prompt,
        # (upper-case special-token text is a deliberate difference: test_deliberate_difference_...)
        prompt.upper() if "<|" not in prompt else prompt + " " + prompt,
        unicodedata.normalize("NFD", prompt),
        prompt.replace(" ", " \t\n "),
        f"  ({prompt})!! ",
        f"{prompt} {SUFFIXES[len(prompt) % len(SUFFIXES)]}",
    ]


SUFFIXES = ["I'm", "42", "🐴", "日本", "l'été", "x\ty", "--", "Σ"]


CORPUS = list(dict.fromkeys([variant for prompt in BASE_PROMPTS for variant in _variants(prompt)] + LONG_PROMPTS))


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 300  # distinct prompts


# ----- known ids and the vocabulary ------------------------------------------------------------


def test_astronaut_prompt_ids(tokenizer):
    assert tokenizer(ASTRONAUT).input_ids == ASTRONAUT_IDS
    assert tokenizer.encode(ASTRONAUT) == ASTRONAUT_IDS
    padded = tokenizer(ASTRONAUT, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
    assert padded.input_ids.shape == (1, 77) and padded.input_ids.dtype == torch.int64
    assert padded.input_ids[0, :10].tolist() == ASTRONAUT_IDS
    assert (padded.input_ids[0, 10:] == 49407).all()
    assert padded.attention_mask[0].tolist() == [1] * 10 + [0] * 67


def test_bundled_vocabulary_follows_openai_simple_tokenizer():
    vocab, merges = clip_vocab_from_bpe_file()
    assert len(vocab) == 49408 and len(merges) == 49152 - 256 - 2
    byte_characters = list(bytes_to_unicode().values())
    assert len(set(byte_characters)) == 256
    assert vocab["!"] == 0 and vocab[byte_characters[-1]] == 255  # bytes first, in bytes_to_unicode order
    assert vocab["!</w>"] == 256  # then the same with the end-of-word mark
    assert vocab["".join(merges[0])] == 512  # then one entry per merge
    assert vocab["a</w>"] == 320 and vocab["horse</w>"] == 4558
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert sorted(vocab.values()) == list(range(49408))


def test_special_token_ids_and_sizes(tokenizer):
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    assert tokenizer.vocab_size == len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77


def test_bytes_to_unicode_is_a_printable_bijection():
    characters = bytes_to_unicode()
    assert sorted(characters) == list(range(256))
    assert all(character.isprintable() and not character.isspace() for character in characters.values())
    assert characters[ord("a")] == "a" and characters[ord(" ")] == "Ġ"  # GPT-2's well-known space character


# ----- parity with transformers ----------------------------------------------------------------


@pytest.mark.parametrize("chunk", range(4))
def test_ids_and_masks_match_transformers_on_the_corpus(tokenizer, oracle, chunk):
    prompts = CORPUS[chunk::4]
    for prompt in prompts:
        ours, theirs = tokenizer(prompt), oracle(prompt)
        assert ours.input_ids == theirs.input_ids, prompt
        assert ours.attention_mask == theirs.attention_mask, prompt
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long prompts warn about truncation (tested below)
        ours = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    theirs = oracle(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ours.input_ids, theirs.input_ids)
    assert torch.equal(ours.attention_mask, theirs.attention_mask)


def test_batch_padding_modes_match_transformers(tokenizer, oracle):
    prompts = ["", "a cat", ASTRONAUT, "emoji 🐴🚀 and 宇航员", LONG_PROMPTS[0]]
    for options in [
        dict(padding=True),
        dict(padding="longest"),
        dict(padding=False),
        dict(padding="max_length"),  # no truncation: the long prompt stays longer than 77
        dict(padding="max_length", max_length=20, truncation=True),
        dict(padding=True, max_length=12, truncation=True),
        dict(truncation=True),
        dict(max_length=16),  # transformers truncates when max_length is given without padding
    ]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = tokenizer(prompts, **options)
            theirs = oracle(prompts, **options)
        assert ours.input_ids == theirs["input_ids"], options
        assert ours.attention_mask == theirs["attention_mask"], options
    ours = tokenizer(prompts, padding=True, return_tensors="pt")
    theirs = oracle(prompts, padding=True, return_tensors="pt")
    assert torch.equal(ours.input_ids, theirs.input_ids) and torch.equal(ours.attention_mask, theirs.attention_mask)
    ours = tokenizer(prompts[:4], add_special_tokens=False, padding=True)
    assert ours.input_ids == oracle(prompts[:4], add_special_tokens=False, padding=True).input_ids


def test_encode_and_decode_match_transformers(tokenizer, oracle):
    for prompt in CORPUS[::3]:
        ids = tokenizer.encode(prompt)
        assert ids == oracle.encode(prompt), prompt
        assert tokenizer.decode(ids) == oracle.decode(ids), prompt
        assert tokenizer.decode(ids, skip_special_tokens=True) == oracle.decode(ids, skip_special_tokens=True), prompt
    assert tokenizer.tokenize(ASTRONAUT) == oracle.tokenize(ASTRONAUT)


# Random text: any Unicode (hypothesis' default alphabet, surrogates excluded), and text drawn mostly from
# characters that exercise the regex (contractions, digits, punctuation, whitespace, accents, CJK, emoji).
TRICKY_CHARACTERS = list("aAzZ sS'’tTdDmMlLrReEvV\t\n\r.,!?-_()[]<>|0123456789éÉßİΣσ漢字🐴🚀\u0301\u200b\u00a0\u3000")
random_text = st.one_of(
    st.text(max_size=120),
    st.text(alphabet=st.sampled_from(TRICKY_CHARACTERS), max_size=200),
)


@settings(max_examples=250, deadline=None)
@given(text=random_text)
def test_random_text_matches_transformers(tokenizer, oracle, text):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = tokenizer(text, padding="max_length", max_length=77, truncation=True)
    theirs = oracle(text, padding="max_length", max_length=77, truncation=True)
    assert ours.input_ids == theirs.input_ids
    assert ours.attention_mask == theirs.attention_mask
    assert tokenizer.encode(text) == oracle.encode(text)


@settings(max_examples=40, deadline=None)
@given(texts=st.lists(random_text, min_size=1, max_size=4))
def test_random_batches_match_transformers(tokenizer, oracle, texts):
    ours = tokenizer(texts, padding=True, return_tensors="pt")
    theirs = oracle(texts, padding=True, return_tensors="pt")
    assert torch.equal(ours.input_ids, theirs.input_ids)
    assert torch.equal(ours.attention_mask, theirs.attention_mask)


def test_deliberate_difference_upper_case_special_token_text(tokenizer, oracle):
    """A literal "<|ENDOFTEXT|>" in a prompt: minidiff lower-cases it and reads the special token, as OpenAI's
    CLIP does (its regex and BPE cache map "<|endoftext|>" to 49407); transformers 5 matches <|endoftext|>
    only before lower-casing and byte-pair-encodes the upper-case spelling as ordinary punctuation and letters.
    Lower-case special-token text gives the same ids in both (see the corpus)."""
    ours = tokenizer.encode("x <|ENDOFTEXT|> y")
    assert ours == [49406, tokenizer.encode("x", add_special_tokens=False)[0], 49407, 344, 49407]
    assert ours != oracle.encode("x <|ENDOFTEXT|> y")
    assert tokenizer.encode("x <|endoftext|> y") == oracle.encode("x <|endoftext|> y")


# ----- truncation ----------------------------------------------------------------------------


def test_long_prompt_is_truncated_with_a_warning(tokenizer):
    prompt = " ".join(f"word{number}" for number in range(100))  # "wordN" -> "word" + digits: far past 77
    body = tokenizer.encode(prompt, add_special_tokens=False)
    dropped = len(body) - 75
    with pytest.warns(UserWarning, match=rf"{dropped} token\(s\) were dropped") as caught:
        out = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert out.input_ids.shape == (1, 77)
    assert out.input_ids[0, 0] == 49406 and out.input_ids[0, -1] == 49407  # the end token is kept
    assert out.input_ids[0, 1:76].tolist() == body[:75]
    assert out.attention_mask.sum() == 77
    message = str(caught[0].message)
    assert "9 9" in message  # the dropped text ("word 9 9") is named
    assert tokenizer.decode(body[75:]) in message


def test_exactly_77_tokens_does_not_warn(tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = tokenizer("a " * 75, padding="max_length", truncation=True, return_tensors="pt")
    assert out.input_ids.shape == (1, 77) and out.attention_mask.all()


def test_one_token_too_many_drops_one(tokenizer):
    with pytest.warns(UserWarning, match=r"1 token\(s\) were dropped: 'a'"):
        out = tokenizer("a " * 76, truncation=True)
    assert len(out.input_ids) == 77


# ----- the output object ----------------------------------------------------------------------


def test_output_access_and_types(tokenizer):
    single = tokenizer("a cat")
    assert isinstance(single, BatchEncoding)
    assert single["input_ids"] == single.input_ids == [49406, 320, 2368, 49407]
    assert single.attention_mask == [1, 1, 1, 1]
    batch = tokenizer(["a cat", "a"], padding=True)
    assert batch.input_ids == [[49406, 320, 2368, 49407], [49406, 320, 49407, 49407]]
    assert batch.attention_mask == [[1, 1, 1, 1], [1, 1, 1, 0]]
    arrays = tokenizer(["a cat", "a"], padding=True, return_tensors="np")
    assert arrays.input_ids.dtype == np.int64 and arrays.input_ids.shape == (2, 4)
    with pytest.raises(AttributeError, match="input_ids"):
        single.token_type_ids


def test_empty_prompt_is_start_and_end(tokenizer):
    out = tokenizer([""] * 2, padding="max_length", max_length=77, return_tensors="pt")  # the tutorial's unconditional input
    assert out.input_ids.shape == (2, 77)
    assert out.input_ids[:, 0].eq(49406).all() and out.input_ids[:, 1:].eq(49407).all()
    assert out.attention_mask[:, :2].all() and not out.attention_mask[:, 2:].any()


def test_decode_round_trip(tokenizer):
    assert tokenizer.decode(tokenizer.encode(ASTRONAUT), skip_special_tokens=True) == ASTRONAUT
    assert tokenizer.decode(torch.tensor(ASTRONAUT_IDS)) == f"<|startoftext|>{ASTRONAUT} <|endoftext|>"
    assert tokenizer.batch_decode(torch.tensor([ASTRONAUT_IDS]), skip_special_tokens=True) == [ASTRONAUT]
    text = "Crème Brûlée, 42 🐴"
    normalized = unicodedata.normalize("NFC", text).lower()
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True).replace(" ", "") == normalized.replace(" ", "")


# ----- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda t: t("a", padding="maximum"), "padding must be one of"),
        (lambda t: t("a", return_tensors="tf"), "return_tensors must be"),
        (lambda t: t(123), "string or a list of strings"),
        (lambda t: t(["a", None]), "string or a list of strings"),
        (lambda t: t([]), "empty list"),
        (lambda t: t("a", max_length=1, truncation=True), "max_length"),
        (lambda t: t(["a", "a b c"], return_tensors="pt"), "different lengths"),
        (lambda t: t.encode(["a"]), "one string"),
        (lambda t: t.decode([[1, 2]]), "batch_decode"),
    ],
)
def test_bad_input_is_a_clear_value_error(tokenizer, call, message):
    with pytest.raises(ValueError, match=message):
        call(tokenizer)


def test_constructor_checks():
    vocab, merges = clip_vocab_from_bpe_file()
    with pytest.raises(ValueError, match="both"):
        CLIPTokenizer(vocab=vocab)
    with pytest.raises(ValueError, match="<\\|startoftext\\|>"):
        CLIPTokenizer({key: value for key, value in vocab.items() if key != "<|startoftext|>"}, merges)
    with pytest.raises(ValueError, match="model_max_length"):
        CLIPTokenizer(model_max_length=1)


# ----- loading and saving ---------------------------------------------------------------------


def test_save_and_load_round_trip(tokenizer, saved_folder, tmp_path):
    assert sorted(p.name for p in saved_folder.iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"
    ]
    assert (saved_folder / "merges.txt").read_text().startswith("#version: 0.2\ni n\n")
    loaded = CLIPTokenizer.from_pretrained(saved_folder)
    assert loaded.get_vocab() == tokenizer.get_vocab() and loaded.merges == tokenizer.merges
    # A Stable Diffusion folder: <root>/tokenizer/..., with model_max_length read from tokenizer_config.json.
    short = CLIPTokenizer(tokenizer.get_vocab(), tokenizer.merges, model_max_length=16)
    short.save_pretrained(tmp_path / "sd" / "tokenizer")
    loaded = CLIPTokenizer.from_pretrained(tmp_path / "sd", subfolder="tokenizer")
    assert loaded.model_max_length == 16
    with pytest.warns(UserWarning, match="dropped"):
        ids = loaded("word " * 40, padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (1, 16) and ids[0, -1] == 49407
    with pytest.raises(FileNotFoundError, match="subfolder='tokenizer'"):
        CLIPTokenizer.from_pretrained(tmp_path / "sd")


def test_loads_transformers_save_pretrained_layout(oracle, tmp_path):
    """transformers 5 writes only tokenizer.json + tokenizer_config.json; minidiff reads that too."""
    oracle.save_pretrained(str(tmp_path))
    assert not (tmp_path / "vocab.json").exists()
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    for prompt in CORPUS[::10]:
        assert loaded.encode(prompt) == oracle.encode(prompt), prompt


def test_broken_files_are_reported(tmp_path):
    (tmp_path / "vocab.json").write_text("{not json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        CLIPTokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    with pytest.raises(ValueError, match="not a CLIP vocabulary"):
        CLIPTokenizer.from_pretrained(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match="line 2"):
        CLIPTokenizer.from_pretrained(tmp_path)
