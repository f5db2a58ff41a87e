"""``pairwise``: a multimodal LLM judges two candidates at a time for the query (MoRe-style).

Each prompt (``configs/prompts/pairwise.yaml``) shows the query and two candidates, A and B, and asks
which matches better; the answer's first standalone ``A`` / ``B`` (or ``first`` / ``second``, ``1`` /
``2``) is the verdict, anything else a tie (counted as ``unparsed``). With ``both_orders`` (default)
every pair is asked as (A, B) and as (B, A) and the two verdicts averaged, which cancels a model's
preference for a position. Videos are shown as ``frames`` frames side by side (EgoCVR clips).

Which pairs (``strategy``):

- ``allpairs``: every pair, aggregated by ``aggregate`` (``winrate`` or ``pagerank``) -- K(K-1)/2 pairs;
- ``sort``: a merge sort whose comparisons are the model's verdicts, O(K log K) pairs, the merges of
  a level asked in one batch;
- ``auto``: all pairs up to ``allpairs_max`` candidates (6: 15 pairs), else sort.

    --rerank "pairwise:model=/models/qwen2-vl-2b,k=8"
"""

from __future__ import annotations

import re
from typing import Any

from mmretrieve.errors import UsageError
from mmretrieve.rerank import rankagg
from mmretrieve.rerank.base import RERANKERS
from mmretrieve.rerank.generate import Prompt
from mmretrieve.rerank.generative import GenerativeReranker

STRATEGIES = ("auto", "allpairs", "sort")
_A = re.compile(r"(?<![A-Za-z0-9])(?:A|first|1)(?![A-Za-z0-9])", re.I)
_B = re.compile(r"(?<![A-Za-z0-9])(?:B|second|2)(?![A-Za-z0-9])", re.I)
_ONLY = re.compile(r"(?<![A-Za-z0-9])([AB12])(?![A-Za-z0-9])")


def read_verdict(text: str) -> float | None:
    """1.0 when the answer picks A (the first candidate), 0.0 for B, None when it says neither clearly:
    the first standalone capital letter A / B (or digit 1 / 2) wins; else the first of the words."""
    if not isinstance(text, str):
        return None
    m = _ONLY.search(text)
    if m:
        return 1.0 if m.group(1) in "A1" else 0.0
    a, b = _A.search(text), _B.search(text)
    if a and (not b or a.start() < b.start()):
        return 1.0
    if b:
        return 0.0
    return None


@RERANKERS.register("pairwise")
class PairwiseReranker(GenerativeReranker):
    """A model judges pairs of candidates (see the module docstring)."""

    name = "pairwise"
    default_prompt = "pairwise"

    def __init__(self, *, strategy: str = "auto", both_orders: bool = True, aggregate: str = "winrate",
                 allpairs_max: int = 6, max_new_tokens: int = 8, **kw: Any) -> None:
        super().__init__(max_new_tokens=max_new_tokens, **kw)
        if strategy not in STRATEGIES:
            raise UsageError(f"pairwise: strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        if aggregate not in rankagg.AGGREGATORS:
            raise UsageError(f"pairwise: aggregate must be one of {', '.join(rankagg.AGGREGATORS)}, got {aggregate!r}")
        if self.collage:
            raise UsageError("pairwise: collage is not supported (each prompt shows two candidates as separate images)")
        self.strategy, self.both_orders, self.aggregate = strategy, bool(both_orders), aggregate
        self.allpairs_max = int(allpairs_max)

    def build_prompt(self, query, qimg, a, b) -> tuple[str, Prompt]:
        tpl = self.template(query.kind)
        parts: list = []
        for role in tpl["images"]:
            if role in ("reference", "query"):
                if qimg is not None:
                    parts.append(qimg)
            elif role in ("a", "b"):
                parts.append(a if role == "a" else b)
            else:
                raise UsageError(f"pairwise: unknown image role {role!r} in prompt preset {self.prompt!r}")
        parts.append(tpl["prompt"].format(text=self.query_text(query)))
        return tpl["prompt"], Prompt(parts)

    def judge(self, query, qimg, pairs: list[tuple[int, int]], pictures, cost, info) -> list[float]:
        """How much the first of each pair beats the second, in [0, 1] (0.5: a tie or unread answers)."""
        asks = [(a, b) for a, b in pairs] + ([(b, a) for a, b in pairs] if self.both_orders else [])
        answers = self.ask([self.build_prompt(query, qimg, pictures[a], pictures[b]) for a, b in asks], cost)
        verdicts = [read_verdict(a) for a in answers]
        cost.unparsed += sum(v is None for v in verdicts)
        info["comparisons"] = info.get("comparisons", 0) + len(asks)
        out = []
        for j in range(len(pairs)):
            votes = [verdicts[j]] + ([None if verdicts[j + len(pairs)] is None else 1.0 - verdicts[j + len(pairs)]]
                                     if self.both_orders else [])
            read = [v for v in votes if v is not None]
            out.append(sum(read) / len(read) if read else 0.5)
        return out

    def order(self, query, qimg, ids, pictures, cost, info) -> list[int]:
        strategy = self.strategy
        if strategy == "auto":
            strategy = "allpairs" if len(ids) <= self.allpairs_max else "sort"
        info["strategy"] = strategy
        if strategy == "sort":
            order, _ = rankagg.merge_sort(ids, lambda pairs: self.judge(query, qimg, pairs, pictures, cost, info))
            return order
        pos = {c: j for j, c in enumerate(ids)}
        pairs = [(a, b) for j, a in enumerate(ids) for b in ids[j + 1:]]
        p = self.judge(query, qimg, pairs, pictures, cost, info)
        W = rankagg.pair_wins(len(ids), [(pos[a], pos[b], x) for (a, b), x in zip(pairs, p)])
        return [ids[j] for j in rankagg.aggregate_wins(W, method=self.aggregate)]


__all__ = ["PairwiseReranker", "read_verdict", "STRATEGIES"]
