"""What a build reads, cut into the units it commits one at a time.

A build publishes a version after each **unit**, so a build killed at any point and started again
skips what is committed:

- a **shard source** (webdataset tars, parquet files; ``mmretrieve.media.shards``): one unit per shard,
  streamed (the shard's samples are read as they are decoded, never all held or unpacked);
- a **folder or manifest**: fixed batches of ``unit_items`` files (default ``DEFAULT_UNIT_ITEMS``) of
  the sorted listing.

``BuildSource.identity`` is what the index's manifest records, so ``index build`` can tell a resume of
the same source from a different one. A unit yields ``SourceItem`` objects, or ``(SourceItem, reason)``
pairs for inputs known to be bad before any decoding (a corrupt tar member, a truncated shard).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mmretrieve.media.scan import ScanResult, SourceItem, scan_source
from mmretrieve.media.shards import ShardProblem, is_shard_source, iter_shard, resolve_shards

#: files per committed unit of a folder or manifest build (a resumed build loses at most one unit's work)
DEFAULT_UNIT_ITEMS = 1024


@dataclass
class Unit:
    """One committed step of a build: a shard, or a batch of listed files."""

    index: int
    name: str
    items: list[SourceItem] | None = None  # a batch of listed files
    shard: Path | None = None  # or a shard, streamed

    def read(self) -> Iterator[SourceItem | tuple[SourceItem, str]]:
        if self.items is not None:
            yield from self.items
            return
        yield from shard_items(self.shard)

    @property
    def size(self) -> int | None:
        """Items in the unit when known before reading it (a batch of files)."""
        return len(self.items) if self.items is not None else None


def shard_items(shard: Path) -> Iterator[SourceItem | tuple[SourceItem, str]]:
    """A shard's samples as items (image bytes in ``data``), its problems as ``(item, reason)`` pairs."""
    mtime = shard.stat().st_mtime
    for s in iter_shard(shard):
        if isinstance(s, ShardProblem):
            yield SourceItem(key=s.key or str(shard), uri=s.uri, kind="image", mtime=mtime), s.reason
        elif s.data is not None:
            yield SourceItem(key=s.key, uri=s.uri, kind="image", caption=s.caption, size=len(s.data), mtime=mtime,
                             extra=dict(s.extra), data=s.data)
        else:  # a parquet row that names an image file
            it = SourceItem(key=s.key, uri=s.path, kind="image", caption=s.caption, extra=dict(s.extra))
            try:
                st = os.stat(s.path)
            except OSError:
                yield it, "file not found"
                continue
            it.size, it.mtime = st.st_size, st.st_mtime
            yield it


@dataclass
class BuildSource:
    """A build's source: its kind, how the manifest names it, and its units."""

    kind: str  # folder | manifest | file | shards
    display: str
    identity: str
    scan: ScanResult | None = None
    shards: list[Path] = field(default_factory=list)
    _digest: tuple = field(default=(0, None), repr=False, compare=False)  # (shards hashed, the running hash)

    @property
    def sharded(self) -> bool:
        return self.kind == "shards"

    def units(self, items: Sequence[SourceItem] | None = None, *, unit_items: int | None = None,
              start: int = 0) -> list[Unit]:
        """The units to run: shards from ``start`` on, or ``items`` (default: the scan's) in batches."""
        if self.sharded:
            return [Unit(i, str(p), shard=p) for i, p in enumerate(self.shards) if i >= start]
        items = list(self.scan.items if items is None else items)
        n = max(1, int(unit_items or DEFAULT_UNIT_ITEMS))
        return [Unit(j // n, f"files {j + 1}-{min(j + n, len(items))}", items=items[j : j + n])
                for j in range(0, len(items), n)]

    def digest(self, n: int) -> str:
        """A fingerprint of the first ``n`` shards (names, sizes, mtimes): a resume checks that the shards
        it skips are the ones that were committed."""
        done, h = self._digest
        if h is None or n < done:  # kept running: a build asks for 1, 2, 3, ... (O(1) stats per shard)
            done, h = 0, hashlib.sha1()
        for p in self.shards[done:n]:
            st = p.stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        self._digest = (min(max(done, n), len(self.shards)), h)
        return h.copy().hexdigest()


def open_source(source: str | os.PathLike) -> BuildSource:
    """List a build's source (a wrong one is reported here, before any model loads)."""
    if is_shard_source(source):
        shards = resolve_shards(source)
        h = hashlib.sha1("\n".join(map(str, shards)).encode("utf-8", "surrogateescape")).hexdigest()
        kind = "parquet" if all(p.suffix.lower() == ".parquet" for p in shards) else "webdataset"
        return BuildSource("shards", f"{len(shards)} {kind} shard(s): {shards[0]}{' ...' if len(shards) > 1 else ''}",
                           f"shards:{h}", shards=shards)
    scan = scan_source(source)
    src = Path(source).expanduser().resolve()
    kind = "folder" if src.is_dir() else ("file" if scan.items and len(scan.items) == 1 and str(src) == scan.items[0].uri
                                          else "manifest")
    return BuildSource(kind, str(src), f"{kind}:{src}", scan=scan)


__all__ = ["BuildSource", "Unit", "open_source", "shard_items", "DEFAULT_UNIT_ITEMS"]
