"""``mmretrieve bench scan``: the hand-written flat scan (``index.flatscan.FlatScan``: torch BLAS product
+ ``topk`` per block) against ``faiss.knn`` on the same rows, with FAISS's
``distance_compute_blas_threshold`` at its default and tuned, and against ``IndexFlatIP.search``, side by
side in one run per (N, batch, threads), fp32 rows and fp16 rows (``faiss.knn`` needs fp32: the
conversion is counted). Ratios are each method's time over the flat scan's (< 1: faster than the scan).
What ``FlatScan.search`` picks per case follows these figures (see docs/benchmarks.md)."""

from __future__ import annotations

import numpy as np

HELP = "the hand-written flat scan vs faiss.knn (BLAS threshold default and tuned) vs IndexFlatIP, per N, batch, threads"


def add_arguments(p) -> None:
    p.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated N (default 10000,100000,1000000)")
    p.add_argument("--batches", default="1,16,256", help="comma-separated query batch sizes (default 1,16,256)")
    p.add_argument("--thread-counts", default="1,2", help="comma-separated thread counts (torch and FAISS OpenMP) measured")
    p.add_argument("--dim", type=int, default=512, help="vector dimension (default 512)")
    p.add_argument("-k", type=int, default=100, help="results per query (default 100)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per cell (the median is reported)")
    p.add_argument("--no-fp16", action="store_true", help="skip the fp16-row cells")


def _methods(xb: np.ndarray, k: int):
    import faiss

    from mmretrieve.index.flatscan import FlatScan

    ids = np.arange(len(xb), dtype=np.int64)
    scan = FlatScan(xb, ids)
    out = {"flatscan": lambda q: scan._torch_search(q, k, np.zeros(0, np.int64))}

    def knn(threshold):
        def run(q):
            old = faiss.cvar.distance_compute_blas_threshold
            faiss.cvar.distance_compute_blas_threshold = threshold
            try:
                x = xb if xb.dtype == np.float32 else xb.astype(np.float32)  # fp16 rows: converted each time
                return faiss.knn(q, x, k, metric=faiss.METRIC_INNER_PRODUCT)
            finally:
                faiss.cvar.distance_compute_blas_threshold = old
        return run

    out["faiss.knn (blas>=20)"] = knn(20)
    out["faiss.knn (blas>=1)"] = knn(1)
    if xb.dtype == np.float32:
        flat = faiss.IndexFlatIP(xb.shape[1])
        flat.add(xb)
        out["IndexFlatIP"] = lambda q: flat.search(q, k)
    return out


def _cell(xb, q, k, repeat) -> dict:
    from mmretrieve.bench.common import median_time

    ms = {name: median_time(lambda f=f: f(q), repeat=repeat) * 1000 for name, f in _methods(xb, k).items()}
    base = ms["flatscan"]
    return {"ms": {n: round(v, 3) for n, v in ms.items()}, "over_flatscan": {n: round(v / base, 3) for n, v in ms.items()}}


def run(args) -> dict:
    import faiss
    import torch

    rng = np.random.default_rng(0)
    sizes = [int(s) for s in str(args.sizes).split(",")]
    batches = [int(b) for b in str(args.batches).split(",")]
    threads = [int(t) for t in str(args.thread_counts).split(",")]
    d, k = int(args.dim), int(args.k)
    xq = rng.standard_normal((max(batches), d)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    rows = []
    before = torch.get_num_threads()
    try:
        for n in sizes:
            xb = rng.standard_normal((n, d)).astype(np.float32)
            xb /= np.linalg.norm(xb, axis=1, keepdims=True)
            stores = [("fp32", xb)] + ([] if args.no_fp16 else [("fp16", xb.astype(np.float16))])
            for t in threads:
                torch.set_num_threads(t)
                faiss.omp_set_num_threads(t)
                for dtype, x in stores:
                    for b in batches:
                        rows.append({"n": n, "dtype": dtype, "batch": b, "threads": t,
                                     **_cell(x, xq[:b], min(k, n), int(args.repeat))})
            del xb, stores
    finally:
        torch.set_num_threads(before)
        faiss.omp_set_num_threads(before)
    return {"dim": d, "k": k, "faiss_version": faiss.__version__, "rows": rows}


def render(res: dict) -> list[str]:
    out = [f"flat scan vs faiss.knn: d={res['dim']}, k={res['k']}, FAISS {res['faiss_version']}; ms (x time of flatscan)"]
    for r in res["rows"]:
        cells = ", ".join(f"{n} {r['ms'][n]:.2f} (x{r['over_flatscan'][n]:.2f})" for n in r["ms"])
        out.append(f"  N={r['n']:>9,} {r['dtype']} batch {r['batch']:>4} threads {r['threads']}: {cells}")
    return out
