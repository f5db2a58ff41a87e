"""Browsing a collection: facets of the items' metadata and a 2-D map of their embeddings.

Facets (``GET /api/v1/indexes/{name}/facets?filter=...``): for every top-level metadata field (and the
built-in ``kind``), over the live items that meet the filter: the count per value where a field has at
most ``MAX_VALUES`` distinct values (the ``TOP_VALUES`` most frequent otherwise), and for numbers their
min, max and a histogram. Computed by SQL over the items table (the matching rows of the snapshot in a
temporary table, every value a bound parameter), cached per index version and filter (least recently used
dropped).

The map (``GET /api/v1/indexes/{name}/map``): every live item projected to 2-D (PCA by default; ``umap``
or ``tsne`` where installed), computed once per index version and cached in memory and on disk by
``mmretrieve.index.embmap`` (the same map a ``map within (...)`` filter reads). Sent compactly: ids and
float16 coordinates as base64 of little-endian arrays.
"""

from __future__ import annotations

import base64
import logging
from typing import Annotated, Any

import numpy as np
from fastapi import Query
from fastapi.responses import JSONResponse

from mmretrieve.index import embmap
from mmretrieve.index.embmap import METHODS, load_or_compute_map, map_path, project
from mmretrieve.lru import LRU

log = logging.getLogger(__name__)

#: a field with at most this many distinct values lists them all; more: the most frequent ``TOP_VALUES``
MAX_VALUES = 50
TOP_VALUES = 20
#: bins of a numeric field's histogram
BINS = 20
#: facet answers kept (per server)
FACET_CACHE = 128
_NUMERIC = ("integer", "real")


# ---- facets ---------------------------------------------------------------------------------------------
def _matching(index, where: str | None) -> list[tuple[int, str, int]]:
    """(id, segment, row) of the live items meeting ``where`` (all of them without one)."""
    if where is None or not where.strip():
        return index.meta.matching("1", [])
    return index.meta.matching(*index.filter_sql(where))


_FIELDS_SQL = """
SELECT j.key, COUNT(*), COUNT(DISTINCT j.type || ':' || j.value),
       SUM(j.type IN ('integer', 'real')), MIN(CASE WHEN j.type IN ('integer', 'real') THEN j.value END),
       MAX(CASE WHEN j.type IN ('integer', 'real') THEN j.value END), GROUP_CONCAT(DISTINCT j.type)
FROM mm_facet_rows f JOIN items i ON i.segment = f.segment AND i.row = f.row, json_each(i.extra) j
WHERE j.type NOT IN ('object', 'array', 'null') GROUP BY j.key ORDER BY j.key LIMIT ?
"""
_VALUES_SQL = """
SELECT j.type, j.value, COUNT(*) AS n
FROM mm_facet_rows f JOIN items i ON i.segment = f.segment AND i.row = f.row, json_each(i.extra) j
WHERE j.key = ? AND j.type NOT IN ('object', 'array', 'null') GROUP BY j.type, j.value ORDER BY n DESC, j.value LIMIT ?
"""
_HIST_SQL = """
SELECT MIN(CAST((j.value - ?) / ? AS INTEGER), ?), COUNT(*)
FROM mm_facet_rows f JOIN items i ON i.segment = f.segment AND i.row = f.row, json_each(i.extra) j
WHERE j.key = ? AND j.type IN ('integer', 'real') GROUP BY 1
"""
_KIND_SQL = """
SELECT i.kind, COUNT(*) AS n FROM mm_facet_rows f JOIN items i ON i.segment = f.segment AND i.row = f.row
GROUP BY i.kind ORDER BY n DESC LIMIT ?
"""
#: the most metadata fields listed
MAX_FIELDS = 64


def _value(typ: str, v: Any) -> Any:
    if typ in ("true", "false"):
        return typ == "true"
    return v


def _histogram(conn, key: str, lo: float, hi: float) -> dict:
    if hi <= lo:
        return {"edges": [lo, hi], "counts": [0]}
    width = (hi - lo) / BINS
    counts = [0] * BINS
    for b, n in conn.execute(_HIST_SQL, (lo, width, BINS - 1, key)).fetchall():
        counts[max(0, min(BINS - 1, int(b)))] += n
    return {"edges": [lo + width * i for i in range(BINS)] + [hi], "counts": counts}


def _field(conn, key: str, count: int, distinct: int, numbers: int, lo, hi, types: str) -> dict:
    kinds = {"integer": "number", "real": "number", "text": "string", "true": "bool", "false": "bool"}
    seen = sorted({kinds.get(t, t) for t in (types or "").split(",") if t})
    out: dict[str, Any] = {"name": key, "type": seen[0] if len(seen) == 1 else "mixed", "count": count,
                           "distinct": distinct, "truncated": distinct > MAX_VALUES}
    rows = conn.execute(_VALUES_SQL, (key, MAX_VALUES if distinct <= MAX_VALUES else TOP_VALUES)).fetchall()
    out["values"] = [{"value": _value(t, v), "count": n} for t, v, n in rows]
    if numbers:
        lo, hi = float(lo), float(hi)
        out.update(min=lo, max=hi, numbers=numbers, histogram=_histogram(conn, key, lo, hi))
    return out


def compute_facets(index, where: str | None) -> dict:
    """The facets of the live items of ``index`` meeting ``where`` (see the module's doc)."""
    matches = _matching(index, where)
    meta = index.meta
    with meta._lock:  # one connection, shared by the server's threads: the temporary table is this call's
        conn = meta.conn
        try:
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS mm_facet_rows(segment TEXT NOT NULL, row INTEGER NOT NULL)")
            conn.execute("DELETE FROM mm_facet_rows")
            conn.executemany("INSERT INTO mm_facet_rows VALUES(?, ?)", ((s, r) for _, s, r in matches))
            kinds = conn.execute(_KIND_SQL, (MAX_VALUES,)).fetchall()
            fields = [_field(conn, *row) for row in conn.execute(_FIELDS_SQL, (MAX_FIELDS,)).fetchall()]
        finally:
            conn.execute("DELETE FROM mm_facet_rows")
    builtin = {"name": "kind", "builtin": True, "type": "string", "count": len(matches), "distinct": len(kinds),
               "truncated": False, "values": [{"value": k, "count": n} for k, n in kinds]}
    return {"version": index.version, "filter": where or None, "matching": len(matches), "fields": [builtin, *fields]}


# ---- the map (computed and cached by mmretrieve.index.embmap) ----------------------------------------
def map_response(index, ids: np.ndarray, xy: np.ndarray, method: str) -> dict:
    """The map to draw: at most ``embmap.MAX_MAP_POINTS`` of its points (an even sample by id; ``total``
    says how many the map holds, all of which ``map within`` selects among)."""
    from mmretrieve.index import embmap

    total = int(len(ids))
    if total > embmap.MAX_MAP_POINTS:
        keep = embmap.sample(np.arange(total), embmap.MAX_MAP_POINTS)
        ids, xy = ids[keep], xy[keep]
    small = not len(ids) or int(ids.max()) < 2**31
    id_bytes = ids.astype("<i4" if small else "<f8").tobytes()
    return {"version": index.version, "method": method, "count": int(len(ids)), "total": total,
            "ids_dtype": "int32" if small else "float64", "ids": base64.b64encode(id_bytes).decode(),
            "xy_dtype": "float16", "xy": base64.b64encode(xy.astype("<f2").tobytes()).decode()}


# ---- the service side -------------------------------------------------------------------------------------
class Collection:
    """Facets and maps of a ``Service``'s indexes, cached by index version."""

    def __init__(self, service) -> None:
        self.service = service
        self._facets: LRU[dict] = LRU(FACET_CACHE)

    def facets(self, name: str, where: str | None) -> dict:
        index = self.service.manager.get(name).index
        canonical = None
        if where is not None and where.strip():
            from mmretrieve.store.filters import parse

            canonical = str(parse(where))  # a FilterError (400) before anything runs
        key = (name, index.version, canonical)
        return self._facets.get_or_make(key, lambda: compute_facets(index, where))

    def map(self, name: str, method: str) -> dict:
        embmap.check_method(method)  # a 400 for an unknown method or one whose package is not installed
        index = self.service.manager.get(name).index
        ids, xy = embmap.get_map(index, method)  # the same cached map a "map within" filter reads
        return map_response(index, ids, xy, method)


def register(router, service) -> None:
    """Add the facets and map routes to the API router (its token check and error answers apply)."""
    coll = Collection(service)
    service.collection = coll

    @router.get("/indexes/{name}/facets", summary="counts per metadata value (and numeric ranges) over the items "
                "that meet a filter")
    async def facets(name: str, filter: Annotated[str | None, Query(max_length=4096, description="a metadata filter, "
                     "as in search")] = None):
        service.manager.get(name)
        return JSONResponse(await service.run_blocking(lambda: coll.facets(name, filter)))

    @router.get("/indexes/{name}/map", summary="every item projected to 2-D (ids int32 and xy float16, base64 "
                "little-endian); computed once per index version")
    async def embedding_map(name: str, method: Annotated[str, Query(description="pca (default), umap or tsne "
                            "(where installed)")] = "pca"):
        service.manager.get(name)
        return JSONResponse(await service.run_blocking(lambda: coll.map(name, method)))


__all__ = ["Collection", "register", "compute_facets", "project", "load_or_compute_map", "map_path",
           "MAX_VALUES", "METHODS"]
