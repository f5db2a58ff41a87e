"""Image decoding in isolated workers: a decoder that crashes, is killed (as the out-of-memory killer
does) or hangs costs its own file; pathological image shapes cost bounded work and memory."""

from __future__ import annotations

import faulthandler
import io
import multiprocessing as mp
import os
import resource
import shutil
import signal
import struct
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from mmretrieve import build_index, open_index
from mmretrieve.ingest import stages
from mmretrieve.media.workers import TaskFailure, TimeoutPool


@pytest.fixture(autouse=True)
def _the_default_start_method(monkeypatch):
    """These tests are about decoder pools: they run on what users get (the forkserver), not on the fork
    the rest of the suite starts its many small builds with (tests/conftest.py)."""
    monkeypatch.delenv("MMRETRIEVE_DECODER_START", raising=False)

def _faulty_decoder(path: str) -> None:
    name = os.path.basename(path)
    if name.startswith("crash"):
        faulthandler.disable()  # pytest's fault handler would print the worker's stack to the log
        os.kill(os.getpid(), signal.SIGSEGV)  # a decoder bug that segfaults
    elif name.startswith("oom"):
        os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's out-of-memory killer sends
    elif name.startswith("hang"):
        time.sleep(3600)  # a decoder that never returns
    elif name.startswith("exits"):
        os._exit(7)


@pytest.mark.parametrize("workers", [1, 2])
def test_crashed_killed_and_hung_decoders_cost_one_file_each(photo_dir, samples, tiny_clip, monkeypatch, workers):
    jpg = next(s.path for s in samples if s.path.endswith(".jpg"))
    for name in ("crash.jpg", "oom.jpg", "hang.jpg", "exits.jpg"):
        shutil.copy(jpg, photo_dir / name)
    monkeypatch.setattr(stages, "_DECODE_HOOK", _faulty_decoder)  # inherited by the forked decoder workers
    t0 = time.perf_counter()
    report = build_index("faults", photo_dir, encoder=tiny_clip, batch_size=4, workers=workers, image_timeout=3)
    assert time.perf_counter() - t0 < 60
    reasons = {Path(s.uri).name: s.reason for s in report.skipped}
    assert set(reasons) == {"crash.jpg", "oom.jpg", "hang.jpg", "exits.jpg"}
    assert reasons["crash.jpg"] == "decoder process died (signal SIGSEGV)"
    assert reasons["oom.jpg"] == "decoder process died (killed by SIGKILL, e.g. by the out-of-memory killer)"
    assert reasons["hang.jpg"] == "timed out after 3s (decoder hung); worker killed"
    assert reasons["exits.jpg"] == "decoder process died (exit code 7)"
    # nothing else lost: every good photo is indexed, and the counts add up
    assert report.added == len(samples) and report.scanned == len(samples) + 4
    assert report.added + report.updated + report.unchanged + len(report.skipped) == report.scanned
    idx = open_index("faults")
    assert len(idx) == len(samples)
    assert not {"crash.jpg", "oom.jpg", "hang.jpg", "exits.jpg"} & {Path(it.uri).name for it in idx.meta.iter_items()}


def _echo_or_die(x: int) -> int:
    if x in (3, 11):
        os.kill(os.getpid(), signal.SIGKILL)
    if x == 7:
        raise ValueError("seven")
    return x * 10


def test_pool_replaces_workers_and_keeps_every_other_result_in_order():
    with TimeoutPool(workers=2, timeout=10, depth=5) as pool:
        out = list(pool.imap(_echo_or_die, range(20)))
        assert pool.replaced == 2
    assert [i for i, _ in out] == list(range(20))
    for i, r in out:
        if i in (3, 11):
            assert isinstance(r, TaskFailure) and "SIGKILL" in r.reason
        elif i == 7:
            assert isinstance(r, TaskFailure) and r.reason == "ValueError: seven"
        else:
            assert r == i * 10


def _hang_on_the_first(x: str) -> int:
    if x.startswith("0-"):
        time.sleep(3600)
    return len(x)


def test_a_hung_worker_never_blocks_handing_out_work():
    inputs = [f"{i}-" + "x" * 4000 for i in range(60)]  # 240 KB of queued tasks: several pipes' worth
    t = time.perf_counter()
    with TimeoutPool(workers=1, timeout=2, depth=1000) as pool:
        out = list(pool.imap(_hang_on_the_first, inputs))
    assert time.perf_counter() - t < 30
    assert out[0][1] == TaskFailure("timed out after 2s (decoder hung); worker killed", transient=True)
    assert [r for _, r in out[1:]] == [len(x) for x in inputs[1:]]


def _long_png(width: int, height: int) -> bytes:
    """A valid greyscale PNG of width x height: under 1 KB for 1 x 100,000."""
    row = b"\x00" + b"\x80" * width
    body = zlib.compress(row * height, 9)

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _peak_rss_growth_mb(transform, im) -> tuple[float, tuple]:
    """Peak resident memory added by ``transform(im)``, measured in a forked child."""
    ctx = mp.get_context("fork")
    q = ctx.SimpleQueue()

    def child():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = transform(im)
        q.put(((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, tuple(out.shape)))

    p = ctx.Process(target=child)
    p.start()
    p.join(60)
    assert p.exitcode == 0
    return q.get()


@pytest.fixture()
def long_images():
    tall = _long_png(1, 100_000)
    assert len(tall) < 1000
    return [Image.open(io.BytesIO(tall)).convert("RGB"), Image.open(io.BytesIO(_long_png(100_000, 1))).convert("RGB")]


def test_extreme_aspect_ratios_cost_bounded_memory_in_every_transform(long_images, tiny_clip):
    import open_clip
    from timm.data import create_transform

    from mmretrieve.encoders.embedded import PadSquareTransform
    from mmretrieve.encoders.transforms import Uint8Transform

    transforms = {
        "embedded": PadSquareTransform(224),
        "open_clip 224": Uint8Transform(open_clip.image_transform(224, is_train=False)),
        "tiny open_clip": tiny_clip.image_transform,
        "timm": Uint8Transform(create_transform(input_size=(3, 224, 224), crop_pct=0.875, is_training=False)),
    }
    for name, tf in transforms.items():
        for im in long_images:
            grew, shape = _peak_rss_growth_mb(tf, im)
            assert shape[0] == 3 and shape[1] == shape[2], (name, shape)
            assert grew < 100, f"{name} on {im.size}: +{grew:.0f} MB"  # unbounded: +1.9 GB at 64 px, ~24 GB at 224


def test_extreme_aspect_ratio_is_refused_when_no_centre_crop_can_bound_it(long_images):
    from torchvision import transforms as T

    from mmretrieve.encoders.transforms import Uint8Transform
    from mmretrieve.errors import BadImageError

    tf = Uint8Transform(T.Compose([T.Resize(64), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)]))
    with pytest.raises(BadImageError, match=r"aspect ratio 100000:1 is beyond 4:1"):
        tf(long_images[0])
    assert tuple(tf(Image.new("RGB", (300, 100))).shape) == (3, 64, 192)  # 3:1 passes unchanged


def test_a_1x100000_png_is_indexed_with_the_rest(photo_dir, samples, tiny_clip):
    (photo_dir / "tall.png").write_bytes(_long_png(1, 100_000))
    report = build_index("tall", photo_dir, encoder=tiny_clip)
    assert report.added == len(samples) + 1 and not report.skipped


def test_decoder_workers_die_with_a_killed_build(tmp_path):
    """A build killed with SIGKILL must not leave its decoders running (forked workers hold each other's
    pipe ends, so none would ever see its task pipe close): they die with the parent."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import os, signal, sys, time
        from mmretrieve.media.workers import TimeoutPool
        pool = TimeoutPool(workers=2, timeout=30, depth=4)
        it = pool.imap(time.sleep, [0.5] * 100)
        next(it)
        print(" ".join(str(w.proc.pid) for w in pool._workers), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == -9, p.stderr
    pids = [int(x) for x in p.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [q for q in pids if os.path.exists(f"/proc/{q}") and "Z" not in open(f"/proc/{q}/stat").read().split()[2]]
        time.sleep(0.1)
    assert not alive


def test_files_lost_to_a_decoder_crash_are_tried_again_by_the_next_add(photo_dir, samples, tiny_clip, monkeypatch):
    """A crash or an out-of-memory kill says nothing about the file: the next add tries it again (and
    reports it again when it fails again); a file found bad stays skipped until it changes."""
    from mmretrieve import add_to_index

    jpg = next(s.path for s in samples if s.path.endswith(".jpg"))
    for name in ("crash.jpg", "oom.jpg"):
        shutil.copy(jpg, photo_dir / name)
    (photo_dir / "text.jpg").write_text("not an image")
    monkeypatch.setattr(stages, "_DECODE_HOOK", _faulty_decoder)
    report = build_index("retry", photo_dir, encoder=tiny_clip, batch_size=4, workers=1)
    skipped = {Path(s.uri).name: s.transient for s in report.skipped}
    assert skipped == {"crash.jpg": True, "oom.jpg": True, "text.jpg": False}
    # the decoders still crash on them: tried again, reported again (not "unchanged")
    again = add_to_index("retry", photo_dir, workers=1)
    assert sorted(Path(s.uri).name for s in again.skipped) == ["crash.jpg", "oom.jpg"]
    assert (again.added, again.unchanged) == (0, len(samples) + 1)
    # the crashes were the decoder's fault: with a sound decoder both are indexed; the bad file stays skipped
    monkeypatch.setattr(stages, "_DECODE_HOOK", None)
    fixed = add_to_index("retry", photo_dir, workers=1)
    assert fixed.added == 2 and not fixed.skipped and fixed.unchanged == len(samples) + 1
    idx = open_index("retry")
    assert {"crash.jpg", "oom.jpg"} <= {Path(it.uri).name for it in idx.meta.iter_items()}
    assert [Path(s.uri).name for s in idx.meta.skipped()] == ["text.jpg"]
