"""LoRA training against diffusers + peft: `unet.add_adapter(LoraConfig(...))`, two AdamW steps of the noise-prediction
loss on the tiny SD UNet from the same initial LoRA weights, then `save_lora_weights` read by diffusers.

Tolerances (issue 23): losses within 1e-5 relative; the updated LoRA weights within 1e-5 relative over all
tensors together (AdamW's first steps are about lr * sign(g), so single elements whose gradient is rounding noise
may move differently; the norm over all tensors is what is compared)."""

import warnings

import pytest
import torch

from minidiff import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from minidiff.models.lora import LoraConfig
from minidiff.models.lora_adapters import get_peft_model_state_dict

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def train_two_steps(unet, lora_parameters, generator_seed=0):
    """diffusers' train_text_to_image_lora.py loop: noise, random timesteps, add_noise, MSE on eps, AdamW."""
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(lora_parameters, lr=1e-3)
    generator = torch.Generator().manual_seed(generator_seed)
    losses = []
    for _ in range(2):
        latents = torch.randn(2, 4, 8, 8, generator=generator)
        text = torch.randn(2, 77, 32, generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (2,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        loss = torch.nn.functional.mse_loss(unet(noisy, timesteps, text).sample, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_two_training_steps_equal_diffusers_and_peft_and_the_file_loads_in_diffusers(tiny_sd15_folder, tmp_path):
    ours = UNet2DConditionModel.from_pretrained(tiny_sd15_folder, subfolder="unet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = diffusers.UNet2DConditionModel.from_pretrained(str(tiny_sd15_folder), subfolder="unet")
    theirs.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    ours.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    # the same initial A (gaussian) and B (zero) on both sides
    their_state = {key.replace(".default", ""): value for key, value in theirs.state_dict().items() if "lora_" in key}
    ours_state = get_peft_model_state_dict(ours)
    assert set(ours_state) == set(their_state)
    with torch.no_grad():
        for key, value in ours_state.items():
            value.copy_(their_state[key])
    trainable = [name for name, parameter in ours.named_parameters() if parameter.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)  # only A and B train
    base = {name: tensor.clone() for name, tensor in ours.state_dict().items() if "lora_" not in name}

    our_losses = train_two_steps(ours, [p for p in ours.parameters() if p.requires_grad])
    their_losses = train_two_steps(theirs, [p for p in theirs.parameters() if p.requires_grad])
    for mine, reference in zip(our_losses, their_losses):
        assert abs(mine - reference) <= 1e-5 * abs(reference)
    ours_state = get_peft_model_state_dict(ours)
    their_state = {key.replace(".default", ""): value for key, value in theirs.state_dict().items() if "lora_" in key}
    difference = torch.cat([(ours_state[key] - their_state[key]).flatten() for key in ours_state]).norm()
    size = torch.cat([their_state[key].flatten() for key in ours_state]).norm()
    assert difference <= 1e-5 * size, f"LoRA weights after two steps: relative difference {difference / size:.2e}"
    # only A and B moved; with B = 0 at the start, A gets no gradient in the first step but does in the second
    assert all(torch.equal(tensor, base[name]) for name, tensor in ours.state_dict().items() if "lora_" not in name)
    assert all(ours_state[key].abs().max() > 0 for key in ours_state if "lora_B" in key)

    # save as the training script does, and load the file into diffusers' pipeline: the same images
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(ours),
                                              unet_lora_adapter_metadata=ours.peft_config["default"])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        their_pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_sd15_folder), safety_checker=None)
        their_pipe.load_lora_weights(str(tmp_path))
    pipe.load_lora_weights(tmp_path)
    images = [p("a cat", height=64, width=64, num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0)).images for p in (pipe, their_pipe)]
    assert abs(images[0] - images[1]).max() <= 1e-4


def test_peft_config_object_is_accepted_and_bad_targets_are_refused(tiny_sd15_folder):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15_folder, subfolder="unet")
    unet.add_adapter(peft.LoraConfig(r=2, lora_alpha=4, target_modules=["to_q"]), adapter_name="q")
    assert unet.active_adapters() == ["q"]
    with pytest.raises(ValueError, match="match no Linear or Conv2d"):
        unet.add_adapter(LoraConfig(target_modules=["not_a_layer"]), adapter_name="x")
    with pytest.raises(ValueError, match="already in use"):
        unet.add_adapter(LoraConfig(target_modules=["to_k"]), adapter_name="q")
