"""``IngestReport``: what a build, add or remove did, with every skipped input and its reason."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmretrieve.store.meta import Skipped


@dataclass
class IngestReport:
    scanned: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    #: items that were indexed but whose file is now broken or gone: removed, so search no longer returns them
    stale_removed: int = 0
    #: paths of indexed items removed because their file was deleted from the folder (``index add``)
    pruned: list[str] = field(default_factory=list)
    #: (path, the path indexed for the same file): symlinks, hard links and repeated rows, indexed once
    aliases: list[tuple[str, str]] = field(default_factory=list)
    ignored: int = 0
    seconds: float = 0.0
    index_path: str | None = None
    version: str | None = None

    @property
    def encoded(self) -> int:
        return self.added + self.updated

    @property
    def items_per_s(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        parts = [f"{self.added} added", f"{self.updated} updated", f"{self.unchanged} unchanged", f"{len(self.skipped)} skipped"]
        if self.aliases:
            parts.append(f"{len(self.aliases)} alias(es) of files already listed (indexed once)")
        if self.stale_removed:
            parts.append(f"{self.stale_removed} indexed item(s) removed (file now broken or missing)")
        if self.pruned:
            parts.append(f"{len(self.pruned)} indexed item(s) removed (file deleted)")
        if self.ignored:
            parts.append(f"{self.ignored} non-media files ignored")
        s = f"{self.scanned} scanned: " + ", ".join(parts) + f" in {self.seconds:.1f}s"
        if self.encoded:
            s += f" ({self.items_per_s:.1f} items/s)"
        return s

    def to_dict(self) -> dict:
        return {
            "index": self.index_path,
            "version": self.version,
            "scanned": self.scanned,
            "added": self.added,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "ignored": self.ignored,
            "stale_removed": self.stale_removed,
            "pruned": list(self.pruned),
            "aliases": [{"path": a, "same_as": b} for a, b in self.aliases],
            "skipped": [{"key": s.key, "uri": s.uri, "reason": s.reason} for s in self.skipped],
            "seconds": round(self.seconds, 3),
        }


__all__ = ["IngestReport"]
