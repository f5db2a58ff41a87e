"""Near-duplicate groups of one index snapshot, from the index's own vectors and its own search.

Every live item's stored vector is searched for its top ``k`` neighbours (in batches of rows: O(N·k)
searched pairs, never the O(N²) pairwise matrix); each pair at or above ``threshold`` joins its two
items in a union-find; a group is a connected set of two or more items, represented by its smallest
id (the first added). ``dedupe_hits`` keeps one hit per group in a ranked list (the best-ranked).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from mmretrieve.errors import UsageError

log = logging.getLogger(__name__)

#: rows searched per batch (one batched scan each)
BATCH = 2048


@dataclass
class DupeGroup:
    """A group of near-duplicate items: its ``representative`` (smallest id) and every member's id and key."""

    representative: int
    ids: list[int]
    keys: list[str] = field(default_factory=list)
    min_score: float | None = None  # the weakest joining pair's similarity

    def to_dict(self) -> dict:
        return {"representative": self.representative, "ids": self.ids, "keys": self.keys, "size": len(self.ids),
                "min_score": self.min_score}


def _find(parent: np.ndarray, i: int) -> int:
    root = i
    while parent[root] != root:  # bounded: each step moves up a tree of at most N nodes
        root = parent[root]
    while parent[i] != root:  # path compression
        parent[i], i = root, parent[i]
    return int(root)


def live_rows(index):
    """(segment, rows, ids) of every segment's live rows."""
    for seg in index.vector_index.segments:
        if not seg.rows:
            continue
        ids = np.asarray(seg.ids, np.int64)
        alive = np.ones(len(ids), bool)
        dead = np.asarray(seg.deleted, np.int64)
        alive[dead[dead < len(ids)]] = False
        rows = np.flatnonzero(alive)
        if len(rows):
            yield seg, rows, ids[rows]


def duplicate_pairs(index, threshold: float, k: int, *, batch: int = BATCH):
    """(a, b, score) arrays of every neighbour pair at or above ``threshold`` (a < b), from each live item's
    top-``k`` search over the index (itself excluded)."""
    a_all, b_all, s_all = [], [], []
    for seg, rows, ids in live_rows(index):
        for s in range(0, len(rows), batch):
            q = seg.vectors(rows[s : s + batch])
            D, I = index.search_vectors(q, k + 1)
            src = np.repeat(ids[s : s + batch], I.shape[1]).reshape(I.shape)
            m = (I >= 0) & (I != src) & (D >= threshold)
            a, b = np.minimum(src[m], I[m]), np.maximum(src[m], I[m])
            a_all.append(a)
            b_all.append(b)
            s_all.append(D[m].astype(np.float32))
    if not a_all:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(a_all), np.concatenate(b_all), np.concatenate(s_all)


def near_duplicates(index, threshold: float = 0.95, k: int = 10) -> list[DupeGroup]:
    """The groups of near-duplicate items (see the module); largest first, then by representative."""
    if not 0.0 < float(threshold) <= 1.0 + 1e-6:
        raise UsageError(f"threshold must be in (0, 1] (a cosine similarity), got {threshold}")
    if int(k) < 1:
        raise UsageError(f"k must be at least 1, got {k}")
    if index.manifest.get("metric", "ip") != "ip":
        raise UsageError("near-duplicates compare inner products (cosine on normalised vectors); this index's "
                         f"metric is {index.manifest.get('metric')!r}")
    t0 = time.perf_counter()
    a, b, sc = duplicate_pairs(index, float(threshold), int(k))
    if not len(a):
        return []
    nodes, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    pa, pb = inv[: len(a)], inv[len(a) :]
    parent = np.arange(len(nodes))
    for x, y in zip(pa.tolist(), pb.tolist()):  # one union per pair: O(N·k)
        rx, ry = _find(parent, x), _find(parent, y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    roots = np.array([_find(parent, i) for i in range(len(nodes))])
    weakest: dict[int, float] = {}
    for x, s in zip(pa.tolist(), sc.tolist()):
        r = int(roots[x])
        weakest[r] = min(weakest.get(r, 2.0), float(s))
    members: dict[int, list[int]] = {}
    for i, r in enumerate(roots.tolist()):
        members.setdefault(r, []).append(int(nodes[i]))
    items = index.items([int(i) for i in nodes])
    groups = [DupeGroup(representative=min(ids), ids=sorted(ids), keys=[items[i].key for i in sorted(ids) if i in items],
                        min_score=round(weakest.get(r, 1.0), 6)) for r, ids in members.items()]
    groups.sort(key=lambda g: (-len(g.ids), g.representative))
    log.info("near-duplicates of %s: %d groups from %d pairs in %.2f s", index.name, len(groups), len(a),
             time.perf_counter() - t0)
    return groups


def group_of(groups: list[DupeGroup]) -> dict[int, int]:
    """item id -> its group's representative, for the items in a group."""
    return {i: g.representative for g in groups for i in g.ids}


def dedupe_hits(hits, groups: dict[int, int]) -> list:
    """The hits with only the best-ranked of each duplicate group kept (``groups``: ``group_of``)."""
    seen: set[int] = set()
    out = []
    for h in hits:
        g = groups.get(int(h.id), int(h.id))
        if g in seen:
            continue
        seen.add(g)
        out.append(h)
    return out


__all__ = ["DupeGroup", "near_duplicates", "duplicate_pairs", "group_of", "dedupe_hits", "live_rows"]
