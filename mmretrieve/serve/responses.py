"""What the service answers, shaped as JSON-safe dicts: a page of hits, an index's summary and detail,
an item's record. No server paths in any of them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

API = "/api/v1"


def finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def clean(v: Any) -> Any:
    """JSON-safe: non-finite floats -> None, numpy scalars -> Python."""
    if isinstance(v, dict):
        return {str(k): clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return finite(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


def urls(index_name: str, item) -> tuple[str, str | None]:
    """(thumbnail url, media url or None for items without a file of their own)."""
    base = f"{API}/indexes/{index_name}/items/{item.id}"
    return f"{base}/thumbnail", (f"{base}/media" if "://" not in str(item.uri) else None)


def hit_record(index_name: str, h) -> dict:
    """A ``Hit`` as the API shows it (every search endpoint alike): no server paths, finite numbers."""
    thumb, media = urls(index_name, h)
    extra = clean(h.extra)
    return {
        "id": h.id, "key": h.key, "kind": h.kind, "caption": h.caption, "score": finite(h.score),
        "rank": h.rank, "stage_ranks": dict(h.stage_ranks), "stage_scores": clean(h.stage_scores),
        "moment": extra.get("timestamp"), "extra": extra, "metadata": clean(h.metadata), "thumbnail": thumb,
        "media": media,
    }


def search_response(index_name: str, plan, res, timings: dict) -> dict:
    """The requested page of ``res`` (``SearchResults``) for a ``planning.Plan``."""
    hits = [hit_record(index_name, h) for h in res.hits[plan.offset : plan.window]]
    total = len(plan.index) if getattr(plan, "where", None) is None else plan.where.count
    has_more = len(res.hits) >= plan.window and plan.window < total
    return {
        "index": index_name, "version": plan.index.version, "query": plan.describe(), "stages": list(res.stages),
        "k": plan.k, "offset": plan.offset, "has_more": has_more, "next_offset": plan.window if has_more else None,
        "timings_ms": {k: round(v, 3) for k, v in timings.items()}, "hits": hits,
        "description": getattr(res, "description", None), "stage_info": clean(getattr(res, "stage_info", None) or {}),
    }


def index_summary(name: str, idx) -> dict:
    return {"name": name, "version": idx.version, "items": len(idx), "encoder": idx.encoder_name, "dim": idx.dim,
            "videos": int(idx.manifest.get("counts", {}).get("videos", 0) or 0), "patches": idx.has_patches()}


def index_detail(name: str, handle, config, policy) -> dict:
    from mmretrieve.query import list_fusions

    idx = handle.index
    info = {k: v for k, v in idx.info().items() if k != "path"}
    caps = {
        "fusions": list_fusions(), "rerankers": policy.rerankers(idx), "pipelines": policy.presets(idx),
        "video": bool(idx.manifest.get("video") or info["counts"].get("videos")), "patches": idx.has_patches(),
        "max_k": config.max_k, "max_offset": config.max_offset, "max_upload_bytes": config.max_upload_bytes,
    }
    return {**index_summary(name, idx), "info": clean(info), "capabilities": caps, "reloads": handle.reloads,
            "loaded_at": handle.loaded_at}


def item_record(index_name: str, it) -> dict:
    thumb, media = urls(index_name, it)
    return clean({
        "id": it.id, "key": it.key, "kind": it.kind, "caption": it.caption,
        "filename": Path(it.uri).name if media else None, "width": it.width, "height": it.height, "size": it.size,
        "added_at": it.added_at, "frames": it.frame_count, "extra": it.extra, "thumbnail": thumb, "media": media,
    })


__all__ = ["API", "clean", "finite", "urls", "search_response", "index_summary", "index_detail", "item_record"]
