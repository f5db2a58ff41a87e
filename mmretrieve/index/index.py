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

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmretrieve.errors import IndexCorruptedError, ItemNotFoundError, NoPatchesError
from mmretrieve.index import search as _search
from mmretrieve.index.vectors import VectorIndex
from mmretrieve.query import Query
from mmretrieve.results import SearchResults
from mmretrieve.store import faiss_ops
from mmretrieve.store.layout import check_encoder_compat, read_manifest, resolve_index_path, verify_files
from mmretrieve.store.meta import Item, MetaDB, resolve_item
from mmretrieve.store.sidestores import load_projection, timestamps_file

log = logging.getLogger(__name__)


class Index:
    """A read-only snapshot of one version of an index."""

    def __init__(self, path: Path, manifest: dict, faiss_index, meta: MetaDB, encoder=None, *,
                 search_device: str | None = "auto", nprobe: int | None = None, ef_search: int | None = None) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.meta = meta
        self.vector_index = VectorIndex(faiss_index, tombstones=meta.tombstones(), search_device=search_device,
                                        nprobe=nprobe, ef_search=ef_search, name=self.path.name)
        self._encoder = None
        self._side_cache: dict[str, Any] = {}
        if encoder is not None:
            self.encoder = encoder

    # ---- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, name_or_path: str | os.PathLike, *, index_dir: str | os.PathLike | None = None, encoder=None,
             verify: bool = True, mmap: bool = False, search_device: str | None = "auto", nprobe: int | None = None,
             ef_search: int | None = None) -> Index:
        """Open the live version. ``verify`` checks sha256s; ``mmap`` memory-maps the FAISS index (Flat).

        ``search_device``: ``auto`` searches on the GPU when CUDA is present and the index can be searched
        there (faiss-gpu, or the torch exact scan for Flat indexes), else on the CPU; ``cpu`` / ``cuda``
        force one (``cuda`` fails with the reason when it cannot). ``$MMRETRIEVE_SEARCH_DEVICE`` sets the
        default. ``nprobe`` / ``ef_search``: the IVF / HNSW search breadth of every search of this
        snapshot (IVF default: min(nlist, 32) lists). ``encoder``: the query encoder (a name or an
        ``Encoder``; default: the one that built the index, created on first use).
        """
        path = resolve_index_path(name_or_path, index_dir)
        manifest = read_manifest(path)
        vdir = path / manifest["version"]
        verify_files(vdir, manifest, check=verify)
        findex = faiss_ops.read_faiss(vdir / "index.faiss", mmap=mmap)
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
            from mmretrieve.encoders import create_encoder

            idx.encoder = create_encoder(encoder) if isinstance(encoder, str) else encoder
        return idx

    def reopen(self) -> Index:
        """The latest committed version (this object keeps its snapshot)."""
        v = self.vector_index
        return Index.open(self.path, encoder=self._encoder, search_device=v.search_device, nprobe=v.nprobe,
                          ef_search=v.ef_search)

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

    @property
    def faiss(self):
        """The snapshot's FAISS index (read-only)."""
        return self.vector_index.faiss

    @property
    def search_device(self) -> str:
        return self.vector_index.search_device

    @property
    def nprobe(self) -> int | None:
        return self.vector_index.nprobe

    def __len__(self) -> int:
        return int(self.manifest["counts"]["items"])

    @property
    def encoder(self):
        if self._encoder is None:
            from mmretrieve.encoders import create_encoder

            self.encoder = create_encoder(self.encoder_name)
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
            "counts": m["counts"],
            "patches": m.get("patches"),
            "video": m.get("video"),
            "bytes": sum(f["bytes"] for f in m["files"].values()),
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
    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """Stored embeddings of ``ids`` (exact for Flat/HNSW; IVF-PQ returns its lossy reconstruction)."""
        return self.vector_index.reconstruct(ids)

    def exact_vectors(self) -> bool:
        """Whether ``vectors()`` returns the stored embeddings exactly (Flat, HNSW-Flat)."""
        return self.vector_index.exact()

    def has_patches(self) -> bool:
        return bool(self.manifest.get("patches"))

    def patch_projection(self) -> np.ndarray | None:
        """The fixed projection patch features were stored through (``patches={"dim": D}``), or None."""
        return load_projection(self.path / self.version, self.manifest.get("patches"))

    def patches(self, ids: Sequence[int]) -> np.ndarray:
        """(n, P, Dp) float32 patch features of ``ids`` from the side-store."""
        if not self.has_patches():
            raise NoPatchesError(f"index {self.path} has no patch store (build it with --patches)")
        items = self.items(ids)
        pc = self.manifest["patches"]
        out = np.zeros((len(ids), int(pc["grid"]) ** 2, int(pc["dim"])), np.float32)
        for j, i in enumerate(ids):
            it = items.get(int(i))
            if it is None or it.patch_seg is None:
                raise NoPatchesError(f"item {i} has no stored patches")
            out[j] = self._side_file(it.patch_seg)[it.patch_row]
        return out

    def frames(self, ids: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Per id: ``(frame embeddings (T, D) float32, timestamps (T,))`` of a video, ``None`` for other items."""
        items = self.items(ids)
        out: list[tuple[np.ndarray, np.ndarray] | None] = []
        for i in ids:
            it = items.get(int(i))
            if it is None:
                raise ItemNotFoundError(f"no item {i} in index {self.path}")
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
        import torch

        spans = self.meta.frame_spans(ids)
        missing = [int(i) for i in ids if int(i) not in spans]
        if missing:
            raise ItemNotFoundError(f"no item {missing[0]} in index {self.path}")
        info = [spans[int(i)] for i in ids]
        counts = np.array([c if seg is not None else 1 for seg, _, c, _ in info], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        segs = {seg for seg, _, _, _ in info if seg is not None}

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
        n = int(offsets[-1])
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
        import torch

        qt = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
        out = torch.empty(len(E), dtype=torch.float32)
        for s in range(0, len(E), chunk):
            out[s : s + chunk] = E[s : s + chunk].float() @ qt
        return out.numpy()

    def _side_file(self, name: str, *, mmap: bool = True):
        arr = self._side_cache.get(name)
        if arr is None:
            arr = np.load(self.path / self.version / name, mmap_mode="r" if mmap else None, allow_pickle=False)
            self._side_cache[name] = arr
        return arr

    def _frame_segment(self, name: str):
        return self._side_file(name), self._side_file(timestamps_file(name), mmap=False)

    # ---- search (see mmretrieve.index.search) ----------------------------------------------------
    def search_vectors(self, queries: np.ndarray, k: int = 10, *, nprobe: int | None = None,
                       ef_search: int | None = None, exclude: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``queries`` (n, d) float32 -> (scores (n, k), ids (n, k)); missing slots have id -1."""
        return self.vector_index.search(queries, k, nprobe=nprobe, ef_search=ef_search, exclude=exclude)

    def gpu_searcher(self):
        return self.vector_index.gpu_searcher()

    def search(self, query: Query | None = None, *, text=None, image=None, video=None, fusion: str | None = None,
               k: int = 10, exclude: Sequence[int | str] | None = None, exclude_reference: bool = True,
               pipeline=None, **options: Any) -> SearchResults:
        """Search by text, image (or video), or both (composed). Returns ``SearchResults`` (best first).

        ``fusion`` and its ``options`` (``weight``; ``k1``, ``mode``) say how a composed query is searched
        (default: the pipeline's coarse fusion, else ``sum``); unknown options are refused.
        ``exclude_reference``: for composed queries whose reference image is itself in the index, leave
        it out of the results (what composed retrieval asks for). ``pipeline``: a ``Pipeline`` of
        rerankers (or a preset name / spec string / list); without one, only the coarse stage runs.
        """
        return _search.search(self, query, text=text, image=image, video=video, fusion=fusion, k=k, exclude=exclude,
                              exclude_reference=exclude_reference, pipeline=pipeline, **options)

    def search_by_vector(self, vector: np.ndarray, k: int = 10, **kw) -> SearchResults:
        """Search with a precomputed embedding (no encoder involved); results carry metadata."""
        return _search.search_by_vector(self, vector, k, **kw)

    def coarse(self, query: Query, k: int, *, exclude=None, k1=None, nprobe=None, ef_search=None):
        """The coarse stage: (ids, scores) of the top ``k`` for ``query`` (its fusion applied)."""
        return _search.coarse(self, query, k, exclude=exclude, k1=k1, nprobe=nprobe, ef_search=ef_search)

    def coarse_from_vectors(self, vecs: dict[str, np.ndarray], fusion, k: int, **kw):
        """The coarse stage from already-encoded query sides (``fusion=None``: a single side)."""
        return _search.coarse_from_vectors(self, vecs, fusion, k, **kw)

    def encode_query(self, query: Query) -> dict[str, np.ndarray]:
        return _search.encode_query(self, query)

    def query_vector(self, query: Query) -> np.ndarray:
        return _search.query_vector(self, query)

    def encode_video(self, path) -> np.ndarray:
        """A video's vector, sampled and pooled as this index's videos were (in-process, no timeout)."""
        from mmretrieve.encoders.video import encode_video

        return encode_video(self.encoder, path, self.manifest.get("video"))

    def hydrate(self, query: dict, ids, scores, **kw) -> SearchResults:
        return _search.hydrate(self, query, ids, scores, **kw)


def open_index(name_or_path: str | os.PathLike, **kw) -> Index:
    """Open a named index (under the indexes home) or an index directory. See ``Index.open``."""
    return Index.open(name_or_path, **kw)


__all__ = ["Index", "open_index"]
