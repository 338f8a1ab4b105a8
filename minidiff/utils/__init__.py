"""Small helpers every layer may use: the output base class and seeded noise. Imports nothing of minidiff's."""

from minidiff.utils.outputs import BaseOutput
from minidiff.utils.torch_utils import randn_tensor

__all__ = ["BaseOutput", "randn_tensor"]
