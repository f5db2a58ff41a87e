"""The FastAPI app: the JSON API under ``/api/v1`` (OpenAPI page at ``/docs``), ``/healthz``,
``/metrics`` and the web page at ``/``, over a ``Service``.

>>> from mmretrieve.serve import ServeConfig, Service, create_app          # doctest: +SKIP
>>> app = create_app(Service(ServeConfig(indexes=["demo"])))               # doctest: +SKIP

Every error is JSON ``{"error": {"type", "message", "status"}}``: a bad option or value 400, a wrong
token 401, an unknown index or item 404, a body over the cap 413, an unreadable image or a malformed
field 422, the heavy queue full 503 (with Retry-After), a request past its time limit 504; anything
unexpected 500 without internals (logged on the server).
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from importlib import resources
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmretrieve.errors import (
    EncoderMismatchError,
    EncoderUnavailableError,
    IndexNotFoundError,
    InputError,
    ItemChangedError,
    ItemNotFoundError,
    MMRetrieveError,
    OTConvergenceError,
    PayloadTooLargeError,
    RerankError,
    ServeError,
    ServiceBusyError,
    UnauthorizedError,
    UsageError,
)
from mmretrieve.serve import collection
from mmretrieve.serve import models as M
from mmretrieve.serve.media_response import ITEM_BYTES_HEADERS, media_response
from mmretrieve.serve.protection import rate_limited
from mmretrieve.serve.safety import TOKEN_COOKIE, check_text, parse_json, redact_paths, token_matches
from mmretrieve.serve.service import API, Service

log = logging.getLogger(__name__)

STATIC = Path(str(resources.files("mmretrieve.serve") / "static"))
#: the page may load nothing but what this server serves
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; style-src 'self'; "
            "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
            "form-action 'self'")
#: Host header names a loopback server answers to (Starlette keeps an IPv6 host in brackets)
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})


# ---- errors -------------------------------------------------------------------------------------------
def status_of(e: Exception) -> int:
    if isinstance(e, ServeError):
        return e.status
    if isinstance(e, ItemChangedError):
        return 410  # an item's file is not what was indexed any more: gone, as far as this index knows
    if isinstance(e, (IndexNotFoundError, ItemNotFoundError)):
        return 404
    if isinstance(e, InputError):
        return 422
    if isinstance(e, UsageError):
        return 400
    if isinstance(e, (RerankError, EncoderMismatchError, EncoderUnavailableError)) and not isinstance(e, OTConvergenceError):
        return 400  # a reranker that cannot run as asked, a query encoder that does not fit or is not here
    return 500  # a corrupted store, a failed solver, anything unexpected


def error_response(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    """The JSON error every refusal answers with; server paths in ``message`` are cut to their last
    component (the full message stays in the server's log)."""
    shown = redact_paths(message)
    if shown != message:
        log.info("answered %d %s: %s", status, kind, message)
    message = shown
    return JSONResponse({"error": {"type": kind, "message": message, "status": status}}, status_code=status,
                        headers=headers)


def _validation_message(errors) -> str:
    parts = []
    for e in errors:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path"))
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MMRetrieveError)
    async def _mmr(request: Request, e: MMRetrieveError):
        status = status_of(e)
        headers = {}
        if isinstance(e, ServiceBusyError):
            headers["Retry-After"] = str(e.retry_after)
        if isinstance(e, UnauthorizedError):
            headers["WWW-Authenticate"] = "Bearer"
        if status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, e)
        return error_response(status, type(e).__name__, str(e), headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return error_response(422, "ValidationError", _validation_message(e.errors()))

    @app.exception_handler(ValidationError)
    async def _pydantic(request: Request, e: ValidationError):
        return error_response(422, "ValidationError", _validation_message(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, "HTTPError", str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, "InternalError", "internal error (the server logged the details)")


# ---- the guard: in-flight cap, body cap, security headers, metrics (the host check is Starlette's) -----
class Guard:
    """Pure ASGI middleware in front of everything but the host check."""

    def __init__(self, app, service: Service) -> None:
        self.app = app
        self.service = service
        cfg = service.config
        self.max_body = cfg.max_upload_bytes * 4 // 3 + (64 << 10)  # base64 in JSON, plus the other fields

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        state = {"status": 500}
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        authed = self._authorised(headers)
        refusal = self._refusal(headers, path, authed)
        if refusal is not None:
            await refusal(scope, receive, self._sender(send, state, path))
            return self._record(scope, state, t0)
        cfg = self.service.config
        body = rate_limited(receive, cfg.body_min_rate, cfg.body_grace_s)
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await body()
            if msg.get("type") == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body:
                    raise PayloadTooLargeError(f"request body over the limit of {self.max_body} bytes "
                                               f"(uploads: {self.service.config.max_upload_bytes} bytes)")
            return msg

        counter = "in_flight" if authed else "anonymous_in_flight"
        setattr(self.service, counter, getattr(self.service, counter, 0) + 1)
        try:
            await self.app(scope, limited_receive, self._sender(send, state, path))
        finally:
            setattr(self.service, counter, getattr(self.service, counter) - 1)
            self._record(scope, state, t0)

    def _authorised(self, headers: dict) -> bool:
        """Whether the request carries the token (always, where none is set): read from the headers alone,
        before any of the body, so an unauthorised request costs no body and no slot of the authorised."""
        token = self.service.config.token
        if not token:
            return True
        from http.cookies import SimpleCookie

        cookie = None
        if "cookie" in headers:
            jar = SimpleCookie()
            try:
                jar.load(headers["cookie"])
            except Exception:  # a malformed Cookie header: no cookie
                jar = {}
            cookie = jar[TOKEN_COOKIE].value if TOKEN_COOKIE in jar else None
        return token_matches(token, headers.get("authorization"), cookie)

    def _refusal(self, headers: dict, path: str, authed: bool):
        if not authed and path.startswith((API + "/", "/metrics")):
            return error_response(401, "UnauthorizedError", "missing or wrong API token: send 'Authorization: Bearer TOKEN'",
                                  {"WWW-Authenticate": "Bearer"})
        cfg = self.service.config
        busy = (self.service.in_flight >= cfg.max_in_flight if authed
                else getattr(self.service, "anonymous_in_flight", 0) >= cfg.max_in_flight_anonymous)
        if busy:
            return error_response(503, "ServiceBusyError", "too many requests at once; try again later",
                                  {"Retry-After": "1"})
        cl = headers.get("content-length")
        if cl is not None and (not cl.isdigit() or int(cl) > self.max_body):
            return error_response(413, "PayloadTooLargeError", f"request body of {cl} bytes is over the limit of "
                                  f"{self.max_body} bytes (uploads: {self.service.config.max_upload_bytes} bytes)")
        return None

    @staticmethod
    def _sender(send, state: dict, path: str):
        async def wrapped(msg):
            if msg["type"] == "http.response.start":
                state["status"] = msg["status"]
                extra = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                         (b"x-frame-options", b"DENY")]
                if not path.startswith("/docs"):
                    extra.append((b"content-security-policy", PAGE_CSP.encode()))
                have = {k.lower() for k, _ in msg.get("headers", [])}  # a route's own (e.g. media's sandbox) stays
                msg = {**msg, "headers": list(msg.get("headers", [])) + [(k, v) for k, v in extra if k not in have]}
            await send(msg)

        return wrapped

    def _record(self, scope, state: dict, t0: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or ("static" if scope.get("path", "").startswith("/static") else "unmatched")
        status = str(state["status"])
        m = self.service.metrics
        m.inc("mmretrieve_http_requests_total", {"endpoint": endpoint, "method": scope.get("method", ""), "status": status})
        if state["status"] >= 400:
            m.inc("mmretrieve_http_errors_total", {"endpoint": endpoint, "status": status})
        m.observe("mmretrieve_http_request_duration_seconds", time.perf_counter() - t0, {"endpoint": endpoint})


# ---- request bodies -------------------------------------------------------------------------------------
_JSON_FIELDS = ("vector", "fusion_options")  # multipart fields that carry JSON
_LIST_FIELDS = ("rerank",)


async def read_body(request: Request, model, service: Service):
    """``(model instance, uploaded image bytes or None)`` from a JSON or multipart/form-data body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    cap = service.config.max_upload_bytes
    if ctype in ("", "application/json"):
        data = parse_json(await request.body() or b"{}")
        if not isinstance(data, dict):
            raise UsageError(f"the request body must be a JSON object, got {type(data).__name__}")
        return model.model_validate(data), None
    if ctype not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise UsageError(f"send application/json or multipart/form-data, not {ctype!r}")
    form = await request.form(max_files=1, max_fields=32, max_part_size=256 << 10)
    upload, data = None, {}
    for key, value in form.multi_items():
        if hasattr(value, "read"):  # a file part
            if key != "image":
                raise UsageError(f"the only file part is 'image', got {key!r}")
            upload = await value.read(cap + 1)
            if len(upload) > cap:
                raise PayloadTooLargeError(f"image: more than the upload limit of {cap} bytes")
        elif key in _LIST_FIELDS:
            data.setdefault(key, []).append(value)
        elif key in _JSON_FIELDS:
            data[key] = parse_json(value, key)
        else:
            check_text(value, key)
            data[key] = value
    return model.model_validate(data), upload


def _body_doc(model) -> dict:
    """OpenAPI: the body is the model as JSON, or the same fields as multipart with an image file."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "image": {"type": "string", "format": "binary", "description": "the query image file"}},
            "additionalProperties": True,
            "description": f"the fields of {model.__name__} as form fields (vector and fusion_options as JSON); "
                           "rerank may repeat"}}}}}


ERRORS = {s: {"model": M.ErrorResponse} for s in (400, 401, 404, 413, 422, 503, 504)}
ItemId = Annotated[int, PathParam(ge=0, le=2**63 - 1, description="the item's id (ids only: no keys, no paths)")]


# ---- routes -----------------------------------------------------------------------------------------------
def api_router(service: Service) -> APIRouter:
    async def require_token(request: Request) -> None:  # async: a sync dependency costs a thread hop per call
        if not token_matches(service.config.token, request.headers.get("authorization"), request.cookies.get(TOKEN_COOKIE)):
            raise UnauthorizedError("missing or wrong API token: send 'Authorization: Bearer TOKEN'")

    r = APIRouter(prefix=API, dependencies=[Depends(require_token)], responses=ERRORS)

    @r.get("/indexes", response_model=list[M.IndexSummary], summary="the served indexes")
    def list_indexes():
        return [service.summary(n) for n in service.manager.handles]

    @r.get("/indexes/{name}", response_model=M.IndexDetail, summary="one index: what `index info` shows, and what it offers")
    def index_detail(name: str):
        return service.detail(name)

    @r.post("/indexes/{name}/search", response_model=M.SearchResponse, openapi_extra=_body_doc(M.SearchRequest),
            summary="search by text, image, item or vector; composed = image or item + text")
    async def search(name: str, request: Request):
        service.manager.get(name)
        req, upload = await read_body(request, M.SearchRequest, service)
        return JSONResponse(await service.search(name, req, upload))

    @r.get("/indexes/{name}/items/{item_id}", response_model=M.ItemModel, summary="an indexed item's metadata")
    def item(name: str, item_id: ItemId):
        return service.item_info(name, item_id)

    @r.get("/indexes/{name}/items/{item_id}/thumbnail", summary="a cached JPEG thumbnail",
           responses={200: {"content": {"image/jpeg": {}}}})
    async def thumbnail(name: str, item_id: ItemId, request: Request,
                        size: Annotated[int, Query(description="fit in this many pixels: 64, 128, 160, 256, 384 or 512")] = 256):
        data, etag = await service.run_blocking(lambda: service.thumbnail(name, item_id, size))
        headers = {**ITEM_BYTES_HEADERS, "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type="image/jpeg", headers=headers)

    @r.get("/indexes/{name}/items/{item_id}/media", summary="the original file as indexed (single byte ranges "
           "supported); its type sniffed from its bytes, 410 when it changed since it was indexed",
           responses={200: {"content": {"image/*": {}, "video/*": {}}}})
    async def media(name: str, item_id: ItemId, request: Request):
        m = await service.run_blocking(lambda: service.media(name, item_id))
        return media_response(m, request.headers.get("range"))

    @r.post("/embed", response_model=M.EmbedResponse, openapi_extra=_body_doc(M.EmbedRequest),
            summary="a text or an image -> the encoder's vector")
    async def embed(request: Request):
        req, upload = await read_body(request, M.EmbedRequest, service)
        return JSONResponse(await service.embed(req, upload))

    from mmretrieve.serve import batch_api

    batch_api.register(r, service, read_body)
    collection.register(r, service)  # facets and the embeddings map (serve/collection.py)
    from mmretrieve.serve import export_api

    export_api.register(r, service)  # GET .../export (serve/export_api.py)
    return r


def create_app(service: Service, *, allowed_hosts: frozenset[str] | None | str = "auto") -> FastAPI:
    """The app over ``service`` (started here if it was not yet; closed at shutdown if started here).

    ``allowed_hosts``: Host header names answered; ``"auto"``: on a loopback bind without a token, only
    loopback names (a page elsewhere cannot reach the API through DNS rebinding), else any."""
    from contextlib import asynccontextmanager

    from mmretrieve import __version__
    from mmretrieve.serve.config import is_loopback

    cfg = service.config
    owned = service.started_at is None

    @asynccontextmanager
    async def lifespan(app):
        if service.started_at is None:
            service.start()
        yield
        if owned:
            service.close()

    offline_docs = _offline_docs_dir()
    app = FastAPI(title="mmretrieve", version=__version__, lifespan=lifespan, redoc_url=None,
                  docs_url=None if offline_docs else "/docs",
                  description="Multimodal retrieval and re-ranking: text, image, composed (reference image + "
                              "modification text) and video search over served indexes.")
    install_error_handlers(app)
    app.include_router(api_router(service))
    from mmretrieve.serve import clip_compat

    clip_compat.register(app, service)  # /knn-service, /indices-list, /metadata (serve/clip_compat.py)
    _page_routes(app, service, offline_docs)
    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    if allowed_hosts == "auto":
        bound = cfg.host.strip("[]").lower()
        allowed_hosts = (LOOPBACK_HOSTS | {f"[{bound}]" if ":" in bound else bound}
                         if is_loopback(cfg.host) and not cfg.token else None)
    app.add_middleware(Guard, service=service)
    if allowed_hosts is not None:  # outermost: a request for another host name is refused before anything
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=sorted(allowed_hosts))
    _openapi_models(app)
    return app


def _offline_docs_dir() -> Path | None:
    """Swagger UI's files from the fastapi-offline package, so /docs works without a network."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    d = Path(fastapi_offline.__file__).parent / "static"
    return d if (d / "swagger-ui-bundle.js").is_file() else None


def _page_routes(app: FastAPI, service: Service, offline_docs: Path | None) -> None:
    from fastapi.staticfiles import StaticFiles

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    @app.get("/healthz", response_model=M.Health, response_model_exclude_none=True,
             summary="liveness; with the token (or without one set), the served indexes and their versions")
    def healthz(request: Request):
        if not token_matches(service.config.token, request.headers.get("authorization"), request.cookies.get(TOKEN_COOKIE)):
            return {"status": "ok"}  # alive, and nothing about what is served
        return {"status": "ok", "indexes": {n: h.version for n, h in service.manager.handles.items()}}

    @app.post("/session", status_code=204, summary="the page's sign-in: the token, checked, comes back as an "
              "HttpOnly SameSite=Strict cookie that script cannot read; DELETE signs out")
    async def session(request: Request):
        body = parse_json(await request.body() or b"{}")
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not service.config.token or not token_matches(service.config.token, f"Bearer {token}"):
            raise UnauthorizedError("wrong API token")
        r = Response(status_code=204)
        r.set_cookie(TOKEN_COOKIE, urllib.parse.quote(token, safe=""), httponly=True, samesite="strict", path="/",
                     secure=request.url.scheme == "https")
        return r

    @app.delete("/session", status_code=204, include_in_schema=False)
    def sign_out():
        r = Response(status_code=204)
        r.delete_cookie(TOKEN_COOKIE, path="/", httponly=True, samesite="strict")
        return r

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus text format")
    def metrics(request: Request):
        if not token_matches(service.config.token, request.headers.get("authorization"), request.cookies.get(TOKEN_COOKIE)):
            raise UnauthorizedError("missing or wrong API token: send 'Authorization: Bearer TOKEN'")
        body, content_type = service.metrics.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    if offline_docs is not None:
        from fastapi.openapi.docs import get_swagger_ui_html

        app.mount("/docs/static", StaticFiles(directory=offline_docs), name="docs-static")

        @app.get("/docs", include_in_schema=False)
        def docs():
            return get_swagger_ui_html(openapi_url="/openapi.json", title="mmretrieve API",
                                       swagger_js_url="/docs/static/swagger-ui-bundle.js",
                                       swagger_css_url="/docs/static/swagger-ui.css",
                                       swagger_favicon_url="/docs/static/favicon.png")


def _openapi_models(app: FastAPI) -> None:
    """Add the request models that routes read themselves (JSON or multipart) to the schema."""
    base = app.openapi

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = base()
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (M.SearchRequest, M.EmbedRequest):
            s = model.model_json_schema(ref_template="#/components/schemas/{model}")
            comps.update(s.pop("$defs", {}))
            comps[model.__name__] = s
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


__all__ = ["create_app", "status_of", "read_body"]
