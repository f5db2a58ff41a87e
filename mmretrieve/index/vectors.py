"""The vectors of one index snapshot: exact or approximate top-k, and reading stored vectors back.

The search back end is picked per call: a BLAS scan for few queries on a Flat index (``flatscan``), the
GPU when the snapshot searches there (``gpu``), else FAISS itself with the tombstone filter and the
IVF / HNSW breadth as search parameters.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from mmretrieve import settings
from mmretrieve.errors import BadVectorsError, DeviceError, UsageError
from mmretrieve.index.flatscan import BlasFlatScanner
from mmretrieve.store import faiss_ops

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


class VectorIndex:
    """Search and read back the vectors of one snapshot (a FAISS ``IndexIDMap2``).

    ``tombstones``: ids deleted without being removed from FAISS (HNSW, IVF), never returned.
    ``nprobe`` / ``ef_search``: the IVF / HNSW search breadth when a call gives none (IVF default:
    min(nlist, 32) lists; FAISS's own default of 1 loses most neighbours)."""

    def __init__(self, findex, *, tombstones: Sequence[int] = (), search_device: str | None = "auto",
                 nprobe: int | None = None, ef_search: int | None = None, name: str = "") -> None:
        self.faiss = findex
        self.dim = int(findex.d)
        self.tombstones = [int(i) for i in tombstones]
        self.search_device = resolve_search_device(search_device, findex)
        nlist = getattr(faiss_ops.inner_index(findex), "nlist", None)
        self.nprobe = int(nprobe) if nprobe else (min(int(nlist), 32) if nlist else None)
        self.ef_search = int(ef_search) if ef_search else None
        self.name = name
        self._gpu = None
        self._blas = None

    @property
    def ntotal(self) -> int:
        return int(self.faiss.ntotal)

    def search(self, queries: np.ndarray, k: int = 10, *, nprobe: int | None = None, ef_search: int | None = None,
               exclude: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``queries`` (n, d) or (d,) float32 -> (scores (n, k), ids (n, k)); missing slots have id -1."""
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise BadVectorsError(f"expected query vectors of dim {self.dim}, got shape {tuple(q.shape)}")
        if not self.ntotal:  # nothing stored (an untrained IVF would even refuse to search)
            kk = max(1, int(k))
            return np.full((len(q), kk), -np.inf, np.float32), np.full((len(q), kk), -1, np.int64)
        k = max(1, min(int(k), self.ntotal))
        excl = self.tombstones + [int(i) for i in (exclude or [])]
        nprobe, ef_search = nprobe or self.nprobe, ef_search or self.ef_search
        if self.search_device == "cuda":
            return self.gpu_searcher().search(q, k, exclude=excl, nprobe=nprobe)
        if BlasFlatScanner.worth_it(self.faiss, len(q)):  # few queries on a Flat index: one BLAS pass
            if self._blas is None:
                self._blas = BlasFlatScanner(self.faiss)
            return self._blas.search(q, k, exclude=excl)
        params = faiss_ops.search_params(self.faiss, exclude=excl, nprobe=nprobe, ef_search=ef_search)
        if params is None:
            return self.faiss.search(q, k)
        return self.faiss.search(q, k, params=params)

    def gpu_searcher(self):
        """The GPU searcher of this snapshot (built on first use: the vectors are copied once)."""
        if self._gpu is None:
            from mmretrieve.index.gpu import make_gpu_searcher

            t = time.perf_counter()
            self._gpu = make_gpu_searcher(self.faiss, "cuda")
            log.info("%s: %d vectors on the GPU (%s back end) in %.2f s", self.name, self.ntotal, self._gpu.backend,
                     time.perf_counter() - t)
        return self._gpu

    def reconstruct(self, ids: Sequence[int]) -> np.ndarray:
        """Stored embeddings of ``ids`` (exact for Flat/HNSW; IVF-PQ returns its lossy reconstruction)."""
        out = np.zeros((len(ids), self.dim), np.float32)
        for j, i in enumerate(ids):
            out[j] = self.faiss.reconstruct(int(i))
        return out

    def exact(self) -> bool:
        """Whether ``reconstruct`` returns the stored embeddings exactly (Flat, HNSW-Flat)."""
        import faiss

        inner = faiss_ops.inner_index(self.faiss)
        return isinstance(inner, faiss.IndexFlat) or (
            hasattr(inner, "hnsw") and isinstance(faiss.downcast_index(inner.storage), faiss.IndexFlat))


__all__ = ["VectorIndex", "resolve_search_device", "SEARCH_DEVICES"]
