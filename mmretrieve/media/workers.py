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

The parent never blocks on a worker: it reads results only when a worker's pipe is readable, one read
at a time, and puts whole messages together itself (a worker stopped half-way through sending a result
leaves a partial message, not a parent waiting for the rest). A worker with work in hand must show
progress (a task started, a result byte read, a task taken from its pipe) within ``timeout`` seconds
of the parent waiting for it, whatever it was doing: one that does not (``kill -STOP``, a stuck
sending thread) is killed with SIGKILL, which a stopped process obeys too, and replaced.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import signal
import struct
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
#: seconds a new worker may take to start (a spawned one imports its task's modules) before it counts as
#: not answering; after that, ``timeout``
_STARTUP_S = 60.0
#: a result message on the pipe: its length, then the pickled ``(index, result)``
_HEADER = struct.Struct("!Q")
#: bytes taken from a readable results pipe per read (one read of a readable pipe never blocks)
_READ_BYTES = 1 << 20


@dataclass
class TaskFailure:
    """What a failed task yields instead of a result. ``transient``: the input itself is not known to be
    bad (its decoder crashed, was killed, ran out of memory, hung or stopped answering), so it is worth
    another try later; an error the task raised about its input (not an image, corrupt data) is not."""

    reason: str
    transient: bool = False


def _out_of_memory(e: BaseException | None) -> bool:
    """Whether ``e`` is, or was raised while handling, a ``MemoryError`` (a loader may translate it)."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, MemoryError):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _run_task(fn: Callable[[Any], Any], arg: Any) -> Any:
    try:
        return fn(arg)
    except Exception as e:  # a task error is a result, not a dead worker
        if not hasattr(e, "reason"):
            log.debug("task failed:\n%s", traceback.format_exc())
        return TaskFailure(getattr(e, "reason", None) or f"{type(e).__name__}: {e}", transient=_out_of_memory(e))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _sender(out: Connection, results: queue.SimpleQueue) -> None:
    """The worker's sending thread: results leave in order, however slowly the parent reads them, each
    as its length and its pickle (the parent reads whatever has arrived and puts messages together)."""
    fd = out.fileno()
    while True:
        item = results.get()
        if item is None:
            return
        try:
            data = _ForkingPickler.dumps(item)
        except Exception as e:  # a result that cannot be pickled
            data = _ForkingPickler.dumps((item[0], TaskFailure(f"result could not be sent: {type(e).__name__}: {e}")))
        try:
            _write_all(fd, _HEADER.pack(len(data)))
            _write_all(fd, data)
        except OSError:  # the parent is gone
            return


def _die_with_parent(parent: int) -> None:
    """A worker must not outlive its parent (a build killed with SIGKILL): workers hold copies of each
    other's pipe ends, so none of them would see its task pipe close. On Linux the kernel kills the
    worker when the process that forked it dies (``PR_SET_PDEATHSIG``): the pool's owner, or its
    forkserver, which exits when the owner dies. A thread watches the owner's pid too (the only guard
    elsewhere, and a second one for a forkserver's worker)."""
    forked_by = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0:  # PR_SET_PDEATHSIG
            if os.getppid() != forked_by:  # its parent died before the call
                os._exit(1)
            if forked_by == parent:
                return
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while True:
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True).start()


def _is_stopped(pid: int | None) -> bool:
    """Whether process ``pid`` is stopped (``kill -STOP``, a debugger); False where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] in (b"T", b"t")
    except (OSError, IndexError):
        return False


def _feed(w: _Worker) -> None:
    """The parent's feeding thread for one worker: sends its tasks in order and notes when each went
    (progress the parent's deadline counts); ends at ``None`` or when the pipe breaks (the worker died or
    was killed: SIGKILL ends a send to a stopped worker too). It closes the pipe itself, so no other
    thread closes a descriptor it may be writing to."""
    try:
        while True:
            msg = w.outbox.get()
            if msg is None:
                return
            w.fed_at = time.monotonic()
            try:
                w.tasks.send_bytes(msg)
            except (BrokenPipeError, OSError, ValueError):
                return
            w.fed_at = time.monotonic()
    finally:
        w.tasks.close()


def _worker_main(tasks: Connection, out: Connection, board, fn: Callable[[Any], Any],
                 init: Callable[[], None] | None, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    _die_with_parent(parent)
    if init is not None:
        init()
    board[2] = time.monotonic()  # started: from now on the parent's deadline is ``timeout``
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
        board[2] = time.monotonic()
        results.put((idx, res))
    results.put(None)
    sender.join()


class _Worker:
    def __init__(self, ctx, fn, init) -> None:
        self.tasks, child_tasks = ctx.Pipe(duplex=False)[::-1]  # (writer here, reader there)
        child_out, self.out = ctx.Pipe(duplex=False)[::-1]
        # [running task index or -1, its start, when the worker last started or ended a task (-1: starting)]
        self.board = ctx.RawArray("d", [-1.0, 0.0, -1.0])
        self.proc = ctx.Process(target=_worker_main, args=(child_tasks, child_out, self.board, fn, init, os.getpid()),
                                daemon=True)
        self.proc.start()
        child_tasks.close()
        child_out.close()
        self.inflight: deque[int] = deque()
        self.sizes: dict[int, int] = {}  # bytes of each task sent and not answered yet
        self.queued_bytes = 0
        self.sent_at = self.heard_at = self.fed_at = time.monotonic()
        self.inbox = bytearray()  # bytes of results read and not yet a whole message
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.feeder = threading.Thread(target=_feed, args=(self,), daemon=True)
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

    def last_sign(self) -> float:
        """When this worker last showed progress while not running a task (monotonic)."""
        return max(self.sent_at, self.heard_at, self.fed_at, float(self.board[2]))

    def started(self) -> bool:
        return float(self.board[2]) >= 0

    def read(self) -> list[tuple[int, Any]] | None:
        """The whole results that arrived (one read: the pipe is readable, so it cannot block; a partial
        message waits for the rest in ``inbox``); None at end of file (the worker died)."""
        try:
            chunk = os.read(self.out.fileno(), _READ_BYTES)
        except OSError:
            chunk = b""
        if not chunk:
            return None
        self.heard_at = time.monotonic()
        buf = self.inbox
        buf += chunk
        out, pos = [], 0
        while len(buf) - pos >= _HEADER.size:
            end = pos + _HEADER.size + _HEADER.unpack_from(buf, pos)[0]
            if len(buf) < end:
                break
            out.append(_ForkingPickler.loads(buf[pos + _HEADER.size : end]))
            pos = end
        del buf[:pos]
        return out

    def kill(self) -> None:
        """SIGKILL (a stopped process obeys it too); the feeding thread's send then fails, and it ends."""
        try:
            self.proc.kill()
        except (OSError, ValueError):
            pass
        self.proc.join(timeout=5)
        self.outbox.put(None)
        self.out.close()


#: how workers start: forked from a small server process (not from the caller, which already runs torch's
#: and the pipeline's threads: a fork of it copies locks some other thread held), else spawned
DEFAULT_START_METHOD = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


def default_start_method() -> str:
    """``$MMRETRIEVE_DECODER_START`` (``forkserver``, ``spawn`` or ``fork``) when set, else
    ``DEFAULT_START_METHOD``. ``fork`` starts a pool about 1.3 s sooner (no server importing torch) and is
    safe only where the calling process runs no other thread yet; the test suite uses it for the builds
    it runs by the hundred, and runs the decoder-pool tests on the default."""
    from mmretrieve.errors import UsageError

    env = (os.environ.get("MMRETRIEVE_DECODER_START") or "").strip().lower()
    if not env:
        return DEFAULT_START_METHOD
    if env not in mp.get_all_start_methods():
        raise UsageError(f"MMRETRIEVE_DECODER_START must be one of {', '.join(mp.get_all_start_methods())}, got {env!r}")
    return env


#: the modules the running forkserver imported, and how many pools may be using it (a server is only
#: restarted, to import more, while none is: its workers die with it)
_server = {"preload": frozenset(), "pools": 0}
_server_lock = threading.Lock()


def pool_context(start_method: str | None = None, preload: tuple[str, ...] = ()):
    """The multiprocessing context of a pool. With forkserver, the modules in ``preload`` (and this one)
    are imported once by the server, so each worker it forks starts with them (e.g. torch) imported
    instead of importing them itself when it unpickles its task; a running server that lacks some is
    restarted with them when no pool is using it. Everything a worker receives (its function, ``init``,
    its tasks) is pickled: nothing is inherited from the caller."""
    ctx = mp.get_context(start_method or default_start_method())
    if ctx.get_start_method() != "forkserver":
        return ctx
    from multiprocessing import forkserver

    wanted = frozenset(["mmretrieve.media.workers", *preload])
    with _server_lock:
        if not wanted <= _server["preload"]:
            server = forkserver._forkserver
            if getattr(server, "_forkserver_pid", None) is not None and _server["pools"] == 0:
                server._stop()  # started by a pool that needed less; no worker of it is alive
            _server["preload"] = _server["preload"] | wanted
            ctx.set_forkserver_preload(sorted(_server["preload"]))
        _server["pools"] += 1
    return ctx


def _pool_closed() -> None:
    with _server_lock:
        _server["pools"] = max(0, _server["pools"] - 1)


class TimeoutPool:
    """``for i, result in pool.imap(fn, inputs)``: results in input order; ``TaskFailure`` on error,
    crash or timeout. ``depth``: tasks handed to each worker ahead of time.

    >>> with TimeoutPool(workers=2, timeout=30) as pool:                     # doctest: +SKIP
    ...     for i, res in pool.imap(decode, paths): ...
    """

    def __init__(self, workers: int = 1, timeout: float = 60.0, init: Callable[[], None] | None = None,
                 start_method: str | None = None, depth: int = 1, preload: tuple[str, ...] = ()) -> None:
        self.n = max(1, int(workers))
        self.timeout = float(timeout)
        self.init = init
        self.depth = max(1, int(depth))
        self.ctx = pool_context(start_method, preload)
        self._counted = self.ctx.get_start_method() == "forkserver"  # one of the pools ``_server`` counts
        self._workers: list[_Worker] = []
        #: how many workers were replaced (crashed, killed or timed out) during the last ``imap``
        self.replaced = 0

    def __enter__(self) -> TimeoutPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        if self._counted:
            self._counted = False
            _pool_closed()

    def close(self) -> None:
        for w in self._workers:
            w.stop()
        for w in self._workers:
            w.proc.join(timeout=1)
            if w.proc.is_alive():
                w.kill()
            else:
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
        self._resumed_at = time.monotonic()
        next_out = 0
        try:
            while True:
                self._hand_out()
                while next_out in self._done:
                    yield next_out, self._done.pop(next_out)
                    self._resumed_at = time.monotonic()  # the time the caller kept us is no worker's fault
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

    def _deadline(self, w: _Worker) -> tuple[float, str]:
        """When a busy worker is lost if it shows no progress, and the reason its input would get: the
        task it runs must end within ``timeout``; between tasks it must answer within ``timeout`` of the
        parent last waiting for it (``_STARTUP_S`` while it starts, importing its task's modules, unless it
        was stopped: ``kill -STOP`` is no slow start)."""
        idx, start = w.running()
        if idx is not None:
            return start + self.timeout, f"timed out after {self.timeout:g}s (decoder hung); worker killed"
        limit = self.timeout if w.started() or _is_stopped(w.proc.pid) else max(self.timeout, _STARTUP_S)
        since = max(w.last_sign(), self._resumed_at)
        return since + limit, f"decoder stopped answering (timeout {self.timeout:g}s); worker killed"

    def _wait_s(self, busy: list[_Worker]) -> float:
        end = min(self._deadline(w)[0] for w in busy)
        return max(0.0, min(end - time.monotonic(), 1.0))  # look again at least every second

    def _finish(self, w: _Worker, idx: int, res: Any) -> None:
        if idx in w.inflight:
            w.inflight.remove(idx)
            w.queued_bytes -= w.sizes.pop(idx, 0)
        self._args.pop(idx, None)
        self._done[idx] = res
        w.sent_at = time.monotonic()

    def _receive(self, w: _Worker) -> None:
        got = w.read()
        if got is None:
            code = w.proc.exitcode
            w.proc.join(timeout=1)
            code = w.proc.exitcode if code is None else code
            self._lose(w, f"decoder process died ({_describe_exit(code)})")
            return
        for idx, res in got:
            self._finish(w, idx, res)
            self._blameless = 0

    def _check_timeout(self, w: _Worker) -> None:
        end, why = self._deadline(w)
        if time.monotonic() >= end:
            self._lose(w, why)

    def _lose(self, w: _Worker, why: str) -> None:
        """A dead or hung worker: its running task fails with ``why``, the rest go to its replacement."""
        idx, _ = w.running()
        if idx is None or idx not in w.inflight:
            self._blameless += 1
            idx = w.inflight[0] if self._blameless >= _MAX_BLAMELESS_DEATHS and w.inflight else None
        if idx is not None:
            self._blameless = 0
            log.warning("decoder worker lost on input %d: %s", idx, why)
            self._finish(w, idx, TaskFailure(why, transient=True))
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
