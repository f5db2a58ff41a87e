"""The vectors of one index snapshot: top-k over all its segments, and stored vectors read back.

Flat segments are searched each on its own and their top-k lists merged (by score, ties by id), which
gives the ids and, to float rounding, the scores of one Flat index over the same vectors; they are
scanned with BLAS over their memory-mapped rows (``flatscan``: resident memory grows with what a search
touches), deleted rows masked. FAISS segments are searched by ``FaissSearch``: the IVF ones as one
logical IVF (``ivf.LogicalIVF``: one coarse quantisation, the same lists in every segment), HNSW graphs
one by one except the small ones, scanned together as one exact matrix; deleted and excluded ids are
filtered by one selector per snapshot (``ivf.DeletionFilter``), and the breadth (IVF ``nprobe``, HNSW
``efSearch``) is raised and the search repeated only while a search returns fewer results than it has
live rows to give, so a search returns ``k`` results whenever the snapshot holds ``k`` live items,
whatever the share of deletions. On a GPU, Flat segments are searched as one matrix (``gpu``).
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
    """Top-k in one Flat segment (``SegmentFiles``), its deleted rows masked in the scan."""

    def __init__(self, seg, metric_ip: bool) -> None:
        self.seg, self.metric_ip = seg, metric_ip
        self.live = seg.rows - len(seg.deleted)
        self._scan = None

    def search(self, q: np.ndarray, k: int, *, exclude=(), allow=None):
        if self._scan is None:
            self._scan = FlatScan(self.seg.array("vectors.npy"), self.seg.ids, metric_ip=self.metric_ip)
        # a filter's non-matching rows include the deleted ones (a selection holds live ids only)
        masked = self.seg.deleted if allow is None else allow.masked_rows(self.seg.sid, self._scan.ids)
        return self._scan.search(q, k, exclude=exclude, deleted_rows=masked)


class FaissSearch:
    """Top-k in FAISS segments: the IVF ones as one logical IVF (``ivf.LogicalIVF``), others (HNSW, PQ)
    each on its own; deleted and excluded ids filtered by one selector (``ivf.DeletionFilter``).

    The breadth (IVF ``nprobe``, HNSW ``efSearch``) is raised and the search repeated only while a search
    returns fewer results than the rows it can give, so a search returns ``k`` results whenever the
    snapshot holds ``k`` live items, whatever the share of deletions."""

    def __init__(self, segments, metric_ip: bool) -> None:
        self.segments, self.metric_ip = list(segments), metric_ip
        self.live = sum(s.rows - len(s.deleted) for s in self.segments)
        self._filter = None
        self._ivf = None
        self._prepared = False

    def prepare(self) -> FaissSearch:
        """Sort the segments by how they are searched (on first use: it reads each segment's FAISS file,
        which opening an index does not need)."""
        if self._prepared:
            return self
        from mmretrieve.store.segments import is_ivf

        self.ivf_segments = [s for s in self.segments if is_ivf(s.faiss_index())]
        self.ivf_live = sum(s.rows - len(s.deleted) for s in self.ivf_segments)
        rest = [s for s in self.segments if s not in self.ivf_segments]
        # small graphs (the segments of small writes) cost a FAISS call each: their exact vectors are
        # scanned as one flat matrix instead
        small = [(s, v) for s in rest if s.rows <= SMALL_SEGMENT_ROWS and (v := _storage(s)) is not None]
        if len(small) < 2 or sum(s.rows for s, _ in small) > SMALL_SEGMENT_ROWS * 8:
            small = []
        self.others = [s for s in rest if all(s is not t for t, _ in small)]
        self.has_graph = any(hasattr(inner_index(s.faiss_index()), "hnsw") for s in self.others)
        self._small = None
        if small:
            ids = np.concatenate([np.asarray(s.ids, np.int64) for s, _ in small])
            offsets = np.cumsum([0] + [s.rows for s, _ in small])
            dead = np.concatenate([np.asarray(s.deleted, np.int64) + o for (s, _), o in zip(small, offsets)])
            scan = FlatScan(np.concatenate([v for _, v in small]), ids, metric_ip=self.metric_ip)
            self._small = (scan, np.sort(dead), int(len(ids) - len(dead)))
        self._prepared = True
        return self

    def filter(self):
        if self._filter is None:
            from mmretrieve.index.ivf import DeletionFilter

            self._filter = DeletionFilter(self.segments)
        return self._filter

    def logical_ivf(self):
        if self._ivf is None:
            from mmretrieve.index.ivf import LogicalIVF

            self._ivf = LogicalIVF(self.prepare().ivf_segments)
        return self._ivf

    def search(self, q: np.ndarray, k: int, *, exclude=(), nprobe=None, ef_search=None, allow=None):
        """``allow``: a ``filtered.Selection`` (matching live ids) to keep to, instead of the live rows."""
        self.prepare()
        exclude = np.unique(np.asarray(exclude, np.int64))
        sel, keep = (self.filter() if allow is None else allow).selector(exclude)  # noqa: F841 (keep: alive till the end)
        parts = []

        def rows(segs, live):  # rows a search can give (matching, if filtered) and their share of the live ones
            n = live if allow is None else allow.count_in(segs)
            return max(0, n - len(exclude)), (n / live if live else 1.0)

        if self.ivf_segments:
            ivf = self.logical_ivf()
            n, share = rows(self.ivf_segments, self.ivf_live)
            base = nprobe or int(ivf.ivfs[0].nprobe)  # the template's nprobe, where a search names none
            view = None if allow is None or not n else allow.ivf_view(ivf, n + len(exclude), share)
            if view is not None:  # the selection's entries alone: only the exclusions to filter
                from mmretrieve.index.ivf import DeletionFilter

                vsel, vkeep = DeletionFilter([]).selector(exclude)  # noqa: F841 (vkeep: alive till the end)
                parts.append(_breadth_search(lambda q_, k_, p: view.search(q_, k_, params=p), q, k, min(k, n), vsel,
                                             ivf=ivf.nlist, nprobe=base, share=share, view=True))
            elif n:
                parts.append(_breadth_search(ivf.search, q, k, min(k, n), sel, ivf=ivf.nlist, nprobe=base, share=share))
        if self._small is not None and self._small[2]:
            scan, dead, _ = self._small
            parts.append(scan.search(q, k, exclude=exclude,
                                     deleted_rows=dead if allow is None else allow.masked_rows("small", scan.ids)))
        for s in self.others:
            n, share = rows([s], s.rows - len(s.deleted))
            if not n:
                continue
            index = s.faiss_index()
            hnsw = hasattr(inner_index(index), "hnsw")
            parts.append(_breadth_search(lambda q_, k_, p, index=index: index.search(q_, k_, params=p), q, k,
                                         min(k, n), sel, hnsw_rows=s.rows if hnsw else 0, ef_search=ef_search,
                                         share=share))
        return merge_topk(parts, k, self.metric_ip) if parts else (
            np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64))


#: FAISS (non-IVF) segments of at most this many rows are scanned flat, together, when their vectors are exact
SMALL_SEGMENT_ROWS = 4096


def _storage(seg) -> np.ndarray | None:
    """The exact stored vectors of an HNSW-Flat segment in row order (None for other kinds)."""
    import faiss

    inner = inner_index(seg.faiss_index())
    storage = faiss.downcast_index(inner.storage) if hasattr(inner, "storage") else None
    if not isinstance(storage, faiss.IndexFlat) or storage.ntotal != seg.rows:
        return None
    return storage.reconstruct_n(0, storage.ntotal) if storage.ntotal else np.zeros((0, inner.d), np.float32)


def _breadth_search(search, q, k, want, sel, *, ivf: int = 0, nprobe=None, hnsw_rows: int = 0, ef_search=None,
                    share: float = 1.0, view: bool = False):
    """``search(q, k, params)`` with the breadth doubled until every query has ``want`` results (or the
    breadth is the whole index). ``ivf``: nlist of an IVF; ``hnsw_rows``: rows of an HNSW graph;
    ``share``: the share of the rows a filter lets through (the starting breadth is raised by it: ``nprobe
    / share ** VIEW_PROBE_EXPONENT`` on an IVF ``view`` of the matching entries alone, ``nprobe /
    sqrt(share)`` on the whole IVF)."""
    import faiss

    ef, probe = ef_search or (max(16, 2 * k) if hnsw_rows else None), nprobe
    if share < 1.0:
        if hnsw_rows:
            ef = int(min(max(4096, ef), ef / max(share, 1e-6)))
        if ivf:
            from mmretrieve.index.filtered import VIEW_PROBE_EXPONENT

            raise_by = max(share, 1e-6) ** (VIEW_PROBE_EXPONENT if view else 0.5)
            probe = int(min(ivf, np.ceil((probe or 1) / raise_by)))
    for _ in range(12):
        p = faiss.SearchParametersHNSW() if hnsw_rows else faiss.SearchParametersIVF() if ivf else faiss.SearchParameters()
        if hnsw_rows:
            p.efSearch = int(ef)
        if ivf and probe:
            p.nprobe = int(probe)
        if sel is not None:
            p.sel = sel
        D, I = search(q, k, p)
        if (I >= 0).sum(1).min() >= want:
            break
        if ivf and (probe or 1) < ivf:
            probe = min(ivf, (probe or 1) * 2)
        elif hnsw_rows and ef <= max(4096, 4 * hnsw_rows):
            ef = ef * 2
        else:
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
        self._searchers = [SegmentSearch(s, self.metric_ip) for s in self.segments if s.kind == "flat"]
        faiss_segs = [s for s in self.segments if s.kind != "flat"]
        if faiss_segs:
            self._searchers.append(FaissSearch(faiss_segs, self.metric_ip))
        self._gpu = None

    @property
    def ntotal(self) -> int:
        return sum(s.rows for s in self.segments)

    @property
    def live(self) -> int:
        return sum(s.live for s in self._searchers)

    def search(self, queries: np.ndarray, k: int = 10, *, nprobe: int | None = None, ef_search: int | None = None,
               exclude: Sequence[int] | None = None, allow=None) -> tuple[np.ndarray, np.ndarray]:
        """``queries`` (n, d) or (d,) float32 -> (scores (n, k), ids (n, k)); missing slots have id -1.
        ``allow``: a ``filtered.Selection``: only its ids come back (see ``index.filtered``)."""
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise BadVectorsError(f"expected query vectors of dim {self.dim}, got shape {tuple(q.shape)}")
        k = max(1, min(int(k), max(1, self.live)))
        excl = [] if exclude is None else [int(i) for i in np.asarray(exclude, np.int64).ravel()]
        if not self.live or (allow is not None and not allow.count):
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        if allow is not None and allow.count == self.live and allow.rows.keys() <= self.by_id.keys():
            allow = None  # every live row of this snapshot matches: the unfiltered search (no bitmap to test)
        if allow is not None and allow.exact(self.live, k, graph_ef=self._graph_ef(ef_search, k)):
            from mmretrieve.index.filtered import exact_search

            return exact_search(self.by_id, allow, q, k, excl, self.metric_ip)
        if self.search_device == "cuda" and allow is None:  # a filtered search runs on the CPU searchers
            return self.gpu_searcher().search(q, k, exclude=excl)
        opts = {"nprobe": nprobe or self.nprobe, "ef_search": ef_search or self.ef_search}
        parts = [s.search(q, k, exclude=excl, allow=allow, **({} if isinstance(s, SegmentSearch) else opts))
                 for s in self._searchers if s.live]
        return merge_topk(parts, k, self.metric_ip)

    def _graph_ef(self, ef_search, k: int) -> int:
        """The efSearch an HNSW graph of this snapshot is searched with (0 without a graph searched as one)."""
        graph = any(f.prepare().has_graph for f in self._searchers if isinstance(f, FaissSearch))
        return int(ef_search or self.ef_search or max(16, 2 * k)) if graph else 0

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


__all__ = ["SegmentedVectors", "SegmentSearch", "FaissSearch", "merge_topk", "resolve_search_device", "SEARCH_DEVICES"]
