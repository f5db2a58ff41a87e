"""Full-text search over the items' captions and text metadata: an SQLite FTS5 table kept in step with
the items table, BM25-ranked.

``items_fts`` is a *contentless* FTS5 table (it keeps the index, not the text) of the view ``items_text``
(``rid``, ``caption``, ``meta``: the item's top-level string metadata values, joined by spaces), keyed by
the items table's ``rid``. Triggers on ``items`` add and remove its rows in the same statement, so in the same transaction
as the item rows themselves: a write that rolls back leaves no text behind, and rows dropped with their
segments leave the text index with them. Item rows are never updated in place (an update trigger keeps
the index right should one ever be). A database made before the table existed gets it, built from every
row, the first time a writer opens it (``ensure``), inside one transaction.

Every row of ``items`` has a document (an empty one for items without text), so BM25's statistics (the
number of documents, the average length, each term's document frequency) are over the rows the
database holds: those of the version searched, and also rows of retained older versions and of a newer
version being written. Which items come back is the version's alone (the caller filters by visibility).

User text is searched as plain words (``plain_query``): each word is quoted, so FTS5 operators (``"``,
``NEAR(``, ``*``, ``-``, ``AND``, column filters) are just text; the words are OR-ed, BM25 ranks the
items that have more of them, rarer ones weighing more. ``raw`` FTS5 syntax is the caller's explicit
choice (``Index.text_search(fts=...)``), its errors reported as ``UsageError``.
"""

from __future__ import annotations

import logging
import re
import sqlite3

from mmretrieve.errors import MissingDependencyError, StoreError, UsageError

log = logging.getLogger(__name__)

TABLE = "items_fts"
VIEW = "items_text"
#: the most words of a plain query that are searched (the rest are ignored)
MAX_WORDS = 64


def _meta_text(col: str) -> str:
    return f"(SELECT group_concat(value, ' ') FROM json_each({col}) WHERE type = 'text')"


SCHEMA = (f"""
CREATE VIEW IF NOT EXISTS {VIEW}(rid, caption, meta) AS SELECT rid, caption, {_meta_text('extra')} FROM items
""", f"""
CREATE VIRTUAL TABLE IF NOT EXISTS {TABLE} USING fts5(caption, meta, content='',
    tokenize='unicode61 remove_diacritics 2')
""", f"""
CREATE TRIGGER IF NOT EXISTS {TABLE}_ins AFTER INSERT ON items BEGIN
    INSERT INTO {TABLE}(rowid, caption, meta) VALUES(new.rid, new.caption, {_meta_text('new.extra')});
END
""", f"""
CREATE TRIGGER IF NOT EXISTS {TABLE}_del AFTER DELETE ON items BEGIN
    INSERT INTO {TABLE}({TABLE}, rowid, caption, meta) VALUES('delete', old.rid, old.caption, {_meta_text('old.extra')});
END
""", f"""
CREATE TRIGGER IF NOT EXISTS {TABLE}_upd AFTER UPDATE ON items BEGIN
    INSERT INTO {TABLE}({TABLE}, rowid, caption, meta) VALUES('delete', old.rid, old.caption, {_meta_text('old.extra')});
    INSERT INTO {TABLE}(rowid, caption, meta) VALUES(new.rid, new.caption, {_meta_text('new.extra')});
END
""")

_available: bool | None = None


def fts5_available() -> bool:
    """Whether this Python's SQLite has FTS5 compiled in."""
    global _available
    if _available is None:
        try:
            conn = sqlite3.connect(":memory:")
            conn.execute("CREATE VIRTUAL TABLE t USING fts5(a)")
            conn.close()
            _available = True
        except sqlite3.OperationalError:
            _available = False
    return _available


def require_fts5() -> None:
    if not fts5_available():
        raise MissingDependencyError(
            f"full-text search needs SQLite's FTS5 extension, which this Python's sqlite3 (SQLite "
            f"{sqlite3.sqlite_version}) is built without; use a Python whose SQLite has FTS5 (python.org, "
            "conda and most Linux distributions' builds do)")


def present(conn: sqlite3.Connection) -> bool:
    """Whether the database has the full-text table."""
    return conn.execute("SELECT 1 FROM sqlite_master WHERE name=?", (TABLE,)).fetchone() is not None


def ensure(conn: sqlite3.Connection) -> None:
    """Create and fill the full-text table if the database lacks it (one transaction, under the writer's
    lock: the caller is the writer). Without FTS5 in this SQLite, a database that has the table cannot be
    written (its triggers need the module): refused; one without it stays without (text search says why)."""
    if not fts5_available():
        if present(conn):
            raise StoreError("this index keeps a full-text table, but this Python's SQLite has no FTS5 "
                             f"(SQLite {sqlite3.sqlite_version}), so its items cannot be written here; use a "
                             "Python whose SQLite has FTS5")
        log.warning("this Python's SQLite has no FTS5: the index is written without full-text search")
        return
    if present(conn):
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in SCHEMA:  # one by one: executescript would commit the transaction first
            conn.execute(statement)
        conn.execute(f"INSERT INTO {TABLE}(rowid, caption, meta) SELECT rid, caption, meta FROM {VIEW}")
        conn.execute("INSERT OR REPLACE INTO info(k, v) VALUES('fulltext', '1')")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    n = conn.execute(f"SELECT COUNT(*) FROM {TABLE}_docsize").fetchone()[0]
    log.info("full-text table built over %d item rows", n)


def integrity_check(db_path) -> str:
    """FTS5's own ``integrity-check`` of the full-text table of the database at ``db_path``: ``"ok"``,
    ``"absent"`` (a database made before full-text search), or ``"skipped: ..."`` (no FTS5 in this SQLite,
    or the file cannot be opened for writing: FTS5 runs the check as an ``INSERT`` command, which a
    read-only connection refuses; it changes nothing). Raises ``IndexCorruptedError`` when the check finds
    the table damaged."""
    from mmretrieve.errors import IndexCorruptedError

    if not fts5_available():
        return f"skipped: this Python's SQLite {sqlite3.sqlite_version} has no FTS5"
    try:
        conn = sqlite3.connect(str(db_path), isolation_level=None, timeout=30)
    except sqlite3.Error as e:
        return f"skipped: cannot open the database for the check ({e})"
    try:
        if not present(conn):
            return "absent"
        conn.execute(f"INSERT INTO {TABLE}({TABLE}) VALUES('integrity-check')")
        return "ok"
    except sqlite3.OperationalError as e:
        if "readonly" in str(e) or "read-only" in str(e) or "locked" in str(e) or "busy" in str(e):
            log.warning("%s: full-text integrity check skipped (%s)", db_path, e)
            return f"skipped: {e}"
        raise IndexCorruptedError(f"{db_path}: the full-text index ({TABLE}) is damaged: FTS5 integrity-check "
                                  f"failed ({e}); text and hybrid search over it are unreliable (the vectors and the "
                                  "item rows are checked separately)") from None
    except sqlite3.DatabaseError as e:
        raise IndexCorruptedError(f"{db_path}: the full-text index ({TABLE}) is damaged: FTS5 integrity-check "
                                  f"failed ({e}); text and hybrid search over it are unreliable (the vectors and the "
                                  "item rows are checked separately)") from None
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()


def plain_query(text: str) -> str | None:
    """An FTS5 query for user text as plain words (each quoted, OR-ed); None when it has no words."""
    words = re.findall(r"\w+", str(text))[:MAX_WORDS]
    return " OR ".join(f'"{w}"' for w in words) or None


def matches(conn: sqlite3.Connection, match: str, limit: int) -> list[tuple[int, str, int, float]]:
    """(id, segment, row, BM25 score, higher is better) of the best ``limit`` rows of the database that
    match the FTS5 query ``match`` (bound, never written into the statement), best first."""
    try:
        return conn.execute(
            f"SELECT i.id, i.segment, i.row, -bm25({TABLE}) FROM {TABLE} JOIN items i ON i.rid = {TABLE}.rowid "
            f"WHERE {TABLE} MATCH ? ORDER BY rank, i.id LIMIT ?", (match, int(limit))).fetchall()
    except sqlite3.OperationalError as e:
        if "fts5" in str(e).lower() or "syntax" in str(e).lower() or "no such column" in str(e).lower():
            raise UsageError(f"full-text query {match!r}: {e}") from None
        raise


__all__ = ["fts5_available", "require_fts5", "present", "ensure", "integrity_check", "plain_query", "matches", "TABLE", "VIEW"]
