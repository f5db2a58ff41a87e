"""``IndexWriter``: one write session on an index, publishing (at most) one new version per commit.

What a session does costs O(its batch): added rows go into new segments (``SegmentBuilder``), deletions
into one small deletion file per touched segment, metadata rows into the one database inside a single
transaction, and ``commit`` publishes a new manifest. See ``mmretrieve.store.layout`` for the files and
the guarantees; ``compaction`` for the merge policy run after each commit.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import time
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
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
from mmretrieve.store import io
from mmretrieve.store.layout import (
    DEFAULT_FACTORY,
    DEFAULT_RETAIN,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    META,
    SEGMENTS,
    TEMPLATE,
    VECTOR_DTYPES,
    check_encoder_compat,
    crash_point,
    list_versions,
    pkg_version,
    read_live,
    read_manifest,
    seal_manifest,
    version_name,
    version_number,
)
from mmretrieve.store.leases import gc_lock, leased_versions
from mmretrieve.store.meta import Item, MetaDB, Skipped, Visibility
from mmretrieve.store.segments import (
    SegmentBuilder,
    is_flat_factory,
    new_template,
    read_deletions,
    train_template,
    write_deletions,
)
from mmretrieve.store.sidestores import PROJECTION, make_projection

log = logging.getLogger(__name__)

#: item kinds counted in the manifest
KIND_COUNTS = {"image": "images", "video": "videos", "frame": "frames"}
#: a new segment is started once the buffered one holds this many rows or bytes
SEGMENT_ROWS = 200_000
SEGMENT_BYTES = 512 << 20


def load_view(root: Path, manifest: dict) -> Visibility:
    """The visibility of a manifest's version: its segments and their deleted rows."""
    return Visibility({e["id"]: read_deletions(root, e) for e in manifest["segments"]})


def acquire_lock(path: Path):
    """The index's single-writer lock (an open file holding ``flock``), or ``IndexLockedError``."""
    fh = open(Path(path) / ".lock", "a+")  # noqa: SIM115 - held until released by the caller
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        fh.close()
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise IndexLockedError(f"index {path} is being written by another process") from None
        raise
    return fh


@contextlib.contextmanager
def writer_lock(path: Path) -> Iterator[None]:
    """Hold the single-writer lock without a write session (the repair of a live manifest)."""
    fh = acquire_lock(path)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()


class IndexWriter:
    """A write session: ``add`` / ``remove`` / ``record_skipped``, then ``commit`` (or ``abort``).

    ``create=True`` makes a new index (``overwrite=True`` replaces an existing one as a new version, also
    one whose manifest or database is damaged). ``vector_dtype`` (``float32``, ``float16``) is how Flat
    segments store vectors. ``retain``: how many versions to keep (live included; default 2).
    ``auto_compact``: merge segments after each commit by the tiered policy.
    """

    def __init__(self, path: Path, *, encoder_info: dict | None = None, factory: str = DEFAULT_FACTORY,
                 metric: str = "ip", patches: dict | None = None, video: dict | None = None,
                 vector_dtype: str = "float32", create: bool = False, overwrite: bool = False,
                 retain: int | None = None, auto_compact: bool = True, segment_rows: int = SEGMENT_ROWS,
                 segment_bytes: int = SEGMENT_BYTES) -> None:
        self.path = Path(path)
        self._lock_fh = None
        self._published = False
        self._closed = False
        if not (self.path / MANIFEST).is_file() and list_versions(self.path) and not overwrite:
            # versions kept but no live manifest: a damaged index, never a new one written over its versions
            read_live(self.path)  # raises IndexCorruptedError naming the manifest and the repair
        if not create and not (self.path / MANIFEST).is_file():  # before anything is made there (no stray lock)
            raise IndexNotFoundError(f"index not found: {self.path}")
        self._made_dir = not self.path.exists()  # an aborted first build leaves nothing behind
        self.path.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            self._setup(encoder_info, factory, metric, patches, video, vector_dtype, create, overwrite, retain)
        except BaseException:
            self._release_lock()
            if self._made_dir:
                shutil.rmtree(self.path, ignore_errors=True)
            raise
        self.auto_compact = auto_compact
        self.segment_rows, self.segment_bytes = int(segment_rows), int(segment_bytes)

    # ---- set-up ----------------------------------------------------------------------------------
    def _acquire_lock(self) -> None:
        self._lock_fh = acquire_lock(self.path)
        _HOLDERS.add(self)

    def _forget_lock_in_child(self) -> None:
        """In a forked child: drop the inherited copy of the lock without unlocking (``flock`` locks
        belong to the open file, shared with the parent; ``LOCK_UN`` here would free the parent's)."""
        if self._lock_fh is not None:
            with contextlib.suppress(OSError):
                self._lock_fh.close()
            self._lock_fh = None
        self._closed = True

    def _release_lock(self) -> None:
        if self._lock_fh is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def _previous(self, create: bool, overwrite: bool) -> dict | None:
        if not (self.path / MANIFEST).is_file():
            return None
        if create and not overwrite:
            raise IndexExistsError(
                f"index {self.path} already exists; use `mmretrieve index add` to update it or --overwrite to rebuild")
        try:
            prev = read_manifest(self.path)
            MetaDB.open_reader(self.path / META, Visibility()).close()
            return prev
        except IndexCorruptedError as e:
            if not overwrite:
                raise
            log.warning("%s is damaged (%s): --overwrite rebuilds it from scratch", self.path, e)
            self._wipe()
            return None

    def _wipe(self) -> None:
        """Remove a damaged index's contents (only ``build --overwrite`` does this)."""
        for p in self.path.iterdir():
            if p.name == ".lock":
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)

    def _setup(self, encoder_info, factory, metric, patches, video, vector_dtype, create, overwrite, retain) -> None:
        prev = self._previous(create, overwrite)
        self.prev = prev
        fresh = prev is None or (create and overwrite)
        if fresh:
            if encoder_info is None:
                raise UsageError("creating an index needs the encoder's info")
            dtype = VECTOR_DTYPES.get(str(vector_dtype).lower())
            if dtype is None:
                raise UsageError(f"vector dtype must be float32 or float16, got {vector_dtype!r}")
            if dtype != "float32" and not is_flat_factory(factory):
                raise UsageError(f"fp16 vectors are offered for Flat indexes only (factory {factory!r})")
            base = {"format": FORMAT, "format_version": FORMAT_VERSION, "created_at": time.time(),
                    "encoder": dict(encoder_info), "metric": metric, "factory": factory.strip(), "vector_dtype": dtype,
                    "patches": dict(patches) if patches else None, "video": dict(video) if video else None,
                    "next_id": 0, "next_segment": int(prev["next_segment"]) if prev else 0,
                    "retain": int(retain or (prev or {}).get("retain") or DEFAULT_RETAIN), "files": {}}
            if not is_flat_factory(factory):
                new_template(int(encoder_info["dim"]), factory, metric)  # an invalid factory fails now
            self.view = Visibility()
            self.counts: Counter = Counter()
        else:
            if encoder_info is not None:
                check_encoder_compat(prev["encoder"], encoder_info, self.path)
            base = {k: v for k, v in prev.items() if k not in ("segments", "counts", "version", "previous",
                                                                "updated_at", "operation", "checksum")}
            if patches and not base.get("patches"):
                base["patches"] = dict(patches)
            if video is not None:
                base["video"] = dict(video)
            if retain:
                base["retain"] = int(retain)
            self.view = load_view(self.path, prev)
            self.counts = Counter({k: v for k, v in prev["counts"].items() if k in ("items", "images", "videos", "frames")})
        self.manifest = base
        self.segments: list[dict] = [] if fresh else [dict(e) for e in prev["segments"]]
        self.version = version_name(self._next_version_number())
        self.meta = MetaDB.open_writer(self.path / META, self.view)
        self._template = None
        self._builder: SegmentBuilder | None = None
        self._pending: list[tuple[list[Item], np.ndarray]] = []  # non-Flat rows waiting for a trained template
        self._touched: set[str] = set()
        self._written: list[str] = []  # segment folders this session wrote
        self._deletion_files: list[tuple[str, str]] = []  # and deletion files
        self._changed = fresh  # a new (or overwritten) index is published even when empty
        self._fresh = fresh
        if prev is not None:  # what a crashed write left behind (unpublished segments and their rows) goes first
            self.collect()
        self.manifest["next_segment"] = max(int(self.manifest["next_segment"]), self._highest_segment() + 1)

    def _highest_segment(self) -> int:
        """The highest segment number on disk or in the database (a crashed write's included)."""
        d = self.path / SEGMENTS
        nums = [int(p.name[1:]) for p in d.iterdir() if p.name[1:].isdigit()] if d.is_dir() else []
        nums += [int(s[1:]) for s in self.meta.noted_segments() if s[1:].isdigit()]
        return max(nums, default=-1)

    def _next_version_number(self) -> int:
        nums = [version_number(v) for v in list_versions(self.path)]
        if self.prev is not None:
            nums.append(version_number(self.prev["version"]))
        return max(nums, default=0) + 1

    # ---- properties ------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.manifest["encoder"]["dim"])

    @property
    def flat(self) -> bool:
        return is_flat_factory(self.manifest["factory"])

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
        path = self.path / PROJECTION
        if PROJECTION in self.manifest["files"] and path.exists():
            return io.load_npy(path, self.manifest["files"][PROJECTION])
        proj = make_projection(cfg)
        self.manifest["files"][PROJECTION] = io.write_npy(path.with_name(path.name + ".new"), proj)
        path.with_name(path.name + ".new").replace(path)
        return proj

    def begin_patch_segment(self, capacity: int, n_patches: int, patch_dim: int) -> None:
        """Kept for callers of the previous store; segments are sized by the writer now."""

    # ---- changes ---------------------------------------------------------------------------------
    def _check_batch(self, items, vectors, patches, frames, on_bad_vectors):
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
                raise BadVectorsError(f"{len(idx)} embedding(s) are NaN, infinite or zero, e.g. for {items[idx[0]].uri}; "
                                      "pass on_bad_vectors='drop' to skip them")
            self.record_skipped(Skipped(items[i].key, items[i].uri, "bad embedding (NaN, inf or zero norm)",
                                        items[i].size, items[i].mtime) for i in idx)
            keep = np.flatnonzero(~bad)
            items, vectors = [items[i] for i in keep], vectors[keep]
            patches = patches[keep] if patches is not None else None
            frames = [frames[i] for i in keep] if frames is not None else None
        keys = [it.key for it in items]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise UsageError(f"duplicate key {dup!r} in one add")
        if patches is not None and self.patch_cfg is None:
            raise UsageError("this index has no patch store; build it with patches enabled")
        return items, vectors, patches, frames

    def add(self, items: Sequence[Item], vectors: np.ndarray, patches: np.ndarray | None = None, *,
            frames: Sequence[tuple[np.ndarray, np.ndarray] | None] | None = None, on_bad_vectors: str = "error") -> list[Item]:
        """Add (or replace, when ``item.key`` exists) items with their embeddings. Returns the stored items.

        ``frames``: per item, ``(frame embeddings (T, D), timestamps (T,))`` for videos (stored fp16) or
        ``None``. ``on_bad_vectors``: NaN/inf/zero-norm rows raise (``"error"``) or are dropped and
        recorded as skipped (``"drop"``). A Flat index keeps a replaced item's id; others give it a new one."""
        items, vectors, patches, frames = self._check_batch(list(items), vectors, patches, frames, on_bad_vectors)
        if not items:
            return []
        existing = self.meta.items_by_keys([it.key for it in items])
        if existing:
            self._delete(list(existing.values()))
        new_ids = iter(self._reserve(sum(1 for it in items if not (self.flat and it.key in existing))))
        now = time.time()
        for it in items:
            prev = existing.get(it.key)
            it.id = prev.id if (self.flat and prev is not None) else next(new_ids)
            it.added_at = it.added_at or now
        if self.flat or self._template_ready():
            self._buffer(items, vectors, patches, frames)
        else:  # an untrained IVF/PQ template trains on this session's rows at commit
            self._pending.append((items, vectors, patches, frames))
        for it in items:
            self.counts[KIND_COUNTS.get(it.kind, "other")] += 1
        self.counts["items"] += len(items)
        self._changed = True
        return items

    def _reserve(self, n: int) -> list[int]:
        start = int(self.manifest["next_id"])
        self.manifest["next_id"] = start + n
        return list(range(start, start + n))

    def _buffer(self, items: list[Item], vectors: np.ndarray, patches, frames) -> None:
        """Put rows into the open segment, starting a new one each ``segment_rows`` rows (or bytes)."""
        s = 0
        while s < len(items):
            b = self._builder_for()
            e = min(len(items), s + self.segment_rows - b.rows)
            self._buffer_into(b, items[s:e], vectors[s:e], patches[s:e] if patches is not None else None,
                              frames[s:e] if frames is not None else None)
            s = e

    def _buffer_into(self, b: SegmentBuilder, items, vectors, patches, frames) -> None:
        first = b.add(np.array([it.id for it in items], dtype=np.int64), vectors, patches)
        for j, (it, fr) in enumerate(zip(items, frames or [None] * len(items))):
            it.segment, it.row = b.sid, first + j
            if fr is not None:
                emb, ts = np.asarray(fr[0], dtype=np.float32), np.asarray(fr[1])
                if emb.ndim != 2 or emb.shape[1] != self.dim or len(ts) != len(emb):
                    raise BadVectorsError(f"frames of {it.uri}: expected ({len(ts)}, {self.dim}) embeddings, got {emb.shape}")
                it.frame_start, it.frame_count = b.add_frames(emb, ts), len(emb)
        self.meta.insert_items(items)
        if b.rows >= self.segment_rows or b.nbytes >= self.segment_bytes:
            self._flush()

    def _builder_for(self) -> SegmentBuilder:
        if self._builder is None:
            sid = f"s{int(self.manifest['next_segment']):06d}"
            self.manifest["next_segment"] = int(self.manifest["next_segment"]) + 1
            pc = self.patch_cfg
            self._builder = SegmentBuilder(sid, self.dim, kind="flat" if self.flat else "faiss",
                                           dtype=self.manifest["vector_dtype"],
                                           patch_shape=(int(pc["grid"]) ** 2, int(pc["dim"])) if pc else None)
            self.view.add_segment(sid)
            self.meta.note_segment(sid, self.version)
        return self._builder

    def _flush(self) -> None:
        b, self._builder = self._builder, None
        if b is None or not b.rows:
            return
        entry = b.write(self.path, template=None if self.flat else self.template())
        self._written.append(b.sid)
        self.segments.append(entry)

    # ---- FAISS templates (non-Flat factories) -----------------------------------------------------------
    def template(self):
        """The trained empty FAISS index every segment is cloned from (read from ``template.faiss``)."""
        if self._template is None:
            import faiss

            p = self.path / TEMPLATE
            if TEMPLATE in self.manifest["files"] and p.exists():
                data = io.read_checked(p, self.manifest["files"][TEMPLATE])
                try:
                    self._template = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
                except RuntimeError as e:
                    raise IndexCorruptedError(f"{p}: FAISS cannot read it ({str(e).strip().splitlines()[-1]})") from None
            else:
                self._template = new_template(self.dim, self.manifest["factory"], self.manifest["metric"])
        return self._template

    def _template_ready(self) -> bool:
        return bool(self.template().is_trained)

    def _train_pending(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        vecs = np.concatenate([v for _, v, _, _ in pending])
        log.info("training FAISS index %s on %d vectors", self.manifest["factory"], len(vecs))
        train_template(self.template(), vecs, self.manifest["factory"])
        p = self.path / TEMPLATE
        tmp = p.with_name(p.name + ".new")
        self.manifest["files"][TEMPLATE] = io.write_faiss(tmp, self.template())
        tmp.replace(p)
        for items, v, pat, fr in pending:
            self._buffer(items, v, pat, fr)

    # ---- deletions ---------------------------------------------------------------------------------
    def _delete(self, items: Sequence[Item]) -> None:
        by_seg: dict[str, list[int]] = {}
        for it in items:
            by_seg.setdefault(it.segment, []).append(int(it.row))
            self.counts[KIND_COUNTS.get(it.kind, "other")] -= 1
            self.counts["items"] -= 1
        for sid, rows in by_seg.items():
            self.view.delete(sid, rows)
            self._touched.add(sid)
        self._changed = True

    def remove(self, ids: Sequence[int]) -> int:
        """Remove items by id (their keys may be added again later)."""
        ids = sorted({int(i) for i in ids})
        known = self.meta.items_by_ids(ids)
        missing = [i for i in ids if i not in known]
        if missing:
            raise ItemNotFoundError(f"no item with id {missing[0]} in {self.path}")
        if ids:
            self._delete(list(known.values()))
        return len(ids)

    def record_skipped(self, skipped: Sequence[Skipped]) -> None:
        skipped = list(skipped)
        if not skipped:
            return
        before = self.meta.skipped_fingerprints()
        if any(before.get(s.key) != (s.size, s.mtime, s.transient) for s in skipped):
            self._changed = True
        self.meta.record_skipped(skipped)

    # ---- publish -----------------------------------------------------------------------------------
    def commit(self) -> dict:
        """Publish the session as one new version (nothing, when it changed nothing); returns the live
        manifest."""
        with self._ending():
            if not self._changed:
                self.meta.rollback()
                self._published = True
                return self.prev
            self._commit()
            self._after_publish()
            return self.manifest_live

    def checkpoint(self, build: dict | None = None) -> dict | None:
        """Publish what the session wrote so far as a version and go on writing (the lock is kept): how
        a long build commits per shard, so a build killed later resumes from here. ``build``: the build's
        progress, stored in the manifest. Returns the published manifest (None when nothing changed)."""
        if build is not None:
            self.set_build_state(build)
        if not self._changed:
            return None
        try:
            self._commit()
            self._after_publish()
        except BaseException:
            self.abort()
            raise
        live = self.manifest_live
        self.prev, self.version = live, version_name(version_number(live["version"]) + 1)
        self._written, self._deletion_files = [], []
        self._published = self._changed = self._fresh = False
        self.meta.begin()
        return live

    def set_build_state(self, build: dict) -> None:
        """Record a build's progress (its source, the units committed) in the next published manifest."""
        if self.manifest.get("build") != build:
            self.manifest["build"] = json.loads(json.dumps(build))
            self._changed = True

    def ready_to_checkpoint(self) -> bool:
        """Whether a checkpoint now keeps the index's quality: a non-Flat template that is not trained yet
        waits for the rows FAISS wants to train it (``min_train_rows``); the quantizer is trained once, on
        that sample, and every later segment is added with it (FAISS's sharded-build recipe)."""
        from mmretrieve.store.segments import min_train_rows

        if self.flat or not self._pending:
            return True
        return sum(len(v) for _, v, _, _ in self._pending) >= min_train_rows(self.template())

    def _commit(self, operation: str = "write") -> dict:
        self._train_pending()
        self._flush()
        for e in self.segments:
            if e["id"] in self._touched:
                self._deletion_files.append((e["id"], f"del-{self.version}.npy"))
                name, info = write_deletions(self.path, e["id"], self.version, self.view.deleted[e["id"]])
                e.update(deletions=name, deletions_file=info, deleted=len(self.view.deleted[e["id"]]))
        self._touched.clear()
        counts = {**{k: int(self.counts.get(k, 0)) for k in ("items", "images", "videos", "frames")},
                  "skipped": self.meta.count_skipped(), "tombstones": sum(int(e["deleted"]) for e in self.segments),
                  "ntotal": sum(int(e["rows"]) for e in self.segments), "segments": len(self.segments)}
        self.meta.commit()
        crash_point("after-meta-write")
        m = {**self.manifest, "version": self.version, "previous": self.prev["version"] if self.prev else None,
             "updated_at": time.time(), "counts": counts, "segments": self.segments, "operation": operation,
             "faiss": "flat" if self.flat else type(self.template()).__name__, "mmretrieve_version": pkg_version()}
        m = seal_manifest(m)
        crash_point("before-manifest")
        vdir = self.path / self.version
        vdir.mkdir(exist_ok=True)
        io.write_json_atomic(vdir / MANIFEST, m)
        io.write_json_atomic(self.path / MANIFEST, m, crash=crash_point)
        self._published = True
        self.manifest_live = m
        crash_point("after-manifest")
        log.debug("index %s: published %s (%d items, %d segments)", self.path, self.version, counts["items"],
                  len(self.segments))
        return m

    def _after_publish(self) -> None:
        """Collect what no version needs, then merge segments the tiered policy picks (each merge is one
        more published version). The write is published already: a failure here (a full disk, say) is
        logged and left to the next write, which collects and merges again."""
        from mmretrieve.errors import MMRetrieveError
        from mmretrieve.store.compaction import plan

        try:
            self.meta.begin()
            self.collect()
            if self.auto_compact:
                for group in plan(self.segments):
                    self._merge_and_publish(group)
            self.meta.commit()
            self.meta.checkpoint()
        except (MMRetrieveError, OSError) as e:
            self.meta.rollback()
            log.warning("%s: %s was published, but tidying up after it failed (%s); the next write retries",
                        self.path, self.manifest_live["version"], e)

    def _merge_and_publish(self, group: list[dict]) -> None:
        from mmretrieve.store.compaction import merge_segments

        self.prev, self.version = self.manifest_live, version_name(version_number(self.manifest_live["version"]) + 1)
        sid = f"s{int(self.manifest['next_segment']):06d}"
        self.manifest["next_segment"] = int(self.manifest["next_segment"]) + 1
        entry = merge_segments(self, group, sid)
        merged = {e["id"] for e in group}
        pos = min(i for i, e in enumerate(self.segments) if e["id"] in merged)
        self.segments = [e for e in self.segments if e["id"] not in merged]
        for s in merged:
            self.view.drop_segment(s)
        if entry is not None:  # None: every row of the group was deleted
            self.segments.insert(pos, entry)
            self.view.add_segment(sid)
        self._commit(operation="compact")
        self.meta.begin()
        self.collect()

    def collect(self) -> None:
        """Remove versions beyond the retention, and segment folders, deletion files and metadata rows that
        no retained version and no live reader's lease needs."""
        with gc_lock(self.path, exclusive=True):
            live = read_manifest(self.path)["version"]
            every = list_versions(self.path)
            versions = [v for v in every if version_number(v) <= version_number(live)]  # newer: a crashed write's
            keep = set(versions[-int(self.manifest.get("retain") or DEFAULT_RETAIN):]) | {live}
            keep |= leased_versions(self.path) & set(versions)
            needed_segs: set[str] = set()
            needed_files: set[tuple[str, str]] = set()
            unknown = []
            for v in keep:
                try:
                    entries = read_manifest(self.path, v)["segments"]
                except IndexCorruptedError as e:  # what it needs is unknown: nothing is collected this time
                    unknown.append(str(e))
                    continue
                for e in entries:
                    needed_segs.add(e["id"])
                    if e.get("deletions"):
                        needed_files.add((e["id"], e["deletions"]))
            for v in every:
                if v not in keep:
                    shutil.rmtree(self.path / v, ignore_errors=True)
            if unknown:
                log.warning("%s: no segment is collected while a retained version is unreadable (%s)", self.path,
                            "; ".join(unknown))
                return
            self._collect_segments(needed_segs, needed_files)

    def _collect_segments(self, needed: set[str], needed_files: set[tuple[str, str]]) -> None:
        seg_root = self.path / SEGMENTS
        gone = []
        if seg_root.is_dir():
            for d in seg_root.iterdir():
                if d.name in needed:
                    for f in d.glob("del-*.npy"):
                        if (d.name, f.name) not in needed_files:
                            f.unlink(missing_ok=True)
                elif d.name not in self.view.deleted:
                    shutil.rmtree(d, ignore_errors=True)
                    gone.append(d.name)
        stale = [s for s in self.meta.noted_segments() if s not in needed and s not in self.view.deleted]
        gone = sorted(set(gone) | set(stale))
        if gone:
            self.meta.drop_segments(gone)
        for p in self.path.iterdir():  # temp files a crash left behind
            if p.name.endswith(".tmp") and p.name.startswith("."):
                p.unlink(missing_ok=True) if p.is_file() else shutil.rmtree(p, ignore_errors=True)

    def compact(self, *, everything: bool = False) -> dict | None:
        """Merge segments now: by the tiered policy, or (``everything``) all into one (deleted rows dropped).
        Returns the new live manifest, or None when there was nothing to merge."""
        from mmretrieve.store.compaction import plan

        with self._ending():
            if self._changed:
                raise UsageError("commit the session's changes before compacting")
            self.manifest_live = self.prev
            groups = [list(self.segments)] if everything and (len(self.segments) > 1 or any(
                e["deleted"] for e in self.segments)) else plan(self.segments)
            for group in groups:
                self._merge_and_publish(group)
            if groups:
                self.meta.commit()
            else:
                self.meta.rollback()
            self.meta.checkpoint()
            return self.manifest_live if groups else None

    @contextlib.contextmanager
    def _ending(self) -> Iterator[None]:
        """The last step of a session: aborted on any failure, its database closed and its lock released
        whatever happens."""
        try:
            yield
        except BaseException:
            self.abort()
            raise
        finally:
            self.meta.close()
            self._release_lock()

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.meta.rollback()
        if not self._published:
            for sid in self._written:
                shutil.rmtree(self.path / SEGMENTS / sid, ignore_errors=True)
            for sid, name in self._deletion_files:
                (self.path / SEGMENTS / sid / name).unlink(missing_ok=True)
        self.meta.close()
        self._release_lock()
        if self._made_dir and not (self.path / MANIFEST).exists():
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._published:
            self.commit()
        elif exc_type is not None:
            self.abort()


def rollback(path: Path, version: str = "previous") -> dict:
    """Publish a new version whose content is that of a retained older ``version`` (``previous``: the one
    before the live one). The rolled-back version stays retained like any other."""
    w = IndexWriter(path)
    with w._ending():
        target = read_manifest(w.path, version)
        if target["version"] == w.prev["version"]:
            raise UsageError(f"{target['version']} is already the live version of {w.path}")
        w.segments = [dict(e) for e in target["segments"]]
        w.view = load_view(w.path, target)
        w.meta.view = w.view
        w.counts = Counter({k: v for k, v in target["counts"].items() if k in ("items", "images", "videos", "frames")})
        w.manifest_live = w._commit(operation=f"rollback to {target['version']}")
        w.meta.begin()
        w.collect()
        w.meta.commit()
        return w.manifest_live


__all__ = ["IndexWriter", "rollback", "load_view", "SEGMENT_ROWS"]


#: writers holding a lock in this process: a forked child (a decoder worker) closes its copies at once,
#: so a killed build's lock is free as soon as the build itself is gone, not when its workers are
_HOLDERS: weakref.WeakSet = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for w in list(_HOLDERS):
        w._forget_lock_in_child()
    _HOLDERS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
