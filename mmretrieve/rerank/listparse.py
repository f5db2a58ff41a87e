"""Reading a model's listwise answer: which of the labelled candidates it ranks, in which order.

The listwise prompt (``configs/prompts/listwise.yaml``) labels the candidates ``[1]`` .. ``[N]`` and asks
for a JSON object ``{"reasoning": "...", "ranking": [3, 1, 2, ...]}``. Models answer in many shapes;
``parse_ranking`` accepts, in this order:

1. a JSON object with a ``ranking`` (or ``order`` / ``rank``) list, inside a fenced block or anywhere
   in the text (the last one that parses wins: models often restate an example first);
2. a bare JSON list of labels;
3. RankGPT's ``[3] > [1] > [2]`` chains.

Labels are the 1-based numbers shown (``"3"``, ``"[3]"`` and ``3`` all work); out-of-range labels and
repeats are dropped. It never raises: an answer it cannot read gives ``None`` and a reason, and the
caller keeps the window's previous order (and counts it). ``rank_window`` turns a reading into a
permutation of the window (``rankagg.complete_ranking``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from mmretrieve.rerank.rankagg import complete_ranking

#: the longest answer read: its last MAX_ANSWER_CHARS characters (the ranking comes last); a runaway or
#: hostile answer costs linear time, never more
MAX_ANSWER_CHARS = 32_000
_CHAIN = re.compile(r"\[\s*(\d{1,4})\s*\](?:\s*(?:>|,|>>|->)\s*\[\s*(\d{1,4})\s*\])+")
_LABEL = re.compile(r"\[\s*(\d{1,4})\s*\]")
KEYS = ("ranking", "order", "rank", "ranked")


def _fenced(text: str) -> list[str]:
    """The bodies of the ```-fenced blocks of ``text`` (an optional ``json`` tag dropped), found with
    ``str.find`` (linear: a regex with a lazy body backtracks quadratically on an unclosed fence)."""
    out, i = [], 0
    while True:
        start = text.find("```", i)
        if start < 0:
            return out
        end = text.find("```", start + 3)
        if end < 0:
            return out
        body = text[start + 3 : end]
        if body[:4].lower() == "json":
            body = body[4:]
        out.append(body.strip())
        i = end + 3


def _labels(seq, n: int) -> list[int]:
    out: list[int] = []
    for x in seq:
        if isinstance(x, bool):
            continue
        if isinstance(x, str):
            m = re.fullmatch(r"\s*\[?\s*(\d{1,4})\s*\]?\s*", x)
            x = int(m.group(1)) if m else None
        if isinstance(x, float) and x.is_integer():
            x = int(x)
        if isinstance(x, int) and 1 <= x <= n and (x - 1) not in out:
            out.append(x - 1)
    return out


def _balanced(text: str, open_: str, close: str) -> list[str]:
    """The outermost ``open_ ... close_`` spans of ``text``, in order."""
    spans, depth, start = [], 0, None
    for i, ch in enumerate(text):
        if ch == open_:
            if depth == 0:
                start = i
            depth += 1
        elif ch == close and depth:
            depth -= 1
            if depth == 0 and start is not None:
                spans.append(text[start:i + 1])
    return spans


def _loads(span: str):
    try:
        return json.loads(span)
    except (ValueError, RecursionError):
        return None


def parse_ranking(text: str, n: int) -> tuple[list[int] | None, str]:
    """(0-based positions in the order the model ranked them, or None; how it was read / why not)."""
    if not isinstance(text, str) or not text.strip():
        return None, "empty answer"
    text = text[-MAX_ANSWER_CHARS:]
    fenced = _fenced(text)
    objects = [o for span in fenced + _balanced(text, "{", "}") if isinstance(o := _loads(span), dict)]
    for obj in reversed(objects):  # the last object with a ranking: models often restate an example first
        seq = next((obj[k] for k in KEYS if isinstance(obj.get(k), list)), None)
        got = _labels(seq, n) if seq is not None else []
        if got:
            return got, "json"
    lists = [_labels(o, n) for span in fenced + _balanced(text, "[", "]") if isinstance(o := _loads(span), list)]
    lists = [x for x in lists if len(x) > 1]  # "[3]" alone is a label in prose, not a ranking
    if lists:
        return max(reversed(lists), key=len), "list"
    chains = list(_CHAIN.finditer(text))
    if chains:
        got = _labels(_LABEL.findall(chains[-1].group(0)), n)
        if got:
            return got, "chain"
    return None, "no ranking found"


def rank_window(window: Sequence[int], text: str) -> tuple[list[int], bool, str]:
    """``window`` (candidate ids as shown, labelled 1..N) reordered by the model's ``text``: (the new
    order, whether the answer was read, how / why not). An unread answer keeps ``window``."""
    got, how = parse_ranking(text, len(window))
    if got is None:
        return list(window), False, how
    return complete_ranking(list(window), [window[i] for i in got]), True, how


__all__ = ["parse_ranking", "rank_window"]
