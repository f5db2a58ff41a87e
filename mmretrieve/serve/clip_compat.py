"""clip-retrieval compatible endpoints (``clip_retrieval/clip_back.py``'s request and response shapes), so its
front end and ``ClipClient`` can query an mmretrieve server: ``POST /knn-service``, ``GET /indices-list``,
``POST /metadata``. Under the API's token (header or the page's cookie) and limits, mapped onto the
ordinary search (``Service.search``: its caps, image checks, queue and time limit).

``/knn-service`` body: ``text`` | ``image`` (base64) | ``embedding_input`` (in clip-back's precedence:
a non-empty text, then the image, then the embedding); ``modality`` (``"image"`` only: mmretrieve indexes
have no caption-embedding index, ``"text"`` is a 400); ``num_images`` (results with their metadata),
``num_result_ids`` (neighbours searched; clamped to the server's ``max_k``, as is ``num_images``);
``indice_name`` (a served index; default: the first); ``deduplicate`` (the search's ``exclude_dupes``).
``image_url`` is refused (400): the server never fetches a URL a request names (SSRF). Accepted and
ignored (listed in the ``X-Clip-Compat-Ignored`` response header): ``use_mclip`` (the index's own text
encoder is used), ``use_safety_model`` and ``use_violence_detector`` (results are NOT filtered),
``aesthetic_score`` / ``aesthetic_weight`` (no re-weighting).

The answer: a list of ``{id, similarity, caption, url, key, thumbnail, <metadata fields>}`` for the first
``num_images`` hits and ``{id, similarity}`` for the rest, best first. ``url`` is the item's own ``url``
metadata field where it is an http(s) URL (a LAION-style column), else the API URL of its media (or
thumbnail); ``image_path`` (a server path in clip-back) is never sent.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from mmretrieve.errors import UnauthorizedError, UsageError
from mmretrieve.serve import models as M
from mmretrieve.serve import responses
from mmretrieve.serve.safety import TOKEN_COOKIE, parse_json, token_matches

IGNORED = ("use_mclip", "use_safety_model", "use_violence_detector", "aesthetic_score", "aesthetic_weight")


class KnnRequest(BaseModel):
    """clip-back's ``/knn-service`` body (``clip_client.ClipClient`` and the front end send every field)."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = None
    image: str | None = Field(None, description="the query image, base64")
    image_url: str | None = Field(None, description="refused: the server fetches no URL")
    embedding_input: list[float] | None = None
    modality: str = "image"
    num_images: int = Field(40, ge=1)
    num_result_ids: int | None = Field(None, ge=1)
    indice_name: str | None = None
    use_mclip: bool = False
    deduplicate: bool = False
    use_safety_model: bool = False
    use_violence_detector: bool = False
    aesthetic_score: int | str | None = None
    aesthetic_weight: float | str | None = None


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[int]
    indice_name: str | None = None


def _index_name(service, name: str | None) -> str:
    if name is None:
        if not service.manager.handles:
            raise UsageError("this server serves no index")
        return next(iter(service.manager.handles))
    service.manager.get(name)
    return name


def search_request(req: KnnRequest, max_k: int) -> tuple[M.SearchRequest, int]:
    """(the mmretrieve search, how many of its hits carry metadata)."""
    if req.modality != "image":
        raise UsageError(f"modality {req.modality!r}: this server searches image embeddings only (modality "
                         "'image'); it has no index of caption embeddings")
    k = min(req.num_result_ids or req.num_images, max_k)
    q: dict = {}
    if req.text:
        q["text"] = req.text
    elif req.image:
        q["image"] = req.image
    elif req.image_url:
        raise UsageError("image_url is refused: this server does not fetch URLs named by a request (SSRF); send "
                         "the image itself as base64 in 'image'")
    elif req.embedding_input is not None:
        q["vector"] = req.embedding_input
    else:
        raise UsageError("give one of text, image (base64) or embedding_input")
    return M.SearchRequest(**q, k=k, exclude_dupes=req.deduplicate), min(req.num_images, k)


def _url(hit: dict) -> str | None:
    url = (hit.get("metadata") or {}).get("url")
    if isinstance(url, str) and url.lower().startswith(("http://", "https://")):
        return url
    return hit.get("media") or hit.get("thumbnail")


def knn_results(page: dict, with_metadata: int) -> list[dict]:
    """clip-back's answer from a search response (``responses.search_response``)."""
    out = []
    for n, h in enumerate(page["hits"]):
        row: dict = {}
        if n < with_metadata:
            row.update({k: v for k, v in (h.get("metadata") or {}).items() if k != "image_path"})
            row.update({"caption": h.get("caption"), "url": _url(h), "key": h["key"], "thumbnail": h.get("thumbnail")})
            if row["caption"] is None:
                row.pop("caption")
        row["id"] = h["id"]
        row["similarity"] = h["score"]
        out.append(row)
    return out


def metadata_results(service, name: str, ids: list[int]) -> list[dict]:
    idx = service.manager.get(name).index
    items = idx.items([i for i in ids if 0 <= i < 2**63])
    out = []
    for i in ids:
        it = items.get(i)
        if it is None:
            out.append({"id": i, "metadata": {}})
            continue
        rec = responses.item_record(name, it)
        meta = {k: v for k, v in (rec.get("extra") or {}).items() if k != "image_path"}
        url = meta.get("url") if isinstance(meta.get("url"), str) and meta["url"].lower().startswith(("http://", "https://")) \
            else (rec["media"] or rec["thumbnail"])
        meta.update({"caption": rec["caption"], "url": url, "key": rec["key"], "thumbnail": rec["thumbnail"]})
        out.append({"id": i, "metadata": {k: v for k, v in meta.items() if v is not None}})
    return out


async def _body(request: Request, model):
    data = parse_json(await request.body() or b"{}")  # clip-back reads JSON whatever the content type says
    if not isinstance(data, dict):
        raise UsageError(f"the request body must be a JSON object, got {type(data).__name__}")
    return model.model_validate(data)


def router(service) -> APIRouter:
    async def require_token(request: Request) -> None:
        if not token_matches(service.config.token, request.headers.get("authorization"), request.cookies.get(TOKEN_COOKIE)):
            raise UnauthorizedError("missing or wrong API token: send 'Authorization: Bearer TOKEN'")

    r = APIRouter(tags=["clip-retrieval compatible"], dependencies=[Depends(require_token)], responses=M_ERRORS)

    @r.get("/indices-list", summary="clip-retrieval: the served index names")
    def indices_list():
        return list(service.manager.handles)

    @r.post("/knn-service", summary="clip-retrieval: nearest neighbours of a text, a base64 image or an embedding")
    async def knn_service(request: Request):
        req = await _body(request, KnnRequest)
        name = _index_name(service, req.indice_name)
        search, with_metadata = search_request(req, service.config.max_k)
        page = await service.search(name, search, None)
        ignored = [f for f in IGNORED if getattr(req, f) not in (None, "", False)]
        headers = {"X-Clip-Compat-Ignored": ",".join(ignored)} if ignored else None
        return JSONResponse(knn_results(page, with_metadata), headers=headers)

    @r.post("/metadata", summary="clip-retrieval: the metadata of items by id")
    async def metadata(request: Request):
        req = await _body(request, MetadataRequest)
        name = _index_name(service, req.indice_name)
        if len(req.ids) > service.config.max_k:
            raise UsageError(f"at most {service.config.max_k} ids per request (--max-k), got {len(req.ids)}")
        return JSONResponse(await service.run_blocking(lambda: metadata_results(service, name, req.ids)))

    return r


M_ERRORS = {s: {"model": M.ErrorResponse} for s in (400, 401, 404, 413, 422, 503, 504)}


def register(app, service) -> None:
    """Add the routes at the server's root, where clip-retrieval's clients expect them."""
    app.include_router(router(service))


__all__ = ["IGNORED", "KnnRequest", "MetadataRequest", "knn_results", "register", "search_request"]
