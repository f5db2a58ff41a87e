"""The serving engine, without HTTP: turns a ``SearchRequest`` into a response dict over the served
snapshots. The FastAPI app (``app.py``) is a thin layer over it, and ``bench serve`` calls it directly
to measure what HTTP adds.

A search: checks and caps (``planning``, cheap, on the event loop) -> an uploaded image decoded through
the safe loader (a worker thread) -> the query's sides encoded by the encoder's batcher (awaited, so
waiting holds no thread) -> the search path of ``mmretrieve.index.search`` (coarse, then any rerankers)
on a worker thread: plain searches on the search pool (single-vector top-k searches of concurrent
requests share one scan), re-ranking on the bounded heavy queue (503 when full) -> the hits of the
requested page (``responses``). The whole request runs under the per-request time limit (504). Items,
thumbnails and media are ``items.ItemFiles``'.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from mmretrieve import settings
from mmretrieve.errors import RequestTimeoutError, ServiceBusyError, UsageError
from mmretrieve.index import search as search_path
from mmretrieve.serve import responses
from mmretrieve.serve.config import ServeConfig
from mmretrieve.serve.items import THUMB_SIZES, ItemFiles
from mmretrieve.serve.metrics import GENERATION_COUNTERS, Metrics
from mmretrieve.serve.planning import Plan, plan_request
from mmretrieve.serve.responses import API
from mmretrieve.serve.safety import HeavyQueue, RerankPolicy, decode_base64, decode_image
from mmretrieve.serve.state import IndexManager

log = logging.getLogger(__name__)


class Service:
    def __init__(self, config: ServeConfig, *, encoders: dict | None = None, metrics: Metrics | None = None) -> None:
        config.check()
        self.config = config
        self.metrics = metrics or Metrics()
        self.manager = IndexManager(config, encoders=encoders, metrics=self.metrics)
        self.policy = RerankPolicy(max_rerank_k=config.max_rerank_k, mllm=config.mllm, adapter=config.adapter,
                                   vlm=config.vlm_options(),
                                   max_generative_k=config.max_generative_k)
        self.heavy = HeavyQueue(config.heavy_workers, config.heavy_queue)
        threads = int(config.search_threads or settings.available_cores())
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="search")
        self.files = ItemFiles(self.manager, config.thumbnail_cache)
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

    def _generation(self, index_name: str, res) -> None:
        """The generation counters of a search's generative stages (describe, listwise, pairwise)."""
        for stage, info in (getattr(res, "stage_info", None) or {}).items():
            cost = info.get("cost") if isinstance(info, dict) else None
            if not isinstance(cost, dict):
                continue
            labels = {"index": index_name, "stage": stage.split("#", 1)[0]}
            for key, metric in GENERATION_COUNTERS.items():
                v = cost.get(key)
                if isinstance(v, (int, float)) and v:
                    self.metrics.inc(metric, labels, float(v))
            self.metrics.inc("mmretrieve_generation_runs_total", labels)

    # ---- search -------------------------------------------------------------------------------------
    async def search(self, name: str, req, upload: bytes | None = None) -> dict:
        """One search request (``models.SearchRequest``; ``upload``: the bytes of a multipart image)."""
        return await self._timed(self._search(name, req, upload, time.monotonic() + self.config.request_timeout_s),
                                 "search")

    async def _search(self, name: str, req, upload: bytes | None, deadline: float) -> dict:
        t_start = time.perf_counter()
        handle = self.manager.get(name)
        plan = plan_request(self.config, self.policy, handle.index, req, upload)
        heavy = plan.heavy
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
                res = await self._batched_search(handle, plan, batched, deadline)
            else:
                res = await self._in_pool(lambda: self._execute(plan, query), deadline)
        finally:
            if heavy:  # reserved but never run (a bad image, a cancelled request)
                self.heavy.release()
        timings.update(res.timings_ms)
        for stage, ms in timings.items():
            self._stage_time(name, stage, ms / 1000)
        self._generation(name, res)
        timings["total"] = (time.perf_counter() - t_start) * 1000
        return responses.search_response(handle.name, plan, res, timings)

    async def _prepare(self, plan: Plan, timings: dict, deadline: float):
        """Decode an uploaded image (a worker thread) and encode the query's sides (the batcher): the
        ``Query`` and its sides encoded so far (``None`` for a raw vector)."""
        image = None
        if plan.image_bytes is not None:
            t0 = time.perf_counter()
            draft = getattr(self.manager.encoder_of(plan.index).image_transform, "draft_size", None)
            image = await self._in_pool(lambda: decode_image(plan.image_bytes, max_bytes=self.config.max_upload_bytes,
                                                             max_pixels=self.config.max_pixels, draft_size=draft), deadline)
            timings["decode"] = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        query = plan.query(image)
        if query is None:
            return None
        futures = {}
        if plan.text is not None or image is not None:
            batcher = self.manager.batcher(plan.index)
            if plan.text is not None:
                futures["text"] = batcher.text(plan.text)
            if image is not None:
                futures["image"] = batcher.image(image)
        sides = {side: await asyncio.wrap_future(f) for side, f in futures.items()}
        if plan.item is not None and plan.index.exact_vectors():  # a lossy index re-encodes the item's file
            sides["image"] = plan.index.vectors([plan.item.id])[0]
        timings["encode"] = (time.perf_counter() - t0) * 1000
        return query, sides

    def _batchable(self, plan: Plan, prepared):
        """The one query vector when the request is one top-k of it (no rerankers, a strategy that plans
        one search): such searches of concurrent requests share one scan. None otherwise."""
        if plan.heavy or plan.where is not None or plan.exclude_dupes or len(plan.index) * plan.index.dim * 4 < self.config.batch_scan_min_bytes:
            return None
        if plan.vector is not None:
            return plan.vector
        query, sides = prepared
        if "image" not in sides and query.kind != "text":
            return None  # the item's file is still to be encoded
        coarse = search_path.encode_query(plan.index, query, sides).plan(plan.window)
        return coarse.queries[0] if coarse.single else None  # e.g. intersection: two searches and a merge

    async def _batched_search(self, handle, plan: Plan, vector, deadline: float):
        t0 = time.perf_counter()
        ids, scores = await asyncio.wrap_future(handle.searcher.search(plan.index, vector, plan.window, plan.exclude))
        ms = (time.perf_counter() - t0) * 1000
        return await self._in_pool(lambda: search_path.hydrate(plan.index, {}, ids, scores, stages={"coarse": ids},
                                                               timings={"coarse": ms}), deadline)

    def _execute(self, plan: Plan, prepared):
        """The search path on a worker thread (rerankers under their model locks); ``exclude_dupes``: one hit
        per near-duplicate group (more hits are searched while duplicates leave the page short)."""
        if plan.exclude_dupes:
            return search_path.search_deduped(plan.index, plan.window, lambda n: self._execute_k(plan, prepared, n))
        return self._execute_k(plan, prepared, plan.window)

    def _execute_k(self, plan: Plan, prepared, k: int):
        idx = plan.index
        if plan.browse:
            return idx.browse(plan.where, k=k, order=plan.order)
        if plan.vector is not None:
            return idx.search(vector=plan.vector, k=k, where=plan.where)
        query, sides = prepared
        encoded = search_path.encode_query(idx, query, sides)
        for _, lock in plan.locks:
            lock.acquire()
        try:
            return search_path.run(idx, encoded, k=k, exclude=plan.exclude,
                                   pipeline=plan.pipeline if plan.heavy else None, where=plan.where)
        finally:
            for _, lock in reversed(plan.locks):
                lock.release()

    # ---- indexes and items ----------------------------------------------------------------------------
    def summary(self, name: str) -> dict:
        return responses.index_summary(name, self.manager.get(name).index)

    def detail(self, name: str) -> dict:
        return responses.index_detail(name, self.manager.get(name), self.config, self.policy)

    def item_info(self, name: str, item_id: int) -> dict:
        return responses.item_record(name, self.files.item(name, item_id)[1])

    def thumbnail(self, name: str, item_id: int, size: int = 256) -> tuple[bytes, str]:
        return self.files.thumbnail(name, item_id, size)

    def media(self, name: str, item_id: int):
        return self.files.media(name, item_id)

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
