"""``mmretrieve bench rerank``: EMD re-ranking speed of every solver (ms per query) and its agreement
with the exact ranking, on synthetic clustered patch features."""

from __future__ import annotations

import statistics
import time

import numpy as np

HELP = "EMD re-ranking speed of every solver (ms per query) and its agreement with the exact ranking"


def add_arguments(p) -> None:
    p.add_argument("-K", "--candidates", type=int, default=100, help="shortlist size (default 100)")
    p.add_argument("--patches", default="49,196", help="patch counts per image (square numbers)")
    p.add_argument("--dim", type=int, default=512, help="patch feature dimension")
    p.add_argument("--queries", type=int, default=7, help="random queries (median over queries reported)")
    p.add_argument("--repeat", type=int, default=3, help="runs per query and solver (the fastest counts: noisy machines)")
    p.add_argument("--weights", default="apc", help="patch weighting: uniform, apc or sc")
    p.add_argument("--skip-pot-sinkhorn", action="store_true", help="skip POT's per-pair sinkhorn (slow at 196)")


def synthetic_patches(K: int, n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A query and K candidates whose patches share a varying fraction of the query's local content,
    drawn around 16 shared "visual word" centres, so the EMD ranking is meaningful (not all ties)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((16, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    Q = unit(centres[rng.integers(0, 16, n)] + 0.5 * rng.standard_normal((n, d)) / np.sqrt(d) * 4)
    C = np.empty((K, n, d), np.float32)
    for k in range(K):
        share = rng.uniform(0, 1)
        own = unit(centres[rng.integers(0, 16, n)] + 0.5 * rng.standard_normal((n, d)) / np.sqrt(d) * 4)
        from_q = unit(Q[rng.integers(0, n, n)] + 0.3 * rng.standard_normal((n, d)) / np.sqrt(d) * 4)
        mask = rng.uniform(size=n) < share
        C[k] = np.where(mask[:, None], from_q, own)
    return Q.astype(np.float32), C


def _solvers(threads: int, skip_pot: bool, devices) -> dict:
    from mmretrieve.rerank.ot import emd_exact, emd_pot_sinkhorn, sinkhorn_batched

    solvers = {
        "exact (POT emd2, 1 thread)": lambda S, a, b: emd_exact(S, a, b, threads=1),
        f"exact (POT emd2, {threads} threads)": lambda S, a, b: emd_exact(S, a, b, threads=threads),
    }
    if not skip_pot:
        solvers["POT sinkhorn2 per pair (reg 0.05)"] = lambda S, a, b: emd_pot_sinkhorn(S, a, b, reg=0.05, method="sinkhorn")
    for dev in devices:
        tag = "" if dev.type == "cpu" else " [cuda]"
        solvers[f"batched sinkhorn, default (reg 0.05, <=50 it, adaptive tol){tag}"] = lambda S, a, b: sinkhorn_batched(S, a, b)
        solvers[f"batched sinkhorn (reg 0.05, 10 it){tag}"] = lambda S, a, b: sinkhorn_batched(S, a, b, max_iter=10, tol=0)
        if dev.type == "cpu":
            solvers["batched sinkhorn, torch.bmm backend (reg 0.05, <=50 it)"] = (
                lambda S, a, b: sinkhorn_batched(S, a, b, backend="torch"))
        solvers[f"batched sinkhorn log-domain (reg 0.02, <=100 it){tag}"] = (
            lambda S, a, b: sinkhorn_batched(S, a, b, reg=0.02, max_iter=100, tol=0.005, mode="log"))
    return solvers


def _time_patches(args, n: int, K: int, d: int, solvers: dict) -> dict[str, dict[str, list]]:
    """Per solver: the best-of-repeat ms per query, top-10 overlap and Kendall tau with the first (exact)."""
    import torch
    from scipy.stats import kendalltau

    from mmretrieve.rerank.ot import marginals, similarity_matrices

    rows = {name: {"ms": [], "top10": [], "tau": []} for name in solvers}
    for qi in range(int(args.queries)):
        Q, C = synthetic_patches(K, n, d, seed=1000 * n + qi)
        ref = None
        for name, fn in solvers.items():
            dev = torch.device("cuda") if "[cuda]" in name else torch.device("cpu")

            def run_one(fn=fn, dev=dev, Q=Q, C=C):
                S = similarity_matrices(Q, C, dev)  # the cost matrices are part of the timing
                a, b = marginals(S, torch.as_tensor(Q, device=dev), torch.as_tensor(C, device=dev), args.weights)
                out = fn(S, a, b)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                return out

            if qi == 0:
                run_one()  # warm-up
            best = float("inf")
            for _ in range(max(1, int(args.repeat))):
                t = time.perf_counter()
                sims = run_one()
                best = min(best, time.perf_counter() - t)
            ref = sims if ref is None else ref
            rows[name]["ms"].append(best * 1000)
            rows[name]["top10"].append(len(set(np.argsort(-sims)[:10]) & set(np.argsort(-ref)[:10])) / 10)
            rows[name]["tau"].append(float(kendalltau(sims, ref).statistic))
    return rows


def run(args) -> dict:
    import torch

    from mmretrieve.rerank.emd import default_solver
    from mmretrieve.settings import threads as default_threads

    K, d = int(args.candidates), int(args.dim)
    threads = default_threads()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    results = []
    for n in [int(x) for x in str(args.patches).split(",")]:
        rows = _time_patches(args, n, K, d, _solvers(threads, args.skip_pot_sinkhorn, devices))
        default = default_solver(torch.device("cuda" if torch.cuda.is_available() else "cpu"), n)
        results.append({"patches": n, "grid": int(round(n**0.5)), "default_solver": default, "solvers": [
            {"solver": name, "ms_per_query": round(statistics.median(r["ms"]), 2),
             "top10_overlap": round(float(np.mean(r["top10"])), 3), "kendall_tau": round(float(np.mean(r["tau"])), 3)}
            for name, r in rows.items()]})
    return {"benchmark": "rerank", "candidates": K, "dim": d, "threads": threads, "weights": args.weights,
            "queries": int(args.queries), "repeat": int(args.repeat), "results": results}


def render(res: dict) -> list[str]:
    out = []
    for entry in res["results"]:
        out.append(f"\nEMD re-ranking, K={res['candidates']} candidates x {entry['patches']} patches, d={res['dim']}, "
                   f"weights={res['weights']}, median over {res['queries']} queries of the best of {res['repeat']} runs "
                   f"(cost matrices included); default solver here: {entry['default_solver']}")
        out.append(f"  {'solver':58s} {'ms/query':>9s} {'top-10 vs exact':>16s} {'Kendall tau':>12s}")
        for s in entry["solvers"]:
            out.append(f"  {s['solver']:58s} {s['ms_per_query']:9.1f} {s['top10_overlap']:16.2f} {s['kendall_tau']:12.3f}")
    out.append("\ntargets for the default solver on 2 CPU cores: < 20 ms at 49 patches, < 150 ms at 196, top-10 >= 0.9")
    return out
