"""The on-disk layout of an index (format 2): immutable segments, small version manifests, one SQLite
database written incrementally -- the shape of Lucene, Milvus and Lance.

A named index is a directory::

    manifest.json          the live version (replaced atomically with ``os.replace``): format, encoder
                           (name, dim, identity), metric, factory, vector dtype, counts, and the list of
                           segments with their row counts, deletion files and the size + sha256 of
                           every file (computed while it was written)
    v0007/manifest.json    the manifest of every retained version (the live one included); each manifest
                           carries the sha256 of its own content (``checksum``), checked on every read
    segments/s000012/      one write's batch, never changed after it is written:
        ids.npy            int64 external ids of the rows
        vectors.npy        Flat: the raw vectors, fp32 or fp16 (memory-mapped by readers)
        index.faiss        other factories: the segment's FAISS index (IVF on the shared trained
                           template, HNSW per segment, PQ/SQ codes), external ids inside
        patches.npy        optional fp16 patch features, one row per vector row
        frames.npy         optional fp16 per-frame embeddings of the segment's videos
        frames_ts.npy      their timestamps
        del-v0009.npy      rows deleted as of version v0009 (copy-on-write: a new file per version that
                           deletes from this segment; older versions keep theirs)
    template.faiss         non-Flat factories: the trained, empty FAISS index every segment is cloned from
    patch_proj.npy         optional fixed projection of patch features
    meta.sqlite            items (id, key, uri, kind, ..., the segment and row that hold each), skipped
                           inputs: one database in WAL mode, rows added per write, never copied
    leases/                readers' leases (pid, process start time, version)
    .lock                  the single-writer lock;  .gc.lock  lease registration vs. file collection

**Visibility.** A version sees the rows of the segments its manifest lists, minus the rows its
deletion files list. Every segment row has exactly one metadata row (``segment``, ``row``); an item
updated in a Flat index keeps its id (old row deleted, new row in the new segment); other factories
give it a new id. Rows of segments that no retained version lists are removed with the segment.

**Writes** cost O(batch): a write adds its batch as new segment(s) and, for deletions, one small
deletion file per touched segment, inserts the batch's metadata rows in one transaction, then
publishes a new manifest (``vNNNN/manifest.json``, then ``manifest.json`` replaced). A crash at any
point leaves the previous version (SQLite rolls the transaction back; unreferenced segment folders are
collected by the next writer). A write that changes nothing publishes nothing.

**Opening** is O(segments): the manifest (against its own checksum), the headers and sizes of the
segment files, and every byte of the small files read whole (deletion files, the patch projection)
against their sha256s are checked; an unreadable live manifest is restored from the newest intact
retained one by ``mmretrieve index verify NAME --repair`` (or ``rollback``); ``verify="full"`` (``mmretrieve index verify``) checks every byte against the
sha256s and the metadata rows against their own checksums.

**Snapshots that last.** An open ``Index`` registers a lease (pid + start time + version) under
``.gc.lock``; files are collected only when no retained version (``retain``, default 2: the live one
and the previous) and no live lease needs them. A dead process's lease is ignored.

**Compaction** (``mmretrieve index compact``, and automatically after writes) merges segments and drops
deleted rows; the tiered policy merges ``MERGE_FACTOR`` (10) segments of the same size tier
(``floor(log10(rows))``), so every row is rewritten at most once per tier: at most ``ceil(log10 N) + 1``
times over its life, and at most 9 segments stay per tier. A segment with half its rows deleted is
rewritten on its own.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from mmretrieve import settings
from mmretrieve.errors import (
    EncoderMismatchError,
    IndexCorruptedError,
    IndexNotFoundError,
    UsageError,
    VersionNotFoundError,
)

FORMAT = "mmretrieve-index"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
META = "meta.sqlite"
SEGMENTS = "segments"
LEASES = "leases"
TEMPLATE = "template.faiss"
DEFAULT_FACTORY = "Flat"
DEFAULT_RETAIN = 2
VERSION_RE = re.compile(r"^v(\d{4,})$")
VECTOR_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16"}

# Tests set this to a callable(stage) to simulate a crash between the steps of a write.
_CRASH_HOOK = None


def crash_point(stage: str) -> None:
    if _CRASH_HOOK is not None:
        _CRASH_HOOK(stage)


# ---- paths ---------------------------------------------------------------------------------------
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


def version_name(n: int) -> str:
    return f"v{n:04d}"


def version_number(name: str) -> int:
    m = VERSION_RE.match(str(name))
    if not m:
        raise UsageError(f"not a version name: {name!r} (expected e.g. v0007)")
    return int(m.group(1))


def segment_dir(root: Path, sid: str) -> Path:
    return root / SEGMENTS / sid


# ---- manifests -------------------------------------------------------------------------------------
def _load_json(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        if not raw.strip():
            raise IndexCorruptedError(f"{path}: unreadable manifest (empty: {len(raw)} bytes)")
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise IndexCorruptedError(f"{path}: unreadable manifest (not UTF-8: {e})") from None
    except (OSError, json.JSONDecodeError, RecursionError) as e:
        raise IndexCorruptedError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(data, dict):
        raise IndexCorruptedError(f"{path}: unreadable manifest (not a JSON object)")
    return data


def manifest_checksum(m: dict) -> str:
    """The sha256 of a manifest's content (everything but its ``checksum``), as canonical JSON: the same
    for the dict written and the dict read back."""
    body = json.dumps({k: v for k, v in m.items() if k != "checksum"}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True, allow_nan=False)
    return "sha256:" + hashlib.sha256(body.encode()).hexdigest()


def seal_manifest(m: dict) -> dict:
    """``m`` with its own checksum (every manifest a writer publishes, live and retained copy alike)."""
    return {**m, "checksum": manifest_checksum(m)}


def check_format(m: dict, mpath: Path, hint: str = "") -> dict:
    """Format, version, required keys and (when it has one) the manifest's own checksum. A manifest
    written before checksums has none and is accepted (``verify`` says so)."""
    if m.get("format") != FORMAT:
        raise IndexCorruptedError(f"{mpath}: not an mmretrieve manifest{hint}")
    fv = int(m.get("format_version", 0) or 0)
    if fv > FORMAT_VERSION:
        raise IndexCorruptedError(
            f"{mpath}: format version {fv} is newer than this mmretrieve understands ({FORMAT_VERSION}); upgrade mmretrieve")
    if fv < FORMAT_VERSION:
        raise IndexCorruptedError(
            f"{mpath}: format version {fv} (one FAISS file per version, mmretrieve <= 0.1) is not read by this "
            f"mmretrieve (format {FORMAT_VERSION}: segments). Rebuild it from its source with `mmretrieve index "
            f"build {mpath.parent.name} SOURCE --overwrite` (the same command that built it, plus --overwrite)")
    for key in ("version", "encoder", "segments", "counts"):
        if key not in m:
            raise IndexCorruptedError(f"{mpath}: manifest lacks {key!r}{hint}")
    if "checksum" in m:
        try:
            ok = manifest_checksum(m) == m["checksum"]
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise IndexCorruptedError(f"{mpath}: the manifest does not match its checksum (edited or corrupted){hint}")
    return m


def read_version(path: Path, version: str) -> dict:
    """The manifest of a retained version (``v0007``), read from its own folder, its checksum checked."""
    version_number(version)
    vpath = Path(path) / version / MANIFEST
    if not vpath.is_file():
        kept = ", ".join(list_versions(path)) or "none"
        raise VersionNotFoundError(f"index {path} does not keep version {version} (kept: {kept})")
    return check_format(_load_json(vpath), vpath)


def repair_hint(path: Path) -> str:
    return (f"; `mmretrieve index verify {path} --repair` (or `mmretrieve index rollback {path}`) restores the "
            "newest intact version the index keeps")


def read_live(path: Path) -> dict:
    """The live manifest; unreadable, it is an ``IndexCorruptedError`` naming it and the way to repair it
    when the index keeps versions to repair it from."""
    path = Path(path)
    mpath = path / MANIFEST
    hint = repair_hint(path) if list_versions(path) else ""
    if not mpath.is_file():
        if hint:
            raise IndexCorruptedError(f"{mpath}: missing{hint}")
        if path.is_dir():
            raise IndexNotFoundError(f"{path} is not an mmretrieve index (no {MANIFEST})")
        raise IndexNotFoundError(f"index not found: {path}")
    try:
        m = _load_json(mpath)
    except IndexCorruptedError as e:
        raise IndexCorruptedError(f"{e}{hint}") from None
    return check_format(m, mpath, hint)


def read_manifest(path: Path, version: str | None = None) -> dict:
    """The live manifest of the index at ``path`` (or a retained ``version``, e.g. ``v0007``, read from its
    own folder: a damaged live manifest does not hide the versions kept)."""
    path = Path(path)
    if version not in (None, "", "live", "previous"):
        if not (path / MANIFEST).is_file() and not list_versions(path):
            raise IndexNotFoundError(f"index not found: {path}")
        return read_version(path, version)
    live = read_live(path)
    if version == "previous":
        version = live.get("previous")
        if not version:
            raise VersionNotFoundError(f"index {path} has no previous version ({live['version']} is the first)")
        return read_version(path, version)
    return live


def list_versions(path: Path) -> list[str]:
    """The retained versions, oldest first."""
    path = Path(path)
    if not path.is_dir():
        return []
    out = [p.name for p in path.iterdir() if VERSION_RE.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(out, key=version_number)


def version_summaries(path: Path) -> list[dict[str, Any]]:
    """One line of facts per retained version (for ``mmretrieve index versions``)."""
    live = read_manifest(path)["version"]
    out = []
    for v in list_versions(path):
        try:
            m = check_format(_load_json(path / v / MANIFEST), path / v / MANIFEST)
            out.append({"version": v, "live": v == live, "updated_at": m.get("updated_at"),
                        "items": m["counts"].get("items"), "segments": len(m["segments"]),
                        "operation": m.get("operation")})
        except IndexCorruptedError as e:
            out.append({"version": v, "live": v == live, "error": str(e)})
    return out


# ---- encoder identity ------------------------------------------------------------------------------
def check_encoder_compat(built: dict, query: dict, where: Path | str) -> None:
    """Raise ``EncoderMismatchError`` naming the first field that differs. An index of imported vectors
    (``imported: true``) is checked on name and dim only."""
    bname, qname, bdim, qdim = built.get("name"), query.get("name"), built.get("dim"), query.get("dim")
    if bdim != qdim or bname != qname:
        msg = f"index {where} was built with encoder {bname!r} (dim {bdim}); the query encoder is {qname!r} (dim {qdim})"
        if bdim != qdim:
            msg += f": expected dim {bdim}, got {qdim}"
        raise EncoderMismatchError(msg)
    if built.get("imported"):
        return
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
        f"{c.get('items', 0)} items ({c.get('skipped', 0)} skipped), {len(m.get('segments', []))} segment(s), "
        f"version {m.get('version')}"
    )


@functools.cache
def pkg_version() -> str:
    """The installed mmretrieve's version (read once: importlib.metadata costs ~3 ms per call, measured
    as a tenth of a small add)."""
    try:
        from importlib.metadata import version

        return version("mmretrieve")
    except Exception:
        return "unknown"


__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "META", "DEFAULT_FACTORY", "DEFAULT_RETAIN", "read_manifest",
           "read_live", "read_version", "seal_manifest", "manifest_checksum", "repair_hint",
           "list_versions", "version_summaries", "resolve_index_path", "default_index_dir", "check_encoder_compat",
           "describe_manifest", "crash_point", "version_name", "version_number", "segment_dir"]
