"""Faults in the segment store: a full disk at every file write (injected, and a real tiny filesystem),
SIGKILL at every step of a write and of a compaction, readers that die holding a lease. In each case the
previous (or the new) version opens with identical results and verifies, and the next write works."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mmretrieve import DiskFullError, open_index
from mmretrieve.store import IndexWriter, Item, io, verify_index

pytestmark = pytest.mark.reliability

DIM = 16
INFO = {"name": "test-vectors", "dim": DIM, "modalities": ["image"]}
PATCHES = {"grid": 2, "dim": 8, "native_dim": 8, "dtype": "float16", "projection": None}


def _vectors(n, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _patches(n, seed=0):
    p = np.random.default_rng(seed).standard_normal((n, 4, 8)).astype(np.float32)
    return p / np.linalg.norm(p, axis=-1, keepdims=True)


def _base(path: Path, factory: str = "Flat") -> None:
    with IndexWriter(path, encoder_info=INFO, create=True, patches=PATCHES, factory=factory) as w:
        w.add([Item(id=-1, key=str(i), uri=f"vec://{i}") for i in range(300)], _vectors(300), _patches(300))


def _write(path: Path) -> None:
    """A write touching every kind of file: vectors, ids, patches, frames, a deletion file, the manifests."""
    w = IndexWriter(path, encoder_info=INFO)
    try:
        items = [Item(id=-1, key=f"n{i}", uri=f"vec://n{i}") for i in range(5)] + [Item(id=-1, key="v", uri="v.mp4", kind="video")]
        frames = [None] * 5 + [(_vectors(4, seed=8), np.arange(4, dtype=np.float32))]
        w.add(items, _vectors(6, seed=3), _patches(6, 3), frames=frames)
        w.remove([w.meta.item_by_key("7").id, w.meta.item_by_key("8").id])
        w.commit()
    except BaseException:
        w.abort()
        raise


def _add_more(path: Path, tag: str = "more") -> None:
    with IndexWriter(path, encoder_info=INFO) as w:
        w.add([Item(id=-1, key=f"{tag}{i}", uri="vec://") for i in range(3)], _vectors(3, seed=21), _patches(3, 21))


def _state(path: Path):
    with open_index(path) as idx:
        D, I = idx.search_vectors(_vectors(5, seed=9), 10)
        return idx.version, len(idx), I.tolist(), D.round(6).tolist()


@pytest.mark.parametrize("factory", ["Flat", "HNSW16"])
def test_disk_full_at_every_file_write_keeps_the_previous_version(tmp_path, monkeypatch, factory):
    base = tmp_path / "base"
    _base(base, factory)
    before = _state(base)
    n, failures = 0, []
    while True:
        path = tmp_path / f"i{n}"
        shutil.copytree(base, path)
        calls = []

        def full(p, n=n, calls=calls):
            calls.append(p)
            if len(calls) == n + 1:
                raise OSError(errno.ENOSPC, "No space left on device", str(p))

        monkeypatch.setattr(io, "_IO_HOOK", full)
        try:
            _write(path)
        except DiskFullError as e:
            named = calls[-1].parent / re.sub(r"^\.(.*)\.[0-9a-f]{8}\.tmp$", r"\1", calls[-1].name)  # a temp: its target
            failures.append(named.name)
            assert str(e).startswith(f"{named}: no space left on device"), (str(e), named)
        else:
            break
        finally:
            monkeypatch.setattr(io, "_IO_HOOK", None)
        assert _state(path) == before, f"after a full disk at write {n + 1} ({calls[-1]})"
        assert verify_index(path)["ok"]
        _write(path)  # the next write cleans up and works
        assert _state(path)[1] == before[1] + 6 - 2
        n += 1
    names = set(failures)
    assert {"ids.npy", "patches.npy", "frames.npy"} <= names and any(x.startswith("del-") for x in names)
    assert "manifest.json" in names and n >= 8


KILL_STAGES = ["before-index-write", "after-index-write", "before-version-rename", "after-meta-write", "before-manifest",
               "before-manifest-replace", "after-manifest"]


@pytest.mark.parametrize("op", ["write", "compact"])
def test_sigkill_at_every_stage_leaves_the_old_or_the_new_version(tmp_path, op):
    base = tmp_path / "base"
    _base(base)
    if op == "compact":
        _write(base)
    old = _state(base)
    done = tmp_path / "done"
    shutil.copytree(base, done)
    if op == "write":
        _write(done)
    else:
        from mmretrieve.store import compact_index

        compact_index(done, everything=True)
    new = _state(done)
    for stage in KILL_STAGES:
        path = tmp_path / f"{op}-{stage}"
        shutil.copytree(base, path)
        script = textwrap.dedent(f"""
            import os, signal, sys
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            from pathlib import Path
            from mmretrieve.store import layout, compact_index
            from test_store_faults import _write
            layout._CRASH_HOOK = lambda s: os.kill(os.getpid(), signal.SIGKILL) if s == {stage!r} else None
            _write(Path({str(path)!r})) if {op!r} == "write" else compact_index(Path({str(path)!r}), everything=True)
        """)
        p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert p.returncode == -signal.SIGKILL, (stage, p.stderr[-2000:])
        got = _state(path)
        assert got[1:] in (old[1:], new[1:]), stage
        assert verify_index(path)["ok"]
        _add_more(path)  # the next writer collects the leftovers and works
        assert verify_index(path)["ok"] and _state(path)[1] == got[1] + 3
        assert not [q for q in path.iterdir() if q.name.endswith(".tmp")]


def test_a_dead_readers_lease_does_not_keep_files_forever(tmp_path):
    path = tmp_path / "i"
    _base(path)
    script = textwrap.dedent(f"""
        import os, signal
        from mmretrieve import open_index
        idx = open_index({str(path)!r})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert subprocess.run([sys.executable, "-c", script], timeout=120).returncode == -signal.SIGKILL
    assert len(list((path / "leases").glob("*.json"))) == 1
    for j in range(3):
        _add_more(path, f"m{j}_")
    assert sorted(p.name for p in path.iterdir() if p.name.startswith("v")) == ["v0003", "v0004"]
    assert not list((path / "leases").glob("*.json"))


def test_a_forked_child_of_a_killed_writer_does_not_keep_the_lock(tmp_path):
    """A writer's process forks (decoder workers do) and is killed: the index is free for the next writer
    at once, while the child still runs; and a child closing its copy does not unlock its parent."""
    path = tmp_path / "i"
    _base(path)
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from mmretrieve.store import IndexWriter
        w = IndexWriter({str(path)!r})
        pid = os.fork()
        if pid == 0:  # a child that outlives its parent (off the pipes the test reads)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            time.sleep(30)
            os._exit(0)
        print(pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    child = int(p.stdout.split()[0])
    try:
        os.kill(child, 0)  # still alive
        _add_more(path)
    finally:
        os.kill(child, signal.SIGKILL)
    # in one process: a forked child dropping the writer leaves the parent's lock held
    w = IndexWriter(path, encoder_info=INFO)
    try:
        pid = os.fork()
        if pid == 0:
            w.abort()
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        with pytest.raises(Exception, match="being written by another process"):
            IndexWriter(path, encoder_info=INFO)
    finally:
        w.abort()
    _add_more(path, "again")


def _user_namespaces_work() -> bool:
    if not shutil.which("unshare"):
        return False
    p = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    return p.returncode == 0


@pytest.mark.skipif(not _user_namespaces_work(), reason="needs unshare (user + mount namespaces) for a tiny tmpfs")
def test_a_really_full_disk(tmp_path):
    """A 6 MB tmpfs in a private mount namespace: the index, then a ballast file leaving a little room,
    then writes until one fails for want of space; that failure names a file, the previous version is
    intact, and once the ballast is gone the write works."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_store_faults import _add_more, _base, _state
        from mmretrieve import DiskFullError
        from mmretrieve.store import verify_index
        root = Path({str(mnt)!r})
        out = []
        for room in (4_000, 40_000, 200_000):
            path = root / f"i{{room}}"
            _base(path)
            before = _state(path)
            st = os.statvfs(root)
            with open(root / "ballast", "wb") as fh:
                fh.write(b"\\0" * max(0, st.f_bavail * st.f_frsize - room))
            try:
                for j in range(50):
                    _add_more(path, f"w{{j}}_")
                    before = _state(path)
                out.append({{"room": room, "error": None}})
            except DiskFullError as e:
                try:  # opening needs a few KB (SQLite's shared-memory file): either it works or it says so
                    _state(path)
                except DiskFullError as e2:
                    assert "no space left" in str(e2), e2
                os.unlink(root / "ballast")
                ok = _state(path) == before
                verify_index(path)
                _add_more(path, "after")
                out.append({{"room": room, "error": str(e), "intact": ok}})
            finally:
                if (root / "ballast").exists():
                    os.unlink(root / "ballast")
            import shutil
            shutil.rmtree(path)
        print(json.dumps(out))
    """)
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
           f"mount -t tmpfs -o size=6m tmpfs {mnt} && exec {sys.executable} -c \"$0\"", script]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "MMRETRIEVE_SEARCH_DEVICE": "cpu"})
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(p.stdout.strip().splitlines()[-1])
    assert all(r["error"] and r["intact"] for r in results), results
    assert all("no space left" in r["error"] for r in results)
