"""One generation backend for every generative stage (``describe``, ``listwise``, ``pairwise``).

A stage builds ``Prompt`` s (the user turn's parts, texts and images in order) and asks a
``Generator`` for their answers. Two generators, one interface:

- ``LocalGenerator``: any image-text-to-text model that ``AutoProcessor`` + ``AutoModelForImageTextToText``
  load (``vlm.load_vlm``: one copy per process for every stage and request naming it); prompts go through
  the processor's chat template and are generated in batches of ``batch_size`` with left padding,
  greedy unless ``temperature > 0``, at most ``max_new_tokens``.
- ``EndpointGenerator`` (``rerank.endpoint``): an OpenAI-compatible ``/v1/chat/completions`` server
  (vLLM, SGLang, a hosted model), images sent as base64 data URIs.

Every answer goes through the on-disk ``GenerationCache`` first, keyed by the generator's identity,
the stage's template, the prompt's parts (texts; images by their pixels) and the generation options:
a re-run, a second fusion or a resumed evaluation generates nothing it has generated before. Each call
returns its ``Cost`` (prompts, cache hits, prompt and generated tokens, seconds), which the stages
report per query and the pipeline sums per stage.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image

from mmretrieve.errors import MLLMError, UsageError
from mmretrieve.rerank.gencache import Generation, GenerationCache, cache_key, fingerprint

log = logging.getLogger(__name__)


@dataclass
class Prompt:
    """One user turn: ``parts`` in order, each a text or a PIL image."""

    parts: list[str | Image.Image]

    @property
    def images(self) -> list[Image.Image]:
        return [p for p in self.parts if isinstance(p, Image.Image)]

    def fingerprints(self) -> list[str]:
        """What the cache key sees of the prompt: each text, and each image's pixels (mode, size, bytes)."""
        out = []
        for p in self.parts:
            if isinstance(p, Image.Image):
                h = hashlib.sha256(f"{p.mode}{p.size}".encode())
                h.update(p.tobytes())
                out.append("img:" + h.hexdigest())
            else:
                out.append("txt:" + fingerprint(str(p)))
        return out


@dataclass
class Cost:
    """What a stage's generations cost: prompts asked, answered from the cache, tokens and seconds
    (generation time of the answers not cached; cached ones cost nothing here)."""

    prompts: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    #: answers the stage could not read (kept their previous order); set by the stage
    unparsed: int = 0

    def add(self, other: Cost) -> Cost:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["seconds"] = round(d["seconds"], 4)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cost:
        return cls(**{k: d.get(k, 0) for k in cls.__dataclass_fields__})


_CACHES: dict[str, GenerationCache] = {}
_CACHE_LOCK = threading.Lock()


def shared_cache(path=None) -> GenerationCache:
    """One ``GenerationCache`` per file per process (default ``settings.generation_cache_path()``)."""
    from mmretrieve import settings

    p = str(path) if path is not None else str(settings.generation_cache_path())
    with _CACHE_LOCK:
        if p not in _CACHES:
            _CACHES[p] = GenerationCache(p)
        return _CACHES[p]


def folder_identity(path: str) -> str:
    """A model or adapter folder's identity for cache keys: its real path and its weight and config files'
    sizes and times (weights replaced in place, e.g. an adapter retrained into the same folder: a new
    key); a hub id or a file is itself."""
    import os

    from mmretrieve.encoders.base import stat_files

    if not os.path.isdir(path):
        return path
    files = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin", ".json")))
    stats = [(os.path.basename(p), size, mtime) for p, size, mtime in stat_files(os.path.join(path, f) for f in files)]
    return f"{os.path.realpath(path)}|{fingerprint(repr(stats))[:16]}"


class Generator(ABC):
    """Answers prompts (through the shared cache). Subclasses implement ``_generate``."""

    def __init__(self, *, max_new_tokens: int = 256, temperature: float = 0.0, cache: bool | str = True) -> None:
        if int(max_new_tokens) < 1:
            raise UsageError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if float(temperature) < 0:
            raise UsageError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.cache = None if cache is False else shared_cache(None if cache is True else cache)

    @property
    @abstractmethod
    def identity(self) -> str:
        """What names this model in cache keys (a local folder's path and weights, or endpoint + model)."""

    def options(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature}

    def generate(self, prompts: Sequence[Prompt], *, template: str) -> tuple[list[str], Cost]:
        """The answers to ``prompts`` (cached ones from the cache, the rest generated in one go) and
        what they cost. ``template``: the stage's prompt template (part of the cache key)."""
        cost = Cost(prompts=len(prompts))
        cache = self.cache if self.temperature == 0 else None  # sampled answers are neither read nor kept
        options = self.options()
        keys = [cache_key(self.identity, template, p.fingerprints(), options) for p in prompts]
        answers: list[str | None] = [None] * len(prompts)
        todo = []
        for i, key in enumerate(keys):
            got = cache.get(key) if cache is not None else None
            if got is not None:
                answers[i] = got.text
                cost.cache_hits += 1
            else:
                todo.append(i)
        step = max(1, self.chunk_size())
        for s in range(0, len(todo), step):  # each chunk's answers are cached as they come: a crash loses one chunk
            chunk = todo[s : s + step]
            for i, g in zip(chunk, self._generate([prompts[i] for i in chunk])):
                answers[i] = g.text
                cost.prompt_tokens += g.prompt_tokens
                cost.generated_tokens += g.generated_tokens
                cost.seconds += g.seconds
                if cache is not None:
                    cache.put(keys[i], g)
        return [a or "" for a in answers], cost

    def chunk_size(self) -> int:
        """How many prompts one ``_generate`` call gets (a local model's batch, an endpoint's requests in
        flight at once)."""
        return 8

    @abstractmethod
    def _generate(self, prompts: list[Prompt]) -> list[Generation]:
        """Generate an answer per prompt (no cache)."""


class LocalGenerator(Generator):
    """A local (or hub) image-text-to-text model; see the module docstring."""

    def __init__(self, model: str, *, adapter: str | None = None, dtype: str = "auto", device: str | None = None,
                 batch_size: int = 4, processor_kwargs: dict | None = None, trust_remote_code: bool = False,
                 what: str = "generate", **kw: Any) -> None:
        super().__init__(**kw)
        if int(batch_size) < 1:
            raise UsageError(f"{what}: batch_size must be >= 1, got {batch_size}")
        self.model, self.adapter, self.dtype, self.device = str(model), adapter, dtype, device
        self.batch_size = int(batch_size)
        self.processor_kwargs = dict(processor_kwargs or {})
        self.trust_remote_code = bool(trust_remote_code)
        self.what = what
        self._id: str | None = None

    def load(self):
        from mmretrieve.rerank.vlm import load_vlm

        return load_vlm(self.model, adapter=self.adapter, dtype=self.dtype, device=self.device,
                        trust_remote_code=self.trust_remote_code, what=self.what)

    @property
    def identity(self) -> str:
        if self._id is None:

            from mmretrieve.rerank.vlm import torch_dtype
            from mmretrieve.runtime import resolve_device

            dev = resolve_device(self.device)
            self._id = (f"local|{folder_identity(self.model)}|{folder_identity(self.adapter) if self.adapter else ''}|"
                        f"{torch_dtype(self.dtype, dev)}|{dev.type}")
        return self._id

    def options(self) -> dict[str, Any]:
        return {**super().options(), **({"processor_kwargs": self.processor_kwargs} if self.processor_kwargs else {})}

    def chunk_size(self) -> int:
        return self.batch_size

    def chat_text(self, prompt: Prompt) -> str:
        vlm = self.load()
        content = [{"type": "image"} if isinstance(p, Image.Image) else {"type": "text", "text": str(p)}
                   for p in prompt.parts]
        return vlm.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                 tokenize=False)

    def _generate(self, prompts: list[Prompt]) -> list[Generation]:
        import torch

        vlm = self.load()
        out: list[Generation] = []
        for s in range(0, len(prompts), self.batch_size):
            batch = prompts[s : s + self.batch_size]
            texts, images = [self.chat_text(p) for p in batch], [p.images for p in batch]
            t0 = time.perf_counter()
            inputs = vlm.processor(text=texts, images=images if any(images) else None, padding=True, return_tensors="pt",
                                   **self.processor_kwargs)
            self._check_context(vlm, inputs["input_ids"].shape[1])
            inputs = {k: (v.to(vlm.device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
            float_dtype = next(vlm.model.parameters()).dtype
            for k in ("pixel_values", "pixel_values_videos"):
                if k in inputs:
                    inputs[k] = inputs[k].to(float_dtype)
            tok = vlm.tokenizer
            sample = self.temperature > 0
            with torch.inference_mode():
                gen = vlm.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=sample,
                                         temperature=self.temperature if sample else None, top_p=None, top_k=None,
                                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
            new = gen[:, inputs["input_ids"].shape[1]:].cpu()
            secs = (time.perf_counter() - t0) / len(batch)
            prompt_tokens = inputs["attention_mask"].sum(1).tolist()
            stop = {t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None}
            for row, n_prompt in zip(new.tolist(), prompt_tokens):
                n = next((j for j, t in enumerate(row) if t in stop), len(row))
                text = tok.decode(row[:n], skip_special_tokens=True)
                out.append(Generation(text, int(n_prompt), n + (1 if n < len(row) else 0), secs))
        return out

    def _check_context(self, vlm, n_prompt: int) -> None:
        limit = vlm.context_length
        if limit and n_prompt + self.max_new_tokens > limit:
            raise MLLMError(
                f"{self.what}: a prompt of {n_prompt} tokens plus max_new_tokens={self.max_new_tokens} is over the context "
                f"of {self.model} ({limit} positions): show fewer candidates per prompt (window=), smaller images "
                "(max_pixels=) or generate fewer tokens")


#: the options every generative stage takes for its model (stages pass them to ``make_generator``)
GEN_OPTIONS = ("model", "adapter", "api", "api_model", "api_key_env", "dtype", "device", "batch_size", "concurrency",
               "timeout", "retries", "max_new_tokens", "temperature", "processor_kwargs", "trust_remote_code", "cache")

_GENERATORS: dict[tuple, Generator] = {}


def make_generator(*, what: str, model: str | None = None, api: str | None = None, api_model: str | None = None,
                   api_key_env: str | None = None, concurrency: int = 4, timeout: float = 120.0, retries: int = 3,
                   processor_kwargs: Any = None, cache: bool | str = True, **kw: Any) -> Generator:
    """The generator for a stage's options: ``api=`` an OpenAI-compatible endpoint, else ``model=``. One
    instance per distinct set of options per process (so stages and requests naming the same model share
    it; a local model's weights are shared further by ``load_vlm``)."""
    from mmretrieve.rerank.mllm import _parse_kwargs

    if api and model:
        raise UsageError(f"{what}: give model= (a local model) or api= (an endpoint), not both")
    if not api and not model:
        from mmretrieve.rerank.vlm import how_to

        raise MLLMError(f"{how_to(what)}; or an OpenAI-compatible endpoint: {what}:api=http://host:port/v1,api_model=NAME")
    pk = _parse_kwargs(processor_kwargs)
    if cache is True:  # the default file as it is now ($MMRETRIEVE_CACHE may change between runs of one process)
        from mmretrieve import settings

        cache = str(settings.generation_cache_path())
    key = (what, model, api, api_model, api_key_env, concurrency, timeout, retries, repr(sorted(pk.items())), str(cache),
           repr(sorted(kw.items())))
    with _CACHE_LOCK:
        if key in _GENERATORS:
            return _GENERATORS[key]
    if api:
        from mmretrieve.rerank.endpoint import EndpointGenerator

        if not api_model:
            raise UsageError(f"{what}: api= needs api_model= (the model name the endpoint serves)")
        for k in ("adapter", "dtype", "device", "batch_size", "trust_remote_code"):
            kw.pop(k, None)
        gen: Generator = EndpointGenerator(api, api_model, api_key_env=api_key_env, concurrency=concurrency,
                                           timeout=timeout, retries=retries, cache=cache, what=what, **kw)
    else:
        gen = LocalGenerator(model, processor_kwargs=pk, cache=cache, what=what, **kw)
    with _CACHE_LOCK:
        return _GENERATORS.setdefault(key, gen)


@dataclass
class GenStage:
    """The model options of a generative stage, checked once (``generator()`` builds or reuses it)."""

    what: str
    options: dict[str, Any] = field(default_factory=dict)

    def generator(self) -> Generator:
        return make_generator(what=self.what, **{k: v for k, v in self.options.items() if v is not None})

    def config(self) -> dict[str, Any]:
        """The options as reported (no secrets: an API key is only ever read from ``api_key_env``)."""
        return {k: v for k, v in self.options.items() if v is not None}


__all__ = ["Prompt", "Cost", "Generator", "LocalGenerator", "make_generator", "shared_cache", "GEN_OPTIONS", "GenStage"]
