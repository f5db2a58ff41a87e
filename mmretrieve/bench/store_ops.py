"""One store operation per process, for ``mmretrieve bench store``: its wall time, the bytes it wrote
(``/proc/self/io`` ``wchar``), its anonymous resident memory before and after (``RssAnon``) and the
process's peak RSS. Each runs in a fresh interpreter so one operation's memory does not hide another's.

    python -m mmretrieve.bench.store_ops OP INDEX [SEED]

OP: ``add10``, ``rm3``, ``open`` (with the first and the median search latency), ``add10x5`` (five small
writes, then the disk use), and ``base-*`` the same through a hand-written FAISS + SQLite script (an
``IndexIDMap2(IndexFlatIP)`` file rewritten on every change, as a minimal store would do).
"""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _io() -> int:
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("wchar"))


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))


def _anon() -> int:
    return _status("RssAnon")


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ---- mmretrieve ----------------------------------------------------------------------------------
def ours_add10(path: Path, seed: int) -> None:
    from mmretrieve.ingest import add_vectors
    from mmretrieve.store import read_manifest

    d = int(read_manifest(path)["encoder"]["dim"])
    add_vectors(path, _unit(10, d, seed), keys=[f"new-{seed}-{i}" for i in range(10)])


def ours_rm3(path: Path, seed: int) -> None:
    from mmretrieve.ingest import remove_from_index

    remove_from_index(path, [f"key:{seed * 3 + i}" for i in range(3)])


def ours_open(path: Path, seed: int) -> dict:
    from mmretrieve.index import open_index

    t = time.perf_counter()
    idx = open_index(path, search_device="cpu")
    opened = time.perf_counter() - t
    anon_open = _anon()
    q = _unit(21, idx.dim, seed)
    t = time.perf_counter()
    idx.search_vectors(q[0], 100)
    first = time.perf_counter() - t
    lat = []
    for i in range(1, 21):
        t = time.perf_counter()
        idx.search_vectors(q[i], 100)
        lat.append(time.perf_counter() - t)
    return {"open_s": opened, "anon_after_open": anon_open, "first_search_s": first, "median_search_s": statistics.median(lat)}


# ---- the hand-written FAISS + SQLite baseline ------------------------------------------------------
def base_build(path: Path, vectors: np.ndarray) -> None:
    import faiss

    path.mkdir(parents=True)
    idx = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    idx.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    faiss.write_index(idx, str(path / "index.faiss"))
    con = sqlite3.connect(path / "meta.sqlite")
    con.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, key TEXT UNIQUE, uri TEXT)")
    con.executemany("INSERT INTO items VALUES(?,?,?)", ((i, str(i), f"vec://{i}") for i in range(len(vectors))))
    con.commit()
    con.close()


def _base_rewrite(path: Path, change) -> None:
    import faiss

    idx = faiss.read_index(str(path / "index.faiss"))
    con = sqlite3.connect(path / "meta.sqlite")
    change(idx, con)
    faiss.write_index(idx, str(path / "index.faiss.tmp"))
    os.replace(path / "index.faiss.tmp", path / "index.faiss")
    con.commit()
    con.close()


def base_add10(path: Path, seed: int) -> None:
    def change(idx, con):
        start = con.execute("SELECT MAX(id) FROM items").fetchone()[0] + 1
        ids = np.arange(start, start + 10, dtype=np.int64)
        idx.add_with_ids(_unit(10, idx.d, seed), ids)
        con.executemany("INSERT INTO items VALUES(?,?,?)", ((int(i), f"new-{seed}-{i}", "vec://") for i in ids))

    _base_rewrite(path, change)


def base_rm3(path: Path, seed: int) -> None:
    import faiss

    def change(idx, con):
        ids = np.array([seed * 3 + i for i in range(3)], dtype=np.int64)
        idx.remove_ids(faiss.IDSelectorBatch(ids))
        con.executemany("DELETE FROM items WHERE id=?", ((int(i),) for i in ids))

    _base_rewrite(path, change)


def base_open(path: Path, seed: int) -> dict:
    import faiss

    t = time.perf_counter()
    idx = faiss.read_index(str(path / "index.faiss"))
    con = sqlite3.connect(path / "meta.sqlite")
    con.execute("SELECT COUNT(*) FROM items").fetchone()
    opened = time.perf_counter() - t
    anon_open = _anon()
    q = _unit(21, idx.d, seed)
    t = time.perf_counter()
    idx.search(q[:1], 100)
    first = time.perf_counter() - t
    lat = []
    for i in range(1, 21):
        t = time.perf_counter()
        D, I = idx.search(q[i : i + 1], 100)
        con.execute(f"SELECT key FROM items WHERE id IN ({','.join(map(str, I[0].tolist()))})").fetchall()
        lat.append(time.perf_counter() - t)
    return {"open_s": opened, "anon_after_open": anon_open, "first_search_s": first, "median_search_s": statistics.median(lat)}


OPS = {
    "add10": ours_add10, "rm3": ours_rm3, "open": ours_open,
    "base-add10": base_add10, "base-rm3": base_rm3, "base-open": base_open,
}


def run_op(op: str, path: Path, seed: int) -> dict:
    if op.endswith("add10x5"):
        fn = OPS["base-add10" if op.startswith("base") else "add10"]
        t, w0 = time.perf_counter(), _io()
        for j in range(5):
            fn(path, seed + j)
        return {"seconds": time.perf_counter() - t, "written": _io() - w0, "disk_after": disk_bytes(path)}
    anon0, w0, t = _anon(), _io(), time.perf_counter()
    extra = OPS[op](path, seed) or {}
    out = {"seconds": time.perf_counter() - t, "written": _io() - w0, "anon_before": anon0, "anon_after": _anon(),
           "peak_rss": _status("VmHWM"), **extra}  # (ru_maxrss would carry the parent's peak over the exec)
    return out


def main(argv: list[str]) -> int:
    import faiss
    import torch

    faiss.omp_set_num_threads(int(os.environ.get("MMRETRIEVE_THREADS", "2")))
    torch.set_num_threads(int(os.environ.get("MMRETRIEVE_THREADS", "2")))
    op, path = argv[0], Path(argv[1])
    seed = int(argv[2]) if len(argv) > 2 else 1
    sys.stdout.write(json.dumps(run_op(op, path, seed)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
