"""Safetensors in, modules out: the diffusers folder layout and the original single-file layout."""

from minidiff.checkpoints.errors import CheckpointError, check_state_dict
from minidiff.checkpoints.folder import read_state_dict, weight_files_in_folder
from minidiff.checkpoints.single_file import convert, load_single_file, save_single_file

__all__ = ["CheckpointError", "check_state_dict", "read_state_dict", "weight_files_in_folder", "convert", "load_single_file", "save_single_file"]
