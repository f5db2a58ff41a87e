"""The service's settings (``ServeConfig``) and the start-up rule for binding an address.

Light: imports neither FastAPI nor torch, so ``mmretrieve serve --help`` and the bind check answer at once.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import asdict, dataclass, field, fields

from mmretrieve.errors import UsageError

#: the shortest API token accepted (a guessable token on a network service is no protection)
MIN_TOKEN_CHARS = 16


@dataclass
class ServeConfig:
    """Everything ``mmretrieve serve`` can be told; the defaults are the safe ones."""

    indexes: list[str] = field(default_factory=list)
    index_dir: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    #: bearer token required on every API call (required when ``host`` is not a loopback address)
    token: str | None = None
    verify: bool = True
    #: caps on what one request may ask for
    max_upload_bytes: int = 10 << 20
    max_pixels: int = 40_000_000
    max_k: int = 1000
    max_offset: int = 10_000
    max_rerank_k: int = 200
    max_text_chars: int = 1000
    max_embed_texts: int = 64
    #: re-ranking requests: this many run at once, this many more wait; beyond that, 503 + Retry-After
    heavy_workers: int = 1
    heavy_queue: int = 8
    #: plain searches running at once (the rest wait in line); None: the available cores
    search_threads: int | None = None
    #: requests being handled at once before new ones are refused with 503
    max_in_flight: int = 256
    #: seconds one request may take before it is answered 504
    request_timeout_s: float = 30.0
    #: a connection's request line and headers must arrive within this many seconds of its first byte
    #: (or of the connection, or of the last response): idle and slow-header connections are closed
    header_timeout_s: float = 5.0
    #: a request body must keep this average rate (bytes/s) once its first ``body_grace_s`` have passed,
    #: and no single wait for more of it may exceed that grace: slower bodies are answered 408
    body_min_rate: int = 4096
    body_grace_s: float = 5.0
    #: requests being handled at once that carry no valid token (the page, its files, /session, refusals
    #: in the making), so that a flood of them leaves room for authorised requests
    max_in_flight_anonymous: int = 32
    #: origins allowed to call the API from a browser page served elsewhere (none: no CORS headers)
    cors_origins: list[str] = field(default_factory=list)
    #: concurrent query encodings go into one encoder forward (measured: see docs/serving.md)
    batching: bool = True
    #: concurrent single-vector coarse searches of one index go into one scan, for indexes of at least
    #: this many bytes of vectors: a smaller scan takes about a millisecond and a batch's thread hops
    #: cost more than it saves (measured: the demo index, 25 items, 230 req/s unbatched vs 182 batched
    #: at 8 clients; 100k x 1000-d: 69 vs 25 req/s at 32 clients)
    batch_searches: bool = True
    batch_scan_min_bytes: int = 16 << 20
    max_batch: int = 32
    #: how long the encoder thread waits for clients about to come back when recent batches were larger
    batch_window_ms: float = 10.0
    #: torch threads of the process (encoder forwards, rerankers); 1 measured faster on a 2-core machine
    #: under concurrent load: a 2-thread forward stalls whenever either thread is descheduled, and its
    #: spinning threads slow the index scans that run between forwards (docs/serving.md)
    torch_threads: int | None = 1
    #: seconds between checks for a newly published index version
    reload_interval_s: float = 1.0
    #: the vision-language model the ``mllm`` reranker may use (none: mllm is not offered)
    mllm: str | None = None
    #: a PEFT LoRA adapter folder the ``mllm`` reranker applies (e.g. from ``mmretrieve train verifier``)
    adapter: str | None = None
    #: the vision-language model of every generative stage (describe, listwise, pairwise, and mllm when
    #: ``mllm`` is not given) in presets and requests: a local folder (``vlm``), or an OpenAI-compatible
    #: endpoint (``vlm_api`` + ``vlm_api_model`` [+ ``vlm_api_key_env``, the variable holding its key]).
    #: None: presets keep the model their YAML names (usable only when that is a local folder)
    vlm: str | None = None
    vlm_api: str | None = None
    vlm_api_model: str | None = None
    vlm_api_key_env: str | None = None
    #: most candidates one generative stage (listwise, pairwise) may re-rank per request
    max_generative_k: int = 50
    thumbnail_cache: int = 2048

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServeConfig:
        data = json.loads(text)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def vlm_options(self) -> dict | None:
        """The server's model for generative stages as ``Pipeline.from_config(vlm=...)`` takes it (None: none)."""
        if self.vlm:
            return {"model": self.vlm}
        if self.vlm_api:
            return {k: v for k, v in (("api", self.vlm_api), ("api_model", self.vlm_api_model),
                                      ("api_key_env", self.vlm_api_key_env)) if v}
        return None

    def check(self) -> None:
        """Refuse settings that make no sense before anything is loaded."""
        if self.adapter and not (self.mllm or self.vlm):
            raise UsageError("serve: --adapter applies to the mllm reranker's model: give --mllm DIR (or --vlm DIR) too")
        if self.adapter and not os.path.isdir(self.adapter):
            raise UsageError(f"serve: --adapter {self.adapter}: no such folder (a PEFT adapter, e.g. OUT/adapter of "
                             "`mmretrieve train verifier`)")
        if self.vlm and self.vlm_api:
            raise UsageError("serve: give --vlm (a local model) or --vlm-api (an endpoint), not both")
        if self.vlm_api and not self.vlm_api_model:
            raise UsageError("serve: --vlm-api needs --vlm-api-model (the model name the endpoint serves)")
        if (self.vlm_api_model or self.vlm_api_key_env) and not self.vlm_api:
            raise UsageError("serve: --vlm-api-model and --vlm-api-key-env go with --vlm-api URL")
        if int(self.max_generative_k) < 1:
            raise UsageError(f"serve: max-generative-k must be at least 1, got {self.max_generative_k}")
        for name in ("max_upload_bytes", "max_pixels", "max_k", "max_rerank_k", "max_text_chars", "max_embed_texts",
                     "heavy_workers", "max_in_flight", "max_batch", "workers"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"serve: {name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_offset < 0 or self.heavy_queue < 0:
            raise UsageError("serve: max-offset and heavy-queue must be >= 0")
        if self.header_timeout_s <= 0 or self.body_grace_s <= 0 or self.body_min_rate < 1 or self.max_in_flight_anonymous < 1:
            raise UsageError("serve: the header timeout and body grace must be > 0 s, the body rate and the anonymous "
                             "in-flight cap at least 1")
        if self.request_timeout_s <= 0:
            raise UsageError(f"serve: the request timeout must be > 0 s, got {self.request_timeout_s}")
        if not 0 <= int(self.port) <= 65535:
            raise UsageError(f"serve: port must be in 0..65535, got {self.port}")
        if not self.indexes:
            raise UsageError("serve: name at least one index to serve")
        if len(set(self.indexes)) != len(self.indexes):
            raise UsageError(f"serve: an index is named twice in {self.indexes}")


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1). Any other name counts as off-loopback."""
    h = host.strip().strip("[]")
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> str:
    """The start-up rule: loopback needs nothing; any other address needs a token of at least
    ``MIN_TOKEN_CHARS`` characters. Returns the line the server prints about it."""
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise UsageError(f"serve: the API token must be at least {MIN_TOKEN_CHARS} characters long "
                         f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')")
    if is_loopback(host):
        if token:
            return f"listening on loopback ({host}); every API call needs the bearer token"
        return f"listening on loopback ({host}) only; no token needed (other machines cannot connect)"
    if not token:
        raise UsageError(f"serve: binding {host!r} exposes the service beyond this machine; give an API token "
                         "with --token or MMRETRIEVE_TOKEN (clients send 'Authorization: Bearer TOKEN')")
    return (f"listening on {host}: reachable from other machines; every API call needs the bearer token "
            "(traffic is plain HTTP: put a TLS proxy in front for anything but a trusted network)")


__all__ = ["ServeConfig", "check_bind", "is_loopback", "MIN_TOKEN_CHARS"]
