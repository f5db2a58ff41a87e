"""Searching one index snapshot: query encoding, the coarse stage, pipelines, hydration.

``search(index, ...)`` is what ``Index.search`` runs: it builds the ``Query``, encodes its sides once
(memoised on the query, so rerankers reuse the vectors), runs the query's coarse strategy (a fusion,
or intersection) and either returns the coarse ranking or hands it to a rerank ``Pipeline``; every path
ends in ``hydrate``, which attaches the items' metadata and per-stage ranks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from mmretrieve.config import check_options
from mmretrieve.errors import UsageError
from mmretrieve.query import FUSIONS, Query
from mmretrieve.results import Hit, SearchResults


# ---- query vectors --------------------------------------------------------------------------------
def encode_query(index, query: Query) -> dict[str, np.ndarray]:
    """{'image': (d,), 'text': (d,)} for the sides the query has. A list of texts is averaged
    (normalised); an image or video already in the index (``query.image_id``) reuses its stored
    embedding; a query video is sampled and pooled as the index's videos were. Memoised on the query."""
    memo = query.cache.get(("vectors", index.encoder_name))
    if memo is not None:
        return memo
    enc = index.encoder
    out = {}
    if query.text is not None:
        texts = query.text if isinstance(query.text, list) else [query.text]
        t = enc.encode_texts(texts).mean(0)
        out["text"] = (t / max(float(np.linalg.norm(t)), 1e-12)).astype(np.float32)
    if query.image_id is not None and index.exact_vectors():
        out["image"] = index.vectors([query.image_id])[0]
    elif query.image is not None:
        out["image"] = enc.encode_images([query.image])[0]
    elif query.video is not None:
        out["image"] = index.encode_video(query.video)
    query.cache[("vectors", index.encoder_name)] = out
    return out


def query_vector(index, query: Query) -> np.ndarray:
    """The single query vector (the fusion's; intersection gives the sum), for rerankers that score
    items against the query (e.g. video frames)."""
    return query.strategy.query_vector(encode_query(index, query))


# ---- coarse stage ---------------------------------------------------------------------------------
def coarse(index, query: Query, k: int, *, exclude: Sequence[int] | None = None, k1: int | None = None,
           nprobe: int | None = None, ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, scores) of the top ``k`` for ``query`` by its coarse strategy."""
    return coarse_from_vectors(index, encode_query(index, query), query.strategy, k, exclude=exclude, k1=k1,
                               nprobe=nprobe, ef_search=ef_search)


def coarse_from_vectors(index, vecs: dict[str, np.ndarray], strategy, k: int, *, options: dict | None = None,
                        exclude: Sequence[int] | None = None, k1: int | None = None, nprobe: int | None = None,
                        ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The coarse stage from already-encoded query sides. ``strategy``: a ``CoarseStrategy``, a fusion
    name (with ``options``), or ``None`` for a single-sided query."""
    from mmretrieve.query import SingleSide, coarse_strategy

    if strategy is None:
        strategy = SingleSide()
    elif isinstance(strategy, str):
        strategy = coarse_strategy(strategy, options)
    return strategy.search(index, vecs, k, exclude=exclude, nprobe=nprobe, ef_search=ef_search, k1=k1)


# ---- search -----------------------------------------------------------------------------------------
SEARCH_OPTIONS = ("text", "image", "video", "fusion", "k", "exclude", "exclude_reference", "pipeline")


def search(index, query: Query | None = None, *, text=None, image=None, video=None, fusion: str | None = None,
           k: int = 10, exclude: Sequence[int | str] | None = None, exclude_reference: bool = True, pipeline=None,
           **options: Any) -> SearchResults:
    """See ``Index.search``. ``options`` are the fusion's (``weight``, ``k1``, ``mode``); anything else is
    refused with the list of valid options."""
    pipe = None
    if pipeline is not None:
        from mmretrieve.rerank.pipeline import as_pipeline

        pipe = as_pipeline(pipeline)
    if query is None:
        fusion = fusion or (pipe.coarse_fusion if pipe is not None else None) or "sum"
        takes = FUSIONS.get(fusion).option_names
        check_options(f"Index.search (fusion {fusion!r} takes {', '.join(takes) or 'no options'})", options,
                      (*SEARCH_OPTIONS, *takes))
        query = Query(text=text, image=image, video=video, fusion=fusion, options=dict(options))
    elif options or text is not None or image is not None or video is not None or fusion is not None:
        check_options("Index.search with a Query (options belong in the Query)", options, ())
        raise UsageError("give either a Query or text= / image= / video= / fusion=, not both")
    excl = [index.as_id(e) for e in (exclude or [])]
    ref_path = query.image_path or (str(query.video) if query.video is not None else None)
    if query.image_id is None and ref_path:
        try:
            query.image_id = index.get(ref_path).id
        except KeyError:
            pass
    if exclude_reference and query.kind.startswith("composed") and query.image_id is not None:
        excl.append(query.image_id)
    if pipe is not None:
        return pipe.run(index, query, k=k, exclude=excl)
    t0 = time.perf_counter()
    ids, scores = coarse(index, query, k, exclude=excl)
    t1 = time.perf_counter()
    return hydrate(index, query.describe(), ids, scores, stages={"coarse": ids}, timings={"coarse": (t1 - t0) * 1000})


def search_by_vector(index, vector: np.ndarray, k: int = 10, **kw) -> SearchResults:
    """Search with a precomputed embedding (no encoder involved); results carry metadata."""
    check_options("Index.search_by_vector", kw, ("nprobe", "ef_search", "exclude"))
    t0 = time.perf_counter()
    D, I = index.search_vectors(vector, k, **kw)
    m = I[0] >= 0
    ids, scores = I[0][m], D[0][m]
    t1 = time.perf_counter()
    return hydrate(index, {"kind": "vector"}, ids, scores, stages={"coarse": ids}, timings={"coarse": (t1 - t0) * 1000})


def hydrate(index, query: dict, ids, scores, *, stages: dict[str, Sequence[int]], stage_scores=None, extra=None,
            timings=None) -> SearchResults:
    """Attach metadata to ranked ids (the last step of every search path)."""
    ids = np.asarray(ids).tolist()
    scores = np.asarray(scores, dtype=np.float64).tolist()
    items = index.items(ids)
    stage_rank = {s: {int(i): r for r, i in enumerate(np.asarray(lst).tolist(), 1)} for s, lst in stages.items()}
    stage_scores = stage_scores or {}
    extra = extra or {}
    hits = []
    for r, (i, sc) in enumerate(zip(ids, scores), 1):
        it = items.get(i)
        if it is None:
            continue
        hits.append(Hit(
            id=i, key=it.key, uri=it.uri, score=sc, rank=r, kind=it.kind, caption=it.caption,
            stage_ranks={s: m[i] for s, m in stage_rank.items() if i in m},
            stage_scores={s: float(v[i]) for s, v in stage_scores.items() if i in v},
            extra=extra.get(i, {}),
        ))
    return SearchResults(hits=hits, query=query, stages=list(stages), timings_ms=timings or {})


__all__ = ["search", "search_by_vector", "coarse", "coarse_from_vectors", "encode_query", "query_vector", "hydrate"]
