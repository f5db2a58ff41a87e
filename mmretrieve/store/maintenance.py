"""Maintenance front doors: compact, roll back, verify, repair, list versions (``mmretrieve index compact|
rollback|verify|versions``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from mmretrieve.errors import IndexCorruptedError
from mmretrieve.store import io
from mmretrieve.store.layout import (
    MANIFEST,
    list_versions,
    read_live,
    read_manifest,
    read_version,
    repair_hint,
    resolve_index_path,
    version_summaries,
)
from mmretrieve.store.lock import writer_lock
from mmretrieve.store.verify import verify_all_versions, verify_version
from mmretrieve.store.verify import verify_index as _verify
from mmretrieve.store.writer import IndexWriter, rollback

log = logging.getLogger(__name__)


def repair_index(name_or_path: str | os.PathLike, *, index_dir=None) -> dict | None:
    """Restore an unreadable live manifest (empty, damaged, edited, missing) from the newest retained
    version whose manifest matches its checksum and whose files all verify, published atomically
    (``os.replace``) under the writer's lock. Returns None when the live manifest is intact, else
    ``{"restored": version, "reason": why the live one was refused, "refused": [(version, why), ...]}``."""
    path = resolve_index_path(name_or_path, index_dir)
    try:
        read_live(path)  # IndexNotFoundError for a folder that is no index
        return None
    except IndexCorruptedError:
        pass
    with writer_lock(path):
        try:
            read_live(path)
            return None  # another process repaired it meanwhile
        except IndexCorruptedError as e:
            reason = str(e).replace(repair_hint(path), "")
        refused = []
        for v in reversed(list_versions(path)):
            try:
                m = read_version(path, v)
                verify_version(path, m)
            except IndexCorruptedError as e:
                refused.append((v, str(e)))
                continue
            io.write_json_atomic(path / MANIFEST, m)
            log.warning("%s: the live manifest was unreadable (%s); restored %s, the newest intact version kept",
                        path, reason, v)
            return {"restored": v, "reason": reason, "refused": refused}
    why = "; ".join(f"{v}: {r}" for v, r in refused) or "it keeps none"
    raise IndexCorruptedError(f"{Path(path) / MANIFEST}: unreadable ({reason}), and no version the index keeps is "
                              f"intact ({why}); rebuild it with `mmretrieve index build ... --overwrite`")


def compact_index(name_or_path: str | os.PathLike, *, index_dir=None, everything: bool = False) -> dict | None:
    """Merge segments by the tiered policy (``everything``: into one, deleted rows dropped); returns the new
    live manifest, or None when nothing needed merging."""
    return IndexWriter(resolve_index_path(name_or_path, index_dir), auto_compact=False).compact(everything=everything)


def rollback_index(name_or_path: str | os.PathLike, version: str = "previous", *, index_dir=None) -> dict:
    """Publish a new version with the content of a retained older one (``previous`` by default; its
    manifest's checksum is checked first). An unreadable live manifest is repaired first
    (``repair_index``); with ``previous``, that repair is the rollback."""
    path = resolve_index_path(name_or_path, index_dir)
    fixed = repair_index(path)
    if fixed is not None and version in ("previous", fixed["restored"]):
        return read_manifest(path)
    return rollback(path, version)


def verify_index(name_or_path: str | os.PathLike, *, index_dir=None, version: str | None = None,
                 all_versions: bool = False) -> dict | list[dict]:
    """Check every byte of a version (or of every retained one); raises ``IndexCorruptedError`` naming the
    first bad file or row."""
    path = resolve_index_path(name_or_path, index_dir)
    return verify_all_versions(path) if all_versions else _verify(path, version=version)


def index_versions(name_or_path: str | os.PathLike, *, index_dir=None) -> list[dict[str, Any]]:
    path = resolve_index_path(name_or_path, index_dir)
    read_manifest(path)
    return version_summaries(path)


__all__ = ["compact_index", "rollback_index", "verify_index", "repair_index", "index_versions"]
