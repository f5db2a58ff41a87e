"""A real OpenAI-compatible chat-completions server over a local model, for tests and smoke runs.

``serve_openai(model_dir)`` starts FastAPI + uvicorn on 127.0.0.1 (an ephemeral port, loopback only) in
a background thread and yields an ``OpenAIServer`` whose ``url`` is the base URL to give the
``EndpointGenerator`` (``http://127.0.0.1:PORT/v1``). It serves

- ``GET /v1/models``: the one model, named ``model_name``;
- ``POST /v1/chat/completions``: the user turns' content parts in order (texts, and images as base64
  data URIs, decoded with PIL) become one ``Prompt``, answered by a ``LocalGenerator`` over
  ``model_dir`` (``cache=False``: every request really generates; greedy at ``temperature`` 0,
  ``max_tokens`` new tokens at most), with the OpenAI answer's ``choices[0].message.content`` and
  ``usage``. Nothing is canned: the text is the model's.

For tests of a client's failure handling, the server counts what it receives (``requests``,
``max_in_flight``) and can misbehave on demand: ``fail_next(status, n)`` answers the next ``n``
chat-completion requests with ``status`` (429 with ``Retry-After``), ``delay(seconds)`` sleeps before
answering, and ``api_key=`` makes it answer 401 to a missing or wrong ``Authorization: Bearer`` key.
``reset()`` puts all of that back. It is bounded in time: starting waits ``start_timeout`` seconds at
most, it stops by itself after ``max_seconds``, and leaving the block stops it (a request still sleeping
in a ``delay`` is cut short).
"""

# no ``from __future__ import annotations``: FastAPI resolves the handlers' annotations (``Request``,
# imported where the app is built) at runtime
import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from PIL import Image

from mmretrieve.errors import MissingDependencyError, MMRetrieveError

log = logging.getLogger(__name__)


def completion(model_name: str, g, max_tokens: int) -> dict:
    """An OpenAI chat-completion response for one ``Generation``."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text},
                     "finish_reason": "length" if g.generated_tokens >= max_tokens else "stop"}],
        "usage": {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.generated_tokens,
                  "total_tokens": g.prompt_tokens + g.generated_tokens},
    }


class OpenAIServer:
    """The server ``serve_openai`` runs (see the module docstring); ``url`` once started."""

    def __init__(self, model_dir: str, *, model_name: str = "tiny", api_key: str | None = None, dtype: str = "fp32",
                 device: str | None = None, max_seconds: float = 600.0, start_timeout: float = 120.0) -> None:
        self.model_dir, self.model_name, self.dtype, self.device = str(model_dir), model_name, dtype, device
        self._api_key = api_key
        self.max_seconds, self.start_timeout = float(max_seconds), float(start_timeout)
        self.url: str | None = None
        self._lock = threading.Lock()
        self._gen_lock = threading.Lock()
        self._generators: dict[tuple, Any] = {}
        self._stop = threading.Event()
        self._server = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._timer: threading.Timer | None = None
        self.reset()

    def __str__(self) -> str:
        return self.url or "<OpenAIServer not started>"

    # ---- what a test sets and reads ------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the counts and every injected fault or delay."""
        with self._lock:
            self.requests = 0  # chat-completion requests received (answered or not)
            self.answered = 0  # of which answered 200
            if not hasattr(self, "in_flight"):
                self.in_flight = 0  # requests being answered now (a reset does not forget them)
            self.max_in_flight = self.in_flight
            self._fail: list[tuple[int, float | None]] = []
            self._delay, self._delay_left = 0.0, None

    def fail_next(self, status: int, n: int = 1, *, retry_after: float | None = 0) -> None:
        """Answer the next ``n`` chat-completion requests with HTTP ``status`` (429 and 503 carry
        ``Retry-After: retry_after`` unless it is ``None``)."""
        with self._lock:
            self._fail.extend([(int(status), retry_after)] * int(n))

    def delay(self, seconds: float, n: int | None = None) -> None:
        """Sleep ``seconds`` before answering each of the next ``n`` chat-completion requests (``None``: all)."""
        with self._lock:
            self._delay, self._delay_left = float(seconds), (None if n is None else int(n))

    # ---- generation ----------------------------------------------------------------------------------
    def _generator(self, max_tokens: int, temperature: float):
        from mmretrieve.rerank.generate import LocalGenerator

        key = (max_tokens, temperature)
        with self._lock:
            if key not in self._generators:
                self._generators[key] = LocalGenerator(self.model_dir, dtype=self.dtype, device=self.device, batch_size=1,
                                                       max_new_tokens=max_tokens, temperature=temperature, cache=False,
                                                       what="openai_server")
            return self._generators[key]

    def _answer(self, prompt, max_tokens: int, temperature: float):
        gen = self._generator(max_tokens, temperature)
        with self._gen_lock:  # one generation at a time: requests overlap, the model does not
            return gen._generate([prompt])[0]

    def _arrive(self) -> tuple[tuple[int, float | None] | None, float]:
        """Count a request and take the faults set for it: (an injected failure or None, seconds to wait)."""
        with self._lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            fail = self._fail.pop(0) if self._fail else None
            wait = 0.0
            if self._delay and (self._delay_left is None or self._delay_left > 0):
                wait = self._delay
                if self._delay_left is not None:
                    self._delay_left -= 1
        return fail, wait

    # ---- the app -------------------------------------------------------------------------------------
    def _app(self):
        try:
            from fastapi import FastAPI, Request
            from fastapi.responses import JSONResponse
            from starlette.concurrency import run_in_threadpool
        except ImportError:
            raise MissingDependencyError("the test OpenAI server needs FastAPI and uvicorn: pip install 'mmretrieve[serve]'"
                                         ) from None
        from mmretrieve.rerank.generate import Prompt

        app = FastAPI(title="mmretrieve test OpenAI server", docs_url=None, redoc_url=None, openapi_url=None)

        def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                  headers: dict[str, str] | None = None):
            return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status,
                                headers=headers)

        def authorized(request: Request) -> bool:
            if self._api_key is None:
                return True
            got = request.headers.get("authorization", "")
            return hmac.compare_digest(got.encode(), f"Bearer {self._api_key}".encode())

        @app.get("/v1/models")
        async def models(request: Request):
            if not authorized(request):
                return error(401, "Incorrect API key provided", code="invalid_api_key")
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                                "owned_by": "mmretrieve-test"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            fail, wait = self._arrive()
            try:
                if not authorized(request):
                    return error(401, "Incorrect API key provided", code="invalid_api_key")
                if wait:
                    end = time.monotonic() + wait
                    while time.monotonic() < end and not self._stop.is_set():
                        await asyncio.sleep(min(0.05, max(0.0, end - time.monotonic())))
                if fail is not None:
                    status, retry_after = fail
                    headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None and status in (429, 503) else None
                    message = "Rate limit reached, slow down" if status == 429 else f"injected failure (HTTP {status})"
                    return error(status, message, kind="rate_limit_error" if status == 429 else "server_error",
                                 headers=headers)
                try:
                    doc = await request.json()
                except ValueError:
                    return error(400, "the request body is not JSON")
                try:
                    prompt, max_tokens, temperature = parse_request(doc, self.model_name, Prompt)
                except LookupError as e:
                    return error(404, str(e.args[0]), code="model_not_found")
                except ValueError as e:
                    return error(400, str(e))
                try:
                    g = await run_in_threadpool(self._answer, prompt, max_tokens, temperature)
                except MMRetrieveError as e:
                    return error(400, str(e))
                with self._lock:
                    self.answered += 1
                return completion(self.model_name, g, max_tokens)
            finally:
                with self._lock:
                    self.in_flight -= 1

        return app

    # ---- start and stop ------------------------------------------------------------------------------
    def start(self) -> "OpenAIServer":
        import uvicorn

        app = self._app()
        self._generator(16, 0.0).load()  # the weights before the first request (no first-request stall)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._sock = sock
        config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, loop="asyncio",
                                lifespan="off", timeout_graceful_shutdown=2)
        self._server = server = uvicorn.Server(config)
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name="mmretrieve-test-openai-server")
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the test OpenAI server did not start within {self.start_timeout:g} s")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        self._timer = threading.Timer(self.max_seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()
        log.info("test OpenAI server for %s at %s", self.model_dir, self.url)
        return self

    def _expire(self) -> None:
        log.warning("test OpenAI server at %s: stopping after max_seconds=%g", self.url, self.max_seconds)
        self._stop.set()
        if self._server is not None:
            self._server.should_exit = True

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving (a request sleeping in a ``delay`` is cut short); waits ``timeout`` seconds at most."""
        self._stop.set()
        if self._timer is not None:
            self._timer.cancel()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout / 2)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(timeout / 2)
            if self._thread.is_alive():
                log.warning("test OpenAI server at %s did not stop within %g s", self.url, timeout)
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()


def _decode_image(url: str) -> Image.Image:
    if not url.startswith("data:"):
        raise ValueError("image_url: only data URIs (data:image/...;base64,...) are accepted here")
    head, _, data = url.partition(",")
    if not head.endswith(";base64"):
        raise ValueError("image_url: the data URI is not base64")
    try:
        im = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        im.load()
    except (binascii.Error, OSError, ValueError) as e:
        raise ValueError(f"image_url: not a readable image: {e}") from None
    return im if im.mode == "RGB" else im.convert("RGB")


def parse_request(doc: Any, model_name: str, prompt_cls) -> tuple[Any, int, float]:
    """The ``Prompt``, ``max_tokens`` and ``temperature`` of a chat-completions body: the user turns'
    parts in order (a system turn's text first). Raises ``LookupError`` (unknown model) or ``ValueError``."""
    if not isinstance(doc, dict):
        raise ValueError("the request body must be a JSON object")
    if doc.get("model") != model_name:
        raise LookupError(f"The model `{doc.get('model')}` does not exist (this server serves `{model_name}`)")
    messages = doc.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: a non-empty list is required")
    parts: list[Any] = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user"):
            continue
        content = m.get("content")
        if isinstance(content, str):
            parts.append(content)
            continue
        if not isinstance(content, list):
            raise ValueError("messages[].content must be a string or a list of parts")
        for c in content:
            kind = c.get("type") if isinstance(c, dict) else None
            if kind == "text":
                parts.append(str(c.get("text", "")))
            elif kind == "image_url":
                iu = c.get("image_url")
                parts.append(_decode_image(iu.get("url", "") if isinstance(iu, dict) else str(iu or "")))
            else:
                raise ValueError(f"messages[].content: unknown part type {kind!r}")
    if not parts:
        raise ValueError("messages: no user content")
    max_tokens = doc.get("max_tokens", doc.get("max_completion_tokens", 16))
    temperature = doc.get("temperature", 0.0)
    try:
        max_tokens, temperature = int(max_tokens), float(temperature if temperature is not None else 0.0)
    except (TypeError, ValueError):
        raise ValueError("max_tokens must be an integer and temperature a number") from None
    if max_tokens < 1 or temperature < 0:
        raise ValueError("max_tokens must be >= 1 and temperature >= 0")
    return prompt_cls(parts), max_tokens, temperature


@contextlib.contextmanager
def serve_openai(model_dir: str, *, model_name: str = "tiny", api_key: str | None = None, dtype: str = "fp32",
                 device: str | None = None, max_seconds: float = 600.0) -> Iterator[OpenAIServer]:
    """Serve ``model_dir`` as an OpenAI-compatible endpoint inside the block; yields the ``OpenAIServer``
    (``server.url`` is ``http://127.0.0.1:PORT/v1``)."""
    server = OpenAIServer(model_dir, model_name=model_name, api_key=api_key, dtype=dtype, device=device,
                          max_seconds=max_seconds).start()
    try:
        yield server
    finally:
        server.stop()


__all__ = ["OpenAIServer", "serve_openai", "parse_request"]
