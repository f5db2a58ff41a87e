"""``mmretrieve bench emd-ood``: does patch EMD rescue out-of-distribution queries on real photos?
Gallery images turned into queries by a crop, an occlusion, a rotation and a rescale; the target is the
source image; Recall@1/5 of the coarse stage vs. EMD re-ranking with each solver and patch weighting."""

from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

HELP = "Recall@1/5 of crop/occlusion/rotation/rescale queries: coarse stage vs. patch EMD re-ranking"
TRANSFORMS = ("crop", "occlude", "rotate", "rescale")


def add_arguments(p) -> None:
    p.add_argument("--encoder", action="append", default=None,
                   help="encoder(s) to test (default: embedded, plus a tiny random open_clip smoke run)")
    p.add_argument("--queries", type=int, default=40, help="gallery images turned into queries")
    p.add_argument("-K", type=int, default=100, help="shortlist re-ranked by EMD")
    p.add_argument("--alpha", type=float, default=0.7, help="EMD fusion weight")
    p.add_argument("--seed", type=int, default=0, help="random seed of the query transforms")


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
    from mmretrieve.media.samples import opencv_doc_images, sample_images

    seen, out = set(), []
    for s in sample_images() + opencv_doc_images(photos_only=False):
        if s.id not in seen:
            seen.add(s.id)
            out.append(s)
    return out


def _rank_of(ids: np.ndarray, target: int) -> int:
    pos = np.flatnonzero(ids == target)
    return int(pos[0]) + 1 if len(pos) else 10**9


def _make_queries(gallery, qsrc, qdir: Path, seed: int) -> list[tuple[str, Path, str]]:
    from mmretrieve.media.images import load_image

    qdir.mkdir()
    queries = []  # (transform, path, target id)
    for t in TRANSFORMS:
        trng = np.random.default_rng(seed + TRANSFORMS.index(t) + 1)
        for j in qsrc:
            s = gallery[int(j)]
            p = qdir / f"{t}-{s.id.replace('/', '_')}.png"
            make_query(load_image(s.path), t, trng).save(p)
            queries.append((t, p, s.id))
    return queries


def _evaluate_encoder(idx, queries, args) -> list[dict]:
    """Ranks of every query's target under each configuration -> one table row per configuration."""
    from mmretrieve.index.search import coarse, encode_query
    from mmretrieve.query import Query
    from mmretrieve.rerank.emd import EMDReranker

    configs = [("coarse only", None, None)] + [
        (f"EMD {solver}, {w}", solver, w) for solver in ("exact", "sinkhorn") for w in ("uniform", "apc", "sc")]
    hits = {c[0]: {t: [] for t in TRANSFORMS} for c in configs}
    timing = {c[0]: [] for c in configs}
    rer = EMDReranker(k=args.K, alpha=args.alpha)
    key_to_id = {it.key: it.id for it in idx.meta.iter_items()}
    for t, p, target in queries:
        q = encode_query(idx, Query(image=p))
        ids, scores = coarse(idx, q.plan(min(args.K, len(idx))))
        tid = key_to_id[target]
        hits["coarse only"][t].append(_rank_of(ids, tid))
        Qp, Cp = rer.query_patches(idx.view, q), idx.patches(ids.tolist())
        for name, solver, w in configs[1:]:
            rer.weights = w
            t0 = time.perf_counter()
            fused = rer.fuse(rer.similarities(Qp, Cp, solver=solver), scores)
            timing[name].append((time.perf_counter() - t0) * 1000)
            hits[name][t].append(_rank_of(ids[np.argsort(-fused, kind="stable")], tid))
    table = []
    for name, _, _ in configs:
        row: dict = {"config": name}
        for t in (*TRANSFORMS, "all"):
            r = np.array(hits[name][t] if t != "all" else sum(hits[name].values(), []))
            row[f"{t}/R@1"], row[f"{t}/R@5"] = round(100 * float(np.mean(r <= 1)), 1), round(100 * float(np.mean(r <= 5)), 1)
        if timing[name]:
            row["ms_per_query"] = round(statistics.median(timing[name]), 1)
        table.append(row)
    return table


def run(args) -> dict:
    from mmretrieve.encoders import create_encoder
    from mmretrieve.index import open_index
    from mmretrieve.ingest import build_index
    from mmretrieve.media.samples import opencv_doc_dir, write_manifest
    from mmretrieve.testing import write_tiny_open_clip

    gallery = ood_gallery()
    if opencv_doc_dir() is None:
        log.warning("opencv-doc sample images not found (`make opencv-doc`); the gallery has only %d images", len(gallery))
    qsrc = np.random.default_rng(args.seed).choice(len(gallery), size=min(args.queries, len(gallery)), replace=False)
    report = {"benchmark": "emd-ood", "gallery": len(gallery), "queries_per_transform": len(qsrc), "K": args.K,
              "alpha": args.alpha, "encoders": {}}
    tmp = Path(tempfile.mkdtemp(prefix="mmr-bench-ood-"))
    try:
        queries = _make_queries(gallery, qsrc, tmp / "queries", args.seed)
        manifest = write_manifest(gallery, tmp / "gallery.csv")
        for enc_name in args.encoder or ["embedded", "tiny-open-clip"]:
            if enc_name == "tiny-open-clip":
                enc, label = create_encoder(write_tiny_open_clip(tmp / "tiny-clip", seed=0)), "tiny open_clip (random weights, smoke run)"
            else:
                enc = create_encoder(enc_name)
                label = enc.name
            build_index(tmp / "idx", manifest, encoder=enc, patches=True, overwrite=True)
            with open_index(tmp / "idx") as idx:
                report["encoders"][label] = _evaluate_encoder(idx, queries, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def render(res: dict) -> list[str]:
    out = []
    for label, table in res["encoders"].items():
        out.append(f"\n{label}: gallery {res['gallery']} images, {res['queries_per_transform']} queries per transform, "
                   f"EMD over the top {res['K']} (alpha {res['alpha']}); Recall@1 / @5 in %")
        out.append(f"  {'':22s}" + "".join(f"{t:>14s}" for t in (*TRANSFORMS, "all")) + f"{'ms/query':>10s}")
        for row in table:
            cells = "".join(f"{row[f'{t}/R@1']:6.1f} /{row[f'{t}/R@5']:5.1f} " for t in (*TRANSFORMS, "all"))
            out.append(f"  {row['config']:22s}{cells}{row.get('ms_per_query', ''):>9}")
    return out
