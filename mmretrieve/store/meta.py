"""SQLite metadata of an index version: items, skipped inputs, tombstones, counters.

Each index version has its own ``meta.sqlite``; a write copies the live one into the new version folder
and changes the copy, so a crash never touches what readers see. Committed versions are opened
read-only and immutable.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmretrieve.errors import ItemNotFoundError

SCHEMA = """
CREATE TABLE IF NOT EXISTS items(
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    uri TEXT NOT NULL,
    kind TEXT NOT NULL DEFAULT 'image',
    size INTEGER,
    mtime REAL,
    caption TEXT,
    width INTEGER,
    height INTEGER,
    added_at REAL,
    patch_seg TEXT,
    patch_row INTEGER,
    frame_seg TEXT,
    frame_start INTEGER,
    frame_count INTEGER,
    extra TEXT
);
CREATE INDEX IF NOT EXISTS items_uri ON items(uri);
CREATE TABLE IF NOT EXISTS skipped(
    key TEXT PRIMARY KEY,
    uri TEXT NOT NULL,
    size INTEGER,
    mtime REAL,
    reason TEXT NOT NULL,
    at REAL
);
CREATE TABLE IF NOT EXISTS tombstones(id INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS info(k TEXT PRIMARY KEY, v TEXT NOT NULL);
"""

ITEM_COLUMNS = (
    "id", "key", "uri", "kind", "size", "mtime", "caption", "width", "height", "added_at", "patch_seg", "patch_row",
    "frame_seg", "frame_start", "frame_count", "extra",
)


@dataclass
class Item:
    """One indexed item (an image, a video, ...)."""

    id: int
    key: str
    uri: str
    kind: str = "image"
    size: int | None = None
    mtime: float | None = None
    caption: str | None = None
    width: int | None = None
    height: int | None = None
    added_at: float | None = None
    patch_seg: str | None = None
    patch_row: int | None = None
    #: videos: their per-frame embeddings are rows frame_start .. frame_start + frame_count of frame_seg
    frame_seg: str | None = None
    frame_start: int | None = None
    frame_count: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Item:
        return cls(*row[:-1], extra=json.loads(row[-1]) if row[-1] else {})  # columns in ITEM_COLUMNS order

    def to_row(self) -> tuple:
        return (
            self.id, self.key, self.uri, self.kind, self.size, self.mtime, self.caption, self.width, self.height,
            self.added_at, self.patch_seg, self.patch_row, self.frame_seg, self.frame_start, self.frame_count,
            json.dumps(self.extra) if self.extra else None,
        )


@dataclass
class Skipped:
    key: str
    uri: str
    reason: str
    size: int | None = None
    mtime: float | None = None


class MetaDB:
    def __init__(self, conn: sqlite3.Connection, path: Path, readonly: bool) -> None:
        self.conn = conn
        self.path = path
        self.readonly = readonly

    # ---- opening ----------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, copy_from: Path | None = None) -> MetaDB:
        """A writable database at ``path`` (a new file), optionally starting as a copy of ``copy_from``."""
        if path.exists():
            path.unlink()
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        if copy_from is not None:
            src = sqlite3.connect(f"file:{copy_from}?mode=ro", uri=True)
            try:
                src.backup(conn)
            finally:
                src.close()
        conn.execute("PRAGMA journal_mode=OFF")  # the whole file is new and unpublished until committed
        conn.execute("PRAGMA synchronous=OFF")
        conn.executescript(SCHEMA)
        conn.execute("BEGIN")
        return cls(conn, path, readonly=False)

    @classmethod
    def open_readonly(cls, path: Path) -> MetaDB:
        if not path.is_file():
            raise FileNotFoundError(path)
        conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False)
        return cls(conn, path, readonly=True)

    def commit_and_close(self) -> None:
        self.conn.execute("COMMIT")
        self.conn.execute("VACUUM")
        self.conn.close()

    def close(self) -> None:
        try:
            self.conn.close()
        except sqlite3.Error:
            pass

    # ---- info ---------------------------------------------------------------------------------------
    def get_info(self, k: str, default: str | None = None) -> str | None:
        row = self.conn.execute("SELECT v FROM info WHERE k=?", (k,)).fetchone()
        return row[0] if row else default

    def set_info(self, k: str, v: Any) -> None:
        self.conn.execute("INSERT OR REPLACE INTO info(k, v) VALUES(?, ?)", (k, str(v)))

    def next_id(self) -> int:
        return int(self.get_info("next_id", "0"))

    def reserve_ids(self, n: int) -> list[int]:
        start = self.next_id()
        self.set_info("next_id", start + n)
        return list(range(start, start + n))

    # ---- items --------------------------------------------------------------------------------------
    def count(self, kind: str | None = None) -> int:
        if kind:
            return self.conn.execute("SELECT COUNT(*) FROM items WHERE kind=?", (kind,)).fetchone()[0]
        return self.conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def count_skipped(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM skipped").fetchone()[0]

    def tombstones(self) -> list[int]:
        return [r[0] for r in self.conn.execute("SELECT id FROM tombstones ORDER BY id")]

    def upsert_items(self, items: Iterable[Item]) -> None:
        rows = [it.to_row() for it in items]
        self.conn.executemany(
            f"INSERT OR REPLACE INTO items({', '.join(ITEM_COLUMNS)}) VALUES({', '.join('?' * len(ITEM_COLUMNS))})", rows
        )
        self.conn.executemany("DELETE FROM skipped WHERE key=?", [(r[1],) for r in rows])

    def delete_items(self, ids: Sequence[int]) -> None:
        self.conn.executemany("DELETE FROM items WHERE id=?", [(int(i),) for i in ids])

    def add_tombstones(self, ids: Sequence[int]) -> None:
        self.conn.executemany("INSERT OR IGNORE INTO tombstones(id) VALUES(?)", [(int(i),) for i in ids])

    def clear_tombstones(self, ids: Sequence[int] | None = None) -> None:
        if ids is None:
            self.conn.execute("DELETE FROM tombstones")
        else:
            self.conn.executemany("DELETE FROM tombstones WHERE id=?", [(int(i),) for i in ids])

    def record_skipped(self, skipped: Iterable[Skipped]) -> None:
        now = time.time()
        self.conn.executemany(
            "INSERT OR REPLACE INTO skipped(key, uri, size, mtime, reason, at) VALUES(?,?,?,?,?,?)",
            [(s.key, s.uri, s.size, s.mtime, s.reason, now) for s in skipped],
        )

    def forget_skipped(self, keys: Sequence[str]) -> None:
        self.conn.executemany("DELETE FROM skipped WHERE key=?", [(k,) for k in keys])

    def skipped(self, limit: int | None = None) -> list[Skipped]:
        q = "SELECT key, uri, reason, size, mtime FROM skipped ORDER BY key"
        if limit:
            q += f" LIMIT {int(limit)}"
        return [Skipped(*r) for r in self.conn.execute(q)]

    def items_by_ids(self, ids: Sequence[int]) -> dict[int, Item]:
        out: dict[int, Item] = {}
        ids = [int(i) for i in ids if i >= 0]
        for start in range(0, len(ids), 900):
            chunk = ids[start : start + 900]
            q = f"SELECT {', '.join(ITEM_COLUMNS)} FROM items WHERE id IN ({','.join('?' * len(chunk))})"
            for row in self.conn.execute(q, chunk):
                out[row[0]] = Item.from_row(row)
        return out

    def item_by_key(self, key: str) -> Item | None:
        row = self.conn.execute(f"SELECT {', '.join(ITEM_COLUMNS)} FROM items WHERE key=?", (key,)).fetchone()
        return Item.from_row(row) if row else None

    def items_by_uri(self, uri: str) -> list[Item]:
        rows = self.conn.execute(f"SELECT {', '.join(ITEM_COLUMNS)} FROM items WHERE uri=?", (uri,)).fetchall()
        return [Item.from_row(r) for r in rows]

    def fingerprints(self) -> dict[str, tuple[int, int | None, float | None, str, str | None]]:
        """key -> (id, size, mtime, uri, caption) of every item."""
        return {k: (i, s, m, u, c) for i, k, s, m, u, c in self.conn.execute("SELECT id, key, size, mtime, uri, caption FROM items")}

    def skipped_fingerprints(self) -> dict[str, tuple[int | None, float | None]]:
        return {k: (s, m) for k, s, m in self.conn.execute("SELECT key, size, mtime FROM skipped")}

    def all_ids(self) -> list[int]:
        return [r[0] for r in self.conn.execute("SELECT id FROM items ORDER BY id")]

    def iter_items(self, batch: int = 10000):
        cur = self.conn.execute(f"SELECT {', '.join(ITEM_COLUMNS)} FROM items ORDER BY id")
        while True:
            rows = cur.fetchmany(batch)
            if not rows:
                return
            for r in rows:
                yield Item.from_row(r)

    def patch_segments(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT DISTINCT patch_seg FROM items WHERE patch_seg IS NOT NULL")]

    def frame_spans(self, ids: Sequence[int]) -> dict[int, tuple[str | None, int | None, int | None, str | None]]:
        """id -> (frame_seg, frame_start, frame_count, extra JSON): the lookups the frames reranker needs,
        without building Item objects."""
        out = {}
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), 900):
            chunk = ids[start : start + 900]
            q = f"SELECT id, frame_seg, frame_start, frame_count, extra FROM items WHERE id IN ({','.join('?' * len(chunk))})"
            for r in self.conn.execute(q, chunk):
                out[r[0]] = r[1:]
        return out

    def frame_item_ids(self, video_keys: Sequence[str]) -> list[int]:
        """Ids of the per-frame entries (kind 'frame') of these videos."""
        out: list[int] = []
        for k in video_keys:
            out += [r[0] for r in self.conn.execute(
                "SELECT id FROM items WHERE kind='frame' AND json_extract(extra, '$.video')=?", (k,))]
        return out

    def frame_segments(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT DISTINCT frame_seg FROM items WHERE frame_seg IS NOT NULL")]


def resolve_item(meta: MetaDB, k: int | str, where) -> int:
    """The id of an item named by ``k``: an int is an id; a string is ``id:N``, ``key:K``, a key, a number
    (an id), or a file path. A bare number that is the key of one item and the id of another is refused
    as ambiguous. Raises ``ItemNotFoundError`` naming ``where`` (the index)."""
    if isinstance(k, int) or (hasattr(k, "dtype") and getattr(k.dtype, "kind", "") in "iu"):
        return int(k)
    s = str(k)
    if s.startswith("id:") and s[3:].lstrip("-").isdigit():
        it = meta.items_by_ids([int(s[3:])]).get(int(s[3:]))
        if it is None:
            raise ItemNotFoundError(f"no item with id {s[3:]} in index {where}")
        return it.id
    if s.startswith("key:"):
        it = meta.item_by_key(s[4:])
        if it is None:
            raise ItemNotFoundError(f"no item with key {s[4:]!r} in index {where}")
        return it.id
    it = meta.item_by_key(s)
    if s.lstrip("-").isdigit():
        by_id = meta.items_by_ids([int(s)]).get(int(s))
        if it is not None and by_id is not None and by_id.id != it.id:
            raise ItemNotFoundError(f"{s!r} is the key of item {it.id} ({it.uri}) and the id of item {by_id.id} ({by_id.uri}) "
                                    f"in index {where}: write id:{s} or key:{s}")
        it = it or by_id
    if it is None:
        it = next(iter(meta.items_by_uri(s)), None)
    if it is None:
        r = str(Path(s).expanduser().resolve())
        it = meta.item_by_key(r) or next(iter(meta.items_by_uri(r)), None)
    if it is None:
        raise ItemNotFoundError(f"no item {s!r} in index {where} (give an id, a key or a file path)")
    return it.id
