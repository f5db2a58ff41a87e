"""The single-writer lock of an index: ``flock`` on ``<index>/.lock``, held by one write session (or a
repair of the live manifest) at a time, and never inherited by a forked child (a decoder worker), so a
killed build's lock is free as soon as the build itself is gone, not when its workers are."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import weakref
from collections.abc import Iterator
from pathlib import Path

from mmretrieve.errors import IndexLockedError

LOCK = ".lock"


def acquire_lock(path: Path):
    """The index's single-writer lock (an open file holding ``flock``), or ``IndexLockedError``."""
    fh = open(Path(path) / LOCK, "a+")  # noqa: SIM115 - held until released by the caller
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        fh.close()
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise IndexLockedError(f"index {path} is being written by another process") from None
        raise
    return fh


def _unlock(fh) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    fh.close()


@contextlib.contextmanager
def writer_lock(path: Path) -> Iterator[None]:
    """Hold the single-writer lock without a write session (the repair of a live manifest)."""
    fh = acquire_lock(path)
    try:
        yield
    finally:
        _unlock(fh)


class WriterLock:
    """A write session's hold on the lock: ``release()`` frees it (again: nothing). In a forked child,
    ``inherited`` turns true and the child's copy is closed without unlocking (``flock`` locks belong to
    the open file, shared with the parent: ``LOCK_UN`` there would free the parent's)."""

    def __init__(self, path: Path) -> None:
        self._fh = acquire_lock(path)
        self.inherited = False
        _HOLDERS.add(self)

    def release(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            _unlock(fh)

    def _forget_in_child(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            with contextlib.suppress(OSError):
                fh.close()
        self.inherited = True


#: locks held in this process, closed (not unlocked) in a forked child
_HOLDERS: weakref.WeakSet = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for lock in list(_HOLDERS):
        lock._forget_in_child()
    _HOLDERS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


__all__ = ["LOCK", "WriterLock", "acquire_lock", "writer_lock"]
