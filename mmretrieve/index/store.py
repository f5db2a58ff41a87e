"""The on-disk index store: versioned, atomic, checksummed, no pickle.

A named index is a directory::

    manifest.json      the live version, encoder (name, dim, identity), metric, FAISS factory, counts,
                       sha256 + size of every file of the live version, format version
    v000N/index.faiss  FAISS IndexIDMap2 around the factory index: external ids stay stable under delete
    v000N/meta.sqlite  items (id, key, uri, kind, size, mtime, caption, ...), skipped inputs, tombstones
    v000N/patches-*.npy   optional fp16 patch features (rows referenced from meta), memory-mapped
    .lock              single-writer lock (flock)

A write builds ``v000{N+1}`` aside (unchanged patch segments are hard-linked, not copied), fsyncs it, and
only then swaps ``manifest.json`` with ``os.replace``. A crash at any point leaves the previous version
loadable; stray version folders and temp files are ignored by readers and removed by the next write.
Opening verifies every file's sha256 against the manifest (``verify=False`` skips it), checks that FAISS'
``ntotal`` equals the metadata's item + tombstone count, and refuses a query encoder that differs from
the one that built the index.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmretrieve.index.meta import Item, MetaDB, Skipped

log = logging.getLogger(__name__)

FORMAT = "mmretrieve-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_FACTORY = "Flat"
_VERSION_RE = re.compile(r"^v(\d{4,})$")


class IndexError_(RuntimeError):  # noqa: N801 - avoid shadowing the builtin IndexError
    """Base class of index store errors."""


class IndexNotFoundError(IndexError_, FileNotFoundError):
    pass


class IndexExistsError(IndexError_, FileExistsError):
    pass


class IndexCorruptedError(IndexError_):
    pass


class IndexLockedError(IndexError_):
    pass


class EncoderMismatchError(IndexError_, ValueError):
    pass


# Tests set this to a callable(stage) to simulate a crash between the steps of a write.
_CRASH_HOOK = None


def _crash_point(stage: str) -> None:
    if _CRASH_HOOK is not None:
        _CRASH_HOOK(stage)


# ---- paths ---------------------------------------------------------------------------------------
def default_index_dir() -> Path:
    return Path(os.environ.get("MMRETRIEVE_INDEX_DIR") or "indexes")


def resolve_index_path(name_or_path: str | os.PathLike, index_dir: str | os.PathLike | None = None) -> Path:
    """A bare name lives under the indexes home (``--index-dir``, ``$MMRETRIEVE_INDEX_DIR``, ``./indexes``);
    anything with a path separator, or an existing directory, is a path."""
    s = str(name_or_path)
    if not s:
        raise ValueError("empty index name")
    if os.sep in s or "/" in s or s.startswith(".") or (Path(s).is_dir() and (Path(s) / MANIFEST).is_file()):
        return Path(s)
    if not re.match(r"^[A-Za-z0-9_.\-]+$", s):
        raise ValueError(f"index name {s!r} may contain only letters, digits, '_', '-' and '.'")
    return (Path(index_dir) if index_dir else default_index_dir()) / s


# ---- small io helpers ------------------------------------------------------------------------------
def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    _crash_point("before-manifest-replace")
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    if not mpath.is_file():
        if path.is_dir():
            raise IndexNotFoundError(f"{path} is not an mmretrieve index (no {MANIFEST})")
        raise IndexNotFoundError(f"index not found: {path}")
    try:
        with open(mpath, encoding="utf-8") as fh:
            m = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise IndexCorruptedError(f"{mpath}: unreadable manifest ({e})") from None
    if m.get("format") != FORMAT:
        raise IndexCorruptedError(f"{mpath}: not an mmretrieve manifest")
    if int(m.get("format_version", 0)) > FORMAT_VERSION:
        raise IndexCorruptedError(
            f"{mpath}: format version {m.get('format_version')} is newer than this mmretrieve understands ({FORMAT_VERSION})"
        )
    return m


def _faiss():
    import faiss

    return faiss


def _metric(metric: str):
    faiss = _faiss()
    if metric == "ip":
        return faiss.METRIC_INNER_PRODUCT
    if metric == "l2":
        return faiss.METRIC_L2
    raise ValueError(f"unknown metric {metric!r} (expected 'ip' or 'l2')")


def new_faiss_index(dim: int, factory: str = DEFAULT_FACTORY, metric: str = "ip"):
    """``IDMap2,<factory>``: stable external int64 ids around any FAISS factory string."""
    faiss = _faiss()
    factory = factory.strip()
    if factory.upper().startswith("IDMAP"):
        raise ValueError("give the factory without IDMap: mmretrieve always wraps it in IDMap2")
    try:
        index = faiss.index_factory(int(dim), f"IDMap2,{factory}", _metric(metric))
    except RuntimeError as e:
        raise ValueError(f"invalid FAISS factory string {factory!r}: {str(e).splitlines()[-1]}") from None
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


class IndexWriter:
    """Builds the next version of an index. Use via ``Index.writer(...)`` / ``build_index`` / ``add``.

    Everything is written into a fresh version folder and published by ``commit()``; on any exception
    the folder is dropped and the live version is untouched.
    """

    def __init__(
        self,
        path: Path,
        *,
        encoder_info: dict | None = None,
        factory: str = DEFAULT_FACTORY,
        metric: str = "ip",
        patches: dict | None = None,
        video: dict | None = None,
        create: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        self._lock_fh = None
        self._published = False
        if not create and not (self.path / MANIFEST).is_file():  # before anything is made there (no stray lock)
            raise IndexNotFoundError(f"index not found: {self.path}")
        self.path.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            self._setup(encoder_info, factory, metric, patches, create, overwrite)
            if video is not None:
                self.manifest["video"] = dict(video)
        except BaseException:
            self._release_lock()
            raise

    # ---- set-up ----------------------------------------------------------------------------------
    def _acquire_lock(self) -> None:
        import fcntl

        fh = open(self.path / ".lock", "a+")  # noqa: SIM115 - held for the writer's lifetime
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            fh.close()
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise IndexLockedError(f"index {self.path} is being written by another process") from None
            raise
        self._lock_fh = fh

    def _release_lock(self) -> None:
        if self._lock_fh is not None:
            import fcntl

            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def _setup(self, encoder_info, factory, metric, patches, create, overwrite) -> None:
        exists = (self.path / MANIFEST).is_file()
        if create and exists and not overwrite:
            raise IndexExistsError(
                f"index {self.path} already exists; use `mmretrieve index add` to update it or --overwrite to rebuild"
            )
        self._clean_strays()
        self.prev = read_manifest(self.path) if exists else None
        n = self._next_version_number()
        self.version = f"v{n:04d}"
        self.tmpdir = self.path / f".{self.version}.{uuid.uuid4().hex[:8]}.tmp"
        self.tmpdir.mkdir()
        fresh = self.prev is None or (create and overwrite)
        if fresh:
            if encoder_info is None:
                raise ValueError("creating an index needs the encoder's info")
            self.manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "created_at": time.time(),
                "encoder": dict(encoder_info),
                "metric": metric,
                "factory": factory,
                "patches": dict(patches) if patches else None,
            }
            self.index = new_faiss_index(encoder_info["dim"], factory, metric)
            self.meta = MetaDB.create(self.tmpdir / "meta.sqlite")
        else:
            prev_dir = self.path / self.prev["version"]
            verify_files(prev_dir, self.prev, check=True)
            self.manifest = {k: v for k, v in self.prev.items() if k not in ("files", "counts", "version", "previous")}
            if encoder_info is not None:
                check_encoder_compat(self.prev["encoder"], encoder_info, self.path)
            if patches and not self.manifest.get("patches"):
                self.manifest["patches"] = dict(patches)
            self.index = read_faiss(prev_dir / "index.faiss")
            self.meta = MetaDB.create(self.tmpdir / "meta.sqlite", copy_from=prev_dir / "meta.sqlite")
            # unchanged patch segments and side files are shared with the previous version
            for fname in self.prev.get("files", {}):
                if fname not in ("index.faiss", "meta.sqlite"):
                    _link_or_copy(prev_dir / fname, self.tmpdir / fname)
        self._removed_segments: set[str] = set()
        self._segment: np.memmap | None = None
        self._segment_name: str | None = None
        self._segment_rows = 0
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # buffered vectors while untrained
        self._frames: list[np.ndarray] = []  # per-frame embeddings of videos added in this write
        self._frame_ts: list[np.ndarray] = []
        self._frame_rows = 0
        self._frame_segment = f"frames-{self.version}.npy"

    def _clean_strays(self) -> None:
        live = None
        if (self.path / MANIFEST).is_file():
            try:
                m = read_manifest(self.path)
                live = {m.get("version"), m.get("previous")}
            except IndexCorruptedError:
                live = None
        for p in self.path.iterdir():
            if p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            elif live is not None and _VERSION_RE.match(p.name) and p.name not in live:
                shutil.rmtree(p, ignore_errors=True)

    def _next_version_number(self) -> int:
        nums = [int(m.group(1)) for p in self.path.iterdir() if (m := _VERSION_RE.match(p.name))]
        if self.prev is not None:
            nums.append(int(self.prev["version"][1:]))
        return max(nums, default=0) + 1

    # ---- changes ---------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.manifest["encoder"]["dim"])

    @property
    def patch_cfg(self) -> dict | None:
        return self.manifest.get("patches")

    @property
    def video_cfg(self) -> dict:
        from mmretrieve.media.video_ingest import resolve_video_config

        return resolve_video_config(self.manifest.get("video"))

    def begin_patch_segment(self, capacity: int, n_patches: int, patch_dim: int) -> None:
        """Open a new fp16 segment with room for ``capacity`` rows (unused rows simply stay unreferenced)."""
        from numpy.lib.format import open_memmap

        self._close_segment()
        existing = [f for f in os.listdir(self.tmpdir) if f.startswith("patches-")]
        self._segment_name = f"patches-{self.version}-{len(existing):03d}.npy"
        self._segment = open_memmap(
            self.tmpdir / self._segment_name, mode="w+", dtype=np.float16, shape=(max(capacity, 1), n_patches, patch_dim)
        )
        self._segment_rows = 0

    def _close_segment(self) -> None:
        """Flush the open segment, trimmed to the rows used (a segment is opened with room to spare)."""
        if self._segment is not None:
            seg, used = self._segment, self._segment_rows
            self._segment = None
            seg.flush()
            path = self.tmpdir / self._segment_name
            if used < seg.shape[0]:
                if used == 0:
                    del seg
                    path.unlink()
                else:
                    tmp = path.with_suffix(".trim.npy")
                    np.save(tmp, np.asarray(seg[:used]))
                    del seg
                    os.replace(tmp, path)
            else:
                del seg

    def add(
        self,
        items: Sequence[Item],
        vectors: np.ndarray,
        patches: np.ndarray | None = None,
        *,
        frames: Sequence[tuple[np.ndarray, np.ndarray] | None] | None = None,
        on_bad_vectors: str = "error",
    ) -> list[Item]:
        """Add (or replace, when ``item.key`` exists) items with their embeddings. Returns the stored items.

        ``frames``: per item, ``(frame embeddings (T, D), timestamps (T,))`` for videos (stored fp16 in the
        frame side-store) or ``None``. ``on_bad_vectors``: NaN/inf/zero-norm/wrong-length rows raise
        (``"error"``) or are dropped and recorded as skipped (``"drop"``).
        """
        vectors = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (n, {self.dim}), got {vectors.shape}")
        if len(items) != len(vectors):
            raise ValueError(f"{len(items)} items but {len(vectors)} vectors")
        norms = np.linalg.norm(vectors, axis=1)
        bad = ~np.isfinite(vectors).all(axis=1) | ~np.isfinite(norms) | (norms < 1e-6)
        if bad.any():
            idx = np.flatnonzero(bad)
            if on_bad_vectors != "drop":
                raise ValueError(
                    f"{len(idx)} embedding(s) are NaN, infinite or zero, e.g. for {items[idx[0]].uri}; "
                    "pass on_bad_vectors='drop' to skip them"
                )
            self.meta.record_skipped(Skipped(items[i].key, items[i].uri, "bad embedding (NaN, inf or zero norm)", items[i].size, items[i].mtime) for i in idx)
            keep = np.flatnonzero(~bad)
            items = [items[i] for i in keep]
            vectors = vectors[keep]
            patches = patches[keep] if patches is not None else None
            frames = [frames[i] for i in keep] if frames is not None else None
        if not len(items):
            return []
        keys = [it.key for it in items]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise ValueError(f"duplicate key {dup!r} in one add")
        # a changed item keeps its id where FAISS can delete; HNSW tombstones the old vector and re-ids it
        existing = {k: self.meta.item_by_key(k) for k in keys}
        replaced = [e.id for e in existing.values() if e is not None]
        reusable = self._drop_vectors(replaced) if replaced else True
        if not reusable:
            self.meta.delete_items(replaced)
        n_new = sum(1 for e in existing.values() if e is None or not reusable)
        new_ids = iter(self.meta.reserve_ids(n_new))
        now = time.time()
        stored = []
        for it in items:
            prev = existing[it.key]
            it.id = prev.id if (prev is not None and reusable) else next(new_ids)
            it.added_at = it.added_at or now
            stored.append(it)
        ids = np.array([it.id for it in stored], dtype=np.int64)
        if patches is not None:
            if self.patch_cfg is None:
                raise ValueError("this index has no patch store; build it with patches enabled")
            if self._segment is None or self._segment_rows + len(stored) > self._segment.shape[0]:
                self.begin_patch_segment(max(len(stored), 1024), patches.shape[1], patches.shape[2])
            rows = slice(self._segment_rows, self._segment_rows + len(stored))
            self._segment[rows] = patches.astype(np.float16)
            for j, it in enumerate(stored):
                it.patch_seg, it.patch_row = self._segment_name, self._segment_rows + j
            self._segment_rows += len(stored)
        if frames is not None:
            for it, fr in zip(stored, frames):
                if fr is None:
                    continue
                emb, ts = fr
                emb = np.asarray(emb, dtype=np.float32)
                if emb.ndim != 2 or emb.shape[1] != self.dim or len(ts) != len(emb):
                    raise ValueError(f"frames of {it.uri}: expected ({len(ts)}, {self.dim}) embeddings, got {emb.shape}")
                it.frame_seg, it.frame_start, it.frame_count = self._frame_segment, self._frame_rows, len(emb)
                self._frames.append(emb.astype(np.float16))
                self._frame_ts.append(np.asarray(ts, dtype=np.float32))
                self._frame_rows += len(emb)
        self.meta.upsert_items(stored)
        self._add_vectors(vectors, ids)
        return stored

    def _add_vectors(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if not self.index.is_trained:
            self._pending.append((vectors, ids))
            return
        self.index.add_with_ids(vectors, ids)

    def _flush_pending(self) -> None:
        if not self._pending:
            return
        vecs = np.concatenate([v for v, _ in self._pending])
        ids = np.concatenate([i for _, i in self._pending])
        self._pending.clear()
        if not self.index.is_trained:
            log.info("training FAISS index %s on %d vectors", self.manifest["factory"], len(vecs))
            try:
                self.index.train(vecs)
            except RuntimeError as e:
                raise ValueError(
                    f"FAISS factory {self.manifest['factory']!r} could not be trained on {len(vecs)} vectors: "
                    f"{str(e).strip().splitlines()[-1]}. Use fewer clusters / a smaller PQ, or 'Flat' for small collections"
                ) from None
        self.index.add_with_ids(vecs, ids)

    def _drop_vectors(self, ids: Sequence[int]) -> bool:
        """Delete vectors from FAISS; returns False when the index cannot delete correctly (HNSW, IVF) and the ids were
        tombstoned instead (filtered at search time, never reused)."""
        faiss = _faiss()
        arr = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
        self._flush_pending()
        if not supports_remove(self.index):
            self.meta.add_tombstones(arr.tolist())
            return False
        n = self.index.remove_ids(faiss.IDSelectorBatch(len(arr), faiss.swig_ptr(arr)))
        if n != len(arr):
            raise IndexCorruptedError(f"expected to remove {len(arr)} vectors, FAISS removed {n}")
        return True

    def remove(self, ids: Sequence[int]) -> int:
        """Remove items by id (their keys may be added again later, under new ids)."""
        ids = sorted({int(i) for i in ids})
        known = self.meta.items_by_ids(ids)
        missing = [i for i in ids if i not in known]
        if missing:
            raise KeyError(f"no item with id {missing[0]} in {self.path}")
        if ids:
            self._drop_vectors(ids)
            self.meta.delete_items(ids)
        return len(ids)

    def record_skipped(self, skipped: Sequence[Skipped]) -> None:
        self.meta.record_skipped(skipped)

    # ---- publish ----------------------------------------------------------------------------------
    def commit(self) -> dict:
        try:
            return self._commit()
        except BaseException:
            self.abort()
            raise
        finally:
            self._release_lock()

    def _commit(self) -> dict:
        self._flush_pending()
        self._close_segment()
        faiss = _faiss()
        n_items = self.meta.count()
        tomb = len(self.meta.tombstones())
        if self.index.ntotal != n_items + tomb:
            raise IndexCorruptedError(f"internal: FAISS has {self.index.ntotal} vectors, metadata {n_items} + {tomb} tombstones")
        counts = {
            "items": n_items,
            "images": self.meta.count("image"),
            "videos": self.meta.count("video"),
            "skipped": self.meta.count_skipped(),
            "tombstones": tomb,
            "ntotal": int(self.index.ntotal),
        }
        if self._frames:
            for arr, suffix in ((np.concatenate(self._frames), ".npy"), (np.concatenate(self._frame_ts), ".ts.npy")):
                with open(self.tmpdir / self._frame_segment.replace(".npy", suffix), "wb") as fh:
                    np.save(fh, arr, allow_pickle=False)
        # drop segments no live item references any more
        used = set(self.meta.patch_segments())
        for seg in self.meta.frame_segments():
            used |= {seg, seg.replace(".npy", ".ts.npy")}
        for f in os.listdir(self.tmpdir):
            if f.startswith(("patches-", "frames-")) and f not in used:
                os.unlink(self.tmpdir / f)
        _crash_point("before-index-write")
        faiss.write_index(self.index, str(self.tmpdir / "index.faiss"))
        _crash_point("after-index-write")
        self.meta.commit_and_close()
        _crash_point("after-meta-write")
        files = {}
        for f in sorted(os.listdir(self.tmpdir)):
            fp = self.tmpdir / f
            _fsync_file(fp)
            files[f] = {"sha256": sha256_file(fp), "bytes": fp.stat().st_size}
        _fsync_dir(self.tmpdir)
        final = self.path / self.version
        if final.exists():
            shutil.rmtree(final)
        _crash_point("before-version-rename")
        os.rename(self.tmpdir, final)
        _fsync_dir(self.path)
        self.manifest.update(
            {
                "version": self.version,
                "previous": self.prev["version"] if self.prev else None,
                "updated_at": time.time(),
                "counts": counts,
                "files": files,
                "faiss": type(inner_index(self.index)).__name__,
                "mmretrieve_version": _pkg_version(),
            }
        )
        _crash_point("before-manifest")
        _write_json_atomic(self.path / MANIFEST, self.manifest)
        self._published = True
        _crash_point("after-manifest")
        # keep the previous version for readers that opened it; drop older ones
        for p in self.path.iterdir():
            if _VERSION_RE.match(p.name) and p.name not in (self.version, self.manifest["previous"]):
                shutil.rmtree(p, ignore_errors=True)
        log.info("index %s: published %s (%d items)", self.path, self.version, n_items)
        return self.manifest

    def abort(self) -> None:
        if self._published:
            return
        with contextlib.suppress(Exception):
            self._close_segment()
        with contextlib.suppress(Exception):
            self.meta.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        self._release_lock()

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._published:
            self.commit()
        elif exc_type is not None:
            self.abort()


def _pkg_version() -> str:
    try:
        from importlib.metadata import version

        return version("mmretrieve")
    except Exception:
        return "unknown"


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def verify_files(vdir: Path, manifest: dict, *, check: bool) -> None:
    files = manifest.get("files") or {}
    for name in ("index.faiss", "meta.sqlite"):
        if name not in files:
            raise IndexCorruptedError(f"{vdir.parent / MANIFEST}: manifest lists no {name}")
    for name, info in files.items():
        fp = vdir / name
        if not fp.is_file():
            raise IndexCorruptedError(f"{fp}: missing (listed in the manifest of {manifest.get('version')})")
        size = fp.stat().st_size
        if size != info.get("bytes"):
            raise IndexCorruptedError(f"{fp}: size {size} bytes, manifest says {info.get('bytes')} (truncated or replaced?)")
        if check and sha256_file(fp) != info.get("sha256"):
            raise IndexCorruptedError(f"{fp}: sha256 does not match the manifest (file corrupted or modified)")


def read_faiss(path: Path, *, mmap: bool = False):
    faiss = _faiss()
    try:
        if mmap:
            return with_direct_map(faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY))
        return with_direct_map(faiss.read_index(str(path)))
    except RuntimeError as e:
        raise IndexCorruptedError(f"{path}: FAISS cannot read the index ({str(e).strip().splitlines()[-1]})") from None


def check_encoder_compat(built: dict, query: dict, where: Path | str) -> None:
    """Raise ``EncoderMismatchError`` naming the first field that differs."""
    bname, qname, bdim, qdim = built.get("name"), query.get("name"), built.get("dim"), query.get("dim")
    if bdim != qdim or bname != qname:
        msg = f"index {where} was built with encoder {bname!r} (dim {bdim}); the query encoder is {qname!r} (dim {qdim})"
        if bdim != qdim:
            msg += f": expected dim {bdim}, got {qdim}"
        raise EncoderMismatchError(msg)
    for field in sorted(set(built) | set(query)):
        if field in ("name", "dim", "modalities"):
            continue
        if built.get(field) != query.get(field):
            raise EncoderMismatchError(
                f"index {where} was built with {built.get('name')} {field}={built.get(field)!r}; "
                f"the query encoder has {field}={query.get(field)!r}"
            )


def describe_manifest(m: dict[str, Any]) -> str:
    c = m.get("counts", {})
    return (
        f"{m.get('encoder', {}).get('name')} dim {m.get('encoder', {}).get('dim')}, {m.get('factory')}, "
        f"{c.get('items', 0)} items ({c.get('skipped', 0)} skipped), version {m.get('version')}"
    )
