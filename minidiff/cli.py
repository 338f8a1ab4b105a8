"""The `minidiff` command: generate, compare schedulers, list them, download weights, convert checkpoints, demo.

Every expected failure (bad arguments, missing weights, no network, unwritable output) ends with one
line `minidiff: error: ...` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from minidiff.utils.cpu import keep_freed_memory
from minidiff.utils.device import as_device, auto_dtype, is_cpu

DTYPES = {"auto": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # auto: auto_dtype(device)


class CLIError(Exception):
    """An expected failure: printed as one line, exit code 2."""


def find_sampler(name: str):
    """A scheduler name as people type it ("DPM++ 2M Karras", "euler_a", "HeunDiscreteScheduler") -> its table row."""
    from minidiff.schedulers import names

    try:
        return names.find_sampler(name)
    except ValueError as error:
        raise CLIError(str(error)) from None


def samplers_to_compare(text: str) -> list:
    """--schedulers: "all" (the first name of every diffusion scheduler class) or comma-separated names."""
    from minidiff.schedulers import names

    if text == "all":
        first_of_each_class = {}
        for row in names.SAMPLER_NAMES:
            if row.family == "diffusion":  # the flow scheduler needs a velocity model, not SD 1.5's UNet
                first_of_each_class.setdefault(row.scheduler_class, row)
        return list(first_of_each_class.values())
    return [find_sampler(name.strip()) for name in text.split(",")]


def refuse_velocity_samplers(rows) -> None:
    """generate and compare load SD 1.5's noise-predicting UNet: a flow-matching sampler would give noise."""
    for row in rows:
        if row.family == "flow":
            raise CLIError(
                f"{row.name!r} ({row.scheduler_class.__name__}) steps a velocity model (rectified flow, SD3), but "
                "generate and compare run SD 1.5's noise-predicting UNet; for SD 1.5 rectified-flow checkpoints use "
                "minidiff.RectifiedFlowPipeline from Python (docs/flow_matching.md)"
            )


def parse_size(text: str) -> tuple[int, int]:
    """'512x768' -> (width 512, height 768), each a positive multiple of 8."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise CLIError(f"--size must look like 512x512 (WIDTHxHEIGHT), got {text!r}") from None
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise CLIError(f"--size {text}: width and height must be positive multiples of 8 (e.g. 512x512 or 512x768)")
    return width, height


def parse_lora(text: str) -> tuple[str, float]:
    """"FILE[:SCALE]" -> (FILE, SCALE), SCALE 1.0 when left out. FILE: a LoRA file, a folder, or a hub repo id."""
    file, colon, scale = text.rpartition(":")
    if colon and file:
        try:
            value = float(scale)
        except ValueError:
            file, value = text, 1.0  # a colon that is part of the path
    else:
        file, value = text, 1.0
    path = Path(file)
    if not path.exists() and (file.count("/") != 1 or file.startswith((".", "/", "~"))):
        raise CLIError(f"--lora {text}: {file} is neither a LoRA file, a folder holding one, nor a hub repo id "
                       "(write --lora FILE or --lora FILE:SCALE, e.g. --lora pixel.safetensors:0.8; get LCM-LoRA with "
                       "`minidiff download lcm-lora`)")
    return file, value


def apply_loras(pipeline, loras: list[tuple[str, float]]) -> None:
    """Loads each LoRA as adapter lora_0, lora_1, ... , mixes them with their scales (pipe.set_adapters), and fuses
    them (pipe.fuse_lora) for speed."""
    if not loras:
        return
    from minidiff.loaders.lora_formats import LoraFormatError

    names = []
    for index, (file, _) in enumerate(loras):
        try:
            pipeline.load_lora_weights(file, adapter_name=f"lora_{index}")
        except (LoraFormatError, FileNotFoundError) as error:
            raise CLIError(f"--lora {file}: {error}") from None
        names.append(f"lora_{index}")
    pipeline.set_adapters(names, [scale for _, scale in loras])
    pipeline.fuse_lora()  # into the weights once: the steps then cost what they cost without LoRA


def check_generation_args(args) -> tuple[int, int]:
    """--size, --guidance, --steps of generate/compare, checked before any weights are loaded: (width, height)."""
    from minidiff.pipelines.input_checks import check_finite, check_image_size

    width, height = parse_size(args.size)
    try:
        check_image_size(height, width, 1, args.vae_tiling)
    except ValueError as error:
        raise CLIError(f"--size {args.size}: {error}") from None
    try:
        check_finite(**{"--guidance": args.guidance})
    except ValueError as error:
        raise CLIError(str(error)) from None
    if args.steps < 1:
        raise CLIError(f"--steps must be at least 1, got {args.steps}")
    return width, height


def check_writable(path: Path) -> Path:
    folder = path.parent if path.suffix else path
    folder = folder if str(folder) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CLIError(f"cannot write to {folder}: {error.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise CLIError(f"cannot write to {folder}: permission denied; choose another --out")
    return path


def load_pipeline(weights: str, dtype: str, vae_tiling: bool = False, compile: bool = False, low_memory: bool = False,
                  device: str | None = None, pipeline_class=None):
    """The pipeline the command line runs: loaded in `dtype` ("auto": `auto_dtype` of the device), on `device`
    (None: CUDA when there is one, else the CPU)."""
    import torch

    from minidiff.pipelines import StableDiffusionPipeline

    StableDiffusionPipeline = pipeline_class or StableDiffusionPipeline  # noqa: N806 (the class to load)

    target = as_device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: PyTorch sees no CUDA GPU here (torch {torch.__version__}); use --device cpu")
    torch_dtype = auto_dtype(target) if DTYPES[dtype] is None else getattr(torch, DTYPES[dtype])
    path = Path(weights).expanduser()
    if path.is_file():
        pipeline = StableDiffusionPipeline.from_single_file(path, dtype=torch_dtype)
    elif not path.exists() and (weights.startswith((".", "/", "~")) or weights.count("/") != 1):
        raise CLIError(f"--weights {weights}: no such file or folder (download weights with `minidiff download sd15`)")
    else:
        try:
            pipeline = StableDiffusionPipeline.from_pretrained(weights, dtype=torch_dtype)
        except OSError as error:
            raise CLIError(str(error).splitlines()[0]) from None
    pipeline.to(target)
    if not low_memory and is_cpu(target):  # after loading: the weights live as long as the process, their blocks need no reuse
        keep_freed_memory()
    if vae_tiling:
        pipeline.enable_vae_tiling()
    if compile:
        pipeline.compile()
    return pipeline


# ----- commands ------------------------------------------------------------------------------------


def cmd_schedulers(args) -> None:
    from minidiff.schedulers.names import SAMPLER_NAMES

    for row in SAMPLER_NAMES:
        kind = "stochastic" if row.stochastic else "deterministic"
        settings = ", ".join(f"{key}={value!r}" for key, value in row.overrides.items())
        also = f" (also: {', '.join(row.aliases)})" if row.aliases else ""
        print(f"{row.name:20s} {row.scheduler_class.__name__:32s} order {row.order}, {kind:13s} {row.description}{also}")
        if args.verbose:
            scheduler = row.scheduler_class(**row.overrides)
            defaults = {key: value for key, value in scheduler.config.items() if not key.startswith("_")}
            print(f"{'':21s}{settings + '; ' if settings else ''}default config: {defaults}")


TAESD_NAMES = ("taesd", "madebyollin/taesd")


def load_tiny_autoencoder(where: str):
    """--vae / --preview's autoencoder: "taesd" (madebyollin/taesd through the hub cache) or a folder in diffusers'
    AutoencoderTiny layout. Its scaling_factor is 1.0: it decodes SD's scaled latents as they are."""
    from minidiff.models.autoencoder_tiny import AutoencoderTiny

    source = "madebyollin/taesd" if where.lower() in TAESD_NAMES else where
    if source == where and not Path(where).expanduser().is_dir():
        raise CLIError(f"--vae {where}: give taesd (madebyollin/taesd) or a folder holding TAESD's config.json and weights "
                       "(`minidiff download taesd --out FOLDER`)")
    try:
        return AutoencoderTiny.from_pretrained(source)
    except OSError as error:
        raise CLIError(f"{str(error).splitlines()[0]} (get TAESD with `minidiff download taesd`)") from None


def cmd_generate(args) -> None:
    import torch

    width, height = check_generation_args(args)
    if args.trace and args.preview:
        raise CLIError("--trace and --preview both record the loop; choose one (--preview decodes with TAESD, far cheaper)")
    chosen_sampler = find_sampler(args.scheduler) if args.scheduler else None
    loras = [parse_lora(text) for text in args.lora or []]
    refuse_velocity_samplers([chosen_sampler] if chosen_sampler else [])
    out = check_writable(Path(args.out))
    tiny_vae = load_tiny_autoencoder(args.vae) if args.vae else None
    pipeline = load_pipeline(args.weights, args.dtype, args.vae_tiling, args.compile, args.low_memory, args.device)
    if chosen_sampler:
        pipeline.scheduler = chosen_sampler.from_config(pipeline.scheduler.config)
    apply_loras(pipeline, loras)
    if tiny_vae is not None:
        pipeline.vae = tiny_vae.to(pipeline.device)  # decodes the final image too (fast path: --vae taesd)
    preview_vae = (tiny_vae or load_tiny_autoencoder("taesd")).to(pipeline.device) if args.preview else None
    generator = torch.Generator().manual_seed(args.seed)
    steps = pipeline.denoise(
        args.prompt, negative_prompt=args.negative, height=height, width=width, num_inference_steps=args.steps,
        guidance_scale=args.guidance, generator=generator, preview_vae=preview_vae,
    )
    if args.trace or args.preview:
        from minidiff.viz import trace

        seen = []
        steps = (seen.append(step) or step for step in steps)
        if args.preview:  # every step, x_t and x0 both through TAESD
            frames = trace.record(steps, lambda latents: pipeline.preview_image(latents, preview_vae))
        else:
            frames = trace.record(steps, pipeline.latents_to_image, count=8)
        folder = Path(args.preview or args.trace)
        print(f"wrote {trace.save_film_strip(frames, folder / 'film_strip.png')}")
        print(f"wrote {trace.save_gif(frames, folder / 'denoising.gif')}")
        last = frames[-1].sample if args.trace else pipeline.latents_to_output(seen[-1].latents, "pil")[0]
    else:
        *_, final = steps
        last = pipeline.latents_to_output(final.latents, "pil")[0]
    last.save(out)
    print(f"wrote {out}")


def open_picture(path: str, what: str):
    """A picture file the user named, opened with Pillow (read only), or one clear error."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(Path(path).expanduser()) as picture:
            picture.load()
            return picture
    except FileNotFoundError:
        raise CLIError(f"{what} {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as error:
        raise CLIError(f"{what} {path}: not a picture Pillow can read ({error})") from None


def cmd_inpaint(args) -> None:
    """Repaint the white part of MASK in IMAGE (the 4-channel blend, or the 9-channel inpainting UNet)."""
    import torch

    from minidiff.pipelines import StableDiffusionInpaintPipeline

    image, mask = open_picture(args.image, "IMAGE"), open_picture(args.mask, "MASK")
    if image.size != mask.size:
        raise CLIError(f"MASK is {mask.size[0]}x{mask.size[1]} but IMAGE is {image.size[0]}x{image.size[1]}: make them the same size")
    width, height = parse_size(args.size) if args.size else (image.size[0] // 8 * 8, image.size[1] // 8 * 8)
    if args.steps < 1:
        raise CLIError(f"--steps must be at least 1, got {args.steps}")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise CLIError(f"{out} exists; choose another --out, or pass --overwrite")
    check_writable(out)
    chosen_sampler = find_sampler(args.scheduler) if args.scheduler else None
    pipeline = load_pipeline(args.weights, args.dtype, args.vae_tiling, low_memory=args.low_memory, device=args.device,
                             pipeline_class=StableDiffusionInpaintPipeline)
    if chosen_sampler:
        pipeline.scheduler = chosen_sampler.from_config(pipeline.scheduler.config)
    if args.blur:
        mask = pipeline.mask_processor.blur(mask.convert("L"), blur_factor=args.blur)
    kind = "9-channel inpainting UNet" if pipeline.unet.config.in_channels == 9 else "4-channel UNet, blended each step"
    print(f"inpainting {width}x{height} with a {kind}")
    last = {}

    def remembered(steps):  # the trace keeps pictures; the final paste-back needs the last latents
        for step in steps:
            last["latents"] = step.latents
            yield step

    steps = remembered(pipeline.denoise(
        args.prompt, image=image, mask_image=mask, height=height, width=width, strength=args.strength,
        padding_mask_crop=args.padding_mask_crop, num_inference_steps=args.steps, guidance_scale=args.guidance,
        negative_prompt=args.negative, generator=torch.Generator().manual_seed(args.seed),
    ))
    if args.trace:
        from minidiff.viz import trace

        frames = trace.record(steps, pipeline.latents_to_image, count=8)
        print(f"wrote {trace.save_film_strip(frames, Path(args.trace) / 'film_strip.png')}")
        print(f"wrote {trace.save_gif(frames, Path(args.trace) / 'denoising.gif')}")
    else:
        for _ in steps:
            pass
    result = pipeline.finish(last["latents"], "pil")[0]
    result.save(out)
    print(f"wrote {out}")


def cmd_compare(args) -> None:
    import torch

    from minidiff.viz.grid import labeled_grid

    samplers = samplers_to_compare(args.schedulers)
    refuse_velocity_samplers(samplers)
    width, height = check_generation_args(args)
    out = check_writable(Path(args.out))
    pipeline = load_pipeline(args.weights, args.dtype, args.vae_tiling, args.compile, args.low_memory, args.device)
    base_config = pipeline.scheduler.config
    images, labels = [], []
    for sampler in samplers:
        pipeline.scheduler = sampler.from_config(base_config)
        start = time.perf_counter()
        image = pipeline(
            args.prompt, height=height, width=width, num_inference_steps=args.steps, guidance_scale=args.guidance,
            generator=torch.Generator().manual_seed(args.seed),
        ).images[0]
        images.append(image)
        labels.append(f"{sampler.name}, {args.steps} steps, {time.perf_counter() - start:.1f} s")
    labeled_grid(images, labels).save(out)
    print(f"wrote {out}")


def cmd_download(args) -> None:
    from minidiff.checkpoints import download

    try:
        if args.what == "lora":
            if not args.repo:
                raise CLIError("minidiff download lora REPO [--weight-name FILE]: name the hub repo of the LoRA, "
                               "e.g. latent-consistency/lcm-lora-sdv1-5")
            where = download.download_lora(args.repo, args.weight_name, args.out, overwrite=args.overwrite)
            print(f"downloaded to {where}")
            print(f'next: minidiff generate "a photograph" --lora {where}:1.0')
            return
        if args.what == "sd15":
            where = download.download_sd15(args.out, args.variant, args.single_file, overwrite=args.overwrite)
        elif args.what == "lcm-lora":
            where = download.download_lcm_lora(args.out, overwrite=args.overwrite)
        elif args.what == "taesd":
            where = download.download_taesd(args.out, overwrite=args.overwrite)
        elif args.what == "lcm-dreamshaper":
            where = download.download_lcm_dreamshaper(args.out, args.variant, overwrite=args.overwrite)
        else:
            where = download.download_ddpm_cat(args.out, overwrite=args.overwrite)
    except (ConnectionError, FileNotFoundError) as error:
        raise CLIError(str(error)) from None
    print(f"downloaded to {where}")
    prompt = '"a photograph of an astronaut riding a horse"'
    if args.what == "lcm-lora":
        print(f"next: minidiff generate {prompt} --scheduler LCM --lora {where} --steps 4 --guidance 1 --vae taesd")
    elif args.what == "taesd":
        print(f"next: minidiff generate {prompt} --vae {where}   (or --preview FOLDER: a film strip of each step)")
    else:
        print(f"next: minidiff generate {prompt} --weights {where}")


def cmd_convert(args) -> None:
    from minidiff.loaders import convert

    if not Path(args.src).exists():
        raise CLIError(f"{args.src} does not exist")
    convert(args.src, args.dst, config=args.config, use_ema=args.use_ema, overwrite=args.overwrite)
    print(f"wrote {args.dst}")


def cmd_demo(args) -> None:
    from minidiff.lab.demo import run_demo

    run_demo(check_writable(Path(args.out)))


def cmd_sweep(args) -> None:
    from minidiff.sweep import load_spec
    from minidiff.sweep.runner import estimate_seconds, run_sweep
    from minidiff.sweep.spec import MAX_JOBS, check_job_count, describe, job_count

    spec = load_spec(args.spec)  # every field checked before any weights are loaded
    if args.dry_run:  # never lists every job: a spec may make millions
        print("\n".join(describe(spec)))
        count = job_count(spec)
        if count > MAX_JOBS and not args.allow_many_jobs:
            print(f"more than {MAX_JOBS} jobs: a run refuses this spec unless given --allow-many-jobs")
        seconds_per_call, calls = estimate_seconds(spec)
        print(f"{count} jobs, {calls} UNet calls; one call measured at {seconds_per_call:.2f} s here: about "
              f"{seconds_per_call * calls / 60:.1f} min on one process (plus loading and decoding)")
        return
    check_job_count(spec, args.allow_many_jobs)  # before the folder is made
    counts = run_sweep(spec, check_writable(Path(args.out)), progress=not args.no_progress, allow_many_jobs=args.allow_many_jobs,
                       backend=args.backend)
    print(f"sweep: {counts['done']} done, {counts['failed']} failed, {counts['skipped']} already done, "
          f"of {counts['total']} jobs; see {Path(args.out) / 'index.html'}")


def cmd_tutorials(args) -> None:
    import subprocess

    from minidiff.lab.notebooks import PLACEHOLDER_GIT_URL, export_tutorials

    source = Path(args.source) if args.source else Path(__file__).resolve().parent.parent / "tutorials"
    git_url = args.git_url
    if git_url is None:  # the checkout's own origin, if it has one
        try:
            found = subprocess.run(["git", "-C", str(source), "remote", "get-url", "origin"], capture_output=True, text=True)
            git_url = found.stdout.strip() or PLACEHOLDER_GIT_URL
        except OSError:  # no git on this machine
            git_url = PLACEHOLDER_GIT_URL
    for notebook in export_tutorials(source, check_writable(Path(args.export)), git_url, overwrite=args.overwrite):
        print(f"wrote {notebook}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minidiff", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="offline: every scheduler on an exact denoiser; accuracy table and pictures")
    demo.add_argument("--out", default="minidiff-demo", help="output folder")
    demo.set_defaults(run=cmd_demo)

    listing = commands.add_parser("schedulers", help="list the schedulers")
    listing.add_argument("--verbose", "-v", action="store_true", help="also print each default config")
    listing.set_defaults(run=cmd_schedulers)

    for name, run, help_text in (
        ("generate", cmd_generate, "text to image"),
        ("compare", cmd_compare, "the same prompt and seed through several schedulers, as one labeled grid"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("prompt")
        command.add_argument("--steps", type=int, default=25 if name == "compare" else 50)
        command.add_argument("--guidance", type=float, default=7.5)
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--size", default="512x512", help="WIDTHxHEIGHT, multiples of 8")
        command.add_argument("--weights", default="stable-diffusion-v1-5/stable-diffusion-v1-5", help="folder, single file or hub repo id")
        command.add_argument(
            "--dtype", choices=sorted(DTYPES), default="auto",
            help="auto (default): fp16 on a CUDA GPU; on a CPU bf16 with AMX-BF16 or AVX512-BF16 (about 3.5x faster), else fp32",
        )
        command.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when PyTorch sees a GPU, else cpu)")
        command.add_argument("--vae-tiling", action="store_true", help="decode tile by tile: bounded memory for large images")
        command.add_argument("--compile", action="store_true", help="torch.compile the UNet and VAE decoder (compiles on first use)")
        command.add_argument(
            "--low-memory", action="store_true",
            help="give freed memory back to the system (glibc's default), for machines short of memory: a 512x512 "
                 "fp32 image then runs within a 1.5 GB memory limit (the default needs more than 2 GB), some 5-30%% "
                 "slower (docs/performance.md)",
        )
        command.set_defaults(run=run)
        if name == "generate":
            command.add_argument("--negative", default=None, help="negative prompt")
            command.add_argument("--scheduler", default=None, help="a name as in `minidiff schedulers`: \"DPM++ 2M Karras\", \"Euler a\", dpm, ...")
            command.add_argument("--out", default="image.png")
            command.add_argument("--trace", default=None, help="folder for a film strip PNG and a GIF of x_t and predicted x0")
            command.add_argument("--preview", default=None, metavar="FOLDER",
                                 help="like --trace, every step, decoded by TAESD (the --vae one, else madebyollin/taesd)")
            command.add_argument("--vae", default=None, help="taesd (madebyollin/taesd) or a TAESD folder: the tiny "
                                 "autoencoder decodes the image (fast path: --scheduler LCM --lora FILE --steps 4 --guidance 1 --vae taesd)")
            command.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                                 help="a LoRA (file, folder or hub repo) and its weight, default 1; repeat to mix several")
        else:
            command.add_argument("--schedulers", default="all", help="comma-separated names (\"DPM++ 2M Karras,Euler a\"), or all: one per scheduler class")
            command.add_argument("--out", default="compare.png")

    inpaint = commands.add_parser("inpaint", help="repaint the white part of a mask (white = repaint, black = keep)")
    inpaint.add_argument("image", help="the picture (any file Pillow reads)")
    inpaint.add_argument("mask", help="a picture of the same size: white = repaint, black = keep")
    inpaint.add_argument("prompt")
    inpaint.add_argument("--weights", default="stable-diffusion-v1-5/stable-diffusion-inpainting",
                         help="folder, single file or hub repo id (a 9-channel inpainting model, or any SD 1.5)")
    inpaint.add_argument("--steps", type=int, default=50)
    inpaint.add_argument("--strength", type=float, default=1.0, help="1.0: start from noise; less keeps more of the picture under the mask")
    inpaint.add_argument("--guidance", type=float, default=7.5)
    inpaint.add_argument("--seed", type=int, default=0)
    inpaint.add_argument("--size", default=None, help="WIDTHxHEIGHT to work at (default: the picture's, cut to multiples of 8)")
    inpaint.add_argument("--padding-mask-crop", type=int, default=None,
                         help="work on the box around the mask grown by this many pixels, then paste it back")
    inpaint.add_argument("--blur", type=int, default=0, help="blur the mask's edge by this radius (soft paste-back with --padding-mask-crop)")
    inpaint.add_argument("--negative", default=None, help="negative prompt")
    inpaint.add_argument("--scheduler", default=None, help="a name as in `minidiff schedulers`")
    inpaint.add_argument("--dtype", choices=sorted(DTYPES), default="auto")
    inpaint.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when PyTorch sees a GPU, else cpu)")
    inpaint.add_argument("--vae-tiling", action="store_true")
    inpaint.add_argument("--low-memory", action="store_true")
    inpaint.add_argument("--out", default="inpainted.png")
    inpaint.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    inpaint.add_argument("--trace", default=None, help="folder for a film strip PNG and a GIF of x_t and predicted x0")
    inpaint.set_defaults(run=cmd_inpaint)

    download = commands.add_parser("download", help="fetch real weights from the Hugging Face hub")
    download.add_argument("what", choices=["sd15", "ddpm-cat", "lcm-lora", "taesd", "lcm-dreamshaper", "lora"])
    download.add_argument("repo", nargs="?", default=None, help="lora: the hub repo id holding the LoRA file")
    download.add_argument("--weight-name", default=None, help="lora: the file in the repo (default: pytorch_lora_weights."
                          "safetensors, or the repo's only .safetensors)")
    download.add_argument("--variant", choices=["fp16"], default=None)
    download.add_argument("--single-file", action="store_true", help="v1-5-pruned-emaonly.safetensors only")
    download.add_argument("--out", default=None, help="folder (default: the Hugging Face cache)")
    download.add_argument("--overwrite", action="store_true", help="replace files in --out that no earlier download of this repo wrote")
    download.set_defaults(run=cmd_download)

    sweep = commands.add_parser("sweep", help="prompts x schedulers x steps x seeds from a JSON/TOML spec; runs under torchrun too")
    sweep.add_argument("spec", help="the sweep spec (.json or .toml; see docs/sweep.md)")
    sweep.add_argument("--out", default="sweep", help="output folder: one PNG per job, manifest.jsonl, grids/, index.html")
    sweep.add_argument("--dry-run", action="store_true", help="list the jobs and estimate the time from one measured UNet call")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bars")
    sweep.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto",
                       help="torchrun's process group: auto = nccl with a GPU per local rank, else gloo")
    sweep.add_argument("--allow-many-jobs", action="store_true", help="run a spec of more than 100000 jobs (refused without it)")
    sweep.set_defaults(run=cmd_sweep)

    tutorials = commands.add_parser("tutorials", help="export the tutorials as Jupyter notebooks (.ipynb), e.g. for Colab")
    tutorials.add_argument("--export", required=True, metavar="DIR", help="folder for the .ipynb files")
    tutorials.add_argument("--source", default=None, help="the tutorials folder (default: the checkout's tutorials/)")
    tutorials.add_argument("--git-url", default=None, help="what the Colab cell clones (default: the checkout's origin)")
    tutorials.add_argument("--overwrite", action="store_true", help="replace .ipynb files already in DIR (refused without it)")
    tutorials.set_defaults(run=cmd_tutorials)

    convert = commands.add_parser("convert", help="single-file checkpoint <-> diffusers folder")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument("--config", default=None, help="file -> folder: a folder of configs (default: SD 1.5's, bundled)")
    convert.add_argument("--use-ema", action="store_true", help="file -> folder: take the UNet's EMA weights")
    convert.add_argument("--overwrite", action="store_true", help="replace DST's existing weights/configs (refused without it)")
    convert.set_defaults(run=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (CLIError, ValueError, FileNotFoundError, OSError) as error:
        message = str(error).strip().splitlines()
        print(f"minidiff: error: {' '.join(message) if message else type(error).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minidiff: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
