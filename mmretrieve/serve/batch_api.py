"""``POST /api/v1/indexes/{name}/search/batch``: many text / item / vector queries in one request, under the
search endpoint's token, body-size limit and caps (``k`` <= ``--max-k``, texts <= ``--max-text-chars``, a
filter checked the same way), at most ``max_embed_texts`` queries. The texts go through the encoder's
batcher together (one forward), then one batched scan (``index.batch.search_batch``)."""

from __future__ import annotations

import asyncio
import time

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from mmretrieve.errors import UsageError
from mmretrieve.index.batch import search_batch
from mmretrieve.serve import responses


class BatchQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | None = None
    item: int | None = Field(None, ge=0, le=2**63 - 1)
    item_key: str | None = None
    vector: list[float] | None = None
    keep_reference: bool = False


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    queries: list[BatchQuery] = Field(description="each with one of text, item, item_key or vector")
    k: int = Field(10, ge=1, description="results per query (the server caps it)")
    filter: str | None = Field(None, description="a metadata filter, as the search request's")


def _checked(service, idx, req: BatchRequest) -> list[dict]:
    cfg = service.config
    if not 1 <= len(req.queries) <= cfg.max_embed_texts:
        raise UsageError(f"a batch takes 1 to {cfg.max_embed_texts} queries, got {len(req.queries)}")
    if req.k > cfg.max_k:
        raise UsageError(f"k={req.k} is more than this server's limit of {cfg.max_k} results per page (--max-k)")
    out = []
    for n, q in enumerate(req.queries):
        if q.text is not None and (len(q.text) > cfg.max_text_chars or not q.text.strip()):
            raise UsageError(f"queries[{n}].text: 1 to {cfg.max_text_chars} characters")
        d = {k: v for k, v in (("text", q.text), ("item", q.item), ("vector", q.vector)) if v is not None}
        if q.item_key is not None:
            d["item"] = f"key:{q.item_key}"
        if q.keep_reference:
            d["keep_reference"] = True
        out.append(d)
    return out


async def batch_search(service, name: str, req: BatchRequest) -> dict:
    t0 = time.perf_counter()
    handle = service.manager.get(name)
    idx = handle.index
    queries = _checked(service, idx, req)
    where = idx.select(req.filter) if req.filter is not None else None
    texts = [q["text"] for q in queries if isinstance(q.get("text"), str) and len(q) == 1]
    encoded = None
    if texts and len(texts) == sum("text" in q for q in queries):
        batcher = service.manager.batcher(idx)
        futures = [batcher.text(t) for t in texts]  # submitted together: one forward
        encoded = [await asyncio.wrap_future(f) for f in futures]
    results = await service._in_pool(lambda: search_batch(idx, queries, k=req.k, where=where, encoded=encoded),
                                     time.monotonic() + service.config.request_timeout_s)
    out = [{"query": res.query, "hits": [responses.hit_record(handle.name, h) for h in res.hits]} for res in results]
    return {"index": handle.name, "version": idx.version, "k": req.k, "results": out,
            "timings_ms": {"total": (time.perf_counter() - t0) * 1000}}


def register(router, service, read_body) -> None:
    @router.post("/indexes/{name}/search/batch", summary="many text / item / vector queries in one request")
    async def search_batch_route(name: str, request: Request):
        service.manager.get(name)
        req, upload = await read_body(request, BatchRequest, service)
        if upload is not None:
            raise UsageError("a batch takes no image upload")
        return JSONResponse(await service._timed(batch_search(service, name, req), "search"))


__all__ = ["BatchRequest", "BatchQuery", "batch_search", "register"]
