"""A decoder worker that stops answering (``kill -STOP``) at any moment (running a task, between tasks,
half-way through sending a result, while the parent sends it a task) costs at most the task it was
running: the parent never blocks on its pipe, kills it when its deadline passes and replaces it."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from multiprocessing import forkserver
from pathlib import Path

import psutil
import pytest

from mmretrieve import build_index, open_index
from mmretrieve.ingest import stages
from mmretrieve.media.workers import TaskFailure, TimeoutPool


@pytest.fixture(autouse=True)
def _the_default_start_method(monkeypatch):
    """These tests are about decoder pools: they run on what users get (the forkserver), not on the fork
    the rest of the suite starts its many small builds with (tests/conftest.py)."""
    monkeypatch.delenv("MMRETRIEVE_DECODER_START", raising=False)

def _bounded(fn, seconds: float):
    """``fn()``'s value, or a failure when it has not returned within ``seconds`` (the hang this file
    is about: the thread is left behind, a daemon, and its stopped worker dies with this process)."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still blocked after {seconds}s: the parent waits on a stopped worker"
    if "error" in box:
        raise box["error"]
    return box["value"], time.monotonic() - t0


def _stop_later(delay: float) -> None:
    def stop():
        time.sleep(delay)
        os.kill(os.getpid(), signal.SIGSTOP)

    threading.Thread(target=stop, daemon=True).start()


class _BigResultThenStop:
    """Input 1 is slow, input 3 returns 8 MB and stops its worker 0.5 s later (its sending thread is then
    half-way through the 8 MB, the parent having read what the pipe held); once only (a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __call__(self, x: int):
        if x == 1:
            time.sleep(0.2)
        if x == 3:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return b"3" * (8 << 20)
            _stop_later(0.5)
            return b"3" * (8 << 20)
        return x


def test_a_worker_stopped_half_way_through_sending_a_result_is_replaced(tmp_path):
    fn = _BigResultThenStop(tmp_path / "stopped-once")

    def consume():
        out = []
        with TimeoutPool(workers=1, timeout=2, depth=8) as pool:
            for i, r in pool.imap(fn, range(8)):
                out.append((i, r))
                if i == 0:
                    time.sleep(1.0)  # the parent busy elsewhere: the worker's result waits in a full pipe
            return out, pool.replaced

    (out, replaced), took = _bounded(consume, 30)
    assert [i for i, _ in out] == list(range(8))
    assert out[3][1] == b"3" * (8 << 20)  # nobody's fault: retried on the replacement, not lost
    assert [r for i, r in out if i != 3] == [0, 1, 2, 4, 5, 6, 7]
    assert replaced == 1 and took < 20


def _inputs_stopping_the_worker(pool_box: dict, at: int, n: int, big: bool):
    """Inputs 0..n-1; before input ``at`` is handed out (depth 1: the worker has answered everything and
    waits for its next task) the worker is stopped. ``big``: that input is 16 MB, more than a pipe holds,
    so the parent's feeding thread is blocked in the middle of sending it."""
    for i in range(n):
        if i == at:
            pool = pool_box["pool"]
            os.kill(pool._workers[0].proc.pid, signal.SIGSTOP)
            pool_box["stopped"] = pool._workers[0].proc.pid
            yield b"x" * (16 << 20) if big else b"x" * i
        else:
            yield b"x" * i


def _stopped_between_tasks(big: bool):
    box: dict = {}

    def consume():
        with TimeoutPool(workers=1, timeout=2, depth=1) as pool:
            box["pool"] = pool
            return list(pool.imap(len, _inputs_stopping_the_worker(box, 5, 10, big))), pool.replaced

    (out, replaced), took = _bounded(consume, 30)
    want = [(i, (16 << 20) if big and i == 5 else i) for i in range(10)]
    assert out == want  # the stopped worker's task went to its replacement
    assert replaced == 1 and took < 20
    assert not psutil.pid_exists(box["stopped"]) or psutil.Process(box["stopped"]).status() == psutil.STATUS_ZOMBIE


def test_a_worker_stopped_between_tasks_is_replaced():
    _stopped_between_tasks(big=False)


def test_a_worker_stopped_while_the_parent_sends_it_a_task_is_replaced():
    _stopped_between_tasks(big=True)


def _stop_myself(x: int) -> int:
    if x == 4:
        os.kill(os.getpid(), signal.SIGSTOP)
    return x


def test_a_worker_stopped_while_running_a_task_costs_that_task_only():
    def consume():
        with TimeoutPool(workers=2, timeout=2, depth=3) as pool:
            return list(pool.imap(_stop_myself, range(12))), pool.replaced

    (out, replaced), took = _bounded(consume, 30)
    assert out[4] == (4, TaskFailure("timed out after 2s (decoder hung); worker killed", transient=True))
    assert [r for i, r in out if i != 4] == [i for i in range(12) if i != 4]
    assert replaced == 1 and took < 20


def _slow_decode_stop_on_stop_jpg(uri: str) -> None:
    if os.path.basename(uri).startswith("stop"):
        os.kill(os.getpid(), signal.SIGSTOP)  # stopped in the middle of decoding this file
    time.sleep(0.05)


def _stop_a_decoder_from_outside(stopped: list, done: threading.Event) -> None:
    """What ``kill -STOP <decoder pid>`` does: wait for this process's decoder workers, let them work a
    little, stop one."""
    me = psutil.Process()
    deadline = time.monotonic() + 30
    while not done.is_set() and time.monotonic() < deadline:
        try:
            # the workers: the children of this process's forkserver (not the server itself, nor other helpers)
            server = forkserver._forkserver._forkserver_pid
            kids = [p for p in me.children(recursive=True) if server is not None and p.ppid() == server
                    and p.status() not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE)]
        except psutil.NoSuchProcess:  # a worker replaced while listed
            continue
        if len(kids) >= 2:
            time.sleep(0.3)
            try:
                kids[-1].send_signal(signal.SIGSTOP)
                stopped.append(kids[-1].pid)
            except psutil.NoSuchProcess:
                continue
            return
        time.sleep(0.02)


def test_a_build_with_stopped_decoders_ends_and_reports_what_they_cost(photo_dir, samples, tiny_clip, monkeypatch):
    jpg = next(s.path for s in samples if s.path.endswith(".jpg"))
    shutil.copy(jpg, photo_dir / "stop.jpg")
    monkeypatch.setattr(stages, "_DECODE_HOOK", _slow_decode_stop_on_stop_jpg)
    stopped: list[int] = []
    done = threading.Event()
    outsider = threading.Thread(target=_stop_a_decoder_from_outside, args=(stopped, done), daemon=True)
    outsider.start()
    try:
        report, took = _bounded(lambda: build_index("stopped", photo_dir, encoder=tiny_clip, batch_size=4, workers=2,
                                                    image_timeout=3), 90)
    finally:
        done.set()
    assert stopped, "no decoder was stopped from outside"
    assert took < 60
    reasons = {Path(s.uri).name: s for s in report.skipped}
    # the file whose decoder stopped is reported, as worth another try; the outside stop costs at most the
    # file that worker was decoding (none when it was between files)
    assert reasons["stop.jpg"].reason == "timed out after 3s (decoder hung); worker killed"
    assert all(s.transient for s in report.skipped) and len(reasons) <= 2
    assert report.added + len(report.skipped) == report.scanned == len(samples) + 1
    assert len(open_index("stopped")) == report.added


def test_decoder_pools_fork_from_a_forkserver_and_their_tasks_pickle(tiny_clip, monkeypatch):
    """Workers are not forked from the caller (which runs torch's threads): the pool's context is
    forkserver, and a decoder task (with the test hook set when it was made) survives pickling."""
    import pickle

    with TimeoutPool(workers=1, timeout=10) as pool:
        assert pool.ctx.get_start_method() == "forkserver"
        assert [r for _, r in pool.imap(len, ["ab"])] == [2]
    from mmretrieve.media import video

    monkeypatch.setattr(stages, "_DECODE_HOOK", _slow_decode_stop_on_stop_jpg)
    monkeypatch.setattr(video, "_DECODE_HOOK", _slow_decode_stop_on_stop_jpg)
    for task in (stages.DecodeImage(tiny_clip.image_transform), stages.DecodeVideo(tiny_clip.image_transform, {})):
        assert pickle.loads(pickle.dumps(task)).hook is _slow_decode_stop_on_stop_jpg


def test_the_start_method_can_be_chosen_and_a_bad_one_is_named(monkeypatch):
    from mmretrieve import UsageError
    from mmretrieve.media.workers import pool_context

    monkeypatch.setenv("MMRETRIEVE_DECODER_START", "spawn")
    assert pool_context().get_start_method() == "spawn"
    monkeypatch.setenv("MMRETRIEVE_DECODER_START", "threads")
    with pytest.raises(UsageError, match="MMRETRIEVE_DECODER_START must be one of .*got 'threads'"):
        pool_context()
