"""Typed search results: hits with ids, keys, scores and the rank of every item at every stage."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

#: invisible characters that reorder or hide text on a terminal (bidirectional overrides and isolates)
_BIDI = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(s: Any) -> str:
    """``s`` safe for a terminal: control characters (newlines, tabs, ESC, DEL, C1), bidirectional
    overrides and the surrogates of undecodable file names are written as escapes (``\\n``, ``\\x1b``,
    ``\\u202e``), so a file name cannot fake a row or send terminal commands. JSON output keeps the raw text.

    >>> printable("cat\\n1  0.99  fake.jpg\\x1b[2J")
    'cat\\\\n1  0.99  fake.jpg\\\\x1b[2J'
    """
    s = str(s)
    if s.isprintable():
        return s
    out = []
    for ch in s:
        cat = unicodedata.category(ch)
        if cat == "Cs":  # a byte of an undecodable name (os.fsdecode's surrogate escape)
            out.append(f"\\u{ord(ch):04x}")
        elif cat in ("Cc", "Zl", "Zp") or ch in _BIDI:
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


def _cell(v: Any, width: int) -> str:
    """A table cell: ``-`` for none, numbers as written, text escaped and cut to ``width``."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    s = printable(v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list, bool)) else v)
    return s if len(s) <= width else s[: width - 3] + "..."


@dataclass
class Hit:
    id: int
    key: str
    uri: str
    score: float
    rank: int  # 1-based final rank
    kind: str = "image"
    caption: str | None = None
    #: stage name -> 1-based rank of this item after that stage (absent when the stage did not see it)
    stage_ranks: dict[str, int] = field(default_factory=dict)
    #: stage name -> the stage's own score for this item
    stage_scores: dict[str, float] = field(default_factory=dict)
    #: extra per-hit information from stages (e.g. best frame timestamp of a video)
    extra: dict[str, Any] = field(default_factory=dict)
    #: the item's metadata: its stored extra fields (manifest / parquet / webdataset columns, shard, video
    #: duration ...) and file facts (size, mtime, width, height, added_at, frames) where stored; typed as stored
    metadata: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str) -> Any:
        """A hit's attribute (``id``, ``key``, ``uri``, ``kind``, ``caption``, ``score``, ``rank``) or a
        metadata field (``a.b``: field ``b`` of the object ``a``); None when it has none."""
        if name in ("id", "key", "uri", "kind", "caption", "score", "rank"):
            return getattr(self, name)
        v: Any = self.metadata
        for part in [name] if name in self.metadata else name.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        return v

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not d["extra"]:
            d.pop("extra")
        return d


@dataclass
class SearchResults:
    hits: list[Hit]
    query: dict[str, Any]
    stages: list[str] = field(default_factory=lambda: ["coarse"])
    timings_ms: dict[str, float] = field(default_factory=dict)
    #: stage -> what it reports about the query: ``describe``'s description, a generative stage's cost
    #: (prompts, cache hits, prompt and generated tokens, seconds), reasoning, unread answers
    stage_info: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def description(self) -> str | None:
        """The target description the coarse stage searched for (a ``describe`` stage), if any."""
        return self.stage_info.get("describe", {}).get("description")

    def cost(self) -> dict[str, dict[str, Any]]:
        """Stage -> the generation cost of this search (generative stages only)."""
        return {s: d["cost"] for s, d in self.stage_info.items() if "cost" in d}

    def __iter__(self) -> Iterator[Hit]:
        return iter(self.hits)

    def __len__(self) -> int:
        return len(self.hits)

    def __getitem__(self, i: int) -> Hit:
        return self.hits[i]

    @property
    def ids(self) -> list[int]:
        return [h.id for h in self.hits]

    @property
    def keys(self) -> list[str]:
        return [h.key for h in self.hits]

    @property
    def scores(self) -> list[float]:
        return [h.score for h in self.hits]

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "stages": self.stages,
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
            "hits": [h.to_dict() for h in self.hits],
            **({"stage_info": self.stage_info} if self.stage_info else {}),
        }

    def export(self, path, format: str | None = None) -> int:
        """Write the hits to ``path`` as CSV or JSONL (``format``, else from the suffix): id, key, uri, kind,
        caption, score, rank and the metadata fields (CSV: their union; formula-like cells prefixed with
        ``'``), atomically. Returns the number of rows."""
        from mmretrieve.export import hit_rows, write_rows

        return write_rows(path, hit_rows(self), format)

    def table(self, *, max_width: int = 70, show: Sequence[str] = ()) -> str:
        """A readable text table (what the CLI prints); ``show``: fields to add as columns (``caption``, a
        metadata field such as ``license``: ``Hit.get``)."""
        stage_cols = self.stages if len(self.stages) > 1 else []
        head = ["rank", "score", *[f"#{s}" for s in stage_cols], *[printable(c) for c in show], "key"]
        rows = []
        for h in self.hits:
            key = printable(h.key)
            key = key if len(key) <= max_width else "..." + key[-(max_width - 3) :]
            extra = ""
            if "timestamp" in h.extra:
                extra = f"  @ {h.extra['timestamp']:.2f}s"
            rows.append([str(h.rank), f"{h.score:.4f}", *[str(h.stage_ranks.get(s, "-")) for s in stage_cols],
                         *[_cell(h.get(c), max_width) for c in show], key + extra])
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.rjust(w) if i < len(r) - 1 else c for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        table = "\n".join([fmt(head), *(fmt(r) for r in rows)]) if rows else "(no results)"
        return "\n".join([*self.notes(), table])

    def notes(self) -> list[str]:
        """Lines above the table: what a describe stage searched for, and each generative stage's cost."""
        out = []
        if self.description is not None:
            out.append(f"searched for: {printable(self.description)}")
        return out + [cost_line(s, c) for s, c in self.cost().items()]


def cost_line(stage: str, c: dict[str, Any]) -> str:
    """One stage's generation cost (``generate.Cost.to_dict()``) as the CLI prints it, for a search or a run."""
    unread = f", {c['unparsed']} answer(s) unread" if c.get("unparsed") else ""
    return (f"{stage}: {c['prompts']} prompt(s), {c['cache_hits']} cached, {c['prompt_tokens']} prompt + "
            f"{c['generated_tokens']} generated tokens, {c['seconds']:.2f} s{unread}")
