"""Download Stable Diffusion 1.5 (stable-diffusion-v1-5/stable-diffusion-v1-5) through huggingface_hub.

    python weights_scripts/download_sd15.py [--variant fp16] [--single-file] [--out FOLDER]

Only the files minidiff needs: configs, tokenizer, and one safetensors file per model (or just
v1-5-pruned-emaonly.safetensors with --single-file). Interrupted downloads resume.
"""

import argparse
import sys

from minidiff.download import download_sd15

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=["fp16"], default=None)
    parser.add_argument("--single-file", action="store_true")
    parser.add_argument("--out", default=None, help="folder (default: the Hugging Face cache)")
    args = parser.parse_args()
    try:
        where = download_sd15(args.out, args.variant, args.single_file)
    except (ConnectionError, FileNotFoundError) as error:
        sys.exit(f"download_sd15: {error}")
    print(f"downloaded to {where}")
    print(f'next: minidiff generate "a photograph of an astronaut riding a horse" --weights {where}')
