"""Download real weights (through hub.py, minidiff's one door to huggingface_hub): only the files minidiff needs,
resumable, with progress.

    minidiff download sd15                     # diffusers folder layout, fp32 (about 4.3 GB)
    minidiff download sd15 --variant fp16      # the fp16 files (about 2.1 GB)
    minidiff download sd15 --single-file       # v1-5-pruned-emaonly.safetensors (about 4.3 GB)
    minidiff download ddpm-cat                 # google/ddpm-cat-256
    minidiff download lcm-lora                 # latent-consistency/lcm-lora-sdv1-5: one LoRA file (about 135 MB)
    minidiff download taesd                    # madebyollin/taesd, the tiny autoencoder (diffusers layout, about 10 MB)
    minidiff download lcm-dreamshaper          # SimianLuo/LCM_Dreamshaper_v7, a full LCM checkpoint (folder layout)

The scripts in weights_scripts/ call these functions. Choosing the files is separate from fetching
them (`select_sd15_files`), so the choice is tested without a network.
"""

from __future__ import annotations

from pathlib import Path

from minidiff.checkpoints.hub import download_file, list_repo_files
from minidiff.utils.no_clobber import refuse_to_replace

SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD15_SINGLE_FILE = "v1-5-pruned-emaonly.safetensors"
DDPM_CAT_REPO = "google/ddpm-cat-256"
LCM_LORA_REPO = "latent-consistency/lcm-lora-sdv1-5"
LCM_LORA_FILE = "pytorch_lora_weights.safetensors"
TAESD_REPO = "madebyollin/taesd"
TAESD_FILES = ["config.json", "diffusion_pytorch_model.safetensors"]
LCM_DREAMSHAPER_REPO = "SimianLuo/LCM_Dreamshaper_v7"

# component folder -> the weight file's base name in that folder
SD15_COMPONENTS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}
SD15_CONFIG_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
]


def select_sd15_files(repo_files: list[str], variant: str | None = None, single_file: bool = False,
                      repo: str = SD15_REPO) -> list[str]:
    """The files of the SD 1.5 repo (or another in its folder layout, `repo`) to fetch: configs + tokenizer + one
    safetensors per model (or the single file)."""
    available = set(repo_files)
    if single_file:
        if SD15_SINGLE_FILE not in available:
            raise FileNotFoundError(f"{SD15_SINGLE_FILE} is not in the repo's file list")
        return [SD15_SINGLE_FILE]
    chosen = [name for name in SD15_CONFIG_FILES if name in available]
    for folder, stem in SD15_COMPONENTS.items():
        name = f"{folder}/{stem}.{variant}.safetensors" if variant else f"{folder}/{stem}.safetensors"
        if name not in available:
            hint = " (try without --variant)" if variant else ""
            raise FileNotFoundError(f"{name} is not in {repo}{hint}")
        chosen.append(name)
    return chosen


def select_ddpm_files(repo_files: list[str]) -> list[str]:
    """config.json, scheduler_config.json and the weights (safetensors when the repo has them, else the .bin)."""
    available = set(repo_files)
    weights = "diffusion_pytorch_model.safetensors"
    if weights not in available:
        weights = "diffusion_pytorch_model.bin"
    return [name for name in ("config.json", "scheduler_config.json", weights) if name in available]


def select_files(repo_files: list[str], wanted: list[str], repo: str) -> list[str]:
    """Exactly `wanted`, each of which must be in the repo's listing (a missing one is named)."""
    missing = [name for name in wanted if name not in set(repo_files)]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} not in {repo}'s file list")
    return list(wanted)


def _fetch(repo_id: str, choose, out: str | Path | None, overwrite: bool = False) -> Path:
    """List the repo, choose files, download each (resumable: huggingface_hub keeps partial files)."""
    try:
        files = list_repo_files(repo_id)
    except Exception as error:
        raise ConnectionError(
            f"cannot reach the Hugging Face hub to download {repo_id} ({type(error).__name__}). "
            "Check your network (and HF_HUB_OFFLINE), or copy the weights onto this machine and pass their folder "
            "with --weights. Without any weights, `minidiff demo` runs fully offline."
        ) from None
    chosen = choose(files)
    if out:  # a file an earlier download of it left (hub metadata beside it) resumes; any other is the user's
        written_by_hub = Path(out) / ".cache" / "huggingface" / "download"
        theirs = [Path(out) / name for name in chosen if not (written_by_hub / f"{name}.metadata").is_file()]
        refuse_to_replace(theirs, f"downloading {repo_id} into {out}", overwrite)
    local = None
    for name in chosen:
        local = download_file(repo_id, name, local_dir=out)
    root = Path(out) if out else Path(local).parents[len(Path(chosen[-1]).parts) - 1]
    return root


def download_sd15(out: str | Path | None = None, variant: str | None = None, single_file: bool = False,
                  overwrite: bool = False) -> Path:
    """Fetch SD 1.5; returns the folder (or file) to pass to `--weights`. Files in `out` that no earlier download
    wrote are replaced only with `overwrite`."""
    root = _fetch(SD15_REPO, lambda files: select_sd15_files(files, variant, single_file), out, overwrite)
    return root / SD15_SINGLE_FILE if single_file else root


def download_ddpm_cat(out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Fetch google/ddpm-cat-256; returns its folder (`overwrite` as in download_sd15)."""
    return _fetch(DDPM_CAT_REPO, select_ddpm_files, out, overwrite)


def select_lora_file(repo_files: list[str], weight_name: str | None = None) -> list[str]:
    """The one LoRA file of a repo: `weight_name`, else pytorch_lora_weights.safetensors, else its only .safetensors."""
    if weight_name:
        if weight_name not in repo_files:
            raise FileNotFoundError(f"{weight_name} is not in the repo; it has {sorted(repo_files)[:10]}")
        return [weight_name]
    if "pytorch_lora_weights.safetensors" in repo_files:
        return ["pytorch_lora_weights.safetensors"]
    candidates = sorted(name for name in repo_files if name.endswith(".safetensors"))
    if len(candidates) != 1:
        raise FileNotFoundError(f"the repo holds {len(candidates)} .safetensors files and no pytorch_lora_weights."
                                f"safetensors: pass --weight-name (one of {candidates[:10]})")
    return candidates


def download_lora(repo_id: str, weight_name: str | None = None, out: str | Path | None = None,
                  overwrite: bool = False) -> Path:
    """Fetch one LoRA file of a hub repo; returns the file (for `--lora` / `pipe.load_lora_weights`)."""
    chosen: list[str] = []

    def choose(files):
        chosen.extend(select_lora_file(files, weight_name))
        return chosen

    root = _fetch(repo_id, choose, out, overwrite)
    return root / chosen[0]
def download_lcm_lora(out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Fetch LCM-LoRA for SD 1.5 (one safetensors file in kohya/PEFT keys); returns the file, for `--lora`."""
    return _fetch(LCM_LORA_REPO, lambda files: select_files(files, [LCM_LORA_FILE], LCM_LORA_REPO), out, overwrite) / LCM_LORA_FILE


def download_taesd(out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Fetch TAESD in diffusers' layout (config.json + weights); returns its folder, for `--vae` / `--preview`."""
    return _fetch(TAESD_REPO, lambda files: select_files(files, TAESD_FILES, TAESD_REPO), out, overwrite)


def download_lcm_dreamshaper(out: str | Path | None = None, variant: str | None = None,
                             overwrite: bool = False) -> Path:
    """Fetch LCM Dreamshaper v7 (SD 1.5's folder layout, a UNet with the guidance embedding); returns its folder."""
    return _fetch(LCM_DREAMSHAPER_REPO, lambda files: select_sd15_files(files, variant, repo=LCM_DREAMSHAPER_REPO), out, overwrite)
