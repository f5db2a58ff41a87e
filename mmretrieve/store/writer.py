"""``IndexWriter``: builds the next version of an index aside and publishes it atomically.

See ``mmretrieve.store.layout`` for the layout and the guarantees.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mmretrieve.errors import (
    BadVectorsError,
    IndexCorruptedError,
    IndexExistsError,
    IndexLockedError,
    IndexNotFoundError,
    ItemNotFoundError,
    UsageError,
)
from mmretrieve.store import faiss_ops
from mmretrieve.store.layout import (
    DEFAULT_FACTORY,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    VERSION_RE,
    check_encoder_compat,
    crash_point,
    fsync_dir,
    fsync_file,
    link_or_copy,
    pkg_version,
    read_manifest,
    sha256_file,
    verify_files,
    write_json_atomic,
)
from mmretrieve.store.meta import Item, MetaDB, Skipped
from mmretrieve.store.sidestores import FrameStore, PatchSegments, make_projection, timestamps_file

log = logging.getLogger(__name__)


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
                raise UsageError("creating an index needs the encoder's info")
            self.manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "created_at": time.time(),
                "encoder": dict(encoder_info),
                "metric": metric,
                "factory": factory,
                "patches": dict(patches) if patches else None,
            }
            self.index = faiss_ops.new_faiss_index(encoder_info["dim"], factory, metric)
            self.meta = MetaDB.create(self.tmpdir / "meta.sqlite")
        else:
            prev_dir = self.path / self.prev["version"]
            verify_files(prev_dir, self.prev, check=True)
            self.manifest = {k: v for k, v in self.prev.items() if k not in ("files", "counts", "version", "previous")}
            if encoder_info is not None:
                check_encoder_compat(self.prev["encoder"], encoder_info, self.path)
            if patches and not self.manifest.get("patches"):
                self.manifest["patches"] = dict(patches)
            self.index = faiss_ops.read_faiss(prev_dir / "index.faiss")
            self.meta = MetaDB.create(self.tmpdir / "meta.sqlite", copy_from=prev_dir / "meta.sqlite")
            # unchanged patch segments and side files are shared with the previous version
            for fname in self.prev.get("files", {}):
                if fname not in ("index.faiss", "meta.sqlite"):
                    link_or_copy(prev_dir / fname, self.tmpdir / fname)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # buffered vectors while untrained
        self._patches = PatchSegments(self.tmpdir, self.version)
        self._frames = FrameStore(self.version, self.dim)

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
            elif live is not None and VERSION_RE.match(p.name) and p.name not in live:
                shutil.rmtree(p, ignore_errors=True)

    def _next_version_number(self) -> int:
        nums = [int(m.group(1)) for p in self.path.iterdir() if (m := VERSION_RE.match(p.name))]
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
        from mmretrieve.media.video import resolve_video_config

        return resolve_video_config(self.manifest.get("video"))

    def patch_projection(self) -> np.ndarray | None:
        """The index's fixed patch projection (written with the first version that needs it), or None."""
        cfg = self.patch_cfg
        if not cfg or not cfg.get("projection"):
            return None
        path = self.tmpdir / cfg["projection"]
        if path.exists():
            return np.load(path, allow_pickle=False)
        proj = make_projection(cfg)
        with open(path, "wb") as fh:
            np.save(fh, proj, allow_pickle=False)
        return proj

    def begin_patch_segment(self, capacity: int, n_patches: int, patch_dim: int) -> None:
        """Open a new fp16 segment with room for ``capacity`` rows (unused rows are trimmed on commit)."""
        self._patches.begin(capacity, n_patches, patch_dim)

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
            raise BadVectorsError(f"expected vectors of shape (n, {self.dim}), got {vectors.shape}")
        if len(items) != len(vectors):
            raise BadVectorsError(f"{len(items)} items but {len(vectors)} vectors")
        norms = np.linalg.norm(vectors, axis=1)
        bad = ~np.isfinite(vectors).all(axis=1) | ~np.isfinite(norms) | (norms < 1e-6)
        if bad.any():
            idx = np.flatnonzero(bad)
            if on_bad_vectors != "drop":
                raise BadVectorsError(
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
            raise UsageError(f"duplicate key {dup!r} in one add")
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
                raise UsageError("this index has no patch store; build it with patches enabled")
            seg, first = self._patches.write(patches)
            for j, it in enumerate(stored):
                it.patch_seg, it.patch_row = seg, first + j
        for it, fr in zip(stored, frames or [None] * len(stored)):
            if fr is not None:
                it.frame_seg, it.frame_start, it.frame_count = self._frames.add(fr[0], fr[1], it.uri)
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
                raise UsageError(
                    f"FAISS factory {self.manifest['factory']!r} could not be trained on {len(vecs)} vectors: "
                    f"{str(e).strip().splitlines()[-1]}. Use fewer clusters / a smaller PQ, or 'Flat' for small collections"
                ) from None
        self.index.add_with_ids(vecs, ids)

    def _drop_vectors(self, ids: Sequence[int]) -> bool:
        """Delete vectors from FAISS; returns False when the index cannot delete correctly (HNSW, IVF) and the ids were
        tombstoned instead (filtered at search time, never reused)."""
        import faiss
        arr = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
        self._flush_pending()
        if not faiss_ops.supports_remove(self.index):
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
            raise ItemNotFoundError(f"no item with id {missing[0]} in {self.path}")
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
        self._patches.close()
        import faiss
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
        self._frames.write(self.tmpdir)
        # drop segments no live item references any more
        used = set(self.meta.patch_segments())
        for seg in self.meta.frame_segments():
            used |= {seg, timestamps_file(seg)}
        for f in os.listdir(self.tmpdir):
            if f.startswith(("patches-", "frames-")) and f not in used:
                os.unlink(self.tmpdir / f)
        crash_point("before-index-write")
        faiss.write_index(self.index, str(self.tmpdir / "index.faiss"))
        crash_point("after-index-write")
        self.meta.commit_and_close()
        crash_point("after-meta-write")
        files = {}
        for f in sorted(os.listdir(self.tmpdir)):
            fp = self.tmpdir / f
            fsync_file(fp)
            files[f] = {"sha256": sha256_file(fp), "bytes": fp.stat().st_size}
        fsync_dir(self.tmpdir)
        final = self.path / self.version
        if final.exists():
            shutil.rmtree(final)
        crash_point("before-version-rename")
        os.rename(self.tmpdir, final)
        fsync_dir(self.path)
        self.manifest.update(
            {
                "version": self.version,
                "previous": self.prev["version"] if self.prev else None,
                "updated_at": time.time(),
                "counts": counts,
                "files": files,
                "faiss": type(faiss_ops.inner_index(self.index)).__name__,
                "mmretrieve_version": pkg_version(),
            }
        )
        crash_point("before-manifest")
        write_json_atomic(self.path / MANIFEST, self.manifest)
        self._published = True
        crash_point("after-manifest")
        # keep the previous version for readers that opened it; drop older ones
        for p in self.path.iterdir():
            if VERSION_RE.match(p.name) and p.name not in (self.version, self.manifest["previous"]):
                shutil.rmtree(p, ignore_errors=True)
        log.debug("index %s: published %s (%d items)", self.path, self.version, n_items)
        return self.manifest

    def abort(self) -> None:
        if self._published:
            return
        with contextlib.suppress(Exception):
            self._patches.close()
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


__all__ = ["IndexWriter"]
