"""Collections: a folder (recursive) or a manifest (CSV or JSONL with ``path``, optional ``id``, ``caption``)."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmretrieve.errors import InputError, ManifestError, SourceNotFoundError
from mmretrieve.media.images import IMAGE_EXTENSIONS

#: image formats we recognise by extension but refuse to decode (outside the allowlist); attempting them
#: records a clear skip reason instead of silently ignoring the file
REFUSED_IMAGE_EXTENSIONS = frozenset(
    {".psd", ".eps", ".ps", ".fits", ".fit", ".fts", ".ico", ".icns", ".tga", ".pcx", ".dds", ".sgi", ".xbm",
     ".xpm", ".im", ".msp", ".spi", ".jp2", ".j2k", ".heic", ".heif", ".avif", ".svg", ".dcx", ".cur", ".wmf", ".emf"}
)
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg"})


@dataclass
class SourceItem:
    key: str
    uri: str  # absolute path
    kind: str = "image"
    caption: str | None = None
    size: int | None = None
    mtime: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScanResult:
    items: list[SourceItem]
    ignored: int = 0  # files with extensions that are not media (README.txt, .DS_Store, ...)
    missing: list[SourceItem] = field(default_factory=list)  # manifest rows whose file does not exist


def media_kind(path: str | Path) -> str | None:
    ext = Path(path).suffix.lower()
    if ext in IMAGE_EXTENSIONS or ext in REFUSED_IMAGE_EXTENSIONS:
        return "image"
    if ext in VIDEO_EXTENSIONS:
        return "video"
    return None


def _stat(item: SourceItem) -> bool:
    try:
        st = os.stat(item.uri)
    except OSError:
        return False
    item.size, item.mtime = st.st_size, st.st_mtime
    return True


def scan_source(source: str | os.PathLike, *, kinds: tuple[str, ...] = ("image", "video")) -> ScanResult:
    """List the media of a folder (recursive, sorted, hidden files skipped) or of a manifest file."""
    src = Path(source).expanduser()
    if not src.exists():
        raise SourceNotFoundError(f"source not found: {src}")
    if src.is_dir():
        return _scan_folder(src, kinds)
    suffix = src.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _scan_manifest(src, _read_csv(src))
    if suffix in (".jsonl", ".ndjson"):
        return _scan_manifest(src, _read_jsonl(src))
    if media_kind(src):
        it = SourceItem(key=str(src.resolve()), uri=str(src.resolve()), kind=media_kind(src) or "image")
        _stat(it)
        return ScanResult([it])
    raise InputError(f"{src}: expected a folder, a .csv/.jsonl manifest, or a media file")


def _scan_folder(root: Path, kinds: tuple[str, ...]) -> ScanResult:
    items, missing, ignored = [], [], 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            p = Path(dirpath) / fn
            kind = media_kind(p)
            if kind is None or kind not in kinds:
                ignored += 1
                continue
            uri = str(p.resolve())
            it = SourceItem(key=uri, uri=uri, kind=kind)
            if _stat(it):
                items.append(it)
            else:  # a dangling link, or a file gone since the listing: reported as not found
                missing.append(SourceItem(key=str(p.absolute()), uri=str(p.absolute()), kind=kind))
    return ScanResult(items, missing=missing, ignored=ignored)


def _read_csv(path: Path) -> list[tuple[int, dict[str, Any]]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        delim = "\t" if path.suffix.lower() == ".tsv" else ","
        reader = csv.DictReader(fh, delimiter=delim)
        if not reader.fieldnames or "path" not in [f.strip() for f in reader.fieldnames]:
            raise ManifestError(f"{path}: a manifest needs a 'path' column (found: {reader.fieldnames})")
        # reader.line_num: the physical line a row ends on (blank lines and quoted newlines counted)
        return [(reader.line_num, {k.strip(): v for k, v in row.items() if k}) for row in reader]


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{path}:{i}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ManifestError(f"{path}:{i}: expected a JSON object per line")
            rows.append((i, row))
    return rows


def _scan_manifest(path: Path, rows: list[tuple[int, dict[str, Any]]]) -> ScanResult:
    base = path.parent.resolve()
    items, missing, seen = [], [], {}
    for line, row in rows:
        p = row.get("path")
        if not p or not str(p).strip():
            raise ManifestError(f"{path}:{line}: empty 'path'")
        full = Path(str(p).strip())
        full = full if full.is_absolute() else base / full
        uri = str(full.resolve())
        key = str(row.get("id")).strip() if row.get("id") not in (None, "") else uri
        if key in seen:
            raise ManifestError(f"{path}:{line}: duplicate id {key!r} (first on line {seen[key]})")
        seen[key] = line
        caption = row.get("caption")
        kind = media_kind(uri) or "image"
        extra = {k: v for k, v in row.items() if k not in ("path", "id", "caption") and v not in (None, "")}
        it = SourceItem(key=key, uri=uri, kind=kind, caption=str(caption) if caption not in (None, "") else None, extra=extra)
        if _stat(it):
            items.append(it)
        else:
            missing.append(it)
    return ScanResult(items, missing=missing)
