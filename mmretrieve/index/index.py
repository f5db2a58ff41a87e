"""``Index``: a read-only snapshot of one version of an index (the Python face of ``mmretrieve search``).

>>> from mmretrieve import open_index
>>> idx = open_index("photos")                                      # doctest: +SKIP
>>> idx.search(text="a photo of a cat", k=5).keys                   # doctest: +SKIP
>>> idx.search(image="ref.jpg", text="but red", fusion="sum").keys  # doctest: +SKIP

Writing goes through ``mmretrieve.ingest`` (``build_index``, ``add_to_index``, ``remove_from_index``);
an open ``Index`` keeps answering at its version while others write, and ``reopen()`` moves to the
latest one. The parts: ``VectorIndex`` (search and stored vectors), the metadata database, the patch and
frame side-stores, and the search functions of ``mmretrieve.index.search``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmretrieve.errors import (
    EncoderUnavailableError,
    IndexCorruptedError,
    ItemNotFoundError,
    MMRetrieveError,
    NoPatchesError,
    UsageError,
)
from mmretrieve.index import search as _search
from mmretrieve.index.vectors import SegmentedVectors
from mmretrieve.query import Query
from mmretrieve.results import SearchResults
from mmretrieve.store.layout import META, check_encoder_compat, read_manifest, resolve_index_path
from mmretrieve.store.leases import Lease, gc_lock
from mmretrieve.store.meta import Item, MetaDB, Visibility, resolve_item
from mmretrieve.store.segments import SegmentFiles
from mmretrieve.store.sidestores import load_projection
from mmretrieve.store.verify import check_shared_files, verify_metadata

log = logging.getLogger(__name__)


VERIFY_LEVELS = ("none", "fast", "full")


def _verify_level(verify) -> str:
    """``True`` -> ``full``; ``False`` -> ``none`` (what it says: no checks of the mapped files)."""
    if verify is True:
        return "full"
    if verify is False:
        return "none"
    if verify not in VERIFY_LEVELS:
        raise UsageError(f"verify must be one of {', '.join(VERIFY_LEVELS)} (or True / False), got {verify!r}")
    return verify


class Index:
    """A read-only snapshot of one version of an index (held by a lease until ``close``)."""

    def __init__(self, path: Path, manifest: dict, segments: list[SegmentFiles], meta: MetaDB, lease=None, *,
                 search_device: str | None = "auto", nprobe: int | None = None, ef_search: int | None = None,
                 nlist: int | None = None) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.meta = meta
        self.segments = segments
        self.lease = lease
        self.vector_index = SegmentedVectors(
            segments, dim=int(manifest["encoder"]["dim"]), metric=manifest.get("metric", "ip"),
            kind="flat" if manifest.get("faiss") == "flat" else "faiss", search_device=search_device, nprobe=nprobe,
            ef_search=ef_search, nlist=nlist, name=self.path.name)
        self._encoder = None
        # the metadata keeps the lease alive: `open_index(x).meta.iter_items()` outlives the Index object,
        # and the version's rows must not be collected while it reads them (both close when collected)
        meta.lease = lease

    # ---- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, name_or_path: str | os.PathLike, *, index_dir: str | os.PathLike | None = None, encoder=None,
             verify="fast", version: str | None = None, search_device: str | None = "auto",
             nprobe: int | None = None, ef_search: int | None = None) -> Index:
        """Open the live version (or a retained ``version``: ``v0007``, ``previous``), in O(segments).

        ``verify``: ``"fast"`` (default) checks the manifest (against its own checksum), the sizes and
        headers of every file and that the metadata lists one row per stored vector; ``"full"`` (or
        ``True``) also checks every byte against its sha256 and every metadata row against its checksum;
        ``"none"`` (or ``False``) skips the checks of the memory-mapped files (benchmarks). Whatever the
        level, the small files read whole (deletion files, the patch projection) are checked against their
        sha256 as they are read. Segments are memory-mapped.

        ``search_device``: ``auto`` searches on the GPU when CUDA is present and the index can be searched
        there, else on the CPU; ``cpu`` / ``cuda`` force one (``cuda`` fails with the reason when it
        cannot). ``$MMRETRIEVE_SEARCH_DEVICE`` sets the default. ``nprobe`` / ``ef_search``: the IVF /
        HNSW search breadth (IVF default: min(nlist, 32) lists; raised where deletions leave a search
        short). ``encoder``: the query encoder (a name or an ``Encoder``; default: the one that built the
        index, created on first use).
        """
        path = resolve_index_path(name_or_path, index_dir)
        level = _verify_level(verify)
        with gc_lock(path, exclusive=False):  # no file of this version can be collected once the lease exists
            manifest = read_manifest(path, version)
            lease = Lease(path, manifest["version"])
        try:
            idx = cls._open_snapshot(path, manifest, lease, level, search_device, nprobe, ef_search)
        except BaseException:
            lease.release()
            raise
        if encoder is not None:
            from mmretrieve.encoders import create_encoder

            idx.encoder = create_encoder(encoder) if isinstance(encoder, str) else encoder
        return idx

    @classmethod
    def _open_snapshot(cls, path, manifest, lease, level, search_device, nprobe, ef_search) -> Index:
        segments = [SegmentFiles(path, e, check=level) for e in manifest["segments"]]
        view = Visibility({s.sid: s.deleted for s in segments})
        if level != "none":
            check_shared_files(path, manifest, full=level == "full")
        meta = MetaDB.open_reader(path / META, view)
        if level != "none":
            rows = sum(s.rows for s in segments)
            records = sum(meta.count_records(s.sid) for s in segments)
            dead = sum(len(s.deleted) for s in segments)
            if records != rows:
                meta.close()
                raise IndexCorruptedError(f"{path}: FAISS holds {rows} vectors but the metadata lists {records - dead} "
                                          f"items + {dead} tombstones (the segments and {path / META} disagree)")
        if level == "full":
            verify_metadata(path, meta, segments)
        nlist = None
        if manifest.get("faiss") != "flat" and segments:
            from mmretrieve.index.flatscan import inner_index

            nlist = getattr(inner_index(segments[0].faiss_index()), "nlist", None)
        return cls(path, manifest, segments, meta, lease, search_device=search_device, nprobe=nprobe,
                   ef_search=ef_search, nlist=nlist)

    def reopen(self) -> Index:
        """The latest committed version (this object keeps its snapshot)."""
        v = self.vector_index
        return Index.open(self.path, encoder=self._encoder, search_device=v.search_device, nprobe=v.nprobe,
                          ef_search=v.ef_search)

    def close(self) -> None:
        self.meta.close()
        if self.lease is not None:
            self.lease.release()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- properties ------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def dim(self) -> int:
        return int(self.manifest["encoder"]["dim"])

    @property
    def encoder_name(self) -> str:
        return self.manifest["encoder"]["name"]

    @property
    def search_device(self) -> str:
        return self.vector_index.search_device

    @property
    def nprobe(self) -> int | None:
        return self.vector_index.nprobe

    def __len__(self) -> int:
        return int(self.manifest["counts"]["items"])

    @property
    def view(self) -> ReadView:
        """What rerankers read of this snapshot (no search, no hydration). Made per use: a view kept on
        the index would be a reference cycle, and an unreferenced index would hold its lease until the
        cycle collector ran."""
        return ReadView(self)

    @property
    def encoder(self):
        """The query encoder, loaded on first need: opening an index, and searching it by stored item or by
        vector, never load it (an index of imported embeddings may name a model that is not here)."""
        if self._encoder is None:
            from mmretrieve.encoders import create_encoder

            try:
                enc = create_encoder(self.encoder_name)
            except MMRetrieveError as e:
                raise EncoderUnavailableError(
                    f"index {self.path.name!r} was built with encoder {self.encoder_name!r}, which cannot be loaded "
                    f"here ({e}). Queries by stored item or by vector work without it (--item, search(vector=...), "
                    "the API's item / vector); for text or image queries give a loadable query encoder of the same "
                    "model and dim (--encoder / encoder=), or rebuild the index with a known encoder") from None
            self.encoder = enc
        return self._encoder

    @encoder.setter
    def encoder(self, enc) -> None:
        check_encoder_compat(self.manifest["encoder"], enc.info.to_dict(), self.path)
        self._encoder = enc

    def info(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "path": str(self.path.resolve()),
            "version": m["version"],
            "encoder": m["encoder"],
            "metric": m["metric"],
            "factory": m["factory"],
            "faiss": m.get("faiss"),
            "operation": m.get("operation"),
            "counts": m["counts"],
            "patches": m.get("patches"),
            "video": m.get("video"),
            "segments": len(m["segments"]),
            "retain": m.get("retain"),
            "vector_dtype": m.get("vector_dtype"),
            "bytes": _data_bytes(m),
            "created_at": m.get("created_at"),
            "updated_at": m.get("updated_at"),
        }

    # ---- items -----------------------------------------------------------------------------------
    def items(self, ids: Sequence[int]) -> dict[int, Item]:
        return self.meta.items_by_ids(ids)

    def get(self, key_or_id: str | int) -> Item:
        """An item by id (an int, or ``"id:N"``), key (or ``"key:K"``), a number string, or a file path;
        a number string that is one item's key and another's id is refused as ambiguous."""
        i = resolve_item(self.meta, key_or_id, self.path)
        it = self.meta.items_by_ids([i]).get(i)
        if it is None:
            raise ItemNotFoundError(f"no item {key_or_id!r} in index {self.path}")
        return it

    def as_id(self, e: int | str) -> int:
        return int(e) if isinstance(e, (int, np.integer)) else self.get(e).id

    # ---- stored vectors and side-stores ---------------------------------------------------------------
    def _located(self, ids: Sequence[int]) -> list[Item]:
        items = self.items(ids)
        missing = [int(i) for i in ids if int(i) not in items]
        if missing:
            raise ItemNotFoundError(f"no item {missing[0]} in index {self.path}")
        return [items[int(i)] for i in ids]

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """Stored embeddings of ``ids`` (exact for fp32 Flat and HNSW; fp16 and PQ give what they store)."""
        out = np.zeros((len(ids), self.dim), np.float32)
        by_seg: dict[str, list[tuple[int, int]]] = {}
        for j, it in enumerate(self._located(ids)):
            by_seg.setdefault(it.segment, []).append((j, it.row))
        for sid, pairs in by_seg.items():
            js, rows = zip(*pairs)
            out[list(js)] = self.vector_index.by_id[sid].vectors(np.array(rows))
        return out

    def exact_vectors(self) -> bool:
        """Whether ``vectors()`` returns the stored embeddings exactly (fp32 Flat, HNSW-Flat)."""
        return all(s.exact() for s in self.segments) if self.segments else self.manifest.get("vector_dtype") != "float16"

    def has_patches(self) -> bool:
        return bool(self.manifest.get("patches"))

    def patch_projection(self) -> np.ndarray | None:
        """The fixed projection patch features were stored through (``patches={"dim": D}``), or None."""
        return load_projection(self.path, self.manifest.get("patches"), (self.manifest.get("files") or {}).get("patch_proj.npy"))

    def patches(self, ids: Sequence[int]) -> np.ndarray:
        """(n, P, Dp) float32 patch features of ``ids`` from the side-store."""
        if not self.has_patches():
            raise NoPatchesError(f"index {self.path} has no patch store (build it with --patches)")
        pc = self.manifest["patches"]
        out = np.zeros((len(ids), int(pc["grid"]) ** 2, int(pc["dim"])), np.float32)
        for j, it in enumerate(self._located(ids)):
            seg = self.vector_index.by_id[it.segment]
            if "patches.npy" not in seg.entry["files"]:
                raise NoPatchesError(f"item {it.id} has no stored patches")
            out[j] = seg.array("patches.npy")[it.row]
        return out

    def frames(self, ids: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Per id: ``(frame embeddings (T, D) float32, timestamps (T,))`` of a video, ``None`` for other items."""
        out: list[tuple[np.ndarray, np.ndarray] | None] = []
        for it in self._located(ids):
            if not it.frame_count:
                out.append(None)
                continue
            emb, ts = self._frame_arrays(it.segment)
            sl = slice(it.frame_start, it.frame_start + it.frame_count)
            out.append((np.asarray(emb[sl], dtype=np.float32), np.asarray(ts[sl], dtype=np.float32)))
        return out

    def frames_matrix(self, ids: Sequence[int], *, as_torch: bool = False):
        """All stored frames of ``ids`` in one gather: ``(E (sum T, D) float32, timestamps, offsets (n+1,))``.
        Items without frames (images, frame entries) contribute their own vector as a single frame with
        timestamp NaN (frame entries: their timestamp). ``as_torch`` returns E as a torch tensor, fp16
        as stored when possible (see ``frame_similarities``)."""
        import torch

        items = self._located(ids)
        counts = np.array([it.frame_count or 1 for it in items], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        segs = {it.segment for it in items if it.frame_count}
        if len(segs) == 1 and all(it.frame_count for it in items):
            # the common case (every candidate a video of one segment): one gather, stored fp16 kept
            emb, ts = self._frame_arrays(next(iter(segs)))
            src = np.concatenate([np.arange(it.frame_start, it.frame_start + it.frame_count) for it in items])
            E16 = torch.from_numpy(np.ascontiguousarray(emb[src]))
            return (E16 if as_torch else E16.float().numpy()), np.asarray(ts[src]), offsets
        n = int(offsets[-1])
        E = np.empty((n, self.dim), np.float32)
        T = np.full(n, np.nan, np.float32)
        rest = []
        for j, it in enumerate(items):
            if it.frame_count:
                emb, ts = self._frame_arrays(it.segment)
                sl = slice(it.frame_start, it.frame_start + it.frame_count)
                E[offsets[j] : offsets[j + 1]] = np.asarray(emb[sl], np.float32)
                T[offsets[j] : offsets[j + 1]] = ts[sl]
            else:
                rest.append(j)
                if it.kind == "frame" and it.extra.get("timestamp") is not None:  # a manifest column is not one
                    try:
                        T[offsets[j]] = float(it.extra["timestamp"])
                    except (TypeError, ValueError):
                        pass
        if rest:
            E[offsets[rest]] = self.vectors([int(ids[j]) for j in rest])
        return (torch.from_numpy(E) if as_torch else E), T, offsets

    @staticmethod
    def frame_similarities(E, q: np.ndarray, chunk: int = 1024) -> np.ndarray:
        """``E @ q`` for a torch frame matrix (fp16 or fp32), converted to fp32 chunk by chunk so each
        chunk stays in cache; done in torch, not numpy's BLAS (why, with figures: docs/benchmarks.md;
        ``mmretrieve bench video`` measures it)."""
        import torch

        qt = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
        out = torch.empty(len(E), dtype=torch.float32)
        for s in range(0, len(E), chunk):
            out[s : s + chunk] = E[s : s + chunk].float() @ qt
        return out.numpy()

    def _frame_arrays(self, sid: str):
        seg = self.vector_index.by_id[sid]
        return seg.array("frames.npy"), seg.array("frames_ts.npy", mmap=False)

    # ---- search (see mmretrieve.index.search) ----------------------------------------------------
    def search_vectors(self, queries: np.ndarray, k: int = 10, *, nprobe: int | None = None,
                       ef_search: int | None = None, exclude: Sequence[int] | None = None,
                       where=None) -> tuple[np.ndarray, np.ndarray]:
        """``queries`` (n, d) float32 -> (scores (n, k), ids (n, k)); missing slots have id -1. ``where``:
        a filter (see ``select``): only matching items come back, ``k`` of them whenever ``k`` match."""
        from mmretrieve.config import positive_int

        k = positive_int(k, "k", "Index.search_vectors")
        allow = None if where is None else self.select(where)
        return self.vector_index.search(queries, k, nprobe=nprobe, ef_search=ef_search, exclude=exclude, allow=allow)

    def select(self, where):
        """The live items of this snapshot that meet a filter (``mmretrieve.store.filters``: e.g. ``"year >=
        2020 and license in ('cc-by', 'cc0')"``), as an ``index.filtered.Selection`` (``.ids``, ``.count``),
        from one SQL query with bound values; the last few are cached per snapshot. A ``Selection`` is
        returned as it is; ``None`` selects every live item. Raises ``FilterError`` naming the token and its
        position."""
        from mmretrieve.index.filtered import CACHE_SIZE, Selection
        from mmretrieve.lru import LRU
        from mmretrieve.store.filters import parse

        if isinstance(where, Selection):
            return where
        if getattr(self, "_selections", None) is None:
            self._selections = LRU(CACHE_SIZE)
        if where is None:  # every live item (a browse without a filter)
            return self._selections.get_or_make("", lambda: Selection("", self.meta.matching("1", []), self.segments))
        hit = self._selections.get(("text", where))  # the same text again: no parse (it costs more than the search)
        if hit is not None:
            return hit
        tree = parse(where)
        sel = self._selections.get_or_make(str(tree), lambda: Selection(str(tree), self.meta.matching(*self.filter_sql(tree)),
                                                                        self.segments))
        return self._selections.put(("text", where), sel)

    def filter_sql(self, where) -> tuple[str, list]:
        """(SQL condition, parameters) of a filter (its text or its parsed tree) over this snapshot's items
        table: ``map within (...)`` predicates first resolved to the ids inside their polygon on this
        version's cached map (``index.embmap``), bound as one JSON parameter each."""
        from mmretrieve.index import embmap
        from mmretrieve.store.filters import bind_maps, has_map, parse, to_sql

        tree = parse(where) if isinstance(where, str) else where
        if has_map(tree):
            tree = bind_maps(tree, lambda m: embmap.ids_within(self, m.polygon, m.method))
        return to_sql(tree)

    def text_search(self, query: str | None = None, k: int = 10, *, where=None, fts: str | None = None,
                    exclude: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Full-text search over the items' captions and string metadata (SQLite FTS5, BM25-ranked):
        ``(ids, scores)`` of the best ``k`` items of this snapshot, best first; a score is ``-bm25()``
        (higher is better). ``query`` is plain words (quoted: FTS5 operators in it are just text; any word
        matches, items with more of the rarer words first); ``fts``: an FTS5 query in its own syntax
        instead (``'"red dress" AND NOT blue'``). ``where``: a metadata filter (see ``select``);
        ``exclude``: ids left out. An index made before full-text search gets its table on first use
        (built under the writer's lock)."""
        from mmretrieve.config import positive_int
        from mmretrieve.store import fulltext

        k = positive_int(k, "k", "Index.text_search")
        if (query is None) == (fts is None):
            raise UsageError("Index.text_search takes a query (plain words) or fts= (FTS5 syntax), one of them")
        match = fulltext.plain_query(query) if fts is None else str(fts)
        if not match:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        fulltext.require_fts5()
        if not self.meta.has_fulltext():
            self._build_fulltext()
        sel = None if where is None else self.select(where)
        skip = set(int(i) for i in (exclude or ()))
        limit = max(4 * k, 100)
        while True:
            found, complete = self.meta.text_matches(match, limit)
            ids = np.asarray([i for i, _ in found], np.int64)
            keep = np.asarray([i not in skip for i in ids.tolist()], bool)
            if sel is not None and len(ids):
                keep &= sel.allowed(ids)
            if complete or int(keep.sum()) >= k:
                scores = np.asarray([s for _, s in found], np.float32)
                return ids[keep][:k], scores[keep][:k]
            limit *= 4

    def _build_fulltext(self) -> None:
        """Give a database made before full-text search its table (a writer session that writes nothing)."""
        from mmretrieve.errors import StoreError
        from mmretrieve.store import IndexWriter

        try:
            IndexWriter(self.path, auto_compact=False).abort()
        except (StoreError, OSError) as e:
            raise StoreError(f"{self.path}: the index predates full-text search and its full-text table could not be "
                             f"built now ({e}); any write builds it (e.g. `mmretrieve index compact {self.path}`)") from None
        log.info("%s: built the full-text table", self.path)

    def gpu_searcher(self):
        return self.vector_index.gpu_searcher()

    def versions(self) -> list[dict[str, Any]]:
        """The versions the index keeps (see ``mmretrieve index versions``)."""
        from mmretrieve.store.layout import version_summaries

        return version_summaries(self.path)

    def search(self, query: Query | None = None, *, text=None, image=None, video=None, item=None, vector=None,
               fusion: str | None = None, k: int = 10, exclude: Sequence[int | str] | None = None,
               exclude_reference: bool = True, pipeline=None, nprobe: int | None = None, ef_search: int | None = None,
               where: str | None = None, exclude_dupes: bool = False, dupe_threshold: float = 0.95,
               **options: Any) -> SearchResults:
        """Search by text, image (or video), both (composed), a stored item, or a precomputed ``vector``.
        Returns ``SearchResults`` (best first; ``hit.score`` falls with rank).

        ``image`` is always a file (or a shard member ``<shard>.tar#<member>``); ``item`` is an indexed
        item (id, key, ``id:N`` / ``key:K``) whose stored vector is the query's visual side; ``vector`` is
        an embedding of the index's dim (no encoder involved; no fusion or rerankers with it).

        ``fusion`` and its ``options`` (``weight``; ``k1``, ``mode``) say how a composed query is searched
        (default: the pipeline's coarse fusion, else ``sum``); unknown options are refused.
        ``exclude_reference``: leave the query's own item out of the results: for ``item=`` queries ("more
        like this") and for composed queries whose reference image is itself in the index (what composed
        retrieval asks for); ``False`` keeps it. ``pipeline``: a ``Pipeline`` of
        rerankers (or a preset name / spec string / list, as ``--rerank`` / ``--pipeline`` take them);
        without one, only the coarse stage runs. ``nprobe`` / ``ef_search``: this search's IVF / HNSW
        breadth. ``where``: a metadata filter (``"year >= 2020 and license in ('cc-by', 'cc0')"``; see
        docs/python-api.md): every stage sees matching items only, and ``k`` hits come back whenever ``k``
        items match. Each hit carries its item's metadata (``hit.metadata``). For ids and scores of many
        raw vectors at once, see ``search_vectors``. ``exclude_dupes``: one hit per near-duplicate group
        (the best-ranked; groups of ``near_duplicates(dupe_threshold)``, found once per snapshot).
        """
        def run(n: int) -> SearchResults:
            return _search.search(self, query, text=text, image=image, video=video, item=item, vector=vector,
                                  fusion=fusion, k=n, exclude=exclude, exclude_reference=exclude_reference,
                                  pipeline=pipeline, nprobe=nprobe, ef_search=ef_search, where=where, **options)

        if exclude_dupes:
            from mmretrieve.config import positive_int

            return _search.search_deduped(self, positive_int(k, "k", "Index.search"), run, threshold=dupe_threshold)
        return run(k)

    def browse(self, where: str | None = None, *, k: int = 10, offset: int = 0, order: str = "id") -> SearchResults:
        """The items that meet a filter (all live items without one), with no query: ``SearchResults`` of
        the ``k`` items after the first ``offset`` in ``order``: ``"id"`` (default), ``"added"`` (when
        added), or a numeric field (``"year"``, ``"size"``, ``"exif.iso"``), each optionally ``" desc"``.
        Items without a number in the field come last; ties go by id. A hit's ``score`` is 0 and its
        ``rank`` its place in the order over all pages; ``res.query["matching"]`` is how many items match.
        With ``order="id"`` the ids are ``select(where).ids`` in order."""
        from mmretrieve.index.browse import browse

        return browse(self, where, k=k, offset=offset, order=order)

    def search_batch(self, queries: Sequence[dict], *, k: int = 10, where=None, keep_reference: bool = False,
                     nprobe: int | None = None, ef_search: int | None = None) -> list[SearchResults]:
        """Many queries (``{"text": ...}`` / ``{"item": ...}`` / ``{"vector": [...]}``) in one call: one
        batched text-encoder forward and one batched scan; ``SearchResults`` per query, equal to one-by-one
        ``search`` calls (coarse stage only). An item query leaves the item out unless ``keep_reference``."""
        from mmretrieve.index.batch import search_batch

        return search_batch(self, queries, k=k, where=where, keep_reference=keep_reference, nprobe=nprobe,
                            ef_search=ef_search)

    def export(self, path: str | os.PathLike, *, where=None, format: str | None = None, limit: int | None = None):
        """Write the items (those meeting the filter ``where``; the first ``limit`` by id) to ``path``:
        ``format`` ``csv`` / ``jsonl`` (rows of id, key, uri, kind, caption and the metadata), ``wds`` (a
        webdataset tar of the files and their JSON) or ``links`` (a new folder of symlinks); default from
        the suffix (no suffix: links). Written atomically; items whose file is missing are skipped and
        listed in the returned ``index.export.ExportReport``."""
        from mmretrieve.index.export import export_index

        return export_index(self, path, where=where, format=format, limit=limit)

    def near_duplicates(self, threshold: float = 0.95, k: int = 10) -> list:
        """Groups of near-duplicate items (``index.dupes.DupeGroup``: ``representative``, ``ids``, ``keys``):
        each live item's top-``k`` neighbours by its stored vector, joined where the similarity is at least
        ``threshold`` (union-find; O(N·k), never pairwise). Cached per snapshot and (threshold, k)."""
        from mmretrieve.index.dupes import near_duplicates

        key = (float(threshold), int(k))
        cache = self.__dict__.setdefault("_dupes", {})
        if key not in cache:
            cache[key] = near_duplicates(self, threshold, k)
        return cache[key]

    def encode_video(self, path) -> np.ndarray:
        """A video's vector, sampled and pooled as this index's videos were (in-process, no timeout)."""
        from mmretrieve.encoders.video import encode_video

        return encode_video(self.encoder, path, self.manifest.get("video"))


class ReadView:
    """What a reranker reads of an index snapshot (``rerank.base.IndexView``): its items, stored vectors,
    patches and frames, and the query encoder. No search and no hydration: the search path owns those."""

    __slots__ = ("_index",)

    def __init__(self, index: Index) -> None:
        self._index = index

    @property
    def path(self) -> Path:
        return self._index.path

    @property
    def manifest(self) -> dict:
        return self._index.manifest

    @property
    def encoder(self):
        return self._index.encoder

    def items(self, ids: Sequence[int]) -> dict[int, Item]:
        return self._index.items(ids)

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        return self._index.vectors(ids)

    def patches(self, ids: Sequence[int]) -> np.ndarray:
        return self._index.patches(ids)

    def patch_projection(self) -> np.ndarray | None:
        return self._index.patch_projection()

    def frames_matrix(self, ids: Sequence[int], *, as_torch: bool = False):
        return self._index.frames_matrix(ids, as_torch=as_torch)

    frame_similarities = staticmethod(Index.frame_similarities)


def _data_bytes(m: dict) -> int:
    segs = sum(f["bytes"] for e in m["segments"] for f in e["files"].values())
    return segs + sum(f["bytes"] for f in (m.get("files") or {}).values())


def open_index(name_or_path: str | os.PathLike, **kw) -> Index:
    """Open a named index (under the indexes home) or an index directory. See ``Index.open``."""
    return Index.open(name_or_path, **kw)


__all__ = ["Index", "ReadView", "open_index"]
