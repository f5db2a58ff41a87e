"""``Index``: open, search, grow and shrink a named index (the Python face of ``mmretrieve index``).

>>> from mmretrieve import build_index, open_index
>>> report = build_index("photos", "~/Pictures")                    # doctest: +SKIP
>>> idx = open_index("photos")                                      # doctest: +SKIP
>>> idx.search(text="a photo of a cat", k=5).keys                   # doctest: +SKIP
>>> idx.search(image="ref.jpg", text="but red", fusion="sum").keys  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmretrieve.encoders import DEFAULT_ENCODER, Encoder, create_encoder
from mmretrieve.index import store
from mmretrieve.index.flatscan import BlasFlatScanner
from mmretrieve.index.meta import Item, MetaDB, Skipped
from mmretrieve.index.store import (
    EncoderMismatchError,
    IndexCorruptedError,
    IndexWriter,
    check_encoder_compat,
    read_faiss,
    read_manifest,
    resolve_index_path,
    verify_files,
)
from mmretrieve.ingest import IngestReport, ingest, select_changed
from mmretrieve.media.scan import scan_source
from mmretrieve.query import FUSIONS, Query, intersection_scores
from mmretrieve.results import Hit, SearchResults

log = logging.getLogger(__name__)


class SkippedInputsError(RuntimeError):
    """``strict=True`` and some inputs were skipped: nothing was published; ``report`` lists them."""

    def __init__(self, report: IngestReport) -> None:
        self.report = report
        first = report.skipped[0]
        super().__init__(
            f"{len(report.skipped)} input(s) skipped in strict mode (nothing written), e.g. {first.uri}: {first.reason}"
        )


class Index:
    """A read-only snapshot of one version of an index, plus the operations that write new versions."""

    def __init__(self, path: Path, manifest: dict, faiss_index, meta: MetaDB, encoder: Encoder | None = None,
                 *, search_device: str | None = "auto", nprobe: int | None = None, ef_search: int | None = None) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.faiss = faiss_index
        self.meta = meta
        self._encoder = None
        self._tombstones = meta.tombstones()
        self._patch_cache: dict[str, np.ndarray] = {}
        self.search_device = resolve_search_device(search_device, faiss_index)
        #: approximate-search knobs used when a call gives none: IVF lists probed (default min(nlist, 32);
        #: FAISS's own default of 1 loses most neighbours) and HNSW's efSearch (default: FAISS's)
        nlist = getattr(store.inner_index(faiss_index), "nlist", None)
        self.nprobe = int(nprobe) if nprobe else (min(int(nlist), 32) if nlist else None)
        self.ef_search = int(ef_search) if ef_search else None
        self._gpu_searcher = None
        self._blas_scanner = None
        if encoder is not None:
            self.encoder = encoder

    # ---- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        name_or_path: str | os.PathLike,
        *,
        index_dir: str | os.PathLike | None = None,
        encoder: Encoder | str | None = None,
        verify: bool = True,
        mmap: bool = False,
        search_device: str | None = "auto",
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> Index:
        """Open the live version. ``verify`` checks sha256s; ``mmap`` memory-maps the FAISS index (Flat).

        ``search_device``: ``auto`` searches on the GPU when CUDA is present and the index can be searched
        there (faiss-gpu, or the torch exact scan for Flat indexes), else on the CPU; ``cpu`` / ``cuda``
        force one (``cuda`` fails with the reason when it cannot). ``$MMRETRIEVE_SEARCH_DEVICE`` sets the
        default. ``nprobe`` / ``ef_search``: the IVF / HNSW search breadth of every search of this
        snapshot (IVF default: min(nlist, 32) lists).
        """
        path = resolve_index_path(name_or_path, index_dir)
        manifest = read_manifest(path)
        vdir = path / manifest["version"]
        verify_files(vdir, manifest, check=verify)
        findex = read_faiss(vdir / "index.faiss", mmap=mmap)
        try:
            meta = MetaDB.open_readonly(vdir / "meta.sqlite")
            n_items, n_tomb = meta.count(), len(meta.tombstones())
        except Exception as e:
            raise IndexCorruptedError(f"{vdir / 'meta.sqlite'}: unreadable metadata ({e})") from None
        if findex.ntotal != n_items + n_tomb:
            raise IndexCorruptedError(
                f"{vdir}: FAISS holds {findex.ntotal} vectors but the metadata lists {n_items} items + {n_tomb} tombstones"
            )
        if findex.d != int(manifest["encoder"]["dim"]):
            raise IndexCorruptedError(f"{vdir / 'index.faiss'}: dim {findex.d}, manifest says {manifest['encoder']['dim']}")
        idx = cls(path, manifest, findex, meta, search_device=search_device, nprobe=nprobe, ef_search=ef_search)
        if encoder is not None:
            idx.encoder = create_encoder(encoder) if isinstance(encoder, str) else encoder
        return idx

    def reopen(self) -> Index:
        """The latest committed version (this object keeps its snapshot)."""
        return Index.open(self.path, encoder=self._encoder, search_device=self.search_device, nprobe=self.nprobe,
                          ef_search=self.ef_search)

    def close(self) -> None:
        self.meta.close()

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

    def __len__(self) -> int:
        return int(self.manifest["counts"]["items"])

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self.encoder = create_encoder(self.encoder_name)
        return self._encoder

    @encoder.setter
    def encoder(self, enc: Encoder) -> None:
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
            "counts": m["counts"],
            "patches": m.get("patches"),
            "bytes": sum(f["bytes"] for f in m["files"].values()),
            "created_at": m.get("created_at"),
            "updated_at": m.get("updated_at"),
        }

    # ---- lookups ---------------------------------------------------------------------------------
    def items(self, ids: Sequence[int]) -> dict[int, Item]:
        return self.meta.items_by_ids(ids)

    def get(self, key_or_id: str | int) -> Item:
        """An item by id (an int, or ``"id:N"``), key (or ``"key:K"``), a number string, or a file path;
        a number string that is one item's key and another's id is refused as ambiguous."""
        i = _resolve_id(self.meta, key_or_id, self.path)
        it = self.meta.items_by_ids([i]).get(i)
        if it is None:
            raise KeyError(f"no item {key_or_id!r} in index {self.path}")
        return it

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """Stored embeddings of ``ids`` (exact for Flat/HNSW; IVF-PQ returns its lossy reconstruction)."""
        out = np.zeros((len(ids), self.dim), np.float32)
        for j, i in enumerate(ids):
            out[j] = self.faiss.reconstruct(int(i))
        return out

    def has_patches(self) -> bool:
        return bool(self.manifest.get("patches"))

    def patches(self, ids: Sequence[int]) -> np.ndarray:
        """(n, P, Dp) float32 patch features of ``ids`` from the side-store."""
        if not self.has_patches():
            raise LookupError(f"index {self.path} has no patch store (build it with --patches)")
        items = self.items(ids)
        pc = self.manifest["patches"]
        out = np.zeros((len(ids), int(pc["grid"]) ** 2, int(pc["dim"])), np.float32)
        for j, i in enumerate(ids):
            it = items.get(int(i))
            if it is None or it.patch_seg is None:
                raise LookupError(f"item {i} has no stored patches")
            seg = self._patch_cache.get(it.patch_seg)
            if seg is None:
                seg = np.load(self.path / self.version / it.patch_seg, mmap_mode="r", allow_pickle=False)
                self._patch_cache[it.patch_seg] = seg
            out[j] = seg[it.patch_row]
        return out

    def frames(self, ids: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Per id: ``(frame embeddings (T, D) float32, timestamps (T,))`` of a video, ``None`` for other items."""
        items = self.items(ids)
        out: list[tuple[np.ndarray, np.ndarray] | None] = []
        for i in ids:
            it = items.get(int(i))
            if it is None:
                raise KeyError(f"no item {i} in index {self.path}")
            if it.frame_seg is None:
                out.append(None)
                continue
            emb, ts = self._frame_segment(it.frame_seg)
            sl = slice(it.frame_start, it.frame_start + it.frame_count)
            out.append((np.asarray(emb[sl], dtype=np.float32), np.asarray(ts[sl], dtype=np.float32)))
        return out

    def frames_matrix(self, ids: Sequence[int], *, as_torch: bool = False):
        """All stored frames of ``ids`` in one gather: ``(E (sum T, D) float32, timestamps, offsets (n+1,))``.
        Items without frames (images, frame entries) contribute their own vector as a single frame with
        timestamp NaN (frame entries: their timestamp). ``as_torch`` returns E as a torch tensor, fp16
        as stored when possible (see ``frame_similarities``)."""
        import json

        spans = self.meta.frame_spans(ids)
        missing = [int(i) for i in ids if int(i) not in spans]
        if missing:
            raise KeyError(f"no item {missing[0]} in index {self.path}")
        info = [spans[int(i)] for i in ids]
        counts = np.array([c if seg is not None else 1 for seg, _, c, _ in info], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        segs = {seg for seg, _, _, _ in info if seg is not None}
        n = int(offsets[-1])

        def rows(sel):  # stored rows of the selected items, in order
            st = np.array([info[j][1] for j in sel], dtype=np.int64)
            ct = counts[sel]
            return np.repeat(st - np.concatenate([[0], np.cumsum(ct)[:-1]]), ct) + np.arange(int(ct.sum()))

        if len(segs) == 1 and all(seg is not None for seg, _, _, _ in info):
            # the common case (every candidate a video of one segment): one gather, stored fp16 kept
            emb, ts = self._frame_segment(next(iter(segs)))
            src = rows(np.arange(len(ids)))
            E16 = torch.from_numpy(np.ascontiguousarray(emb[src]))
            return (E16 if as_torch else E16.float().numpy()), np.asarray(ts[src]), offsets
        E = np.empty((n, self.dim), np.float32)
        T = np.full(n, np.nan, np.float32)
        for seg in segs:
            sel = np.array([j for j, (s_, _, _, _) in enumerate(info) if s_ == seg])
            emb, ts = self._frame_segment(seg)
            src = rows(sel)
            dst = np.concatenate([np.arange(offsets[j], offsets[j + 1]) for j in sel])
            E[dst] = torch.from_numpy(np.ascontiguousarray(emb[src])).float().numpy()
            T[dst] = ts[src]
        rest = [j for j, (s_, _, _, _) in enumerate(info) if s_ is None]
        if rest:
            E[offsets[rest]] = self.vectors([int(ids[j]) for j in rest])
            for j in rest:
                t = (json.loads(info[j][3]) if info[j][3] else {}).get("timestamp")
                if t is not None:
                    T[offsets[j]] = float(t)
        return (torch.from_numpy(E) if as_torch else E), T, offsets

    @staticmethod
    def frame_similarities(E, q: np.ndarray, chunk: int = 1024) -> np.ndarray:
        """``E @ q`` for a torch frame matrix (fp16 or fp32), converted to fp32 chunk by chunk so each
        chunk stays in cache; done in torch, since mixing numpy's BLAS threads with torch's right after a
        torch op was measured 3x slower on 2 cores. 100 videos x 32 frames x 512-d: about 1.2 ms."""
        qt = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
        out = torch.empty(len(E), dtype=torch.float32)
        for s in range(0, len(E), chunk):
            out[s : s + chunk] = E[s : s + chunk].float() @ qt
        return out.numpy()

    def _frame_segment(self, name: str):
        seg = self._patch_cache.get(name)
        if seg is None:
            vdir = self.path / self.version
            seg = (np.load(vdir / name, mmap_mode="r", allow_pickle=False),
                   np.load(vdir / name.replace(".npy", ".ts.npy"), allow_pickle=False))
            self._patch_cache[name] = seg
        return seg

    # ---- search ----------------------------------------------------------------------------------
    def search_vectors(
        self,
        queries: np.ndarray,
        k: int = 10,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
        exclude: Sequence[int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search. ``queries`` (n, d) float32 -> (scores (n, k), ids (n, k)); missing slots have id -1."""
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if q.ndim == 1:
            q = q[None]
        if q.shape[1] != self.dim:
            raise ValueError(f"expected query dim {self.dim}, got {q.shape[1]}")
        if not self.faiss.ntotal:  # nothing stored (an untrained IVF would even refuse to search)
            return np.full((len(q), max(1, int(k))), -np.inf, np.float32), np.full((len(q), max(1, int(k))), -1, np.int64)
        k = max(1, min(int(k), int(self.faiss.ntotal)))
        excl = list(self._tombstones) + [int(i) for i in (exclude or [])]
        nprobe, ef_search = nprobe or self.nprobe, ef_search or self.ef_search
        if self.search_device == "cuda":
            return self.gpu_searcher().search(q, k, exclude=excl, nprobe=nprobe)
        if BlasFlatScanner.worth_it(self.faiss, len(q)):  # few queries on a Flat index: one BLAS pass (flatscan.py)
            if self._blas_scanner is None:
                self._blas_scanner = BlasFlatScanner(self.faiss)
            return self._blas_scanner.search(q, k, exclude=excl)
        params = store.search_params(self.faiss, exclude=excl, nprobe=nprobe, ef_search=ef_search)
        if params is None:
            return self.faiss.search(q, k)
        return self.faiss.search(q, k, params=params)

    def gpu_searcher(self):
        """The GPU searcher of this snapshot (built on first use: the vectors are copied once)."""
        if self._gpu_searcher is None:
            from mmretrieve.index.gpu import make_gpu_searcher

            t = time.perf_counter()
            self._gpu_searcher = make_gpu_searcher(self.faiss, "cuda")
            log.info("%s: %d vectors on the GPU (%s back end) in %.2f s", self.name, self.faiss.ntotal,
                     self._gpu_searcher.backend, time.perf_counter() - t)
        return self._gpu_searcher

    def search_by_vector(self, vector: np.ndarray, k: int = 10, **kw) -> SearchResults:
        """Search with a precomputed embedding (no encoder involved); results carry metadata."""
        t0 = time.perf_counter()
        D, I = self.search_vectors(vector, k, **kw)
        ids, scores = _valid(I[0], D[0])
        t1 = time.perf_counter()
        return self.hydrate({"kind": "vector"}, ids, scores, stages={"coarse": ids}, timings={"coarse": (t1 - t0) * 1000})

    def exact_vectors(self) -> bool:
        """Whether ``vectors()`` returns the stored embeddings exactly (Flat, HNSW-Flat)."""
        import faiss

        inner = store.inner_index(self.faiss)
        return isinstance(inner, faiss.IndexFlat) or (hasattr(inner, "hnsw") and isinstance(faiss.downcast_index(inner.storage), faiss.IndexFlat))

    def encode_query(self, query: Query) -> dict[str, np.ndarray]:
        """{'image': (d,), 'text': (d,)} for the sides the query has. A list of texts is averaged
        (normalised); an image or video already in the index (``query.image_id``) reuses its stored
        embedding; a query video is sampled like indexed videos and its frame embeddings pooled.
        Memoised on the query, so rerankers get the same vectors without encoding again."""
        memo = query.cache.get(("vectors", self.encoder_name))
        if memo is not None:
            return memo
        enc = self.encoder
        out = {}
        if query.text is not None:
            texts = query.text if isinstance(query.text, list) else [query.text]
            t = enc.encode_texts(texts).mean(0)
            out["text"] = (t / max(float(np.linalg.norm(t)), 1e-12)).astype(np.float32)
        if query.image_id is not None and self.exact_vectors():
            out["image"] = self.vectors([query.image_id])[0]
        elif query.image is not None:
            out["image"] = enc.encode_images([query.image])[0]
        elif query.video is not None:
            out["image"] = self.encode_video(query.video)
        query.cache[("vectors", self.encoder_name)] = out
        return out

    def encode_video(self, path) -> np.ndarray:
        """A video's vector, sampled and pooled as this index's videos were (in-process, no timeout)."""
        from mmretrieve.media.video_ingest import (
            decode_video,
            encode_frames,
            pool_video,
            resolve_video_config,
        )

        cfg = resolve_video_config(self.manifest.get("video"))
        res = decode_video(str(path), transform=self.encoder.image_transform, sampling=cfg)
        emb = encode_frames(self.encoder, res["frames"], self.encoder.batch_size)
        return pool_video(emb, cfg["pooling"])

    def query_vector(self, query: Query) -> np.ndarray:
        """The single query vector (vector fusions applied; ``intersection`` falls back to ``sum``), used
        by rerankers that score items against the query (e.g. video frames)."""
        vecs = self.encode_query(query)
        if "image" in vecs and "text" in vecs:
            fusion = query.fusion if query.fusion != "intersection" else "sum"
            return FUSIONS.get(fusion)(vecs["image"], vecs["text"], **{k: v for k, v in query.options.items() if k == "weight"})
        return vecs.get("image", vecs.get("text"))

    def coarse(
        self,
        query: Query,
        k: int,
        *,
        exclude: Sequence[int] | None = None,
        k1: int | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The coarse stage: (ids, scores) of the top ``k`` for ``query`` (fusion applied)."""
        fusion = query.fusion if query.kind.startswith("composed") else None
        return self.coarse_from_vectors(
            self.encode_query(query), fusion, k, options=query.options, exclude=exclude, k1=k1, nprobe=nprobe, ef_search=ef_search
        )

    def coarse_from_vectors(
        self,
        vecs: dict[str, np.ndarray],
        fusion: str | None,
        k: int,
        *,
        options: dict | None = None,
        exclude: Sequence[int] | None = None,
        k1: int | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The coarse stage from already-encoded query sides (``fusion=None``: a single side)."""
        options = options or {}
        kw = dict(nprobe=nprobe, ef_search=ef_search, exclude=exclude)
        if fusion is None:
            v = vecs.get("image", vecs.get("text"))
            D, I = self.search_vectors(v, k, **kw)
            return _valid(I[0], D[0])
        if fusion != "intersection":
            v = FUSIONS.get(fusion)(vecs["image"], vecs["text"], **options)
            D, I = self.search_vectors(v, k, **kw)
            return _valid(I[0], D[0])
        k1 = int(options.get("k1", k1 or max(4 * k, 100)))
        Di, Ii = self.search_vectors(vecs["image"], k1, **kw)
        Dt, It = self.search_vectors(vecs["text"], k1, **kw)
        union = np.unique(np.concatenate([Ii[0][Ii[0] >= 0], It[0][It[0] >= 0]]))
        if not len(union):
            return union.astype(np.int64), np.zeros(0, np.float32)
        V = self.vectors(union)
        s = intersection_scores(V @ vecs["image"], V @ vecs["text"], mode=options.get("mode", "min"))
        order = np.argsort(-s, kind="stable")[:k]
        return union[order], s[order].astype(np.float32)

    def search(
        self,
        query: Query | None = None,
        *,
        text: str | None = None,
        image=None,
        fusion: str | None = None,
        k: int = 10,
        exclude: Sequence[int | str] | None = None,
        exclude_reference: bool = True,
        pipeline=None,
        **options: Any,
    ) -> SearchResults:
        """Search by text, image, or both (composed). Returns ``SearchResults`` (best first).

        ``exclude_reference``: for composed queries whose reference image is itself in the index, leave
        it out of the results (what composed retrieval asks for). ``pipeline``: a ``Pipeline`` of
        rerankers (or a preset name / spec list); without one, only the coarse stage runs. ``fusion``
        defaults to the pipeline's coarse fusion (e.g. SETR's intersection), else ``sum``.
        """
        from mmretrieve.rerank.pipeline import as_pipeline

        pipe = as_pipeline(pipeline) if pipeline is not None else None
        if query is None:
            fusion = fusion or (pipe.coarse_fusion if pipe is not None else None) or "sum"
            query = Query(text=text, image=image, fusion=fusion, options=dict(options))
        if query.kind.startswith("composed"):
            FUSIONS.get(query.fusion)  # unknown fusion -> clear error before any work
        excl = [self._as_id(e) for e in (exclude or [])]
        ref_path = query.image_path or (str(query.video) if query.video is not None else None)
        if query.image_id is None and ref_path:
            try:
                query.image_id = self.get(ref_path).id
            except KeyError:
                pass
        if exclude_reference and query.kind.startswith("composed") and query.image_id is not None:
            excl.append(query.image_id)
        if pipe is not None:
            return pipe.run(self, query, k=k, exclude=excl)
        t0 = time.perf_counter()
        ids, scores = self.coarse(query, k, exclude=excl)
        t1 = time.perf_counter()
        return self.hydrate(query.describe(), ids, scores, stages={"coarse": ids}, timings={"coarse": (t1 - t0) * 1000})

    def hydrate(self, query: dict, ids, scores, *, stages: dict[str, Sequence[int]], stage_scores=None, extra=None, timings=None) -> SearchResults:
        """Attach metadata to ranked ids (the last step of every search path)."""
        ids = np.asarray(ids).tolist()
        scores = np.asarray(scores, dtype=np.float64).tolist()
        items = self.items(ids)
        stage_rank = {s: {int(i): r for r, i in enumerate(np.asarray(lst).tolist(), 1)} for s, lst in stages.items()}
        stage_scores = stage_scores or {}
        extra = extra or {}
        hits = []
        for r, (i, sc) in enumerate(zip(ids, scores), 1):
            it = items.get(i)
            if it is None:
                continue
            hits.append(
                Hit(
                    id=i, key=it.key, uri=it.uri, score=sc, rank=r, kind=it.kind, caption=it.caption,
                    stage_ranks={s: m[i] for s, m in stage_rank.items() if i in m},
                    stage_scores={s: float(v[i]) for s, v in stage_scores.items() if i in v},
                    extra=extra.get(i, {}),
                )
            )
        return SearchResults(hits=hits, query=query, stages=list(stages), timings_ms=timings or {})

    def _as_id(self, e: int | str) -> int:
        return int(e) if isinstance(e, (int, np.integer)) else self.get(e).id

    # ---- writing ---------------------------------------------------------------------------------
    def add(self, source, **kw) -> IngestReport:
        """Add new or changed files from ``source`` (folder or manifest); returns the report."""
        return add_to_index(self.path, source, encoder=self._encoder, **kw)

    def remove(self, keys_or_ids: Sequence[int | str]) -> int:
        return remove_from_index(self.path, keys_or_ids)


def resolve_search_device(device: str | None, findex) -> str:
    """``auto`` -> ``cuda`` when a GPU back end can search ``findex`` here, else ``cpu``."""
    from mmretrieve.index.gpu import SEARCH_DEVICES, gpu_search_possible

    if device in (None, "auto"):  # the environment overrides the default, an explicit choice overrides both
        device = os.environ.get("MMRETRIEVE_SEARCH_DEVICE") or "auto"
    device = device.lower()
    if device not in SEARCH_DEVICES:
        raise ValueError(f"unknown search device {device!r}; expected one of {', '.join(SEARCH_DEVICES)}")
    if device == "auto":
        return "cuda" if gpu_search_possible(findex) else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("search device 'cuda' requested but CUDA is not available on this machine")
    return device


def _valid(ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = ids >= 0
    return ids[m], scores[m]


# ---- module-level front doors --------------------------------------------------------------------
def open_index(name_or_path: str | os.PathLike, **kw) -> Index:
    """Open a named index (under the indexes home) or an index directory. See ``Index.open``."""
    return Index.open(name_or_path, **kw)


def build_index(
    name_or_path: str | os.PathLike,
    source: str | os.PathLike,
    *,
    encoder: Encoder | str = DEFAULT_ENCODER,
    index_dir: str | os.PathLike | None = None,
    factory: str = store.DEFAULT_FACTORY,
    patches: bool | dict = False,
    video: dict | None = None,
    overwrite: bool = False,
    batch_size: int | None = None,
    workers: int | None = None,
    on_bad_vectors: str = "error",
    strict: bool = False,
) -> IngestReport:
    """Index every image and video of ``source`` (a folder, recursively, or a CSV/JSONL manifest).

    ``patches``: ``True`` stores the encoder's native patch grid (fp16) for the EMD reranker, or a dict
    ``{"grid": 4, "dim": 256}`` to pool the grid / project the features to fewer dimensions.
    ``video``: frame sampling and storage of videos, e.g. ``{"num_frames": 16}``, ``{"fps": 1,
    "max_frames": 64}``, ``{"frame_entries": True}`` (see ``mmretrieve.media.video_ingest.VIDEO_DEFAULTS``).
    """
    from mmretrieve.media.video_ingest import resolve_video_config

    t0 = time.perf_counter()
    scan = scan_source(source)  # a wrong source is reported before any model is loaded
    enc = create_encoder(encoder) if isinstance(encoder, str) else encoder
    path = resolve_index_path(name_or_path, index_dir)
    pcfg = _patch_config(enc, patches)
    vcfg = resolve_video_config(video)
    report = IngestReport(scanned=len(scan.items) + len(scan.missing), ignored=scan.ignored, index_path=str(path))
    writer = IndexWriter(path, encoder_info=enc.info.to_dict(), factory=factory, patches=pcfg, video=vcfg, create=True,
                         overwrite=overwrite)
    _ingest_and_commit(writer, lambda: scan.items, scan.missing, enc, report, batch_size=batch_size, workers=workers,
                       on_bad_vectors=on_bad_vectors, strict=strict, t0=t0)
    log.info("built %s: %s", path, report.summary())
    return report


def add_to_index(
    name_or_path: str | os.PathLike,
    source: str | os.PathLike,
    *,
    encoder: Encoder | str | None = None,
    index_dir: str | os.PathLike | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    on_bad_vectors: str = "error",
    strict: bool = False,
) -> IngestReport:
    """Encode only the new or changed files of ``source`` and publish a new version."""
    path = resolve_index_path(name_or_path, index_dir)
    manifest = read_manifest(path)
    t0 = time.perf_counter()
    scan = scan_source(source)  # a wrong source is reported before any model is loaded
    if encoder is None:
        encoder = manifest["encoder"]["name"]
    enc = create_encoder(encoder) if isinstance(encoder, str) else encoder
    check_encoder_compat(manifest["encoder"], enc.info.to_dict(), path)
    report = IngestReport(scanned=len(scan.items) + len(scan.missing), ignored=scan.ignored, index_path=str(path))
    writer = IndexWriter(path, encoder_info=enc.info.to_dict())
    _ingest_and_commit(
        writer, lambda: select_changed(scan.items, writer.meta.fingerprints(), writer.meta.skipped_fingerprints(), report),
        scan.missing, enc, report, batch_size=batch_size, workers=workers, on_bad_vectors=on_bad_vectors, strict=strict, t0=t0,
    )
    return report


def _ingest_and_commit(writer: IndexWriter, todo, missing_files, enc, report: IngestReport, *, batch_size, workers,
                       on_bad_vectors, strict: bool, t0: float) -> None:
    """The shared tail of build and add: record missing files, ingest, publish (or abort on any error,
    and in strict mode on any skipped input)."""
    try:
        items = todo()
        missing = [_missing(it) for it in missing_files]
        writer.record_skipped(missing)
        report.skipped.extend(missing)
        ingest(writer, items, enc, report, batch_size=batch_size, workers=workers, on_bad_vectors=on_bad_vectors)
        if strict and report.skipped:
            raise SkippedInputsError(report)
        # an indexed item whose file is now broken or gone no longer stands for what is on disk
        stale = [writer.meta.item_by_key(s.key) for s in report.skipped]
        stale_ids = [it.id for it in stale if it is not None]
        if stale_ids:
            report.stale_removed = _remove_items(writer, stale_ids)
        manifest = writer.commit()
    except BaseException:
        writer.abort()
        raise
    report.version = manifest["version"]
    report.seconds = time.perf_counter() - t0


def remove_from_index(
    name_or_path: str | os.PathLike, keys_or_ids: Sequence[int | str], *, index_dir: str | os.PathLike | None = None
) -> int:
    """Remove items by id, key, or file path; publishes a new version. Returns the number removed."""
    path = resolve_index_path(name_or_path, index_dir)
    writer = IndexWriter(path)
    try:
        ids = []
        for k in keys_or_ids:
            ids.append(_resolve_id(writer.meta, k, path))
        n = _remove_items(writer, ids)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return n


def _remove_items(writer: IndexWriter, ids: list[int]) -> int:
    """Remove items (a video takes its frame entries along); returns how many of ``ids`` were removed."""
    videos = [it.key for it in writer.meta.items_by_ids(ids).values() if it.kind == "video"]
    frame_ids = [i for i in writer.meta.frame_item_ids(videos) if i not in set(ids)]
    return writer.remove(ids + frame_ids) - len(frame_ids)


def _resolve_id(meta: MetaDB, k: int | str, path: Path) -> int:
    """An int is an id; a string is ``id:N``, ``key:K``, a key, a number (an id), or a file path. A bare
    number that is the key of one item and the id of another is refused as ambiguous."""
    if isinstance(k, (int, np.integer)):
        return int(k)
    s = str(k)
    if s.startswith("id:") and s[3:].lstrip("-").isdigit():
        it = meta.items_by_ids([int(s[3:])]).get(int(s[3:]))
        if it is None:
            raise KeyError(f"no item with id {s[3:]} in index {path}")
        return it.id
    if s.startswith("key:"):
        it = meta.item_by_key(s[4:])
        if it is None:
            raise KeyError(f"no item with key {s[4:]!r} in index {path}")
        return it.id
    it = meta.item_by_key(s)
    if s.lstrip("-").isdigit():
        by_id = meta.items_by_ids([int(s)]).get(int(s))
        if it is not None and by_id is not None and by_id.id != it.id:
            raise KeyError(f"{s!r} is the key of item {it.id} ({it.uri}) and the id of item {by_id.id} ({by_id.uri}) "
                           f"in index {path}: write id:{s} or key:{s}")
        it = it or by_id
    if it is None:
        it = next(iter(meta.items_by_uri(s)), None)
    if it is None:
        r = str(Path(s).expanduser().resolve())
        it = meta.item_by_key(r) or next(iter(meta.items_by_uri(r)), None)
    if it is None:
        raise KeyError(f"no item {s!r} in index {path} (give an id, a key or a file path)")
    return it.id


def _missing(it) -> Skipped:
    return Skipped(it.key, it.uri, "file not found", None, None)


def _patch_config(enc: Encoder, patches: bool | dict) -> dict | None:
    if not patches:
        return None
    if enc.patch_grid is None or enc.patch_dim is None:
        raise ValueError(f"encoder {enc.name!r} has no patch features; build without --patches")
    cfg = dict(patches) if isinstance(patches, dict) else {}
    grid = int(cfg.get("grid") or enc.patch_grid)
    if grid > enc.patch_grid:
        raise ValueError(f"patch grid {grid} is finer than the encoder's native {enc.patch_grid}x{enc.patch_grid}")
    dim = int(cfg.get("dim") or enc.patch_dim)
    if dim > enc.patch_dim:
        raise ValueError(f"patch dim {dim} exceeds the encoder's {enc.patch_dim}")
    out = {"grid": grid, "dim": dim, "native_dim": enc.patch_dim, "dtype": "float16", "projection": None}
    if dim < enc.patch_dim:
        out.update(projection="patch_proj.npy", seed=int(cfg.get("seed", 0)))
    return out


__all__ = ["SkippedInputsError", "Index", "open_index", "build_index", "add_to_index", "remove_from_index", "EncoderMismatchError"]
