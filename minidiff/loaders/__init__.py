"""Assembling a whole pipeline's parts from files: the original single-file checkpoint, and a folder's scheduler.

    single_file.py   every part of SD 1.x from one original checkpoint (`load_single_file`)
    convert.py       writing that layout, and converting it to and from a diffusers folder (`minidiff convert`)
    scheduler.py     the scheduler a diffusers folder's scheduler_config.json names
    textual_inversion.py   learned token embeddings (diffusers' and A1111's files) into a tokenizer and text encoder
"""

from minidiff.loaders.convert import convert, save_single_file
from minidiff.loaders.scheduler import scheduler_from_folder
from minidiff.loaders.single_file import SingleFileComponents, load_single_file

__all__ = ["convert", "save_single_file", "scheduler_from_folder", "SingleFileComponents", "load_single_file"]
