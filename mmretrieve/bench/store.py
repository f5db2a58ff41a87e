"""``mmretrieve bench store``: how the costs of the segment store grow with the collection.

For each N (default 10k, 100k, 1M random unit vectors of d 512, imported through ``index import``), in one
run, each operation in a fresh process: ``add`` of 10 vectors, ``rm`` of 3, ``open``, the first and the
median search latency, bytes written per write, peak and anonymous RSS, and the disk used after 5 small
writes; the same operations by a hand-written FAISS + SQLite script (``IndexIDMap2(IndexFlatIP)`` file +
a table, rewritten on each change) as the baseline. Growth is printed as ratios to the smallest N.
Also: a search over 10 segments against one segment of the same vectors, and the write amplification
of the tiered compaction (bytes written by merges per byte of data) against its stated bound.

Also: ``index import`` of the largest N against FAISS's own build of the same factory from the same
file (``--import-factory``, default IVF1024,Flat; time and peak RSS, each in a process of its own).

Targets: add and rm at 1M within 2x of their cost at 10k and under 1 s; bytes written per add O(batch)
(under 10 MB for 10 vectors at 1M); open at 1M under 1 s with under 100 MB more anonymous RSS; 10
segments within 1.2x of one; disk after 5 small adds within 1.1x of the data.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mmretrieve.bench.common import child_json

HELP = "store costs (add, rm, open, search, bytes written, RSS, disk) at 10k/100k/1M vs a FAISS+SQLite script"
OPS = ("add10", "rm3", "open", "add10x5")


def add_arguments(p) -> None:
    p.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated N (default 10000,100000,1000000)")
    p.add_argument("--dim", type=int, default=512, help="vector dimension (default 512)")
    p.add_argument("--no-baseline", action="store_true", help="skip the FAISS + SQLite baseline")
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one; needs ~8 GB at 1M)")
    p.add_argument("--lancedb-python", default=None, metavar="PYTHON",
                   help="a Python with lancedb installed (an environment of its own): its add of 10 rows at each N is "
                        "printed beside mmretrieve's as an anchor (default: skipped)")
    p.add_argument("--import-factory", default="IVF1024,Flat",
                   help="factory of the import-rate comparison with FAISS at the largest N ('' to skip; default IVF1024,Flat)")


def _source(tmp: Path, n: int, d: int) -> Path:
    """n random unit vectors as a .npy with its keys file, written in chunks."""
    path = tmp / f"vec{n}.npy"
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    rng = np.random.default_rng(n)
    for s in range(0, n, 100_000):
        x = rng.standard_normal((min(n, s + 100_000) - s, d), dtype=np.float32)
        arr[s : s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    arr.flush()
    del arr
    path.with_suffix(".keys.txt").write_text("".join(f"{i}\n" for i in range(n)))
    return path


def _op(op: str, path: Path, seed: int = 1) -> dict:
    env = {**os.environ, "MMRETRIEVE_SEARCH_DEVICE": "cpu"}
    out = child_json([sys.executable, "-m", "mmretrieve.bench.store_ops", op, str(path), str(seed)], env=env,
                     timeout=3600)
    if "error" in out:
        raise RuntimeError(f"bench store: {op} on {path} failed:\n{out['stderr']}")
    return out


def _measure(path: Path, prefix: str) -> dict:
    out = {}
    for op in OPS:
        src = path.with_name(path.name + f"-{op}")
        shutil.copytree(path, src)
        try:
            out[op] = _op(prefix + op, src, seed=7)
        finally:
            shutil.rmtree(src, ignore_errors=True)
    return out


def _one_size(tmp: Path, n: int, d: int, baseline: bool) -> dict:
    from mmretrieve.bench.store_ops import base_build, disk_bytes
    from mmretrieve.ingest import import_embeddings

    src = _source(tmp, n, d)
    t = time.perf_counter()
    import_embeddings(tmp / f"ours{n}", src, encoder="bench-random")
    row = {"n": n, "import_s": round(time.perf_counter() - t, 2), "data_bytes": disk_bytes(tmp / f"ours{n}")}
    row["ours"] = _measure(tmp / f"ours{n}", "")
    if baseline:
        t = time.perf_counter()
        base_build(tmp / f"base{n}", np.load(src, mmap_mode="r"))
        row["base_build_s"] = round(time.perf_counter() - t, 2)
        row["base_data_bytes"] = disk_bytes(tmp / f"base{n}")
        row["base"] = _measure(tmp / f"base{n}", "base-")
    shutil.rmtree(tmp / f"base{n}", ignore_errors=True)
    return row


def _fanout(tmp: Path, n: int, d: int) -> dict:
    """Median single-query latency over 10 segments vs one segment of the same vectors."""
    from mmretrieve.ingest.embeddings import import_embeddings

    src = tmp / f"vec{n}.npy"
    out = {}
    for segs in (1, 10):
        import_embeddings(tmp / f"fan{segs}", src, encoder="bench-random", segment_rows=-(-n // segs), auto_compact=False)
        out[segs] = _op("open", tmp / f"fan{segs}", seed=3)["median_search_s"]
        shutil.rmtree(tmp / f"fan{segs}", ignore_errors=True)
    return {"n": n, "one_segment_ms": round(out[1] * 1e3, 2), "ten_segments_ms": round(out[10] * 1e3, 2),
            "ratio": round(out[10] / out[1], 3), "target": "<= 1.2"}


_IMPORT_CHILD = """
import json, resource, sys, time
import faiss
faiss.omp_set_num_threads(int(sys.argv[4]))
which, src, factory = sys.argv[1], sys.argv[2], sys.argv[3]
t = time.perf_counter()
if which == "mmretrieve":
    from mmretrieve.ingest import import_embeddings
    import_embeddings(sys.argv[5], src, encoder="bench-random", factory=factory)
else:  # FAISS's own build of the same factory: trained on as many rows (spread the same way), added in chunks
    import numpy as np
    from mmretrieve.store.feed import train_sample_rows
    x = np.load(src, mmap_mode="r")
    idx = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    ns = min(len(x), train_sample_rows(idx))
    idx.train(np.ascontiguousarray(x[np.linspace(0, len(x) - 1, ns).astype(np.int64)]))
    for s in range(0, len(x), 200_000):
        idx.add(np.ascontiguousarray(x[s:s + 200_000]))
    faiss.write_index(idx, sys.argv[5])
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _import_vs_faiss(tmp: Path, n: int, factory: str, threads: int) -> dict:
    """``index import`` of the largest source against FAISS building the same factory from the same .npy,
    each in a process of its own (time and peak RSS); the rate ratio is FAISS's time over ours."""
    from mmretrieve.store.segments import min_train_rows, new_template

    src = tmp / f"vec{n}.npy"
    out = {"n": n, "factory": factory, "threads": threads}
    if n < min_train_rows(new_template(int(np.load(src, mmap_mode="r").shape[1]), factory)):
        raise RuntimeError(f"bench store: {factory} needs more rows to train than N={n:,}; give --import-factory ''")
    for which in ("faiss", "mmretrieve"):
        dest = tmp / f"import-{which}"
        out[which] = child_json([sys.executable, "-c", _IMPORT_CHILD, which, str(src), factory, str(threads), str(dest)],
                                timeout=7200)
        if "error" in out[which]:
            raise RuntimeError(f"bench store: the {which} import failed:\n{out[which]['stderr']}")
        shutil.rmtree(dest, ignore_errors=True) if dest.is_dir() else dest.unlink(missing_ok=True)
    out["rate_vs_faiss"] = round(out["faiss"]["seconds"] / out["mmretrieve"]["seconds"], 3)
    return out


_LANCEDB_CHILD = """
import json, statistics, sys, time
import numpy as np, lancedb, pyarrow as pa
src, dest = sys.argv[1], sys.argv[2]
x = np.load(src, mmap_mode="r")
db = lancedb.connect(dest)
def batch(a, start):
    return pa.table({"id": pa.array(np.arange(start, start + len(a)), pa.int64()),
                     "vector": pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(a).ravel()), a.shape[1])})
t = db.create_table("items", batch(x[:100_000], 0))
for s in range(100_000, len(x), 100_000):
    t.add(batch(x[s:s + 100_000], s))
rng = np.random.default_rng(1)
times = []
for j in range(7):
    v = rng.standard_normal((10, x.shape[1])).astype(np.float32)
    t0 = time.perf_counter()
    t.add(batch(v / np.linalg.norm(v, axis=1, keepdims=True), len(x) + 10 * j))
    times.append(time.perf_counter() - t0)
print(json.dumps({"add10_median_s": statistics.median(times), "lancedb": lancedb.__version__}))
"""


def _lancedb_small_write(tmp: Path, n: int, python: str) -> dict:
    """LanceDB's add of 10 rows to a table of the same ``n`` vectors (the median of 7), run by
    ``python``: an environment of its own with ``lancedb`` (not a dependency of mmretrieve)."""
    dest = tmp / "lancedb"
    try:
        out = child_json([python, "-c", _LANCEDB_CHILD, str(tmp / f"vec{n}.npy"), str(dest)], timeout=3600)
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    out.pop("stderr", None)
    return {"n": n, **out}


def _amplification(tmp: Path, d: int, writes: int = 400, batch: int = 50) -> dict:
    """Many small writes into one index: bytes written by compaction merges per byte of live data."""
    from mmretrieve.bench.store_ops import disk_bytes
    from mmretrieve.ingest import add_vectors
    from mmretrieve.store import compaction

    path = tmp / "amp"
    merged = {"bytes": 0, "merges": 0}
    real = compaction.merge_segments

    def counting(*args, **kwargs):
        entry = real(*args, **kwargs)
        if entry is not None:
            merged["bytes"] += sum(f["bytes"] for f in entry["files"].values())
            merged["merges"] += 1
        return entry

    compaction.merge_segments = counting
    try:
        rng = np.random.default_rng(0)
        for j in range(writes):
            x = rng.standard_normal((batch, d), dtype=np.float32)
            add_vectors(path, x / np.linalg.norm(x, axis=1, keepdims=True), keys=[f"{j}-{i}" for i in range(batch)],
                        encoder="bench-random")
    finally:
        compaction.merge_segments = real
    from mmretrieve.store import read_manifest

    m = read_manifest(path)
    data = sum(f["bytes"] for e in m["segments"] for f in e["files"].values())
    n = writes * batch
    res = {"rows": n, "writes": writes, "batch": batch, "segments": len(m["segments"]), "merges": merged["merges"],
           "merge_bytes_per_data_byte": round(merged["bytes"] / data, 2),
           "bound_rewrites_per_row": compaction.write_amplification_bound(n), "disk_bytes": disk_bytes(path)}
    shutil.rmtree(path, ignore_errors=True)
    return res


def run(args) -> dict:
    d = int(args.dim)
    sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    tmp = Path(args.dir or tempfile.mkdtemp(prefix="mmr-bench-store-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        rows = [_one_size(tmp, n, d, not args.no_baseline) for n in sizes]
        fan = _fanout(tmp, sizes[-1], d)
        amp = _amplification(tmp, d)
        imp = _import_vs_faiss(tmp, sizes[-1], args.import_factory, int(getattr(args, "threads", None) or 2)) \
            if args.import_factory else None
        lance = [_lancedb_small_write(tmp, n, args.lancedb_python) for n in sizes] if args.lancedb_python else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"benchmark": "store", "dim": d, "results": rows, "fanout": fan, "compaction": amp, "import": imp, "lancedb": lance}


def _fmt(r: dict, key: str) -> str:
    o = r[key]
    return (f"add10 {o['add10']['seconds']:7.3f} s {o['add10']['written'] / 1e6:8.2f} MB  "
            f"rm3 {o['rm3']['seconds']:7.3f} s {o['rm3']['written'] / 1e6:8.2f} MB  "
            f"open {o['open']['open_s']:6.3f} s +{(o['open']['anon_after_open'] - o['open']['anon_before']) / 1e6:7.1f} MB anon  "
            f"search first {o['open']['first_search_s'] * 1e3:7.1f} ms median {o['open']['median_search_s'] * 1e3:7.1f} ms  "
            f"peak RSS add {o['add10']['peak_rss'] / 1e9:5.2f} GB  disk after 5 adds {o['add10x5']['disk_after'] / 1e6:8.1f} MB")


def render(res: dict) -> list[str]:
    rows = res["results"]
    out = [f"store benchmark: d={res['dim']}, random unit vectors imported through `index import`; each operation "
           "in a fresh process"]
    for r in rows:
        out.append(f"  N={r['n']:>9,}  mmretrieve  {_fmt(r, 'ours')}")
        if "base" in r:
            out.append(f"  {'':11s}  FAISS+SQLite {_fmt(r, 'base')}")
    b = rows[0]
    out.append(f"  growth vs N={b['n']:,} (mmretrieve / baseline):")
    for r in rows[1:]:
        def ratio(key, op, field="seconds", r=r):
            return r[key][op][field] / max(b[key][op][field], 1e-9)
        line = (f"    N={r['n']:>9,}: add {ratio('ours', 'add10'):6.2f}x, rm {ratio('ours', 'rm3'):6.2f}x, "
                f"open {ratio('ours', 'open', 'open_s'):6.2f}x, bytes/add {ratio('ours', 'add10', 'written'):6.2f}x")
        if "base" in r:
            line += (f"   | baseline add {ratio('base', 'add10'):7.2f}x, rm {ratio('base', 'rm3'):7.2f}x, "
                     f"open {ratio('base', 'open', 'open_s'):7.2f}x, bytes/add {ratio('base', 'add10', 'written'):8.1f}x")
        out.append(line)
    big = rows[-1]["ours"]
    data = rows[-1]["data_bytes"]
    out.append(f"  at N={rows[-1]['n']:,}: disk after 5 small adds / data = {big['add10x5']['disk_after'] / data:.3f} "
               f"(target <= 1.1); add {big['add10']['seconds']:.3f} s, rm {big['rm3']['seconds']:.3f} s (targets < 1 s, "
               f"<= 2x of N={b['n']:,}); {big['add10']['written'] / 1e6:.2f} MB written per add of 10 (target < 10 MB)")
    f = res["fanout"]
    out.append(f"  search over 10 segments vs one (N={f['n']:,}): {f['ten_segments_ms']} vs {f['one_segment_ms']} ms "
               f"= {f['ratio']}x (target <= 1.2)")
    i = res.get("import")
    if i:
        out.append(f"  import of N={i['n']:,} as {i['factory']} ({i['threads']} threads): mmretrieve {i['mmretrieve']['seconds']:.1f} s, "
                   f"peak RSS {i['mmretrieve']['peak_rss'] / 1e9:.2f} GB; FAISS's own build {i['faiss']['seconds']:.1f} s, "
                   f"peak RSS {i['faiss']['peak_rss'] / 1e9:.2f} GB; rate x{i['rate_vs_faiss']} of FAISS's (target >= 0.7)")
    for L, r in zip(res.get("lancedb") or [], rows):
        if "error" in L:
            out.append(f"  LanceDB anchor at N={L['n']:,}: not measured ({L['error']})")
        else:
            out.append(f"  add of 10 at N={L['n']:,}: mmretrieve {r['ours']['add10']['seconds']:.3f} s (the first add in a fresh process), "
                       f"LanceDB {L['lancedb']} {L['add10_median_s']:.4f} s (in process, median of 7)")
    a = res["compaction"]
    out.append(f"  compaction: {a['writes']} writes of {a['batch']} -> {a['segments']} segments after {a['merges']} merges; "
               f"merges wrote {a['merge_bytes_per_data_byte']}x the data (bound: each row rewritten <= "
               f"{a['bound_rewrites_per_row'] - 1} times)")
    return out
