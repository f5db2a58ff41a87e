"""Writing rows (items or hits) out as CSV or JSONL, atomically; safe names for files made from keys.

A row is a flat dict: the fixed fields (``id``, ``key``, ``uri``, ``kind``, ``caption``; ``score`` and
``rank`` for search results) and then the item's metadata fields (a metadata field named like a fixed one
is written as ``metadata.<name>``). CSV has the union of every row's columns (fixed first, then the
metadata fields in first-seen order); a cell that a spreadsheet would read as a formula (it starts with
``=``, ``+``, ``-``, ``@``, a tab or a carriage return) gets a leading ``'``; objects and lists are written
as JSON. JSONL keeps the values' JSON types. Either file is written to a temporary name next to the
target and renamed over it, so a reader never sees half a file.

>>> safe_name("../x\\n=cmd")
'x_cmd'
>>> csv_cell("=HYPERLINK(1)")
"'=HYPERLINK(1)"
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mmretrieve.errors import UsageError

log = logging.getLogger(__name__)

#: the formats rows are written as (``wds`` and ``links`` are whole-index formats: ``index.export``)
ROW_FORMATS = ("csv", "jsonl")
#: a cell starting with one of these is a formula to a spreadsheet
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
ITEM_FIELDS = ("id", "key", "uri", "kind", "caption")
HIT_FIELDS = ("id", "key", "uri", "kind", "caption", "score", "rank")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
#: longest name part made from a key (a file name's limit is 255 bytes)
MAX_NAME = 120


def format_of(path: str | os.PathLike, fmt: str | None, allowed: tuple[str, ...] = ROW_FORMATS) -> str:
    """The export format: ``fmt`` when given, else from the file's suffix (``.csv``, ``.jsonl`` / ``.ndjson``)."""
    if fmt is None:
        suffix = Path(path).suffix.lower()
        fmt = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".tar": "wds"}.get(suffix)
        if fmt is None or fmt not in allowed:
            raise UsageError(f"cannot tell the export format from {Path(path).name!r}: name it .csv or .jsonl "
                             f"or give the format ({', '.join(allowed)})")
    if fmt not in allowed:
        raise UsageError(f"unknown export format {fmt!r}; expected one of {', '.join(allowed)}")
    return fmt


def flat_row(fixed: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
    """``fixed`` then ``metadata`` (a field named like a fixed one becomes ``metadata.<name>``)."""
    row = dict(fixed)
    for k, v in (metadata or {}).items():
        row[f"metadata.{k}" if k in fixed else str(k)] = v
    return row


def hit_rows(results) -> Iterator[dict[str, Any]]:
    """The rows of a ``SearchResults``: its hits, best first."""
    for h in results.hits:
        yield flat_row({n: getattr(h, n) for n in HIT_FIELDS}, h.metadata)


def csv_cell(v: Any) -> Any:
    """A CSV cell: none empty, objects as JSON, text that starts like a formula prefixed with ``'``."""
    if v is None:
        return ""
    if isinstance(v, (dict, list, tuple)):
        v = json.dumps(v, ensure_ascii=False, sort_keys=True)
    if isinstance(v, str) and v.startswith(FORMULA_START):
        return "'" + v
    return v


def safe_name(key: str, *, fallback: str = "item") -> str:
    """A file name part from ``key``: runs of characters other than ASCII letters, digits, ``_`` and ``-``
    become one ``_`` (no ``/``, ``..``, dots, newlines or control characters remain), cut to ``MAX_NAME``;
    ``fallback`` when nothing is left."""
    s = _UNSAFE.sub("_", str(key)).strip("_-")
    return s[:MAX_NAME] or fallback


class UniqueNames:
    """Safe names, each given once: a collision gets ``_<id>`` (and a counter if that is taken too)."""

    def __init__(self) -> None:
        self.taken: set[str] = set()

    def __call__(self, key: str, item_id: int) -> str:
        base = safe_name(key, fallback=f"item{item_id}")
        name, n = base, 0
        while name.lower() in self.taken:  # case-insensitive file systems
            n += 1
            name = f"{base}_{item_id}" if n == 1 else f"{base}_{item_id}_{n}"
        self.taken.add(name.lower())
        return name


@contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False):
    """Yield a temporary path next to ``path``; renamed over it when the block succeeds, removed when it fails.
    ``directory``: a folder (refused when ``path`` exists and is not an empty folder)."""
    import shutil

    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if directory:
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UsageError(f"{path} exists and is not an empty folder: give a new folder for the links")
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if directory and path.is_dir():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if directory else tmp.unlink(missing_ok=True)
        raise


def write_rows(path: str | os.PathLike, rows: Iterable[dict[str, Any]], fmt: str | None = None) -> int:
    """Write ``rows`` to ``path`` as CSV or JSONL (``fmt``, else from the suffix), atomically. Returns the
    number of rows. CSV rows go through a temporary JSONL first (the columns are their union)."""
    fmt = format_of(path, fmt)
    with atomic_path(path) as tmp:
        if fmt == "jsonl":
            with open(tmp, "w", encoding="utf-8") as f:
                n = write_jsonl(f, rows)
        else:
            n = _write_csv(tmp, rows)
    log.info("exported %d row(s) to %s", n, path)
    return n


def write_jsonl(f, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    for row in rows:
        f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        n += 1
    return n


def csv_columns(rows: Iterable[dict[str, Any]], first: tuple[str, ...] = ()) -> list[str]:
    """The union of the rows' columns: ``first``, then the others in first-seen order."""
    cols = dict.fromkeys(first)
    for row in rows:
        cols.update(dict.fromkeys(row))
    return list(cols)


def csv_lines(rows: Iterable[dict[str, Any]], columns: list[str]) -> Iterator[str]:
    """The CSV text (header first), one record at a time (a newline in a cell stays inside its quotes)."""
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([csv_cell(c) for c in columns])
    yield _take(buf)
    for row in rows:
        w.writerow([csv_cell(row.get(c)) for c in columns])
        yield _take(buf)


def _take(buf) -> str:
    s = buf.getvalue()
    buf.seek(0)
    buf.truncate()
    return s


def _write_csv(tmp: Path, rows: Iterable[dict[str, Any]]) -> int:
    with tempfile.TemporaryFile("w+", encoding="utf-8") as spool:
        n = write_jsonl(spool, rows)
        spool.seek(0)
        columns = csv_columns(json.loads(line) for line in spool)
        spool.seek(0)
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            for text in csv_lines((json.loads(line) for line in spool), columns):
                f.write(text)
    return n


__all__ = ["ROW_FORMATS", "UniqueNames", "atomic_path", "csv_cell", "csv_columns", "csv_lines", "flat_row",
           "format_of", "hit_rows", "safe_name", "write_rows", "write_jsonl"]
