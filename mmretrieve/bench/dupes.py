"""``mmretrieve bench dupes``: ``Index.near_duplicates`` on a synthetic index of N random unit vectors with
planted groups of near-copies (2..4 items each, cosine > 0.99 to their original): the time to find the
groups and the recall of the planted groups (a planted group counts when found exactly)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

HELP = "near-duplicate groups on N synthetic vectors with planted duplicates: time and recall of the planted groups"


def add_arguments(p) -> None:
    p.add_argument("--n", type=int, default=100_000, help="items (default 100000)")
    p.add_argument("--dim", type=int, default=128, help="vector dimension (default 128)")
    p.add_argument("--groups", type=int, default=1000, help="planted groups (default 1000)")
    p.add_argument("--threshold", type=float, default=0.95, help="duplicate similarity (default 0.95)")
    p.add_argument("-k", type=int, default=10, help="neighbours searched per item (default 10)")
    p.add_argument("--factory", default="Flat", help="FAISS factory of the index (default Flat)")


def planted(n: int, dim: int, groups: int, seed: int = 0) -> tuple[np.ndarray, list[list[int]]]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    picks = rng.permutation(n)
    truth, at = [], 0
    for g in range(min(groups, n // 4)):
        size = 2 + g % 3
        members = sorted(int(i) for i in picks[at : at + size])
        at += size
        for m in members[1:]:
            v = x[members[0]] + (0.1 / np.sqrt(dim)) * rng.standard_normal(dim).astype(np.float32)
            x[m] = v / np.linalg.norm(v)
        truth.append(members)
    return x, truth


def run(args) -> dict:
    from mmretrieve.index import open_index
    from mmretrieve.store import IndexWriter, Item

    x, truth = planted(int(args.n), int(args.dim), int(args.groups))
    info = {"name": "bench-vectors", "dim": int(args.dim), "modalities": ["image"]}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dupes"
        kw = {} if args.factory == "Flat" else {"factory": args.factory}
        t0 = time.perf_counter()
        with IndexWriter(path, encoder_info=info, create=True, auto_compact=False, **kw) as w:
            w.add([Item(id=-1, key=f"k{i}", uri=f"vec://{i}") for i in range(len(x))], x)
        build_s = time.perf_counter() - t0
        with open_index(path, search_device="cpu") as idx:
            t0 = time.perf_counter()
            found = idx.near_duplicates(float(args.threshold), int(args.k))
            secs = time.perf_counter() - t0
    got = {tuple(g.ids) for g in found}
    exact = sum(tuple(t) in got for t in truth)
    planted_items = {i for t in truth for i in t}
    extra = sum(1 for g in found if not set(g.ids) <= planted_items)
    return {"n": len(x), "dim": int(args.dim), "k": int(args.k), "threshold": float(args.threshold),
            "factory": args.factory, "planted_groups": len(truth), "found_groups": len(found),
            "exact_recall": round(exact / max(1, len(truth)), 4), "spurious_groups": extra,
            "seconds": round(secs, 2), "items_per_s": round(len(x) / secs), "build_s": round(build_s, 2)}


def render(res: dict) -> list[str]:
    return [f"near-duplicates: N={res['n']:,} d={res['dim']} {res['factory']} k={res['k']} threshold {res['threshold']}: "
            f"{res['seconds']:.2f} s ({res['items_per_s']:,} items/s); planted groups {res['planted_groups']}, "
            f"found {res['found_groups']}, recovered exactly {res['exact_recall']:.2%}, spurious {res['spurious_groups']}"]
