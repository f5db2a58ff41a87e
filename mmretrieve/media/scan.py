"""Collections: a folder (recursive) or a manifest (CSV or JSONL with ``path``, optional ``id``, ``caption``)."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import re
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
    #: the image's bytes when it comes from a shard (webdataset, parquet), read as the shard streams
    data: bytes | None = field(default=None, repr=False)


@dataclass
class ScanResult:
    """What a scan found. Every media entry lands in exactly one list, so ``count`` is exact:
    ``items`` (to index), ``missing`` (not found: manifest rows, dangling links), ``skipped`` (entries that
    cannot be indexed, with the reason: symlink loops, undecodable names, unreadable folders) and
    ``aliases`` (another path of a file already listed: indexed once)."""

    items: list[SourceItem]
    ignored: int = 0  # files with extensions that are not media (README.txt, .DS_Store, ...)
    missing: list[SourceItem] = field(default_factory=list)  # manifest rows whose file does not exist
    skipped: list[tuple[SourceItem, str]] = field(default_factory=list)
    #: (the alias, the path it duplicates): the same file reached twice (a symlink, a hard link, a repeated row)
    aliases: list[tuple[str, str]] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Media entries seen (everything but the ignored non-media files)."""
        return len(self.items) + len(self.missing) + len(self.skipped) + len(self.aliases)


#: ``Item.extra`` names mmretrieve writes itself (frame entries, videos); a manifest column may not take them
RESERVED_COLUMNS = frozenset({"video", "timestamp", "duration", "fps", "frames", "symlink"})


def media_kind(path: str | Path) -> str | None:
    ext = Path(path).suffix.lower()
    if ext in IMAGE_EXTENSIONS or ext in REFUSED_IMAGE_EXTENSIONS:
        return "image"
    if ext in VIDEO_EXTENSIONS:
        return "video"
    return None


def shown(path: str | os.PathLike) -> str:
    """A path as valid text: bytes that are not UTF-8 (``os.fsdecode``'s surrogates) become ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def valid_text(s: str) -> bool:
    """Whether ``s`` can be stored as UTF-8 text (no lone surrogates from undecodable bytes)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _stat(item: SourceItem) -> bool:
    try:
        st = os.stat(item.uri)
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return False
    item.size, item.mtime = st.st_size, st.st_mtime
    return True


def scan_source(source: str | os.PathLike, *, kinds: tuple[str, ...] = ("image", "video")) -> ScanResult:
    """List the media of a folder (recursive, sorted, hidden files skipped) or of a manifest file.
    One bad entry never stops a scan: it is reported in ``skipped`` / ``missing`` with its reason."""
    src = Path(source).expanduser()
    if not src.exists():
        raise SourceNotFoundError(f"source not found: {shown(src)}")
    if src.is_dir():
        return _scan_folder(src, kinds)
    suffix = src.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _scan_manifest(src, _read_csv(src))
    if suffix in (".jsonl", ".ndjson"):
        return _scan_manifest(src, _read_jsonl(src))
    if media_kind(src):
        out = ScanResult([])
        _add_file(out, {}, str(src), media_kind(src) or "image")
        return out
    raise InputError(f"{shown(src)}: expected a folder, a .csv/.jsonl manifest, or a media file")


def _scan_folder(root: Path, kinds: tuple[str, ...]) -> ScanResult:
    out = ScanResult([])
    seen: dict[tuple[int, int], tuple[int, str]] = {}  # (device, inode) -> (position in items, path)
    folder = (os.path.abspath(root), str(root.resolve()))

    def unlistable(e: OSError) -> None:
        where = shown(e.filename or root)
        out.skipped.append((SourceItem(key=where, uri=where, kind="folder"), f"cannot list folder: {e.strerror or e}"))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=unlistable):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            kind = media_kind(fn)
            if kind is None or kind not in kinds:
                out.ignored += 1
                continue
            _add_file(out, seen, os.path.join(dirpath, fn), kind, folder)
    return out


def _add_file(out: ScanResult, seen: dict, p: str, kind: str, folder: tuple[str, str] | None = None) -> None:
    """One folder entry -> ``out.items`` / ``missing`` / ``skipped`` / ``aliases`` (never raises).

    ``folder``: (the folder as given, its real path). A file reached through a symbolic link to a place
    outside the folder is keyed by its real path; ``extra["symlink"]`` keeps the link's path (under the
    folder's real path), so ``index add`` can tell that the item came from this folder and prune it once
    the link is gone."""
    here = os.path.abspath(p)
    if not valid_text(here):
        out.skipped.append((SourceItem(key=shown(here), uri=shown(here), kind=kind),
                            "file name is not valid UTF-8 (shown with \\x escapes); rename the file to index it"))
        return
    try:
        st = os.stat(here)  # follows links
        uri = str(Path(here).resolve(strict=True))
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) or getattr(e, "errno", None) == errno.ELOOP:
            out.skipped.append((SourceItem(key=here, uri=here, kind=kind), "symlink loop"))
        elif getattr(e, "errno", None) in (errno.ENOENT, errno.ENOTDIR):  # a dangling link, or gone since the listing
            out.missing.append(SourceItem(key=here, uri=here, kind=kind))
        else:
            out.skipped.append((SourceItem(key=here, uri=here, kind=kind), f"cannot read: {e.strerror or e}"))
        return
    if not valid_text(uri):
        out.skipped.append((SourceItem(key=here, uri=here, kind=kind),
                            f"links to {shown(uri)}, whose name is not valid UTF-8; rename it to index it"))
        return
    ino = (st.st_dev, st.st_ino)
    if ino in seen:  # the same file again (a symlink or a hard link): indexed once, under its real path
        pos, first = seen[ino]
        if here == uri and first != out.items[pos].uri:  # the file itself, after a link to it: the link is the alias
            out.aliases.append((first, here))
            seen[ino] = (pos, here)
        else:
            out.aliases.append((here, first))
        return
    seen[ino] = (len(out.items), here)
    extra = {}
    if folder is not None and not uri.startswith(folder[1].rstrip(os.sep) + os.sep):
        extra["symlink"] = os.path.join(folder[1], os.path.relpath(here, folder[0]))
    out.items.append(SourceItem(key=uri, uri=uri, kind=kind, size=st.st_size, mtime=st.st_mtime, extra=extra))


def _read_text(path: Path) -> str:
    """The manifest as text; a file that is not UTF-8 is refused naming the line of the first bad byte."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ManifestError(f"{path}: cannot read the manifest ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ManifestError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                            "save the manifest as UTF-8") from None


_CSV_INT = re.compile(r"-?(?:0|[1-9][0-9]{0,17})")
_CSV_FLOAT = re.compile(r"-?(?:0|[1-9][0-9]*)\.[0-9]+(?:[eE][+-]?[0-9]+)?")


def csv_value(v: str) -> Any:
    """A CSV manifest's extra column value, typed: a number written as one (``2020``, ``-3``, ``0.25``)
    becomes a number, so a filter compares it as one; anything else (``02134``, ``1e5``, ``+3``, ``1,5``,
    ``true``) stays text."""
    if _CSV_INT.fullmatch(v):
        return int(v)
    if _CSV_FLOAT.fullmatch(v):
        return float(v)
    return v


def _read_csv(path: Path) -> list[tuple[int, dict[str, Any]]]:
    text = _read_text(path)
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim, strict=True)
    rows, start = [], 1
    try:
        header = next(reader, None)
        if not header or "path" not in [f.strip() for f in header]:
            raise ManifestError(f"{path}: a manifest needs a 'path' column (found: {header})")
        names = [f.strip() for f in header]
        start = reader.line_num + 1
        for values in reader:
            # reader.line_num: the physical line a row ends on (blank lines and quoted newlines counted)
            if values:
                rows.append((reader.line_num, {k: (v if k in ("path", "id", "caption") else csv_value(v))
                                               for k, v in zip(names, values) if k}))
            start = reader.line_num + 1
    except csv.Error as e:
        hint = " (a quote that is never closed?)" if "end of data" in str(e) else ""
        raise ManifestError(f"{path}:{start}: malformed CSV row: {e}{hint}") from None
    return rows


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for i, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise ManifestError(f"{path}:{i}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise ManifestError(f"{path}:{i}: expected a JSON object per line, got {type(row).__name__}")
        rows.append((i, row))
    return rows


def _text_field(path: Path, line: int, row: dict, name: str) -> str | None:
    """A row's ``path`` / ``id`` / ``caption`` as text, or None when empty; refused (with file, line and
    column) when it is not a string or a number, holds a NUL byte or is not valid Unicode."""
    v = row.get(name)
    if v is None or v == "":
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise ManifestError(f"{path}:{line}: column {name!r} must be text, got {type(v).__name__}")
    v = str(v).strip()
    if "\x00" in v:
        raise ManifestError(f"{path}:{line}: column {name!r} contains a NUL byte")
    if not valid_text(v):
        raise ManifestError(f"{path}:{line}: column {name!r} is not valid Unicode (a lone surrogate escape)")
    return v or None


def _scan_manifest(path: Path, rows: list[tuple[int, dict[str, Any]]]) -> ScanResult:
    base = path.parent.resolve()
    out = ScanResult([])
    seen: dict[str, int] = {}
    for line, row in rows:
        reserved = sorted(RESERVED_COLUMNS & set(row))
        if reserved:
            raise ManifestError(f"{path}:{line}: column {reserved[0]!r} is a name mmretrieve keeps for its own metadata "
                                f"({', '.join(sorted(RESERVED_COLUMNS))}); rename it, e.g. to 'user_{reserved[0]}'")
        p = _text_field(path, line, row, "path")
        if p is None:
            raise ManifestError(f"{path}:{line}: empty 'path'")
        full = Path(p).expanduser()
        full = full if full.is_absolute() else base / full
        explicit = _text_field(path, line, row, "id")
        try:
            uri = str(full.resolve())
        except (OSError, RuntimeError):
            where = str(full.absolute())
            out.skipped.append((SourceItem(key=explicit or where, uri=where, kind=media_kind(p) or "image"), "symlink loop"))
            continue
        key = explicit or uri
        if key in seen:
            if explicit is None:  # the same file listed twice without ids: indexed once
                out.aliases.append((f"{path}:{line}: {p}", f"line {seen[key]}"))
                continue
            raise ManifestError(f"{path}:{line}: duplicate id {key!r} (first on line {seen[key]})")
        seen[key] = line
        extra = {k: v for k, v in row.items() if k not in ("path", "id", "caption") and v not in (None, "")}
        it = SourceItem(key=key, uri=uri, kind=media_kind(uri) or "image", caption=_text_field(path, line, row, "caption"),
                        extra=extra)
        (out.items if _stat(it) else out.missing).append(it)
    return out
