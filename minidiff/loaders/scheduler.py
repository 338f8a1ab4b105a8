"""The scheduler a diffusers folder names: `scheduler/scheduler_config.json`'s `_class_name`, built from that config."""

from __future__ import annotations

import os

import minidiff.schedulers as schedulers
from minidiff.checkpoints.hub import HubOptions


def scheduler_from_folder(
    path_or_repo_id: str | os.PathLike, subfolder: str | None = "scheduler", hub: HubOptions | None = None
) -> schedulers.SchedulerMixin:
    """The scheduler named in `<path>/<subfolder>/scheduler_config.json` (PNDM when the file names none)."""
    config = schedulers.SchedulerMixin.load_config(path_or_repo_id, subfolder=subfolder, hub=hub)
    name = str(config.get("_class_name", "PNDMScheduler"))
    scheduler_class = getattr(schedulers, name, None)
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, schedulers.SchedulerMixin)):
        implemented = ", ".join(cls.__name__ for cls in schedulers.SchedulerMixin.compatibles)
        raise ValueError(
            f"the scheduler config names {name!r}, which minidiff does not implement; minidiff has {implemented}. "
            "Swap it with e.g. `pipe.scheduler = EulerDiscreteScheduler.from_config(config)`."
        )
    return scheduler_class.from_config(config)
