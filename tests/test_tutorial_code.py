"""Every PyTorch code block of the two reference tutorials, run on minidiff.

The code below is the tutorials' code (`../shared/reference/pipelines_models_schedulers_ko.md` and
`schedulers_ko.md`) with only these changes, each marked `# changed:`:
- imports from `minidiff` instead of `diffusers` / `transformers`;
- model ids pointed at local random-weight folders (tiny SD 1.5 and ddpm-cat-256 shapes, same layouts);
- "cuda" -> "cpu";
- the schedulers tutorial's images are 128x128 in the default run (512x512, as written, under `-m slow`);
- `login()` is left out (there is no hub here), and `>>>` prompts are dropped.
Random weights make noise, not cats or astronauts: the tests check that the code runs and that the
results have the documented shapes, values and types.
"""

import pytest
from PIL import Image


@pytest.fixture(scope="module")
def ddpm_cat_folder(tmp_path_factory):
    from conftest import load_weights_script

    return str(load_weights_script("make_random_ddpm").make_random_ddpm(tmp_path_factory.mktemp("ddpm-cat"), seed=0, tiny=True))


def test_deconstruct_a_basic_pipeline(ddpm_cat_folder):
    from minidiff import DDPMPipeline  # changed: minidiff

    ddpm = DDPMPipeline.from_pretrained(ddpm_cat_folder).to("cpu")  # changed: local folder, cpu
    ddpm.set_progress_bar_config(disable=True)
    image = ddpm(num_inference_steps=25).images[0]
    image
    assert isinstance(image, Image.Image) and image.size == (32, 32)


def test_deconstruct_a_basic_pipeline_step_by_step(ddpm_cat_folder):
    from minidiff import DDPMScheduler, UNet2DModel  # changed: minidiff

    scheduler = DDPMScheduler.from_pretrained(ddpm_cat_folder)  # changed: local folder
    model = UNet2DModel.from_pretrained(ddpm_cat_folder).to("cpu")  # changed: local folder, cpu

    scheduler.set_timesteps(50)

    scheduler.timesteps
    assert scheduler.timesteps.tolist() == list(range(980, -1, -20))  # the tensor the tutorial prints

    import torch

    sample_size = model.config.sample_size
    noise = torch.randn((1, 3, sample_size, sample_size), device="cpu")  # changed: cpu

    input = noise

    for t in scheduler.timesteps:
        with torch.no_grad():
            noisy_residual = model(input, t).sample
        previous_noisy_sample = scheduler.step(noisy_residual, t, input).prev_sample
        input = previous_noisy_sample

    from PIL import Image
    import numpy as np

    image = (input / 2 + 0.5).clamp(0, 1)
    image = image.cpu().permute(0, 2, 3, 1).numpy()[0]
    image = Image.fromarray((image * 255).round().astype("uint8"))
    image
    assert image.size == (sample_size, sample_size)


def test_deconstruct_the_stable_diffusion_pipeline(tiny_sd15_folder):
    model_id = str(tiny_sd15_folder)  # changed: "CompVis/stable-diffusion-v1-4" -> a local random folder

    from PIL import Image
    import torch
    from minidiff import CLIPTextModel, CLIPTokenizer  # changed: minidiff instead of transformers
    from minidiff import AutoencoderKL, UNet2DConditionModel, PNDMScheduler  # changed: minidiff

    vae = AutoencoderKL.from_pretrained(model_id, subfolder="vae")
    tokenizer = CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model_id, subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(model_id, subfolder="unet")

    from minidiff import UniPCMultistepScheduler  # changed: minidiff

    scheduler = UniPCMultistepScheduler.from_pretrained(model_id, subfolder="scheduler")

    torch_device = "cpu"  # changed: cuda -> cpu
    vae.to(torch_device)
    text_encoder.to(torch_device)
    unet.to(torch_device)

    prompt = ["a photograph of an astronaut riding a horse"]
    height = 512  # Stable Diffusion의 기본 높이
    width = 512  # Stable Diffusion의 기본 너비
    num_inference_steps = 25  # 노이즈 제거 스텝 수
    guidance_scale = 7.5  # classifier-free guidance를 위한 scale
    generator = torch.manual_seed(0)  # 초기 잠재 노이즈를 생성하는 seed generator
    batch_size = len(prompt)

    text_input = tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )

    with torch.no_grad():
        text_embeddings = text_encoder(text_input.input_ids.to(torch_device))[0]

    max_length = text_input.input_ids.shape[-1]
    uncond_input = tokenizer([""] * batch_size, padding="max_length", max_length=max_length, return_tensors="pt")
    uncond_embeddings = text_encoder(uncond_input.input_ids.to(torch_device))[0]

    text_embeddings = torch.cat([uncond_embeddings, text_embeddings])
    assert text_embeddings.shape == (2, 77, text_encoder.config.hidden_size)

    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8

    latents = torch.randn(
        (batch_size, unet.config.in_channels, height // 8, width // 8),
        generator=generator,
        device=torch_device,
    )

    latents = latents * scheduler.init_noise_sigma

    from tqdm.auto import tqdm

    scheduler.set_timesteps(num_inference_steps)

    for t in tqdm(scheduler.timesteps):
        # classifier-free guidance를 수행하는 경우 두번의 forward pass를 수행하지 않도록 latent를 확장.
        latent_model_input = torch.cat([latents] * 2)

        latent_model_input = scheduler.scale_model_input(latent_model_input, timestep=t)

        # noise residual 예측
        with torch.no_grad():
            noise_pred = unet(latent_model_input, t, encoder_hidden_states=text_embeddings).sample

        # guidance 수행
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)

        # 이전 노이즈 샘플을 계산 x_t -> x_t-1
        latents = scheduler.step(noise_pred, t, latents).prev_sample

    # latent를 스케일링하고 vae로 이미지 디코딩
    latents = 1 / 0.18215 * latents
    with torch.no_grad():
        image = vae.decode(latents).sample

    image = (image / 2 + 0.5).clamp(0, 1)
    image = image.detach().cpu().permute(0, 2, 3, 1).numpy()
    images = (image * 255).round().astype("uint8")
    pil_images = [Image.fromarray(image) for image in images]
    pil_images[0]
    assert pil_images[0].size == (512, 512)


# The tutorial runs in float16 at 512x512. CPUs without float16 arithmetic (AVX2 only, e.g. an AMD EPYC here)
# emulate it: the tiny UNet's step takes 1.6 s in float16 against 0.5 s in float32 at 64x64 latents, and the
# six runs below took 7.3 minutes. The default suite runs the same code at 128x128; -m slow at 512x512.
@pytest.mark.parametrize("size", [128, pytest.param(512, marks=pytest.mark.slow)])
def test_schedulers_tutorial(tiny_sd15_folder, size):
    # from huggingface_hub import login   # changed: no hub here, so no login()
    from minidiff import DiffusionPipeline  # changed: minidiff
    import torch

    # Now we can download the pipeline
    pipeline = DiffusionPipeline.from_pretrained(str(tiny_sd15_folder), torch_dtype=torch.float16)  # changed: local folder

    pipeline.to("cpu")  # changed: cuda -> cpu
    pipeline.set_progress_bar_config(disable=True)  # changed: quiet test output

    pipeline.scheduler
    assert repr(pipeline.scheduler).startswith("PNDMScheduler {") and '"skip_prk_steps": true' in repr(pipeline.scheduler)

    prompt = "A photograph of an astronaut riding a horse on Mars, high resolution, high definition."

    generator = torch.Generator(device="cpu").manual_seed(8)  # changed: cuda -> cpu
    image = pipeline(prompt, generator=generator, height=size, width=size).images[0]  # changed: size
    image
    assert image.size == (size, size)

    pipeline.scheduler.compatibles
    names = {cls.__name__ for cls in pipeline.scheduler.compatibles}
    assert {
        "LMSDiscreteScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
        "PNDMScheduler", "DDPMScheduler", "EulerAncestralDiscreteScheduler",
    } <= names

    pipeline.scheduler.config
    assert pipeline.scheduler.config["beta_schedule"] == "scaled_linear" and pipeline.scheduler.config.steps_offset == 1

    from minidiff import DDIMScheduler  # changed: minidiff

    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)

    generator = torch.Generator(device="cpu").manual_seed(8)  # changed: cuda -> cpu
    image = pipeline(prompt, generator=generator, height=size, width=size).images[0]  # changed: size
    image

    from minidiff import LMSDiscreteScheduler  # changed: minidiff

    pipeline.scheduler = LMSDiscreteScheduler.from_config(pipeline.scheduler.config)

    generator = torch.Generator(device="cpu").manual_seed(8)  # changed: cuda -> cpu
    image = pipeline(prompt, generator=generator, height=size, width=size).images[0]  # changed: size
    image

    from minidiff import EulerDiscreteScheduler  # changed: minidiff

    pipeline.scheduler = EulerDiscreteScheduler.from_config(pipeline.scheduler.config)

    generator = torch.Generator(device="cpu").manual_seed(8)  # changed: cuda -> cpu
    image = pipeline(prompt, generator=generator, num_inference_steps=30, height=size, width=size).images[0]  # changed: size
    image

    from minidiff import EulerAncestralDiscreteScheduler  # changed: minidiff

    pipeline.scheduler = EulerAncestralDiscreteScheduler.from_config(pipeline.scheduler.config)

    generator = torch.Generator(device="cpu").manual_seed(8)  # changed: cuda -> cpu
    image = pipeline(prompt, generator=generator, num_inference_steps=30, height=size, width=size).images[0]  # changed: size
    image

    from minidiff import DPMSolverMultistepScheduler  # changed: minidiff

    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)

    generator = torch.Generator(device="cpu").manual_seed(8)  # changed: cuda -> cpu
    image = pipeline(prompt, generator=generator, num_inference_steps=20, height=size, width=size).images[0]  # changed: size
    image
    assert image.size == (size, size) and image.mode == "RGB"
    assert pipeline.scheduler.config.timestep_spacing == "linspace"  # DPM's own default, not PNDM's "leading"
