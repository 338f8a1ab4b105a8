"""The coursework's own loops, run with minidiff and with diffusers on the same weights.

- fast.ai's "Stable Diffusion Deep Dive", loss guidance: the gradient of a colour loss on the decoded predicted
  x0 with respect to the latents, taken inside an LMSDiscreteScheduler loop with classifier-free guidance.
- Hugging Face's diffusion-models-class, unit 1: train a small UNet2DModel with DDPMScheduler.add_noise, sample
  with DDPMPipeline, save, reload (here and in diffusers), and the course's hand-written sampling loop.

Tolerances: losses and gradients rtol 1e-4 (atol 1e-6) against diffusers (same float32 math, different
kernels and summation order); a pipeline reloaded from its own folder gives the same images exactly.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from minidiff.models.clip_text import CLIPTextModel
from minidiff.models.unet_2d_condition import UNet2DConditionModel
from minidiff.models.vae import AutoencoderKL
from minidiff.schedulers.lms import LMSDiscreteScheduler
from minidiff.tokenizer import CLIPTokenizer

diffusers = pytest.importorskip("diffusers")

# diffusers' LMS scheduler builds its sigmas with np.array(tensor), which numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

RTOL, ATOL = 1e-4, 1e-6


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=ATOL)


# ----- the Deep Dive: loss guidance -------------------------------------------------------------------


def blue_loss(images: torch.Tensor) -> torch.Tensor:
    """The Deep Dive's colour loss: how far the blue channel is from 0.9, on average."""
    return torch.abs(images[:, 2] - 0.9).mean()


@pytest.fixture(scope="module")
def deep_dive_parts(tiny_sd15_folder):
    """(minidiff's unet, vae, text embeddings [uncond; cond]), (diffusers' unet, vae) from the same folder."""
    folder = tiny_sd15_folder
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    ids = tokenizer(["", "a watercolor painting of a lighthouse"], padding="max_length",
                    max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        text_embeddings = text_encoder(ids)[0]  # (2, 77, 32): [uncond; cond], as the notebook concatenates them
    ours = (UNet2DConditionModel.from_pretrained(folder, subfolder="unet"), AutoencoderKL.from_pretrained(folder, subfolder="vae"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = (diffusers.UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet"),
                  diffusers.AutoencoderKL.from_pretrained(str(folder), subfolder="vae"))
    return ours, theirs, text_embeddings


def loss_guided_loop(unet, vae, scheduler, text_embeddings, through_unet: bool, guidance_scale=7.5, loss_scale=200,
                     steps=4):
    """The Deep Dive's sampling loop with loss guidance at every step; returns [(loss, grad)] and the final latents.

    As the notebook: x0 = latents - sigma * eps, decoded and mapped to [0, 1], blue_loss, and the gradient moves
    the latents by -grad * sigma^2. `through_unet=False` is the notebook's cheap variant (eps under no_grad, so
    the gradient flows through the VAE only); `True` also differentiates the UNet's prediction.
    """
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator) * scheduler.init_noise_sigma
    history = []
    for i, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i]
        latents = latents.detach().requires_grad_()
        with torch.set_grad_enabled(through_unet):
            latent_model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise_pred = unet(latent_model_input, t, encoder_hidden_states=text_embeddings).sample
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        latents_x0 = latents - sigma * noise_pred
        denoised_images = vae.decode((1 / 0.18215) * latents_x0).sample / 2 + 0.5  # (1, 3, 64, 64) in [0, 1]
        loss = blue_loss(denoised_images) * loss_scale
        cond_grad = torch.autograd.grad(loss, latents)[0]
        history.append((loss.detach(), cond_grad))
        latents = latents.detach() - cond_grad * sigma**2
        latents = scheduler.step(noise_pred.detach(), t, latents).prev_sample
    return history, latents


@pytest.mark.parametrize("through_unet", [False, True], ids=["notebook", "through-unet"])
def test_loss_guidance_gradients_equal_diffusers(deep_dive_parts, tiny_sd15_folder, through_unet):
    (unet, vae), (their_unet, their_vae), text_embeddings = deep_dive_parts
    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    ours, final = loss_guided_loop(unet, vae, LMSDiscreteScheduler(**config), text_embeddings, through_unet)
    theirs, their_final = loss_guided_loop(their_unet, their_vae, diffusers.LMSDiscreteScheduler(**config),
                                           text_embeddings, through_unet)
    for (loss, grad), (their_loss, their_grad) in zip(ours, theirs, strict=True):
        assert_close(loss, their_loss)
        assert_close(grad, their_grad)
        assert grad.abs().sum() > 0  # the colour loss does reach the latents
    assert_close(final, their_final)


# ----- diffusion-models-class, unit 1: train, sample, save, reload ---------------------------------------

UNIT1_UNET = dict(  # the course's UNet2DModel, narrowed: two resolutions, one attention level
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)


def train_unit1(model, noise_scheduler, steps=4, batch_size=4):
    """The course's training loop: add_noise at random timesteps, predict the noise, MSE, AdamW. Returns the losses."""
    generator = torch.Generator().manual_seed(1)
    dataset = torch.rand(steps, batch_size, 3, 32, 32, generator=generator) * 2 - 1  # "images" in [-1, 1]
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4)
    losses = []
    for clean_images in dataset:
        noise = torch.randn(clean_images.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator).long()
        noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
        noise_pred = model(noisy_images, timesteps, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(noise_pred, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


def course_sampling_loop(model, scheduler, timesteps, seed=2):
    """The course's loop, on whatever timesteps the scheduler holds: no set_timesteps call. DDPM's step draws its
    variance noise from the global generator there (no generator= passed), so it is seeded first."""
    torch.manual_seed(seed)
    sample = torch.randn(2, 3, 32, 32)
    for t in timesteps:
        with torch.no_grad():
            residual = model(sample, t).sample
        sample = scheduler.step(residual, t, sample).prev_sample
    return sample


def test_unit1_train_sample_save_reload_equals_diffusers(tmp_path):
    from minidiff.models.unet_2d import UNet2DModel
    from minidiff.pipelines.ddpm import DDPMPipeline
    from minidiff.schedulers.ddpm import DDPMScheduler

    torch.manual_seed(0)
    model = UNet2DModel(**UNIT1_UNET)
    their_model = diffusers.UNet2DModel(**UNIT1_UNET)
    their_model.load_state_dict(model.state_dict())  # the same starting weights on both sides
    scheduler_config = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    noise_scheduler = DDPMScheduler(**scheduler_config)
    their_scheduler = diffusers.DDPMScheduler(**scheduler_config)

    # training: same batches, same noise, same AdamW -> same losses and weights (up to float32 kernels)
    losses = train_unit1(model, noise_scheduler)
    their_losses = train_unit1(their_model, their_scheduler)
    assert_close(torch.stack(losses), torch.stack(their_losses))
    for name, value in their_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-3, atol=1e-5)
    model.eval()

    # the course's sampling loop on the fresh scheduler's 1000 timesteps (the first 10: each step is x_t -> x_{t-1})
    loop = course_sampling_loop(model, noise_scheduler, noise_scheduler.timesteps[:10])
    their_loop = course_sampling_loop(their_model.eval(), their_scheduler, their_scheduler.timesteps[:10])
    assert torch.equal(noise_scheduler.timesteps, their_scheduler.timesteps)
    assert_close(loop, their_loop)

    # the pipeline, saved and reloaded: identical images for the same seed
    image_pipe = DDPMPipeline(unet=model, scheduler=noise_scheduler)
    image_pipe.set_progress_bar_config(disable=True)
    images = image_pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=5,
                        output_type="np").images
    assert images.shape == (2, 32, 32, 3)
    image_pipe.save_pretrained(tmp_path / "my_pipeline")
    reloaded = DDPMPipeline.from_pretrained(tmp_path / "my_pipeline")
    reloaded.set_progress_bar_config(disable=True)
    again = reloaded(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=5, output_type="np").images
    assert (again == images).all()

    # the course's loop again, now on the 5 timesteps the pipeline left in the scheduler
    assert noise_scheduler.timesteps.tolist() == [800, 600, 400, 200, 0]
    loop = course_sampling_loop(model, noise_scheduler, noise_scheduler.timesteps)

    # diffusers reads the folder: same UNet output, same images, same hand-written loop
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = diffusers.DDPMPipeline.from_pretrained(str(tmp_path / "my_pipeline"))
    theirs.set_progress_bar_config(disable=True)
    assert type(theirs.scheduler).__name__ == "DDPMScheduler"
    assert theirs.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    sample, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)), torch.tensor([10, 900])
    with torch.no_grad():
        assert_close(model(sample, t).sample, theirs.unet(sample, t).sample)
    their_images = theirs(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=5,
                          output_type="np").images
    torch.testing.assert_close(torch.from_numpy(images), torch.from_numpy(their_images), rtol=0, atol=1e-4)
    assert_close(loop, course_sampling_loop(theirs.unet, theirs.scheduler, theirs.scheduler.timesteps))


# ----- diffusers' textual inversion example: the learned embedding in a pipeline ----------------------------


@pytest.fixture()
def both_pipelines(tiny_sd15_folder):
    """Fresh (minidiff, diffusers) StableDiffusionPipelines on the tiny folder: loading a concept changes them."""
    from minidiff.pipelines.stable_diffusion import StableDiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_sd15_folder), safety_checker=None,
                                                                   requires_safety_checker=False)
    return StableDiffusionPipeline.from_pretrained(tiny_sd15_folder), theirs


def assert_same_concepts(ours, theirs, prompts):
    """Same vocabulary, same embedding table, and the same prompt_embeds for prompts naming the new tokens."""
    assert ours.tokenizer.get_vocab() == theirs.tokenizer.get_vocab()
    assert torch.equal(ours.text_encoder.get_input_embeddings().weight, theirs.text_encoder.get_input_embeddings().weight)
    for prompt in prompts:
        assert ours.maybe_convert_prompt(prompt) == theirs.maybe_convert_prompt(prompt, theirs.tokenizer)
        ids = ours.tokenizer(ours.maybe_convert_prompt(prompt)).input_ids
        assert ids == theirs.tokenizer(theirs.maybe_convert_prompt(prompt, theirs.tokenizer)).input_ids
        embeds, negative = ours.encode_prompt(prompt, num_images_per_prompt=1, do_classifier_free_guidance=True,
                                              negative_prompt=prompt)
        their_embeds, their_negative = theirs.encode_prompt(prompt, "cpu", 1, True, negative_prompt=prompt)
        torch.testing.assert_close(embeds, their_embeds, rtol=0, atol=1e-5)
        torch.testing.assert_close(negative, their_negative, rtol=0, atol=1e-5)


def test_load_textual_inversion_equals_diffusers_for_every_form(both_pipelines, tmp_path):
    from safetensors.torch import save_file

    ours, theirs = both_pipelines
    generator = torch.Generator().manual_seed(0)
    cat_toy = torch.randn(3, 32, generator=generator)  # a 3-vector concept, as the training script saves it
    save_file({"<cat-toy>": cat_toy}, str(tmp_path / "learned_embeds.safetensors"))
    a1111 = {"name": "birb", "string_to_param": {"*": torch.randn(1, 32, generator=generator)}, "step": 3000}
    torch.save(a1111, str(tmp_path / "birb.pt"))
    torch.save({"<pixel>": torch.randn(32, generator=generator)}, str(tmp_path / "pixel.bin"))
    rows = torch.randn(2, 32, generator=generator)
    calls = [
        dict(pretrained_model_name_or_path=str(tmp_path / "learned_embeds.safetensors")),
        dict(pretrained_model_name_or_path=str(tmp_path / "birb.pt")),
        dict(pretrained_model_name_or_path=[str(tmp_path / "pixel.bin"), {"<dict>": torch.randn(1, 32, generator=generator)}],
             token=["<pixel-art>", None]),
        dict(pretrained_model_name_or_path=rows, token=["<left>", "<right>"]),
    ]
    for call in calls:
        added = ours.load_textual_inversion(**call)
        theirs.load_textual_inversion(**call)
        assert all(name in theirs.tokenizer.added_tokens_encoder for name in added)
    assert added == ["<left>", "<right>"]
    assert ours.tokenizer.convert_tokens_to_ids(["<cat-toy>", "<cat-toy>_1", "<cat-toy>_2"]) == [49408, 49409, 49410]
    assert torch.equal(ours.text_encoder.get_input_embeddings().weight[49408:49411], cat_toy)
    assert len(ours.tokenizer) == ours.text_encoder.get_input_embeddings().num_embeddings == 49408 + 3 + 1 + 2 + 2
    assert_same_concepts(ours, theirs, ["a <cat-toy> backpack", "birb, <pixel-art> <dict>", "<left> and <right>", ""])


def test_load_textual_inversion_refuses_what_diffusers_refuses(both_pipelines):
    ours, theirs = both_pipelines
    vector = torch.randn(32)
    for pipeline in (ours, theirs):
        pipeline.load_textual_inversion([{"<concept>": vector}, {"<pair>_1": vector}])
    vocabulary = dict(ours.tokenizer.get_vocab())
    table = ours.text_encoder.get_input_embeddings().weight.clone()
    refused = [
        ({"<concept>": vector}, None, "already in the tokenizer's vocabulary"),  # loaded twice
        ({"<pair>": vector}, None, "'_1' companions"),  # prompts naming <pair> would also get <pair>_1
        ({"cat</w>": vector}, None, "already in the tokenizer's vocabulary"),  # a word of CLIP's vocabulary
        ({"<sd2>": torch.zeros(1024)}, None, "width 1024, but this text encoder's tokens have width 32"),
        ([{"<a>": vector}, {"<b>": torch.zeros(768)}], None, "width 768"),  # nothing added when one of a list fails
        (vector, None, "pass token="),
        ([{"<x>": vector}, {"<y>": vector}], ["<same>", "<same>"], "added twice"),
        ([{"<x>": vector}, {"<y>": vector}], "<one>", "pass a list of tokens"),
        (torch.randn(3, 32), ["<p>", "<q>"], "one \\(n, D\\) tensor with n = the number of tokens"),
    ]
    for source, token, message in refused:
        with pytest.raises(ValueError, match=message):
            ours.load_textual_inversion(source, token=token)
        with pytest.raises(ValueError):
            theirs.load_textual_inversion(source, token=token)
    assert ours.tokenizer.get_vocab() == vocabulary
    assert torch.equal(ours.text_encoder.get_input_embeddings().weight, table)


# ----- the Deep Dive's textual-inversion ending: a pipeline built around a hand-made PNDM scheduler -----------


def outdated_config_warnings(build) -> tuple:
    """The pipeline `build()` returns, and the FutureWarnings it gave about its scheduler's config (the config shown
    in them without minidiff's own version key, the one difference between the two libraries' scheduler reprs)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipeline = build()
    messages = [str(w.message) for w in caught if issubclass(w.category, FutureWarning) and "this scheduler:" in str(w.message)]
    return pipeline, [re.sub(r'\n  "_minidiff_version": "[^"]*",', "", message) for message in messages]


@pytest.mark.parametrize("scheduler_name, kwargs", [
    ("PNDMScheduler", dict(skip_prk_steps=True)),  # the Deep Dive's: steps_offset 0 -> 1
    ("DDIMScheduler", dict()),  # a bare DDIMScheduler: steps_offset 0 -> 1, clip_sample True -> False
])
def test_pipeline_constructor_corrects_outdated_scheduler_configs_as_diffusers(both_pipelines, scheduler_name, kwargs):
    import minidiff
    from minidiff.pipelines.img2img import StableDiffusionImg2ImgPipeline
    from minidiff.pipelines.stable_diffusion import StableDiffusionPipeline

    ours, theirs = both_pipelines
    schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **kwargs)
    parts = {name: getattr(ours, name) for name in ("vae", "text_encoder", "tokenizer", "unet")}
    their_parts = {name: getattr(theirs, name) for name in ("vae", "text_encoder", "tokenizer", "unet")}
    ours, our_warnings = outdated_config_warnings(lambda: StableDiffusionPipeline(
        **parts, scheduler=getattr(minidiff, scheduler_name)(**schedule), safety_checker=None, feature_extractor=None))
    theirs, their_warnings = outdated_config_warnings(lambda: diffusers.StableDiffusionPipeline(
        **their_parts, scheduler=getattr(diffusers, scheduler_name)(**schedule), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False))
    assert our_warnings == their_warnings and len(our_warnings) == (1 if scheduler_name == "PNDMScheduler" else 2)
    assert ours.scheduler.config.steps_offset == 1 and ours.scheduler.config.get("clip_sample", False) is False
    _, img2img_warnings = outdated_config_warnings(lambda: StableDiffusionImg2ImgPipeline(
        **parts, scheduler=getattr(minidiff, scheduler_name)(**schedule)))
    assert img2img_warnings == our_warnings

    for pipeline in (ours, theirs):
        pipeline.set_progress_bar_config(disable=True)
        pipeline.scheduler.set_timesteps(6)
    assert ours.scheduler.timesteps.tolist() == theirs.scheduler.timesteps.tolist()
    assert ours.scheduler.timesteps.tolist()[::-1][:1] == [1] and ours.scheduler.timesteps[0] == 831
    call = dict(prompt="a photo of a cat toy", height=64, width=64, num_inference_steps=6, output_type="latent")
    latents = ours(generator=torch.Generator().manual_seed(0), **call).images
    their_latents = theirs(generator=torch.Generator().manual_seed(0), **call).images
    torch.testing.assert_close(latents, their_latents, rtol=RTOL, atol=1e-5)
