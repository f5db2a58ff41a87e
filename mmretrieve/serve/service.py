"""The serving engine, without HTTP: turns a ``SearchRequest`` into a response dict over the served
snapshots. The FastAPI app (``app.py``) is a thin layer over it, and ``bench serve`` calls it directly
to measure what HTTP adds.

A search: checks and caps (cheap, on the event loop) -> an uploaded image decoded through the safe
loader (a worker thread) -> the query's sides encoded by the encoder's batcher (awaited, so waiting
holds no thread) -> the coarse stage and any rerankers on a worker thread: plain searches on the search
pool, re-ranking on the bounded heavy queue (503 when full) -> the hits of the requested page. The
whole request runs under the per-request time limit (504).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmretrieve import settings
from mmretrieve.errors import (
    BadVectorsError,
    ItemNotFoundError,
    RequestTimeoutError,
    ServiceBusyError,
    UsageError,
)
from mmretrieve.serve.config import ServeConfig
from mmretrieve.serve.metrics import Metrics
from mmretrieve.serve.safety import HeavyQueue, RerankPolicy, decode_base64, decode_image
from mmretrieve.serve.state import IndexManager

log = logging.getLogger(__name__)

API = "/api/v1"
THUMB_SIZES = (64, 128, 160, 256, 384, 512)
MAX_K1 = 10_000


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _clean(v: Any) -> Any:
    """JSON-safe: non-finite floats -> None, numpy scalars -> Python."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return _finite(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


def has_file(item) -> bool:
    """Whether an item's uri is a file on this machine, or a member of a shard that is (not e.g.
    ``vec://3``)."""
    from mmretrieve.media.shards import split_member_uri

    uri = str(item.uri)
    if "://" in uri:
        return False
    if Path(uri).is_file():
        return True
    member = split_member_uri(uri)
    return member is not None and member[0].is_file()


@dataclass
class Plan:
    """A checked search request, bound to one snapshot."""

    index: Any
    text: str | None = None
    image_bytes: bytes | None = None
    item: Any = None
    vector: np.ndarray | None = None
    fusion: str = "sum"
    options: dict = field(default_factory=dict)
    k: int = 10
    offset: int = 0
    pipeline: Any = None
    locks: list = field(default_factory=list)
    keep_reference: bool = False
    describe: dict = field(default_factory=dict)

    @property
    def window(self) -> int:
        return self.offset + self.k


class Service:
    def __init__(self, config: ServeConfig, *, encoders: dict | None = None, metrics: Metrics | None = None) -> None:
        config.check()
        self.config = config
        self.metrics = metrics or Metrics()
        self.manager = IndexManager(config, encoders=encoders, metrics=self.metrics)
        self.policy = RerankPolicy(max_rerank_k=config.max_rerank_k, mllm=config.mllm)
        self.heavy = HeavyQueue(config.heavy_workers, config.heavy_queue)
        threads = int(config.search_threads or settings.available_cores())
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="search")
        self._thumbs: OrderedDict[tuple, bytes] = OrderedDict()
        self._thumb_lock = threading.Lock()
        self.started_at: float | None = None
        self.startup_s: float | None = None
        self.in_flight = 0  # requests being handled (the app's guard counts them): with the token, or none set
        self.anonymous_in_flight = 0  # and those without a valid token (their own, smaller budget)
        self.metrics.on_render(lambda m: (m.set("mmretrieve_heavy_queue_depth", None, self.heavy.depth),
                                          m.set("mmretrieve_requests_in_flight", None, self.in_flight)))

    # ---- life cycle ---------------------------------------------------------------------------------
    def start(self) -> Service:
        t0 = time.perf_counter()
        self.manager.load()
        self.manager.warm_up()
        self.policy.load_models()
        self.manager.start()
        self.started_at = time.time()
        self.startup_s = time.perf_counter() - t0
        return self

    def close(self) -> None:
        self.manager.close()
        self.heavy.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ---- running work -------------------------------------------------------------------------------
    async def run_blocking(self, fn):
        """``fn()`` on the search pool, under the request time limit (thumbnails, item lookups)."""
        return await self._timed(self._in_pool(fn, time.monotonic() + self.config.request_timeout_s), "request")

    async def _in_pool(self, fn, deadline: float | None = None):
        def job():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("dropped: its request timed out while waiting")
            return fn()

        return await asyncio.wrap_future(self.pool.submit(job))

    async def _timed(self, coro, what: str):
        try:
            if hasattr(asyncio, "timeout"):  # 3.11+: no extra task per request
                async with asyncio.timeout(self.config.request_timeout_s):
                    return await coro
            return await asyncio.wait_for(coro, self.config.request_timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            self.metrics.inc("mmretrieve_timeouts_total", {"endpoint": what})
            raise RequestTimeoutError(f"{what}: no answer within the server's limit of {self.config.request_timeout_s:g} s "
                                      "(a smaller k or fewer re-ranked candidates is faster)") from None

    def _stage_time(self, index_name: str, stage: str, seconds: float) -> None:
        self.metrics.observe("mmretrieve_stage_duration_seconds", seconds, {"index": index_name, "stage": stage})

    # ---- search -------------------------------------------------------------------------------------
    async def search(self, name: str, req, upload: bytes | None = None) -> dict:
        """One search request (``models.SearchRequest``; ``upload``: the bytes of a multipart image)."""
        return await self._timed(self._search(name, req, upload, time.monotonic() + self.config.request_timeout_s),
                                 "search")

    async def _search(self, name: str, req, upload: bytes | None, deadline: float) -> dict:
        t_start = time.perf_counter()
        handle = self.manager.get(name)
        plan = self.plan(handle.index, req, upload)
        heavy = plan.pipeline is not None and bool(plan.pipeline.stages)
        if heavy:  # a slot first: a full queue refuses before any decoding or encoding is spent on it
            try:
                self.heavy.reserve()
            except ServiceBusyError:
                self.metrics.inc("mmretrieve_heavy_rejected_total", {"index": name})
                raise
        try:
            timings: dict[str, float] = {}
            query = await self._prepare(plan, timings, deadline)
            batched = None if heavy else self._batchable(plan, query)
            if heavy:
                fut, heavy = self.heavy.run_reserved(lambda: self._execute(plan, query), deadline), False
                res = await asyncio.wrap_future(fut)
            elif batched is not None:
                res = await self._batched_search(handle, plan, *batched, deadline)
            else:
                res = await self._in_pool(lambda: self._execute(plan, query), deadline)
        finally:
            if heavy:  # reserved but never run (a bad image, a cancelled request)
                self.heavy.release()
        timings.update(res.timings_ms)
        for stage, ms in timings.items():
            self._stage_time(name, stage, ms / 1000)
        timings["total"] = (time.perf_counter() - t_start) * 1000
        return self.response(handle.name, plan, res, timings)

    async def _prepare(self, plan: Plan, timings: dict, deadline: float):
        """Decode an uploaded image (a worker thread) and encode the query's sides (the batcher)."""
        image = None
        if plan.image_bytes is not None:
            t0 = time.perf_counter()
            draft = getattr(self.manager.encoder_of(plan.index).image_transform, "draft_size", None)
            image = await self._in_pool(lambda: decode_image(plan.image_bytes, max_bytes=self.config.max_upload_bytes,
                                                             max_pixels=self.config.max_pixels, draft_size=draft), deadline)
            timings["decode"] = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        query = await self._query(plan, image)
        timings["encode"] = (time.perf_counter() - t0) * 1000
        return query

    def plan(self, idx, req, upload: bytes | None = None) -> Plan:
        """Check a request against the caps and the snapshot; nothing heavy runs here."""
        cfg = self.config
        if req.k > cfg.max_k:
            raise UsageError(f"k={req.k} is more than this server's limit of {cfg.max_k} results per page (--max-k)")
        if req.offset > cfg.max_offset:
            raise UsageError(f"offset={req.offset} is beyond this server's limit of {cfg.max_offset} (--max-offset)")
        text = req.text
        if text is not None:
            if len(text) > cfg.max_text_chars:
                raise UsageError(f"text: {len(text)} characters, more than the limit of {cfg.max_text_chars}")
            if not text.strip():
                raise UsageError("text: empty query text")
        sources = [n for n, v in (("image", upload is not None or req.image is not None), ("item", req.item is not None),
                                  ("item_key", req.item_key is not None), ("vector", req.vector is not None)) if v]
        if len(sources) > 1:
            raise UsageError(f"give one of image, item, item_key and vector, not {' and '.join(sources)}")
        if not sources and text is None:
            raise UsageError("a search needs text, an image, an item or a vector (or an image / item plus text)")
        plan = Plan(index=idx, text=text, k=req.k, offset=req.offset, keep_reference=req.keep_reference)
        if upload is not None:
            plan.image_bytes = upload
        elif req.image is not None:
            plan.image_bytes = decode_base64(req.image, cfg.max_upload_bytes)
        if req.item is not None:
            plan.item = idx.items([req.item]).get(req.item)
            if plan.item is None:
                raise ItemNotFoundError(f"no item with id {req.item} in index {idx.name!r}")
        elif req.item_key is not None:
            plan.item = idx.get(f"key:{req.item_key}")
        if req.vector is not None:
            self._plan_vector(plan, req)
        if req.rerank or req.pipeline:
            if plan.vector is not None:
                raise UsageError("rerankers need a text, image or item query, not a raw vector")
            plan.pipeline, plan.locks = self.policy.pipeline(idx, req.rerank, req.pipeline)
        self._plan_fusion(plan, req)
        return plan

    def _plan_vector(self, plan: Plan, req) -> None:
        if plan.text is not None:
            raise UsageError("a vector query takes no text (fuse it yourself, or send an item plus text)")
        v = np.asarray(req.vector, dtype=np.float32)
        if v.shape != (plan.index.dim,) or not np.all(np.isfinite(v)) or not np.any(v):
            raise BadVectorsError(f"vector: expected {plan.index.dim} finite numbers, not all zero "
                                  f"(got {len(req.vector)})")
        plan.vector = v

    def _plan_fusion(self, plan: Plan, req) -> None:
        options = dict(req.fusion_options or {})
        if req.weight is not None:
            options["weight"] = req.weight
        k1 = options.get("k1")
        if isinstance(k1, (int, float)) and k1 > MAX_K1:
            raise UsageError(f"fusion_options.k1={k1} is more than this server's limit of {MAX_K1}")
        pipe = plan.pipeline
        plan.fusion = req.fusion or (pipe.coarse_fusion if pipe is not None else None) or (
            "weighted" if req.weight is not None else "sum")
        plan.options = options
        self._query_object(plan, None)  # a bad fusion, option or combination is refused now, before encoding

    def _query_object(self, plan: Plan, image):
        from mmretrieve.query import Query

        it = plan.item
        visual: dict[str, Any] = {}
        if it is not None:
            visual = {"video": it.uri} if it.kind == "video" else {"image": it.uri}
            visual["image_id"] = it.id
        elif plan.image_bytes is not None:
            visual = {"image": image if image is not None else "upload"}
        if plan.vector is not None:
            return None
        return Query(text=plan.text, fusion=plan.fusion, options=dict(plan.options), **visual)

    async def _query(self, plan: Plan, image):
        """The ``Query`` with its sides already encoded (texts and uploads through the batcher)."""
        query = self._query_object(plan, image)
        if query is None:
            return None
        idx = plan.index
        futures = {}
        if plan.text is not None or image is not None:
            batcher = self.manager.batcher(idx)
            if plan.text is not None:
                futures["text"] = batcher.text(plan.text)
            if image is not None:
                futures["image"] = batcher.image(image)
        vecs = {side: await asyncio.wrap_future(f) for side, f in futures.items()}
        if plan.item is not None:
            if not idx.exact_vectors():
                return query  # a lossy index re-encodes the item's file itself (Index.search)
            vecs["image"] = idx.vectors([plan.item.id])[0]
        query.cache[("vectors", idx.encoder_name)] = vecs  # Index.search's memo: no second encoding
        return query

    def _batchable(self, plan: Plan, query):
        """``(vector, exclude)`` when the request is one top-k of one vector (no rerankers, a strategy that
        searches once): such searches of concurrent requests share one scan. None otherwise."""
        from mmretrieve.query import CoarseStrategy

        if plan.pipeline is not None and plan.pipeline.stages:
            return None
        if len(plan.index) * plan.index.dim * 4 < self.config.batch_scan_min_bytes:
            return None
        if plan.vector is not None:
            return plan.vector, ()
        vecs = query.cache.get(("vectors", plan.index.encoder_name))
        if vecs is None or type(query.strategy).search is not CoarseStrategy.search:
            return None  # e.g. intersection: two searches and a union
        composed = query.kind.startswith("composed")
        exclude = (plan.item.id,) if composed and plan.item is not None and not plan.keep_reference else ()
        return query.strategy.query_vector(vecs), exclude

    async def _batched_search(self, handle, plan: Plan, vector, exclude, deadline: float):
        t0 = time.perf_counter()
        ids, scores = await asyncio.wrap_future(handle.searcher.search(plan.index, vector, plan.window, exclude))
        ms = (time.perf_counter() - t0) * 1000
        return await self._in_pool(lambda: plan.index.hydrate({}, ids, scores, stages={"coarse": ids},
                                                              timings={"coarse": ms}), deadline)

    def _execute(self, plan: Plan, query):
        idx = plan.index
        if plan.vector is not None:
            return idx.search_by_vector(plan.vector, k=plan.window)
        if plan.pipeline is None or not plan.pipeline.stages:
            return idx.search(query, k=plan.window, exclude_reference=not plan.keep_reference)
        for _, lock in plan.locks:
            lock.acquire()
        try:
            return idx.search(query, k=plan.window, exclude_reference=not plan.keep_reference, pipeline=plan.pipeline)
        finally:
            for _, lock in reversed(plan.locks):
                lock.release()

    # ---- responses ----------------------------------------------------------------------------------
    def urls(self, index_name: str, item) -> tuple[str, str | None]:
        base = f"{API}/indexes/{index_name}/items/{item.id}"
        return f"{base}/thumbnail", (f"{base}/media" if "://" not in str(item.uri) else None)

    def describe(self, plan: Plan) -> dict:
        """The query as the response reports it: no server paths, no image bytes."""
        d: dict[str, Any] = {}
        if plan.text is not None:
            d["text"] = plan.text
        if plan.item is not None:
            d["item"] = {"id": plan.item.id, "key": plan.item.key}
        elif plan.image_bytes is not None:
            d["image"] = f"upload ({len(plan.image_bytes)} bytes)"
        if plan.vector is not None:
            d["vector"] = f"{len(plan.vector)} numbers"
        composed = plan.text is not None and (plan.item is not None or plan.image_bytes is not None)
        d["kind"] = ("composed" if composed else "text" if plan.text is not None else "vector"
                     if plan.vector is not None else "image")
        if composed:
            d["fusion"] = plan.fusion
            d.update(plan.options)
        if plan.pipeline is not None and plan.pipeline.stages:
            d["rerank"] = [{"name": st.name, "k": st.k, "alpha": st.alpha} for st in plan.pipeline.stages]
        return d

    def response(self, index_name: str, plan: Plan, res, timings: dict) -> dict:
        page = res.hits[plan.offset : plan.window]
        hits = []
        for h in page:
            thumb, media = self.urls(index_name, h)
            extra = _clean(h.extra)
            hits.append({
                "id": h.id, "key": h.key, "kind": h.kind, "caption": h.caption, "score": _finite(h.score),
                "rank": h.rank, "stage_ranks": dict(h.stage_ranks), "stage_scores": _clean(h.stage_scores),
                "moment": extra.get("timestamp"), "extra": extra, "thumbnail": thumb, "media": media,
            })
        has_more = len(res.hits) >= plan.window and plan.window < len(plan.index)
        return {
            "index": index_name, "version": plan.index.version, "query": self.describe(plan), "stages": list(res.stages),
            "k": plan.k, "offset": plan.offset, "has_more": has_more, "next_offset": plan.window if has_more else None,
            "timings_ms": {k: round(v, 3) for k, v in timings.items()}, "hits": hits,
        }

    # ---- indexes and items ----------------------------------------------------------------------------
    def summary(self, name: str) -> dict:
        h = self.manager.get(name)
        idx = h.index
        return {"name": name, "version": idx.version, "items": len(idx), "encoder": idx.encoder_name, "dim": idx.dim,
                "videos": int(idx.manifest.get("counts", {}).get("videos", 0) or 0), "patches": idx.has_patches()}

    def detail(self, name: str) -> dict:
        from mmretrieve.query import list_fusions

        h = self.manager.get(name)
        idx = h.index
        info = {k: v for k, v in idx.info().items() if k != "path"}
        caps = {
            "fusions": list_fusions(), "rerankers": self.policy.rerankers(idx), "pipelines": self.policy.presets(idx),
            "video": bool(idx.manifest.get("video") or info["counts"].get("videos")), "patches": idx.has_patches(),
            "max_k": self.config.max_k, "max_offset": self.config.max_offset,
            "max_upload_bytes": self.config.max_upload_bytes,
        }
        return {**self.summary(name), "info": _clean(info), "capabilities": caps, "reloads": h.reloads,
                "loaded_at": h.loaded_at}

    def item(self, name: str, item_id: int):
        """The item with this id in the served snapshot (ids only: no keys, no paths)."""
        idx = self.manager.get(name).index
        it = idx.items([int(item_id)]).get(int(item_id))
        if it is None:
            raise ItemNotFoundError(f"no item with id {item_id} in index {name!r}")
        return idx, it

    def item_info(self, name: str, item_id: int) -> dict:
        _, it = self.item(name, item_id)
        thumb, media = self.urls(name, it)
        return _clean({
            "id": it.id, "key": it.key, "kind": it.kind, "caption": it.caption,
            "filename": Path(it.uri).name if media else None, "width": it.width, "height": it.height, "size": it.size,
            "added_at": it.added_at, "frames": it.frame_count, "extra": it.extra, "thumbnail": thumb, "media": media,
        })

    def thumbnail(self, name: str, item_id: int, size: int = 256) -> tuple[bytes, str]:
        """(JPEG bytes, ETag) of an item's thumbnail, from a bounded in-memory cache; made from the bytes
        that were indexed only (``media.readback``: no symlink followed, the fingerprint checked)."""
        from mmretrieve.media.readback import open_indexed
        from mmretrieve.media.thumbs import indexed_thumbnail_jpeg

        if size not in THUMB_SIZES:
            raise UsageError(f"thumbnail size must be one of {', '.join(map(str, THUMB_SIZES))}, got {size}")
        _, it = self.item(name, item_id)
        if not has_file(it):
            raise ItemNotFoundError(f"item {item_id} of index {name!r} has no media file to show")
        media = open_indexed(it)  # checked on every call: a cached thumbnail of a file changed since is not shown
        key = (name, it.id, it.uri, it.size, it.mtime, size)
        etag = '"t' + hashlib.sha1(repr(key).encode()).hexdigest()[:16] + '"'
        with self._thumb_lock:
            data = self._thumbs.get(key)
            if data is not None:
                self._thumbs.move_to_end(key)
                media.close()
                return data, etag
        try:
            data = indexed_thumbnail_jpeg(media, size)
        except Exception as e:  # an indexed file that went bad since: not found, not a 500
            raise ItemNotFoundError(f"item {item_id} of index {name!r}: its file cannot be shown ({type(e).__name__})") from None
        with self._thumb_lock:
            self._thumbs[key] = data
            while len(self._thumbs) > self.config.thumbnail_cache:
                self._thumbs.popitem(last=False)
        return data, etag

    def media(self, name: str, item_id: int):
        """An indexed item's bytes as indexed (``media.readback.IndexedMedia``: the sniffed type, the bytes
        or a checked descriptor the response closes); ``ItemChangedError`` when the file is not what was
        indexed."""
        from mmretrieve.media.readback import open_indexed

        _, it = self.item(name, item_id)
        if not has_file(it):
            raise ItemNotFoundError(f"item {item_id} of index {name!r} has no media file")
        return open_indexed(it)

    # ---- embeddings -----------------------------------------------------------------------------------
    async def embed(self, req, upload: bytes | None = None) -> dict:
        return await self._timed(self._embed(req, upload, time.monotonic() + self.config.request_timeout_s), "embed")

    async def _embed(self, req, upload: bytes | None, deadline: float) -> dict:
        cfg = self.config
        name = req.index or next(iter(self.manager.handles))
        idx = self.manager.get(name).index
        image = upload if upload is not None else (decode_base64(req.image, cfg.max_upload_bytes) if req.image else None)
        if (req.text is None) == (image is None):
            raise UsageError("embed takes a text (or a list of texts) or an image, one of them")
        batcher = self.manager.batcher(idx)
        if image is not None:
            draft = getattr(self.manager.encoder_of(idx).image_transform, "draft_size", None)
            pil = await self._in_pool(lambda: decode_image(image, max_bytes=cfg.max_upload_bytes, max_pixels=cfg.max_pixels,
                                                           draft_size=draft), deadline)
            futures = [batcher.image(pil)]
        else:
            texts = [req.text] if isinstance(req.text, str) else list(req.text)
            if not texts or len(texts) > cfg.max_embed_texts:
                raise UsageError(f"embed takes 1 to {cfg.max_embed_texts} texts, got {len(texts)}")
            for t in texts:
                if not t.strip() or len(t) > cfg.max_text_chars:
                    raise UsageError(f"embed: each text needs 1 to {cfg.max_text_chars} characters")
            futures = [batcher.text(t) for t in texts]
        vecs = [await asyncio.wrap_future(f) for f in futures]
        return {"encoder": idx.encoder_name, "dim": idx.dim, "vectors": [v.tolist() for v in vecs]}


__all__ = ["Service", "Plan", "API", "THUMB_SIZES"]
