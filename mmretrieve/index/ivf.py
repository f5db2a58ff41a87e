"""IVF segments searched as one logical IVF, and the deletion filter of a snapshot.

Every IVF segment of an index is a clone of the same trained template: the same coarse quantizer, the
same list numbers. A query is therefore quantised once and the same ``nprobe`` lists are scanned in every
segment, rather than ``nprobe`` lists per segment each with its own quantisation. Two ways, picked by the
code size (measured at 1M x 512 in 10 segments, see docs/benchmarks.md):

- compact codes (PQ, SQ on small dims; ``code_size <= HSTACK_MAX_CODE``): the segments' inverted lists are
  stacked (``faiss.HStackInvertedLists``) under one IVF, so FAISS scans each probed list once, with one
  distance table per (query, list), exactly as one index would;
- wide codes (IVF-Flat): stacking copies every probed list per query, so each large segment is searched
  with ``search_preassigned`` on the one quantisation and the per-segment top-k merged; the small
  segments of small writes (under ``STACK_BELOW_ROWS``) are stacked together into one more part.

Deleted rows are filtered by one ``IDSelectorBitmap`` over the snapshot's live ids (built once per
snapshot: a bit test per scanned code), and-ed with a search's own exclusions.
"""

from __future__ import annotations

import numpy as np

HSTACK_MAX_CODE = 256
#: with wide codes, segments under this many rows are stacked together (copying their probed lists costs
#: less than a search call each: the segments of small writes)
STACK_BELOW_ROWS = 20_000
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
            self.live_sel = faiss.IDSelectorBitmap(len(self.bitmap), faiss.swig_ptr(self.bitmap))  # n: bytes
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
        for seg, ivf in zip(self.segments, self.ivfs):  # clones of one template, or the lists mean different things
            if (int(ivf.nlist), int(ivf.code_size), int(ivf.d)) != (self.nlist, self.code_size, int(first.d)):
                from mmretrieve.errors import IndexCorruptedError

                raise IndexCorruptedError(f"{seg.dir / 'index.faiss'}: an IVF of {ivf.nlist} lists and {ivf.code_size}-byte "
                                          f"codes beside segments of {self.nlist} and {self.code_size}: not a clone of the "
                                          "index's template")
        self.ntotal = sum(int(i.ntotal) for i in self.ivfs)
        self.quantizer = first.quantizer
        self.metric_ip = first.metric_type == faiss.METRIC_INNER_PRODUCT
        self._keep: list = []
        self.stacked = None
        if len(self.ivfs) > 1 and self.code_size <= HSTACK_MAX_CODE:
            self.stacked = self._stack(self.segments, self.ivfs)
            self.parts = [self.stacked]
        else:  # wide codes: large segments searched each on the one quantisation, small ones stacked
            big = [j for j, s in enumerate(self.segments) if s.rows >= STACK_BELOW_ROWS]
            small = [j for j in range(len(self.segments)) if j not in big]
            self.parts = [self.ivfs[j] for j in big]
            if len(small) > 1:
                self.parts.append(self._stack([self.segments[j] for j in small], [self.ivfs[j] for j in small]))
            else:
                self.parts += [self.ivfs[j] for j in small]

    def _stack(self, segments, ivfs):
        """One IVF over the lists of ``ivfs`` (``HStackInvertedLists``), under a second reading of the
        first segment (memory-mapped: free) whose lists are replaced."""
        faiss = _faiss()
        ils = faiss.InvertedListsPtrVector()
        for i in ivfs:
            ils.push_back(i.invlists)
        hstack = faiss.HStackInvertedLists(ils.size(), ils.data())
        owner = segments[0].faiss_index(fresh=True)  # owns the C++ index the returned object points to
        out = faiss.extract_index_ivf(owner)
        out.replace_invlists(hstack, False)
        out.ntotal = sum(int(i.ntotal) for i in ivfs)
        self._keep += [ils, hstack, owner]
        return out

    def subset(self, allowed):
        """One in-memory IVF of the entries whose id ``allowed(ids)`` keeps (a filter's matching live ids:
        ``Selection.allowed``), gathered from every segment's lists: the same quantizer and list numbers, so
        its codes stay valid and a search of it scans the matching entries alone. The index holds what it
        points into (``referenced_objects``)."""
        faiss = _faiss()
        cs = self.code_size
        lists = faiss.ArrayInvertedLists(self.nlist, cs)
        total = 0
        for lno in range(self.nlist):
            ids_parts, code_parts = [], []
            for ivf in self.ivfs:
                inv = ivf.invlists
                n = int(inv.list_size(lno))
                if not n:
                    continue
                ids = faiss.rev_swig_ptr(inv.get_ids(lno), n)
                keep = allowed(ids)
                if keep.any():
                    codes = faiss.rev_swig_ptr(inv.get_codes(lno), n * cs).reshape(n, cs)
                    ids_parts.append(ids[keep])
                    code_parts.append(codes[keep])
            if ids_parts:
                ids = np.ascontiguousarray(np.concatenate(ids_parts), dtype=np.int64)
                codes = np.ascontiguousarray(np.concatenate(code_parts), dtype=np.uint8)
                lists.add_entries(lno, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(codes))
                total += len(ids)
        owner = self.segments[0].faiss_index(fresh=True)  # owns the C++ index the returned object points to
        out = faiss.extract_index_ivf(owner)
        out.replace_invlists(lists, False)
        out.ntotal = total
        out.referenced_objects = [lists, owner]  # a caller may hold the view alone (its cache entry evicted)
        return out

    def search(self, q: np.ndarray, k: int, params) -> tuple[np.ndarray, np.ndarray]:
        if len(self.parts) == 1:
            return self.parts[0].search(q, k, params=params)
        faiss = _faiss()
        nprobe = int(params.nprobe) if params.nprobe else int(self.ivfs[0].nprobe)
        params.nprobe = nprobe
        Dq, Iq = self.quantizer.search(q, nprobe)
        m = len(q)
        D = np.empty((len(self.parts), m, k), np.float32)
        I = np.empty((len(self.parts), m, k), np.int64)
        qp, iqp, dqp = faiss.swig_ptr(q), faiss.swig_ptr(Iq), faiss.swig_ptr(Dq)
        for j, ivf in enumerate(self.parts):
            ivf.search_preassigned_c(m, qp, k, iqp, dqp, faiss.swig_ptr(D[j]), faiss.swig_ptr(I[j]), False, params, None)
        from mmretrieve.index.vectors import merge_topk

        return merge_topk([(D[j], I[j]) for j in range(len(self.parts))], k, self.metric_ip)


__all__ = ["LogicalIVF", "DeletionFilter", "HSTACK_MAX_CODE"]
