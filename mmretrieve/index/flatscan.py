"""Exact top-k over a matrix of vectors (a Flat segment, memory-mapped): one BLAS product per block of
rows, ``torch.topk`` per block, and a running merge, all in torch. Kept where it measures ahead of
``faiss.knn`` (``mmretrieve bench scan``; figures and their history in docs/benchmarks.md, "Flat scan
vs faiss.knn"): few queries (fewer than ``FAISS_BATCH``), fp16 rows (converted a block at a time, where
``faiss.knn`` needs an fp32 copy of the segment), and masked rows (deletions, exclusions). Batches of
unmasked fp32 rows go to ``faiss.knn`` on the rows themselves.

Deleted rows are masked by row; excluded ids through the segment's ids (sorted once, on first use).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: score bytes per block (queries x rows x 4)
MAX_SCORE_BYTES = 256 << 20


def inner_index(index):
    """The index inside an IDMap / IDMap2 wrapper (the index itself otherwise)."""
    import faiss

    return faiss.downcast_index(index.index) if hasattr(index, "index") and hasattr(index, "id_map") else index


class IdRows:
    """External ids -> rows of an array of ids, for masking excluded ids in a scan."""

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = np.asarray(ids, dtype=np.int64)
        self._sorted = None

    def rows_of(self, ids: Sequence[int] | None) -> np.ndarray:
        """Rows of the ids that are stored (unknown ids are ignored)."""
        want = np.asarray([] if ids is None else ids, dtype=np.int64).ravel()
        if not len(want) or not len(self.ids):
            return np.zeros(0, np.int64)
        if self._sorted is None:
            order = np.argsort(self.ids, kind="stable")
            self._sorted = (self.ids[order], order)
        s_ids, s_rows = self._sorted
        pos = np.clip(np.searchsorted(s_ids, want), 0, len(s_ids) - 1)
        return s_rows[pos[s_ids[pos] == want]]


class FlatScan:
    """Exact inner-product / L2 top-k of queries against ``xb`` (n, d) rows named by ``ids``."""

    def __init__(self, xb: np.ndarray, ids: np.ndarray, *, metric_ip: bool = True) -> None:
        self.xb, self.n = xb, int(len(xb))
        self.d = int(xb.shape[1]) if xb.ndim == 2 else 0
        self.metric_ip = metric_ip
        self.id_rows = IdRows(ids)
        self.ids = self.id_rows.ids
        self._norms = None

    def _norms_of(self, s: int, e: int, block):
        import torch

        if self._norms is None:
            self._norms = torch.zeros(self.n, dtype=torch.float32)
            self._have = np.zeros(self.n, bool)
        if not self._have[s:e].all():
            self._norms[s:e] = (block * block).sum(1)
            self._have[s:e] = True
        return self._norms[s:e]

    def _block(self, s: int, e: int):
        import torch

        X = self.xb[s:e]
        if X.dtype != np.float32:
            return torch.from_numpy(np.ascontiguousarray(X)).float()
        if not X.flags.writeable:  # torch wants writable memory; a read-only view is copied
            X = np.array(X)
        return torch.from_numpy(X)

    def _faiss_knn(self, q: np.ndarray, k: int, D: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A batch over rows with nothing masked: ``faiss.knn`` on the rows themselves (no copy)."""
        import faiss

        kk = min(k, self.n)
        d, rows = faiss.knn(q, self.xb, kk, metric=faiss.METRIC_INNER_PRODUCT if self.metric_ip else faiss.METRIC_L2)
        ids = self.ids[np.maximum(rows, 0)]
        ids[rows < 0] = -1
        D[:, :kk] = d
        I[:, :kk] = ids
        return D, I

    def search(self, q: np.ndarray, k: int, *, exclude: Sequence[int] | None = None,
               deleted_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """FAISS-style (scores (nq, k), ids (nq, k)), ``-1`` ids in empty slots; ``deleted_rows`` (sorted)
        and the rows of ``exclude`` ids never come back."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        nq = len(q)
        masked = self.id_rows.rows_of(exclude)
        if deleted_rows is not None and len(deleted_rows):  # sorted already: a union (a sort) only with exclusions
            masked = np.union1d(masked, deleted_rows) if len(masked) else np.asarray(deleted_rows, np.int64)
        if self.n and nq >= FAISS_BATCH and not len(masked) and self.xb.dtype == np.float32 and self.xb.flags.c_contiguous:
            D, I = self._empty(nq, k)
            return self._faiss_knn(q, k, D, I)
        return self._torch_search(q, k, masked)

    def _empty(self, nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        return (np.full((nq, k), -np.inf if self.metric_ip else np.inf, dtype=np.float32),
                np.full((nq, k), -1, dtype=np.int64))

    def _torch_search(self, q: np.ndarray, k: int, masked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The scan itself: one BLAS product per block of rows, ``torch.topk`` per block, a running merge."""
        import torch

        nq = len(q)
        D, I = self._empty(nq, k)
        if not self.n or not nq:
            return D, I
        qt = torch.from_numpy(q)
        qn = (qt * qt).sum(1, keepdim=True) if not self.metric_ip else None
        block = max(1, MAX_SCORE_BYTES // (4 * nq))
        best_v = best_i = None
        with torch.inference_mode():
            for s in range(0, self.n, block):
                e = min(self.n, s + block)
                X = self._block(s, e)
                S = _scores(qt, X)  # (nq, rows): one BLAS product per block (torch for both: no second thread pool)
                if not self.metric_ip:  # smallest ||q - x||^2 <=> largest 2 q.x - ||x||^2 - ||q||^2
                    S = 2 * S - self._norms_of(s, e, X)[None] - qn
                lo, hi = np.searchsorted(masked, [s, e])
                if hi > lo:
                    S[:, torch.from_numpy(masked[lo:hi] - s)] = -torch.inf
                v, i = torch.topk(S, min(k, e - s), dim=1)
                i += s
                if best_v is None:
                    best_v, best_i = v, i
                else:
                    v2, i2 = torch.cat([best_v, v], 1), torch.cat([best_i, i], 1)
                    best_v, j = torch.topk(v2, min(k, v2.shape[1]), dim=1)
                    best_i = torch.gather(i2, 1, j)
        V, P = best_v.numpy(), best_i.numpy()
        ids = self.ids[P]
        ids[~np.isfinite(V)] = -1
        kk = V.shape[1]
        D[:, :kk] = V if self.metric_ip else -V
        I[:, :kk] = ids
        return D, I


#: from this many queries on, a segment of fp32 rows without masked rows is searched by ``faiss.knn``
#: over its (memory-mapped) rows. ``mmretrieve bench scan`` on 2 AMD EPYC cores (d 512, k 100, fp32,
#: 2 threads; time of faiss.knn / time of the scan): at 8 queries 1.86 (100k rows) and 1.92 (1M), at 16
#: queries 0.76 and 0.66, at 256 queries 0.86 and 0.59; at 1 thread 8 queries 1.14 / 1.07, 16 queries
#: 0.72 / 0.49. FAISS's ``distance_compute_blas_threshold`` at 1 instead of 20 changed none of these
#: beyond noise (so it is left at FAISS's default).
FAISS_BATCH = 16

#: below this many queries the product is taken as rows x queries (see ``_scores``)
FEW_QUERIES = 64


def _scores(q, X):
    """``q @ X.T`` as (nq, rows). For few queries it is computed as ``X @ q.T`` with at least two query
    columns, then viewed transposed: MKL (torch's BLAS on x86) runs a matrix-vector product, and the
    (queries x d) @ (d x rows) orientation, far below memory speed on some CPUs. Measured over 1M x 512
    on 2 AMD EPYC cores (2 threads): one query 200 ms as ``q @ X.T``, 59-69 ms as ``X @ [q, 0].T``;
    four queries 349 vs 93 ms. Identical results (each score is the same dot product)."""
    import torch

    nq = q.shape[0]
    if nq >= FEW_QUERIES:
        return q @ X.T
    Q = q if nq >= 2 else torch.cat([q, torch.zeros_like(q)])
    return (X @ Q.T)[:, :nq].T


class BlasFlatScanner(FlatScan):
    """A ``FlatScan`` over the vectors of a FAISS Flat index (IDMap2-wrapped or not), without copying them."""

    def __init__(self, findex) -> None:
        import faiss

        inner = inner_index(findex)
        if not isinstance(inner, faiss.IndexFlat):
            raise TypeError(f"the BLAS scan needs a Flat index, got {type(inner).__name__}")
        n, d = int(inner.ntotal), int(inner.d)
        xb = faiss.rev_swig_ptr(inner.get_xb(), n * d).reshape(n, d) if n else np.zeros((0, d), np.float32)
        ids = faiss.vector_to_array(findex.id_map).astype(np.int64) if hasattr(findex, "id_map") else np.arange(n)
        super().__init__(xb, ids, metric_ip=inner.metric_type == faiss.METRIC_INNER_PRODUCT)
        self._inner = inner  # keeps the storage alive


__all__ = ["FlatScan", "BlasFlatScanner", "IdRows", "inner_index", "MAX_SCORE_BYTES"]
