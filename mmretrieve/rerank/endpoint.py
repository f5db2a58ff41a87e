"""The generative stages' answers from an OpenAI-compatible endpoint (vLLM, SGLang, a hosted model).

``EndpointGenerator(api, api_model)`` is the ``Generator`` that ``make_generator`` builds for
``api=http://host:port/v1,api_model=NAME``: each ``Prompt`` becomes one ``POST {api}/chat/completions``
with a single user turn whose content parts follow the prompt's order -- texts as ``text`` parts, images
as ``image_url`` parts holding a base64 data URI (PNG for images with transparency, else JPEG quality 90;
``image_format="png"`` sends every image losslessly). Only the standard library is used (``urllib``,
``json``, ``concurrent.futures``): no client package to install.

- The API key is read from the environment variable named by ``api_key_env`` (sent as ``Authorization:
  Bearer ...``) when a request is sent; it is never kept on the object, so it shows in no ``repr``,
  config or cache key. A named variable that is not set fails at once, naming it. The cache identity is
  ``endpoint|{api}|{api_model}``.
- At most ``concurrency`` requests are in flight per generator (across every thread that uses it);
  answers come back in the prompts' order.
- Each request may take ``timeout`` seconds. HTTP 429 and 5xx answers, timeouts and dropped connections
  are retried up to ``retries`` times, waiting ``backoff * 2**attempt`` seconds plus jitter (or what
  the server's ``Retry-After`` asks), at most ``MAX_WAIT`` seconds each. Any other 4xx (a wrong key, an
  unknown model, a prompt over the context) fails at once with the server's message.
- An endpoint that cannot be reached (connection refused, an unknown host) fails fast: the first use
  makes one TCP connection to the host (``PROBE_TIMEOUT`` seconds at most) and raises ``EndpointError``
  saying so, without a retry.
- Token counts come from the answer's ``usage``; a server that sends none gets an estimate (about four
  characters per token) so that costs stay comparable.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import io
import ipaddress
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from mmretrieve.errors import EndpointError, UsageError
from mmretrieve.rerank.gencache import Generation
from mmretrieve.rerank.generate import Generator, Prompt

log = logging.getLogger(__name__)

#: seconds the reachability probe (one TCP connect) may take
PROBE_TIMEOUT = 3.0
#: the longest wait between two tries, whatever the backoff or Retry-After says
MAX_WAIT = 10.0
IMAGE_FORMATS = ("auto", "png", "jpeg")


class _Retryable(Exception):
    def __init__(self, why: str, status: int | None = None, retry_after: float | None = None) -> None:
        self.why, self.status, self.retry_after = why, status, retry_after
        super().__init__(why)


def encode_image(im: Image.Image, fmt: str = "auto") -> str:
    """A data URI of ``im``: PNG when it has transparency (or ``fmt="png"``), else JPEG quality 90."""
    alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info)
    buf = io.BytesIO()
    if fmt == "png" or (fmt == "auto" and alpha):
        if im.mode not in ("RGB", "RGBA", "L", "LA", "P", "1", "I;16"):
            im = im.convert("RGBA" if alpha else "RGB")
        im.save(buf, format="PNG")
        mime = "image/png"
    else:
        if im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        im.save(buf, format="JPEG", quality=90)
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (a number of seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _server_message(body: bytes) -> str:
    """The server's error message (OpenAI's ``{"error": {"message": ...}}``, FastAPI's ``detail``, or the text)."""
    text = body.decode("utf-8", "replace").strip()
    try:
        doc = json.loads(text)
    except ValueError:
        return text[:500] or "(no message)"
    if isinstance(doc, dict):
        err = doc.get("error", doc.get("detail", doc.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            return str(err)[:500]
    return text[:500]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: the largest answer body read (bytes), and the longest answer text kept (characters)
MAX_BODY_BYTES = 16 << 20
MAX_TEXT_CHARS = 200_000


def _count(x) -> int | None:
    """A token count from ``usage``: a non-negative integer (an integral float too), else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, float) and x.is_integer() and x >= 0:
        return int(x)
    return x if isinstance(x, int) and 0 <= x < 1 << 53 else None


def _content_text(content) -> str:
    """A message's content as text: a string, or the text parts of a list of parts (some servers answer
    in parts); anything else is no text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _estimate_tokens(text: str) -> int:
    return (len(text) + 3) // 4


class EndpointGenerator(Generator):
    """An OpenAI-compatible chat-completions endpoint; see the module docstring.

    ``api``: the base URL (``http://host:port/v1``); ``api_model``: the model name it serves;
    ``api_key_env``: the environment variable holding the key (none: no ``Authorization`` header);
    ``concurrency``: requests in flight at most; ``timeout``: seconds per request; ``retries``: tries
    after the first on 429 / 5xx / timeouts / dropped connections; ``backoff``: the first wait (doubled
    each try); ``image_format``: ``auto`` (PNG with transparency, else JPEG), ``png`` or ``jpeg``.
    ``max_pixels`` is accepted and ignored (the stages resize images before they prompt).
    A ``Generation``'s ``seconds`` is the wall time of its request, retries and waits included; its token
    counts are the server's ``usage``, or an estimate (about four characters per token, the images not
    counted) when the answer has none.
    """

    def __init__(self, api: str, api_model: str, *, api_key_env: str | None = None, concurrency: int = 4,
                 timeout: float = 120.0, retries: int = 3, backoff: float = 0.5, image_format: str = "auto",
                 what: str = "generate", max_pixels: Any = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.what = what
        api = str(api or "").strip().rstrip("/")
        parts = urllib.parse.urlsplit(api)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"{what}: api= must be an http(s) URL such as http://127.0.0.1:8000/v1, got {api!r}")
        try:
            port = parts.port
        except ValueError as e:
            raise UsageError(f"{what}: api={api!r} has a bad port: {e}") from None
        if not api_model:
            raise UsageError(f"{what}: api= needs api_model= (the model name the endpoint serves)")
        if int(concurrency) < 1:
            raise UsageError(f"{what}: concurrency must be >= 1, got {concurrency}")
        if float(timeout) <= 0:
            raise UsageError(f"{what}: timeout must be > 0 seconds, got {timeout}")
        if int(retries) < 0:
            raise UsageError(f"{what}: retries must be >= 0, got {retries}")
        if image_format not in IMAGE_FORMATS:
            raise UsageError(f"{what}: image_format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")
        self.api, self.api_model, self.api_key_env = api, str(api_model), api_key_env or None
        self.concurrency, self.timeout, self.retries = int(concurrency), float(timeout), int(retries)
        self.backoff, self.image_format = max(0.0, float(backoff)), image_format
        self.url = f"{api}/chat/completions"
        self._host, self._port = parts.hostname, port or (443 if parts.scheme == "https" else 80)
        # a loopback server is never reached through a proxy; anything else follows the environment's proxies
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(self._host) else []
        self._opener = urllib.request.build_opener(*handlers)
        self._slots = threading.BoundedSemaphore(self.concurrency)
        self._probe_lock = threading.Lock()
        self._probed = False
        self._key()  # a named variable that is not set fails now

    def __repr__(self) -> str:
        return (f"EndpointGenerator(api={self.api!r}, api_model={self.api_model!r}, api_key_env={self.api_key_env!r}, "
                f"concurrency={self.concurrency}, timeout={self.timeout}, retries={self.retries})")

    @property
    def identity(self) -> str:
        return f"endpoint|{self.api}|{self.api_model}"

    def options(self) -> dict[str, Any]:
        return {**super().options(), **({"image_format": self.image_format} if self.image_format != "auto" else {})}

    def chunk_size(self) -> int:
        return self.concurrency

    # ---- the key, the probe --------------------------------------------------------------------------
    def _key(self) -> str | None:
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise EndpointError(f"{self.what}: api_key_env={self.api_key_env} names an environment variable that is not "
                                f"set (or empty): export {self.api_key_env}=<the key of {self.api}>, or leave "
                                "api_key_env out for an endpoint without a key")
        return key

    def _probe_target(self) -> tuple[str, int, str]:
        """Where a request connects first: the proxy that the environment names for this URL, else the host."""
        if not _is_loopback(self._host):
            proxies = urllib.request.getproxies()
            scheme = urllib.parse.urlsplit(self.api).scheme
            if scheme in proxies and not urllib.request.proxy_bypass(self._host):
                p = urllib.parse.urlsplit(proxies[scheme] if "://" in proxies[scheme] else f"http://{proxies[scheme]}")
                if p.hostname:
                    return p.hostname, p.port or 80, f" (through the proxy {p.hostname}:{p.port or 80})"
        return self._host, self._port, ""

    def _unreachable(self, why: str) -> EndpointError:
        return EndpointError(f"{self.what}: endpoint {self.api}: cannot be reached ({why}); start the server or fix api=")

    def probe(self) -> None:
        """One TCP connection to the endpoint (``PROBE_TIMEOUT`` seconds at most), once per generator:
        raises ``EndpointError`` at once when it cannot be reached."""
        with self._probe_lock:
            if self._probed:
                return
            host, port, via = self._probe_target()
            try:
                with socket.create_connection((host, port), timeout=PROBE_TIMEOUT):
                    pass
            except ConnectionRefusedError:
                raise self._unreachable(f"connection refused{via}") from None
            except socket.gaierror as e:
                raise self._unreachable(f"unknown host {host!r}{via}: {e.strerror or e}") from None
            except TimeoutError:
                raise self._unreachable(f"no connection within {PROBE_TIMEOUT:g} s{via}") from None
            except OSError as e:
                raise self._unreachable(f"{e.strerror or e}{via}") from None
            self._probed = True

    # ---- requests ------------------------------------------------------------------------------------
    def payload(self, prompt: Prompt) -> dict[str, Any]:
        """The chat-completions request body of ``prompt``."""
        content = []
        for p in prompt.parts:
            if isinstance(p, Image.Image):
                content.append({"type": "image_url", "image_url": {"url": encode_image(p, self.image_format)}})
            else:
                content.append({"type": "text", "text": str(p)})
        return {"model": self.api_model, "messages": [{"role": "user", "content": content}],
                "max_tokens": self.max_new_tokens, "temperature": self.temperature}

    def _post_once(self, body: bytes) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = self._key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with self._slots, self._opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read(MAX_BODY_BYTES + 1)
            if len(raw) > MAX_BODY_BYTES:
                raise EndpointError(f"{self.what}: endpoint {self.url} answered more than {MAX_BODY_BYTES >> 20} MB; "
                                    "refused (lower max_new_tokens, or check the server)")
        except urllib.error.HTTPError as e:
            try:
                msg = _server_message(e.read())
            except (OSError, http.client.HTTPException):
                msg = e.reason or "(no message)"
            if e.code == 429 or e.code >= 500:
                raise _Retryable(f"HTTP {e.code}: {msg}", e.code, _retry_after(e.headers.get("Retry-After"))) from None
            raise EndpointError(f"{self.what}: endpoint {self.url} answered HTTP {e.code}: {msg}", e.code) from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, ConnectionRefusedError):
                raise self._unreachable("connection refused") from None
            if isinstance(reason, socket.gaierror):
                raise self._unreachable(f"unknown host {self._host!r}") from None
            if isinstance(reason, TimeoutError):
                raise _Retryable(f"no answer within {self.timeout:g} s") from None
            if isinstance(reason, (ConnectionError, OSError)):
                raise _Retryable(f"connection failed: {reason}") from None
            raise EndpointError(f"{self.what}: endpoint {self.url}: {reason}") from None
        except TimeoutError:
            raise _Retryable(f"no answer within {self.timeout:g} s") from None
        except ConnectionRefusedError:
            raise self._unreachable("connection refused") from None
        except (OSError, http.client.HTTPException) as e:  # reset, aborted, a truncated answer
            raise _Retryable(f"connection dropped: {type(e).__name__}: {e}") from None
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            raise EndpointError(f"{self.what}: endpoint {self.url} answered something that is not JSON: "
                                f"{raw[:200]!r}") from None
        if not isinstance(doc, dict):
            raise EndpointError(f"{self.what}: endpoint {self.url} answered unexpected JSON: {str(doc)[:200]}")
        return doc

    def _wait(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(MAX_WAIT, retry_after)
        base = self.backoff * (2 ** attempt)
        return min(MAX_WAIT, base + random.uniform(0, base))  # jitter: tries from many clients spread out

    def _request(self, prompt: Prompt) -> Generation:
        body = json.dumps(self.payload(prompt)).encode("utf-8")
        t0 = time.perf_counter()
        last: _Retryable | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                wait = self._wait(attempt - 1, last.retry_after if last else None)
                log.warning("%s: endpoint %s: %s; try %d of %d in %.2f s", self.what, self.url, last.why, attempt + 1,
                            self.retries + 1, wait)
                time.sleep(wait)
            try:
                doc = self._post_once(body)
            except _Retryable as e:
                last = e
                continue
            return self._generation(doc, prompt, time.perf_counter() - t0)
        assert last is not None
        tries = self.retries + 1
        raise EndpointError(f"{self.what}: endpoint {self.url} failed after {tries} tr{'y' if tries == 1 else 'ies'}: "
                            f"{last.why}", last.status)

    def _generation(self, doc: dict[str, Any], prompt: Prompt, seconds: float) -> Generation:
        try:
            text = doc["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"{self.what}: endpoint {self.url} answered without choices[0].message.content: "
                                f"{json.dumps(doc)[:300]}") from None
        text = _content_text(text)[:MAX_TEXT_CHARS]
        usage = doc.get("usage") if isinstance(doc.get("usage"), dict) else {}
        prompt_tokens, generated = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
        if prompt_tokens is None:  # missing or not a count: estimated from the text parts
            prompt_tokens = sum(_estimate_tokens(str(p)) for p in prompt.parts if not isinstance(p, Image.Image))
        if generated is None:
            generated = _estimate_tokens(text)
        return Generation(text, prompt_tokens, generated, float(seconds))

    def _generate(self, prompts: list[Prompt]) -> list[Generation]:
        if not prompts:
            return []
        self.probe()
        if len(prompts) == 1:
            return [self._request(prompts[0])]
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts)),
                                  thread_name_prefix=f"mmretrieve-{self.what}-endpoint")
        try:
            futures = [pool.submit(self._request, p) for p in prompts]
            out = [f.result() for f in futures]
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return out


__all__ = ["EndpointGenerator", "EndpointError", "encode_image", "PROBE_TIMEOUT", "MAX_WAIT"]
