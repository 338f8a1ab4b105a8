"""The text encoder and tokenizer as fast.ai's "Stable Diffusion Deep Dive" and diffusers' textual inversion script use them.

Every test runs the students' code with minidiff's classes on the tiny random SD 1.5 folder (conftest's
`tiny_sd15_folder`: the real CLIP tokenizer, a 2-layer text encoder of width 32) and compares with
transformers' CLIPTextModel / CLIPTokenizer loaded from the same folder.

Tolerances: token ids, masks, vocabularies: exact. Text encoder outputs: exact (torch.equal) where both
sides run minidiff's own code in the same order (the Deep Dive's hand-made pass against `text_encoder(ids)[0]`);
max |difference| <= 1e-5 against transformers (different float32 kernels, same math); resized embedding rows
<= 1e-4 against transformers (it adds noise of std ~1e-6 to the mean row, minidiff does not).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file

from minidiff.models.clip_text import CLIPTextModel
from minidiff.loaders.textual_inversion import load_textual_inversion, maybe_convert_prompt
from minidiff.tokenizer import CLIPTokenizer

transformers = pytest.importorskip("transformers")
from transformers.modeling_attn_mask_utils import _create_4d_causal_attention_mask  # noqa: E402

# transformers' own deprecation notice for the mask helpers the Deep Dive's generation of students calls
pytestmark = pytest.mark.filterwarnings("ignore:The attention mask API:FutureWarning")

TOLERANCE = 1e-5
RESIZE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def folder(tiny_sd15_folder):
    return tiny_sd15_folder


@pytest.fixture()
def text_encoder(folder):
    return CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")


@pytest.fixture()
def oracle_encoder(folder):
    return transformers.CLIPTextModel.from_pretrained(str(folder / "text_encoder")).eval()


@pytest.fixture()
def tokenizer(folder):
    return CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")


@pytest.fixture()
def oracle_tokenizer(folder):
    return transformers.CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def tokenize(tokenizer, prompt):
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")


# ----- the Deep Dive ----------------------------------------------------------------------------


def test_position_ids_is_transformers_buffer_and_not_saved(text_encoder, oracle_encoder):
    position_ids = text_encoder.text_model.embeddings.position_ids
    assert position_ids.shape == (1, 77) and position_ids.dtype == torch.int64
    assert torch.equal(position_ids, oracle_encoder.embeddings.position_ids)
    assert torch.equal(position_ids[:, :77], torch.arange(77)[None])
    assert "text_model.embeddings.position_ids" not in text_encoder.state_dict()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_build_causal_attention_mask_is_transformers_mask(text_encoder, dtype):
    mask = text_encoder.text_model._build_causal_attention_mask(3, 77, dtype=dtype)
    assert mask.shape == (3, 1, 77, 77) and mask.dtype == dtype
    assert torch.equal(mask, _create_4d_causal_attention_mask((3, 77), dtype, torch.device("cpu")))
    assert mask[0, 0, 0, 1] == torch.finfo(dtype).min and mask[0, 0, 1, 0] == 0 and mask[0, 0, 5, 5] == 0


def get_output_embeds(text_encoder, input_embeddings, torch_device="cpu"):
    """The Deep Dive's function, word for word but for `text_encoder` and `torch_device` passed in."""
    bsz, seq_len = input_embeddings.shape[:2]
    causal_attention_mask = text_encoder.text_model._build_causal_attention_mask(bsz, seq_len, dtype=input_embeddings.dtype)
    encoder_outputs = text_encoder.text_model.encoder(
        inputs_embeds=input_embeddings,
        attention_mask=None,
        causal_attention_mask=causal_attention_mask.to(torch_device),
        output_attentions=None,
        output_hidden_states=True,
        return_dict=None,
    )
    output = encoder_outputs[0]
    output = text_encoder.text_model.final_layer_norm(output)
    return output


def transformers_output_embeds(oracle, input_embeddings):
    """The same pass in transformers 5 (no `text_model`, and the causal mask goes in `attention_mask`)."""
    mask = _create_4d_causal_attention_mask(input_embeddings.shape[:2], input_embeddings.dtype, input_embeddings.device)
    return oracle.final_layer_norm(oracle.encoder(inputs_embeds=input_embeddings, attention_mask=mask)[0])


def test_deep_dive_hand_made_pass_equals_text_encoder_exactly(text_encoder, tokenizer):
    text_input = tokenize(tokenizer, "A picture of a puppy")
    for t in text_input["input_ids"][0][:8]:
        assert tokenizer.decoder.get(int(t)) == tokenizer.convert_ids_to_tokens(int(t))
    assert [tokenizer.decoder.get(int(t)) for t in text_input["input_ids"][0][:3]] == ["<|startoftext|>", "a</w>", "picture</w>"]
    token_emb_layer = text_encoder.text_model.embeddings.token_embedding
    pos_emb_layer = text_encoder.text_model.embeddings.position_embedding
    position_ids = text_encoder.text_model.embeddings.position_ids[:, :77]
    with torch.no_grad():
        position_embeddings = pos_emb_layer(position_ids)
        token_embeddings = token_emb_layer(text_input.input_ids)
        input_embeddings = token_embeddings + position_embeddings
        assert torch.equal(input_embeddings, text_encoder.text_model.embeddings(text_input.input_ids))
        out_embs_test = get_output_embeds(text_encoder, input_embeddings)
        output_embeddings = text_encoder(text_input.input_ids)[0]
    assert out_embs_test.shape == (1, 77, 32)
    assert torch.equal(out_embs_test, output_embeddings)


def test_deep_dive_mixed_token_embedding_matches_transformers(text_encoder, oracle_encoder, tokenizer):
    """"a cat": the cat token's embedding replaced by 0.6 cat + 0.4 dog, run through the encoder by hand."""
    input_ids = tokenize(tokenizer, "a cat").input_ids
    cat, dog = tokenizer.encode("cat", add_special_tokens=False)[0], tokenizer.encode("dog", add_special_tokens=False)[0]
    assert (cat, dog) == (2368, 1929)

    def mixed_embeddings(token_emb_layer, pos_emb_layer, position_ids):
        token_embeddings = token_emb_layer(input_ids)
        replacement = 0.6 * token_emb_layer(torch.tensor(cat)) + 0.4 * token_emb_layer(torch.tensor(dog))
        token_embeddings[0, torch.where(input_ids[0] == cat)] = replacement
        return token_embeddings + pos_emb_layer(position_ids)

    embeddings = text_encoder.text_model.embeddings
    with torch.no_grad():
        ours_in = mixed_embeddings(embeddings.token_embedding, embeddings.position_embedding, embeddings.position_ids[:, :77])
        theirs_in = mixed_embeddings(oracle_encoder.embeddings.token_embedding, oracle_encoder.embeddings.position_embedding,
                                     oracle_encoder.embeddings.position_ids[:, :77])
        ours, theirs = get_output_embeds(text_encoder, ours_in), transformers_output_embeds(oracle_encoder, theirs_in)
        plain = text_encoder(input_ids)[0]
    assert torch.equal(ours_in, theirs_in)
    assert max_difference(ours, theirs) <= TOLERANCE
    assert max_difference(ours[:, :2], plain[:, :2]) == 0.0  # causal: tokens before "cat" are untouched
    assert max_difference(ours[:, 2:], plain[:, 2:]) > 1e-3


def test_encoder_outputs_index_attribute_hidden_states_and_tuple(text_encoder, oracle_encoder, tokenizer):
    input_ids = tokenize(tokenizer, ["a cat", "a dog"]).input_ids
    encoder = text_encoder.text_model.encoder
    with torch.no_grad():
        embeddings = text_encoder.text_model.embeddings(input_ids)
        mask = text_encoder.text_model._build_causal_attention_mask(2, 77, dtype=embeddings.dtype)
        output = encoder(inputs_embeds=embeddings, attention_mask=None, causal_attention_mask=mask, output_hidden_states=True)
        as_tuple = encoder(inputs_embeds=embeddings, causal_attention_mask=mask, output_hidden_states=True, return_dict=False)
        without_hidden = encoder(inputs_embeds=embeddings, causal_attention_mask=mask)
        full = text_encoder(input_ids, output_hidden_states=True)
        reference = oracle_encoder(input_ids, output_hidden_states=True)
        # no mask at all: every token sees every other one (transformers' encoder is not causal by itself)
        bidirectional = encoder(inputs_embeds=embeddings)[0]
        bidirectional_reference = oracle_encoder.encoder(inputs_embeds=embeddings, attention_mask=None)[0]
    assert torch.equal(output[0], output.last_hidden_state) and torch.equal(output["last_hidden_state"], output[0])
    assert len(output.hidden_states) == 3 and torch.equal(output.hidden_states[-1], output.last_hidden_state)
    assert torch.equal(output.hidden_states[0], embeddings)
    for mine, theirs in zip(output.hidden_states, reference.hidden_states):
        assert max_difference(mine, theirs) <= TOLERANCE
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], output[0]) and len(as_tuple[1]) == 3
    assert without_hidden.hidden_states is None and len(without_hidden.to_tuple()) == 1
    assert all(torch.equal(a, b) for a, b in zip(full.hidden_states, output.hidden_states))
    assert max_difference(bidirectional, bidirectional_reference) <= TOLERANCE
    assert max_difference(bidirectional, output[0]) > 1e-3


def test_encoder_bad_masks_and_attention_maps_are_clear_errors(text_encoder):
    embeddings = torch.zeros(2, 5, 32)
    with pytest.raises(ValueError, match=r"\(batch, 1, 5, 5\)"):
        text_encoder.text_model.encoder(inputs_embeds=embeddings, causal_attention_mask=torch.zeros(5, 5))
    with pytest.raises(NotImplementedError, match="output_attentions"):
        text_encoder.text_model.encoder(inputs_embeds=embeddings, output_attentions=True)
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        text_encoder.text_model.embeddings()


def test_text_encoder_output_by_key_and_clip_skip(text_encoder, oracle_encoder, tokenizer):
    input_ids = tokenize(tokenizer, ["a photograph of an astronaut riding a horse", ""]).input_ids
    with torch.no_grad():
        output = text_encoder(input_ids, output_hidden_states=True)
        reference = oracle_encoder(input_ids, output_hidden_states=True)
        # clip skip 1, as diffusers' pipelines do it: the second-to-last layer, then the final LayerNorm
        skipped = text_encoder.text_model.final_layer_norm(output.hidden_states[-2])
        skipped_reference = oracle_encoder.final_layer_norm(reference.hidden_states[-2])
    assert torch.equal(output["last_hidden_state"], output[0]) and torch.equal(output["pooler_output"], output[1])
    assert max_difference(output["last_hidden_state"], reference["last_hidden_state"]) <= TOLERANCE
    assert max_difference(skipped, skipped_reference) <= TOLERANCE
    assert max_difference(skipped, output[0]) > 1e-3


# ----- tokenizer: added tokens --------------------------------------------------------------------

PLACEHOLDERS = [["<cat-toy>", "<Cat-Toy2>"], "<cat-toy>", ["cat", "cat</w>", "<new>"], ["sks", "<x>_1"]]
PROMPTS = ["a <cat-toy> photo", "a <CAT-TOY> photo", "a<cat-toy>b", "a <Cat-Toy2> x <cat-toy2>",
           "sks dog <new> cat concatenate", "<x>_1 <x>", "a photograph of an astronaut riding a horse"]


def test_add_tokens_ids_and_lookups_match_transformers(tokenizer, oracle_tokenizer):
    assert len(tokenizer) == len(oracle_tokenizer) == 49408
    for tokens in PLACEHOLDERS:  # the repeated "<cat-toy>" adds 0; "cat" (in the vocabulary) is added and counted
        assert tokenizer.add_tokens(tokens) == oracle_tokenizer.add_tokens(tokens)
        assert len(tokenizer) == len(oracle_tokenizer)
    assert len(tokenizer) == 49413 and tokenizer.vocab_size == oracle_tokenizer.vocab_size == 49408
    assert tokenizer.get_vocab() == oracle_tokenizer.get_vocab()
    assert tokenizer.added_tokens_encoder == dict(oracle_tokenizer.added_tokens_encoder)
    assert tokenizer.convert_tokens_to_ids("<cat-toy>") == oracle_tokenizer.convert_tokens_to_ids("<cat-toy>") == 49408
    tokens = ["<cat-toy>", "<Cat-Toy2>", "a</w>", "not-a-token"]
    assert tokenizer.convert_tokens_to_ids(tokens) == oracle_tokenizer.convert_tokens_to_ids(tokens)
    ids = [49406, 320, 49408, 49412, 49407]
    assert tokenizer.convert_ids_to_tokens(ids) == oracle_tokenizer.convert_ids_to_tokens(ids)
    assert tokenizer.convert_ids_to_tokens(49408) == oracle_tokenizer.convert_ids_to_tokens(49408) == "<cat-toy>"
    # an added token is matched after lower-casing; both report "<Cat-Toy2>" by its lower-cased form here
    assert tokenizer.convert_ids_to_tokens(49409) == oracle_tokenizer.convert_ids_to_tokens(49409)
    assert tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=True) == oracle_tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=True)
    assert tokenizer.decoder[49408] == "<cat-toy>" and tokenizer.decoder[320] == "a</w>"
    for prompt in PROMPTS:
        ours, theirs = tokenizer(prompt), oracle_tokenizer(prompt)
        assert ours.input_ids == theirs.input_ids, prompt
        for skip in (False, True):
            assert tokenizer.decode(ours.input_ids, skip_special_tokens=skip) == oracle_tokenizer.decode(theirs.input_ids, skip_special_tokens=skip)
            assert tokenizer.decode(torch.tensor(ours.input_ids), skip_special_tokens=skip) == oracle_tokenizer.decode(theirs.input_ids, skip_special_tokens=skip)
    for index in (320, 49406, 49408, 49412):
        assert tokenizer.decode(index) == oracle_tokenizer.decode(index)
        assert tokenizer.decode(torch.tensor(index)) == oracle_tokenizer.decode(index)
    assert tokenizer.decode(49408) == "<cat-toy>" and tokenizer.decode([320, 49408]) == "a <cat-toy>"


def test_bad_tokens_and_ids_are_clear_errors(tokenizer):
    with pytest.raises(ValueError, match="non-empty string"):
        tokenizer.add_tokens(["<ok>", ""])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.convert_ids_to_tokens(len(tokenizer))


def test_saved_added_tokens_read_both_ways(tokenizer, oracle_tokenizer, tmp_path):
    for tokens in PLACEHOLDERS:
        tokenizer.add_tokens(tokens)
        oracle_tokenizer.add_tokens(tokens)
    tokenizer.save_pretrained(tmp_path / "ours")
    assert {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"} <= {
        path.name for path in (tmp_path / "ours").iterdir()}
    oracle_tokenizer.save_pretrained(str(tmp_path / "theirs"))  # transformers 5: tokenizer.json + tokenizer_config.json
    read_by_transformers = transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "ours"))
    read_by_minidiff = CLIPTokenizer.from_pretrained(tmp_path / "theirs")
    read_back = CLIPTokenizer.from_pretrained(tmp_path / "ours")
    for other in (read_by_transformers, read_by_minidiff, read_back):
        assert len(other) == len(tokenizer) and other.get_vocab() == tokenizer.get_vocab()
        assert dict(other.added_tokens_encoder) == tokenizer.added_tokens_encoder
        for prompt in PROMPTS:
            assert other(prompt)["input_ids"] == tokenizer(prompt).input_ids, prompt


# ----- text encoder: resizing the token embeddings ------------------------------------------------


def test_resize_token_embeddings_matches_transformers(text_encoder, oracle_encoder, tokenizer):
    tokenizer.add_tokens(["<cat-toy>", "<cat-toy>_1"])
    old = text_encoder.get_input_embeddings().weight.detach().clone()
    torch.manual_seed(0)
    new_module = text_encoder.resize_token_embeddings(len(tokenizer))
    theirs = oracle_encoder.resize_token_embeddings(len(tokenizer))
    assert new_module is text_encoder.get_input_embeddings() is text_encoder.text_model.embeddings.token_embedding
    assert new_module.weight.shape == theirs.weight.shape == (49410, 32)
    assert text_encoder.config.vocab_size == 49410
    assert torch.equal(new_module.weight[:49408], old)
    assert max_difference(new_module.weight[49408:], theirs.weight[49408:]) <= RESIZE_TOLERANCE
    assert torch.equal(new_module.weight[49408], old.mean(dim=0))
    input_ids = tokenize(tokenizer, "a photo of <cat-toy>").input_ids
    assert 49408 in input_ids
    with torch.no_grad():
        theirs.weight[49408:] = new_module.weight[49408:]  # the same rows on both sides
        assert max_difference(text_encoder(input_ids)[0], oracle_encoder(input_ids)[0]) <= TOLERANCE
    assert text_encoder.resize_token_embeddings(49410) is new_module  # same size: nothing to do
    text_encoder.resize_token_embeddings(49409, mean_resizing=False)
    assert text_encoder.get_input_embeddings().weight.shape == (49409, 32)


def test_set_input_embeddings(text_encoder):
    replacement = torch.nn.Embedding(49410, 32)
    text_encoder.set_input_embeddings(replacement)
    assert text_encoder.get_input_embeddings() is replacement and text_encoder.config.vocab_size == 49410
    with pytest.raises(ValueError, match="embedding_dim 32"):
        text_encoder.set_input_embeddings(torch.nn.Embedding(10, 8))


# ----- textual inversion ---------------------------------------------------------------------------


def setup_textual_inversion(tokenizer, text_encoder, placeholder_tokens, initializer_token="toy"):
    """diffusers' textual_inversion.py, from add_tokens to the frozen text encoder."""
    num_added_tokens = tokenizer.add_tokens(placeholder_tokens)
    assert num_added_tokens == len(placeholder_tokens)
    token_ids = tokenizer.encode(initializer_token, add_special_tokens=False)
    assert len(token_ids) == 1
    initializer_token_id = token_ids[0]
    placeholder_token_ids = tokenizer.convert_tokens_to_ids(placeholder_tokens)
    text_encoder.resize_token_embeddings(len(tokenizer))
    token_embeds = text_encoder.get_input_embeddings().weight.data
    with torch.no_grad():
        for token_id in placeholder_token_ids:
            token_embeds[token_id] = token_embeds[initializer_token_id].clone()
    text_model = getattr(text_encoder, "text_model", text_encoder)  # transformers 5 dropped the `text_model` level
    text_model.encoder.requires_grad_(False)
    text_model.final_layer_norm.requires_grad_(False)
    text_model.embeddings.position_embedding.requires_grad_(False)
    return placeholder_token_ids


def test_textual_inversion_gradients_match_transformers(text_encoder, oracle_encoder, tokenizer, oracle_tokenizer):
    placeholder_tokens = ["<cat-toy>", "<cat-toy>_1"]
    ids = setup_textual_inversion(tokenizer, text_encoder, placeholder_tokens)
    assert setup_textual_inversion(oracle_tokenizer, oracle_encoder, placeholder_tokens) == ids
    prompt = " ".join(tokenizer.convert_ids_to_tokens(ids))
    input_ids = tokenize(tokenizer, [f"a photo of a {prompt}", f"a rendering of {prompt}"]).input_ids
    target = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(0))
    for model in (text_encoder, oracle_encoder):
        model.train()
        torch.nn.functional.mse_loss(model(input_ids)[0], target).backward()
    ours, theirs = text_encoder.get_input_embeddings().weight.grad, oracle_encoder.get_input_embeddings().weight.grad
    assert max_difference(ours, theirs) <= TOLERANCE
    text_encoder.get_input_embeddings().weight.grad = None
    text_encoder.gradient_checkpointing_enable()  # recomputing the layers in backward gives the same gradients
    torch.nn.functional.mse_loss(text_encoder(input_ids)[0], target).backward()
    assert torch.equal(text_encoder.get_input_embeddings().weight.grad, ours)
    assert ours[ids].abs().sum() > 0
    assert all(p.grad is None for p in text_encoder.text_model.encoder.parameters())
    assert text_encoder.text_model.embeddings.position_embedding.weight.grad is None


def test_textual_inversion_training_changes_only_the_new_rows(text_encoder, tokenizer, tmp_path):
    """A few AdamW steps of diffusers' loop (a stand-in loss on the text encoder's output instead of the UNet's
    noise prediction): the original rows are restored after each step, so only the new rows move."""
    placeholder_tokens = ["<cat-toy>", "<cat-toy>_1"]
    placeholder_token_ids = setup_textual_inversion(tokenizer, text_encoder, placeholder_tokens)
    optimizer = torch.optim.AdamW(text_encoder.get_input_embeddings().parameters(), lr=1e-2, weight_decay=1e-2)
    text_encoder.gradient_checkpointing_enable()  # the script's --gradient_checkpointing
    text_encoder.train()
    orig_embeds_params = text_encoder.get_input_embeddings().weight.data.clone()
    encoder_before = {key: value.clone() for key, value in text_encoder.state_dict().items() if "token_embedding" not in key}
    placeholder = " ".join(tokenizer.convert_ids_to_tokens(placeholder_token_ids))
    input_ids = tokenize(tokenizer, [f"a photo of a {placeholder}", f"a good photo of the {placeholder}"]).input_ids
    target = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(4):
        encoder_hidden_states = text_encoder(input_ids)[0]
        loss = torch.nn.functional.mse_loss(encoder_hidden_states, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        index_no_updates = torch.ones((len(tokenizer),), dtype=torch.bool)
        index_no_updates[min(placeholder_token_ids) : max(placeholder_token_ids) + 1] = False
        with torch.no_grad():
            text_encoder.get_input_embeddings().weight[index_no_updates] = orig_embeds_params[index_no_updates]
        losses.append(loss.item())
    weight = text_encoder.get_input_embeddings().weight.detach()
    changed = (weight != orig_embeds_params).any(dim=1).nonzero().flatten().tolist()
    assert changed == placeholder_token_ids == [49408, 49409]
    assert losses[-1] < losses[0]
    assert all(torch.equal(text_encoder.state_dict()[key], value) for key, value in encoder_before.items())

    # save_progress, both formats, then load into a fresh tokenizer and text encoder
    learned_embeds = text_encoder.get_input_embeddings().weight[min(placeholder_token_ids) : max(placeholder_token_ids) + 1]
    learned_embeds_dict = {"<cat-toy>": learned_embeds.detach().cpu()}
    save_file(learned_embeds_dict, str(tmp_path / "learned_embeds.safetensors"), metadata={"format": "pt"})
    (tmp_path / "bin").mkdir()
    torch.save(learned_embeds_dict, str(tmp_path / "bin" / "learned_embeds.bin"))
    base_state_dict = {**encoder_before, "text_model.embeddings.token_embedding.weight": orig_embeds_params[:49408]}
    for source in (tmp_path / "learned_embeds.safetensors", tmp_path / "bin", learned_embeds_dict):
        fresh_tokenizer = CLIPTokenizer()  # the base tokenizer, without the tokens added above
        fresh_encoder = CLIPTextModel.from_state_dict(dict(text_encoder.config, vocab_size=49408), base_state_dict)
        assert load_textual_inversion(fresh_tokenizer, fresh_encoder, source) == placeholder_tokens
        assert fresh_tokenizer.convert_tokens_to_ids(placeholder_tokens) == [49408, 49409]
        assert torch.equal(fresh_encoder.get_input_embeddings().weight[49408:], learned_embeds.detach())
        assert torch.equal(fresh_encoder.get_input_embeddings().weight[:49408], orig_embeds_params[:49408])
        assert maybe_convert_prompt("a photo of <cat-toy>", fresh_tokenizer) == "a photo of <cat-toy> <cat-toy>_1"
        with torch.no_grad():
            assert torch.equal(fresh_encoder(input_ids)[0], text_encoder.eval()(input_ids)[0])


def test_load_textual_inversion_formats_and_errors(text_encoder, tokenizer, tmp_path):
    vector = torch.randn(32)
    torch.save({"name": "birb", "string_to_param": {"*": vector[None]}, "step": 3000}, str(tmp_path / "a1111.pt"))
    assert load_textual_inversion(tokenizer, text_encoder, tmp_path / "a1111.pt") == ["birb"]
    assert torch.equal(text_encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("birb")], vector)
    assert load_textual_inversion(tokenizer, text_encoder, {"<birb-style>": vector}, token="<other>") == ["<other>"]
    assert load_textual_inversion(tokenizer, text_encoder, vector * 2, token="<bare>") == ["<bare>"]
    assert torch.equal(text_encoder.get_input_embeddings().weight[-1], vector * 2)
    assert len(tokenizer) == text_encoder.get_input_embeddings().num_embeddings == 49411
    with pytest.raises(ValueError, match="already in the tokenizer"):
        load_textual_inversion(tokenizer, text_encoder, {"<other>": vector})
    with pytest.raises(ValueError, match="width 768"):
        load_textual_inversion(tokenizer, text_encoder, {"<wide>": torch.zeros(768)})
    with pytest.raises(ValueError, match="pass token="):
        load_textual_inversion(tokenizer, text_encoder, vector)
    with pytest.raises(ValueError, match="not a textual inversion state dict"):
        load_textual_inversion(tokenizer, text_encoder, {"a": vector, "b": vector})

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"<evil>": Payload()}, str(tmp_path / "evil.bin"))
    with pytest.raises(ValueError, match="weights_only=True"):
        load_textual_inversion(tokenizer, text_encoder, tmp_path / "evil.bin")
    with pytest.raises(FileNotFoundError, match="learned_embeds"):
        load_textual_inversion(tokenizer, text_encoder, tmp_path)


@pytest.mark.parametrize("file_format", ["safetensors", "bin folder", "a1111 pt", "multi-vector"])
def test_load_textual_inversion_matches_diffusers(text_encoder, oracle_encoder, tokenizer, oracle_tokenizer, tmp_path, file_format):
    """diffusers' TextualInversionLoaderMixin.load_textual_inversion on transformers' objects is the oracle."""
    from diffusers.loaders import TextualInversionLoaderMixin

    class Loader(TextualInversionLoaderMixin):  # what the mixin reads of a pipeline when no offloading is set up
        hf_device_map = None
        components: dict = {}

    vectors = torch.randn(3 if file_format == "multi-vector" else 1, 32, generator=torch.Generator().manual_seed(2))
    if file_format in ("safetensors", "multi-vector"):
        source = tmp_path / "learned_embeds.safetensors"
        save_file({"<cat-toy>": vectors}, str(source))
    elif file_format == "bin folder":
        torch.save({"<cat-toy>": vectors[0]}, str(tmp_path / "learned_embeds.bin"))
        source = tmp_path
    else:
        source = tmp_path / "cat-toy.pt"
        torch.save({"name": "<cat-toy>", "string_to_param": {"*": vectors}, "step": 10}, str(source))
    tokens = load_textual_inversion(tokenizer, text_encoder, source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Loader().load_textual_inversion(str(source), tokenizer=oracle_tokenizer, text_encoder=oracle_encoder)
    assert tokens == [name for name in oracle_tokenizer.added_tokens_encoder if name.startswith("<cat-toy>")]
    assert len(tokenizer) == len(oracle_tokenizer) == 49408 + len(vectors)
    assert tokenizer.convert_tokens_to_ids(tokens) == oracle_tokenizer.convert_tokens_to_ids(tokens)
    assert torch.equal(text_encoder.get_input_embeddings().weight[49408:], oracle_encoder.get_input_embeddings().weight[49408:])
    prompt = "a photo of <cat-toy>"
    expanded = Loader().maybe_convert_prompt(prompt, oracle_tokenizer)
    assert maybe_convert_prompt(prompt, tokenizer) == expanded
    assert tokenizer(expanded)["input_ids"] == oracle_tokenizer(expanded)["input_ids"]
