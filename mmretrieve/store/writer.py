"""``IndexWriter``: one write session on an index, publishing (at most) one new version per commit.

What a session does costs O(its batch): added rows go into new segments (``feed``), deletions into one
small deletion file per touched segment, metadata rows into the one database inside a single
transaction, and ``commit`` publishes a new manifest (``draft``). After each commit, what no version
needs is collected (``retention``) and segments are merged by the tiered policy (``compaction``). The
session holds the single-writer lock (``lock``). See ``mmretrieve.store.layout`` for the files and the
guarantees.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from mmretrieve.errors import ItemNotFoundError, MMRetrieveError, UsageError
from mmretrieve.store import retention
from mmretrieve.store.compaction import merge_factor, merge_into, pick, plan
from mmretrieve.store.draft import (
    KIND_COUNTS,
    Draft,
    Unpublished,
    check_writable,
    load_view,
    publish,
    read_previous,
)
from mmretrieve.store.feed import SEGMENT_BYTES, SEGMENT_ROWS, RowFeed, check_batch
from mmretrieve.store.layout import (
    DEFAULT_FACTORY,
    MANIFEST,
    META,
    crash_point,
    read_manifest,
    version_name,
    version_number,
)
from mmretrieve.store.lock import WriterLock, acquire_lock, writer_lock
from mmretrieve.store.meta import Item, MetaDB, Skipped
from mmretrieve.store.sidestores import ensure_projection

log = logging.getLogger(__name__)


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
        self._published = self._closed = False
        check_writable(self.path, create=create, overwrite=overwrite)  # before anything is made there
        self._made_dir = not self.path.exists()  # an aborted first build leaves nothing behind
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = WriterLock(self.path)
        try:
            self._start(encoder_info, create, overwrite, {"factory": factory, "metric": metric, "patches": patches,
                                                          "video": video, "vector_dtype": vector_dtype, "retain": retain})
        except BaseException:
            self._lock.release()
            if self._made_dir:
                shutil.rmtree(self.path, ignore_errors=True)
            raise
        self.auto_compact = auto_compact
        self.feed = RowFeed(self.path, self.manifest, self.meta, lambda: self.draft.new_segment(self.meta, self.version),
                            rows=segment_rows, nbytes=segment_bytes)

    def _start(self, encoder_info: dict | None, create: bool, overwrite: bool, options: dict) -> None:
        self.prev = read_previous(self.path, create=create, overwrite=overwrite)
        self._changed = self.prev is None or (create and overwrite)  # a new index is published even when empty
        self.draft = Draft.start(self.path, self.prev, self._changed, encoder_info, **options)
        self.version = retention.next_version(self.path, self.prev)
        self.meta = MetaDB.open_writer(self.path / META, self.draft.view)
        self._written = Unpublished()  # what this session wrote since it last published (the feed's aside)
        if self.prev is not None:  # what a crashed write left behind (unpublished segments and their rows) goes first
            self.collect()
        top = retention.highest_segment(self.path, self.meta)
        self.manifest["next_segment"] = max(int(self.manifest["next_segment"]), top + 1)

    # ---- the next version's contents (``draft``) and the index's settings -------------------------
    manifest = property(lambda self: self.draft.manifest, doc="The next manifest's fields.")
    segments = property(lambda self: self.draft.segments, doc="The next version's segment entries.")
    view = property(lambda self: self.draft.view, doc="The next version's segments and deleted rows.")
    counts = property(lambda self: self.draft.counts, doc="The next version's item counts.")
    segment_rows = property(lambda self: self.feed.rows, doc="A new segment is started after this many rows.")
    segment_bytes = property(lambda self: self.feed.nbytes, doc="... or after this many bytes.")
    dim = property(lambda self: int(self.manifest["encoder"]["dim"]), doc="The vectors' dimension.")
    flat = property(lambda self: self.feed.flat, doc="Whether segments store raw vectors (a Flat factory).")
    patch_cfg = property(lambda self: self.manifest.get("patches"), doc="The patch store's config, or None.")

    video_cfg = property(lambda self: self.draft.video_cfg, doc="The index's video sampling settings.")

    def patch_projection(self) -> np.ndarray | None:
        """The index's fixed patch projection (written with the first version that needs it), or None."""
        return ensure_projection(self.path, self.manifest)

    def begin_patch_segment(self, capacity: int, n_patches: int, patch_dim: int) -> None:
        """Kept for callers of the previous store; segments are sized by the writer now."""

    def template(self):
        """The trained empty FAISS index every segment is cloned from (read from ``template.faiss``)."""
        return self.feed.template()

    # ---- changes ---------------------------------------------------------------------------------
    def add(self, items: Sequence[Item], vectors: np.ndarray, patches: np.ndarray | None = None, *,
            frames: Sequence[tuple[np.ndarray, np.ndarray] | None] | None = None, on_bad_vectors: str = "error") -> list[Item]:
        """Add (or replace, when ``item.key`` exists) items with their embeddings. Returns the stored items.

        ``frames``: per item, ``(frame embeddings (T, D), timestamps (T,))`` for videos (stored fp16) or
        ``None``. ``on_bad_vectors``: NaN/inf/zero-norm rows raise (``"error"``) or are dropped and
        recorded as skipped (``"drop"``). A Flat index keeps a replaced item's id; others give it a new one."""
        items, vectors, patches, frames = check_batch(list(items), vectors, patches, frames, dim=self.dim,
                                                      has_patches=self.patch_cfg is not None,
                                                      on_bad_vectors=on_bad_vectors, skip=self.record_skipped)
        if not items:
            return []
        existing = self.meta.items_by_keys([it.key for it in items])
        self.draft.assign_ids(items, existing, keep_ids=self.flat, now=time.time())
        self.feed.put(items, vectors, patches, frames)
        self.draft.count(items)
        self._changed = True
        return items

    def remove(self, ids: Sequence[int]) -> int:
        """Remove items by id (their keys may be added again later)."""
        ids = sorted({int(i) for i in ids})
        known = self.meta.items_by_ids(ids)
        missing = [i for i in ids if i not in known]
        if missing:
            raise ItemNotFoundError(f"no item with id {missing[0]} in {self.path}")
        if ids:
            self.draft.delete(list(known.values()))
            self._changed = True
        return len(ids)

    def record_skipped(self, skipped: Sequence[Skipped]) -> None:
        """Record inputs that were skipped (a new or changed record is a change to publish)."""
        if self.meta.record_skipped(skipped):
            self._changed = True

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
        with self._ending(last=False):
            self._commit()
            self._after_publish()
        live = self.manifest_live
        self.prev, self.version = live, version_name(version_number(live["version"]) + 1)
        self._written, self._published, self._changed = Unpublished(), False, False
        self.meta.begin()
        return live

    def set_build_state(self, build: dict) -> None:
        """Record a build's progress (its source, the units committed) in the next published manifest."""
        if self.manifest.get("build") != build:
            self.manifest["build"] = json.loads(json.dumps(build))
            self._changed = True

    def ready_to_checkpoint(self) -> bool:
        """Whether a checkpoint now keeps the index's quality: not while a non-Flat template waits for the
        rows to train it on (``RowFeed.ready``)."""
        return self.feed.ready()

    def _commit(self, operation: str = "write") -> dict:
        for entry in self.feed.finish():
            self._written.segments.append(entry["id"])
            self.segments.append(entry)
        self.draft.write_deletions(self.path, self.version, self._written)
        skipped = self.meta.count_skipped()
        self.meta.commit()
        crash_point("after-meta-write")
        m = self.draft.seal(self.version, self.prev["version"] if self.prev else None, operation=operation,
                            skipped=skipped, faiss="flat" if self.flat else type(self.template()).__name__)
        publish(self.path, m)
        self._published = True
        self.manifest_live = m
        crash_point("after-manifest")
        log.debug("index %s: published %s (%d items, %d segments)", self.path, self.version, m["counts"]["items"],
                  len(self.segments))
        return m

    def _after_publish(self) -> None:
        """Collect what no version needs, then merge what the tiered policy picks (each merge a version). The
        write is published already: a failure here (a full disk, say) is logged; the next write retries."""
        try:
            self.meta.begin()
            self.collect()
            if self.auto_compact:
                for group in plan(self.segments, merge_factor(self.manifest.get("factory"))):
                    self._merge_and_publish(group)
            self.meta.commit()
            self.meta.checkpoint()
        except (MMRetrieveError, OSError) as e:
            self.meta.rollback()
            log.warning("%s: %s was published, but tidying up after it failed (%s); the next write retries",
                        self.path, self.manifest_live["version"], e)

    def _merge_and_publish(self, group: list[dict]) -> None:
        self.prev, self.version = self.manifest_live, version_name(version_number(self.manifest_live["version"]) + 1)
        entry = merge_into(self.draft, self.path, self.meta, group, version=self.version,
                           template=None if self.flat else self.template())
        self._written.segments += [entry["id"]] if entry else []
        self._commit(operation="compact")
        self.meta.begin()
        self.collect()

    def collect(self) -> None:
        """Remove versions beyond the retention, and segment folders, deletion files and metadata rows that
        no retained version and no live reader's lease needs (``retention.collect``)."""
        retention.collect(self.path, self.meta, retain=self.manifest.get("retain"), in_use=self.view.deleted)

    def compact(self, *, everything: bool = False) -> dict | None:
        """Merge segments now: by the tiered policy, or (``everything``) all into one (deleted rows dropped).
        Returns the new live manifest, or None when there was nothing to merge."""
        with self._ending():
            if self._changed:
                raise UsageError("commit the session's changes before compacting")
            self.manifest_live = self.prev
            groups = pick(self.segments, everything=everything, factory=self.manifest.get("factory"))
            for group in groups:
                self._merge_and_publish(group)
            self.meta.commit() if groups else self.meta.rollback()
            self.meta.checkpoint()
            return self.manifest_live if groups else None

    # ---- the end of a session --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _ending(self, *, last: bool = True) -> Iterator[None]:
        """A step that ends the session on any failure (``abort``); the ``last`` one also closes its
        database and releases its lock whatever happens."""
        try:
            yield
        except BaseException:
            self.abort()
            raise
        finally:
            if last:
                self.meta.close()
                self._lock.release()

    def abort(self) -> None:
        if self._closed or self._lock.inherited:  # inherited: a forked child's copy, the parent's session
            return
        self._closed = True
        self.meta.rollback()
        if not self._published:
            self._written.segments += [e["id"] for e in self.feed.written]
            self._written.remove(self.path)
        self.meta.close()
        self._lock.release()
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
        w.draft = Draft.of(w.path, target, w.manifest)
        w.meta.view = w.view
        w.manifest_live = w._commit(operation=f"rollback to {target['version']}")
        w.meta.begin()
        w.collect()
        w.meta.commit()
        return w.manifest_live


__all__ = ["IndexWriter", "rollback", "load_view", "SEGMENT_ROWS", "SEGMENT_BYTES", "KIND_COUNTS", "acquire_lock",
           "writer_lock"]
