"""Download google/ddpm-cat-256 (the DDPM pipeline of the tutorial) through huggingface_hub.

    python weights_scripts/download_ddpm_cat.py [--out FOLDER]
"""

import argparse
import sys

from minidiff.download import download_ddpm_cat

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder (default: the Hugging Face cache)")
    args = parser.parse_args()
    try:
        where = download_ddpm_cat(args.out)
    except (ConnectionError, FileNotFoundError) as error:
        sys.exit(f"download_ddpm_cat: {error}")
    print(f"downloaded to {where}")
    print(f'next: python -c "from minidiff import DDPMPipeline; DDPMPipeline.from_pretrained(\'{where}\')(num_inference_steps=25).images[0].save(\'cat.png\')"')
