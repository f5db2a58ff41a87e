"""``Index.export``: an index, or the items that meet a filter, written out as CSV, JSONL, a webdataset tar
or a folder of symlinks (``mmretrieve index export``).

- ``csv`` / ``jsonl``: one row per item (``id``, ``key``, ``uri``, ``kind``, ``caption`` and the metadata
  fields a hit carries); see ``mmretrieve.export``.
- ``wds``: a webdataset tar: per item ``<name>.<ext>`` (the file's bytes; a shard member's bytes) and
  ``<name>.json`` (the row). ``<name>`` is the key made safe (``export.safe_name``: no dots, slashes or
  control characters; collisions get ``_<id>``); members are plain files, owner 0, mode 0644.
- ``links``: a new folder of symlinks ``<name>.<ext>`` to the items' files (items inside shards, and
  items with no file of their own, cannot be linked and are reported).

Items whose file is missing are skipped and reported (``ExportReport.skipped``). Every format is written to
a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmretrieve.errors import UsageError
from mmretrieve.export import ITEM_FIELDS, UniqueNames, atomic_path, flat_row, format_of, write_rows
from mmretrieve.index.search import metadata_of
from mmretrieve.media.shards import read_member, split_member_uri

log = logging.getLogger(__name__)

FORMATS = ("csv", "jsonl", "wds", "links")
#: items read from the metadata database per query
CHUNK = 1000


@dataclass
class ExportReport:
    path: str
    format: str
    written: int = 0
    #: (key, reason) of each item left out
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "written": self.written,
                "skipped": [{"key": k, "reason": r} for k, r in self.skipped]}


def iter_items(index, where=None, limit: int | None = None) -> Iterator:
    """The live items of ``index`` (those meeting ``where``: a filter or a ``Selection``), by id, at most
    ``limit``. The filter is checked before the first item is read."""
    if limit is not None and limit < 1:
        raise UsageError(f"limit must be at least 1 (got {limit})")
    sel = None if where is None else index.select(where)
    return _items(index, sel, limit)


def _items(index, sel, limit):
    n = 0
    if sel is None:
        source = index.meta.iter_items()
    else:
        source = (it for s in range(0, len(sel.ids), CHUNK)
                  for it in _in_order(index.items(sel.ids[s:s + CHUNK].tolist())))
    for it in source:
        if limit is not None and n >= limit:
            return
        n += 1
        yield it


def _in_order(items: dict) -> list:
    return [items[i] for i in sorted(items)]


def item_row(it) -> dict[str, Any]:
    return flat_row({n: getattr(it, n) for n in ITEM_FIELDS}, metadata_of(it))


def export_index(index, path: str | os.PathLike, *, where=None, format: str | None = None,
                 limit: int | None = None) -> ExportReport:
    """Write ``index``'s items (those meeting ``where``; the first ``limit``) to ``path``. See the module."""
    fmt = format if format is not None else ("links" if Path(path).suffix == "" else None)
    fmt = format_of(path, fmt, FORMATS)
    items = iter_items(index, where, limit)
    report = ExportReport(str(path), fmt)
    if fmt in ("csv", "jsonl"):
        report.written = write_rows(path, (item_row(it) for it in items), fmt)
    elif fmt == "wds":
        with atomic_path(path) as tmp:
            _write_tar(tmp, items, report)
    else:
        with atomic_path(path, directory=True) as tmp:
            _write_links(tmp, items, report)
    if report.skipped:
        log.warning("export to %s: %d item(s) skipped (first: %s: %s)", path, len(report.skipped), *report.skipped[0])
    return report


def media_suffix(uri: str) -> str:
    """``jpg``, ``png`` ... from a file name (``jpeg`` -> ``jpg``), ``bin`` when it has none usable."""
    ext = Path(str(uri).rpartition("#")[2] if ".tar#" in str(uri) else str(uri)).suffix.lower().lstrip(".")
    ext = {"jpeg": "jpg", "tif": "tiff"}.get(ext, ext)
    return ext if ext.isalnum() and ext.isascii() and len(ext) <= 8 else "bin"


def _read(uri: str) -> bytes:
    if split_member_uri(uri) is not None:
        return read_member(uri)
    if "://" in uri:
        raise FileNotFoundError("no local file (a remote or imported item)")
    with open(uri, "rb") as f:
        return f.read()


def tar_member(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    """A plain file member: owner 0, mode 0644, no user or group names."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.type = int(size), int(mtime), 0o644, tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _write_tar(tmp: Path, items, report: ExportReport) -> None:
    names = UniqueNames()
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for it in items:
            try:
                data = _read(it.uri)
            except OSError as e:
                report.skipped.append((it.key, f"{type(e).__name__}: {e.strerror or e}"))
                continue
            name = names(it.key, it.id)
            meta = json.dumps(item_row(it), ensure_ascii=False, default=str).encode()
            mtime = it.mtime or it.added_at or 0
            tar.addfile(tar_member(f"{name}.{media_suffix(it.uri)}", len(data), mtime), io.BytesIO(data))
            tar.addfile(tar_member(f"{name}.json", len(meta), mtime), io.BytesIO(meta))
            report.written += 1


def _write_links(tmp: Path, items, report: ExportReport) -> None:
    names = UniqueNames()
    for it in items:
        uri = str(it.uri)
        if split_member_uri(uri) is not None or "://" in uri:
            report.skipped.append((it.key, "not a file of its own (a shard member or a remote item): use --format wds"))
            continue
        target = Path(uri).resolve()
        if not target.is_file():
            report.skipped.append((it.key, "the file is missing"))
            continue
        os.symlink(target, tmp / f"{names(it.key, it.id)}.{media_suffix(uri)}")
        report.written += 1


__all__ = ["ExportReport", "FORMATS", "export_index", "item_row", "iter_items", "media_suffix", "tar_member"]
