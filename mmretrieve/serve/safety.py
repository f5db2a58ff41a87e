"""What keeps a network service safe, without the web framework: the token check, upload decoding
through the ingest's safe loader, the bounded queue for heavy requests, and the re-ranking policy.

The re-ranking policy: a request names rerankers with the command line's spec strings
(``"emd:k=50,alpha=0.7"``) or a pipeline preset by name, but it may only set the options that change
scores (``k``, ``alpha``, weights, solver settings...). Options that would load another model, read a
path or change threads (``patches=``, ``model=``, ``device=``, ``threads=``...) are refused, so no
request can make the server download, read files or load models; the ``mllm`` model is the one the
server was started with, and so is the model of the generative stages (``describe``, ``listwise``,
``pairwise``: ``--vlm DIR`` or ``--vlm-api``), which replaces the model every preset's YAML names (without
it, a preset whose model is a hub id is reported as needing one; a request never sets ``model``, ``api``,
``api_key_env`` or ``cache``, and the options that multiply a request's prompts are bounded). Rerankers that hold models are created once and shared; each request gets a
shallow copy carrying its own ``k`` / ``alpha`` / ``norm``.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hmac
import math
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from mmretrieve.config import check_options, list_presets, load_config, parse_spec
from mmretrieve.errors import PayloadTooLargeError, ServiceBusyError, UsageError
from mmretrieve.lru import LRU

# ---- tokens -----------------------------------------------------------------------------------------
TOKEN_COOKIE = "mmretrieve_token"


def token_matches(expected: str | None, authorization: str | None, cookie: str | None = None) -> bool:
    """Constant-time check of ``Authorization: Bearer TOKEN`` (or the page's cookie) against the token."""
    if not expected:
        return True
    given = ""
    if authorization and authorization[:7].lower() == "bearer ":
        given = authorization[7:].strip()
    elif cookie:
        from urllib.parse import unquote

        given = unquote(cookie)
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


# ---- request bodies: JSON nesting, lone surrogates ---------------------------------------------------------
#: deepest nesting of arrays and objects a request body may have (a search request needs 3)
MAX_JSON_DEPTH = 32


def check_json_depth(raw: bytes | str, what: str = "the request body", limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON nested deeper than ``limit`` before it is parsed (a parser would recurse once per level:
    a 100k-deep list is a ``RecursionError``). One linear pass; brackets inside strings do not count."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else raw
    if "[" not in text and "{" not in text:
        return
    depth, in_str, esc = 0, False, False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                raise UsageError(f"{what}: JSON nested more than {limit} levels deep")
        elif ch in "]}":
            depth -= 1


def check_text(value, what: str = "the request body") -> None:
    """Refuse strings that cannot be encoded as UTF-8 (a lone surrogate such as ``"\\ud800"``, which JSON
    allows and every later encode would fail on), anywhere in a parsed body."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise UsageError(f"{what}: a string holds a lone UTF-16 surrogate (e.g. \\ud800), which is not text") from None
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def parse_json(raw: bytes | str, what: str = "the request body"):
    """A client's JSON, parsed within the nesting limit, with every string valid text."""
    import json

    check_json_depth(raw, what)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise UsageError(f"{what}: not valid JSON ({e})") from None
    check_text(data, what)
    return data


# ---- what a client may see of server paths ---------------------------------------------------------------
_ABS_PATH = re.compile(r"(?<![\w.:/~-])(/[^\s'\"`,;()<>|]+)")


def redact_paths(message: str) -> str:
    """``message`` with each absolute path of this machine (its first folder exists here: ``/tmp/x/a.jpg``,
    ``/home/...``) cut to its last component; URL paths such as ``/api/v1/...`` stay."""
    def one(m: re.Match) -> str:
        path = m.group(1)
        parts = [p for p in path.split("/") if p]
        if len(parts) < 2 or not os.path.isdir("/" + parts[0]):
            return path
        tail = path.rstrip("/").rsplit("/", 1)[-1]
        return tail.rstrip(".:") + path[len(path.rstrip(".:")):] if tail else path

    return _ABS_PATH.sub(one, message)


# ---- uploads ----------------------------------------------------------------------------------------
_DATA_URI = re.compile(r"^data:[\w.+-]+/[\w.+-]+(;[\w=.+-]+)*;base64,", re.I)


def decode_base64(text: str, max_bytes: int, what: str = "image") -> bytes:
    """Bytes of a base64 string or ``data:...;base64,`` URI, refused (413) before decoding when the
    result would exceed ``max_bytes``."""
    body = _DATA_URI.sub("", text.strip(), count=1)
    if len(body) * 3 // 4 > max_bytes + 3:
        raise PayloadTooLargeError(f"{what}: {len(body) * 3 // 4} bytes after base64 decoding exceeds the "
                                   f"upload limit of {max_bytes} bytes")
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{what}: not valid base64 (send the file as base64, or as a data: URI)") from None


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, draft_size: int | None = None, name: str = "upload"):
    """An uploaded image through the same safe loader as ingest (allowlist, bombs, truncation) -> RGB PIL."""
    from mmretrieve.media.images import load_image_bytes

    if len(data) > max_bytes:
        raise PayloadTooLargeError(f"{name}: {len(data)} bytes exceeds the upload limit of {max_bytes} bytes")
    return load_image_bytes(data, name=name, max_pixels=max_pixels, draft_size=draft_size)


# ---- the bounded queue of heavy requests -------------------------------------------------------------
class HeavyQueue:
    """``workers`` threads run heavy jobs; up to ``queue`` more wait. A job beyond that is refused at
    once with ``ServiceBusyError`` (503 + Retry-After) instead of piling up. A job whose request already
    timed out is dropped when its turn comes. A slot is freed when the job really ends, so a timed-out
    request cannot make room for more work than the machine can run."""

    def __init__(self, workers: int, queue: int, *, name: str = "heavy") -> None:
        self.capacity = int(workers) + int(queue)
        self.workers = int(workers)
        self._pool = ThreadPoolExecutor(max_workers=int(workers), thread_name_prefix=name)
        self._lock = threading.Lock()
        self.depth = 0
        self._avg_s = 1.0

    def reserve(self) -> None:
        """Take a slot now (before the request's image is decoded and its query encoded), or refuse."""
        with self._lock:
            if self.depth >= self.capacity:
                raise ServiceBusyError(f"the server is busy with {self.depth} re-ranking requests (at most "
                                       f"{self.capacity} run or wait); try again later", retry_after=self.retry_after())
            self.depth += 1

    def run_reserved(self, fn: Callable[[], Any], deadline: float | None = None) -> Future:
        """Run ``fn`` in a slot taken by ``reserve``; the slot is freed when it ends."""
        import time

        def job():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("dropped: its request timed out while waiting")
            t0 = time.monotonic()
            try:
                return fn()
            finally:
                self._avg_s = 0.8 * self._avg_s + 0.2 * (time.monotonic() - t0)

        fut = self._pool.submit(job)
        fut.add_done_callback(self._release)
        return fut

    def submit(self, fn: Callable[[], Any], deadline: float | None = None) -> Future:
        self.reserve()
        return self.run_reserved(fn, deadline)

    def release(self) -> None:
        """Give back a slot taken by ``reserve`` that will not run."""
        self._release(None)

    def _release(self, _fut) -> None:
        with self._lock:
            self.depth -= 1

    def retry_after(self) -> int:
        """Seconds after which a slot is likely free (the queue's length times the recent job time)."""
        return max(1, min(60, math.ceil(self._avg_s * max(1, self.depth) / max(1, self.workers))))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# ---- re-ranking policy -------------------------------------------------------------------------------
#: options a request may set, per reranker (everything else is refused)
REQUEST_OPTIONS: dict[str, tuple[str, ...]] = {
    "emd": ("k", "alpha", "norm", "weights", "solver", "reg", "max_iter", "tol"),
    "frames": ("k", "alpha", "norm", "pooling", "m"),
    "mllm": ("k", "alpha", "norm", "collage"),
    "listwise": ("k", "alpha", "norm", "window", "stride", "schedule", "r", "design", "aggregate", "shuffles", "seed"),
    "pairwise": ("k", "alpha", "norm", "strategy", "both_orders", "aggregate", "allpairs_max"),
}
#: the generative stages' request options that multiply the prompts one request costs: (least, most)
REQUEST_BOUNDS: dict[str, tuple[int, int]] = {"window": (2, 20), "stride": (1, 19), "r": (1, 4), "shuffles": (0, 2),
                                              "allpairs_max": (2, 8), "seed": (0, 2**31 - 1)}
#: the model options of a generative stage: the server's choice (``--vlm``), never a request's
_MODEL_KEYS = ("model", "api", "api_model", "api_key_env")
#: the generation options a preset may set for its generative stages (the model keys are replaced by the
#: server's ``--vlm``; without it, a preset's own local folder or endpoint is used)
_GEN_PRESET = ("prompt", "max_new_tokens", "temperature", "max_pixels", "frames", "collage", "batch_size",
               "processor_kwargs", "dtype", "timeout", "retries", "concurrency", "cache", *_MODEL_KEYS)
#: further options a server-side preset may set (presets are the operator's files, not the request's)
PRESET_OPTIONS: dict[str, tuple[str, ...]] = {
    "mllm": ("model", "batch_size", "max_pixels", "processor_kwargs", "prompt"),
    "listwise": _GEN_PRESET,
    "pairwise": _GEN_PRESET,
}
#: what a preset's ``describe:`` stage may set
DESCRIBE_OPTIONS = ("fuse", "weight", *_GEN_PRESET)
#: the keys of a pipeline preset
PRESET_KEYS = ("coarse", "stages", "description", "describe", "source")
#: the stages whose model is the server's vision-language model
GENERATIVE = ("listwise", "pairwise")
NEEDS_VLM = ("{what} needs a vision-language model: start the server with --vlm DIR (or --vlm-api URL "
             "--vlm-api-model NAME)")
#: options the server sets itself
_PER_REQUEST = ("k", "alpha", "norm")
MAX_STAGES = 4
#: shared rerankers kept per server (one per distinct option set; the least recently used dropped)
MAX_BASES = 128


class RerankPolicy:
    def __init__(self, *, max_rerank_k: int, mllm: str | None = None, vlm: dict | None = None,
                 max_generative_k: int = 50, adapter: str | None = None) -> None:
        self.max_rerank_k = int(max_rerank_k)
        #: the server's model of the generative stages ({"model": DIR} or {"api": URL, "api_model": NAME, ...})
        self.vlm = {k: v for k, v in (vlm or {}).items() if v} or None
        #: the mllm verifier's model (a local folder): --mllm, else a local --vlm
        self.mllm = mllm or (self.vlm or {}).get("model")
        #: the verifier's LoRA adapter (``serve --adapter``), applied to every mllm stage
        self.adapter = adapter
        self.max_generative_k = min(int(max_generative_k), self.max_rerank_k)
        #: option set -> (the shared reranker, its lock), least recently used dropped past MAX_BASES (a
        #: request's option values, e.g. seeds, must not grow the server's memory without bound)
        self._bases: LRU[tuple[Any, threading.Lock]] = LRU(MAX_BASES)
        #: validated rerankers by request options (building one may read a prompt file)
        self._checked: LRU[Any] = LRU(256)
        self._load_lock = threading.Lock()
        self._loaded: set[int] = set()

    # ---- what an index offers -----------------------------------------------------------------------
    def unavailable(self, name: str, index) -> str | None:
        """Why reranker ``name`` cannot run on ``index`` (None: it can)."""
        if name not in REQUEST_OPTIONS:
            return f"this server offers the rerankers {', '.join(REQUEST_OPTIONS)}, not {name!r}"
        if name == "emd" and not index.has_patches():
            return f"emd compares stored patch features; index {index.name!r} was built without --patches"
        if name == "frames" and not (index.manifest.get("video") or index.manifest.get("counts", {}).get("videos")):
            return f"frames re-ranks videos by their frames; index {index.name!r} holds no videos"
        if name == "mllm" and not self.mllm:
            return "mllm needs a vision-language model; start the server with --mllm MODEL (or --vlm DIR) to offer it"
        if name in GENERATIVE and not self.vlm:
            return NEEDS_VLM.format(what=name) + " to offer it"
        return None

    def rerankers(self, index) -> dict[str, str | None]:
        return {n: self.unavailable(n, index) for n in REQUEST_OPTIONS}

    def presets(self, index) -> dict[str, str | None]:
        """Pipeline presets -> None when usable on ``index``, else why not. Cheap: builds the stages'
        options, loads no model it does not already hold (a preset whose model is a hub id, on a server
        started without --vlm, is reported as needing one)."""
        out = {}
        for p in list_presets("pipelines"):
            name = p.split("/", 1)[1]
            try:
                self._preset_stages(name, index, load=False)
                out[name] = None
            except UsageError as e:
                out[name] = str(e)
        return out

    # ---- building a pipeline ------------------------------------------------------------------------
    def pipeline(self, index, specs: list[str] | None = None, preset: str | None = None):
        """The ``Pipeline`` for a request's ``rerank`` specs or ``pipeline`` preset, and the locks of
        its shared rerankers (held while it runs)."""
        from mmretrieve.rerank.pipeline import Pipeline

        if specs and preset:
            raise UsageError("give rerank specs or a pipeline preset, not both")
        coarse_k = coarse_fusion = describer = None
        if preset:
            stages, coarse_k, coarse_fusion, describer = self._preset_stages(preset, index)
        else:
            if len(specs or []) > MAX_STAGES:
                raise UsageError(f"at most {MAX_STAGES} rerank stages per request, got {len(specs)}")
            stages = []
            for spec in specs or []:
                if not isinstance(spec, str) or not spec.strip():
                    raise UsageError(f"a rerank spec is a string like 'emd:k=50', got {spec!r}")
                name, opts = parse_spec(spec)
                stages.append(self._stage(name, opts, index, preset=False))
        if coarse_k is not None and int(coarse_k) > self.max_rerank_k:
            coarse_k = self.max_rerank_k
        pipe = Pipeline([s for s, _ in stages], coarse_k=coarse_k, coarse_fusion=coarse_fusion,
                        describe=describer[0] if describer else None)
        locks = [lock for _, lock in stages] + ([describer[1]] if describer else [])
        return pipe, sorted({id(lock): lock for lock in locks}.items())

    def _preset_stages(self, preset: str, index, *, load: bool = True):
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", preset or ""):
            raise UsageError(f"pipeline presets are named by their name only (e.g. 'emd'), got {preset!r}")
        names = [p.split("/", 1)[1] for p in list_presets("pipelines")]
        if preset not in names:
            raise UsageError(f"no pipeline preset {preset!r}; presets: {', '.join(names) or 'none'}")
        cfg = load_config(f"pipelines/{preset}")
        check_options(f"pipeline preset {preset!r}", cfg, PRESET_KEYS, noun="key")
        coarse = cfg.get("coarse") or {}
        check_options(f"pipeline preset {preset!r}'s coarse stage", coarse, ("k", "fusion"))
        where = f"preset {preset!r}: "
        describer = None
        if cfg.get("describe") not in (None, False):
            describer = self._describer(cfg["describe"], where=where)
        stages = []
        for st in cfg.get("stages") or []:
            st = dict(st)
            name = st.pop("name", None)
            if not name:
                raise UsageError(f"pipeline preset {preset!r}: a stage needs a 'name'")
            stages.append(self._stage(name, st, index, preset=True, where=where, load=load))
        return stages, coarse.get("k"), coarse.get("fusion"), describer

    def _model(self, what: str, opts: dict, *, preset: bool, where: str) -> dict:
        """The model keys a generative stage runs with: the server's ``--vlm``; without one, a preset's own
        local folder or endpoint (a hub id would be downloaded: refused)."""
        if self.vlm:
            return dict(self.vlm)
        own = {k: opts[k] for k in _MODEL_KEYS if opts.get(k)}
        if preset and (own.get("api") or (own.get("model") and os.path.isdir(str(own["model"])))):
            return own
        named = f" (the preset names {own['model']!r}, which this server does not download)" if own.get("model") else ""
        raise UsageError(where + NEEDS_VLM.format(what=what) + named)

    def _describer(self, opts, *, where: str):
        """A preset's ``describe`` stage (shared by the requests that use it) and its lock."""
        from mmretrieve.rerank.describe import Describer

        if not isinstance(opts, dict):
            raise UsageError(f"{where}describe: takes a mapping of options, got {opts!r}")
        check_options(f"{where}the describe stage", opts, DESCRIBE_OPTIONS)
        full = {**{k: v for k, v in opts.items() if k not in _MODEL_KEYS},
                **self._model("the describe stage", opts, preset=True, where=where)}
        key = ("describe", tuple(sorted((k, repr(v)) for k, v in full.items())))
        got = self._bases.get(key)
        return got if got is not None else self._base(key, Describer(**full))  # checked there; loads no model

    def _stage(self, name: str, opts: dict, index, *, preset: bool, where: str = "", check: bool = True,
               load: bool = True):
        why = self.unavailable(name, index) if check and not (preset and name in GENERATIVE) else None
        if why:
            raise UsageError(where + why)
        allowed = REQUEST_OPTIONS[name] + (PRESET_OPTIONS.get(name, ()) if preset else ())
        check_options(f"{where}reranker {name!r} over HTTP (options that load models, read files or set threads "
                      "are the server's)", opts, allowed)
        if name == "mllm" and not preset and opts.get("model", self.mllm) != self.mllm:
            raise UsageError(f"{where}this server's mllm reranker uses {self.mllm!r}, not {opts['model']!r}")
        k = opts.get("k")
        top = self.max_generative_k if name in GENERATIVE else self.max_rerank_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= top):
            which = "a generative stage's k" if name in GENERATIVE else "k"
            raise UsageError(f"{where}{name}: {which} must be an integer in 1..{top} on this server, got {k!r}")
        if not preset:
            for opt, (lo, hi) in REQUEST_BOUNDS.items():
                v = opts.get(opt)
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi):
                    raise UsageError(f"{where}{name}: {opt} must be an integer in {lo}..{hi} on this server, got {v!r}")
        if name == "pairwise" and not preset and opts.get("strategy") == "allpairs":
            most = REQUEST_BOUNDS["allpairs_max"][1]
            if int(opts.get("k", 10)) > most:
                raise UsageError(f"{where}pairwise: strategy=allpairs asks k*(k-1) prompts; on this server it takes k <= "
                                 f"{most} (give k, or strategy=sort: O(k log k))")
        if name == "emd":
            forced = {"on_the_fly": False}
        elif name == "mllm":
            forced = {"model": self.mllm, **({"adapter": self.adapter} if self.adapter else {})}
        elif name in GENERATIVE:  # the server's model (or a preset's own local one); never a request's
            forced = self._model(name, opts, preset=preset, where=where)
            opts = {k_: v for k_, v in opts.items() if k_ not in _MODEL_KEYS}
        else:
            forced = {}
        checked = self._validated(name, {**opts, **forced})
        base_key = (name, tuple(sorted((k_, repr(v)) for k_, v in {**opts, **forced}.items() if k_ not in _PER_REQUEST)))
        base, lock = self._base(base_key, checked)
        if load and hasattr(base, "load") and id(base) not in self._loaded:  # a model-holding reranker: loaded
            with self._load_lock:                                               # once, before the copies share it
                base.load()
                self._loaded.add(id(base))
        stage = copy.copy(base)
        for attr in _PER_REQUEST:
            setattr(stage, attr, getattr(checked, attr))
        if "k" not in opts and stage.k > top:
            stage.k = top
        return stage, lock

    def _validated(self, name: str, opts: dict):
        """The reranker built from ``opts`` (types and values checked by its own constructor; cheap, no
        model is loaded). Cached, since building one may read a prompt file."""
        from mmretrieve.rerank import create_reranker

        key = (name, tuple(sorted((k, repr(v)) for k, v in opts.items())))
        return self._checked.get_or_make(key, lambda: create_reranker(name, **opts))

    def _base(self, key: tuple, checked):
        return self._bases.setdefault(key, (checked, threading.Lock()))

    def load_models(self) -> None:
        """Load the mllm model and a local --vlm now (start-up), so the first request does not pay for it."""
        if self.mllm:
            self._stage("mllm", {}, None, preset=False, check=False)
        if self.vlm and self.vlm.get("model"):
            from mmretrieve.rerank.generate import make_generator

            make_generator(what="vlm", model=self.vlm["model"]).load()

__all__ = ["parse_json", "check_json_depth", "check_text", "redact_paths", "MAX_JSON_DEPTH", "token_matches", "decode_base64", "decode_image", "HeavyQueue", "RerankPolicy", "REQUEST_OPTIONS",
           "PRESET_OPTIONS", "DESCRIBE_OPTIONS", "PRESET_KEYS", "NEEDS_VLM",
           "TOKEN_COOKIE"]
