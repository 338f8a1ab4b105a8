"""Schedulers: one algorithm per file, each readable next to its paper. Shared arithmetic is in base.py."""

from minidiff.schedulers.base import SchedulerMixin, SchedulerOutput
from minidiff.schedulers.ddim import DDIMScheduler
from minidiff.schedulers.ddpm import DDPMScheduler
from minidiff.schedulers.pndm import PNDMScheduler

__all__ = ["SchedulerMixin", "SchedulerOutput", "DDIMScheduler", "DDPMScheduler", "PNDMScheduler"]
