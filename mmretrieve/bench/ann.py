"""``mmretrieve bench ann``: recall@10 against latency for ANN factories, mmretrieve beside FAISS on the
same vectors, in one run.

Data: ``--n`` vectors of ``--dim`` around 1,000 clustered Gaussian centres (normalised), ``--queries``
held-out queries from the same centres, exact ground truth by a flat scan. Per factory and breadth:

- **FAISS**: the factory built by FAISS on every row (trained on the same first chunk mmretrieve trains on);
- **fresh**: mmretrieve, the rows written in ``--segments`` writes (one segment each, no compaction);
- **changed**: the same index after 20 adds of 100 rows and the deletion of 30% of the rows, searched
  as it stands (deleted rows filtered, not yet compacted away);
- **compacted**: after ``compact`` (the deleted rows dropped, the segments merged).

Latency is the median over single-query searches (``--threads`` FAISS threads); ratios are printed side
by side with the targets (``fresh`` <= 1.3x FAISS; ``changed`` <= 1.5x ``fresh``) and whether they hold.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

HELP = "recall@10 vs latency of IVF / IVF-PQ / HNSW: FAISS, mmretrieve fresh, after adds + 30%% deletions, compacted"

DEFAULT_FACTORIES = "IVF1024,Flat:1/16;IVF1024,PQ64:4/32;HNSW32:16/64"
TARGET_FRESH, TARGET_CHANGED = 1.3, 1.5


def add_arguments(p) -> None:
    p.add_argument("--n", type=int, default=1_000_000, help="vectors (default 1,000,000)")
    p.add_argument("--large", action="store_true", help="10M vectors (needs ~25 GB for the data at d=512; use --dim)")
    p.add_argument("--dim", type=int, default=512, help="dimension (default 512)")
    p.add_argument("--queries", type=int, default=300, help="held-out queries (default 300)")
    p.add_argument("--segments", type=int, default=10, help="writes, one segment each (default 10)")
    p.add_argument("--factories", default=DEFAULT_FACTORIES,
                   help=f"'FACTORY:b1/b2;...' with the breadths (nprobe or efSearch) to time (default {DEFAULT_FACTORIES!r})")
    p.add_argument("--dir", default=None, help="where the indexes are written (default: a temp folder, removed)")


def _data(n: int, d: int, nq: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, d)).astype(np.float32)
    x = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x[s:s + m] = centres[rng.integers(0, 1000, m)] + 0.6 * rng.standard_normal((m, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = centres[rng.integers(0, 1000, nq)] + 0.6 * rng.standard_normal((nq, d), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, q.astype(np.float32)


def _truth(x: np.ndarray, q: np.ndarray, alive: np.ndarray | None = None, k: int = 10) -> np.ndarray:
    import faiss

    if alive is None:
        return faiss.knn(q, x, k, metric=faiss.METRIC_INNER_PRODUCT)[1]
    _, I = faiss.knn(q, x[alive], k, metric=faiss.METRIC_INNER_PRODUCT)
    return alive[I]


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0].tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]))


def _p50_ms(search, q: np.ndarray) -> float:
    search(q[:5])
    ts = []
    for i in range(len(q)):
        t = time.perf_counter()
        search(q[i:i + 1])
        ts.append(time.perf_counter() - t)
    return float(np.median(ts) * 1000)


def _breadth_kw(factory: str, b: int) -> dict:
    return {"ef_search": b} if "HNSW" in factory.upper() and "IVF" not in factory.upper() else {"nprobe": b}


def _faiss_index(factory: str, x: np.ndarray, train: np.ndarray):
    import faiss

    idx = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    t = time.perf_counter()
    idx.train(train)
    for s in range(0, len(x), 100_000):
        idx.add(x[s:s + 100_000])
    return idx, time.perf_counter() - t


def _faiss_search(idx, factory: str, b: int):
    import faiss

    if "nprobe" in _breadth_kw(factory, b):
        p = faiss.SearchParametersIVF()
        p.nprobe = b
    else:
        p = faiss.SearchParametersHNSW()
        p.efSearch = b
    return lambda q: idx.search(q, 10, params=p)


def _mm_build(path: Path, factory: str, x: np.ndarray, segments: int) -> float:
    from mmretrieve.store import IndexWriter, Item

    info = {"name": "bench-vectors", "dim": x.shape[1], "modalities": ["image"]}
    step = -(-len(x) // segments)
    t = time.perf_counter()
    for j, s in enumerate(range(0, len(x), step)):
        e = min(len(x), s + step)
        with IndexWriter(path, encoder_info=info, factory=factory, create=j == 0, auto_compact=False,
                         segment_rows=step, segment_bytes=1 << 40, retain=1) as w:
            w.add([Item(id=-1, key=str(i), uri="") for i in range(s, e)], x[s:e])
    return time.perf_counter() - t


def _mm_change(path: Path, x: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray, float]:
    """20 adds of 100 rows (new vectors near existing ones), then 30% of all rows deleted. Returns the
    added vectors, the surviving ids and the seconds per small add."""
    from mmretrieve.store import IndexWriter, Item

    n = len(x)
    extra = x[rng.integers(0, n, 2000)] + 0.05 * rng.standard_normal((2000, x.shape[1]), dtype=np.float32)
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    t = time.perf_counter()
    for j in range(20):
        with IndexWriter(path, auto_compact=False, retain=1) as w:
            w.add([Item(id=-1, key=f"a{j}-{i}", uri="") for i in range(100)], extra[100 * j:100 * (j + 1)])
    add_s = (time.perf_counter() - t) / 20
    total = n + 2000
    dead = np.sort(rng.choice(total, int(0.3 * total), replace=False))
    with IndexWriter(path, auto_compact=False, retain=1) as w:
        w.remove([int(i) for i in dead])
    return extra, np.setdiff1d(np.arange(total), dead), add_s


def run(args) -> dict:
    import faiss

    from mmretrieve import open_index
    from mmretrieve.store.maintenance import compact_index

    n = 10_000_000 if args.large else int(args.n)
    threads = int(getattr(args, "threads", None) or 2)  # the common --threads (default here: 2, the issue's setting)
    faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    x, q = _data(n, int(args.dim), int(args.queries))
    truth = _truth(x, q)
    log.info("data %d x %d and ground truth in %.1f s", n, x.shape[1], time.perf_counter() - t0)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="mmretrieve-bench-ann-"))
    rows = []
    try:
        for spec in str(args.factories).split(";"):
            factory, _, br = spec.partition(":")
            breadths = [int(b) for b in (br or "16").split("/")]
            step = -(-n // int(args.segments))
            fidx, faiss_build_s = _faiss_index(factory, x, x[:step])
            path = root / factory.replace(",", "_")
            shutil.rmtree(path, ignore_errors=True)
            mm_build_s = _mm_build(path, factory, x, int(args.segments))
            log.info("%s: FAISS build %.1f s, mmretrieve %.1f s", factory, faiss_build_s, mm_build_s)
            fresh = open_index(path, verify="none", search_device="cpu")
            states = {"fresh": fresh}
            rng = np.random.default_rng(1)
            extra, alive, add_s = _mm_change(path, x, rng)
            allx = np.concatenate([x, extra])
            truth2 = _truth(allx, q, alive)
            states["changed"] = open_index(path, verify="none", search_device="cpu")
            t = time.perf_counter()
            compact_index(path, everything=True)
            compact_s = time.perf_counter() - t
            states["compacted"] = open_index(path, verify="none", search_device="cpu")
            for b in breadths:
                kw = _breadth_kw(factory, b)
                fs = _faiss_search(fidx, factory, b)
                row = {"factory": factory, "breadth": kw, "faiss": {"p50_ms": _p50_ms(fs, q), "recall": _recall(fs(q)[1], truth)}}
                for name, idx in states.items():
                    search = lambda qq, idx=idx, kw=kw: idx.search_vectors(qq, 10, **kw)  # noqa: E731
                    row[name] = {"p50_ms": _p50_ms(search, q),
                                 "recall": _recall(search(q)[1], truth if name == "fresh" else truth2)}
                row["segments"] = {name: len(idx.segments) for name, idx in states.items()}
                row["fresh_over_faiss"] = row["fresh"]["p50_ms"] / row["faiss"]["p50_ms"]
                row["changed_over_fresh"] = row["changed"]["p50_ms"] / row["fresh"]["p50_ms"]
                row["compacted_over_faiss"] = row["compacted"]["p50_ms"] / row["faiss"]["p50_ms"]
                row["build_s"] = {"faiss": faiss_build_s, "mmretrieve": mm_build_s, "compact": compact_s}
                row["small_add_s"] = add_s
                rows.append(row)
                log.info("%s", render({"rows": [row], "n": n, "dim": x.shape[1], "threads": threads})[-1])
            for idx in states.values():
                idx.close()
            del fidx
            shutil.rmtree(path, ignore_errors=True)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return {"n": n, "dim": int(args.dim), "queries": int(args.queries), "threads": threads,
            "segments": int(args.segments), "faiss_version": faiss.__version__, "rows": rows}


def _ok(v: float, target: float) -> str:
    return f"x{v:.2f} (target <= {target}: {'met' if v <= target else f'missed by x{v / target:.2f}'})"


def render(res: dict) -> list[str]:
    out = [f"ANN at N={res['n']:,} x {res['dim']}, {res.get('threads')} FAISS threads: p50 ms per single query / recall@10"]
    for r in res["rows"]:
        b = ", ".join(f"{k}={v}" for k, v in r["breadth"].items())
        cells = "  ".join(f"{name} {r[name]['p50_ms']:.3f} ms / {r[name]['recall']:.3f}"
                          for name in ("faiss", "fresh", "changed", "compacted"))
        out.append(f"  {r['factory']:<14} {b:<12} {cells}; fresh/FAISS {_ok(r['fresh_over_faiss'], TARGET_FRESH)}, "
                   f"changed/fresh {_ok(r['changed_over_fresh'], TARGET_CHANGED)}, compacted/FAISS x{r['compacted_over_faiss']:.2f}")
    return out
