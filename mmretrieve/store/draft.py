"""The version a write session is making (``Draft``): where it starts from, what it holds, how it is sealed.

A draft starts from the live version (``carried``) or from nothing (``fresh``: a new index, or one rebuilt
with ``--overwrite``). It holds the next manifest's fields (``manifest``: format, encoder, factory,
``next_id``, ``next_segment``, the side files...), the segment entries, the rows deleted per segment
(``view``, shared with the session's database) and the item counts. ``seal`` gives the manifest to
publish and ``publish`` publishes it; ``Unpublished`` lists the files written since, removed on abort.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from mmretrieve.errors import IndexCorruptedError, IndexExistsError, IndexNotFoundError, UsageError
from mmretrieve.store import io
from mmretrieve.store.layout import (
    DEFAULT_RETAIN,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    META,
    SEGMENTS,
    VECTOR_DTYPES,
    check_encoder_compat,
    crash_point,
    list_versions,
    pkg_version,
    read_live,
    read_manifest,
    seal_manifest,
)
from mmretrieve.store.lock import LOCK
from mmretrieve.store.meta import Item, MetaDB, Visibility
from mmretrieve.store.segments import is_flat_factory, new_template, read_deletions, write_deletions

log = logging.getLogger(__name__)

#: item kinds counted in the manifest
KIND_COUNTS = {"image": "images", "video": "videos", "frame": "frames"}
COUNTED = ("items", "images", "videos", "frames")
#: what a published manifest has that the next one recomputes
PUBLISHED_ONLY = ("segments", "counts", "version", "previous", "updated_at", "operation", "checksum")


def load_view(root: Path, manifest: dict) -> Visibility:
    """The visibility of a manifest's version: its segments and their deleted rows."""
    return Visibility({e["id"]: read_deletions(root, e) for e in manifest["segments"]})


def check_writable(path: Path, *, create: bool, overwrite: bool) -> None:
    """Refuse, before anything is made there (no stray lock), to write where there is no index
    (without ``create``) or over the versions of an index that lost its live manifest."""
    if not (path / MANIFEST).is_file() and list_versions(path) and not overwrite:
        # versions kept but no live manifest: a damaged index, never a new one written over its versions
        read_live(path)  # raises IndexCorruptedError naming the manifest and the repair
    if not create and not (path / MANIFEST).is_file():
        raise IndexNotFoundError(f"index not found: {path}")


def read_previous(path: Path, *, create: bool, overwrite: bool) -> dict | None:
    """The live manifest a session starts from (its database checked), or None for a new index. A
    damaged one is wiped only by ``overwrite`` (``build --overwrite``); the lock must be held."""
    if not (path / MANIFEST).is_file():
        return None
    if create and not overwrite:
        raise IndexExistsError(
            f"index {path} already exists; use `mmretrieve index add` to update it or --overwrite to rebuild")
    try:
        prev = read_manifest(path)
        MetaDB.open_reader(path / META, Visibility()).close()
        return prev
    except IndexCorruptedError as e:
        if not overwrite:
            raise
        log.warning("%s is damaged (%s): --overwrite rebuilds it from scratch", path, e)
        for p in path.iterdir():
            if p.name != LOCK:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        return None


def fresh_manifest(prev: dict | None, encoder_info: dict | None, *, factory: str, metric: str, patches, video,
                   vector_dtype: str, retain: int | None) -> dict:
    """The fields of a new index's first manifest (segment numbers go on from ``prev``, one overwritten)."""
    if encoder_info is None:
        raise UsageError("creating an index needs the encoder's info")
    dtype = VECTOR_DTYPES.get(str(vector_dtype).lower())
    if dtype is None:
        raise UsageError(f"vector dtype must be float32 or float16, got {vector_dtype!r}")
    if dtype != "float32" and not is_flat_factory(factory):
        raise UsageError(f"fp16 vectors are offered for Flat indexes only (factory {factory!r})")
    if not is_flat_factory(factory):
        new_template(int(encoder_info["dim"]), factory, metric)  # an invalid factory fails now
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "created_at": time.time(),
            "encoder": dict(encoder_info), "metric": metric, "factory": factory.strip(), "vector_dtype": dtype,
            "patches": dict(patches) if patches else None, "video": dict(video) if video else None,
            "next_id": 0, "next_segment": int(prev["next_segment"]) if prev else 0,
            "retain": int(retain or (prev or {}).get("retain") or DEFAULT_RETAIN), "files": {}}


def carried_manifest(path: Path, prev: dict, encoder_info: dict | None, *, patches, video, retain: int | None) -> dict:
    """The fields the next version of an existing index carries over (the encoder checked against it)."""
    if encoder_info is not None:
        check_encoder_compat(prev["encoder"], encoder_info, path)
    base = {k: v for k, v in prev.items() if k not in PUBLISHED_ONLY}
    if patches and not base.get("patches"):
        base["patches"] = dict(patches)
    if video is not None:
        base["video"] = dict(video)
    if retain:
        base["retain"] = int(retain)
    return base


class Draft:
    """The next version's contents: manifest fields, segment entries, deleted rows, item counts."""

    def __init__(self, manifest: dict, segments: list[dict], view: Visibility, counts: Counter) -> None:
        self.manifest, self.segments, self.view, self.counts = manifest, segments, view, counts
        self.touched: set[str] = set()  # segments with rows deleted since the last seal

    @classmethod
    def start(cls, path: Path, prev: dict | None, fresh: bool, encoder_info: dict | None, **options) -> Draft:
        """A new index's draft (``fresh``), else the live version's carried on (``options``: the writer's)."""
        if fresh:
            return cls(fresh_manifest(prev, encoder_info, **options), [], Visibility(), Counter())
        carried = carried_manifest(path, prev, encoder_info, patches=options.get("patches"),
                                   video=options.get("video"), retain=options.get("retain"))
        return cls.of(path, prev, carried)

    @classmethod
    def of(cls, root: Path, published: dict, manifest: dict) -> Draft:
        """The contents of a published version, under the given manifest fields."""
        counts = Counter({k: v for k, v in published["counts"].items() if k in COUNTED})
        return cls(manifest, [dict(e) for e in published["segments"]], load_view(root, published), counts)

    def segment_id(self) -> str:
        """The id of a new segment (segment numbers are never reused)."""
        sid = f"s{int(self.manifest['next_segment']):06d}"
        self.manifest["next_segment"] = int(self.manifest["next_segment"]) + 1
        return sid

    def new_segment(self, meta: MetaDB, version: str) -> str:
        """A new segment of the draft (no row deleted), noted in ``meta`` as written by ``version``."""
        sid = self.segment_id()
        self.view.add_segment(sid)
        meta.note_segment(sid, version)
        return sid

    @property
    def video_cfg(self) -> dict:
        """The index's video sampling settings (defaults filled in)."""
        from mmretrieve.media.video import resolve_video_config

        return resolve_video_config(self.manifest.get("video"))

    def assign_ids(self, items: Sequence[Item], existing: dict[str, Item], *, keep_ids: bool, now: float) -> None:
        """Give added items their ids: a replaced item (in ``existing``, by key) loses its old row and,
        with ``keep_ids`` (Flat indexes), keeps its id; every other item gets a new one."""
        if existing:
            self.delete(list(existing.values()))
        n_new = sum(1 for it in items if not (keep_ids and it.key in existing))
        start = int(self.manifest["next_id"])
        self.manifest["next_id"] = start + n_new
        new_ids = iter(range(start, start + n_new))
        for it in items:
            prev = existing.get(it.key)
            it.id = prev.id if (keep_ids and prev is not None) else next(new_ids)
            it.added_at = it.added_at or now

    def count(self, items: Sequence[Item], sign: int = 1) -> None:
        for it in items:
            self.counts[KIND_COUNTS.get(it.kind, "other")] += sign
        self.counts["items"] += sign * len(items)

    def delete(self, items: Sequence[Item]) -> None:
        by_seg: dict[str, list[int]] = {}
        for it in items:
            by_seg.setdefault(it.segment, []).append(int(it.row))
        self.count(items, -1)
        for sid, rows in by_seg.items():
            self.view.delete(sid, rows)
            self.touched.add(sid)

    def replace(self, group: list[dict], entry: dict | None) -> None:
        """Put a merged segment's ``entry`` where the first of ``group`` was (None: every row was deleted)."""
        merged = {e["id"] for e in group}
        pos = min(i for i, e in enumerate(self.segments) if e["id"] in merged)
        self.segments = [e for e in self.segments if e["id"] not in merged]
        for s in merged:
            self.view.drop_segment(s)
        if entry is not None:
            self.segments.insert(pos, entry)
            self.view.add_segment(entry["id"])

    def write_deletions(self, root: Path, version: str, written: Unpublished) -> None:
        """Write a deletion file of ``version`` for each touched segment (each noted in ``written`` first)."""
        for e in self.segments:
            if e["id"] in self.touched:
                written.files.append((e["id"], f"del-{version}.npy"))
                name, info = write_deletions(root, e["id"], version, self.view.deleted[e["id"]])
                e.update(deletions=name, deletions_file=info, deleted=len(self.view.deleted[e["id"]]))
        self.touched.clear()

    def seal(self, version: str, previous: str | None, *, operation: str, skipped: int, faiss: str) -> dict:
        """The manifest publishing the draft as ``version``, with its own checksum."""
        counts = {**{k: int(self.counts.get(k, 0)) for k in COUNTED}, "skipped": skipped,
                  "tombstones": sum(int(e["deleted"]) for e in self.segments),
                  "ntotal": sum(int(e["rows"]) for e in self.segments), "segments": len(self.segments)}
        return seal_manifest({**self.manifest, "version": version, "previous": previous, "updated_at": time.time(),
                              "counts": counts, "segments": self.segments, "operation": operation, "faiss": faiss,
                              "mmretrieve_version": pkg_version()})


class Unpublished:
    """The files a session wrote since it last published: removed when it aborts."""

    def __init__(self) -> None:
        self.segments: list[str] = []  # segment folders
        self.files: list[tuple[str, str]] = []  # (segment, deletion file)

    def remove(self, root: Path) -> None:
        for sid in self.segments:
            shutil.rmtree(Path(root) / SEGMENTS / sid, ignore_errors=True)
        for sid, name in self.files:
            (Path(root) / SEGMENTS / sid / name).unlink(missing_ok=True)


def publish(root: Path, manifest: dict) -> None:
    """Publish a sealed manifest: its retained copy ``vNNNN/manifest.json``, then the live
    ``manifest.json`` replaced atomically (a crash before leaves the previous version live)."""
    crash_point("before-manifest")
    vdir = Path(root) / manifest["version"]
    vdir.mkdir(exist_ok=True)
    io.write_json_atomic(vdir / MANIFEST, manifest)
    io.write_json_atomic(Path(root) / MANIFEST, manifest, crash=crash_point)


__all__ = ["Draft", "Unpublished", "publish", "load_view", "check_writable", "read_previous", "KIND_COUNTS"]
