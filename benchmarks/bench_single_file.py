"""Peak memory of loading a full-size SD 1.5 single file: minidiff (and, with --diffusers, diffusers).

    python benchmarks/bench_single_file.py [--cache ~/.cache/minidiff/bench-single-file] [--diffusers]

Writes (once, into the cache folder, outside git) a random full-size SD 1.5 folder with
weights_scripts/make_random_sd15.py and converts it to `sd15.safetensors` (4.3 GB, float32). Then,
for float32 and float16, each load runs in a fresh subprocess that reports

    peak growth = VmHWM (the process's peak resident memory) - VmRSS just before the call

next to the size of the loaded weights in the target dtype (minidiff's goal: at most 1.2x), and the
same growth after every weight has been read once ("after use": a float32 load is a view of the
file's map, so its pages come in on first use, not during the load).
(`ru_maxrss` is not used: after fork + exec it still holds the forked parent's peak.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "weights_scripts"))

LOADERS = {
    "minidiff": """
        from minidiff.loaders.single_file import load_single_file
        parts = load_single_file(FILE, torch_dtype=DTYPE)
        modules = [parts.unet, parts.vae, parts.text_encoder]
    """,
    "diffusers": """
        import diffusers
        pipe = diffusers.StableDiffusionPipeline.from_single_file(
            FILE, config=FOLDER, local_files_only=True, torch_dtype=DTYPE, safety_checker=None, requires_safety_checker=False
        )
        modules = [pipe.unet, pipe.vae, pipe.text_encoder]
    """,
}

MEASURE = """
import json, sys, time, torch
sys.path.insert(0, REPO)

def status_kb(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

before = status_kb("VmRSS:")
start = time.perf_counter()
{loader}
seconds = time.perf_counter() - start
peak_growth = (status_kb("VmHWM:") - before) * 1024
tensors = [t for m in modules for t in [*m.parameters(), *m.buffers()]]
weights = sum(t.numel() * t.element_size() for t in tensors)
touched = sum(float(t.detach().float().sum()) for t in tensors)  # read every weight once (mapped pages come in)
print(json.dumps(dict(peak_growth=peak_growth, used_growth=(status_kb("VmHWM:") - before) * 1024, weights=weights, seconds=seconds)))
"""


def prepare(cache: Path) -> tuple[Path, Path]:
    """The random SD 1.5 folder and its single file, written once."""
    from make_random_sd15 import make_random_sd15

    from minidiff.loaders import convert

    folder, file = cache / "random-sd15", cache / "sd15.safetensors"
    if not (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        print(f"writing a random full-size SD 1.5 folder to {folder} ...", flush=True)
        make_random_sd15(folder, seed=0)
    if not file.is_file():
        print(f"converting it to {file} ...", flush=True)
        convert(folder, file)
    return folder, file


def measure(library: str, file: Path, folder: Path, dtype: str) -> dict:
    loader = textwrap.dedent(LOADERS[library]).strip()
    script = MEASURE.format(loader=loader)
    header = f"REPO = {str(REPO)!r}\nFILE = {str(file)!r}\nFOLDER = {str(folder)!r}\nimport torch\nDTYPE = torch.{dtype}\n"
    result = subprocess.run([sys.executable, "-c", header + script], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{library} {dtype} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("~/.cache/minidiff/bench-single-file").expanduser())
    parser.add_argument("--diffusers", action="store_true", help="also measure diffusers' from_single_file")
    args = parser.parse_args(argv)
    folder, file = prepare(args.cache)
    libraries = ["minidiff", "diffusers"] if args.diffusers else ["minidiff"]
    print(f"{'library':<10} {'dtype':<8} {'weights':>9} {'peak growth':>12} {'ratio':>6} {'after use':>10} {'seconds':>8}")
    for dtype in ("float32", "float16"):
        for library in libraries:
            found = measure(library, file, folder, dtype)
            ratio = found["peak_growth"] / found["weights"]
            print(
                f"{library:<10} {dtype:<8} {found['weights'] / 2**30:8.2f}G {found['peak_growth'] / 2**30:11.2f}G "
                f"{ratio:6.2f} {found['used_growth'] / found['weights']:9.2f}x {found['seconds']:8.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
