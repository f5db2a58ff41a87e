"""IVF segments searched as one logical IVF, and the deletion filter of a snapshot.

Every IVF segment of an index is a clone of the same trained template: the same coarse quantizer, the
same list numbers. A query is therefore quantised once and the same ``nprobe`` lists are scanned in every
segment, rather than ``nprobe`` lists per segment each with its own quantisation. Two ways, picked by the
code size (measured at 1M x 512 in 10 segments, see docs/benchmarks.md):

- compact codes (PQ, SQ on small dims; ``code_size <= HSTACK_MAX_CODE``): the segments' inverted lists are
  stacked (``faiss.HStackInvertedLists``) under one IVF, so FAISS scans each probed list once, with one
  distance table per (query, list), exactly as one index would;
- wide codes (IVF-Flat): stacking copies every probed list per query, so each segment is searched with
  ``search_preassigned`` on the one quantisation and the per-segment top-k merged.

Deleted rows are filtered by one ``IDSelectorBitmap`` over the snapshot's live ids (built once per
snapshot: a bit test per scanned code), and-ed with a search's own exclusions.
"""

from __future__ import annotations

import numpy as np

HSTACK_MAX_CODE = 256
#: ids are dense (0..next_id); a bitmap wider than this many bits per stored row falls back to a hash set
BITMAP_MAX_SPARSITY = 64


def _faiss():
    import faiss

    return faiss


class DeletionFilter:
    """The ids a snapshot must never return (deleted rows), as a FAISS selector built once."""

    def __init__(self, segments) -> None:
        faiss = _faiss()
        dead = [np.asarray(s.ids[s.deleted], np.int64) for s in segments if len(s.deleted)]
        self.dead = np.unique(np.concatenate(dead)) if dead else np.zeros(0, np.int64)
        self._keep: list = [self.dead]
        self.live_sel = None  # "is this id alive": None when nothing is deleted
        if not len(self.dead):
            return
        top = max((int(np.max(s.ids)) for s in segments if s.rows), default=-1) + 1
        rows = sum(s.rows for s in segments)
        if top <= BITMAP_MAX_SPARSITY * max(rows, 1):
            bits = np.ones(top, np.uint8)
            bits[self.dead] = 0
            self.bitmap = np.packbits(bits, bitorder="little")
            self.live_sel = faiss.IDSelectorBitmap(top, faiss.swig_ptr(self.bitmap))
            self._keep.append(self.bitmap)
        else:
            batch = faiss.IDSelectorBatch(self.dead)
            self.live_sel = faiss.IDSelectorNot(batch)
            self._keep.append(batch)

    def selector(self, exclude: np.ndarray):
        """(selector or None, what it points into): live and not in ``exclude``. The second value must
        outlive the search."""
        faiss = _faiss()
        if not len(exclude):
            return self.live_sel, None
        ex = np.ascontiguousarray(exclude, dtype=np.int64)
        batch = faiss.IDSelectorBatch(ex)
        not_ex = faiss.IDSelectorNot(batch)
        if self.live_sel is None:
            return not_ex, (ex, batch)
        sel = faiss.IDSelectorAnd(self.live_sel, not_ex)
        return sel, (ex, batch, not_ex)


class LogicalIVF:
    """IVF segments (``SegmentFiles`` cloned from one template) searched as one IVF."""

    def __init__(self, segments) -> None:
        faiss = _faiss()
        self.segments = list(segments)
        self.ivfs = [faiss.extract_index_ivf(s.faiss_index()) for s in self.segments]
        first = self.ivfs[0]
        self.nlist, self.code_size = int(first.nlist), int(first.code_size)
        self.ntotal = sum(int(i.ntotal) for i in self.ivfs)
        self.quantizer = first.quantizer
        self.stacked = None
        if len(self.ivfs) > 1 and self.code_size <= HSTACK_MAX_CODE:
            self._ils = faiss.InvertedListsPtrVector()
            for i in self.ivfs:
                self._ils.push_back(i.invlists)
            self._hstack = faiss.HStackInvertedLists(self._ils.size(), self._ils.data())
            # a second reading of the first segment (memory-mapped: free) whose lists are replaced
            self._owner = self.segments[0].faiss_index(fresh=True)  # owns the C++ index `stacked` points to
            self.stacked = faiss.extract_index_ivf(self._owner)
            self.stacked.replace_invlists(self._hstack, False)
            self.stacked.ntotal = self.ntotal

    def search(self, q: np.ndarray, k: int, params) -> tuple[np.ndarray, np.ndarray]:
        if len(self.ivfs) == 1:
            return self.ivfs[0].search(q, k, params=params)
        if self.stacked is not None:
            return self.stacked.search(q, k, params=params)
        faiss = _faiss()
        nprobe = int(params.nprobe) if params.nprobe else int(self.ivfs[0].nprobe)
        params.nprobe = nprobe
        Dq, Iq = self.quantizer.search(q, nprobe)
        m = len(q)
        D = np.empty((len(self.ivfs), m, k), np.float32)
        I = np.empty((len(self.ivfs), m, k), np.int64)
        for j, ivf in enumerate(self.ivfs):
            ivf.search_preassigned_c(m, faiss.swig_ptr(q), k, faiss.swig_ptr(Iq), faiss.swig_ptr(Dq),
                                     faiss.swig_ptr(D[j]), faiss.swig_ptr(I[j]), False, params, None)
        from mmretrieve.index.vectors import merge_topk

        return merge_topk([(D[j], I[j]) for j in range(len(self.ivfs))], k, self.ivfs[0].metric_type == faiss.METRIC_INNER_PRODUCT)


__all__ = ["LogicalIVF", "DeletionFilter", "HSTACK_MAX_CODE"]
