"""``mmretrieve bench filter``: filtered against unfiltered coarse-search latency across selectivities, in one
run, with recall@10 of the filtered search against brute force over the matching rows.

Data: N vectors (``--sizes``, default 100,000; 1,000,000 documented) of ``--dim`` around 1,000 clustered
Gaussian centres (normalised, as ``bench ann``), each item with a metadata field ``bucket``, an integer
drawn uniformly from 0..9999, so ``bucket < s * 10000`` matches a share ``s`` of the rows. The rows are
written by an ``IndexWriter`` (the items' ``extra`` carries ``bucket``; ``index import`` of a .npy / parquet
does not carry metadata columns), once as ``Flat`` and once as ``--factory`` (an ANN: IVF or HNSW).

Per factory and selectivity (``--selectivities``, default 0.0001 ... 1.0): the median latency of
``Index.search_vectors(q, 10)`` and of ``search_vectors(q, 10, where="bucket < X")`` over ``--queries``
single-query searches, timed interleaved (one unfiltered, one filtered per query, so drift on a shared
machine hits both; which goes first alternates, so the second search's warm caches favour neither), their ratio, the first (uncached) ``Index.select`` of the filter, the first filtered
search after it (where an IVF view of the selection is built), and recall@10 of
the filtered search against a brute force over the matching rows. Target: at 10% selectivity the
filtered search within 1.2x of the unfiltered one; recall@10 >= 0.99 on Flat.

LanceDB anchor (``--lancedb-python PATH``: a Python with ``lancedb``, which is not a dependency): the same
vectors and ``bucket`` column in a LanceDB table, ``.search(q).where("bucket < X", prefilter=True)
.limit(10)`` timed the same way (no vector index: LanceDB's exact scan, the counterpart of Flat).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from mmretrieve.bench.common import child_json

log = logging.getLogger(__name__)

HELP = "filtered vs unfiltered search latency and recall@10 across selectivities (Flat and an ANN; LanceDB anchor)"

SELECTIVITIES = "0.0001,0.001,0.01,0.1,0.5,1.0"
BUCKETS = 10_000
TARGET_RATIO, TARGET_SELECTIVITY, TARGET_RECALL = 1.2, 0.1, 0.99


def add_arguments(p) -> None:
    p.add_argument("--sizes", default="100000", help="comma-separated N (default 100000; the documented run adds 1000000)")
    p.add_argument("--dim", type=int, default=128, help="vector dimension (default 128; 512 as CLIP)")
    p.add_argument("--queries", type=int, default=200, help="single-query searches timed per cell (default 200)")
    p.add_argument("--selectivities", default=SELECTIVITIES,
                   help=f"shares of rows matching the filter (default {SELECTIVITIES}; 0.1 = 10%%)")
    p.add_argument("--factory", action="append", default=None,
                   help="an ANN factory timed beside Flat; repeat for several (default IVF1024,Flat; e.g. --factory "
                        "IVF1024,Flat --factory HNSW32; '' for Flat only)")
    p.add_argument("--breadth", type=int, default=16,
                   help="nprobe (IVF) or efSearch (HNSW) of the unfiltered search and the filtered one's base (default 16)")
    p.add_argument("--dir", default=None, help="where the indexes are written (default: a temp folder, removed)")
    p.add_argument("--lancedb-python", default=None, metavar="PYTHON",
                   help="a Python with lancedb and pyarrow installed (an environment of its own): LanceDB's filtered "
                        "search on the same data is printed beside ours (default: skipped)")


def _where(s: float) -> str:
    return f"bucket < {int(round(s * BUCKETS))}"


def _build(path: Path, factory: str, x: np.ndarray, bucket: np.ndarray) -> float:
    from mmretrieve.store import IndexWriter, Item

    info = {"name": "bench-vectors", "dim": x.shape[1], "modalities": ["image"]}
    t = time.perf_counter()
    with IndexWriter(path, encoder_info=info, factory=factory, create=True, auto_compact=False,
                     segment_rows=len(x), segment_bytes=1 << 40, retain=1) as w:
        for s in range(0, len(x), 50_000):
            e = min(len(x), s + 50_000)
            w.add([Item(id=-1, key=str(i), uri="", extra={"bucket": int(bucket[i])}) for i in range(s, e)], x[s:e])
    return time.perf_counter() - t


def _truth(x: np.ndarray, q: np.ndarray, rows: np.ndarray, k: int = 10) -> list[np.ndarray]:
    import faiss

    if not len(rows):
        return [np.empty(0, np.int64) for _ in q]
    kk = min(k, len(rows))
    _, I = faiss.knn(q, np.ascontiguousarray(x[rows]), kk, metric=faiss.METRIC_INNER_PRODUCT)
    return [rows[i] for i in I]


def _recall(found, truth: list[np.ndarray]) -> float | None:
    parts = [len(set(int(i) for i in f if i >= 0) & set(t.tolist())) / len(t) for f, t in zip(found, truth) if len(t)]
    return float(np.mean(parts)) if parts else None


def _interleaved_ms(plain, filtered, q: np.ndarray) -> tuple[float, float]:
    plain(q[:3])
    filtered(q[:3])
    tp, tf = [], []
    for i in range(len(q)):
        # the order alternates: the second search of a query finds the lists or rows the first one read
        # still in the CPU's caches (measured: up to 0.73x for the same search at 1M), which must not
        # favour one side
        first, second = (plain, filtered) if i % 2 == 0 else (filtered, plain)
        t = time.perf_counter()
        first(q[i:i + 1])
        t1 = time.perf_counter()
        second(q[i:i + 1])
        t2 = time.perf_counter()
        (tp, tf)[i % 2].append(t1 - t)
        (tf, tp)[i % 2].append(t2 - t1)
    return float(np.median(tp) * 1e3), float(np.median(tf) * 1e3)


def _breadth_kw(factory: str, b: int) -> dict:
    from mmretrieve.bench.ann import _breadth_kw as kw

    return {} if factory.upper() == "FLAT" else kw(factory, b)


def _measure_factory(path: Path, factory: str, data: dict, sels: list[float], breadth: int) -> list[dict]:
    from mmretrieve import open_index

    x, q, bucket = data["x"], data["q"], data["bucket"]
    kw = _breadth_kw(factory, breadth)
    idx = open_index(path, verify="none", search_device="cpu")
    rows = []
    try:
        plain = lambda qq: idx.search_vectors(qq, 10, **kw)  # noqa: E731
        recall_plain = _recall(plain(q)[1], data["truth_all"])
        for s in sels:
            where = _where(s)
            t = time.perf_counter()
            sel = idx.select(where)
            select_ms = (time.perf_counter() - t) * 1e3
            match = np.flatnonzero(bucket < int(round(s * BUCKETS)))
            if not np.array_equal(np.asarray(sel.ids), match):
                raise RuntimeError(f"bench filter: {where!r} selected {sel.count} ids, expected {len(match)}")
            filtered = lambda qq, where=where: idx.search_vectors(qq, 10, where=where, **kw)  # noqa: E731
            t = time.perf_counter()
            filtered(q[:1])  # the first search of a selection (an IVF view is built here)
            first_ms = (time.perf_counter() - t) * 1e3
            plain_ms, filt_ms = _interleaved_ms(plain, filtered, q)
            truth = _truth(x, q, match)
            rows.append({"factory": factory, "breadth": kw, "selectivity": s, "where": where, "matches": int(len(match)),
                         "exact_path": bool(sel.exact(len(x), 10, graph_ef=kw.get("ef_search", 0) if "HNSW" in factory.upper() else 0)), "view": sel.has_ivf_view, "all": sel.count == len(x), "select_ms": select_ms,
                         "first_ms": first_ms,
                         "unfiltered_ms": plain_ms, "filtered_ms": filt_ms, "ratio": filt_ms / plain_ms,
                         "recall": _recall(filtered(q)[1], truth), "unfiltered_recall": recall_plain})
            log.info("%s", _row_line(rows[-1], None))
    finally:
        idx.close()
    return rows


_LANCEDB_CHILD = """
import json, statistics, sys, time
import numpy as np, lancedb, pyarrow as pa
d = sys.argv[1]
x, q, bucket = np.load(d + "/x.npy"), np.load(d + "/q.npy"), np.load(d + "/bucket.npy")
wheres = json.loads(sys.argv[2])
db = lancedb.connect(d + "/lancedb")
def batch(s, e):
    return pa.table({"id": pa.array(np.arange(s, e), pa.int64()), "bucket": pa.array(bucket[s:e], pa.int64()),
                     "vector": pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x[s:e]).ravel()), x.shape[1])})
t0 = time.perf_counter()
t = db.create_table("items", batch(0, min(len(x), 100_000)))
for s in range(100_000, len(x), 100_000):
    t.add(batch(s, min(len(x), s + 100_000)))
scalar = True
try:
    t.create_scalar_index("bucket")
except Exception:
    scalar = False
build_s = time.perf_counter() - t0
def run(v, w):
    s = t.search(v).distance_type("l2").limit(10)
    if w is not None:
        s = s.where(w, prefilter=True)
    return s.to_arrow()["id"].to_numpy()
out = []
for w in wheres:
    for i in range(3):
        run(q[i], w)
    tp, tf, ids = [], [], []
    for v in q:
        a = time.perf_counter(); run(v, None); b = time.perf_counter(); r = run(v, w); c = time.perf_counter()
        tp.append(b - a); tf.append(c - b); ids.append(r.tolist())
    out.append({"where": w, "unfiltered_ms": statistics.median(tp) * 1e3, "filtered_ms": statistics.median(tf) * 1e3, "ids": ids})
print(json.dumps({"lancedb": lancedb.__version__, "build_s": build_s, "scalar_index": scalar, "rows": out}))
"""


def _lancedb(tmp: Path, data: dict, sels: list[float], python: str) -> dict:
    """LanceDB's filtered exact search over the same rows, run by ``python`` (an environment with lancedb)."""
    for name in ("x", "q", "bucket"):
        np.save(tmp / f"{name}.npy", data[name])
    wheres = [_where(s) for s in sels]
    try:
        res = child_json([python, "-c", _LANCEDB_CHILD, str(tmp), json.dumps(wheres)], timeout=7200)
    finally:
        shutil.rmtree(tmp / "lancedb", ignore_errors=True)
    if "error" in res:
        return {"error": res["error"]}
    for s, r in zip(sels, res["rows"]):
        match = np.flatnonzero(data["bucket"] < int(round(s * BUCKETS)))
        r["selectivity"] = s
        r["ratio"] = r["filtered_ms"] / r["unfiltered_ms"]
        r["recall"] = _recall([np.asarray(i, np.int64) for i in r.pop("ids")], _truth(data["x"], data["q"], match))
    return res


def _one_size(root: Path, n: int, args, sels: list[float]) -> dict:
    from mmretrieve.bench.ann import _data

    t0 = time.perf_counter()
    x, q = _data(n, int(args.dim), int(args.queries))
    bucket = np.random.default_rng(n + 7).integers(0, BUCKETS, n)
    data = {"x": x, "q": q, "bucket": bucket, "truth_all": _truth(x, q, np.arange(n))}
    log.info("data %d x %d in %.1f s", n, x.shape[1], time.perf_counter() - t0)
    out = {"n": n, "rows": [], "build_s": {}}
    factories = ["Flat"] + [f for f in (args.factory or ["IVF1024,Flat"]) if f and f.upper() != "FLAT"]
    for factory in factories:
        path = root / f"{n}-{factory.replace(',', '_')}"
        shutil.rmtree(path, ignore_errors=True)
        out["build_s"][factory] = _build(path, factory, x, bucket)
        log.info("%s at N=%d written in %.1f s", factory, n, out["build_s"][factory])
        out["rows"] += _measure_factory(path, factory, data, sels, int(args.breadth))
        shutil.rmtree(path, ignore_errors=True)
    out["lancedb"] = _lancedb(root, data, sels, args.lancedb_python) if args.lancedb_python else None
    return out


def _targets(sizes: list[dict]) -> dict:
    at = [r for s in sizes for r in s["rows"] if abs(r["selectivity"] - TARGET_SELECTIVITY) < 1e-12]
    flat = [r["recall"] for s in sizes for r in s["rows"] if r["factory"] == "Flat" and r["recall"] is not None]
    worst = max((r["ratio"] for r in at), default=None)
    low = min(flat, default=None)
    by_factory: dict[str, float] = {}
    for r in at:
        by_factory[r["factory"]] = max(by_factory.get(r["factory"], 0.0), r["ratio"])
    return {"ratio_at_10pct": worst, "ratio_met": None if worst is None else worst <= TARGET_RATIO,
            "ratio_at_10pct_by_factory": by_factory,
            "flat_recall_min": low, "recall_met": None if low is None else low >= TARGET_RECALL}


def run(args) -> dict:
    import faiss

    threads = int(getattr(args, "threads", None) or 2)
    faiss.omp_set_num_threads(threads)
    sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    sels = [float(s) for s in str(args.selectivities).split(",") if s.strip()]
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="mmretrieve-bench-filter-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        results = [_one_size(root, n, args, sels) for n in sizes]
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return {"benchmark": "filter", "dim": int(args.dim), "queries": int(args.queries), "threads": threads,
            "faiss_version": faiss.__version__, "selectivities": sels, "sizes": results,
            "lancedb_python": args.lancedb_python, "targets": _targets(results)}


def _f(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _path(r: dict) -> str:
    """How the filtered search ran: an exact scan of the matching rows, a masked Flat scan, a FAISS selector."""
    if r.get("all"):  # every live row matches: the unfiltered search runs
        return "all"
    return ("exact" if r["exact_path"] else "mask" if r["factory"].upper() == "FLAT" else "view" if r.get("view")
            else "bitmap")


def _row_line(r: dict, lance: dict | None) -> str:
    b = ",".join(f"{k}={v}" for k, v in r["breadth"].items()) or "-"
    line = (f"  {r['factory']:<13} {b:<10} {r['selectivity']:>7g} {r['matches']:>9,} {_path(r):>6} "
            f"{r['unfiltered_ms']:9.3f} {r['filtered_ms']:9.3f} {r['ratio']:6.2f}x {_f(r['recall'], '.3f'):>6} "
            f"{_f(r['unfiltered_recall'], '.3f'):>6} {r['select_ms']:8.1f} {r.get('first_ms', 0):8.1f}")
    if lance is not None:
        line += f"   | LanceDB {lance['unfiltered_ms']:8.3f} {lance['filtered_ms']:8.3f} {lance['ratio']:6.2f}x {_f(lance['recall'], '.3f')}"
    return line


def render(res: dict) -> list[str]:
    out = [f"filtered search: d={res['dim']}, {res['queries']} single-query searches per cell (unfiltered and filtered "
           f"interleaved), {res['threads']} FAISS threads; where = 'bucket < X' over a uniform bucket 0..9999"]
    for s in res["sizes"]:
        lance = s.get("lancedb")
        by_sel = {r["selectivity"]: r for r in (lance or {}).get("rows", [])}
        out.append(f" N={s['n']:,} (built in " + ", ".join(f"{f} {t:.1f} s" for f, t in s["build_s"].items()) + ")")
        head = (f"  {'factory':<13} {'breadth':<10} {'select.':>7} {'matches':>9} {'path':>6} {'unfilt ms':>9} "
                f"{'filt ms':>9} {'ratio':>7} {'rec@10':>6} {'unf.rc':>6} {'sel. ms':>8} {'1st ms':>8}")
        if by_sel:
            head += "   | LanceDB  unfilt ms filt ms  ratio  rec@10"
        out.append(head)
        for r in s["rows"]:
            out.append(_row_line(r, by_sel.get(r["selectivity"]) if r["factory"] == "Flat" else None))
        if lance is None:
            out.append("  LanceDB anchor: not run (give --lancedb-python PATH: a Python with lancedb and pyarrow)")
        elif "error" in lance:
            out.append(f"  LanceDB anchor: failed ({lance['error']})")
        else:
            out.append(f"  LanceDB {lance['lancedb']}: exact scan (no vector index), prefilter on, scalar index on bucket: "
                       f"{'yes' if lance['scalar_index'] else 'no'}; table written in {lance['build_s']:.1f} s")
    t = res["targets"]
    met = {True: "met", False: "missed", None: "not measured"}
    each = ", ".join(f"{f} x{v:.2f} ({met[v <= TARGET_RATIO]})" for f, v in t.get("ratio_at_10pct_by_factory", {}).items())
    out.append(f" targets: at 10% selectivity filtered <= {TARGET_RATIO}x unfiltered: {each or 'not measured'}; "
               f"recall@10 >= {TARGET_RECALL} on Flat: min {_f(t['flat_recall_min'], '.3f')} "
               f"({met[t['recall_met']]})")
    return out
