"""Retention and collection: which versions an index keeps, and removing what none of them needs.

A writer keeps the newest ``retain`` versions (the live one included) and every version a live reader
holds a lease on (``leases``). ``collect`` removes the other version folders, then the segment folders,
deletion files and metadata rows that no kept version lists, and the temp files a crash left behind.
It runs under ``.gc.lock`` held exclusively, so a reader registering its lease never races it; a segment
the writing session still uses (``in_use``: its working view, unpublished segments included) is never
removed. When a kept version's manifest cannot be read, what it needs is unknown: no segment is
collected that time.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Collection
from pathlib import Path

from mmretrieve.errors import IndexCorruptedError
from mmretrieve.store.layout import (
    DEFAULT_RETAIN,
    SEGMENTS,
    list_versions,
    read_manifest,
    version_name,
    version_number,
)
from mmretrieve.store.leases import gc_lock, leased_versions
from mmretrieve.store.meta import MetaDB

log = logging.getLogger(__name__)


def kept_versions(root: Path, retain: int | None) -> tuple[list[str], set[str]]:
    """(every version folder, the versions kept): the newest ``retain`` up to the live one, the live
    one, and the leased ones (a folder newer than the live one is a crashed write's: not kept)."""
    live = read_manifest(root)["version"]
    every = list_versions(root)
    versions = [v for v in every if version_number(v) <= version_number(live)]
    keep = set(versions[-int(retain or DEFAULT_RETAIN):]) | {live}
    keep |= leased_versions(root) & set(versions)
    return every, keep


def collect(root: Path, meta: MetaDB, *, retain: int | None, in_use: Collection[str]) -> None:
    """Remove versions beyond the retention, and segment folders, deletion files and metadata rows (in
    ``meta``'s open transaction) that no retained version, no live reader's lease and no segment
    ``in_use`` by the writing session needs."""
    root = Path(root)
    with gc_lock(root, exclusive=True):
        every, keep = kept_versions(root, retain)
        needed_segs: set[str] = set()
        needed_files: set[tuple[str, str]] = set()
        unknown = []
        for v in keep:
            try:
                entries = read_manifest(root, v)["segments"]
            except IndexCorruptedError as e:  # what it needs is unknown: nothing is collected this time
                unknown.append(str(e))
                continue
            for e in entries:
                needed_segs.add(e["id"])
                if e.get("deletions"):
                    needed_files.add((e["id"], e["deletions"]))
        for v in every:
            if v not in keep:
                shutil.rmtree(root / v, ignore_errors=True)
        if unknown:
            log.warning("%s: no segment is collected while a retained version is unreadable (%s)", root,
                        "; ".join(unknown))
            return
        _collect_segments(root, meta, needed_segs, needed_files, set(in_use))


def _collect_segments(root: Path, meta: MetaDB, needed: set[str], needed_files: set[tuple[str, str]],
                      in_use: set[str]) -> None:
    seg_root = root / SEGMENTS
    gone = []
    if seg_root.is_dir():
        for d in seg_root.iterdir():
            if d.name in needed:
                for f in d.glob("del-*.npy"):
                    if (d.name, f.name) not in needed_files:
                        f.unlink(missing_ok=True)
            elif d.name not in in_use:
                shutil.rmtree(d, ignore_errors=True)
                gone.append(d.name)
    stale = [s for s in meta.noted_segments() if s not in needed and s not in in_use]
    gone = sorted(set(gone) | set(stale))
    if gone:
        meta.drop_segments(gone)
    for p in root.iterdir():  # temp files a crash left behind
        if p.name.endswith(".tmp") and p.name.startswith("."):
            p.unlink(missing_ok=True) if p.is_file() else shutil.rmtree(p, ignore_errors=True)


def highest_segment(root: Path, meta: MetaDB) -> int:
    """The highest segment number on disk or in the database (a crashed write's included)."""
    d = Path(root) / SEGMENTS
    nums = [int(p.name[1:]) for p in d.iterdir() if p.name[1:].isdigit()] if d.is_dir() else []
    nums += [int(s[1:]) for s in meta.noted_segments() if s[1:].isdigit()]
    return max(nums, default=-1)


def next_version(root: Path, prev: dict | None) -> str:
    """The name of the next version: one above every version folder (a crashed write's included) and
    the live one."""
    nums = [version_number(v) for v in list_versions(root)]
    if prev is not None:
        nums.append(version_number(prev["version"]))
    return version_name(max(nums, default=0) + 1)


__all__ = ["collect", "kept_versions", "highest_segment", "next_version"]
