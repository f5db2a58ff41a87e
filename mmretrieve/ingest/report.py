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
    #: paths of files ``index rm`` removed that this add did not bring back (``--include-removed`` does)
    not_readded: list[str] = field(default_factory=list)
    #: (path, the path indexed for the same file): symlinks, hard links and repeated rows, indexed once
    aliases: list[tuple[str, str]] = field(default_factory=list)
    ignored: int = 0
    seconds: float = 0.0
    index_path: str | None = None
    version: str | None = None
    #: seconds per stage: decode_wait (the encoder waiting for decoders), encode, write, commit; and for
    #: the Ray engine the busy seconds of its decode tasks and encoder actors (decode, encode)
    stages: dict[str, float] = field(default_factory=dict)
    #: units (shards, or batches of files) committed by this run, and those a resumed build skipped
    units_committed: int = 0
    units_resumed: int = 0
    #: a build found complete already (same source): nothing was read
    up_to_date: bool = False
    engine: str = "local"
    #: the Ray engine: encoder actors, GPUs per actor, nodes in the cluster and nodes that decoded / encoded
    ray: dict[str, float] = field(default_factory=dict)

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
        if self.not_readded:
            parts.append(f"{len(self.not_readded)} not re-added (removed by index rm; --include-removed adds them back)")
        if self.ignored:
            parts.append(f"{self.ignored} non-media files ignored")
        if self.up_to_date:
            return "already built from this source: nothing to do (use `index add` for changed files, --overwrite to rebuild)"
        if self.units_resumed:
            parts.append(f"resumed after {self.units_resumed} committed unit(s)")
        s = f"{self.scanned} scanned: " + ", ".join(parts) + f" in {self.seconds:.1f}s"
        if self.encoded:
            s += f" ({self.items_per_s:.1f} items/s)"
        return s

    def stage_summary(self) -> str:
        """Time per stage and the stage's own rate (items per busy second)."""
        names = {"decode": "decode", "decode_wait": "waiting for decoders", "encode": "encode", "write": "write",
                 "commit": "commits"}
        n = self.encoded + len(self.skipped)
        out = []
        for k, label in names.items():
            if k in self.stages:
                sec = self.stages[k]
                rate = f" ({n / sec:.1f} items/s)" if k in ("decode", "encode") and sec > 0 else ""
                out.append(f"{label} {sec:.1f}s{rate}")
        return ", ".join(out)

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
            "not_readded": list(self.not_readded),
            "aliases": [{"path": a, "same_as": b} for a, b in self.aliases],
            "skipped": [{"key": s.key, "uri": s.uri, "reason": s.reason, "transient": s.transient} for s in self.skipped],
            "seconds": round(self.seconds, 3),
            "stages": {k: round(v, 3) for k, v in self.stages.items()},
            "engine": self.engine,
            "ray": dict(self.ray),
            "units_committed": self.units_committed,
            "units_resumed": self.units_resumed,
            "up_to_date": self.up_to_date,
        }


__all__ = ["IngestReport"]
