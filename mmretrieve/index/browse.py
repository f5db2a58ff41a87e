"""Browsing: the items of a snapshot that meet a filter (or all of them), in an order, a page at a time,
with no query. ``Index.browse`` runs it; the service's filter-only search and ``mmretrieve search NAME
--where ...`` without a query are this.

The matching ids are the filter's ``Selection`` (``index.filtered``: one SQL query, cached per snapshot);
the order is ``id`` (the selection's own sorted ids), ``added`` (the built-in ``added_at``) or a numeric
field, ascending or ``desc``. A field's order reads every visible item's value in one SQL pass
(``store.filters.order_sql``: a number, else NULL) and is kept on the selection, so the next page of the
same browse is a slice. Items without a number in the field come last in either direction; ties go by id.
A hit's score is 0 (there is no query to score against); its rank is its place in the order (over all pages).
"""

from __future__ import annotations

import time

import numpy as np

from mmretrieve.config import positive_int
from mmretrieve.errors import UsageError
from mmretrieve.results import SearchResults

#: browse orders kept per selection (least recently added dropped)
ORDER_CACHE = 8


def ordered_ids(index, sel, order: str = "id") -> np.ndarray:
    """The selection's ids in ``order`` (cached on the selection: a selection belongs to one snapshot)."""
    from mmretrieve.store.filters import order_sql, parse_order

    field, desc = parse_order(order)
    key = (str(field), desc)
    cache = sel.__dict__.setdefault("_orders", {})
    if key in cache:
        return cache[key]
    if field.builtin and field.path == ("id",):
        ids = sel.ids[::-1] if desc else sel.ids
    else:
        rows = index.meta.values(*order_sql(field))
        ids_all = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        keep = sel.allowed(ids_all)
        vals = [r[3] for r, k in zip(rows, keep.tolist()) if k]
        ids_all = ids_all[keep]
        missing = np.fromiter((v is None for v in vals), bool, len(vals))
        num = np.asarray([0.0 if v is None else float(v) for v in vals], np.float64)
        # lexsort: the last key is the primary one: missing values last, then the value, then the id
        ids = ids_all[np.lexsort((ids_all, -num if desc else num, missing))]
    if len(cache) >= ORDER_CACHE:
        cache.pop(next(iter(cache)))
    cache[key] = ids
    return ids


def browse(index, where=None, *, k: int = 10, offset: int = 0, order: str = "id") -> SearchResults:
    """See ``Index.browse``."""
    from mmretrieve.index.search import hydrate

    k = positive_int(k, "k", "Index.browse")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise UsageError(f"Index.browse: offset must be a whole number >= 0, got {offset!r}")
    t0 = time.perf_counter()
    sel = index.select(where)
    ids = ordered_ids(index, sel, order)
    page = ids[offset: offset + k]
    ms = (time.perf_counter() - t0) * 1000
    described = {"kind": "browse", "order": str(order), "matching": int(sel.count)}
    if where is not None:
        described["where"] = sel.where
    res = hydrate(index, described, page, np.zeros(len(page), np.float32), stages={"browse": page},
                  timings={"browse": ms})
    for h in res.hits:
        h.rank += offset
        h.stage_ranks = {"browse": h.rank}
    return res


__all__ = ["browse", "ordered_ids", "ORDER_CACHE"]
