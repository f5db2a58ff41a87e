"""The vectors of one index snapshot: top-k over all its segments, and stored vectors read back.

Each segment is searched on its own and the per-segment top-k lists are merged (by score, ties by id),
which gives the ids and, to float rounding, the scores of one Flat index over the same vectors. Flat
segments are scanned with BLAS over their memory-mapped rows (``flatscan``: resident memory grows with
what a search touches), deleted rows masked; FAISS segments (IVF, HNSW, PQ ...) are searched by FAISS
with their deleted and excluded ids filtered by a selector, and with a breadth (IVF ``nprobe``, HNSW
``efSearch``) raised and the search repeated while a segment returns fewer results than it has live
rows to give, so a search returns ``k`` results whenever the snapshot holds ``k`` live items, whatever
the share of deletions. On a GPU, Flat segments are searched as one matrix (``gpu``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from mmretrieve import settings
from mmretrieve.errors import BadVectorsError, DeviceError, UsageError
from mmretrieve.index.flatscan import FlatScan, inner_index

log = logging.getLogger(__name__)

SEARCH_DEVICES = ("auto", "cpu", "cuda")


def resolve_search_device(device: str | None, findex) -> str:
    """``auto`` -> ``cuda`` when a GPU back end can search ``findex`` here, else ``cpu``."""
    from mmretrieve.index.gpu import gpu_search_possible

    if device in (None, "auto"):  # the environment overrides the default, an explicit choice overrides both
        device = settings.search_device()
    device = device.lower()
    if device not in SEARCH_DEVICES:
        raise UsageError(f"unknown search device {device!r}; expected one of {', '.join(SEARCH_DEVICES)}")
    if device == "auto":
        return "cuda" if gpu_search_possible(findex) else "cpu"
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise DeviceError("search device 'cuda' requested but CUDA is not available on this machine")
    return device


class SegmentSearch:
    """Top-k in one segment (``SegmentFiles``), with its deleted rows never returned."""

    def __init__(self, seg, metric_ip: bool) -> None:
        self.seg, self.metric_ip = seg, metric_ip
        self.live = seg.rows - len(seg.deleted)
        self._scan = None
        self._deleted = None  # (FAISS selector of the deleted ids, the ids it points into): built once

    def _selector(self, exclude: np.ndarray):
        """``IDSelectorNot`` of the deleted ids (built once per snapshot: a segment's deletions do not
        change while it is open) or-ed with this search's excluded ids; ``None`` when there are neither.
        Returned with the objects it points into, which must outlive the search."""
        import faiss

        if self._deleted is None:
            dead = np.ascontiguousarray(np.unique(np.asarray(self.seg.ids[self.seg.deleted], np.int64)))
            self._deleted = (faiss.IDSelectorBatch(dead), dead) if len(dead) else (None, dead)
        keep = [self._deleted]
        parts = [] if self._deleted[0] is None else [self._deleted[0]]
        if len(exclude):
            ex = np.ascontiguousarray(exclude)
            parts.append(faiss.IDSelectorBatch(ex))
            keep.append((parts[-1], ex))
        if not parts:
            return None, keep
        sel = parts[0] if len(parts) == 1 else faiss.IDSelectorOr(*parts)
        keep.append(sel)
        return faiss.IDSelectorNot(sel), keep

    def search(self, q: np.ndarray, k: int, *, exclude=(), nprobe=None, ef_search=None):
        if self.seg.kind == "flat":
            if self._scan is None:
                self._scan = FlatScan(self.seg.array("vectors.npy"), self.seg.ids, metric_ip=self.metric_ip)
            return self._scan.search(q, k, exclude=exclude, deleted_rows=self.seg.deleted)
        return self._faiss_search(q, k, exclude, nprobe, ef_search)

    def _faiss_search(self, q, k, exclude, nprobe, ef_search):
        import faiss

        index = self.seg.faiss_index()
        exclude = np.unique(np.asarray(exclude, np.int64))
        sel, keep = self._selector(exclude)  # noqa: F841 (keep: what the selector points into, alive till the end)
        want = min(k, max(0, self.live - len(exclude)))
        inner = inner_index(index)
        hnsw, ivf = hasattr(inner, "hnsw"), hasattr(inner, "nprobe")
        ef, probe = ef_search or (max(16, 2 * k) if hnsw else None), nprobe
        nlist = getattr(inner, "nlist", None)
        for _ in range(12):  # the breadth grows until every query has what the segment can give
            p = faiss.SearchParametersHNSW() if hnsw else faiss.SearchParametersIVF() if ivf else faiss.SearchParameters()
            if hnsw:
                p.efSearch = int(ef)
            if ivf and probe:
                p.nprobe = int(probe)
            if sel is not None:
                p.sel = sel
            D, I = index.search(q, k, params=p)
            if (I >= 0).sum(1).min() >= want or not (hnsw or (ivf and nlist and (probe or 1) < nlist)):
                break
            ef = ef * 2 if hnsw else ef
            probe = min(nlist, (probe or 1) * 2) if ivf else probe
            if hnsw and ef > max(4096, 4 * self.seg.rows):
                break
        return D, I


class SegmentedVectors:
    """Search and read back the vectors of one snapshot (its ``SegmentFiles``)."""

    def __init__(self, segments: Sequence, *, dim: int, metric: str = "ip", kind: str = "flat",
                 search_device: str | None = "auto", nprobe: int | None = None, ef_search: int | None = None,
                 nlist: int | None = None, name: str = "") -> None:
        self.segments = list(segments)
        self.by_id = {s.sid: s for s in self.segments}
        self.dim, self.metric_ip, self.kind, self.name = int(dim), metric == "ip", kind, name
        self.search_device = resolve_search_device(search_device, "flat" if kind == "flat" else kind)
        self.nprobe = int(nprobe) if nprobe else (min(int(nlist), 32) if nlist else None)
        self.ef_search = int(ef_search) if ef_search else None
        self._searchers = [SegmentSearch(s, self.metric_ip) for s in self.segments]
        self._gpu = None

    @property
    def ntotal(self) -> int:
        return sum(s.rows for s in self.segments)

    @property
    def live(self) -> int:
        return sum(s.live for s in self._searchers)

    def search(self, queries: np.ndarray, k: int = 10, *, nprobe: int | None = None, ef_search: int | None = None,
               exclude: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``queries`` (n, d) or (d,) float32 -> (scores (n, k), ids (n, k)); missing slots have id -1."""
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise BadVectorsError(f"expected query vectors of dim {self.dim}, got shape {tuple(q.shape)}")
        k = max(1, min(int(k), max(1, self.live)))
        excl = [] if exclude is None else [int(i) for i in np.asarray(exclude, np.int64).ravel()]
        if not self.live:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        if self.search_device == "cuda":
            return self.gpu_searcher().search(q, k, exclude=excl)
        parts = [s.search(q, k, exclude=excl, nprobe=nprobe or self.nprobe, ef_search=ef_search or self.ef_search)
                 for s in self._searchers if s.live]
        return merge_topk(parts, k, self.metric_ip)

    def gpu_searcher(self):
        """The GPU searcher of this snapshot: its live Flat rows as one matrix (copied once, on first use)."""
        if self._gpu is None:
            from mmretrieve.index.gpu import make_gpu_searcher

            t = time.perf_counter()
            if self.kind != "flat":
                raise UsageError("GPU search of FAISS segments needs faiss-gpu, which is not used for segments yet")
            keep = [np.setdiff1d(np.arange(s.rows), s.deleted) for s in self.segments]
            xb = np.concatenate([np.asarray(s.array("vectors.npy")[r], np.float32) for s, r in zip(self.segments, keep)])
            ids = np.concatenate([s.ids[r] for s, r in zip(self.segments, keep)])
            self._gpu = make_gpu_searcher((xb, ids, self.metric_ip), "cuda")
            log.info("%s: %d vectors on the GPU in %.2f s", self.name, len(ids), time.perf_counter() - t)
        return self._gpu


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int, metric_ip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-segment FAISS-style results -> the best ``k`` per query (ties by id, as one Flat index over
    vectors added in id order would give)."""
    if len(parts) == 1:
        return parts[0]
    D = np.concatenate([p[0] for p in parts], axis=1)
    I = np.concatenate([p[1] for p in parts], axis=1)
    score = np.where(I >= 0, D if metric_ip else -D, -np.inf)
    order = np.lexsort((np.where(I >= 0, I, np.iinfo(np.int64).max), -score), axis=1)[:, :k]
    return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)


__all__ = ["SegmentedVectors", "SegmentSearch", "merge_topk", "resolve_search_device", "SEARCH_DEVICES"]
