"""``listwise``: CoTRR-style re-ranking, a multimodal LLM ranks a window of candidates in one prompt.

One prompt (``configs/prompts/listwise.yaml``) shows the query (reference + modification, a text, or an
image) and N candidates labelled ``[1]`` .. ``[N]``; the model analyses the query, breaks the
modification into what changes and what stays, compares the candidates and answers with a JSON
ranking and its reasoning (kept in the per-query report). ``listparse`` reads the answer; one it cannot
read leaves the window in its order and is counted (``unparsed``), never an exception.

Shortlists longer than ``window`` (``schedule``):

- ``sliding``: RankGPT's window of ``window`` moved back to front by ``stride`` (default half a window) (each step waits for the
  one before it);
- ``jointrank``: JointRank's overlapping blocks (a ``design`` of ``grid`` or ``random`` blocks, each
  candidate in ``r`` of them), all ranked in one batch, aggregated by ``aggregate`` (``winrate`` or
  ``pagerank`` over the implied pairwise comparisons);
- ``auto``: one window when the shortlist fits, else ``jointrank``.

``shuffles=S`` (permutation self-consistency) ranks every window S more times with its candidates in
shuffled orders and aggregates the answers. ``collage=true`` shows the candidates as one numbered grid
(for models that take one image per prompt).

    --rerank "listwise:model=/models/qwen2-vl-2b,k=10"
    --rerank "listwise:api=http://127.0.0.1:8000/v1,api_model=Qwen/Qwen2-VL-7B-Instruct,k=20,window=10,schedule=jointrank,r=3"
"""

from __future__ import annotations

import logging
import random
from typing import Any

from PIL import Image

from mmretrieve.errors import UsageError
from mmretrieve.rerank import rankagg
from mmretrieve.rerank.base import RERANKERS
from mmretrieve.rerank.generate import Cost, Prompt
from mmretrieve.rerank.generative import GenerativeReranker
from mmretrieve.rerank.listparse import _balanced, _loads, parse_ranking

log = logging.getLogger(__name__)

SCHEDULES = ("auto", "window", "sliding", "jointrank")


def read_reasoning(text: str) -> str | None:
    """The ``reasoning`` (or CoTRR's ``CoT``) of the last JSON object in an answer that has one."""
    for span in reversed(_balanced(text or "", "{", "}")):
        obj = _loads(span)
        if isinstance(obj, dict):
            for k in ("reasoning", "CoT", "cot", "explanation"):
                if isinstance(obj.get(k), str):
                    return obj[k][:2000]
    return None


@RERANKERS.register("listwise")
class ListwiseReranker(GenerativeReranker):
    """A model ranks windows of candidates (see the module docstring)."""

    name = "listwise"
    default_prompt = "listwise"

    def __init__(self, *, window: int = 10, stride: int | None = None, schedule: str = "auto", r: int = 2, design: str = "grid",
                 aggregate: str = "winrate", shuffles: int = 0, seed: int = 0, max_new_tokens: int = 512,
                 **kw: Any) -> None:
        super().__init__(max_new_tokens=max_new_tokens, **kw)
        stride = max(1, int(window) // 2) if stride is None else stride
        if schedule not in SCHEDULES:
            raise UsageError(f"listwise: schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if aggregate not in rankagg.AGGREGATORS:
            raise UsageError(f"listwise: aggregate must be one of {', '.join(rankagg.AGGREGATORS)}, got {aggregate!r}")
        if design not in ("grid", "random"):
            raise UsageError(f"listwise: design must be grid or random, got {design!r}")
        if int(window) < 2 or not 1 <= int(stride) < int(window) or int(r) < 1 or int(shuffles) < 0:
            raise UsageError(f"listwise: need window >= 2, 1 <= stride < window, r >= 1, shuffles >= 0 (got window={window}, "
                             f"stride={stride}, r={r}, shuffles={shuffles})")
        self.window, self.stride, self.schedule, self.r = int(window), int(stride), schedule, int(r)
        self.design, self.aggregate, self.shuffles, self.seed = design, aggregate, int(shuffles), int(seed)

    # ---- prompts ----------------------------------------------------------------------------------
    def build_prompt(self, query, qimg: Image.Image | None, block: list[int], pictures) -> tuple[str, Prompt]:
        from mmretrieve.rerank.vlm import numbered_grid

        tpl = self.template(query.kind)
        parts: list = []
        for role in tpl["images"]:
            if role in ("reference", "query"):
                if qimg is not None:
                    parts.append(qimg)
            elif role == "candidates":
                for j, i in enumerate(block, 1):
                    parts += [f"[{j}]", pictures[i]]
            elif role == "collage":
                ims = ([qimg] if qimg is not None else []) + [pictures[i] for i in block]
                labels = (["R"] if qimg is not None else []) + [str(j) for j in range(1, len(block) + 1)]
                parts.append(numbered_grid(ims, labels=labels))
            else:
                raise UsageError(f"listwise: unknown image role {role!r} in prompt preset {self.prompt!r}")
        parts.append(tpl["prompt"].format(text=self.query_text(query), n=len(block)))
        return tpl["prompt"], Prompt(parts)

    def rank_blocks(self, query, qimg, blocks: list[list[int]], pictures, cost: Cost, info: dict) -> list[list[int]]:
        """Each block (candidate ids) ranked by the model, all in one batch; with ``shuffles``, each block
        also in shuffled orders, the answers aggregated."""
        rnd = random.Random(self.seed)
        shown: list[list[int]] = []
        owner: list[int] = []
        for b, blk in enumerate(blocks):
            orders = [list(blk)] + [rnd.sample(blk, len(blk)) for _ in range(self.shuffles)]
            shown += orders
            owner += [b] * len(orders)
        answers = self.ask([self.build_prompt(query, qimg, s, pictures) for s in shown], cost)
        per_block: list[list[list[int]]] = [[] for _ in blocks]
        for s, a, b in zip(shown, answers, owner):
            got, how = parse_ranking(a, len(s))
            if got is None:
                cost.unparsed += 1
                info.setdefault("unparsed", []).append(how)
            ranked = rankagg.complete_ranking(s, [s[j] for j in got] if got else [])
            per_block[b].append(ranked)
            why = read_reasoning(a)
            if why:
                info.setdefault("reasoning", []).append(why)
        out = []
        for blk, rankings in zip(blocks, per_block):
            if len(rankings) == 1:
                out.append(rankings[0])
                continue
            pos = {c: j for j, c in enumerate(blk)}
            agg = rankagg.aggregate(len(blk), [[pos[c] for c in rk] for rk in rankings], method=self.aggregate)
            out.append([blk[j] for j in agg])
        return out

    def order(self, query, qimg, ids, pictures, cost, info) -> list[int]:
        schedule = self.schedule
        if schedule == "auto":
            schedule = "window" if len(ids) <= self.window else "jointrank"
        info["schedule"] = schedule
        if schedule == "window" or len(ids) <= self.window:
            if len(ids) > self.window:
                return self.rank_blocks(query, qimg, [ids[: self.window]], pictures, cost, info)[0] + ids[self.window:]
            return self.rank_blocks(query, qimg, [ids], pictures, cost, info)[0]
        if schedule == "sliding":
            return rankagg.sliding_window(
                ids, lambda blk: self.rank_blocks(query, qimg, [list(blk)], pictures, cost, info)[0],
                window=self.window, stride=self.stride)
        return rankagg.joint_rank(ids, lambda blocks: self.rank_blocks(query, qimg, blocks, pictures, cost, info),
                                  block_size=self.window, r=self.r, kind=self.design, method=self.aggregate, seed=self.seed)


__all__ = ["ListwiseReranker", "read_reasoning", "SCHEDULES"]
