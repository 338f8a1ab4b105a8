"""What training a small model needs beyond torch: an exponential moving average of the weights."""

from minidiff.training.ema import EMAModel

__all__ = ["EMAModel"]
