"""Searching one index snapshot, in one order: encode the query -> plan and run the coarse search ->
rerank stages -> hydrate.

``search(index, ...)`` is what ``Index.search`` runs: it builds the ``Query``, ties its visual side to
the index, encodes its sides once (an explicit ``EncodedQuery`` value) and hands it to ``run``, which
owns the order of the stages. The coarse strategy only *plans* (``CoarsePlan``: the rows to search and
how to merge their lists); ``coarse`` runs the plan on the index. Rerankers get a read-only view of the
index (``ReadView``: items, stored vectors, patches, frames), the encoded query, the shortlist and its
scores; they never search or hydrate. Every path ends in ``hydrate``, which attaches the items' metadata
and per-stage ranks.
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
from mmretrieve.query import FUSIONS, CoarsePlan, EncodedQuery, Query
from mmretrieve.results import Hit, SearchResults


# ---- query vectors --------------------------------------------------------------------------------
def encode_query(index, query: Query, known: dict[str, np.ndarray] | None = None) -> EncodedQuery:
    """The query with its sides encoded: ``{'image': (d,), 'text': (d,)}`` for the sides it has. A list
    of texts is averaged (normalised); an image or video already in the index (``query.image_id``) reuses
    its stored embedding; a query video is sampled and pooled as the index's videos were. ``known``:
    sides already encoded (e.g. by the service's batcher), not encoded again."""
    out = dict(known or {})  # the encoder is loaded only for a side that needs encoding: an item query needs none
    if query.text is not None and "text" not in out:
        texts = query.text if isinstance(query.text, list) else [query.text]
        t = index.encoder.encode_texts(texts).mean(0)
        out["text"] = (t / max(float(np.linalg.norm(t)), 1e-12)).astype(np.float32)
    if "image" in out:
        pass
    elif query.image_id is not None and index.exact_vectors():
        out["image"] = index.vectors([query.image_id])[0]
    elif query.image is not None:
        out["image"] = index.encoder.encode_images([query.image])[0]
    elif query.video is not None:
        out["image"] = index.encode_video(query.video)
    return EncodedQuery(query, out)


# ---- coarse stage ---------------------------------------------------------------------------------
def coarse(index, plan: CoarsePlan, *, exclude: Sequence[int] | None = None, nprobe: int | None = None,
           ef_search: int | None = None, where=None) -> tuple[np.ndarray, np.ndarray]:
    """Run a strategy's ``CoarsePlan`` on the index: (ids, scores) of the ranking, best first. Each row is
    searched on its own (as a single query, so its list does not depend on what it is batched with).
    ``where``: a filter; every row's search keeps to it, so a list-level merge sees matching items only."""
    lists = []
    for q in plan.queries:
        D, I = index.search_vectors(q[None], plan.k, exclude=exclude, nprobe=nprobe, ef_search=ef_search, where=where)
        m = I[0] >= 0
        lists.append((I[0][m], D[0][m]))
    if plan.merge is None:
        return lists[0]
    text = None
    if plan.text is not None:  # a hybrid plan: the BM25 list joins the union
        text = index.text_search(plan.text, plan.k, where=where, exclude=exclude)
    union = np.unique(np.concatenate([ids for ids, _ in lists] + ([text[0]] if text is not None else [])))
    if not len(union):
        return union.astype(np.int64), np.zeros(0, np.float32)
    if text is not None:
        return plan.merge(union, index.vectors(union), {"vector": lists, "text": text})
    return plan.merge(union, index.vectors(union))


# ---- the order of a search ------------------------------------------------------------------------
def run(index, query: EncodedQuery, *, k: int, exclude: Sequence[int] = (), pipeline=None, nprobe: int | None = None,
        ef_search: int | None = None, where=None) -> SearchResults:
    """encoded query -> coarse -> every rerank stage -> the top ``k``, hydrated. ``where``: a filter (the
    shortlist the stages rerank holds matching items only)."""
    shortlist = pipeline.shortlist_size(k) if pipeline is not None else k
    timings: dict[str, float] = {}
    stage_info: dict[str, dict] = {}
    if pipeline is not None and pipeline.describer is not None:
        t0 = time.perf_counter()
        (text,), cost = pipeline.describer.describe([query])
        query = pipeline.describer.apply(index.encoder, query, text)
        timings["describe"] = (time.perf_counter() - t0) * 1000
        stage_info["describe"] = {"description": query.description, "cost": cost.to_dict()}
    t0 = time.perf_counter()
    ids, scores = coarse(index, query.plan(shortlist), exclude=list(exclude), nprobe=nprobe, ef_search=ef_search,
                         where=where)
    timings["coarse"] = (time.perf_counter() - t0) * 1000
    order_by_stage = {"coarse": ids.copy()}
    stage_scores = {"coarse": dict(zip(ids.tolist(), np.asarray(scores, np.float64).tolist()))}
    extra: dict[int, dict] = {}
    described = query.describe()
    if where is not None:
        described["where"] = where if isinstance(where, str) else where.where
    if pipeline is not None:
        described["pipeline"] = [st.config() for st in pipeline.stages]
        if pipeline.describer is not None:
            described["describe"] = pipeline.describer.config()
        for r in pipeline.rerank(index.view, query, ids, scores):
            ids, scores = r.ids, r.scores
            timings[r.label] = r.ms
            order_by_stage[r.label] = ids.copy()
            stage_scores[r.label] = r.fine
            for i, d in r.extra.items():
                extra.setdefault(int(i), {}).update(d)
            if r.info:
                stage_info[r.label] = r.info
    res = hydrate(index, described, ids[:k], scores[:k], stages=order_by_stage, stage_scores=stage_scores,
                  extra=extra, timings=timings)
    res.stage_info = stage_info
    return res


# ---- search -----------------------------------------------------------------------------------------
SEARCH_OPTIONS = ("text", "image", "video", "item", "fusion", "k", "exclude", "exclude_reference", "pipeline", "where")


def search(index, query: Query | None = None, *, text=None, image=None, video=None, item=None, vector=None,
           fusion: str | None = None, k: int = 10, exclude: Sequence[int | str] | None = None,
           exclude_reference: bool = True, pipeline=None, nprobe: int | None = None, ef_search: int | None = None,
           where: str | None = None, **options: Any) -> SearchResults:
    """See ``Index.search``. ``options`` are the fusion's (``weight``, ``k1``, ``mode``); anything else is
    refused with the list of valid options."""
    k = positive_int(k, "k", "Index.search")
    excl = [index.as_id(e) for e in ([] if exclude is None else exclude)]
    if where is not None:
        where = index.select(where)  # a bad filter is refused before any encoding
    if vector is not None:
        return _search_vector(index, vector, query, text, image, video, item, fusion, pipeline, options, k, excl,
                              nprobe, ef_search, where)
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
    resolve_visual(index, query)
    if exclude_reference and query.image_id is not None and (query.kind.startswith("composed") or query.item is not None):
        excl.append(query.image_id)  # "more like this" (item=) and composed retrieval leave the reference out
    return run(index, encode_query(index, query), k=k, exclude=excl, pipeline=pipe, nprobe=nprobe, ef_search=ef_search,
               where=where)


def _search_vector(index, vector, query, text, image, video, item, fusion, pipeline, options, k, excl, nprobe,
                   ef_search, where=None) -> SearchResults:
    """A precomputed embedding: no encoder, no fusion, no rerankers (they need a query to look at)."""
    check_options("Index.search with a vector", options, ("k", "exclude", "nprobe", "ef_search", "where"))
    given = [n for n, v in (("query", query), ("text", text), ("image", image), ("video", video), ("item", item),
                            ("fusion", fusion), ("pipeline", pipeline)) if v is not None]
    if given:
        raise UsageError(f"Index.search(vector=...) takes k, exclude, nprobe, ef_search and where only, not {', '.join(given)} "
                         "(a vector has no sides to fuse and no query for rerankers to look at)")
    v = query_row(index, vector)
    t0 = time.perf_counter()
    ids, scores = coarse(index, CoarsePlan(v[None], k), exclude=excl, nprobe=nprobe, ef_search=ef_search, where=where)
    ms = (time.perf_counter() - t0) * 1000
    described = {"kind": "vector", **({"where": where.where} if where is not None else {})}
    return hydrate(index, described, ids, scores, stages={"coarse": ids}, timings={"coarse": ms})


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
            f"Index.search(vector=...) takes one vector of shape ({index.dim},) or (1, {index.dim}), got shape "
            f"{tuple(v.shape)}; for several, call it once per row or use Index.search_vectors (ids and scores of every row)")
    if v.shape[0] != index.dim:
        raise BadVectorsError(f"query vector: expected dim {index.dim}, got {v.shape[0]}")
    bad = np.flatnonzero(~np.isfinite(v))
    if len(bad):
        raise BadVectorsError(f"query vector: {len(bad)} NaN or infinite value(s), the first at position {int(bad[0])}")
    if not np.any(v):
        raise BadVectorsError("query vector: all zeros (no direction to search)")
    return v


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
            extra=extra.get(i, {}), metadata=metadata_of(it),
        ))
    return SearchResults(hits=hits, query=query, stages=list(stages), timings_ms=timings or {})


def metadata_of(item) -> dict[str, Any]:
    """An item's metadata as a hit carries it (``Hit.metadata``): its stored ``extra`` fields (manifest /
    parquet / webdataset columns, shard, duration ...) and the stored file facts (``size``, ``mtime``,
    ``width``, ``height``, ``added_at``, ``frames``) where known; values keep their JSON types."""
    out = dict(item.extra or {})
    facts = {"size": item.size, "mtime": item.mtime, "width": item.width, "height": item.height,
             "added_at": item.added_at, "frames": item.frame_count}
    out.update({n: v for n, v in facts.items() if v is not None})
    return out


def search_deduped(index, k: int, fetch, *, threshold: float = 0.95, dupe_k: int = 10) -> SearchResults:
    """``exclude_dupes``: the top ``k`` of ``fetch(n)`` (a search for ``n`` hits) with one hit per
    near-duplicate group (the best-ranked; groups of ``Index.near_duplicates(threshold, dupe_k)``, found
    once per snapshot). Asks for more hits while duplicates leave fewer than ``k`` (doubling, bounded)."""
    from dataclasses import replace

    from mmretrieve.index.dupes import dedupe_hits, group_of

    groups = group_of(index.near_duplicates(threshold, dupe_k))
    live = max(1, len(index))
    n = min(2 * k, live)
    for _ in range(32):  # doubling: at most log2(N) rounds are ever needed
        res = fetch(n)
        kept = dedupe_hits(res.hits, groups)
        if len(kept) >= k or len(res.hits) < n or n >= live:
            break
        n = min(2 * n, live)
    res.hits = [replace(h, rank=r) for r, h in enumerate(kept[:k], 1)]
    res.query["exclude_dupes"] = {"threshold": threshold, "k": dupe_k}
    return res


__all__ = ["metadata_of", "search", "search_deduped", "run", "coarse", "encode_query", "resolve_visual", "query_row", "hydrate"]
