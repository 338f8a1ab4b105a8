"""Safetensors in, modules out: the diffusers folder layout and the original single-file layout."""

from minidiff.checkpoints.errors import CheckpointError, check_state_dict
from minidiff.checkpoints.folder import read_state_dict, weight_files_in_folder

__all__ = ["CheckpointError", "check_state_dict", "read_state_dict", "weight_files_in_folder"]
