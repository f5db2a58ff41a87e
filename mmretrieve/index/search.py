"""Searching one index snapshot: query encoding, the coarse stage, pipelines, hydration.

``search(index, ...)`` is what ``Index.search`` runs: it builds the ``Query``, encodes its sides once
(memoised on the query, so rerankers reuse the vectors), runs the query's coarse strategy (a fusion,
or intersection) and either returns the coarse ranking or hands it to a rerank ``Pipeline``; every path
ends in ``hydrate``, which attaches the items' metadata and per-stage ranks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmretrieve.config import check_options, positive_int
from mmretrieve.errors import BadVectorsError, InputError, UsageError
from mmretrieve.media.shards import split_member_uri
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
    out = {}  # the encoder is loaded only for a side that needs encoding: an item query needs none
    if query.text is not None:
        texts = query.text if isinstance(query.text, list) else [query.text]
        t = index.encoder.encode_texts(texts).mean(0)
        out["text"] = (t / max(float(np.linalg.norm(t)), 1e-12)).astype(np.float32)
    if query.image_id is not None and index.exact_vectors():
        out["image"] = index.vectors([query.image_id])[0]
    elif query.image is not None:
        out["image"] = index.encoder.encode_images([query.image])[0]
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
SEARCH_OPTIONS = ("text", "image", "video", "item", "fusion", "k", "exclude", "exclude_reference", "pipeline")


def search(index, query: Query | None = None, *, text=None, image=None, video=None, item=None, fusion: str | None = None,
           k: int = 10, exclude: Sequence[int | str] | None = None, exclude_reference: bool = True, pipeline=None,
           **options: Any) -> SearchResults:
    """See ``Index.search``. ``options`` are the fusion's (``weight``, ``k1``, ``mode``); anything else is
    refused with the list of valid options."""
    k = positive_int(k, "k", "Index.search")
    pipe = None
    if pipeline is not None:
        from mmretrieve.rerank.pipeline import as_pipeline

        pipe = as_pipeline(pipeline)
    if query is None:
        fusion = fusion or (pipe.coarse_fusion if pipe is not None else None) or "sum"
        takes = FUSIONS.get(fusion).option_names
        check_options(f"Index.search (fusion {fusion!r} takes {', '.join(takes) or 'no options'})", options,
                      (*SEARCH_OPTIONS, *takes))
        query = Query(text=text, image=image, video=video, item=item, fusion=fusion, options=dict(options))
    elif options or any(x is not None for x in (text, image, video, item, fusion)):
        check_options("Index.search with a Query (options belong in the Query)", options, ())
        raise UsageError("give either a Query or text= / image= / video= / item= / fusion=, not both")
    excl = [index.as_id(e) for e in (exclude or [])]
    resolve_visual(index, query)
    if exclude_reference and query.kind.startswith("composed") and query.image_id is not None:
        excl.append(query.image_id)
    if pipe is not None:
        return pipe.run(index, query, k=k, exclude=excl)
    t0 = time.perf_counter()
    ids, scores = coarse(index, query, k, exclude=excl)
    t1 = time.perf_counter()
    return hydrate(index, query.describe(), ids, scores, stages={"coarse": ids}, timings={"coarse": (t1 - t0) * 1000})


def resolve_visual(index, query: Query) -> None:
    """Tie the query's visual side to the index: ``item=`` is looked up (id, key, ``id:`` / ``key:``) and
    becomes its file and stored vector; an image or video *file* that is itself indexed, unchanged since
    (same size and mtime), reuses its stored vector (and is the reference a composed query leaves out).
    A path is only ever a file: ``image="3"`` is the file ``3``, never item 3."""
    if query.image_id is not None:
        return
    if query.item is not None:
        it = index.get(query.item)
        if it.kind == "video":
            query.video = it.uri
        else:
            query.image = it.uri
        query.image_id = it.id
        return
    path = query.image_path or (os.fspath(query.video) if query.video is not None else None)
    if path is None:
        return
    p = Path(path).expanduser()
    member = split_member_uri(str(path))
    if member is not None and member[0].is_file():  # an image inside a shard (read by the encoder's loader)
        mtime = member[0].stat().st_mtime
        same = [it for it in index.meta.items_by_uri(str(path)) if it.kind != "frame" and it.mtime == mtime]
        if same:
            query.image_id = same[0].id
        return
    try:
        st = p.stat()
    except (OSError, ValueError):
        try:
            index.get(path)
        except (KeyError, UsageError):
            return  # not a file and not an item either: the encoder reports the missing file
        raise InputError(f"query {'video' if query.video is not None else 'image'} {path}: no such file (a query image "
                         f"is always a file); to query the indexed item {path!r}, give item={path!r} (--item {path})") from None
    same = [it for it in index.meta.items_by_uri(str(p.resolve())) if it.kind != "frame"
            and it.size == st.st_size and it.mtime == st.st_mtime]
    if same:
        query.image_id = same[0].id


def query_row(index, vector) -> np.ndarray:
    """One query vector, validated: shape ``(d,)`` or ``(1, d)`` of the index's dim, finite, not zero."""
    try:
        v = np.asarray(vector, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise BadVectorsError(f"query vector: not numeric ({e})") from None
    if v.ndim == 2 and v.shape[0] == 1:
        v = v[0]
    if v.ndim != 1:
        raise BadVectorsError(
            f"search_by_vector takes one vector of shape ({index.dim},) or (1, {index.dim}), got shape {tuple(v.shape)}; "
            "for several, call it once per row or use Index.search_vectors (ids and scores of every row)")
    if v.shape[0] != index.dim:
        raise BadVectorsError(f"query vector: expected dim {index.dim}, got {v.shape[0]}")
    bad = np.flatnonzero(~np.isfinite(v))
    if len(bad):
        raise BadVectorsError(f"query vector: {len(bad)} NaN or infinite value(s), the first at position {int(bad[0])}")
    if not np.any(v):
        raise BadVectorsError("query vector: all zeros (no direction to search)")
    return v


def search_by_vector(index, vector: np.ndarray, k: int = 10, **kw) -> SearchResults:
    """Search with a precomputed embedding (no encoder involved); results carry metadata."""
    check_options("Index.search_by_vector", kw, ("nprobe", "ef_search", "exclude"))
    k = positive_int(k, "k", "Index.search_by_vector")
    v = query_row(index, vector)
    t0 = time.perf_counter()
    D, I = index.search_vectors(v[None], k, **kw)
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


__all__ = ["search", "search_by_vector", "resolve_visual", "query_row", "coarse", "coarse_from_vectors", "encode_query", "query_vector", "hydrate"]
