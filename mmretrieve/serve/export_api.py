"""``GET /api/v1/indexes/{name}/export?filter=...&format=csv|jsonl&limit=N``: the items of a served index
(those that meet the filter) streamed as CSV or JSONL, under the API's token and limits.

A row is what the API already shows of an item in a search hit: ``id``, ``key``, ``kind``, ``caption``,
its ``thumbnail`` and ``media`` URLs, and its metadata fields; never the file's path on the server. At
most ``max_offset + max_k`` rows (what paging through search can reach; ``limit`` defaults to that and may
not exceed it); ``X-Total-Count`` says how many items match, ``X-Row-Limit`` the most rows sent. A filter that does not parse is a 400 before
anything is sent. CSV cells that start like a formula are prefixed with ``'``; its columns are the union
of the rows' (read in a first pass over the same items)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query
from fastapi.responses import StreamingResponse

from mmretrieve.errors import UsageError
from mmretrieve.export import csv_columns, csv_lines, flat_row
from mmretrieve.index.export import iter_items
from mmretrieve.index.search import metadata_of
from mmretrieve.serve import responses

API_FIELDS = ("id", "key", "kind", "caption", "thumbnail", "media")
MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson"}


def api_row(index_name: str, it) -> dict:
    thumb, media = responses.urls(index_name, it)
    fixed = {"id": it.id, "key": it.key, "kind": it.kind, "caption": it.caption, "thumbnail": thumb, "media": media}
    return responses.clean(flat_row(fixed, metadata_of(it)))


def row_cap(config) -> int:
    return int(config.max_offset) + int(config.max_k)


def prepare(service, name: str, filter: str | None, fmt: str, limit: int | None):
    """(index, selection or None, limit, total): checked before any byte is streamed."""
    if fmt not in MEDIA_TYPES:
        raise UsageError(f"unknown export format {fmt!r}; the API writes csv or jsonl")
    cap = row_cap(service.config)
    if limit is not None and not 1 <= limit <= cap:
        raise UsageError(f"limit must be 1 to {cap} (this server's max_offset + max_k)")
    idx = service.manager.get(name).index
    sel = idx.select(filter) if filter is not None else None
    total = len(idx) if sel is None else int(sel.count)
    return idx, sel, limit or cap, total


def stream(name: str, idx, sel, limit: int, fmt: str):
    """The export's text, a chunk at a time (a sync generator: Starlette runs it in its thread pool)."""
    import json

    def rows():
        return (api_row(name, it) for it in iter_items(idx, sel, limit))

    if fmt == "jsonl":
        for row in rows():
            yield json.dumps(row, ensure_ascii=False) + "\n"
        return
    columns = csv_columns(rows(), API_FIELDS)
    batch: list[str] = []
    for line in csv_lines(rows(), columns):
        batch.append(line)
        if len(batch) >= 256:
            yield "".join(batch)
            batch = []
    if batch:
        yield "".join(batch)


def register(router, service) -> None:
    @router.get("/indexes/{name}/export", summary="the items (those that meet a filter) as CSV or JSONL, streamed",
                responses={200: {"content": {"text/csv": {}, "application/x-ndjson": {}}}})
    async def export(name: str,
                     filter: Annotated[str | None, Query(max_length=4096, description="a metadata filter, as in search")] = None,
                     format: Annotated[str, Query(description="csv (default) or jsonl")] = "csv",
                     limit: Annotated[int | None, Query(description="at most this many rows (the server caps it)")] = None):
        idx, sel, n, total = await service.run_blocking(lambda: prepare(service, name, filter, format, limit))
        headers = {"X-Total-Count": str(total), "X-Row-Limit": str(n), "Cache-Control": "no-store",
                   "Content-Disposition": f'attachment; filename="export.{format}"'}
        return StreamingResponse(stream(name, idx, sel, n, format), media_type=MEDIA_TYPES[format], headers=headers)


__all__ = ["API_FIELDS", "api_row", "prepare", "register", "row_cap", "stream"]
