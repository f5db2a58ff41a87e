"""The on-disk cache of generated texts (issue 20: target descriptions, listwise and pairwise answers).

A generation is keyed by everything that decides its text: the model (a local folder's identity, or an
endpoint URL and its model name), the prompt template's hash, the fingerprints of its inputs (image
bytes, texts) and the generation options (greedy or sampled, ``max_new_tokens``, ``max_pixels``...).
So an evaluation re-run, or a second fusion of the same descriptions, costs no generation at all, and a
crashed run resumes from what it had generated.

One SQLite file (WAL mode; ``$MMRETRIEVE_GENERATION_CACHE``, default ``generations.sqlite`` under
``$MMRETRIEVE_CACHE``) shared by the CLI, evaluation and the server:
several processes may read and write it at once (each write is one short transaction; a busy database
is waited for). It is bounded: past ``max_bytes`` of texts, the least recently used entries are dropped
(down to 90%). A damaged file is moved aside (named in a warning) and a new one started: a cache never
stops a search.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 256 << 20
SCHEMA = """
CREATE TABLE IF NOT EXISTS generations(
    key TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    generated_tokens INTEGER NOT NULL,
    seconds REAL NOT NULL,
    bytes INTEGER NOT NULL,
    created REAL NOT NULL,
    used REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS generations_used ON generations(used);
CREATE TABLE IF NOT EXISTS totals(k TEXT PRIMARY KEY, bytes INTEGER NOT NULL);
"""


def fingerprint(data: bytes | str) -> str:
    """sha256 of an input (an image file's bytes, a text)."""
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def cache_key(model: str, template: str, inputs: list[str], options: dict[str, Any]) -> str:
    """The key of one generation: ``model`` (a local model's identity or ``endpoint|model name``), the
    prompt ``template`` (its text: hashed here), the inputs' fingerprints in order, and the generation
    ``options`` (any JSON-able values; key order does not matter)."""
    blob = json.dumps({"model": model, "template": fingerprint(template), "inputs": list(inputs),
                       "options": options}, sort_keys=True, separators=(",", ":"), default=str)
    return fingerprint(blob)


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    generated_tokens: int
    seconds: float


class GenerationCache:
    """Generated texts by ``cache_key`` (see the module docstring)."""

    def __init__(self, path: str | Path | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        from mmretrieve import settings

        self.path = Path(path) if path is not None else settings.generation_cache_path()
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        self._conn = self._open()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(SCHEMA)
        conn.execute("INSERT OR IGNORE INTO totals(k, bytes) VALUES('texts', 0)")
        conn.execute("SELECT COUNT(*) FROM generations").fetchone()
        return conn

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return self._connect()
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
                raise
            aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
            log.warning("%s: unreadable generation cache (%s); moved to %s, starting a new one", self.path, e, aside)
            self.path.replace(aside)
            for side in ("-wal", "-shm"):
                Path(str(self.path) + side).unlink(missing_ok=True)
            return self._connect()

    def get(self, key: str) -> Generation | None:
        with self._lock:
            row = self._conn.execute("SELECT text, prompt_tokens, generated_tokens, seconds FROM generations WHERE key=?",
                                     (key,)).fetchone()
            if row is None:
                self.misses += 1
                return None
            self.hits += 1
            self._conn.execute("UPDATE generations SET used=? WHERE key=?", (time.time(), key))
        return Generation(*row)

    def put(self, key: str, gen: Generation) -> None:
        size = len(gen.text.encode("utf-8")) + len(key)
        now = time.time()
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                old = self._conn.execute("SELECT bytes FROM generations WHERE key=?", (key,)).fetchone()
                self._conn.execute("INSERT OR REPLACE INTO generations VALUES(?,?,?,?,?,?,?,?)",
                                   (key, gen.text, int(gen.prompt_tokens), int(gen.generated_tokens), float(gen.seconds),
                                    size, now, now))
                total = self._add_bytes(size - (old[0] if old else 0))
                if total > self.max_bytes:
                    self._evict(total)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def _add_bytes(self, delta: int) -> int:
        """The running total of the texts' bytes (kept beside them, in the same transaction), after ``delta``."""
        self._conn.execute("UPDATE totals SET bytes = bytes + ? WHERE k='texts'", (int(delta),))
        return int(self._conn.execute("SELECT bytes FROM totals WHERE k='texts'").fetchone()[0])

    def _evict(self, total: int) -> None:
        """Drop the least recently used entries until the texts fit in 90% of ``max_bytes``."""
        target = int(self.max_bytes * 0.9)
        drop, freed = [], 0
        for key, size in self._conn.execute("SELECT key, bytes FROM generations ORDER BY used, created"):
            if total - freed <= target:
                break
            drop.append((key,))
            freed += size
        self._conn.executemany("DELETE FROM generations WHERE key=?", drop)
        self._add_bytes(-freed)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            n = self._conn.execute("SELECT COUNT(*) FROM generations").fetchone()[0]
            size = self._conn.execute("SELECT bytes FROM totals WHERE k='texts'").fetchone()[0]
        return {"entries": n, "bytes": size, "max_bytes": self.max_bytes, "hits": self.hits, "misses": self.misses}

    def close(self) -> None:
        with self._lock:
            self._conn.close()


__all__ = ["GenerationCache", "Generation", "cache_key", "fingerprint", "DEFAULT_MAX_BYTES"]
