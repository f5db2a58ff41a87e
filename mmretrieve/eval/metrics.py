"""Metrics exactly as the benchmarks' official code computes them (all returned in percent).

- **CIRR** (``Cuberick-Orion/CIRR``; SEARLE ``validate.py``): the gallery is every image of the split;
  the reference image is deleted from the ranking; Recall@K (K = 1, 5, 10, 50) is a hit when
  ``target_hard`` is in the top K. Recall_subset@K (K = 1, 2, 3) restricts the *same* ranking to the
  query's ``img_set.members`` (the reference, already deleted, leaves five). A query whose target is its
  own reference can never be hit once the reference is deleted: it counts as a miss.
- **FashionIQ** (SEARLE / LinCIR ``validate.py``): the gallery is the category's val split; the
  reference is *not* removed; R@10 and R@50 per category; ``average`` is the mean of the categories.
- **EgoCVR** (``ExplainableML/EgoCVR`` ``egocvr_retrieval.py``): the full ranking over every clip is
  filtered to the query's gallery (``global_idx`` or ``local_idx``); queries whose filtered gallery has
  fewer than 2 clips are skipped (not counted); a hit is any target clip in the top k; global R@1/5/10,
  local R@1/2/3.
- **CIRCO** (``miccunifi/CIRCO`` ``src/evaluation.py``): on a top-50 list of unique ids,
  ``prec_i = cumsum(hits)_i * hit_i / i``, ``AP@k = sum_{i<=k} prec_i / min(|gt|, k)``, mAP@k the mean;
  Recall@k counts ``target_img_id`` only; semantic-aspect mAP@10 as a breakdown.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

CIRR_KS = (1, 5, 10, 50)
CIRR_SUBSET_KS = (1, 2, 3)
FIQ_KS = (10, 50)
CIRCO_KS = (5, 10, 25, 50)
EGOCVR_KS = {"global": (1, 5, 10), "local": (1, 2, 3)}
EGOCVR_MIN_GALLERY = 2


def pct(x: Iterable[float]) -> float:
    x = list(x)
    return float(np.mean(x) * 100.0) if x else float("nan")


def remove_reference(ranking: Sequence[str], reference: str) -> list[str]:
    return [r for r in ranking if r != reference]


def first_rank(ranking: Sequence[str], targets: str | Iterable[str]) -> int | None:
    """1-based rank of the first target in ``ranking`` (None if absent)."""
    tset = {targets} if isinstance(targets, str) else set(targets)
    for i, r in enumerate(ranking, 1):
        if r in tset:
            return i
    return None


def recall_at(ranking: Sequence[str], target: str, k: int) -> float:
    return 1.0 if target in ranking[:k] else 0.0


def cirr_query_metrics(ranking: Sequence[str], reference: str, target: str, members: Sequence[str]) -> dict[str, float]:
    """Per-query CIRR hits (0/1). ``ranking`` is the full ranking of the split (or a prefix long enough
    that every member appears; see ``cirr_subset_ranking``)."""
    r = remove_reference(ranking, reference)
    out = {f"recall@{k}": recall_at(r, target, k) for k in CIRR_KS}
    sub = [x for x in r if x in set(members)]
    out.update({f"recall_subset@{k}": recall_at(sub, target, k) for k in CIRR_SUBSET_KS})
    return out


def cirr_metrics(rankings: Mapping[str, Sequence[str]], queries: Iterable) -> dict[str, float]:
    """Mean over queries, in percent. ``queries`` have ``qid``, ``reference``, ``target``, ``subset``."""
    per = [cirr_query_metrics(rankings[q.qid], q.reference, q.target, q.subset) for q in queries]
    keys = [f"recall@{k}" for k in CIRR_KS] + [f"recall_subset@{k}" for k in CIRR_SUBSET_KS]
    return {k: pct(p[k] for p in per) for k in keys}


def fashioniq_metrics(rankings: Mapping[str, Sequence[str]], queries: Iterable) -> dict[str, float]:
    """Per category ``<cat>/recall@10`` and ``<cat>/recall@50`` and their ``average/...``."""
    by_cat: dict[str, list] = defaultdict(list)
    for q in queries:
        by_cat[q.group].append(q)
    out: dict[str, float] = {}
    for cat in sorted(by_cat):
        for k in FIQ_KS:
            out[f"{cat}/recall@{k}"] = pct(recall_at(rankings[q.qid], q.target, k) for q in by_cat[cat])
    for k in FIQ_KS:
        out[f"average/recall@{k}"] = float(np.mean([out[f"{c}/recall@{k}"] for c in sorted(by_cat)]))
    return out


def circo_average_precisions(ranking: Sequence[str], gts: Sequence[str], ks: Sequence[int] = CIRCO_KS) -> dict[int, float]:
    labels = np.isin(np.asarray(list(ranking)[:50], dtype=object), np.asarray(list(gts), dtype=object)).astype(float)
    prec = np.cumsum(labels) * labels / np.arange(1, len(labels) + 1)
    return {k: float(prec[:k].sum() / min(len(gts), k)) for k in ks}


def circo_metrics(rankings: Mapping[str, Sequence[str]], queries: Iterable) -> dict[str, float]:
    """``map@k`` over all ground truths and ``recall@k`` on ``target_img_id``, in percent; plus
    ``aspect/<name>/map@10`` (the semantic-aspect breakdown the CIRCO server reports)."""
    aps: dict[int, list] = defaultdict(list)
    recalls: dict[int, list] = defaultdict(list)
    aspects: dict[str, list] = defaultdict(list)
    for q in queries:
        r = list(rankings[q.qid])[:50]
        ap = circo_average_precisions(r, q.gts)
        for k in CIRCO_KS:
            aps[k].append(ap[k])
            recalls[k].append(recall_at(r, q.target, k))
        for a in q.aspects:
            aspects[a].append(ap[10])
    out = {f"map@{k}": pct(aps[k]) for k in CIRCO_KS}
    out.update({f"recall@{k}": pct(recalls[k]) for k in CIRCO_KS})
    out.update({f"aspect/{a}/map@10": pct(v) for a, v in sorted(aspects.items())})
    return out


def protocol_ranking(ranking, proto: str) -> Sequence[str]:
    """EgoCVR: a query's ranking for one protocol (the list itself when it is not split by protocol)."""
    return ranking[proto] if isinstance(ranking, Mapping) else ranking


def egocvr_metrics(rankings: Mapping[str, Sequence[str]], queries: Iterable, min_gallery: int = EGOCVR_MIN_GALLERY) -> dict[str, float]:
    """``global/recall@{1,5,10}``, ``local/recall@{1,2,3}`` and how many queries each protocol kept.

    A query's ranking is one list over all clips (filtered here to each protocol's gallery), or a dict
    with one list per protocol (``{"global": [...], "local": [...]}``), as a multi-stage run produces:
    its rerankers re-score each protocol's own filtered shortlist, as EgoCVR's two-stage baseline does.
    """
    out: dict[str, float] = {}
    queries = list(queries)
    for proto, ks in EGOCVR_KS.items():
        hits: dict[int, list[float]] = {k: [] for k in ks}
        for q in queries:
            gallery = q.info.get(f"{proto}_gallery")
            if gallery is None:
                continue
            gset = set(gallery)
            filtered = [x for x in protocol_ranking(rankings[q.qid], proto) if x in gset]
            if len(filtered) < min_gallery:
                continue
            tset = set(q.gts)
            for k in ks:
                hits[k].append(1.0 if tset & set(filtered[:k]) else 0.0)
        for k in ks:
            out[f"{proto}/recall@{k}"] = pct(hits[k])
        out[f"{proto}/queries"] = float(len(hits[ks[0]]))
    return out


def recall_table(ranks: Iterable[int | None], ks: Sequence[int]) -> dict[str, float]:
    """Recall@k in percent from 1-based target ranks (None = not retrieved)."""
    ranks = list(ranks)
    return {f"recall@{k}": pct(1.0 if (r is not None and r <= k) else 0.0 for r in ranks) for k in ks}
