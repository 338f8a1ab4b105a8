"""LoRA against diffusers + peft (oracles) on the same tiny random SD 1.5 folder and the same random LoRA files.

The files are generated in each real key layout by weights_scripts/make_random_lora.py (kohya with LoCon convs
and .alpha, kohya with SGM block names, diffusers/PEFT, diffusers' attention-processor format). Tolerances:
UNet outputs and pipeline latents within 1e-4 (fp32; both sides run the same arithmetic, so most cases agree to
~1e-6); after unfuse_lora the weights within 1e-6 of the base; after unload_lora_weights the base bit for bit.
"""

import warnings

import pytest
import torch
from safetensors.torch import save_file

from conftest import load_weights_script
from minidiff import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from minidiff.loaders.lora_formats import LoraFormatError
from minidiff.models.lora import LoraConfig, LoraLayer

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

ATOL = 1e-4
random_lora = load_weights_script("make_random_lora").random_lora


@pytest.fixture(scope="module")
def pipes(tiny_sd15_folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = diffusers.StableDiffusionPipeline.from_pretrained(
            str(tiny_sd15_folder), safety_checker=None, requires_safety_checker=False)
    ours = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


@pytest.fixture
def both(pipes):
    """The module's pipelines, every LoRA removed after the test."""
    yield pipes
    pipes[1]._lora_scale = 1.0  # diffusers keeps the last call's scale for the next load (see the test of that bug)
    for pipe in pipes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.unload_lora_weights()


def base_state(pipe) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for model in (pipe.unet, pipe.text_encoder) for name, tensor in model.state_dict().items()}


def unet_out(pipe, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        return pipe.unet(latents, 500, encoder_hidden_states=text, **kwargs).sample


def latents(pipe, **kwargs) -> torch.Tensor:
    return pipe("a cat", height=64, width=64, num_inference_steps=2, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def assert_close(ours, theirs, what: str, atol=ATOL):
    difference = (ours - theirs).abs().max().item()
    assert difference <= atol, f"{what}: max |minidiff - diffusers| = {difference:.2e} > {atol:.0e}"


def load_both(ours, theirs, state_dict, **kwargs):
    ours.load_lora_weights(dict(state_dict), **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.load_lora_weights(dict(state_dict), **kwargs)


# the attention-processor format is in the long grid: the default suite keeps to the two common formats
@pytest.mark.parametrize("layout", ["kohya", "peft", pytest.param("processor", marks=pytest.mark.long)])
def test_each_format_equals_diffusers_unfused_scaled_fused_unfused_unloaded(both, layout):
    ours, theirs = both
    base = base_state(ours)
    base_latents = latents(ours)
    # one alpha for every layer (2, not the rank 4: alpha matters); see the per-layer test for diffusers' bug
    state_dict = random_lora(ours.unet, ours.text_encoder, layout, rank=4, seed=1, alpha=2.0)
    load_both(ours, theirs, state_dict)
    assert ours.get_list_adapters() == theirs.get_list_adapters() == {"unet": ["default_0"], "text_encoder": ["default_0"]}
    assert_close(unet_out(ours), unet_out(theirs), "UNet, unfused")
    unfused = latents(ours)
    assert (unfused - base_latents).abs().max() > 1e-2  # the LoRA does change the picture
    assert_close(unfused, latents(theirs), "latents, unfused")
    ours.unload_lora_weights()
    assert all(torch.equal(tensor, base[name]) for name, tensor in base_state(ours).items())  # bit for bit
    ours.load_lora_weights(state_dict)
    scale = {"cross_attention_kwargs": {"scale": 0.5}}  # UNet and text encoder at half strength
    assert_close(latents(ours, **scale), latents(theirs, **scale), "latents, scale 0.5")
    for pipe in (ours, theirs):
        pipe._lora_scale = 1.0  # diffusers would scale the next load by it (see the test of that bug)
        pipe.fuse_lora()
    assert_close(latents(ours), latents(theirs), "latents, fused")
    for pipe in (ours, theirs):
        pipe.unfuse_lora()
    assert_close(latents(ours), unfused, "latents, after unfuse")
    for name, tensor in {**ours.unet.state_dict(), **ours.text_encoder.state_dict()}.items():
        if name.endswith("base_layer.weight"):
            assert (tensor - base[name.replace(".base_layer", "")]).abs().max() <= 1e-6, name


def test_a_scale_used_in_a_call_does_not_leak_into_the_next_load(both):
    """diffusers 0.42.1 bug: `load_lora_weights` scales the new text-encoder LoRA by `pipe.lora_scale`, the scale
    of the last call, so a LoRA loaded after a call with cross_attention_kwargs={"scale": 0.5} stays at half
    strength in the text encoder. minidiff's scale lasts one call only."""
    ours, theirs = both
    state_dict = random_lora(ours.unet, ours.text_encoder, "peft", rank=4, seed=1, locon=False)
    load_both(ours, theirs, state_dict)
    expected = latents(ours)
    for pipe in (ours, theirs):
        latents(pipe, cross_attention_kwargs={"scale": 0.5})
        pipe.unload_lora_weights()
    load_both(ours, theirs, state_dict)
    assert torch.equal(latents(ours), expected)
    assert (latents(theirs) - expected).abs().max() > 1e-3  # the bug; if this fails, diffusers fixed it
    text_layer = next(module for module in theirs.text_encoder.modules() if isinstance(getattr(module, "scaling", None), dict))
    assert text_layer.scaling["default_0"] == 0.5  # 0.5 * alpha / r, alpha = r without metadata


def test_unload_restores_the_base_modules_bit_for_bit(both):
    ours, _ = both
    base, modules = base_state(ours), dict(ours.unet.named_modules())
    ours.load_lora_weights(random_lora(ours.unet, ours.text_encoder, "kohya", seed=2))
    assert any(isinstance(module, LoraLayer) for module in ours.unet.modules())
    ours.unload_lora_weights()
    assert all(torch.equal(tensor, base[name]) for name, tensor in base_state(ours).items())
    assert all(module is modules[name] for name, module in ours.unet.named_modules())  # the same objects back


def test_two_adapters_mixed_and_deleted_as_in_diffusers(both):
    ours, theirs = both
    first = random_lora(ours.unet, ours.text_encoder, "kohya", seed=3, alpha=2.0)
    second = random_lora(ours.unet, ours.text_encoder, "peft", seed=4, locon=False)  # before any layer is wrapped
    load_both(ours, theirs, first, adapter_name="a")
    load_both(ours, theirs, second)
    assert ours.get_active_adapters() == theirs.get_active_adapters() == ["default_1"]  # the last loaded alone
    for pipe in (ours, theirs):
        pipe.set_adapters(["a", "default_1"], adapter_weights=[0.7, 0.4])
    assert ours.get_active_adapters() == ["a", "default_1"]
    assert_close(unet_out(ours), unet_out(theirs), "UNet, two adapters")
    assert_close(latents(ours), latents(theirs), "latents, two adapters (0.7, 0.4)")
    scale = {"cross_attention_kwargs": {"scale": 0.5}}
    assert_close(latents(ours, **scale), latents(theirs, **scale), "latents, two adapters at scale 0.5")
    for pipe in (ours, theirs):
        pipe.fuse_lora(lora_scale=0.5)
    assert_close(latents(ours), latents(theirs), "latents, two adapters fused at lora_scale 0.5")
    for pipe in (ours, theirs):
        pipe.unfuse_lora()
        pipe.disable_lora()
    assert_close(latents(ours), latents(theirs), "latents, disabled")
    for pipe in (ours, theirs):
        pipe.enable_lora()
        pipe.delete_adapters("a")
    assert ours.get_active_adapters() == theirs.get_active_adapters() == ["default_1"]
    assert_close(latents(ours), latents(theirs), "latents, after delete_adapters('a')")


@pytest.mark.long
def test_kohya_per_layer_alphas_follow_the_file(both):
    """Real kohya files often give convolutions another alpha than attention (conv_alpha). minidiff uses each layer's
    own .alpha. diffusers 0.42.1 has a bug here: its alpha_pattern keys for the UNet's attention layers and for
    the text encoder's k_proj / out_proj / fc2 do not match the modules, so those layers get the file's most common
    alpha instead of their own. With diffusers' scalings set to the file's alpha / r, the two agree."""
    ours, theirs = both
    state_dict = random_lora(ours.unet, ours.text_encoder, "kohya", rank=4, seed=5)  # alternating alphas 2 and 4
    load_both(ours, theirs, state_dict)
    wrong = 0
    for component in ("unet", "text_encoder"):
        for name, module in getattr(theirs, component).named_modules():
            if isinstance(getattr(module, "scaling", None), dict):
                mine = getattr(ours, component).get_submodule(name if component == "unet" else f"text_model.{name}")
                wrong += mine.scaling["default_0"] != module.scaling["default_0"]
                module.scaling["default_0"] = mine.scaling["default_0"]
    assert wrong > 0  # the bug: if this fails, diffusers has fixed it and the workaround above can go
    assert_close(latents(ours), latents(theirs), "latents with per-layer alphas")


@pytest.mark.long
def test_sgm_block_names_and_text_encoder_keys_without_text_model(both):
    """Some SD 1.5 trainers write kohya names with the original blocks (input_blocks_1_1); transformers 5 writes
    CLIP without "text_model.". Both load to the same layers as the plain names (diffusers' SD pipeline does not
    map SGM names for SD 1.5; its unet_config remap is used for SDXL only)."""
    ours, _ = both
    plain = random_lora(ours.unet, ours.text_encoder, "kohya", seed=6, alpha=2.0)
    ours.load_lora_weights(plain, adapter_name="plain")
    expected = latents(ours)
    ours.unload_lora_weights()
    sgm = random_lora(ours.unet, ours.text_encoder, "sgm", seed=6, alpha=2.0)
    assert any(key.startswith("lora_unet_input_blocks_1_1_") for key in sgm)
    ours.load_lora_weights(sgm)
    assert torch.equal(latents(ours), expected)
    ours.unload_lora_weights()
    peft = random_lora(ours.unet, ours.text_encoder, "peft", seed=7)
    ours.load_lora_weights(peft)
    expected = latents(ours)
    ours.unload_lora_weights()
    ours.load_lora_weights({key.replace("text_encoder.text_model.", "text_encoder."): value for key, value in peft.items()})
    assert torch.equal(latents(ours), expected)


def test_peft_metadata_alpha_and_save_lora_weights_round_trip_into_diffusers(both, tmp_path):
    """save_lora_weights writes diffusers' layout with the LoraConfig in the header; diffusers reads alpha from it."""
    ours, theirs = both
    ours.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                     target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    from minidiff.models.lora_adapters import get_peft_model_state_dict

    path = StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(ours.unet),
                                                     unet_lora_adapter_metadata=ours.unet.peft_config["default"])
    expected = latents(ours)
    ours.unload_lora_weights()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers={"x.lora_A.weight": torch.zeros(1)})
    ours.load_lora_weights(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.load_lora_weights(str(path))
    assert_close(latents(ours), expected, "reloaded", atol=0)
    assert_close(latents(theirs), expected, "diffusers reading minidiff's file (alpha 8 from the metadata)")


def test_img2img_and_the_text_encoder_scale(both):
    ours, theirs = both
    load_both(ours, theirs, random_lora(ours.unet, ours.text_encoder, "peft", seed=8, locon=False))
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ours_i2i = StableDiffusionImg2ImgPipeline(**{k: v for k, v in ours.components.items()
                                                 if k not in ("safety_checker", "feature_extractor")})
    theirs_i2i = diffusers.StableDiffusionImg2ImgPipeline(**theirs.components)
    for pipe in (ours_i2i, theirs_i2i):
        pipe.set_progress_bar_config(disable=True)
    kwargs = dict(image=image * 2 - 1, strength=0.6, num_inference_steps=3, output_type="latent",
                  cross_attention_kwargs={"scale": 0.5})
    a = ours_i2i("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = theirs_i2i("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert_close(a, b, "img2img latents with a LoRA at scale 0.5")
    embeds = {s: ours.encode_prompt("a cat", None, 1, False, lora_scale=s)[0] for s in (0.0, 1.0)}
    assert (embeds[0.0] - embeds[1.0]).abs().max() > 1e-3  # the scale reaches the text encoder's LoRA


BAD = {
    "LyCORIS LoHa": {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(4, 4)},
    "LyCORIS LoKr": {"lora_unet_down_blocks_0_attentions_0_proj_in.lokr_w1": torch.zeros(4, 4)},
    "SDXL": {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 32)},
    "Flux": {"transformer.single_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32)},
    "match no": {"unet.down_blocks.9.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32),
                 "unet.down_blocks.9.attentions.0.proj_in.lora_B.weight": torch.zeros(32, 4)},
}


@pytest.mark.parametrize("what", list(BAD))
def test_bad_files_are_refused_naming_format_and_keys_and_change_nothing(both, what):
    ours, _ = both
    ours.load_lora_weights(random_lora(ours.unet, ours.text_encoder, "peft", seed=9, locon=False), adapter_name="kept")
    before = latents(ours)
    with pytest.raises(LoraFormatError, match=what) as error:
        ours.load_lora_weights(BAD[what])
    assert next(iter(BAD[what])) in str(error.value)
    assert ours.get_list_adapters() == {"unet": ["kept"], "text_encoder": ["kept"]}
    assert torch.equal(latents(ours), before)


def test_rank_mismatch_wrong_width_and_repeated_name_are_refused(both):
    ours, _ = both
    good = random_lora(ours.unet, ours.text_encoder, "peft", seed=10, locon=False)
    key = next(key for key in good if key.endswith("attn2.to_k.lora_A.weight"))
    with pytest.raises(LoraFormatError, match="disagree on the rank"):
        ours.load_lora_weights({**good, key: torch.zeros(3, good[key].shape[1])})
    with pytest.raises(LoraFormatError, match="SD 2.x"):  # a LoRA for a 1024-wide text encoder
        ours.load_lora_weights({**good, key: torch.zeros(4, 1024)})
    ours.load_lora_weights(good, adapter_name="x")
    with pytest.raises(ValueError, match="already in use"):
        ours.load_lora_weights(good, adapter_name="x")
    assert ours.get_list_adapters() == {"unet": ["x"], "text_encoder": ["x"]}


@pytest.mark.long
def test_pickled_lora_files_are_read_without_unpickling_code(both, tmp_path):
    ours, _ = both
    state_dict = random_lora(ours.unet, ours.text_encoder, "peft", seed=11, locon=False)
    torch.save(state_dict, tmp_path / "lora.bin")
    ours.load_lora_weights(tmp_path / "lora.bin")
    expected = latents(ours)
    ours.unload_lora_weights()
    save_file(state_dict, str(tmp_path / "lora.safetensors"))
    ours.load_lora_weights(tmp_path, weight_name="lora.safetensors")
    assert torch.equal(latents(ours), expected)
