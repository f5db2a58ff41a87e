"""Readers' leases: an open snapshot's files are kept until its reader is gone.

A reader registers ``leases/<pid>.<nonce>.json`` (pid, the process's start time, the version) while it
holds ``.gc.lock`` shared; the writer collects files while it holds ``.gc.lock`` exclusively, after
reading the leases. So a version is never collected between a reader reading the manifest and the
reader's lease appearing. A lease whose process is gone (or whose pid now belongs to another process,
told apart by the start time) is ignored and removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path

from mmretrieve.store.layout import LEASES

log = logging.getLogger(__name__)

GC_LOCK = ".gc.lock"


@contextlib.contextmanager
def gc_lock(root: Path, *, exclusive: bool) -> Iterator[None]:
    """Readers take it shared to register a lease, the writer exclusively to collect files. Where the
    index folder is read-only, readers go without (nothing can be collected there either)."""
    try:
        fh = open(Path(root) / GC_LOCK, "a+")  # noqa: SIM115 - released below
    except OSError:
        if exclusive:
            raise
        yield
        return
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read().decode("ascii", "replace")
        return data.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _start_time(pid)
    return start is None or now is None or now == start


class Lease:
    """A reader's hold on one version; released by ``release()`` or when the owner is garbage-collected."""

    def __init__(self, root: Path, version: str) -> None:
        self.path: Path | None = None
        d = Path(root) / LEASES
        try:
            d.mkdir(exist_ok=True)
            p = d / f"{os.getpid()}.{uuid.uuid4().hex[:12]}.json"
            p.write_text(json.dumps({"pid": os.getpid(), "start": _start_time(os.getpid()), "version": version}))
            self.path = p
        except OSError as e:  # a read-only index folder: nothing collects files there either
            log.debug("no lease for %s (%s)", root, e)
        self._finalizer = weakref.finalize(self, _remove, self.path)

    def release(self) -> None:
        self._finalizer()


def _remove(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()


def leased_versions(root: Path) -> set[str]:
    """Versions held by live readers (dead readers' leases are removed on the way)."""
    out: set[str] = set()
    d = Path(root) / LEASES
    if not d.is_dir():
        return out
    for p in d.glob("*.json"):
        try:
            info = json.loads(p.read_text())
            pid, version = int(info["pid"]), str(info["version"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _alive(pid, info.get("start")):
            out.add(version)
        else:
            _remove(p)
    return out


__all__ = ["Lease", "gc_lock", "leased_versions"]
