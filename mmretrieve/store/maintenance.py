"""Maintenance front doors: compact, roll back, verify, list versions (``mmretrieve index compact|rollback|
verify|versions``)."""

from __future__ import annotations

import os
from typing import Any

from mmretrieve.store.layout import read_manifest, resolve_index_path, version_summaries
from mmretrieve.store.verify import verify_all_versions
from mmretrieve.store.verify import verify_index as _verify
from mmretrieve.store.writer import IndexWriter, rollback


def compact_index(name_or_path: str | os.PathLike, *, index_dir=None, everything: bool = False) -> dict | None:
    """Merge segments by the tiered policy (``everything``: into one, deleted rows dropped); returns the new
    live manifest, or None when nothing needed merging."""
    return IndexWriter(resolve_index_path(name_or_path, index_dir), auto_compact=False).compact(everything=everything)


def rollback_index(name_or_path: str | os.PathLike, version: str = "previous", *, index_dir=None) -> dict:
    """Publish a new version with the content of a retained older one (``previous`` by default)."""
    return rollback(resolve_index_path(name_or_path, index_dir), version)


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


__all__ = ["compact_index", "rollback_index", "verify_index", "index_versions"]
