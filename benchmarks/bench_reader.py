"""minidiff's safetensors reader against the safetensors library's own, on a full-size SD 1.5 UNet file.

    python benchmarks/bench_reader.py [--folder ~/.cache/minidiff/random-sd15] [--repeats 3]

Writes (once, outside git) a random full-size SD 1.5 folder with weights_scripts/make_random_sd15.py and
reads its UNet (3.4 GB, float32) in a fresh subprocess per run, with each reader, kept as stored (float32)
and converted to bfloat16 (what `--dtype auto` loads on a bf16 CPU). Each run reports the load's time, the
time to then read every weight once (a float32 load is a view of the file's map: its pages come in on first
use), and the peak growth of resident memory (VmHWM - VmRSS before; page cache of the mapped file counted).
The file is read once beforehand, so every run finds it in the page cache. Ratios: minidiff / library.

    minidiff   minidiff.checkpoints.reader.read_state_dict (our mmap + madvise after each conversion)
    library    safetensors.safe_open(framework="pt") + get_tensor, the same conversion

Imports happen before the clock starts (importing minidiff takes longer than reading a mapped file).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "weights_scripts"))

IMPORTS = "from minidiff.checkpoints.reader import read_state_dict\nfrom safetensors import safe_open\n"  # not timed

READERS = {
    "minidiff": """
        tensors = read_state_dict([FILE], dtype=DTYPE)
    """,
    "library": """
        with safe_open(FILE, framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        if DTYPE is not None:
            tensors = {key: t.to(DTYPE) if t.is_floating_point() else t for key, t in tensors.items()}
    """,
}

MEASURE = """
import json, sys, time, torch
sys.path.insert(0, REPO)

{imports}

def status_kb(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

before = status_kb("VmRSS:")
start = time.perf_counter()
{reader}
seconds = time.perf_counter() - start
load_growth = status_kb("VmHWM:") - before
start = time.perf_counter()
touched = sum(float(t.float().sum()) for t in tensors.values())
use_seconds = time.perf_counter() - start
print(json.dumps(dict(seconds=seconds, use_seconds=use_seconds, load_mib=load_growth / 1024,
                      peak_mib=(status_kb("VmHWM:") - before) / 1024)))
"""


def run_once(reader: str, file: Path, dtype: str) -> dict:
    code = textwrap.dedent(MEASURE).format(imports=IMPORTS, reader=textwrap.dedent(READERS[reader]))
    code = f"REPO = {str(REPO)!r}\nFILE = {str(file)!r}\nimport torch\nDTYPE = {dtype}\n" + code
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=str(Path.home() / ".cache/minidiff/random-sd15"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    file = Path(args.folder).expanduser() / "unet" / "diffusion_pytorch_model.safetensors"
    if not file.is_file():
        from make_random_sd15 import make_random_sd15

        make_random_sd15(args.folder)
    with open(file, "rb") as warm:  # into the page cache: every run reads from memory, not disk
        while warm.read(1 << 24):
            pass
    print(f"{file} ({file.stat().st_size / 2**30:.2f} GiB), median of {args.repeats} fresh processes each")
    print("| dtype | reader | load s | read every weight s | peak growth after load MiB | after use MiB |")
    print("|---|---|---|---|---|---|")
    for dtype in ("None", "torch.bfloat16"):
        medians = {}
        for reader in READERS:
            runs = [run_once(reader, file, dtype) for _ in range(args.repeats)]
            medians[reader] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            m = medians[reader]
            name = "as stored (fp32)" if dtype == "None" else "bf16"
            print(f"| {name} | {reader} | {m['seconds']:.3f} | {m['use_seconds']:.2f} | {m['load_mib']:.0f} | {m['peak_mib']:.0f} |")
        ratios = {key: medians["minidiff"][key] / max(medians["library"][key], 1e-9) for key in medians["minidiff"]}
        print(f"| | minidiff / library | {ratios['seconds']:.2f} | {ratios['use_seconds']:.2f} | {ratios['load_mib']:.2f} | {ratios['peak_mib']:.2f} |")


if __name__ == "__main__":
    main()
