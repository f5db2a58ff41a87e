"""Filtered search: the live items of one snapshot that meet a filter (``Selection``), and how the coarse
search keeps to them at any selectivity.

A filter (``store.filters``) is evaluated by one SQL query over the items table (values bound, never
written into the statement) to the matching *live* ids of the snapshot, with their segments and rows;
``Index.select`` caches the last few per snapshot. The coarse search then pre-filters:

- **few matches** (fewer than ``max(EXACT_PER_K * k, EXACT_SHARE * live rows)``, and with HNSW graphs
  fewer than ``sqrt(EXACT_ROWS_PER_VISIT * efSearch * live)``: a graph search raised to ``efSearch / s``
  costs more than a scan of the ``s * live`` matching rows below that): an exact search over the matching
  rows' stored vectors alone (a brute force over at most 1% of the index, or 50 rows per result asked for,
  or the rows a graph search would cost), whatever the index's factory: exact for Flat and HNSW-Flat, the
  stored codes for PQ / SQ;
- **otherwise**: Flat segments mask every row that does not match in their scan (as deleted rows are
  masked); IVF segments, where at most ``VIEW_MAX_SHARE`` of their live rows match and the copy fits in
  ``VIEW_MAX_BYTES``, are searched through an IVF *view* of the selection: the matching entries of every
  list, copied once per selection into one in-memory IVF on the same quantizer (``LogicalIVF.subset``),
  with ``nprobe / s ** VIEW_PROBE_EXPONENT`` lists probed for a share ``s`` of matching rows (the last
  ``VIEW_CACHE`` views are kept, per process). Other FAISS segments (HNSW, IVF above the share) search with an
  ``IDSelectorBitmap`` of the matching ids (live ones only, so it is the deletion filter too), and-ed with
  a search's exclusions, their breadth raised by the selectivity (``efSearch / s``, ``nprobe / sqrt(s)``).
  Either way the breadth is doubled while a search returns fewer results than it has matching rows to
  give.

So a filtered search returns ``k`` hits whenever at least ``k`` live items match (and are not excluded).
"""

from __future__ import annotations

import itertools
import threading
import weakref

import numpy as np

from mmretrieve.lru import LRU

#: exact search over the matching rows below this many rows per requested result ...
EXACT_PER_K = 50
#: ... or below this share of the snapshot's live rows, whichever is larger
EXACT_SHARE = 0.01
#: ... or, where the snapshot has HNSW graphs, below ``sqrt(EXACT_ROWS_PER_VISIT * efSearch * live rows)``
#: (a graph search raised to ``efSearch / s`` visits about that many nodes, each costing a few rows' scan)
EXACT_ROWS_PER_VISIT = 8
#: selections kept per snapshot (``Index.select``; least recently used dropped)
CACHE_SIZE = 16
#: IVF segments keep to a selection through a copy of its entries (``ivf_view``) when it holds at most this
#: share of their live rows and the copy (codes and ids) takes at most ``VIEW_MAX_BYTES``
VIEW_MAX_SHARE = 0.5
VIEW_MAX_BYTES = 256 << 20
#: an IVF view is probed at ``nprobe / s ** VIEW_PROBE_EXPONENT`` lists for a share ``s`` of matching rows:
#: ``nprobe / s`` would scan as many entries as the unfiltered search, but from 1/s times as many shorter
#: lists, which cost more read cold (measured 1.57x the unfiltered search at 10% of 1M); 0.75 scans s**0.25
#: of that and kept recall@10 >= 0.997 where the unfiltered search had 1.000 (docs/benchmarks.md)
VIEW_PROBE_EXPONENT = 0.75
#: IVF views kept (per process, least recently used dropped): at most ``VIEW_CACHE * VIEW_MAX_BYTES`` held
VIEW_CACHE = 4
_VIEWS = LRU(VIEW_CACHE)
_tokens = itertools.count()


class Selection:
    """The live ids of a snapshot that meet a filter: sorted ids, rows per segment, a bitmap over ids."""

    def __init__(self, where: str, matches: list[tuple[int, str, int]], segments) -> None:
        self.where = where
        self.count = len(matches)
        top = max((int(np.max(s.ids)) + 1 for s in segments if s.rows), default=0)
        ids = np.fromiter((m[0] for m in matches), np.int64, len(matches))
        self.ids = np.unique(ids)
        self.bits = np.zeros(max(top, int(self.ids[-1]) + 1 if len(self.ids) else 0), bool)
        self.bits[self.ids] = True
        by_seg: dict[str, list[int]] = {}
        for _, sid, row in matches:
            by_seg.setdefault(sid, []).append(row)
        self.rows = {sid: np.sort(np.asarray(r, np.int64)) for sid, r in by_seg.items()}
        self._masked: dict = {}
        self._scans: dict = {}
        self._token = next(_tokens)  # this selection's key in ``_VIEWS`` (ids of dropped objects are reused)
        self._lock = threading.Lock()
        self._packed = None

    def __len__(self) -> int:
        return self.count

    def count_in(self, segments) -> int:
        return sum(len(self.rows.get(s.sid, ())) for s in segments)

    def allowed(self, ids: np.ndarray) -> np.ndarray:
        """Whether each id matches (ids outside the bitmap do not)."""
        ids = np.asarray(ids, np.int64)
        inside = (ids >= 0) & (ids < len(self.bits))
        out = np.zeros(len(ids), bool)
        out[inside] = self.bits[ids[inside]]
        return out

    def masked_rows(self, key, ids: np.ndarray) -> np.ndarray:
        """Sorted rows of an array of ids (a segment's, or several stacked) that do not match (cached by ``key``)."""
        with self._lock:
            m = self._masked.get(key)
            if m is None:
                m = self._masked[key] = np.flatnonzero(~self.allowed(ids)).astype(np.int64)
            return m

    def selector(self, exclude: np.ndarray):
        """(FAISS selector, what it points into): a matching id that is not in ``exclude``."""
        import faiss

        with self._lock:
            if self._packed is None:  # made once: FAISS only reads it, from any thread
                self._packed = np.packbits(self.bits.astype(np.uint8), bitorder="little")
                self._bitmap = faiss.IDSelectorBitmap(len(self._packed), faiss.swig_ptr(self._packed))  # n: bytes
        bitmap = self._bitmap
        if not len(exclude):
            return bitmap, (bitmap, self._packed)
        ex = np.ascontiguousarray(exclude, dtype=np.int64)
        batch = faiss.IDSelectorBatch(ex)
        not_ex = faiss.IDSelectorNot(batch)
        return faiss.IDSelectorAnd(bitmap, not_ex), (bitmap, self._packed, ex, batch, not_ex)

    def scan_of(self, sid: str, make):
        """The exact scan of this selection's rows of segment ``sid`` (their vectors gathered once)."""
        with self._lock:
            scan = self._scans.get(sid)
        if scan is None:
            scan = make()
            with self._lock:
                self._scans[sid] = scan
        return scan

    @property
    def has_ivf_view(self) -> bool:
        """Whether an IVF view of this selection has been built (a search used one)."""
        return _VIEWS.get(self._token) is not None

    def ivf_view(self, logical, rows: int, share: float):
        """The IVF of this selection's entries alone (``LogicalIVF.subset``: built on first use, then kept
        in ``_VIEWS``), or None where the rule in the module's docstring says no: ``rows`` matching rows, a
        ``share`` of the IVF's live ones."""
        if share > VIEW_MAX_SHARE or rows * (logical.code_size + 8) > VIEW_MAX_BYTES:
            return None
        with self._lock:
            held = _VIEWS.get(self._token)
            if held is None or held[0]() is not logical:  # a weak reference: a cached view keeps no snapshot open
                held = _VIEWS.put(self._token, (weakref.ref(logical), logical.subset(self.allowed)))
            return held[1]

    def exact(self, live: int, k: int, graph_ef: int = 0) -> bool:
        """Whether the search goes exact over the matching rows (the rule in the module's docstring);
        ``graph_ef``: the efSearch of the snapshot's HNSW graphs (0: none)."""
        graph = np.sqrt(EXACT_ROWS_PER_VISIT * graph_ef * live) if graph_ef else 0.0
        return self.count < max(EXACT_PER_K * k, EXACT_SHARE * live, graph)


def exact_search(segments_by_id: dict, sel: Selection, q: np.ndarray, k: int, exclude, metric_ip: bool):
    """Top-k of ``q`` over the stored vectors of the matching rows alone (FAISS-style output)."""
    from mmretrieve.index.flatscan import FlatScan
    from mmretrieve.index.vectors import merge_topk

    exclude = np.asarray(exclude, np.int64)
    parts = []
    for sid, rows in sel.rows.items():
        scan = sel.scan_of(sid, lambda sid=sid, rows=rows: FlatScan(
            np.ascontiguousarray(segments_by_id[sid].vectors(rows), dtype=np.float32),
            np.asarray(segments_by_id[sid].ids[rows], np.int64), metric_ip=metric_ip))
        parts.append(scan.search(q, k, exclude=exclude))
    if not parts:
        return (np.full((len(q), k), -np.inf if metric_ip else np.inf, np.float32), np.full((len(q), k), -1, np.int64))
    return merge_topk(parts, k, metric_ip)


__all__ = ["Selection", "exact_search", "EXACT_PER_K", "EXACT_SHARE", "EXACT_ROWS_PER_VISIT", "VIEW_MAX_SHARE", "VIEW_MAX_BYTES", "VIEW_PROBE_EXPONENT"]
