"""The on-disk layout of an index: paths, the manifest, checksums, encoder identity.

A named index is a directory::

    manifest.json      the live version, encoder (name, dim, identity), metric, FAISS factory, counts,
                       sha256 + size of every file of the live version, format version
    v000N/index.faiss  FAISS IndexIDMap2 around the factory index: external ids stay stable under delete
    v000N/meta.sqlite  items (id, key, uri, kind, size, mtime, caption, ...), skipped inputs, tombstones
    v000N/patches-*.npy   optional fp16 patch features (rows referenced from meta), memory-mapped
    v000N/frames-*.npy    per-frame embeddings of videos (fp16) and frames-*.ts.npy their timestamps
    .lock              single-writer lock (flock)

A write builds ``v000{N+1}`` aside (unchanged side-store files are hard-linked, not copied), fsyncs it,
and only then swaps ``manifest.json`` with ``os.replace``. A crash at any point leaves the previous
version loadable; stray version folders and temp files are ignored by readers and removed by the next
write. Opening verifies every file's sha256 against the manifest (``verify=False`` skips it), checks that
FAISS' ``ntotal`` equals the metadata's item + tombstone count, and refuses a query encoder that differs
from the one that built the index.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from mmretrieve import settings
from mmretrieve.errors import EncoderMismatchError, IndexCorruptedError, IndexNotFoundError, UsageError

FORMAT = "mmretrieve-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_FACTORY = "Flat"
VERSION_RE = re.compile(r"^v(\d{4,})$")

# Tests set this to a callable(stage) to simulate a crash between the steps of a write.
_CRASH_HOOK = None


def crash_point(stage: str) -> None:
    if _CRASH_HOOK is not None:
        _CRASH_HOOK(stage)


def default_index_dir() -> Path:
    return settings.index_dir()


def resolve_index_path(name_or_path: str | os.PathLike, index_dir: str | os.PathLike | None = None) -> Path:
    """A bare name lives under the indexes home (``--index-dir``, ``$MMRETRIEVE_INDEX_DIR``, ``./indexes``);
    anything with a path separator, or an existing directory, is a path."""
    s = str(name_or_path)
    if not s:
        raise UsageError("empty index name")
    if os.sep in s or "/" in s or s.startswith(".") or (Path(s).is_dir() and (Path(s) / MANIFEST).is_file()):
        return Path(s)
    if not re.match(r"^[A-Za-z0-9_.\-]+$", s):
        raise UsageError(f"index name {s!r} may contain only letters, digits, '_', '-' and '.'")
    return (Path(index_dir) if index_dir else default_index_dir()) / s


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    crash_point("before-manifest-replace")
    os.replace(tmp, path)
    fsync_dir(path.parent)


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


def pkg_version() -> str:
    try:
        from importlib.metadata import version

        return version("mmretrieve")
    except Exception:
        return "unknown"


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)

