"""Resumable builds: a build killed with SIGKILL at several points (inside a unit, at each step of a
unit's commit, from outside at a moment of the OS's choosing) and run again with the same command ends
with exactly the items, ids, vectors and skip records of an uninterrupted build."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from mmretrieve.errors import IndexExistsError, InputError, UsageError
from mmretrieve.index import open_index
from mmretrieve.ingest import build_index
from mmretrieve.store import read_manifest, verify_index
from mmretrieve.testing.shards import write_webdataset

OPTS = {"batch_size": 2, "unit_items": 5}


def _state(path):
    """Everything a build decides: each item's id, uri, caption and vector, and the skip records."""
    idx = open_index(path, verify="full")
    items = sorted(idx.meta.iter_items(), key=lambda it: it.key)
    vecs = idx.vectors([it.id for it in items])
    rows = {it.key: (it.id, it.uri, it.caption, it.size) for it in items}
    skipped = sorted((s.key, s.reason) for s in idx.meta.skipped())
    b = idx.manifest["build"]
    idx.close()
    return rows, dict(zip((it.key for it in items), vecs)), skipped, b


def _same(a, b):
    assert a[0] == b[0]
    assert a[2] == b[2]
    for k in a[1]:
        np.testing.assert_array_equal(a[1][k], b[1][k])
    assert a[3]["complete"] and b[3]["complete"] and a[3]["identity"] == b[3]["identity"]


@pytest.fixture()
def shards(tmp_path, samples):
    bad = [("broken.jpg", b"\xff\xd8\xff\xe0 not a jpeg", "a corrupt member")]
    write_webdataset(list(samples[:9]) + bad + list(samples[9:]), tmp_path / "wds", per_shard=6)
    return str(tmp_path / "wds" / "{00000..00003}.tar")


def _killed_build(index: Path, source: str, clip_dir, kill: tuple) -> subprocess.CompletedProcess:
    """Run the build in a child that SIGKILLs itself at ``kill``: ("add", n) = at the n-th batch written
    (inside a unit), ("stage", name, n) = the n-th time the store reaches that step of a commit."""
    script = textwrap.dedent(f"""
        import os, signal
        from mmretrieve import create_encoder
        from mmretrieve.ingest import build_index
        from mmretrieve.store import layout
        from mmretrieve.store.writer import IndexWriter
        kill, seen = {kill!r}, [0]
        def hit():
            seen[0] += 1
            if seen[0] == kill[-1]:
                os.kill(os.getpid(), signal.SIGKILL)
        if kill[0] == "add":
            add = IndexWriter.add
            def counting(self, *a, **k):
                hit()
                return add(self, *a, **k)
            IndexWriter.add = counting
        else:
            layout._CRASH_HOOK = lambda s: hit() if s == kill[1] else None
        enc = create_encoder("open_clip:local-dir:{clip_dir}", precision="fp32")
        build_index({str(index)!r}, {source!r}, encoder=enc, **{OPTS!r})
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


KILLS = [("add", 2), ("add", 5), ("stage", "after-meta-write", 1), ("stage", "before-manifest", 2),
         ("stage", "after-manifest", 2), ("add", 11)]


def test_shard_build_killed_anywhere_resumes_to_the_same_index(tmp_path, shards, tiny_clip, tiny_clip_dir):
    ref = tmp_path / "ref"
    r = build_index(ref, shards, encoder=tiny_clip, **OPTS)
    assert r.units_committed == 3 and len(r.skipped) == 1  # 4 shards: 3 checkpoints + the final commit
    want = _state(ref)
    resumed = []
    for kill in KILLS:
        path = tmp_path / f"kill-{'-'.join(map(str, kill))}"
        p = _killed_build(path, shards, tiny_clip_dir, kill)
        assert p.returncode == -signal.SIGKILL, (kill, p.stderr[-2000:])
        if (path / "manifest.json").is_file():
            assert not read_manifest(path)["build"]["complete"]
            verify_index(path)  # what was published is whole
        r = build_index(path, shards, encoder=tiny_clip, **OPTS)  # the same command again
        resumed.append(r.units_resumed)
        _same(_state(path), want)
        assert not [q for q in path.rglob("*") if q.name.endswith(".tmp")]
    assert resumed[0] == 0 and max(resumed) >= 2  # killed before the first commit, and after later ones


def test_folder_build_killed_resumes_per_batch_of_files(tmp_path, photo_dir, tiny_clip, tiny_clip_dir):
    ref = tmp_path / "ref"
    build_index(ref, photo_dir, encoder=tiny_clip, **OPTS)
    want = _state(ref)
    for kill in [("add", 4), ("stage", "after-manifest", 2)]:
        path = tmp_path / f"kill-{kill[-1]}"
        p = _killed_build(path, str(photo_dir), tiny_clip_dir, kill)
        assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
        r = build_index(path, photo_dir, encoder=tiny_clip, **OPTS)
        _same(_state(path), want)
        assert r.unchanged == (5 * r.units_resumed if r.units_resumed else 0)


def test_external_kill_during_a_cli_build(tmp_path, shards, tiny_clip, tiny_clip_dir):
    """`kill -9` from outside, once a first unit is committed, wherever the build then is."""
    ref = tmp_path / "ref"
    build_index(ref, shards, encoder=tiny_clip, **OPTS)
    path = tmp_path / "cli"
    cmd = [sys.executable, "-m", "mmretrieve", "index", "build", str(path), shards, "--encoder",
           f"open_clip:local-dir:{tiny_clip_dir}", "--batch-size", "1"]
    env = {**os.environ, "MMRETRIEVE_PRECISION": "fp32"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        m = path / "manifest.json"
        if m.is_file() and json.loads(m.read_text())["build"]["units_done"] >= 1:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    r = build_index(path, shards, encoder=tiny_clip, batch_size=1)
    got, want = _state(path), _state(ref)
    assert got[0] == want[0] and got[2] == want[2]
    for k in want[1]:  # batches of 1 here and 2 in the reference: equal to float rounding
        np.testing.assert_allclose(got[1][k], want[1][k], atol=1e-5)
    assert r.units_resumed >= 1 or proc.returncode == 0


def test_resume_refuses_what_it_cannot_continue(tmp_path, shards, tiny_clip, tiny_clip_dir):
    path = tmp_path / "i"
    p = _killed_build(path, shards, tiny_clip_dir, ("stage", "after-manifest", 2))
    assert p.returncode == -signal.SIGKILL
    with pytest.raises(UsageError, match="factory"):  # other options than the build being resumed
        build_index(path, shards, encoder=tiny_clip, factory="HNSW32", **OPTS)
    with pytest.raises(IndexExistsError, match="already exists"):
        build_index(path, shards, encoder=tiny_clip, resume=False, **OPTS)
    first = sorted(Path(shards.split("{")[0]).glob("*.tar"))[0]
    os.utime(first, (time.time() + 5, time.time() + 5))  # a committed shard changed since
    with pytest.raises(InputError, match="changed since they were committed"):
        build_index(path, shards, encoder=tiny_clip, **OPTS)
    r = build_index(path, shards, encoder=tiny_clip, overwrite=True, **OPTS)
    assert r.added == 22 and read_manifest(path)["build"]["complete"]


def test_a_strict_build_publishes_all_or_nothing(tmp_path, shards, tiny_clip_dir):
    path = tmp_path / "strict"
    script = textwrap.dedent(f"""
        from mmretrieve import create_encoder
        from mmretrieve.ingest import build_index
        from mmretrieve.errors import SkippedInputsError
        enc = create_encoder("open_clip:local-dir:{tiny_clip_dir}", precision="fp32")
        try:
            build_index({str(path)!r}, {shards!r}, encoder=enc, strict=True, **{OPTS!r})
        except SkippedInputsError:
            raise SystemExit(3)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == 3, p.stderr[-2000:]
    assert not path.exists()  # no checkpoint was published, and the aborted first build left nothing


def test_ivf_trains_once_on_the_first_rows_then_checkpoints(tmp_path, samples, tiny_clip):
    photos = [s for _ in range(4) for s in samples]  # 88 samples: IVF2 wants 78 rows to train
    write_webdataset(photos, tmp_path / "wds", per_shard=20)
    path = tmp_path / "ivf"
    r = build_index(path, tmp_path / "wds", encoder=tiny_clip, factory="IVF2,Flat", batch_size=8)
    assert r.added == 88 and r.units_committed == 1  # shards 1-3 waited for the quantizer's sample; then shard 4
    idx = open_index(path)
    hits = idx.search(image=samples[0].path, k=4)
    assert len(hits) == 4 and all(h.caption == samples[0].caption for h in hits)
