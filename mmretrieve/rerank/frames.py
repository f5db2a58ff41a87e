"""``frames``: frame-level max-pooled re-scoring of videos (CLIPRerank).

For each shortlisted video, the similarity of every stored frame to the query is computed and pooled
(``max`` by default, as in CLIPRerank; ``mean`` or the mean of the ``m`` best, ``topm``), then fused
with the previous score. CLIPRerank puts 0.4 on the initial score: ``S = 0.4 * M + 0.6 * max_i S(q, f_i)``,
which is ``alpha = 0.6`` in mmretrieve's convention (alpha weighs the new score). The best frame's
timestamp is returned with each hit (``hit.extra["timestamp"]``). Images in the shortlist count as
one-frame videos. Works for text, image and composed queries (the same fused query vector as the
coarse stage).
"""

from __future__ import annotations

import numpy as np

from mmretrieve.errors import UsageError
from mmretrieve.rerank.base import RERANKERS, Reranker, RerankOutput

POOLINGS = ("max", "mean", "topm")


@RERANKERS.register("frames")
class FramesReranker(Reranker):
    """Max-pooled frame similarity for videos, fused with the coarse score (CLIPRerank)."""

    name = "frames"

    def __init__(self, *, k: int = 100, alpha: float | None = 0.6, norm: str = "none", pooling: str = "max", m: int = 3) -> None:
        super().__init__(k=k, alpha=alpha, norm=norm)
        if pooling not in POOLINGS:
            raise UsageError(f"frames: pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if int(m) < 1:
            raise UsageError(f"frames: m must be >= 1, got {m}")
        self.pooling = pooling
        self.m = int(m)

    def gather(self, index, ids: np.ndarray):
        """All frames of the shortlist as one matrix: (sum T, D) embeddings, timestamps, per-item offsets.
        (Every indexed video stores its frames; an item without any counts as a single frame.)"""
        return index.frames_matrix([int(i) for i in ids], as_torch=True)

    def pool(self, sims: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per segment: the pooled score and the index (into ``sims``) of the best frame."""
        starts = offsets[:-1]
        best = np.maximum.reduceat(sims, starts)
        seg = np.repeat(np.arange(len(starts)), np.diff(offsets))
        hit = np.flatnonzero(sims >= best[seg])  # the first frame reaching each segment's max
        _, first = np.unique(seg[hit], return_index=True)
        arg = hit[first]
        if self.pooling == "max":
            return best, arg
        if self.pooling == "mean":
            return np.add.reduceat(sims, starts) / np.diff(offsets), arg
        out = np.empty(len(starts))
        for j, (s, e) in enumerate(zip(starts, offsets[1:])):
            seg = sims[s:e]
            m = min(self.m, len(seg))
            out[j] = np.partition(seg, len(seg) - m)[len(seg) - m :].mean()
        return out, arg

    def score(self, index, query, ids: np.ndarray, scores: np.ndarray | None = None) -> RerankOutput:
        if len(ids) == 0:
            return RerankOutput(np.zeros(0))
        q = query.vector
        F, ts, offsets = self.gather(index, ids)
        sims = index.frame_similarities(F, q)
        pooled, arg = self.pool(sims, offsets)
        extra = {}
        for i, a in zip(ids, arg):
            t = float(ts[a])
            extra[int(i)] = {"frame_score": float(sims[a])} if np.isnan(t) else {"timestamp": t, "frame_score": float(sims[a])}
        return RerankOutput(pooled.astype(np.float64), extra)
