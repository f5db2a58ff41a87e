"""``TimeoutPool``: run a function over many inputs in worker processes, each call bounded by a timeout.

A decoder that hangs on a hostile file is killed when its time is up, one that crashes (segfault) or is
killed (the kernel's OOM killer) takes only its own process down; either way the input is reported as
failed with its reason and a fresh worker takes its place. Results come back in input order.

Each worker holds up to ``depth`` tasks, so it keeps decoding while the parent is busy elsewhere (e.g.
encoding the previous batch); a thread in the worker sends finished results, and a thread in the parent
sends each worker its tasks, so a full pipe stops neither the decoding nor the parent (a task of image
bytes, a shard sample, is far larger than a pipe holds). Every worker publishes the task it is running (and since when) in a small shared-memory
board: that is how a crash or a timeout is charged to exactly one input, and the other tasks the worker
held are handed to its replacement.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler as _ForkingPickler
from typing import Any

log = logging.getLogger(__name__)

#: a worker that dies between tasks this many times in a row takes the input it held first down with it
_MAX_BLAMELESS_DEATHS = 3
#: bytes of tasks queued to one worker at most (memory only: tasks go through the worker's feeding thread,
#: so a send to a worker that hangs blocks that thread, never the parent)
_MAX_QUEUED_BYTES = 64 << 20


@dataclass
class TaskFailure:
    """What a failed task yields instead of a result."""

    reason: str


def _run_task(fn: Callable[[Any], Any], arg: Any) -> Any:
    try:
        return fn(arg)
    except Exception as e:  # a task error is a result, not a dead worker
        if not hasattr(e, "reason"):
            log.debug("task failed:\n%s", traceback.format_exc())
        return TaskFailure(getattr(e, "reason", None) or f"{type(e).__name__}: {e}")


def _sender(out: Connection, results: queue.SimpleQueue) -> None:
    """The worker's sending thread: results leave in order, however slowly the parent reads them."""
    while True:
        item = results.get()
        if item is None:
            return
        try:
            out.send(item)
        except (BrokenPipeError, OSError):
            return
        except Exception as e:  # a result that cannot be pickled
            out.send((item[0], TaskFailure(f"result could not be sent: {type(e).__name__}: {e}")))


def _die_with_parent(parent: int) -> None:
    """A worker must not outlive its parent (a build killed with SIGKILL): forked workers hold copies of
    each other's pipe ends, so none of them would see its task pipe close. On Linux the kernel kills the
    worker (``PR_SET_PDEATHSIG``); elsewhere a thread watches the parent's pid."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0:  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # it died before the call
                os._exit(1)
            return
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _feed(conn: Connection, outbox: queue.SimpleQueue) -> None:
    """The parent's feeding thread for one worker: sends its tasks in order; ends at ``None`` or when the
    pipe breaks (the worker died or was killed)."""
    while True:
        msg = outbox.get()
        if msg is None:
            return
        try:
            conn.send_bytes(msg)
        except (BrokenPipeError, OSError, ValueError):
            return


def _worker_main(tasks: Connection, out: Connection, board, fn: Callable[[Any], Any],
                 init: Callable[[], None] | None, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    _die_with_parent(parent)
    if init is not None:
        init()
    results: queue.SimpleQueue = queue.SimpleQueue()
    sender = threading.Thread(target=_sender, args=(out, results), daemon=True)
    sender.start()
    while True:
        try:
            msg = tasks.recv()
        except (EOFError, OSError):
            break
        if msg is None:
            break
        idx, arg = msg
        board[1] = time.monotonic()  # the start first: the parent reads the index, then the start
        board[0] = idx
        res = _run_task(fn, arg)
        board[0] = -1
        results.put((idx, res))
    results.put(None)
    sender.join()


class _Worker:
    def __init__(self, ctx, fn, init) -> None:
        self.tasks, child_tasks = ctx.Pipe(duplex=False)[::-1]  # (writer here, reader there)
        child_out, self.out = ctx.Pipe(duplex=False)[::-1]
        self.board = ctx.RawArray("d", [-1.0, 0.0])  # [running task index or -1, its start (monotonic)]
        self.proc = ctx.Process(target=_worker_main, args=(child_tasks, child_out, self.board, fn, init, os.getpid()),
                                daemon=True)
        self.proc.start()
        child_tasks.close()
        child_out.close()
        self.inflight: deque[int] = deque()
        self.sizes: dict[int, int] = {}  # bytes of each task sent and not answered yet
        self.queued_bytes = 0
        self.sent_at = 0.0
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.feeder = threading.Thread(target=_feed, args=(self.tasks, self.outbox), daemon=True)
        self.feeder.start()

    def send(self, msg: bytes) -> None:
        self.outbox.put(msg)

    def stop(self) -> None:
        """Ask the worker to finish (after the tasks already queued) and the feeding thread to end."""
        self.outbox.put(_ForkingPickler.dumps(None))
        self.outbox.put(None)

    def running(self) -> tuple[int | None, float]:
        """(index, start) of the task the worker is running now, or (None, 0) between tasks."""
        idx = int(self.board[0])
        start = float(self.board[1])
        return (idx if idx >= 0 else None), start

    def kill(self) -> None:
        try:
            self.proc.kill()
        except (OSError, ValueError):
            pass
        self.proc.join(timeout=5)
        self.outbox.put(None)
        for c in (self.tasks, self.out):
            c.close()


class TimeoutPool:
    """``for i, result in pool.imap(fn, inputs)``: results in input order; ``TaskFailure`` on error,
    crash or timeout. ``depth``: tasks handed to each worker ahead of time.

    >>> with TimeoutPool(workers=2, timeout=30) as pool:                     # doctest: +SKIP
    ...     for i, res in pool.imap(decode, paths): ...
    """

    def __init__(self, workers: int = 1, timeout: float = 60.0, init: Callable[[], None] | None = None,
                 start_method: str | None = None, depth: int = 1) -> None:
        self.n = max(1, int(workers))
        self.timeout = float(timeout)
        self.init = init
        self.depth = max(1, int(depth))
        method = start_method or ("fork" if hasattr(os, "fork") else "spawn")
        self.ctx = mp.get_context(method)
        self._workers: list[_Worker] = []
        #: how many workers were replaced (crashed, killed or timed out) during the last ``imap``
        self.replaced = 0

    def __enter__(self) -> TimeoutPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for w in self._workers:
            w.stop()
        for w in self._workers:
            w.proc.join(timeout=1)
            if w.proc.is_alive():
                w.kill()
            else:
                w.tasks.close()
                w.out.close()
        self._workers = []

    def imap(self, fn: Callable[[Any], Any], inputs: Iterable[Any]) -> Iterator[tuple[int, Any]]:
        self.close()
        self.replaced = 0
        self._fn = fn
        self._workers = [_Worker(self.ctx, fn, self.init) for _ in range(self.n)]
        self._todo = iter(enumerate(inputs))
        self._retry: deque[tuple[int, Any]] = deque()
        self._args: dict[int, Any] = {}
        self._done: dict[int, Any] = {}
        self._blameless = 0
        next_out = 0
        try:
            while True:
                self._hand_out()
                while next_out in self._done:
                    yield next_out, self._done.pop(next_out)
                    next_out += 1
                busy = [w for w in self._workers if w.inflight]
                if not busy:
                    if not self._retry and self._todo is None:
                        return
                    continue
                ready = wait([w.out for w in busy], timeout=self._wait_s(busy))
                for w in busy:
                    if w.out in ready:
                        self._receive(w)
                    else:
                        self._check_timeout(w)
        finally:
            self.close()

    # ---- the parent's bookkeeping ------------------------------------------------------------------
    def _next_task(self) -> tuple[int, Any] | None:
        if self._retry:
            return self._retry.popleft()
        if self._todo is not None:
            item = next(self._todo, None)
            if item is not None:
                return item
            self._todo = None
        return None

    def _hand_out(self) -> None:
        for w in self._workers:
            while len(w.inflight) < self.depth:
                item = self._next_task()
                if item is None:
                    return
                msg = _ForkingPickler.dumps(item)
                if w.inflight and w.queued_bytes + len(msg) > _MAX_QUEUED_BYTES:
                    self._retry.appendleft(item)  # enough queued for this worker
                    break
                idx, arg = item
                self._args[idx] = arg
                if not w.inflight:
                    w.sent_at = time.monotonic()
                w.inflight.append(idx)
                w.sizes[idx] = len(msg)
                w.queued_bytes += len(msg)
                w.send(msg)  # a dead worker is noticed when its results pipe closes

    def _wait_s(self, busy: list[_Worker]) -> float:
        now = time.monotonic()
        ends = []
        for w in busy:
            idx, start = w.running()
            ends.append((start if idx is not None else max(w.sent_at, now)) + self.timeout)
        return max(0.0, min(min(ends) - now, 1.0))  # look again at least every second

    def _finish(self, w: _Worker, idx: int, res: Any) -> None:
        if idx in w.inflight:
            w.inflight.remove(idx)
            w.queued_bytes -= w.sizes.pop(idx, 0)
        self._args.pop(idx, None)
        self._done[idx] = res
        w.sent_at = time.monotonic()

    def _receive(self, w: _Worker) -> None:
        try:
            while True:
                idx, res = w.out.recv()
                self._finish(w, idx, res)
                self._blameless = 0
                if not w.out.poll():
                    return
        except (EOFError, OSError):
            code = w.proc.exitcode
            w.proc.join(timeout=1)
            code = w.proc.exitcode if code is None else code
            self._lose(w, f"decoder process died ({_describe_exit(code)})")

    def _check_timeout(self, w: _Worker) -> None:
        idx, start = w.running()
        if idx is not None and time.monotonic() - start >= self.timeout:
            self._lose(w, f"timed out after {self.timeout:g}s (decoder hung); worker killed")

    def _lose(self, w: _Worker, why: str) -> None:
        """A dead or hung worker: its running task fails with ``why``, the rest go to its replacement."""
        idx, _ = w.running()
        if idx is None or idx not in w.inflight:
            self._blameless += 1
            idx = w.inflight[0] if self._blameless >= _MAX_BLAMELESS_DEATHS and w.inflight else None
        if idx is not None:
            self._blameless = 0
            log.warning("decoder worker lost on input %d: %s", idx, why)
            self._finish(w, idx, TaskFailure(why))
        self._retry.extendleft(reversed([(i, self._args[i]) for i in w.inflight]))
        w.inflight.clear()
        w.sizes.clear()
        w.queued_bytes = 0
        self._replace(w)

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self.replaced += 1
        self._workers[self._workers.index(w)] = _Worker(self.ctx, self._fn, self.init)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
        if -code == signal.SIGKILL:
            return f"killed by {name}, e.g. by the out-of-memory killer"
        return f"signal {name}"
    return f"exit code {code}"
