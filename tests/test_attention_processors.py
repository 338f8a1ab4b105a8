"""Attention processors (models/attention_processor.py) against diffusers' API, as prompt-to-prompt / DAAM
coursework uses it: the processor keys, swapping processors, recording and editing cross-attention maps.

Models are built from tiny seeded configs in diffusers, and minidiff's copy gets the same weights with a strict
`load_state_dict`. Tolerance against diffusers: max |difference| <= 1e-5 (float32).
"""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from minidiff import AutoencoderKL, UNet2DConditionModel, UNet2DModel  # noqa: E402
from minidiff.models import AttnProcessor, AttnProcessor2_0  # noqa: E402

TOLERANCE = 1e-5
TOKENS, CONTEXT_DIM, HEADS = 77, 24, 2

TINY_UNET_CONDITION = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=CONTEXT_DIM,
    attention_head_dim=HEADS,
    norm_num_groups=8,
)
TINY_UNET_2D = dict(
    sample_size=16,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=8,
)
TINY_VAE = dict(
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4,
    norm_num_groups=8,
)


def pair(name: str, config: dict):
    """diffusers' model with seeded random weights, and minidiff's with the same weights."""
    torch.manual_seed(0)
    theirs = getattr(diffusers, name)(**config).eval()
    ours = {"UNet2DConditionModel": UNet2DConditionModel, "UNet2DModel": UNet2DModel,
            "AutoencoderKL": AutoencoderKL}[name](**config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


@pytest.fixture(scope="module")
def unets():
    return pair("UNet2DConditionModel", TINY_UNET_CONDITION)


def unet_inputs(batch: int = 2, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 16, 16, generator=generator)
    text = torch.randn(batch, TOKENS, CONTEXT_DIM, generator=generator)
    return latents, torch.tensor(500), text


def restore_default(model) -> None:
    """Each library's SDPA processor back in every layer (diffusers' set_default_attn_processor refuses to replace
    a custom processor, and picks its non-SDPA AttnProcessor)."""
    if isinstance(model, UNet2DConditionModel):
        model.set_default_attn_processor()
    else:
        model.set_attn_processor(diffusers.models.attention_processor.AttnProcessor2_0())


def diffusers_style_keys(model: torch.nn.Module) -> list[str]:
    """The keys diffusers' AttentionMixin.attn_processors gives: every module with `get_processor`, + ".processor".
    (diffusers' UNet2DModel has no such property, but its Attention layers have the method.)"""
    return [f"{name}.processor" for name, module in model.named_modules() if hasattr(module, "get_processor")]


# ----- processors written against diffusers' names (they run unchanged on both libraries) -----------


class RecordingProcessor:
    """Attention written out with diffusers' helpers, keeping each cross-attention's probabilities (DAAM-style)."""

    def __init__(self):
        self.maps = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 token_scale=None):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B*heads, N, dim_head)
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probabilities = attn.get_attention_scores(query, key)  # (B*heads, N, M)
        if attn.is_cross_attention:
            if token_scale is not None:  # prompt-to-prompt's re-weighting of one token
                token, factor = token_scale
                probabilities = probabilities.clone()
                probabilities[:, :, token] *= factor
            self.maps.append(probabilities.detach())
        hidden_states = attn.batch_to_head_dim(torch.bmm(probabilities, value))  # (B, N, inner_dim)
        return attn.to_out[1](attn.to_out[0](hidden_states))


class RecordingAttnProcessor(AttnProcessor):
    """A student's subclass of minidiff's default: record the cross-attention maps, then attend as usual."""

    def __init__(self):
        self.maps = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attn.is_cross_attention:
            query = attn.head_to_batch_dim(attn.to_q(hidden_states))
            key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
            self.maps.append(attn.get_attention_scores(query, key).detach())
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


# ----- keys -----------------------------------------------------------------------------------------


def test_keys_equal_diffusers_for_the_conditional_unet(unets):
    theirs, ours = unets
    assert list(ours.attn_processors) == list(theirs.attn_processors)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor" in ours.attn_processors
    assert len(ours.attn_processors) == 2 * 4  # (attn1, attn2) x (1 down, 1 mid, 2 up) transformers


def test_keys_equal_diffusers_for_unet_2d_with_attention_blocks():
    theirs, ours = pair("UNet2DModel", TINY_UNET_2D)
    assert list(ours.attn_processors) == diffusers_style_keys(theirs)
    assert "down_blocks.1.attentions.0.processor" in ours.attn_processors


def test_keys_equal_diffusers_for_the_vae():
    theirs, ours = pair("AutoencoderKL", TINY_VAE)
    assert list(ours.attn_processors) == list(theirs.attn_processors)
    assert list(ours.attn_processors) == ["encoder.mid_block.attentions.0.processor",
                                          "decoder.mid_block.attentions.0.processor"]


# ----- the default processor --------------------------------------------------------------------------


def test_default_processor_is_sdpa_and_bit_exact_after_setting_it_again(unets):
    _, ours = unets
    assert all(type(p) is AttnProcessor for p in ours.attn_processors.values())
    assert AttnProcessor2_0 is AttnProcessor
    latents, t, text = unet_inputs()
    with torch.no_grad():
        before = ours(latents, t, text).sample
        ours.set_attn_processor(AttnProcessor())
        again = ours(latents, t, text).sample
        ours.set_default_attn_processor()
        default = ours(latents, t, text).sample
    assert torch.equal(before, again) and torch.equal(before, default)


def test_diffusers_own_attn_processor_runs_unchanged_on_minidiff(unets):
    """diffusers' (non-SDPA) AttnProcessor only uses names minidiff's Attention has."""
    theirs, ours = unets
    latents, t, text = unet_inputs()
    with torch.no_grad():
        expected = theirs(latents, t, text).sample
        ours.set_attn_processor(diffusers.models.attention_processor.AttnProcessor())
        got = ours(latents, t, text).sample
        ours.set_default_attn_processor()
    assert (got - expected).abs().max() <= TOLERANCE


# ----- recording and editing cross-attention maps ---------------------------------------------------


def test_recording_subclass_captures_cross_attention_maps(unets):
    _, ours = unets
    recorder = RecordingAttnProcessor()
    ours.set_attn_processor(recorder)
    latents, t, text = unet_inputs(batch=2)
    with torch.no_grad():
        recorded = ours(latents, t, text).sample
    ours.set_default_attn_processor()
    with torch.no_grad():
        plain = ours(latents, t, text).sample
    assert torch.equal(recorded, plain)  # recording does not change the output
    # one map per cross-attention: down 16x16, mid 8x8, up 16x16 twice
    assert [m.shape for m in recorder.maps] == [(2 * HEADS, 256, TOKENS), (2 * HEADS, 64, TOKENS),
                                                (2 * HEADS, 256, TOKENS), (2 * HEADS, 256, TOKENS)]
    for attention_map in recorder.maps:
        assert torch.allclose(attention_map.sum(dim=-1), torch.ones(()), atol=1e-6)
        assert attention_map.min() >= 0


def test_recording_processor_gives_diffusers_maps(unets):
    theirs, ours = unets
    latents, t, text = unet_inputs()
    outputs, maps = [], []
    for model in (theirs, ours):
        recorder = RecordingProcessor()
        model.set_attn_processor(recorder)
        with torch.no_grad():
            outputs.append(model(latents, t, text).sample)
        restore_default(model)
        maps.append(recorder.maps)
    assert len(maps[0]) == len(maps[1]) == 4
    for theirs_map, our_map in zip(*maps):
        assert our_map.shape == theirs_map.shape
        assert (our_map - theirs_map).abs().max() <= TOLERANCE
    assert (outputs[0] - outputs[1]).abs().max() <= TOLERANCE


def test_editing_processor_through_cross_attention_kwargs(unets):
    """Scaling one token's attention (prompt-to-prompt re-weighting), passed as cross_attention_kwargs as in
    diffusers: it changes the output, by the same amount in both libraries; a factor of 1 changes nothing."""
    theirs, ours = unets
    latents, t, text = unet_inputs()
    results = {}
    for name, model in (("theirs", theirs), ("ours", ours)):
        model.set_attn_processor(RecordingProcessor())
        with torch.no_grad():
            for factor in (1.0, 4.0):
                results[name, factor] = model(latents, t, text,
                                              cross_attention_kwargs={"token_scale": (3, factor)}).sample
        restore_default(model)
    with torch.no_grad():
        plain = ours(latents, t, text).sample
    assert (results["ours", 1.0] - plain).abs().max() <= TOLERANCE
    assert (results["ours", 4.0] - plain).abs().max() > 1e-3
    assert (results["ours", 4.0] - results["theirs", 4.0]).abs().max() <= TOLERANCE


def test_unexpected_cross_attention_kwargs_are_ignored_with_a_warning(unets):
    _, ours = unets
    latents, t, text = unet_inputs()
    with torch.no_grad():
        plain = ours(latents, t, text).sample
        with pytest.warns(UserWarning, match="not expected by AttnProcessor"):
            got = ours(latents, t, text, cross_attention_kwargs={"token_scale": (3, 4.0)}).sample
    assert torch.equal(got, plain)


# ----- set_attn_processor with a dict ---------------------------------------------------------------


def test_a_dict_sets_one_processor_per_layer(unets):
    _, ours = unets
    recorder = RecordingAttnProcessor()
    processors = {key: recorder if key.endswith("attn2.processor") else AttnProcessor() for key in ours.attn_processors}
    ours.set_attn_processor(processors)
    latents, t, text = unet_inputs()
    with torch.no_grad():
        ours(latents, t, text)
    assert len(recorder.maps) == 4
    assert {key: type(p) for key, p in ours.attn_processors.items()} == {key: type(p) for key, p in processors.items()}
    ours.set_default_attn_processor()


def test_a_bad_dict_is_refused_with_the_count_and_keys(unets):
    _, ours = unets
    processors = {key: AttnProcessor() for key in ours.attn_processors}
    missing_one = dict(list(processors.items())[1:])
    with pytest.raises(ValueError, match="7 entries, but UNet2DConditionModel has 8 attention layers"):
        ours.set_attn_processor(missing_one)
    renamed = {**missing_one, "down_blocks.0.attentions.0.attn2.processor": AttnProcessor()}
    with pytest.raises(ValueError, match=r"unknown keys: \['down_blocks.0.attentions.0.attn2.processor'\]"):
        ours.set_attn_processor(renamed)
    assert all(type(p) is AttnProcessor for p in ours.attn_processors.values())


# ----- one Attention layer: the helpers and a mask, against diffusers' Attention ----------------------


def test_attention_helpers_and_masked_attention_equal_diffusers():
    from minidiff.models.attention import Attention

    torch.manual_seed(0)
    theirs = diffusers.models.attention_processor.Attention(32, cross_attention_dim=CONTEXT_DIM, heads=4, dim_head=8)
    ours = Attention(32, cross_attention_dim=CONTEXT_DIM, heads=4, dim_head=8)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert (ours.heads, ours.scale, ours.is_cross_attention) == (theirs.heads, theirs.scale, theirs.is_cross_attention)
    generator = torch.Generator().manual_seed(1)
    hidden_states = torch.randn(2, 64, 32, generator=generator)
    text = torch.randn(2, TOKENS, CONTEXT_DIM, generator=generator)
    mask = torch.zeros(2, 1, TOKENS)
    mask[:, :, 10:] = -10000.0  # padding tokens after the 10th: (nearly) no attention to them

    query, key = ours.head_to_batch_dim(ours.to_q(hidden_states)), ours.head_to_batch_dim(ours.to_k(text))
    assert query.shape == (2 * 4, 64, 8)
    assert torch.equal(query, theirs.head_to_batch_dim(theirs.to_q(hidden_states)))
    assert torch.equal(ours.batch_to_head_dim(query), ours.to_q(hidden_states))
    ours_mask = ours.prepare_attention_mask(mask, TOKENS, 2)
    assert torch.equal(ours_mask, theirs.prepare_attention_mask(mask, TOKENS, 2))
    probabilities = ours.get_attention_scores(query, key, ours_mask)  # (B*heads, N, M)
    assert (probabilities - theirs.get_attention_scores(query, key, ours_mask)).abs().max() <= TOLERANCE
    assert probabilities[:, :, 10:].max() < 1e-6

    with torch.no_grad():
        for their_processor in (diffusers.models.attention_processor.AttnProcessor2_0(),
                                diffusers.models.attention_processor.AttnProcessor()):
            theirs.set_processor(their_processor)
            expected = theirs(hidden_states, text, attention_mask=mask)
            assert (ours(hidden_states, text, attention_mask=mask) - expected).abs().max() <= TOLERANCE
    with pytest.raises(ValueError, match="attention_mask covers 5 keys but the attention has 77"):
        ours(hidden_states, text, attention_mask=mask[:, :, :5])


def test_the_lora_scale_key_is_taken_out_as_in_diffusers(unets):
    """diffusers' UNet pops cross_attention_kwargs["scale"] (its LoRA scale) before the processors see it; without
    LoRA layers it changes nothing (tests/test_lora.py checks it scales them)."""
    _, ours = unets
    latents, t, text = unet_inputs()
    with torch.no_grad():
        plain = ours(latents, t, text).sample
        assert torch.equal(ours(latents, t, text, cross_attention_kwargs={"scale": 1.0}).sample, plain)
        assert torch.equal(ours(latents, t, text, cross_attention_kwargs={"scale": 0.5}).sample, plain)


def test_a_trainable_processor_is_a_submodule_until_replaced(unets):
    """As in diffusers: an nn.Module processor (e.g. with its own weights) is registered in the layer, so its
    parameters train and save with the model; a plain processor put back removes it."""
    _, ours = unets

    class ScaledOutput(torch.nn.Module, AttnProcessor):
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.tensor(1.0))

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
            return self.gain * AttnProcessor.__call__(self, attn, hidden_states, encoder_hidden_states, attention_mask)

    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"
    processors = dict(ours.attn_processors)
    processors[key] = ScaledOutput()
    ours.set_attn_processor(processors)
    assert f"{key}.gain" in ours.state_dict()
    latents, t, text = unet_inputs()
    ours(latents, t, text).sample.sum().backward()
    assert processors[key].gain.grad is not None
    ours.zero_grad(set_to_none=True)
    ours.set_default_attn_processor()
    assert f"{key}.gain" not in ours.state_dict()
