"""Full verification (``mmretrieve index verify NAME``, ``open_index(..., verify="full")``): every byte of
every file of a version against the sha256 recorded when it was written, the database's own integrity
check, FTS5's integrity-check of the full-text index (``store.fulltext``), every metadata row of the
version's segments against the checksum it was stored with, and the manifest of every retained version against its own checksum (a forged retained manifest would
otherwise be published by a rollback)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mmretrieve.errors import IndexCorruptedError
from mmretrieve.store import fulltext
from mmretrieve.store.io import sha256_file
from mmretrieve.store.layout import META, list_versions, read_manifest, read_version
from mmretrieve.store.meta import MetaDB, Visibility, row_crc
from mmretrieve.store.segments import SegmentFiles


def verify_metadata(path: Path, meta, segments, report: dict | None = None) -> int:
    """Integrity of the database, of its full-text index (FTS5's integrity-check) and the checksum of each
    of the snapshot's rows; returns rows checked (``report["fulltext"]``: the full-text check's status)."""
    try:
        res = meta._q("PRAGMA integrity_check")
    except IndexCorruptedError:
        raise
    except sqlite3.DatabaseError as e:
        raise IndexCorruptedError(f"{path / META}: integrity check failed ({e})") from None
    if res and res[0][0] != "ok":
        raise IndexCorruptedError(f"{path / META}: integrity check failed ({'; '.join(r[0] for r in res[:3])})")
    fts = fulltext.integrity_check(path / META)  # IndexCorruptedError when it is damaged
    if report is not None:
        report["fulltext"] = fts
    n = 0
    for seg in segments:
        rows = meta.rows_of(seg.sid)
        if len(rows) != seg.rows:
            raise IndexCorruptedError(f"{path / META}: segment {seg.sid} has {seg.rows} vectors but {len(rows)} metadata rows")
        for r in rows:
            if row_crc(tuple(r[:-1])) != r[-1]:
                raise IndexCorruptedError(f"{path / META}: the metadata row of item {r[0]} (segment {r[1]}, row {r[2]}) "
                                          "does not match its checksum (corrupted or modified)")
        n += len(rows)
    return n


def check_shared_files(path: Path, manifest: dict, *, full: bool) -> None:
    """The index-level files (FAISS template, patch projection) against their recorded sizes / sha256s."""
    for name, info in (manifest.get("files") or {}).items():
        p = path / name
        if not p.is_file():
            raise IndexCorruptedError(f"{p}: missing (listed in the manifest)")
        if p.stat().st_size != info["bytes"]:
            raise IndexCorruptedError(f"{p}: size {p.stat().st_size} bytes, manifest says {info['bytes']}")
        if full and sha256_file(p) != info["sha256"]:
            raise IndexCorruptedError(f"{p}: sha256 does not match the manifest (file corrupted or modified)")


def check_manifests(path: Path) -> list[str]:
    """Every retained version's manifest against its own checksum (``IndexCorruptedError`` naming the
    first that does not match); returns the versions whose manifest has none (written before checksums)."""
    unsealed = []
    for v in list_versions(path):
        if "checksum" not in read_version(path, v):
            unsealed.append(v)
    return unsealed


def verify_version(path: Path, m: dict) -> dict:
    """Check every byte of the version ``m`` describes; raises ``IndexCorruptedError`` naming the first bad
    file or row, else returns what was checked."""
    segments = [SegmentFiles(path, e, check="full") for e in m["segments"]]
    check_shared_files(path, m, full=True)
    meta = MetaDB.open_reader(path / META, Visibility({s.sid: s.deleted for s in segments}))
    try:
        checked: dict = {}
        rows = verify_metadata(path, meta, segments, checked)
    finally:
        meta.close()
    files = sum(len(s.files()) for s in segments) + len(m.get("files") or {})
    size = sum(f["bytes"] for s in segments for f in s.files().values()) + sum(
        f["bytes"] for f in (m.get("files") or {}).values())
    return {"index": str(path), "version": m["version"], "segments": len(segments), "files": files, "bytes": size,
            "rows": rows, "fulltext": checked.get("fulltext"), "manifest_checksum": "ok" if "checksum" in m else "none", "ok": True}


def verify_index(path: Path, *, version: str | None = None) -> dict:
    """Check every byte of a version (default: the live one) and every retained manifest; raises
    ``IndexCorruptedError`` naming the first bad file or row, else returns what was checked
    (``unsealed``: retained versions whose manifest predates manifest checksums)."""
    path = Path(path)
    res = verify_version(path, read_manifest(path, version))
    res["unsealed"] = check_manifests(path)
    return res


def verify_all_versions(path: Path) -> list[dict]:
    """``verify_index`` for every retained version, oldest first."""
    return [verify_index(path, version=v) for v in list_versions(Path(path))]


__all__ = ["verify_index", "verify_version", "check_manifests", "verify_metadata", "verify_all_versions", "check_shared_files"]
