"""The `minidiff` command: generate, compare schedulers, list them, download weights, convert checkpoints, demo.

Every expected failure (bad arguments, missing weights, no network, unwritable output) ends with one
line `minidiff: error: ...` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from pathlib import Path

# CLI name -> (class name, stochastic?, order of accuracy, one line on what it is). The order is the
# method's (how the error falls with the step size), not diffusers' `scheduler.order` (model calls per step).
SCHEDULERS = {
    "pndm": ("PNDMScheduler", False, 4, "pseudo linear multistep (PLMS); SD 1.5's default"),
    "ddim": ("DDIMScheduler", False, 1, "denoising diffusion implicit models; eta=0 is deterministic"),
    "ddpm": ("DDPMScheduler", True, 1, "the original ancestral sampler; needs many steps"),
    "lms": ("LMSDiscreteScheduler", False, 4, "linear multistep in sigma, up to 4th order"),
    "euler": ("EulerDiscreteScheduler", False, 1, "Euler's method on the probability-flow ODE (Karras et al.)"),
    "euler_a": ("EulerAncestralDiscreteScheduler", True, 1, "Euler step plus fresh noise each step"),
    "dpm": ("DPMSolverMultistepScheduler", False, 2, "DPM-Solver++ 2M: second-order multistep, good at 20 steps"),
    "unipc": ("UniPCMultistepScheduler", False, 3, "unified predictor-corrector (UniP-2 + UniC: order 3), good at 10-20 steps"),
}
DTYPES = {"auto": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # auto: fastest_cpu_dtype()


class CLIError(Exception):
    """An expected failure: printed as one line, exit code 2."""


def scheduler_class(name: str):
    import minidiff.schedulers as schedulers

    if name not in SCHEDULERS:
        raise CLIError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    return getattr(schedulers, SCHEDULERS[name][0])


def parse_size(text: str) -> tuple[int, int]:
    """'512x768' -> (width 512, height 768), each a positive multiple of 8."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise CLIError(f"--size must look like 512x512 (WIDTHxHEIGHT), got {text!r}") from None
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise CLIError(f"--size {text}: width and height must be positive multiples of 8 (e.g. 512x512 or 512x768)")
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


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve every allocation from its heap and keep freed memory for the next one.

    By default each block above 32 MB gets its own mmap and goes back to the kernel when freed, so every
    large activation ((2, 4096, 1280) is 42 MB in float32; the VAE's reach 512 MB) is page-faulted in again
    on the next call. Measured on 2 cores: 8% of a float32 UNet step, a third of a bfloat16 VAE decode
    (docs/performance.md). It is a setting of the whole process, so the program sets it (this CLI, the
    benchmarks), not the library. Returns False where there is no glibc (macOS, musl): nothing changes.
    """
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, from <malloc.h>
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def load_pipeline(weights: str, dtype: str, vae_tiling: bool = False, compile: bool = False, low_memory: bool = False):
    import torch

    from minidiff.pipelines import StableDiffusionPipeline
    from minidiff.pipelines.stable_diffusion import fastest_cpu_dtype

    torch_dtype = fastest_cpu_dtype() if DTYPES[dtype] is None else getattr(torch, DTYPES[dtype])
    path = Path(weights).expanduser()
    if path.is_file():
        pipeline = StableDiffusionPipeline.from_single_file(path, torch_dtype=torch_dtype)
    elif not path.exists() and (weights.startswith((".", "/", "~")) or weights.count("/") != 1):
        raise CLIError(f"--weights {weights}: no such file or folder (download weights with `minidiff download sd15`)")
    else:
        try:
            pipeline = StableDiffusionPipeline.from_pretrained(weights, torch_dtype=torch_dtype)
        except OSError as error:
            raise CLIError(str(error).splitlines()[0]) from None
    if not low_memory:  # after loading: the weights live as long as the process, their blocks need no reuse
        keep_freed_memory()
    if vae_tiling:
        pipeline.enable_vae_tiling()
    if compile:
        pipeline.compile()
    return pipeline


# ----- commands ------------------------------------------------------------------------------------


def cmd_schedulers(args) -> None:
    for name, (class_name, stochastic, order, description) in SCHEDULERS.items():
        scheduler = scheduler_class(name)()
        kind = "stochastic" if stochastic else "deterministic"
        print(f"{name:8s} {class_name:32s} order {order}, {kind:13s} {description}")
        if args.verbose:
            defaults = {key: value for key, value in scheduler.config.items() if not key.startswith("_")}
            print(f"{'':9s}default config: {defaults}")


def cmd_generate(args) -> None:
    import torch

    width, height = parse_size(args.size)
    if args.steps < 1:
        raise CLIError(f"--steps must be at least 1, got {args.steps}")
    chosen_scheduler = scheduler_class(args.scheduler) if args.scheduler else None
    out = check_writable(Path(args.out))
    pipeline = load_pipeline(args.weights, args.dtype, args.vae_tiling, args.compile, args.low_memory)
    if chosen_scheduler:
        pipeline.scheduler = chosen_scheduler.from_config(pipeline.scheduler.config)
    generator = torch.Generator().manual_seed(args.seed)
    steps = pipeline.denoise(
        args.prompt, negative_prompt=args.negative, height=height, width=width, num_inference_steps=args.steps,
        guidance_scale=args.guidance, generator=generator,
    )
    if args.trace:
        from minidiff import trace

        frames = trace.record(steps, pipeline.latents_to_image, count=8)
        print(f"wrote {trace.save_film_strip(frames, Path(args.trace) / 'film_strip.png')}")
        print(f"wrote {trace.save_gif(frames, Path(args.trace) / 'denoising.gif')}")
        last = frames[-1].sample
    else:
        *_, final = steps
        last = pipeline.decode_latents(final.latents, "pil")[0]
    last.save(out)
    print(f"wrote {out}")


def cmd_compare(args) -> None:
    import torch

    from minidiff.grid import labeled_grid

    names = list(SCHEDULERS) if args.schedulers == "all" else [name.strip() for name in args.schedulers.split(",")]
    classes = [scheduler_class(name) for name in names]
    width, height = parse_size(args.size)
    if args.steps < 1:
        raise CLIError(f"--steps must be at least 1, got {args.steps}")
    out = check_writable(Path(args.out))
    pipeline = load_pipeline(args.weights, args.dtype, args.vae_tiling, args.compile, args.low_memory)
    base_config = pipeline.scheduler.config
    images, labels = [], []
    for name, cls in zip(names, classes):
        pipeline.scheduler = cls.from_config(base_config)
        start = time.perf_counter()
        image = pipeline(
            args.prompt, height=height, width=width, num_inference_steps=args.steps, guidance_scale=args.guidance,
            generator=torch.Generator().manual_seed(args.seed),
        ).images[0]
        images.append(image)
        labels.append(f"{name}, {args.steps} steps, {time.perf_counter() - start:.1f} s")
    labeled_grid(images, labels).save(out)
    print(f"wrote {out}")


def cmd_download(args) -> None:
    from minidiff import download

    try:
        if args.what == "sd15":
            where = download.download_sd15(args.out, args.variant, args.single_file)
        else:
            where = download.download_ddpm_cat(args.out)
    except (ConnectionError, FileNotFoundError) as error:
        raise CLIError(str(error)) from None
    print(f"downloaded to {where}")
    print(f'next: minidiff generate "a photograph of an astronaut riding a horse" --weights {where}')


def cmd_convert(args) -> None:
    from minidiff.checkpoints.single_file import convert

    if not Path(args.src).exists():
        raise CLIError(f"{args.src} does not exist")
    convert(args.src, args.dst, config=args.config, use_ema=args.use_ema)
    print(f"wrote {args.dst}")


def cmd_demo(args) -> None:
    from minidiff.demo import run_demo

    run_demo(check_writable(Path(args.out)))


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
            help="auto (default): bf16 on a CPU with AMX-BF16 or AVX512-BF16 (about 3.5x faster), else fp32",
        )
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
            command.add_argument("--scheduler", default=None, help=f"one of {', '.join(SCHEDULERS)}")
            command.add_argument("--out", default="image.png")
            command.add_argument("--trace", default=None, help="folder for a film strip PNG and a GIF of x_t and predicted x0")
        else:
            command.add_argument("--schedulers", default="all", help="comma-separated names, or all")
            command.add_argument("--out", default="compare.png")

    download = commands.add_parser("download", help="fetch real weights from the Hugging Face hub")
    download.add_argument("what", choices=["sd15", "ddpm-cat"])
    download.add_argument("--variant", choices=["fp16"], default=None)
    download.add_argument("--single-file", action="store_true", help="v1-5-pruned-emaonly.safetensors only")
    download.add_argument("--out", default=None, help="folder (default: the Hugging Face cache)")
    download.set_defaults(run=cmd_download)

    convert = commands.add_parser("convert", help="single-file checkpoint <-> diffusers folder")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument("--config", default=None, help="file -> folder: a folder of configs (default: SD 1.5's, bundled)")
    convert.add_argument("--use-ema", action="store_true", help="file -> folder: take the UNet's EMA weights")
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
