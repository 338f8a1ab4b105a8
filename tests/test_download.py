"""Weight downloads: which files are chosen, and the message when the hub cannot be reached (no network needed)."""

import pytest

from minidiff import download

SD15_LISTING = [
    ".gitattributes", "README.md", "model_index.json", "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.ckpt",
    "v1-5-pruned.safetensors", "scheduler/scheduler_config.json", "feature_extractor/preprocessor_config.json",
    "safety_checker/model.safetensors", "safety_checker/config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.non_ema.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
]


def test_sd15_folder_layout_takes_configs_tokenizer_and_one_safetensors_per_model():
    chosen = download.select_sd15_files(SD15_LISTING)
    assert "unet/diffusion_pytorch_model.safetensors" in chosen
    assert "text_encoder/model.safetensors" in chosen
    assert "tokenizer/merges.txt" in chosen and "model_index.json" in chosen
    assert not any(name.endswith((".bin", ".ckpt")) or "fp16" in name or "safety_checker" in name for name in chosen)
    assert not any(name.startswith("v1-5") for name in chosen)


def test_sd15_fp16_variant_takes_only_fp16_weights():
    chosen = download.select_sd15_files(SD15_LISTING, variant="fp16")
    weights = [name for name in chosen if name.endswith(".safetensors")]
    assert sorted(weights) == [
        "text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]


def test_sd15_single_file_is_just_the_emaonly_checkpoint():
    assert download.select_sd15_files(SD15_LISTING, single_file=True) == ["v1-5-pruned-emaonly.safetensors"]


def test_missing_variant_is_named():
    listing = [name for name in SD15_LISTING if "fp16" not in name]
    with pytest.raises(FileNotFoundError, match="unet/diffusion_pytorch_model.fp16.safetensors"):
        download.select_sd15_files(listing, variant="fp16")


def test_ddpm_prefers_safetensors_and_falls_back_to_bin():
    listing = ["config.json", "scheduler_config.json", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors"]
    assert download.select_ddpm_files(listing) == ["config.json", "scheduler_config.json", "diffusion_pytorch_model.safetensors"]
    assert download.select_ddpm_files(listing[:3])[-1] == "diffusion_pytorch_model.bin"


def test_offline_download_says_what_to_do(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the real client, refusing at once as it does offline
    with pytest.raises(ConnectionError, match="cannot reach the Hugging Face hub.*--weights"):
        download.download_sd15()
    with pytest.raises(ConnectionError, match="google/ddpm-cat-256"):
        download.download_ddpm_cat()
