"""Searching an index on a GPU.

Two back ends, picked in this order:

* **faiss-gpu** (the ``gpu`` extra): the loaded CPU index is cloned to the GPU with
  ``faiss.index_cpu_to_gpu`` (Flat, IVF-Flat, IVF-PQ, IVF-SQ; FAISS refuses HNSW, which then stays on
  the CPU).
* **torch exact scan** for Flat indexes when FAISS has no GPU support: the stored vectors live on the
  GPU as one (N, d) tensor, a query batch is one matrix product and one ``topk``. This is the same
  computation as FAISS's GPU flat index, and lets a machine with CUDA but without a faiss-gpu build for
  its CUDA version search on the GPU at all.

Both return FAISS's ``(scores, ids)`` with ``-1`` ids in empty slots. Ids to leave out (tombstones of
an HNSW index, a composed query's reference image) are masked before ``topk`` in the torch path and
filtered from a deeper result list in the faiss-gpu path (GPU indexes ignore ``SearchParameters``
selectors).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from mmretrieve.errors import DeviceError, UsageError
from mmretrieve.index.flatscan import IdRows, inner_index

log = logging.getLogger(__name__)

def faiss_has_gpu() -> bool:
    import faiss

    try:
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:  # a faiss-gpu build on a machine whose driver it cannot use
        return False


def is_flat(findex) -> bool:
    """``findex``: a FAISS index, or ``"flat"`` for an index of raw-vector (Flat) segments."""
    import faiss

    return findex == "flat" if isinstance(findex, str) else isinstance(inner_index(findex), faiss.IndexFlat)


def gpu_search_possible(findex) -> str | None:
    """The GPU back end that can search ``findex`` on this machine (``"faiss"``, ``"torch"``) or None."""
    if not torch.cuda.is_available():
        return None
    if faiss_has_gpu():
        return "faiss"
    if is_flat(findex):
        return "torch"
    return None


class TorchFlatSearcher:
    """Exact inner-product / L2 search of a Flat index's vectors with torch (any device).

    ``precision="fp16"`` halves the memory scanned per query (the single-query bound) at the cost of
    scores rounded to fp16; the default fp32 gives FAISS's results up to float summation order.
    """

    backend = "torch"

    def __init__(self, source, device: torch.device | str = "cuda", *, precision: str = "fp32",
                 max_scores_bytes: int = 1 << 30) -> None:
        """``source``: a FAISS Flat index (IDMap2-wrapped or not) or ``(vectors (n, d), ids (n,), metric_ip)``."""
        import faiss

        if isinstance(source, tuple):
            xb, ids, self.metric_ip = source
        else:
            inner = inner_index(source)
            if not isinstance(inner, faiss.IndexFlat):
                raise TypeError(f"the torch searcher needs a Flat index, got {type(inner).__name__}")
            self.metric_ip = inner.metric_type == faiss.METRIC_INNER_PRODUCT
            xb = inner.reconstruct_n(0, inner.ntotal) if inner.ntotal else np.zeros((0, inner.d), np.float32)
            ids = faiss.vector_to_array(source.id_map) if hasattr(source, "id_map") else np.arange(inner.ntotal)
        self.device = torch.device(device)
        n, d = int(len(xb)), int(xb.shape[1])
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self.xb = torch.from_numpy(np.ascontiguousarray(xb, dtype=np.float32)).to(self.device, dtype)
        if not self.metric_ip:
            self.norms = (self.xb.float() ** 2).sum(1)
        self.id_rows = IdRows(np.asarray(ids, dtype=np.int64))
        self.ids = self.id_rows.ids
        self.ids_t = torch.from_numpy(self.ids).to(self.device)
        self.max_scores_bytes = int(max_scores_bytes)
        self.ntotal, self.d = n, d

    @torch.inference_mode()
    def search(self, q: np.ndarray, k: int, *, exclude: Sequence[int] | None = None, **_) -> tuple[np.ndarray, np.ndarray]:
        """(nq, d) float32 -> FAISS-style (scores, ids); ``nprobe`` and the like do not apply to a flat scan."""
        nq = len(q)
        D = np.full((nq, k), -np.inf if self.metric_ip else np.inf, dtype=np.float32)
        I = np.full((nq, k), -1, dtype=np.int64)
        if not self.ntotal:
            return D, I
        rows = self.id_rows.rows_of(exclude)
        rows_t = torch.from_numpy(rows).to(self.device) if len(rows) else None
        kk = min(k, self.ntotal)
        chunk = max(1, self.max_scores_bytes // (4 * self.ntotal))
        qt_all = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)).to(self.device)
        for s in range(0, nq, chunk):
            qt = qt_all[s : s + chunk]
            S = (qt.to(self.xb.dtype) @ self.xb.T).float()
            if not self.metric_ip:  # smallest ||q - x||^2 = ||q||^2 - 2 q.x + ||x||^2 -> largest of the negation
                S = 2 * S - self.norms[None] - (qt * qt).sum(1, keepdim=True)
            if rows_t is not None:
                S[:, rows_t] = -torch.inf
            vals, pos = torch.topk(S, kk, dim=1)
            vals_np, ids_np = vals.cpu().numpy(), self.ids_t[pos].cpu().numpy()
            bad = ~np.isfinite(vals_np)
            ids_np[bad] = -1
            D[s : s + len(qt), :kk] = vals_np if self.metric_ip else -vals_np
            I[s : s + len(qt), :kk] = ids_np
        return D, I


class FaissGpuSearcher:
    """A faiss-gpu clone of the loaded index; exclusions filtered from a deeper result list."""

    backend = "faiss"

    def __init__(self, findex, device: torch.device | str = "cuda") -> None:
        import faiss

        dev = torch.device(device)
        self.res = faiss.StandardGpuResources()
        self.index = faiss.index_cpu_to_gpu(self.res, dev.index or 0, findex)
        self.ntotal = findex.ntotal
        self.device = dev

    def search(self, q: np.ndarray, k: int, *, exclude: Sequence[int] | None = None,
               nprobe: int | None = None, **_) -> tuple[np.ndarray, np.ndarray]:
        if nprobe:
            import faiss

            faiss.GpuParameterSpace().set_index_parameter(self.index, "nprobe", int(nprobe))
        excl = set(int(i) for i in exclude) if exclude is not None else set()
        if not excl:
            return self.index.search(q, k)
        D, I = self.index.search(q, min(self.ntotal, k + len(excl)))
        Do = np.full((len(q), k), -np.inf, np.float32)
        Io = np.full((len(q), k), -1, np.int64)
        for r in range(len(q)):
            keep = [j for j in range(I.shape[1]) if I[r, j] != -1 and int(I[r, j]) not in excl][:k]
            Do[r, : len(keep)], Io[r, : len(keep)] = D[r, keep], I[r, keep]
        return Do, Io


def make_gpu_searcher(findex, device: str | torch.device = "cuda", *, precision: str = "fp32"):
    """The best GPU searcher for ``findex`` (a FAISS index, or ``(vectors, ids, metric_ip)`` of Flat
    segments); raises with the reason when none can be made."""
    if isinstance(findex, tuple):
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise DeviceError("search on cuda requested but CUDA is not available on this machine")
        return TorchFlatSearcher(findex, dev, precision=precision)
    dev = torch.device(device)
    if dev.type != "cuda":  # the torch scan also runs on CPU (tests compare it with FAISS there)
        return TorchFlatSearcher(findex, dev, precision=precision)
    if not torch.cuda.is_available():
        raise DeviceError("search on cuda requested but CUDA is not available on this machine")
    if faiss_has_gpu():
        try:
            return FaissGpuSearcher(findex, dev)
        except Exception as e:  # e.g. HNSW, which FAISS cannot clone to a GPU
            if not is_flat(findex):
                raise UsageError(f"faiss-gpu cannot search this {type(inner_index(findex)).__name__} index on the GPU: {e}") from e
            log.warning("faiss-gpu clone failed (%s); using the torch exact scan", e)
    if is_flat(findex):
        return TorchFlatSearcher(findex, dev, precision=precision)
    raise UsageError(
        f"GPU search of a {type(inner_index(findex)).__name__} index needs faiss-gpu "
        "(pip install 'mmretrieve[gpu]'); without it only Flat indexes are searched on the GPU"
    )
