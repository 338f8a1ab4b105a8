"""Training with minidiff's models as the courses do it (HF diffusion-models-class units 1-2, fast.ai's Stable
Diffusion Deep Dive): train()/eval() with dropout, gradient checkpointing, one AdamW step against diffusers, and
the courses' constructor arguments building diffusers' state_dict keys.

minidiff's copy of each model gets diffusers' seeded random weights with a strict `load_state_dict`.
Tolerances (float32): outputs and losses <= 1e-5 from diffusers; gradients with and without checkpointing
<= 1e-6; parameters after one AdamW step <= 1e-5 from diffusers'.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")

from minidiff import AutoencoderKL, CLIPTextModel, UNet2DConditionModel, UNet2DModel  # noqa: E402

SD15_UNET_CONFIG = json.loads((Path(__file__).parents[1] / "minidiff/data/sd15/unet/config.json").read_text())
OURS = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel, "AutoencoderKL": AutoencoderKL}

# HF diffusion-models-class unit 1 (the introduction notebook), with narrower channels than its (64, 128, 128, 256)
UNIT1 = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(32, 64, 64, 64),
    norm_num_groups=8,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
)
UNIT1_FULL = dict(UNIT1, block_out_channels=(64, 128, 128, 256), norm_num_groups=32)
# unit 1's butterflies notebook (attention in the two lowest levels)
UNIT1_BUTTERFLIES = dict(
    UNIT1_FULL,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
)
# unit 2's class-conditioned MNIST: the class embedding (4 channels) concatenated to the 1-channel image
UNIT2_MNIST = dict(
    sample_size=28, in_channels=1 + 4, out_channels=1, layers_per_block=2, block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)
# the same with diffusers' own class conditioning: nn.Embedding(num_class_embeds, time_embed_dim) added to temb
UNIT2_CLASS_EMBEDS = dict(UNIT2_MNIST, in_channels=1, num_class_embeds=10)
TINY_UNET_CONDITION = dict(
    sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=24, attention_head_dim=2,
    norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
TINY_VAE = dict(
    block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
)


def pair(name: str, config: dict):
    """diffusers' model with seeded random weights, and minidiff's with the same weights (both in train mode)."""
    torch.manual_seed(0)
    theirs = getattr(diffusers, name)(**config)
    ours = OURS[name](**config)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs.train(), ours.train()


def inputs(name: str, config: dict, batch: int = 2, seed: int = 1) -> dict:
    """Keyword arguments of one forward call (x_t, t, and the text / class condition the model takes)."""
    generator = torch.Generator().manual_seed(seed)
    size = config.get("sample_size", 16)
    if name == "AutoencoderKL":
        return dict(sample=torch.randn(batch, 3, 16, 16, generator=generator))
    arguments = dict(sample=torch.randn(batch, config.get("in_channels", 4), size, size, generator=generator),
                     timestep=torch.randint(0, 1000, (batch,), generator=generator))
    if name == "UNet2DConditionModel":
        arguments["encoder_hidden_states"] = torch.randn(batch, 77, config["cross_attention_dim"], generator=generator)
    if config.get("num_class_embeds"):
        arguments["class_labels"] = torch.randint(0, config["num_class_embeds"], (batch,), generator=generator)
    return arguments


def seeded_forward(model, arguments: dict, seed: int = 123) -> torch.Tensor:
    torch.manual_seed(seed)  # dropout's random numbers
    return model(**arguments).sample


# ----- train() / eval() and dropout -----------------------------------------------------------------


@pytest.mark.parametrize("name, config", [
    ("UNet2DModel", dict(UNIT1, dropout=0.1)),
    ("UNet2DConditionModel", dict(TINY_UNET_CONDITION, dropout=0.1)),
])
def test_dropout_in_train_mode_is_diffusers_and_off_in_eval(name, config):
    """Dropout draws its masks in the same order as diffusers' (resnets' dropout after the second activation), so
    with the same seed the train-mode outputs agree; in eval mode there is no dropout."""
    theirs, ours = pair(name, config)
    arguments = inputs(name, config)
    with torch.no_grad():
        train_ours, train_theirs = seeded_forward(ours, arguments), seeded_forward(theirs, arguments)
        assert (train_ours - train_theirs).abs().max() <= 1e-5
        other_seed = seeded_forward(ours, arguments, seed=7)
        ours.eval(), theirs.eval()
        eval_ours, eval_again = seeded_forward(ours, arguments), seeded_forward(ours, arguments, seed=7)
        eval_theirs = seeded_forward(theirs, arguments)
    assert (train_ours - other_seed).abs().max() > 1e-3  # train mode: dropout masks differ per seed
    assert (train_ours - eval_ours).abs().max() > 1e-3
    assert torch.equal(eval_ours, eval_again)  # eval mode: deterministic
    assert (eval_ours - eval_theirs).abs().max() <= 1e-5


# ----- gradient checkpointing -----------------------------------------------------------------------


def gradients(model, arguments: dict) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    output = seeded_forward(model, arguments)
    output.square().mean().backward()
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}


@pytest.mark.parametrize("name, config", [
    ("UNet2DModel", dict(UNIT1, dropout=0.1)),
    ("UNet2DConditionModel", dict(TINY_UNET_CONDITION, dropout=0.1)),
    ("AutoencoderKL", TINY_VAE),
])
def test_gradient_checkpointing_gives_the_same_gradients(name, config):
    _, model = pair(name, config)
    arguments = inputs(name, config)
    assert not model.is_gradient_checkpointing
    plain = gradients(model, arguments)
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    checkpointed = gradients(model, arguments)
    model.disable_gradient_checkpointing()
    assert not model.is_gradient_checkpointing
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    worst = max((plain[key] - checkpointed[key]).abs().max().item() for key in plain)
    assert worst <= 1e-6


def test_checkpointing_really_recomputes_in_the_backward_pass():
    """With checkpointing the resnets run again during backward (counted with a forward pre-hook: torch stops
    the recomputation once it has the tensors it needs, so a hook after forward would not see it)."""
    _, model = pair("UNet2DModel", UNIT1)
    resnet = model.down_blocks[0].resnets[0]
    calls = []
    resnet.register_forward_pre_hook(lambda *_: calls.append(1))
    arguments = inputs("UNet2DModel", UNIT1)
    gradients(model, arguments)
    assert len(calls) == 1
    model.enable_gradient_checkpointing()
    gradients(model, arguments)
    assert len(calls) == 1 + 2
    with torch.no_grad():  # no gradients: nothing to recompute, runs plainly
        model(**arguments)
    assert len(calls) == 4


def test_gradient_checkpointing_refused_where_unsupported():
    text_encoder = CLIPTextModel(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=77)
    with pytest.raises(ValueError, match="does not support gradient checkpointing"):
        text_encoder.enable_gradient_checkpointing()


# ----- one AdamW step against diffusers -------------------------------------------------------------


def adamw_step(model, arguments: dict, noise: torch.Tensor) -> float:
    """One step of the DDPM loss (Ho et al. 2020, eq. 14): || eps - eps_theta(x_t, t) ||^2, with torch's AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = F.mse_loss(model(**arguments).sample, noise)
    loss.backward()
    optimizer.step()
    return loss.item()


@pytest.mark.parametrize("name, config", [
    ("UNet2DModel", UNIT1),
    ("UNet2DModel", UNIT2_MNIST),
    ("UNet2DModel", UNIT2_CLASS_EMBEDS),
    ("UNet2DConditionModel", TINY_UNET_CONDITION),
])
def test_one_adamw_step_equals_diffusers(name, config):
    theirs, ours = pair(name, config)
    arguments = inputs(name, config)
    generator = torch.Generator().manual_seed(2)
    clean = torch.randn(arguments["sample"].shape, generator=generator)
    noise = torch.randn(clean.shape[0], config.get("out_channels", 4), *clean.shape[2:], generator=generator)
    alpha_bar = 0.3  # x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps (DDPM eq. 4) at one noise level
    arguments["sample"] = alpha_bar**0.5 * clean + (1 - alpha_bar) ** 0.5 * noise[:, :1].expand_as(clean)
    loss_theirs, loss_ours = adamw_step(theirs, arguments, noise), adamw_step(ours, arguments, noise)
    assert abs(loss_ours - loss_theirs) <= 1e-5
    their_parameters = dict(theirs.named_parameters())
    worst = max((parameter - their_parameters[key]).abs().max().item() for key, parameter in ours.named_parameters())
    assert worst <= 1e-5
    moved = max((parameter - their_parameters[key]).abs().max().item() for key, parameter in
                pair(name, config)[1].named_parameters())  # the step changed the weights (fresh copy vs stepped)
    assert moved > 1e-4


# ----- the courses' constructor arguments give diffusers' keys and shapes ---------------------------


@pytest.mark.parametrize("name, config", [
    ("UNet2DModel", UNIT1),
    ("UNet2DModel", UNIT1_FULL),
    ("UNet2DModel", UNIT1_BUTTERFLIES),
    ("UNet2DModel", UNIT2_MNIST),
    ("UNet2DModel", UNIT2_CLASS_EMBEDS),
    ("UNet2DModel", {}),  # diffusers' defaults
    ("UNet2DConditionModel", TINY_UNET_CONDITION),
    ("UNet2DConditionModel", {k: v for k, v in SD15_UNET_CONFIG.items() if not k.startswith("_")}),  # SD 1.5
], ids=["unit1", "unit1-full", "unit1-butterflies", "unit2-mnist", "unit2-class-embeds", "unet2d-defaults",
        "tiny-conditional", "sd15-unet"])
def test_course_configs_build_diffusers_state_dict(name, config):
    """Built on the meta device (shapes only), so even SD 1.5's UNet costs no memory."""
    with torch.device("meta"):
        theirs, ours = getattr(diffusers, name)(**config), OURS[name](**config)
    their_shapes = {key: tuple(value.shape) for key, value in theirs.state_dict().items()}
    our_shapes = {key: tuple(value.shape) for key, value in ours.state_dict().items()}
    assert our_shapes == their_shapes  # same keys, same shapes (the order of the modules may differ)
