"""A search request checked against the server's caps and bound to one snapshot: a ``Plan``. Nothing
heavy runs here (no decoding, no encoding), so a bad request is refused before any of it is spent."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmretrieve.errors import BadVectorsError, ItemNotFoundError, UsageError
from mmretrieve.query import Query
from mmretrieve.serve.safety import decode_base64

MAX_K1 = 10_000


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
    #: the request's filter, checked and evaluated on this snapshot (an ``index.filtered.Selection``)
    where: Any = None
    #: one hit per near-duplicate group (``index.dupes``)
    exclude_dupes: bool = False
    #: a filter and no query: browse the matching items in ``order`` (``Index.browse``)
    browse: bool = False
    order: str = "id"

    @property
    def window(self) -> int:
        return self.offset + self.k

    @property
    def heavy(self) -> bool:
        """Whether rerank stages run (the bounded heavy queue, not the search pool)."""
        return self.pipeline is not None and (bool(self.pipeline.stages) or self.pipeline.describer is not None)

    @property
    def composed(self) -> bool:
        return self.text is not None and (self.item is not None or self.image_bytes is not None)

    @property
    def exclude(self) -> tuple[int, ...]:
        """The query's item (``item`` / ``item_key``: "more like this", or a composed query's reference) is left
        out of its results, unless asked to keep it."""
        return (self.item.id,) if self.item is not None and not self.keep_reference else ()

    def query(self, image=None) -> Query | None:
        """The ``Query`` (None for a raw vector); ``image``: the decoded upload, once there is one."""
        if self.vector is not None or self.browse:
            return None
        it = self.item
        visual: dict[str, Any] = {}
        if it is not None:
            visual = {"video": it.uri} if it.kind == "video" else {"image": it.uri}
            visual["image_id"] = it.id
        elif self.image_bytes is not None:
            visual = {"image": image if image is not None else "upload"}
        return Query(text=self.text, fusion=self.fusion, options=dict(self.options), **visual)

    def describe(self) -> dict:
        """The query as the response reports it: no server paths, no image bytes."""
        d: dict[str, Any] = {}
        if self.text is not None:
            d["text"] = self.text
        if self.item is not None:
            d["item"] = {"id": self.item.id, "key": self.item.key}
        elif self.image_bytes is not None:
            d["image"] = f"upload ({len(self.image_bytes)} bytes)"
        if self.vector is not None:
            d["vector"] = f"{len(self.vector)} numbers"
        d["kind"] = "browse" if self.browse else ("composed" if self.composed else "text" if self.text is not None else "vector"
                     if self.vector is not None else "image")
        if self.browse:
            d["order"], d["matching"] = self.order, self.where.count
        if self.where is not None:
            d["where"] = self.where.where
        if self.exclude_dupes:
            d["exclude_dupes"] = True
        if self.composed:
            d["fusion"] = self.fusion
            d.update(self.options)
        if self.heavy:
            d["rerank"] = [{"name": st.name, "k": st.k, "alpha": st.alpha} for st in self.pipeline.stages]
            if self.pipeline.describer is not None:
                dsc = self.pipeline.describer
                d["describe"] = {"prompt": dsc.prompt, "fuse": dsc.fuse, **({"weight": dsc.weight} if dsc.fuse != "none" else {})}
        return d


def plan_request(config, policy, idx, req, upload: bytes | None = None) -> Plan:
    """Check a request (``models.SearchRequest``) against the caps (``config``) and the snapshot ``idx``;
    ``policy`` (``safety.RerankPolicy``) builds and bounds any rerankers it asks for."""
    if req.k > config.max_k:
        raise UsageError(f"k={req.k} is more than this server's limit of {config.max_k} results per page (--max-k)")
    if req.offset > config.max_offset:
        raise UsageError(f"offset={req.offset} is beyond this server's limit of {config.max_offset} (--max-offset)")
    text = req.text
    if text is not None:
        if len(text) > config.max_text_chars:
            raise UsageError(f"text: {len(text)} characters, more than the limit of {config.max_text_chars}")
        if not text.strip():
            raise UsageError("text: empty query text")
    sources = [n for n, v in (("image", upload is not None or req.image is not None), ("item", req.item is not None),
                              ("item_key", req.item_key is not None), ("vector", req.vector is not None)) if v]
    if len(sources) > 1:
        raise UsageError(f"give one of image, item, item_key and vector, not {' and '.join(sources)}")
    if not sources and text is None:
        if req.filter is None:
            raise UsageError("a search needs text, an image, an item or a vector (or an image / item plus text), "
                             "or a filter alone to browse the items that meet it")
        return _plan_browse(idx, req)
    if req.order is not None:
        raise UsageError("order applies to browsing (a filter and no query); a search is ranked by its scores")
    plan = Plan(index=idx, text=text, k=req.k, offset=req.offset, keep_reference=req.keep_reference,
                exclude_dupes=bool(getattr(req, "exclude_dupes", False)))
    if upload is not None:
        plan.image_bytes = upload
    elif req.image is not None:
        plan.image_bytes = decode_base64(req.image, config.max_upload_bytes)
    if req.item is not None:
        plan.item = idx.items([req.item]).get(req.item)
        if plan.item is None:
            raise ItemNotFoundError(f"no item with id {req.item} in index {idx.name!r}")
    elif req.item_key is not None:
        plan.item = idx.get(f"key:{req.item_key}")
    if req.vector is not None:
        _plan_vector(plan, req)
    if req.filter is not None:
        plan.where = idx.select(req.filter)  # FilterError (a 400) names the token and its position
    if req.rerank or req.pipeline:
        if plan.vector is not None:
            raise UsageError("rerankers need a text, image or item query, not a raw vector")
        plan.pipeline, plan.locks = policy.pipeline(idx, req.rerank, req.pipeline)
    _plan_fusion(plan, req)
    return plan


def _plan_browse(idx, req) -> Plan:
    """A filter and no query: browse the matching items (``Index.browse``) in ``req.order``."""
    from mmretrieve.store.filters import parse_order

    extra = [n for n, v in (("rerank", req.rerank), ("pipeline", req.pipeline), ("fusion", req.fusion),
                            ("weight", req.weight), ("fusion_options", req.fusion_options)) if v]
    if extra:
        raise UsageError(f"browsing (a filter and no query) takes k, offset and order, not {', '.join(extra)}")
    order = req.order or "id"
    parse_order(order)  # a bad order is a 400 naming its token
    return Plan(index=idx, k=req.k, offset=req.offset, where=idx.select(req.filter), browse=True, order=order,
                exclude_dupes=bool(getattr(req, "exclude_dupes", False)))


def _plan_vector(plan: Plan, req) -> None:
    if plan.text is not None:
        raise UsageError("a vector query takes no text (fuse it yourself, or send an item plus text)")
    v = np.asarray(req.vector, dtype=np.float32)
    if v.shape != (plan.index.dim,) or not np.all(np.isfinite(v)) or not np.any(v):
        raise BadVectorsError(f"vector: expected {plan.index.dim} finite numbers, not all zero "
                              f"(got {len(req.vector)})")
    plan.vector = v


def _plan_fusion(plan: Plan, req) -> None:
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
    plan.query()  # a bad fusion, option or combination is refused now, before encoding


__all__ = ["Plan", "plan_request", "MAX_K1"]
