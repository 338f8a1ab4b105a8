"""Schedulers: one algorithm per file, each readable next to its paper. Shared arithmetic is in base.py."""

from minidiff.schedulers.base import SchedulerMixin, SchedulerOutput

__all__ = ["SchedulerMixin", "SchedulerOutput"]
