"""A claim per job, so that any number of runners on one sweep folder do each job exactly once.

    claim = try_claim(out, job_id)        # None: another live runner has the job
    ...                                   # generate, write the PNG, append the manifest line
    release(claim)

A claim is the file `.<job_id>.claim` next to the job's PNG, created with O_CREAT | O_EXCL: the file system lets
exactly one runner create it, whichever host or torchrun world it belongs to. It holds the owner's host, pid and
start time, and is removed once the job's manifest line is written (or its error is). A claim is **stale**, and
is taken over, when its owner is on this host and its pid is no longer running (a killed run), or when it is older
than STALE_AFTER_SECONDS (2 hours: an owner on another host cannot be asked; no SD 1.5 image takes that long).
Taking over renames the stale claim away first: of two runners that both see it stale, only one rename succeeds.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

STALE_AFTER_SECONDS = 2 * 60 * 60


def claim_path(out: Path, job_id: str) -> Path:
    return out / f".{job_id}.claim"


def try_claim(out: Path, job_id: str) -> Path | None:
    """Claim `job_id` in `out`: the claim's path, or None when another live runner holds it."""
    path = claim_path(out, job_id)
    owner = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}).encode()
    for _ in range(2):  # the second try follows the removal of a stale claim
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if not _take_over_if_stale(path):
                return None
            continue
        try:
            os.write(descriptor, owner)
        finally:
            os.close(descriptor)
        for leftover in out.glob(f".{job_id}.*.png.tmp"):  # half-written by a runner killed while holding the job
            leftover.unlink(missing_ok=True)
        return path
    return None


def release(path: Path) -> None:
    path.unlink(missing_ok=True)


def is_stale(path: Path) -> bool:
    """A claim whose owner is gone (same host, pid not running) or that is older than STALE_AFTER_SECONDS."""
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
        host, pid, started = owner["host"], int(owner["pid"]), float(owner["time"])
    except FileNotFoundError:
        return False  # released meanwhile: the next create decides
    except (OSError, ValueError, KeyError, TypeError):
        return time.time() - _mtime(path) > STALE_AFTER_SECONDS  # being written, or damaged: judge by age only
    if time.time() - started > STALE_AFTER_SECONDS:
        return True
    return host == socket.gethostname() and not _running(pid)


def _take_over_if_stale(path: Path) -> bool:
    if not is_stale(path):
        return False
    moved = path.with_name(f"{path.name}.stale.{os.getpid()}")
    try:
        os.rename(path, moved)  # of two takers, only one moves the stale claim
    except FileNotFoundError:
        return True  # someone else removed it: try to create it again
    if not is_stale(moved):  # another taker replaced it with a live claim between our check and our rename
        try:
            os.link(moved, path)  # put the live claim back, unless yet another claim is already there
        except FileExistsError:
            pass
        moved.unlink(missing_ok=True)
        return False
    moved.unlink(missing_ok=True)
    return True


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return time.time()
