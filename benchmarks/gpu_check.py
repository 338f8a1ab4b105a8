"""The GPU check: minidiff against diffusers on one device, on the same random SD 1.5 weights, in one run.

    python benchmarks/gpu_check.py                          # full-size random weights, CUDA, 512x512 (about 10 min on a T4)
    python benchmarks/gpu_check.py --tiny --device cpu      # tiny weights on a CPU: a smoke test of this script

Cases, each run by both libraries from the same seed: fp32 and fp16 txt2img with DPM++ 2M, Euler a and DDIM
(a CPU generator), DPM++ 2M with a generator on the device, img2img (DDIM, strength 0.6), then the Colab calls in
fp16 (fp32 on a CPU): model CPU offload, sequential CPU offload, VAE slicing, attention slicing, the xformers
switch. Each row prints the largest latent and image difference between the libraries, whether both outputs
are finite, seconds per step (the call between two synchronisations, divided by the steps) and peak GPU memory
(`torch.cuda.max_memory_allocated`), each with the ratio minidiff / diffusers.

Only one pipeline is on the GPU at a time (it is deleted and the cache emptied before the next), so that fp32
SD 1.5 fits a 15 GB T4. What needs CUDA (a CUDA generator, CPU offload) is skipped on a CPU with a note, and so is
diffusers' side of a call whose package is missing (accelerate for offload, xformers). The weights are written once
by weights_scripts/make_random_sd15.py (~/.cache/minidiff/random-sd15[-tiny]). Needs the test extra (diffusers).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "weights_scripts"))
sys.path.insert(0, str(REPO))

from minidiff.utils.device import peak_gpu_memory_mib, synchronize  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
SCHEDULERS = {"DPM++ 2M": "DPMSolverMultistepScheduler", "Euler a": "EulerAncestralDiscreteScheduler", "DDIM": "DDIMScheduler"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
COLAB_CALLS = ("model CPU offload", "sequential CPU offload", "VAE slicing", "attention slicing", "xformers switch")


def prepare_weights(folder: Path, tiny: bool) -> Path:
    from make_random_sd15 import make_random_sd15

    if not (folder / "model_index.json").is_file():
        print(f"writing random SD 1.5 weights to {folder} (once) ...", file=sys.stderr)
        make_random_sd15(folder, seed=0, tiny=tiny)
    return folder


def quiet_diffusers() -> None:
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def load(library: str, folder: Path, dtype: torch.dtype):
    """One library's txt2img pipeline on the CPU (moved to the device by the caller)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if library == "minidiff":
            import minidiff as module

            pipe = module.StableDiffusionPipeline.from_pretrained(folder, dtype=dtype)
        else:
            import diffusers as module

            pipe = module.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None,
                                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return module, pipe


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1], the same arithmetic for both libraries (float32, on the CPU)."""
    with torch.no_grad():
        image = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
    return (image.float().cpu() / 2 + 0.5).clamp(0, 1)


def timed(pipe, call, steps: int, device: torch.device) -> dict:
    """Run call() -> latents; seconds per step between two synchronisations; peak GPU memory; the decoded image."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    latents = call()
    synchronize(device)
    seconds = time.perf_counter() - start
    image = decode(pipe, latents)
    return {"latents": latents.float().cpu(), "image": image, "s_per_step": seconds / steps,
            "peak_mib": peak_gpu_memory_mib(device)}


def generator(kind: str, device: torch.device) -> torch.Generator:
    return torch.Generator(device if kind == "device" else "cpu").manual_seed(0)


def plain_cases(library: str, folder: Path, dtype_name: str, args, device: torch.device) -> dict:
    """Every scheduler, the device generator and img2img with one pipeline on the device; it is freed after."""
    module, pipe = load(library, folder, DTYPES[dtype_name])
    pipe.to(device)
    size, steps, results = args.size, args.steps, {}
    with torch.no_grad():
        for label, class_name in SCHEDULERS.items():
            pipe.scheduler = getattr(module, class_name).from_config(pipe.scheduler.config)
            results[f"{dtype_name} txt2img {label}"] = timed(pipe, lambda: pipe(
                PROMPT, height=size, width=size, num_inference_steps=steps, generator=generator("cpu", device),
                output_type="latent").images, steps, device)
        if device.type == "cuda":
            pipe.scheduler = module.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
            results[f"{dtype_name} txt2img DPM++ 2M, CUDA generator"] = timed(pipe, lambda: pipe(
                PROMPT, height=size, width=size, num_inference_steps=steps, generator=generator("device", device),
                output_type="latent").images, steps, device)
        img2img = module.StableDiffusionImg2ImgPipeline(**pipe.components)
        img2img.set_progress_bar_config(disable=True)
        img2img.scheduler = module.DDIMScheduler.from_config(pipe.scheduler.config)
        init = torch.Generator().manual_seed(1)
        image = torch.rand(1, 3, size, size, generator=init)  # the same picture in [0, 1] for both libraries
        results[f"{dtype_name} img2img DDIM strength 0.6"] = timed(img2img, lambda: img2img(
            PROMPT, image=image.to(device, DTYPES[dtype_name]), strength=0.6, num_inference_steps=steps,
            generator=generator("cpu", device), output_type="latent").images, max(1, int(steps * 0.6)), device)
    del pipe, img2img
    free(device)
    return results


def colab_case(library: str, folder: Path, call: str, args, device: torch.device) -> dict | str:
    """One Colab call on a fresh pipeline; a string says why this side was skipped."""
    needs_cuda = call in ("model CPU offload", "sequential CPU offload")
    if needs_cuda and device.type != "cuda":
        return "skipped: offload moves models between the CPU and a GPU; needs CUDA"
    if library == "diffusers" and needs_cuda and importlib.util.find_spec("accelerate") is None:
        return "skipped: diffusers' offload needs accelerate (pip install accelerate)"
    if library == "diffusers" and call == "xformers switch" and importlib.util.find_spec("xformers") is None:
        return "skipped: diffusers' switch needs xformers (minidiff's is a no-op: SDPA)"
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    module, pipe = load(library, folder, dtype)
    if call == "model CPU offload":
        pipe.enable_model_cpu_offload(device=device)
    elif call == "sequential CPU offload":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
        {"VAE slicing": pipe.vae.enable_slicing, "attention slicing": pipe.enable_attention_slicing,  # diffusers 0.42: on the VAE
         "xformers switch": pipe.enable_xformers_memory_efficient_attention}[call]()
    pipe.scheduler = module.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    steps = args.colab_steps
    with torch.no_grad():
        result = timed(pipe, lambda: pipe([PROMPT] * 2, height=args.size, width=args.size, num_inference_steps=steps,
                                          generator=generator("cpu", device), output_type="latent").images, steps, device)
    if hasattr(pipe, "remove_all_hooks"):
        pipe.remove_all_hooks()
    del pipe
    free(device)
    return result


def ratio(mine, theirs) -> str:
    return f"{mine / theirs:.2f}" if mine is not None and theirs else "-"


def row(name: str, mine: dict | str, theirs: dict | str) -> str:
    if isinstance(mine, str) or isinstance(theirs, str):
        note = mine if isinstance(mine, str) else theirs
        side = "minidiff" if isinstance(mine, str) else "diffusers"
        return f"| {name} | {side} {note} |||||||"
    latent_diff = (mine["latents"] - theirs["latents"]).abs().max().item()
    image_diff = (mine["image"] - theirs["image"]).abs().max().item()
    finite = all(math.isfinite(r[k].sum().item()) for r in (mine, theirs) for k in ("latents", "image"))
    memory = "-" if mine["peak_mib"] is None else f"{mine['peak_mib']:.0f} / {theirs['peak_mib']:.0f}"
    return (f"| {name} | {latent_diff:.2e} | {image_diff:.2e} | {'yes' if finite else 'NO'} | "
            f"{mine['s_per_step']:.3f} / {theirs['s_per_step']:.3f} | {ratio(mine['s_per_step'], theirs['s_per_step'])} | "
            f"{memory} | {ratio(mine['peak_mib'], theirs['peak_mib'])} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random weights at 64x64: a smoke test of this script")
    parser.add_argument("--device", default="cuda", help="the device both libraries run on (default cuda)")
    parser.add_argument("--weights", type=Path, default=None, help="random SD 1.5 folder (written once if missing)")
    parser.add_argument("--steps", type=int, default=None, help="steps of the plain cases (20; 2 with --tiny)")
    parser.add_argument("--colab-steps", type=int, default=None, help="steps of the Colab calls, batch of 2 (5; 2 with --tiny)")
    parser.add_argument("--dtypes", default="fp32,fp16", help="comma-separated: fp32, fp16")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but PyTorch sees no GPU here; run with --tiny --device cpu for the smoke test")
    dtypes = [name.strip() for name in args.dtypes.split(",")]
    if unknown := [name for name in dtypes if name not in DTYPES]:
        parser.error(f"--dtypes {unknown}: choose from {list(DTYPES)}")
    args.size = 64 if args.tiny else 512
    args.steps = args.steps or (2 if args.tiny else 20)
    args.colab_steps = args.colab_steps or (2 if args.tiny else 5)
    cache = Path.home() / ".cache" / "minidiff"
    folder = prepare_weights(args.weights or cache / ("random-sd15-tiny" if args.tiny else "random-sd15"), args.tiny)
    torch.manual_seed(0)
    quiet_diffusers()
    if args.tiny:
        torch.set_num_threads(1)  # tiny models: more threads only add overhead

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# minidiff vs diffusers on {device} ({name}), {args.size}x{args.size}, {args.steps} steps, weights {folder}\n")
    if device.type != "cuda":
        print("not on CUDA: skipped the CUDA generator and CPU offload; peak GPU memory is not measured\n")
    print("| case | max latent diff | max image diff | finite | s/step minidiff / diffusers | ratio | "
          "peak GPU MiB minidiff / diffusers | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype_name in dtypes:
        mine = plain_cases("minidiff", folder, dtype_name, args, device)
        theirs = plain_cases("diffusers", folder, dtype_name, args, device)
        for case in mine:
            print(row(case, mine[case], theirs[case]), flush=True)
    for call in COLAB_CALLS:
        label = f"{'fp16' if device.type == 'cuda' else 'fp32'} {call}, batch 2, {args.colab_steps} steps"
        print(row(label, colab_case("minidiff", folder, call, args, device),
                  colab_case("diffusers", folder, call, args, device)), flush=True)


if __name__ == "__main__":
    main()
