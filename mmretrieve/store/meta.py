"""The metadata database: one SQLite file in WAL mode, written incrementally, never copied.

Every segment row has one ``items`` row naming its ``segment`` and ``row``. What a version sees is decided
by a ``Visibility`` (the segments its manifest lists and the rows their deletion files list), so a reader
keeps its snapshot while a writer inserts the rows of new segments in its own transaction, and rows are
removed only with the segments that no retained version lists. Each row carries a CRC32 of its content
(``index verify`` recomputes them).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmretrieve.errors import DiskFullError, IndexCorruptedError, ItemNotFoundError, StoreError
from mmretrieve.store import fulltext

SCHEMA_VERSION = "2"
SCHEMA = """
CREATE TABLE IF NOT EXISTS items(
    rid INTEGER PRIMARY KEY,
    id INTEGER NOT NULL,
    segment TEXT NOT NULL,
    row INTEGER NOT NULL,
    key TEXT NOT NULL,
    uri TEXT,
    kind TEXT NOT NULL DEFAULT 'image',
    size INTEGER,
    mtime REAL,
    caption TEXT,
    width INTEGER,
    height INTEGER,
    added_at REAL,
    frame_start INTEGER,
    frame_count INTEGER,
    extra TEXT,
    crc INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS items_pos ON items(segment, row);
CREATE INDEX IF NOT EXISTS items_id ON items(id);
CREATE INDEX IF NOT EXISTS items_key ON items(key);
CREATE INDEX IF NOT EXISTS items_uri ON items(uri) WHERE uri IS NOT NULL;
CREATE TABLE IF NOT EXISTS skipped(
    key TEXT PRIMARY KEY,
    uri TEXT NOT NULL,
    size INTEGER,
    mtime REAL,
    reason TEXT NOT NULL,
    at REAL,
    transient INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS removed(
    key TEXT PRIMARY KEY,
    uri TEXT NOT NULL,
    size INTEGER,
    mtime REAL,
    at REAL
);
CREATE TABLE IF NOT EXISTS info(k TEXT PRIMARY KEY, v TEXT NOT NULL);
"""

ITEM_COLUMNS = (
    "id", "segment", "row", "key", "uri", "kind", "size", "mtime", "caption", "width", "height", "added_at",
    "frame_start", "frame_count", "extra",
)
_SELECT = f"SELECT {', '.join(ITEM_COLUMNS)} FROM items"


@dataclass
class Item:
    """One indexed item (an image, a video, a video frame, an imported vector ...)."""

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
    #: where the item's vector (and patches) are: a segment and a row of it
    segment: str | None = None
    row: int | None = None
    #: videos: their per-frame embeddings are rows frame_start .. frame_start + frame_count of the segment's frames
    frame_start: int | None = None
    frame_count: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, r: Sequence[Any]) -> Item:
        return cls(id=r[0], segment=r[1], row=r[2], key=r[3], uri=r[3] if r[4] is None else r[4], kind=r[5], size=r[6], mtime=r[7], caption=r[8],
                   width=r[9], height=r[10], added_at=r[11], frame_start=r[12], frame_count=r[13],
                   extra=json.loads(r[14]) if r[14] else {})

    def to_row(self) -> tuple:
        return (self.id, self.segment, self.row, self.key, self.uri, self.kind, self.size, self.mtime, self.caption,
                self.width, self.height, self.added_at, self.frame_start, self.frame_count,
                extra_json(self.extra) if self.extra else None)


def _disk_full(path: Path) -> bool:
    try:
        st = __import__("os").statvfs(Path(path).parent)
        return st.f_bavail * st.f_frsize < (1 << 20)
    except OSError:
        return False


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """A database made before the skip records said whether they are transient gets the column (its old
    records count as permanent, as they were treated)."""
    cols = {r[1] for r in conn.execute("PRAGMA table_info(skipped)")}
    if "transient" not in cols:
        conn.execute("ALTER TABLE skipped ADD COLUMN transient INTEGER NOT NULL DEFAULT 0")


def extra_json(extra: dict[str, Any]) -> str:
    """An item's metadata as stored: non-ASCII text as itself, not ``\\uXXXX`` escapes, since SQLite's JSON
    paths match a field name against its text as written (``$."année"`` finds no escaped ``ann\\u00e9e``);
    escaped only when it holds text that is not valid Unicode (a lone surrogate), which SQLite cannot take."""
    text = json.dumps(extra, sort_keys=True, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(extra, sort_keys=True)
    return text


def row_crc(row: tuple) -> int:
    return zlib.crc32(repr(row).encode("utf-8", "surrogatepass"))


@dataclass
class Skipped:
    """An input that could not be indexed. ``transient``: its decoder crashed, was killed (out of memory),
    hung or stopped answering, so the file itself is not known to be bad and the next ``index add``
    tries it again; otherwise (not an image, corrupt data ...) it stays skipped until the file changes."""

    key: str
    uri: str
    reason: str
    size: int | None = None
    mtime: float | None = None
    transient: bool = False


class Visibility:
    """What one version sees: its segments and, per segment, the sorted rows deleted in it."""

    def __init__(self, deleted: dict[str, np.ndarray] | None = None) -> None:
        self.deleted: dict[str, np.ndarray] = {s: np.asarray(d, dtype=np.int64) for s, d in (deleted or {}).items()}

    @property
    def segments(self) -> list[str]:
        return list(self.deleted)

    def copy(self) -> Visibility:
        return Visibility({s: d.copy() for s, d in self.deleted.items()})

    def add_segment(self, sid: str) -> None:
        self.deleted.setdefault(sid, np.zeros(0, np.int64))

    def drop_segment(self, sid: str) -> None:
        self.deleted.pop(sid, None)

    def delete(self, sid: str, rows: Iterable[int]) -> None:
        self.deleted[sid] = np.union1d(self.deleted[sid], np.asarray(list(rows), dtype=np.int64))

    def visible(self, sid: str, row: int) -> bool:
        d = self.deleted.get(sid)
        if d is None:
            return False
        if not len(d):
            return True
        i = np.searchsorted(d, row)
        return not (i < len(d) and d[i] == row)


class MetaDB:
    """The database seen through a ``Visibility`` (a reader's snapshot, or a writer's working view)."""

    def __init__(self, conn: sqlite3.Connection, path: Path, view: Visibility, *, readonly: bool) -> None:
        self.conn = conn
        # a uri equal to its key is stored once (NULL uri), unless the database predates that (uri NOT NULL)
        self.lean_uris = not readonly and not any(r[1] == "uri" and r[3] for r in conn.execute("PRAGMA table_info(items)"))
        self.path = path
        self.view = view
        self.readonly = readonly
        self._lock = threading.RLock()  # one connection, shared by a server's threads
        self.lease = None  # a reader's lease on its version, held as long as this object lives

    # ---- opening ----------------------------------------------------------------------------------
    @classmethod
    def open_writer(cls, path: Path, view: Visibility) -> MetaDB:
        """A read-write connection (created with the schema when missing) holding the write transaction."""
        try:
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA journal_size_limit=8388608")  # the WAL is truncated to 8 MB after a checkpoint
            conn.executescript(SCHEMA)
            _add_missing_columns(conn)
            conn.execute("INSERT OR IGNORE INTO info(k, v) VALUES('schema', ?)", (SCHEMA_VERSION,))
            fulltext.ensure(conn)  # the full-text table, built in its own transaction if the database lacks it
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as e:
            raise IndexCorruptedError(f"{path}: unreadable metadata database ({e})") from None
        return cls(conn, path, view, readonly=False)

    @classmethod
    def open_reader(cls, path: Path, view: Visibility) -> MetaDB:
        if not path.is_file():
            raise IndexCorruptedError(f"{path}: missing (the index's metadata database)")
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False, timeout=30)
            conn.execute("SELECT v FROM info WHERE k='schema'").fetchone()
        except sqlite3.DatabaseError as e:
            if _disk_full(path):
                raise DiskFullError(f"{path}: no space left on device to open the metadata database (SQLite needs a "
                                    "few KB for its shared-memory file); free some space") from None
            raise IndexCorruptedError(f"{path}: unreadable metadata database ({e})") from None
        return cls(conn, path, view, readonly=True)

    def write(self, sql: str, params: Sequence[Any] = (), *, many: bool = False) -> None:
        """A write statement of the writer's transaction; a full disk is a ``DiskFullError`` naming the file."""
        with self._lock:
            try:
                (self.conn.executemany if many else self.conn.execute)(sql, params)
            except sqlite3.OperationalError as e:
                if "full" in str(e).lower():
                    raise DiskFullError(f"{self.path}: no space left on device while writing the metadata "
                                        "(nothing was published; the previous version is intact)") from None
                raise StoreError(f"{self.path}: {e}") from None

    def commit(self) -> None:
        self.write("COMMIT")

    def rollback(self) -> None:
        try:
            self.conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def begin(self) -> None:
        self.write("BEGIN IMMEDIATE")

    def checkpoint(self) -> None:
        try:
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error:
            pass

    def close(self) -> None:
        try:
            self.conn.close()
        except sqlite3.Error:
            pass

    def _q(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            try:
                return self.conn.execute(sql, params).fetchall()
            except sqlite3.DatabaseError as e:
                raise IndexCorruptedError(f"{self.path}: metadata query failed ({e})") from None

    # ---- visibility helpers -------------------------------------------------------------------------
    def _segs_sql(self) -> tuple[str, list[str]]:
        segs = self.view.segments
        return ("segment IN (" + ",".join("?" * len(segs)) + ")") if segs else "0", segs

    def _visible(self, rows: Sequence[tuple], *, seg: int = 1, row: int = 2, make=Item.from_row) -> list:
        """The rows a version sees (vectorised per segment for long lists)."""
        if len(rows) < 64:
            return [make(r) for r in rows if self.view.visible(r[seg], r[row])]
        keep = np.ones(len(rows), dtype=bool)
        segs = np.array([r[seg] for r in rows], dtype=object)
        pos = np.array([r[row] for r in rows], dtype=np.int64)
        for sid in set(segs.tolist()):
            d = self.view.deleted.get(sid)
            m = segs == sid
            if d is None:
                keep &= ~m
            elif len(d):
                keep[m] &= ~np.isin(pos[m], d)
        return [make(r) for r, k in zip(rows, keep) if k]

    # ---- writing ------------------------------------------------------------------------------------
    def insert_items(self, items: Sequence[Item]) -> None:
        rows = [it.to_row() for it in items]
        if self.lean_uris:
            rows = [r if r[4] != r[3] else (*r[:4], None, *r[5:]) for r in rows]
        self.write(f"INSERT INTO items({', '.join(ITEM_COLUMNS)}, crc) VALUES({', '.join('?' * (len(ITEM_COLUMNS) + 1))})",
                   [(*r, row_crc(r)) for r in rows], many=True)
        for table in ("skipped", "removed"):  # an added key is no longer skipped, nor removed (it is back)
            if self._q(f"SELECT 1 FROM {table} LIMIT 1"):  # 1M no-op deletes cost 1 s of an import
                self.write(f"DELETE FROM {table} WHERE key=?", [(r[3],) for r in rows], many=True)

    def drop_segments(self, sids: Sequence[str]) -> None:
        self.write("DELETE FROM items WHERE segment=?", [(s,) for s in sids], many=True)
        self.write("DELETE FROM info WHERE k=?", [(f"segment:{s}",) for s in sids], many=True)

    def note_segment(self, sid: str, version: str) -> None:
        """Record that a segment's rows exist (so a crashed write's rows can be found and dropped)."""
        self.write("INSERT OR REPLACE INTO info(k, v) VALUES(?, ?)", (f"segment:{sid}", version))

    def noted_segments(self) -> list[str]:
        return [r[0][len("segment:"):] for r in self._q("SELECT k FROM info WHERE k LIKE 'segment:%'")]

    def record_skipped(self, skipped: Iterable[Skipped]) -> bool:
        """Record skipped inputs; returns whether any is new or changed (its size, mtime or transience)."""
        skipped = list(skipped)
        if not skipped:
            return False
        before = self.skipped_fingerprints()
        now = time.time()
        self.write("INSERT OR REPLACE INTO skipped(key, uri, size, mtime, reason, at, transient) VALUES(?,?,?,?,?,?,?)",
                   [(s.key, s.uri, s.size, s.mtime, s.reason, now, int(s.transient)) for s in skipped], many=True)
        return any(before.get(s.key) != (s.size, s.mtime, s.transient) for s in skipped)

    def record_removed(self, items: Iterable[Item]) -> None:
        """Remember items ``index rm`` removed, with their file's size and mtime then, so an ``index add``
        of their folder does not bring them back (part of the remove's transaction)."""
        now = time.time()
        self.write("INSERT OR REPLACE INTO removed(key, uri, size, mtime, at) VALUES(?,?,?,?,?)",
                   [(it.key, it.uri, it.size, it.mtime, now) for it in items], many=True)

    def removed_fingerprints(self) -> dict[str, tuple[int | None, float | None]]:
        """key -> (size, mtime) of the file of each item ``index rm`` removed (and nothing added back)."""
        return {k: (s, m) for k, s, m in self._q("SELECT key, size, mtime FROM removed")}

    def forget_skipped(self, keys: Sequence[str]) -> None:
        self.write("DELETE FROM skipped WHERE key=?", [(k,) for k in keys], many=True)

    # ---- reading --------------------------------------------------------------------------------------
    def count(self, kind: str | None = None) -> int:
        """Visible items (of ``kind``): O(N); the manifest keeps the counts for cheap answers."""
        return sum(1 for it in self.iter_items() if kind is None or it.kind == kind)

    def count_records(self, sid: str) -> int:
        return self._q("SELECT COUNT(*) FROM items WHERE segment=?", (sid,))[0][0]

    def count_skipped(self) -> int:
        return self._q("SELECT COUNT(*) FROM skipped")[0][0]

    def skipped(self, limit: int | None = None) -> list[Skipped]:
        q = "SELECT key, uri, reason, size, mtime FROM skipped ORDER BY key"
        if limit:
            q += f" LIMIT {int(limit)}"
        return [Skipped(*r) for r in self._q(q)]

    # point lookups go through their own index (id, key, uri) and are filtered by the version's
    # visibility in Python: a segment condition in SQL makes the planner scan the segment index instead
    def _lookup(self, column: str, values: Sequence[Any]) -> list[Item]:
        out: list[Item] = []
        values = list(values)
        for start in range(0, len(values), 900):
            chunk = values[start : start + 900]
            out += self._visible(self._q(f"{_SELECT} INDEXED BY items_{column} WHERE {column} IN "
                                         f"({','.join('?' * len(chunk))})", chunk))
        return out

    def items_by_ids(self, ids: Sequence[int]) -> dict[int, Item]:
        return {it.id: it for it in self._lookup("id", [int(i) for i in ids if int(i) >= 0])}

    def items_by_keys(self, keys: Sequence[str]) -> dict[str, Item]:
        return {it.key: it for it in self._lookup("key", keys)}

    def item_by_key(self, key: str) -> Item | None:
        return self.items_by_keys([key]).get(key)

    def items_by_uri(self, uri: str) -> list[Item]:
        """Items whose uri is ``uri``: stored in the uri column, or as their key (a uri equal to the key is
        stored once)."""
        found = {it.id: it for it in self._lookup("uri", [uri])}
        found.update({it.id: it for it in self._lookup("key", [uri]) if it.uri == uri})
        return sorted(found.values(), key=lambda it: it.id)

    def iter_items(self, batch: int = 10000) -> Iterator[Item]:
        """Every visible item, by id."""
        cond, segs = self._segs_sql()
        with self._lock:
            cur = self.conn.execute(f"{_SELECT} WHERE {cond} ORDER BY id", segs)
            rows = cur.fetchall()
        yield from self._visible(rows)

    def all_ids(self) -> list[int]:
        return [it.id for it in self.iter_items()]

    def fingerprints(self) -> dict[str, tuple[int, int | None, float | None, str, str | None]]:
        """key -> (id, size, mtime, uri, caption) of every visible item (one pass; for ``index add``)."""
        cond, segs = self._segs_sql()
        rows = self._q(f"SELECT id, segment, row, key, size, mtime, uri, caption FROM items WHERE {cond}", segs)
        return {r[3]: (r[0], r[4], r[5], r[3] if r[6] is None else r[6], r[7]) for r in self._visible(rows, make=tuple)}

    def skipped_fingerprints(self) -> dict[str, tuple[int | None, float | None, bool]]:
        """key -> (size, mtime, transient) of every skip record (a writer's database: it has the column)."""
        return {k: (s, m, bool(t)) for k, s, m, t in self._q("SELECT key, size, mtime, transient FROM skipped")}

    def skipped_keys(self, *, until: float) -> set[str]:
        """Keys of the skip records written at or before ``until`` (a published version's time: skip
        records are not versioned, so a write killed between its database commit and its manifest
        leaves some of its own behind)."""
        return {k for (k,) in self._q("SELECT key FROM skipped WHERE at <= ?", (float(until),))}

    def matching(self, condition: str, params: Sequence[Any]) -> list[tuple[int, str, int]]:
        """(id, segment, row) of the visible items meeting an SQL ``condition`` over the items table (a
        compiled search filter, ``store.filters.to_sql``: its values are bound ``params``)."""
        from mmretrieve.store.filters import sql_contains

        cond, segs = self._segs_sql()
        with self._lock:
            self.conn.create_function("mm_contains", 2, sql_contains, deterministic=True)
        rows = self._q(f"SELECT id, segment, row FROM items WHERE {cond} AND {condition}", [*segs, *params])
        return self._visible(rows, make=tuple)

    def values(self, expr: str, params: Sequence[Any]) -> list[tuple[int, str, int, Any]]:
        """(id, segment, row, value) of every visible item, ``value`` an SQL expression over the items table
        with bound ``params`` (``store.filters.order_sql``: what a browse orders by)."""
        cond, segs = self._segs_sql()
        rows = self._q(f"SELECT id, segment, row, {expr} FROM items WHERE {cond}", [*params, *segs])
        return self._visible(rows, make=tuple)

    def has_fulltext(self) -> bool:
        """Whether the database has its full-text table (``store.fulltext``)."""
        with self._lock:
            return fulltext.present(self.conn)

    def text_matches(self, match: str, limit: int) -> tuple[list[tuple[int, float]], bool]:
        """(id, BM25 score) of the visible items among the best ``limit`` rows that match the FTS5 query
        ``match``, best first, and whether those were all the rows that match."""
        with self._lock:
            rows = fulltext.matches(self.conn, match, limit)
        return [(r[0], r[3]) for r in self._visible(rows, make=tuple)], len(rows) < limit

    def frame_item_ids(self, video_keys: Sequence[str]) -> list[int]:
        """Ids of the visible per-frame entries (kind 'frame') of these videos: their keys are
        ``<video key>#t=<seconds>``, so a range of the key index finds them."""
        out: list[int] = []
        for k in video_keys:
            rows = self._q("SELECT id, segment, row FROM items INDEXED BY items_key WHERE key >= ? AND key < ? AND "
                           "kind='frame' AND json_extract(extra, '$.video')=?", [f"{k}#t=", f"{k}#t>", k])
            out += [r[0] for r in self._visible(rows, make=tuple)]
        return out

    def rows_of(self, sid: str) -> list[tuple]:
        """Every metadata row of segment ``sid`` with its stored checksum (compaction, verification)."""
        return self._q(f"SELECT {', '.join(ITEM_COLUMNS)}, crc FROM items WHERE segment=? ORDER BY row", (sid,))


def resolve_item(meta: MetaDB, k: int | str, where) -> int:
    """The id of an item named by ``k``: an int is an id; a string is ``id:N``, ``key:K``, a key, a number
    (an id), or a file path. A bare number that is the key of one item and the id of another is refused
    as ambiguous. Raises ``ItemNotFoundError`` naming ``where`` (the index)."""
    if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
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


__all__ = ["Item", "Skipped", "Visibility", "MetaDB", "resolve_item", "row_crc", "ITEM_COLUMNS"]
