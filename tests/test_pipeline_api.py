"""The pipeline API the courses call (fast.ai's Deep Dive, Hugging Face's diffusion course), against diffusers."""

from __future__ import annotations

import warnings

import diffusers
import numpy as np
import pytest
import torch

from minidiff import DDPMPipeline, DDPMScheduler, StableDiffusionPipeline, UNet2DModel

TOLERANCE = 1e-5  # images in [0, 1], float32, same weights and seed


@pytest.fixture(scope="module")
def pipelines(tiny_sd15_folder):
    ours = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd15_folder, safety_checker=None, requires_safety_checker=False)
    for pipeline in (ours, theirs):
        pipeline.set_progress_bar_config(disable=True)
    return ours, theirs


def generate(pipeline, **kwargs):
    settings = dict(height=64, width=64, num_inference_steps=3, output_type="np")
    return pipeline(generator=torch.Generator().manual_seed(0), **{**settings, **kwargs}).images


def test_encode_prompt_has_diffusers_signature_and_results(pipelines):
    ours, theirs = pipelines
    a = ours.encode_prompt("a cat", "cpu", 2, True, negative_prompt="blurry")
    b = theirs.encode_prompt("a cat", "cpu", 2, True, negative_prompt="blurry")
    for x, y in zip(a, b):
        assert x.shape == y.shape == (2, 77, ours.text_encoder.config.hidden_size)
        torch.testing.assert_close(x, y, rtol=0, atol=TOLERANCE)


def test_clip_skip_takes_an_earlier_layer_through_the_final_layer_norm(pipelines):
    """diffusers 0.42.1's encode_prompt(clip_skip=...) reads `text_encoder.text_model`, which transformers 5's
    CLIPTextModel no longer has (its layers are on the model itself): with transformers 5 it raises
    AttributeError, a bug of that pairing. minidiff is checked against the same computation done by hand."""
    ours, theirs = pipelines
    with pytest.raises(AttributeError, match="text_model"):
        theirs.encode_prompt("a cat", "cpu", 1, False, clip_skip=1)
    ids = theirs.tokenizer("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    hidden = theirs.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    expected = theirs.text_encoder.final_layer_norm(hidden)
    got, _ = ours.encode_prompt("a cat", "cpu", 1, False, clip_skip=1)
    torch.testing.assert_close(got, expected, rtol=0, atol=TOLERANCE)
    with pytest.warns(FutureWarning, match="`_encode_prompt\\(\\)` is deprecated"):
        joined = ours._encode_prompt("a cat", "cpu", 1, True)
    positive, negative = ours.encode_prompt("a cat", "cpu", 1, True)
    assert torch.equal(joined, torch.cat([negative, positive]))


def test_prompt_embeds_and_latent_output_match_diffusers(pipelines):
    ours, theirs = pipelines
    embeds, negative = ours.encode_prompt(["a cat", "a dog"], "cpu", 1, True)
    mixed = (embeds[:1] + embeds[1:]) / 2  # the Deep Dive's "a cat" + "a dog"
    kwargs = {"prompt_embeds": mixed, "negative_prompt_embeds": negative[:1]}
    np.testing.assert_allclose(generate(ours, **kwargs), generate(theirs, **kwargs), rtol=0, atol=TOLERANCE)
    latent = generate(ours, prompt="a cat", output_type="latent")
    assert torch.allclose(latent, generate(theirs, prompt="a cat", output_type="latent"), rtol=0, atol=TOLERANCE)
    with pytest.raises(ValueError, match="not both"):
        ours("a cat", prompt_embeds=mixed)


def test_callback_on_step_end_sees_and_changes_the_latents_as_in_diffusers(pipelines):
    ours, theirs = pipelines
    seen = {"ours": [], "theirs": []}

    def callback(name):
        def on_step_end(pipe, step, t, tensors):
            seen[name].append((step, int(t), tuple(tensors["latents"].shape)))
            return {"latents": tensors["latents"] * 0.9}  # the callback steers the loop
        return on_step_end

    images = [generate(p, prompt="a cat", callback_on_step_end=callback(n), callback_on_step_end_tensor_inputs=["latents"])
              for p, n in ((ours, "ours"), (theirs, "theirs"))]
    assert seen["ours"] == seen["theirs"] and len(seen["ours"]) == len(ours.scheduler.timesteps)  # PNDM: N + 1
    np.testing.assert_allclose(images[0], images[1], rtol=0, atol=TOLERANCE)
    with pytest.raises(ValueError, match="a callback can have"):
        ours("a cat", callback_on_step_end=callback("ours"), callback_on_step_end_tensor_inputs=["noise"])


def test_callback_on_step_end_replaces_the_text_batch_as_in_diffusers(pipelines):
    """diffusers hands a callback the text batch the UNet sees, [negative; prompt] under guidance; what the callback
    returns is that batch from then on (here: the Deep Dive's 'guidance off after step 1', both halves conditional)."""
    ours, theirs = pipelines
    shapes = {"ours": [], "theirs": []}

    def callback(name):
        def on_step_end(pipe, step, t, tensors):
            shapes[name].append(tuple(tensors["prompt_embeds"].shape))
            if step == 1:
                conditional = tensors["prompt_embeds"].chunk(2)[1]
                return {"prompt_embeds": torch.cat([conditional, conditional])}
            return {}
        return on_step_end

    kwargs = dict(prompt="a cat", callback_on_step_end_tensor_inputs=["prompt_embeds", "negative_prompt_embeds"])
    images = [generate(p, callback_on_step_end=callback(n), **kwargs) for p, n in ((ours, "ours"), (theirs, "theirs"))]
    assert shapes["ours"] == shapes["theirs"] and shapes["ours"][0] == (2, 77, ours.text_encoder.config.hidden_size)
    np.testing.assert_allclose(images[0], images[1], rtol=0, atol=TOLERANCE)
    assert np.abs(images[0] - generate(ours, prompt="a cat")).max() > 1e-4  # the change reached the UNet


def test_check_inputs_runs_once_per_call_and_img2img_extends_denoise(pipelines, monkeypatch):
    import inspect

    from minidiff import StableDiffusionImg2ImgPipeline

    ours, _ = pipelines
    calls = []
    check_inputs = ours.check_inputs
    monkeypatch.setattr(ours, "check_inputs", lambda *args, **kwargs: calls.append(1) or check_inputs(*args, **kwargs))
    generate(ours, prompt="a cat", num_inference_steps=1)
    assert calls == [1]
    with pytest.raises(ValueError, match="unknown output_type"):
        generate(ours, prompt="a cat", output_type="jpg")
    # img2img's denoise takes text-to-image's positional argument (the prompt) and adds image, strength after it
    base = inspect.signature(StableDiffusionPipeline.denoise).parameters
    img2img = inspect.signature(StableDiffusionImg2ImgPipeline.denoise).parameters
    positional = [name for name, p in base.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == ["self", "prompt"] and list(img2img)[:5] == ["self", "prompt", "image", "strength", "negative_prompt"]
    assert set(base) - set(img2img) == {"height", "width", "latents"}  # the image sets the size and the start


def positional_names(function) -> list[str]:
    import inspect

    return [name for name, p in inspect.signature(function).parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD]


@pytest.mark.parametrize("name", ["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"])
def test_call_takes_diffusers_positional_order(name):
    import minidiff

    ours, theirs = positional_names(getattr(minidiff, name).__call__), positional_names(getattr(diffusers, name).__call__)
    # every argument both have sits at the same position, so positional code means the same in both
    shared = [n for n in theirs if n in ours]
    assert [(n, ours.index(n)) for n in shared] == [(n, theirs.index(n)) for n in shared]
    assert len(shared) >= 20 and ours == theirs[: len(ours)]  # nothing of ours is positional that diffusers lacks


def test_positional_height_width_steps_mean_what_they_mean_in_diffusers(pipelines):
    ours, _ = pipelines
    steps = []
    record = lambda pipe, i, t, tensors: steps.append(tuple(tensors["latents"].shape)) or {}  # noqa: E731
    ours("a cat", 64, 48, 2, output_type="latent", callback_on_step_end=record)
    assert set(steps) == {(1, 4, 8, 6)}  # height 64, width 48 (latents at 1/8)
    assert ours.scheduler.num_inference_steps == 2 and len(steps) == len(ours.scheduler.timesteps)  # 2 steps
    np.testing.assert_array_equal(
        ours("a cat", 64, 64, 2, generator=torch.Generator().manual_seed(0), output_type="np").images,
        generate(ours, prompt="a cat", num_inference_steps=2),
    )
    # arguments of diffusers' call that minidiff lacks are refused, not silently ignored, unless left at the default
    for unsupported in ({"guidance_rescale": 0.7}, {"timesteps": [999, 500]}, {"ip_adapter_image_embeds": [torch.zeros(1)]}):
        with pytest.raises(ValueError, match="does not implement"):
            generate(ours, prompt="a cat", **unsupported)
    generate(ours, prompt="a cat", num_inference_steps=1, guidance_rescale=0.0, timesteps=None, ip_adapter_image=None)


def test_denoise_keeps_the_prompt_positional_and_the_rest_keyword_only():
    import inspect

    from minidiff import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    assert positional_names(StableDiffusionPipeline.denoise) == ["self", "prompt"]
    assert positional_names(StableDiffusionImg2ImgPipeline.denoise) == ["self", "prompt", "image", "strength"]
    assert positional_names(StableDiffusionInpaintPipeline.denoise) == ["self", "prompt", "image", "mask_image"]
    assert all(p.kind is not p.VAR_POSITIONAL for p in inspect.signature(StableDiffusionPipeline.denoise).parameters.values())


def test_decode_latents_numpy_to_pil_and_attention_slicing(pipelines):
    ours, theirs = pipelines
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with pytest.warns(FutureWarning):
        array = ours.decode_latents(latents)
    with warnings.catch_warnings(), torch.no_grad():  # diffusers' decode_latents needs no_grad around it
        warnings.simplefilter("ignore")
        expected = theirs.decode_latents(latents)
    assert array.shape == expected.shape == (1, 64, 64, 3) and array.dtype == np.float32
    np.testing.assert_allclose(array, expected, rtol=0, atol=TOLERANCE)
    assert [image.size for image in ours.numpy_to_pil(array)] == [image.size for image in theirs.numpy_to_pil(expected)]
    assert np.array_equal(np.asarray(ours.numpy_to_pil(array)[0]), np.asarray(theirs.numpy_to_pil(expected)[0]))
    before = generate(ours, prompt="a cat")
    ours.enable_attention_slicing()
    np.testing.assert_array_equal(generate(ours, prompt="a cat"), before)  # documented: nothing changes on a CPU
    ours.disable_attention_slicing()


def test_constructor_takes_safety_checker_none_and_components_round_trip(pipelines, tmp_path):
    ours, _ = pipelines
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # safety_checker=None is how courses disable it: no warning
        again = StableDiffusionPipeline(**ours.components)
    assert again.unet is ours.unet
    with pytest.warns(UserWarning, match="no safety checker"):
        StableDiffusionPipeline(**{**ours.components, "safety_checker": object()})
    folder = ours.save_pretrained(tmp_path / "saved")
    reloaded = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    reloaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(generate(reloaded, prompt="a cat"), generate(ours, prompt="a cat"), rtol=0, atol=TOLERANCE)
    ours_again = StableDiffusionPipeline.from_pretrained(folder)
    np.testing.assert_array_equal(generate(ours_again, prompt="a cat"), generate(ours, prompt="a cat"))


def test_ddpm_pipeline_saves_and_loads_like_the_course_unit_1(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    pipeline = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))
    assert set(pipeline.components) == {"unet", "scheduler"}
    folder = pipeline.save_pretrained(tmp_path / "my-ddpm")
    again = DDPMPipeline.from_pretrained(folder)
    theirs = diffusers.DDPMPipeline.from_pretrained(folder)
    ours_images = again(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="np").images
    theirs_images = theirs(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="np").images
    np.testing.assert_allclose(ours_images, theirs_images, rtol=0, atol=TOLERANCE)


class ScaleOneToken:
    """A prompt-to-prompt style edit written against diffusers' Attention helpers: multiply one text token's
    attention weights by `factor` (`cross_attention_kwargs={"token": i, "factor": f}`), then renormalize."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 token=None, factor=1.0):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probabilities = attn.get_attention_scores(query, key)  # (B*heads, N, M)
        if encoder_hidden_states is not None and token is not None:
            probabilities = probabilities.clone()
            probabilities[:, :, token] *= factor
            probabilities = probabilities / probabilities.sum(-1, keepdim=True)
        out = attn.batch_to_head_dim(torch.bmm(probabilities, value))
        return attn.to_out[1](attn.to_out[0](out))


def test_cross_attention_kwargs_reach_the_processors_as_in_diffusers(pipelines):
    ours, theirs = pipelines
    for pipeline in (ours, theirs):
        pipeline.unet.set_attn_processor(ScaleOneToken())
    try:
        edited = {name: generate(pipeline, prompt="a cat", cross_attention_kwargs={"token": 2, "factor": 5.0})
                  for name, pipeline in (("ours", ours), ("theirs", theirs))}
        unedited = generate(ours, prompt="a cat", cross_attention_kwargs={"token": 2, "factor": 1.0})
    finally:
        ours.unet.set_default_attn_processor()
        # diffusers' set_default_attn_processor refuses a processor class it does not know
        theirs.unet.set_attn_processor(diffusers.models.attention_processor.AttnProcessor2_0())
    np.testing.assert_allclose(edited["ours"], edited["theirs"], rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(unedited, generate(ours, prompt="a cat"), rtol=0, atol=TOLERANCE)
    assert np.abs(edited["ours"] - unedited).max() > 1e-4  # the edit reaches the image
