"""Re-ranking benchmarks: ``mmretrieve bench rerank`` (EMD solver speed and agreement) and
``mmretrieve bench emd-ood`` (does patch EMD rescue out-of-distribution queries on real photos?)."""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mmretrieve.bench import _print, register
from mmretrieve.rerank.ot import emd_exact, emd_pot_sinkhorn, marginals, similarity_matrices, sinkhorn_batched

log = logging.getLogger(__name__)


# ---- solver speed ------------------------------------------------------------------------------------
def _rerank_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-K", "--candidates", type=int, default=100)
    p.add_argument("--patches", default="49,196", help="patch counts per image (square numbers)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=7, help="random queries (median over queries reported)")
    p.add_argument("--repeat", type=int, default=3, help="runs per query and solver (the fastest counts: noisy machines)")
    p.add_argument("--weights", default="apc")
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


def _kendall_tau(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(x, y).statistic)


def _top_overlap(x: np.ndarray, y: np.ndarray, n: int = 10) -> float:
    return len(set(np.argsort(-x)[:n]) & set(np.argsort(-y)[:n])) / n


@register("rerank", _rerank_args)
def bench_rerank(args: argparse.Namespace) -> dict:
    """EMD re-ranking speed of every solver (ms per query) and its agreement with the exact ranking"""
    from mmretrieve.rerank.emd import default_solver
    from mmretrieve.runtime import default_threads

    K, d = int(args.candidates), int(args.dim)
    threads = default_threads()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    results = []
    for n in [int(x) for x in str(args.patches).split(",")]:
        solvers = {
            "exact (POT emd2, 1 thread)": lambda S, a, b: emd_exact(S, a, b, threads=1),
            f"exact (POT emd2, {threads} threads)": lambda S, a, b: emd_exact(S, a, b, threads=threads),
        }
        if not args.skip_pot_sinkhorn:
            solvers["POT sinkhorn2 per pair (reg 0.05)"] = lambda S, a, b: emd_pot_sinkhorn(S, a, b, reg=0.05, method="sinkhorn")
        for dev in devices:
            tag = "" if dev.type == "cpu" else " [cuda]"
            solvers[f"batched sinkhorn, default (reg 0.05, <=50 it, adaptive tol){tag}"] = (
                lambda S, a, b: sinkhorn_batched(S, a, b)
            )
            solvers[f"batched sinkhorn (reg 0.05, 10 it){tag}"] = (
                lambda S, a, b: sinkhorn_batched(S, a, b, max_iter=10, tol=0)
            )
            if dev.type == "cpu":
                solvers["batched sinkhorn, torch.bmm backend (reg 0.05, <=50 it)"] = (
                    lambda S, a, b: sinkhorn_batched(S, a, b, backend="torch")
                )
            solvers[f"batched sinkhorn log-domain (reg 0.02, <=100 it){tag}"] = (
                lambda S, a, b: sinkhorn_batched(S, a, b, reg=0.02, max_iter=100, tol=0.005, mode="log")
            )
        rows = {name: {"ms": [], "top10": [], "tau": []} for name in solvers}
        for qi in range(int(args.queries)):
            Q, C = synthetic_patches(K, n, d, seed=1000 * n + qi)
            ref = None
            for name, fn in solvers.items():
                dev = torch.device("cuda") if "[cuda]" in name else torch.device("cpu")

                def run(fn=fn, dev=dev, Q=Q, C=C):
                    Qt = torch.as_tensor(Q, device=dev)
                    Ct = torch.as_tensor(C, device=dev)
                    S = similarity_matrices(Q, C, dev)  # the cost matrices are part of the timing
                    a, b = marginals(S, Qt, Ct, args.weights)
                    out = fn(S, a, b)
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    return out

                if qi == 0:
                    run()  # warm-up
                best = float("inf")
                for _ in range(max(1, int(args.repeat))):
                    t = time.perf_counter()
                    sims = run()
                    best = min(best, time.perf_counter() - t)
                rows[name]["ms"].append(best * 1000)
                if ref is None:
                    ref = sims
                rows[name]["top10"].append(_top_overlap(sims, ref))
                rows[name]["tau"].append(_kendall_tau(sims, ref))
        default = default_solver(torch.device("cuda" if torch.cuda.is_available() else "cpu"), n)
        entry = {"patches": n, "grid": int(round(n**0.5)), "default_solver": default, "solvers": []}
        for name, r in rows.items():
            entry["solvers"].append(
                {
                    "solver": name,
                    "ms_per_query": round(statistics.median(r["ms"]), 2),
                    "top10_overlap": round(float(np.mean(r["top10"])), 3),
                    "kendall_tau": round(float(np.mean(r["tau"])), 3),
                }
            )
        results.append(entry)
        if not args.json:
            _print(f"\nEMD re-ranking, K={K} candidates x {n} patches, d={d}, weights={args.weights}, "
                   f"median over {args.queries} queries of the best of {args.repeat} runs (cost matrices included); "
                   f"default solver here: {default}")
            _print(f"  {'solver':58s} {'ms/query':>9s} {'top-10 vs exact':>16s} {'Kendall tau':>12s}")
            for s in entry["solvers"]:
                _print(f"  {s['solver']:58s} {s['ms_per_query']:9.1f} {s['top10_overlap']:16.2f} {s['kendall_tau']:12.3f}")
    if not args.json:
        _print("\ntargets for the default solver on 2 CPU cores: < 20 ms at 49 patches, < 150 ms at 196, top-10 >= 0.9")
    return {"benchmark": "rerank", "candidates": K, "dim": d, "threads": threads, "weights": args.weights, "results": results}


# ---- out-of-distribution effectiveness ---------------------------------------------------------------
def _ood_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", action="append", default=None,
                   help="encoder(s) to test (default: embedded, plus a tiny random open_clip smoke run)")
    p.add_argument("--queries", type=int, default=40, help="gallery images turned into queries")
    p.add_argument("-K", type=int, default=100, help="shortlist re-ranked by EMD")
    p.add_argument("--alpha", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)


TRANSFORMS = ("crop", "occlude", "rotate", "rescale")


def make_query(im, kind: str, rng: np.random.Generator):
    """An out-of-distribution view of a gallery image (the target is the source image)."""
    from PIL import Image

    w, h = im.size
    if kind == "crop":  # a random window of 35-50% of the area
        f = rng.uniform(0.6, 0.7)
        cw, ch = int(w * f), int(h * f)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return im.crop((x, y, x + cw, y + ch))
    if kind == "occlude":  # a grey block over about a third of the image
        out = im.copy()
        bw, bh = int(w * 0.55), int(h * 0.55)
        x, y = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        out.paste((128, 128, 128), (x, y, x + bw, y + bh))
        return out
    if kind == "rotate":
        angle = float(rng.choice([-1, 1]) * rng.uniform(30, 60))
        return im.rotate(angle, resample=Image.BICUBIC, expand=True, fillcolor=(255, 255, 255))
    if kind == "rescale":  # heavy down-scaling: 48 px on the long side
        s = 48 / max(w, h)
        return im.resize((max(8, int(w * s)), max(8, int(h * s))), Image.BILINEAR)
    raise ValueError(kind)


def ood_gallery() -> list:
    from mmretrieve.samples import opencv_doc_images, sample_images

    gallery = sample_images() + opencv_doc_images(photos_only=False)
    seen, out = set(), []
    for s in gallery:
        if s.id not in seen:
            seen.add(s.id)
            out.append(s)
    return out


@register("emd-ood", _ood_args)
def bench_emd_ood(args: argparse.Namespace) -> dict:
    """Recall@1/5 of crop/occlusion/rotation/rescale queries: coarse stage vs. patch EMD re-ranking"""
    from mmretrieve.encoders import create_encoder
    from mmretrieve.encoders.open_clip_encoder import write_tiny_open_clip
    from mmretrieve.index import build_index, open_index
    from mmretrieve.media.images import load_image
    from mmretrieve.query import Query
    from mmretrieve.rerank.emd import EMDReranker
    from mmretrieve.samples import opencv_doc_dir, write_manifest

    gallery = ood_gallery()
    if opencv_doc_dir() is None:
        log.warning("opencv-doc sample images not found (`make opencv-doc`); the gallery has only %d images", len(gallery))
    tmp = Path(tempfile.mkdtemp(prefix="mmr-bench-ood-"))
    encoders = args.encoder or ["embedded", "tiny-open-clip"]
    rng = np.random.default_rng(args.seed)
    qsrc = rng.choice(len(gallery), size=min(args.queries, len(gallery)), replace=False)
    report = {"benchmark": "emd-ood", "gallery": len(gallery), "queries_per_transform": len(qsrc), "K": args.K,
              "alpha": args.alpha, "encoders": {}}
    try:
        qdir = tmp / "queries"
        qdir.mkdir()
        queries = []  # (transform, path, target id)
        for t in TRANSFORMS:
            trng = np.random.default_rng(args.seed + TRANSFORMS.index(t) + 1)
            for j in qsrc:
                s = gallery[int(j)]
                p = qdir / f"{t}-{s.id.replace('/', '_')}.png"
                make_query(load_image(s.path), t, trng).save(p)
                queries.append((t, p, s.id))
        manifest = write_manifest(gallery, tmp / "gallery.csv")
        for enc_name in encoders:
            if enc_name == "tiny-open-clip":
                enc = create_encoder(write_tiny_open_clip(tmp / "tiny-clip", seed=0))
                label = "tiny open_clip (random weights, smoke run)"
            else:
                enc = create_encoder(enc_name)
                label = enc.name
            build_index(tmp / "idx", manifest, encoder=enc, patches=True, overwrite=True)
            idx = open_index(tmp / "idx")
            configs = [("coarse only", None, None)] + [
                (f"EMD {solver}, {w}", solver, w) for solver in ("exact", "sinkhorn") for w in ("uniform", "apc", "sc")
            ]
            hits = {c[0]: {t: [] for t in TRANSFORMS} for c in configs}
            timing = {c[0]: [] for c in configs}
            rer = EMDReranker(k=args.K, alpha=args.alpha)
            key_to_id = {it.key: it.id for it in idx.meta.iter_items()}
            for t, p, target in queries:
                q = Query(image=p)
                ids, scores = idx.coarse(q, min(args.K, len(idx)))
                tid = key_to_id[target]
                hits["coarse only"][t].append(_rank_of(ids, tid))
                Qp = rer.query_patches(idx, q)
                Cp = idx.patches(ids.tolist())
                for name, solver, w in configs[1:]:
                    rer.weights = w
                    t0 = time.perf_counter()
                    fine = rer.similarities(Qp, Cp, solver=solver)
                    fused = rer.fuse(fine, scores)
                    timing[name].append((time.perf_counter() - t0) * 1000)
                    hits[name][t].append(_rank_of(ids[np.argsort(-fused, kind="stable")], tid))
            table = []
            for name, _, _ in configs:
                row = {"config": name}
                all_ranks = []
                for t in TRANSFORMS:
                    r = np.array(hits[name][t])
                    all_ranks += list(r)
                    row[f"{t}/R@1"] = round(100 * float(np.mean(r <= 1)), 1)
                    row[f"{t}/R@5"] = round(100 * float(np.mean(r <= 5)), 1)
                a = np.array(all_ranks)
                row["all/R@1"], row["all/R@5"] = round(100 * float(np.mean(a <= 1)), 1), round(100 * float(np.mean(a <= 5)), 1)
                if timing[name]:
                    row["ms_per_query"] = round(statistics.median(timing[name]), 1)
                table.append(row)
            report["encoders"][label] = table
            idx.close()
            if not args.json:
                _print(f"\n{label}: gallery {len(gallery)} images, {len(qsrc)} queries per transform, "
                       f"EMD over the top {args.K} (alpha {args.alpha}); Recall@1 / @5 in %")
                head = f"  {'':22s}" + "".join(f"{t:>14s}" for t in (*TRANSFORMS, "all")) + f"{'ms/query':>10s}"
                _print(head)
                for row in table:
                    cells = "".join(f"{row[f'{t}/R@1']:6.1f} /{row[f'{t}/R@5']:5.1f} " for t in (*TRANSFORMS, "all"))
                    _print(f"  {row['config']:22s}{cells}{row.get('ms_per_query', ''):>9}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _rank_of(ids: np.ndarray, target: int) -> int:
    pos = np.flatnonzero(ids == target)
    return int(pos[0]) + 1 if len(pos) else 10**9
