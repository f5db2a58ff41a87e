"""``GET /api/v1/indexes/{name}/export?filter=...&format=csv|jsonl|wds&limit=N``: the items of a served
index (those that meet the filter) streamed as CSV, JSONL or a webdataset tar, under the API's token and
limits.

A row is what the API already shows of an item in a search hit: ``id``, ``key``, ``kind``, ``caption``,
its ``thumbnail`` and ``media`` URLs, and its metadata fields; never the file's path on the server. At
most ``max_offset + max_k`` rows (what paging through search can reach; ``limit`` defaults to that and may
not exceed it); ``X-Total-Count`` says how many items match, ``X-Row-Limit`` the most rows sent. A filter
that does not parse is a 400 before anything is sent. CSV cells that start like a formula are prefixed
with ``'``; its columns are the union of the rows' (read in a first pass over the same items).

``wds``: per item ``<name>.<ext>`` (its bytes as indexed, read as the media route reads them: checked
against the item's fingerprint, links refused, never a file the index does not hold) and ``<name>.json``
(its row), ``<name>`` the key made safe; streamed a chunk at a time (a large video is never held whole),
plain members (owner 0, mode 0644). An item whose file is gone or changed since it was indexed is left
out (logged): the tar's members are the items that could be read."""

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
MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson", "wds": "application/x-tar"}
SUFFIXES = {"csv": "csv", "jsonl": "jsonl", "wds": "tar"}
#: bytes of an item's file read (and sent) at a time
CHUNK = 1 << 20


def api_row(index_name: str, it) -> dict:
    thumb, media = responses.urls(index_name, it)
    fixed = {"id": it.id, "key": it.key, "kind": it.kind, "caption": it.caption, "thumbnail": thumb, "media": media}
    return responses.clean(flat_row(fixed, metadata_of(it)))


def row_cap(config) -> int:
    return int(config.max_offset) + int(config.max_k)


def prepare(service, name: str, filter: str | None, fmt: str, limit: int | None):
    """(index, selection or None, limit, total): checked before any byte is streamed."""
    if fmt not in MEDIA_TYPES:
        raise UsageError(f"unknown export format {fmt!r}; the API writes csv, jsonl or wds")
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

    if fmt == "wds":
        yield from tar_stream(name, iter_items(idx, sel, limit))
        return
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


def tar_stream(name: str, items):
    """The webdataset tar of ``items`` as bytes chunks: a member's header, its data a ``CHUNK`` at a time,
    its padding; two zero blocks at the end."""
    import json
    import logging
    import tarfile

    from mmretrieve.errors import ItemNotFoundError
    from mmretrieve.export import UniqueNames
    from mmretrieve.index.export import media_suffix, tar_member
    from mmretrieve.media.readback import open_indexed

    names, left_out = UniqueNames(), 0
    for it in items:
        try:
            media = open_indexed(it)
        except ItemNotFoundError as e:  # gone, changed, a link now: left out
            left_out += 1
            logging.getLogger(__name__).warning("export %s: %s left out (%s)", name, it.key, e)
            continue
        stem, mtime = names(it.key, it.id), it.mtime or it.added_at or 0
        yield from _member_chunks(tar_member(f"{stem}.{media_suffix(it.uri)}", media.size, mtime), media)
        meta = json.dumps(api_row(name, it), ensure_ascii=False, default=str).encode()
        yield tar_member(f"{stem}.json", len(meta), mtime).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        yield meta + b"\0" * (-len(meta) % tarfile.BLOCKSIZE)
    if left_out:
        logging.getLogger(__name__).warning("export %s: %d item(s) left out of the tar", name, left_out)
    yield b"\0" * (2 * 512)


def _member_chunks(info, media):
    """One member: header, the media's bytes (read ``CHUNK`` at a time from its checked descriptor), padding;
    a file that shrank since it was opened is padded with zeros to the size its header gives."""
    import tarfile

    sent = 0
    try:  # closed here too when the client leaves right after the header
        yield info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        if media.data is not None:
            yield media.data[:media.size]
            sent = min(len(media.data), media.size)
        else:
            import os

            while sent < media.size:
                chunk = os.pread(media.fd, min(CHUNK, media.size - sent), sent)
                if not chunk:
                    break
                yield chunk
                sent += len(chunk)
    finally:
        media.close()
    yield b"\0" * (media.size - sent + (-media.size % tarfile.BLOCKSIZE))


def register(router, service) -> None:
    @router.get("/indexes/{name}/export", summary="the items (those that meet a filter) as CSV, JSONL or a webdataset "
                "tar, streamed", responses={200: {"content": {"text/csv": {}, "application/x-ndjson": {}, "application/x-tar": {}}}})
    async def export(name: str,
                     filter: Annotated[str | None, Query(max_length=4096, description="a metadata filter, as in search")] = None,
                     format: Annotated[str, Query(description="csv (default), jsonl or wds (a webdataset tar)")] = "csv",
                     limit: Annotated[int | None, Query(description="at most this many rows (the server caps it)")] = None):
        idx, sel, n, total = await service.run_blocking(lambda: prepare(service, name, filter, format, limit))
        headers = {"X-Total-Count": str(total), "X-Row-Limit": str(n), "Cache-Control": "no-store",
                   "Content-Disposition": f'attachment; filename="export.{SUFFIXES[format]}"'}
        return StreamingResponse(stream(name, idx, sel, n, format), media_type=MEDIA_TYPES[format], headers=headers)


__all__ = ["API_FIELDS", "api_row", "prepare", "register", "row_cap", "stream", "tar_stream"]
