"""FAISS operations of the store: index creation from factory strings, reading, search parameters,
and which indexes can delete correctly."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mmretrieve.errors import IndexCorruptedError, UsageError
from mmretrieve.store.layout import DEFAULT_FACTORY


def _faiss():
    import faiss

    return faiss


def _metric(metric: str):
    faiss = _faiss()
    if metric == "ip":
        return faiss.METRIC_INNER_PRODUCT
    if metric == "l2":
        return faiss.METRIC_L2
    raise UsageError(f"unknown metric {metric!r} (expected 'ip' or 'l2')")


def new_faiss_index(dim: int, factory: str = DEFAULT_FACTORY, metric: str = "ip"):
    """``IDMap2,<factory>``: stable external int64 ids around any FAISS factory string."""
    faiss = _faiss()
    factory = factory.strip()
    if factory.upper().startswith("IDMAP"):
        raise UsageError("give the factory without IDMap: mmretrieve always wraps it in IDMap2")
    try:
        index = faiss.index_factory(int(dim), f"IDMap2,{factory}", _metric(metric))
    except RuntimeError as e:
        raise UsageError(f"invalid FAISS factory string {factory!r}: {str(e).splitlines()[-1]}") from None
    return with_direct_map(index)


def with_direct_map(index):
    """IVF indexes keep a direct map (FAISS builds none by default), so stored vectors can be
    reconstructed by id (intersection fusion, stored-vector reuse). Returns ``index``."""
    faiss = _faiss()
    try:
        ivf = faiss.extract_index_ivf(inner_index(index))
    except RuntimeError:  # not an IVF index
        return index
    if ivf.direct_map.type == faiss.DirectMap.NoMap:
        ivf.make_direct_map()
    return index


def inner_index(index):
    faiss = _faiss()
    return faiss.downcast_index(index.index) if hasattr(index, "index") and hasattr(index, "id_map") else index


def search_params(index, *, exclude: Sequence[int] | None = None, nprobe: int | None = None, ef_search: int | None = None):
    """FAISS SearchParameters for ``index`` (an IDMap2): tombstone filter + IVF nprobe / HNSW efSearch."""
    faiss = _faiss()
    inner = inner_index(index)
    sel = None
    keep = []
    if exclude is not None and len(exclude):
        arr = np.ascontiguousarray(np.asarray(exclude, dtype=np.int64))
        batch = faiss.IDSelectorBatch(len(arr), faiss.swig_ptr(arr))
        sel = faiss.IDSelectorNot(batch)
        keep += [arr, batch]
    if isinstance(inner, faiss.IndexHNSW) or hasattr(inner, "hnsw"):
        p = faiss.SearchParametersHNSW()
        if ef_search:
            p.efSearch = int(ef_search)
    elif hasattr(inner, "nprobe"):
        p = faiss.SearchParametersIVF()
        if nprobe:
            p.nprobe = int(nprobe)
    elif sel is None:
        return None
    else:
        p = faiss.SearchParameters()
    if sel is not None:
        p.sel = sel
    p._keep = keep  # keep the selector's buffers alive as long as the params
    return p


def supports_remove(index) -> bool:
    """Whether deleting from the IDMap2 is correct: only for indexes that compact their codes on
    removal (Flat, PQ, SQ...: ``IndexFlatCodes``), which IDMap2's id bookkeeping assumes. IVF removes
    without renumbering (the id map would then point at the wrong vectors) and HNSW cannot remove, so
    both tombstone deleted ids instead (filtered at search time, never reused)."""
    faiss = _faiss()
    return isinstance(inner_index(index), faiss.IndexFlatCodes)


def read_faiss(path: Path, *, mmap: bool = False):
    faiss = _faiss()
    try:
        if mmap:
            return with_direct_map(faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY))
        return with_direct_map(faiss.read_index(str(path)))
    except RuntimeError as e:
        raise IndexCorruptedError(f"{path}: FAISS cannot read the index ({str(e).strip().splitlines()[-1]})") from None

