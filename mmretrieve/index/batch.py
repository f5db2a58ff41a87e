"""Many queries in one call: texts, stored items and vectors answered with one batched text-encoder
forward, one gather of stored vectors and one batched scan (``Index.search_vectors`` over the matrix).

Each query is a dict with one of ``text``, ``item`` (an id or key: "more like this", the item itself left
out unless ``keep_reference``) or ``vector``. The results equal one-by-one ``Index.search`` calls (coarse
stage only: no fusion, no rerankers).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from mmretrieve.errors import UsageError
from mmretrieve.index.search import hydrate, query_row
from mmretrieve.results import SearchResults

#: most queries in one batch
MAX_BATCH = 10_000
KINDS = ("text", "item", "vector")


def _kind(q, n: int) -> str:
    if not isinstance(q, dict):
        raise UsageError(f"query {n}: expected an object with one of text, item or vector, got {type(q).__name__}")
    given = [k for k in KINDS if q.get(k) is not None]
    unknown = sorted(set(q) - {*KINDS, "keep_reference"})
    if unknown or len(given) != 1:
        raise UsageError(f"query {n}: give exactly one of text, item or vector (got {', '.join(given + unknown) or 'none'})")
    return given[0]


def query_matrix(index, queries: Sequence[dict], encoded=None) -> tuple[np.ndarray, list[int | None], list[dict]]:
    """(Q (n, d) float32, the item id of each item query (else None), each query as results describe it)."""
    if not 1 <= len(queries) <= MAX_BATCH:
        raise UsageError(f"a batch takes 1 to {MAX_BATCH} queries, got {len(queries)}")
    kinds = [_kind(q, n) for n, q in enumerate(queries)]
    Q = np.zeros((len(queries), index.dim), np.float32)
    texts = [n for n, k in enumerate(kinds) if k == "text"]
    if texts:
        for n in texts:
            if not isinstance(queries[n]["text"], str) or not queries[n]["text"].strip():
                raise UsageError(f"query {n}: text must be a non-empty string")
        T = (np.asarray(encoded, np.float32) if encoded is not None  # e.g. the service's batcher
             else np.asarray(index.encoder.encode_texts([queries[n]["text"] for n in texts]), np.float32))
        Q[texts] = T / np.maximum(np.linalg.norm(T, axis=1, keepdims=True), 1e-12)
    item_ids: list[int | None] = [None] * len(queries)
    items = [n for n, k in enumerate(kinds) if k == "item"]
    for n in items:
        item_ids[n] = index.get(queries[n]["item"]).id
    if items:
        Q[items] = index.vectors([item_ids[n] for n in items])
    for n, k in enumerate(kinds):
        if k == "vector":
            Q[n] = query_row(index, queries[n]["vector"])
    described = [{"kind": k if k != "item" else "image", **({"text": queries[n]["text"]} if k == "text" else {}),
                  **({"item": {"id": item_ids[n], "key": str(queries[n]["item"])}} if k == "item" else {})}
                 for n, k in enumerate(kinds)]
    return Q, item_ids, described


def search_rows_excluding(index, Q: np.ndarray, k: int, drops: Sequence[int | None], **kw) -> list[tuple]:
    """(ids, scores) of the top ``k`` of each row of ``Q`` without that row's own id in ``drops`` (one per
    row, or None): one batched search, one result more when any row has an id to drop. ``kw``: the search's
    (``where``, ``nprobe``, ``ef_search``)."""
    extra = int(any(d is not None for d in drops))
    D, I = index.search_vectors(Q, k + extra, **kw)
    out = []
    for d, i, x in zip(D, I, drops):
        m = (i >= 0) & (i != (-2 if x is None else x))
        out.append((i[m][:k], d[m][:k]))
    return out


def search_batch(index, queries: Sequence[dict], *, k: int = 10, where=None, keep_reference: bool = False,
                 nprobe: int | None = None, ef_search: int | None = None, encoded=None) -> list[SearchResults]:
    """``SearchResults`` per query, in order (see the module). ``encoded``: the text queries' vectors, in
    order, when already encoded."""
    from mmretrieve.config import positive_int

    k = positive_int(k, "k", "Index.search_batch")
    sel = None if where is None else index.select(where)
    Q, item_ids, described = query_matrix(index, queries, encoded)
    drops = [None if keep_reference or queries[n].get("keep_reference") else i for n, i in enumerate(item_ids)]
    t0 = time.perf_counter()
    rows = search_rows_excluding(index, Q, k, drops, nprobe=nprobe, ef_search=ef_search, where=sel)
    ms = (time.perf_counter() - t0) * 1000 / len(Q)
    out = []
    for n, (ids, scores) in enumerate(rows):
        if sel is not None:
            described[n]["where"] = sel.where
        out.append(hydrate(index, described[n], ids, scores, stages={"coarse": ids}, timings={"coarse": ms}))
    return out


__all__ = ["search_batch", "search_rows_excluding", "query_matrix", "MAX_BATCH"]
