"""Files in, tensors out: the bottom layer of loading (it imports no model).

    reader.py              one reader for every weights file: memory-mapped safetensors (validated), safe pickles
    folder.py              the diffusers folder layout: which file(s) hold a component (variants, shards, no path escapes)
    single_file_layout.py  the original one-file SD 1.x checkpoint: what it holds, recognising it, where each part is
    key_map.py             the original names <-> diffusers' names, both directions
    errors.py              one error naming every missing, unexpected and mis-shaped key
    hub.py                 the one module that calls huggingface_hub (offline: a clear error)
    download.py            `minidiff download`: which files of SD 1.5 / DDPM to fetch (through hub.py)
"""

from minidiff.checkpoints.errors import CheckpointError, check_state_dict
from minidiff.checkpoints.folder import weight_files_in_folder
from minidiff.checkpoints.reader import CheckpointFile, read_state_dict

__all__ = ["CheckpointError", "check_state_dict", "weight_files_in_folder", "CheckpointFile", "read_state_dict"]
