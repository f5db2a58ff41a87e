"""``TimeoutPool``: run a function over many inputs in worker processes, each call bounded by a timeout.

A decoder that hangs on a hostile file is killed when its time is up, one that crashes (segfault) takes
only its own process down; either way the input is reported as failed and a fresh worker takes its
place. Results come back in input order, with several tasks in flight per worker.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class TaskFailure:
    """What a failed task yields instead of a result."""

    reason: str


def _worker_main(conn: Connection, fn: Callable[[Any], Any], init: Callable[[], None] | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    if init is not None:
        init()
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        idx, arg = msg
        try:
            res = fn(arg)
        except Exception as e:  # a task error is a result, not a dead worker
            res = TaskFailure(getattr(e, "reason", None) or f"{type(e).__name__}: {e}")
            if not hasattr(e, "reason"):
                log.debug("task failed:\n%s", traceback.format_exc())
        try:
            conn.send((idx, res))
        except (BrokenPipeError, OSError):
            return


class _Worker:
    def __init__(self, ctx, fn, init) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, fn, init), daemon=True)
        self.proc.start()
        child.close()
        self.task: int | None = None
        self.started = 0.0

    def kill(self) -> None:
        try:
            self.proc.kill()
        except (OSError, ValueError):
            pass
        self.proc.join(timeout=5)
        self.conn.close()


class TimeoutPool:
    """``for i, result in pool.imap(fn, inputs)``: results in input order; ``TaskFailure`` on error,
    crash or timeout.

    >>> with TimeoutPool(workers=2, timeout=30) as pool:                     # doctest: +SKIP
    ...     for i, res in pool.imap(decode, paths): ...
    """

    def __init__(self, workers: int = 1, timeout: float = 60.0, init: Callable[[], None] | None = None,
                 start_method: str | None = None) -> None:
        self.n = max(1, int(workers))
        self.timeout = float(timeout)
        self.init = init
        method = start_method or ("fork" if hasattr(os, "fork") else "spawn")
        self.ctx = mp.get_context(method)
        self._workers: list[_Worker] = []

    def __enter__(self) -> TimeoutPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for w in self._workers:
            w.proc.join(timeout=1)
            if w.proc.is_alive():
                w.kill()
        self._workers = []

    def imap(self, fn: Callable[[Any], Any], inputs: Iterable[Any]) -> Iterator[tuple[int, Any]]:
        self.close()
        self._workers = [_Worker(self.ctx, fn, self.init) for _ in range(self.n)]
        todo = iter(enumerate(inputs))
        exhausted = False
        done: dict[int, Any] = {}
        next_out = 0
        try:
            while True:
                # hand out work
                for w in self._workers:
                    if w.task is None and not exhausted:
                        item = next(todo, None)
                        if item is None:
                            exhausted = True
                            break
                        idx, arg = item
                        w.task, w.started = idx, time.monotonic()
                        w.conn.send((idx, arg))
                busy = [w for w in self._workers if w.task is not None]
                while next_out in done:
                    yield next_out, done.pop(next_out)
                    next_out += 1
                if not busy:
                    if exhausted:
                        return
                    continue
                now = time.monotonic()
                wait_s = max(0.0, min(w.started + self.timeout - now for w in busy))
                ready = wait([w.conn for w in busy], timeout=wait_s)
                for w in busy:
                    if w.conn in ready:
                        try:
                            idx, res = w.conn.recv()
                        except (EOFError, OSError):
                            code = w.proc.exitcode
                            w.proc.join(timeout=1)
                            code = w.proc.exitcode if code is None else code
                            why = f"decoder process died ({_describe_exit(code)})"
                            done[w.task] = TaskFailure(why)
                            self._replace(w, fn)
                            continue
                        done[idx] = res
                        w.task = None
                    elif time.monotonic() - w.started >= self.timeout:
                        done[w.task] = TaskFailure(f"timed out after {self.timeout:g}s (decoder hung); worker killed")
                        self._replace(w, fn)
        finally:
            self.close()

    def _replace(self, w: _Worker, fn) -> None:
        w.kill()
        self._workers[self._workers.index(w)] = _Worker(self.ctx, fn, self.init)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
