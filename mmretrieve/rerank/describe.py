"""``describe``: a multimodal LLM writes the target, and the coarse stage searches for what it wrote.

Before the coarse search, the model sees the query (a composed query's reference image and its
modification; an image; a text) and writes one caption of the image the user wants (prompt templates in
``configs/prompts/describe.yaml``: ``target`` for composed queries, ``caption`` for images, ``expand``
for texts; ``prompt=auto`` picks by the query's kind). The index's text encoder encodes the caption,
and ``fuse`` says what the coarse stage searches:

- ``none``: the description alone (CIReVL, CoTRR's coarse stage);
- ``image``: ``normalize((1 - w) * reference + w * description)`` (F4-ITS-style, ``weight`` = w);
- ``text``: ``normalize((1 - w) * modification + w * description)``;
- ``query``: the description takes the text side's place and the query's own fusion combines it with
  the reference (``sum``, ``weighted``, ``intersection``: SETR's coarse stage over the description).

The description is reported with the results ("searched for: ..."), in ``--json``, the API and the
evaluation report. An answer with no caption in it falls back to the query's own text (counted in the
stage's cost as ``unparsed``): a random model costs quality, never a search.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np

from mmretrieve.config import check_options, load_config
from mmretrieve.errors import MLLMError, UsageError
from mmretrieve.query import CoarseStrategy, EncodedQuery, fuse_weighted
from mmretrieve.rerank.generate import GEN_OPTIONS, Cost, GenStage, Prompt

log = logging.getLogger(__name__)

FUSE = ("none", "image", "text", "query")
PROMPT_FOR_KIND = {"composed": "target", "composed-video": "target", "image": "caption", "video": "caption",
                   "text": "expand"}
MAX_CHARS = 400
_LABEL = re.compile(r"^\s*(?:\*\*)?\s*(?:target\s+)?(?:image\s+)?(?:description|caption|target)\s*(?:\*\*)?\s*[:\-]\s*",
                    re.I)


def read_description(answer: str) -> str | None:
    """The caption in a model's answer: what follows a ``Description:`` (or ``Caption:`` / ``Target:``)
    label, else the first non-empty line; quotes and markdown stripped, at most ``MAX_CHARS``."""
    if not isinstance(answer, str):
        return None
    lines = [ln.strip() for ln in answer.replace("\r", "\n").split("\n") if ln.strip()]
    labelled = [ln for ln in lines if _LABEL.match(ln)]
    line = labelled[-1] if labelled else (lines[0] if lines else "")
    text = _LABEL.sub("", line, count=1).strip(" \t\"'`*")
    if not any(ch.isalnum() for ch in text):
        return None
    return text[:MAX_CHARS]


class DescribedFusion(CoarseStrategy):
    """The coarse strategy of a described query (``fuse`` none / image / text; see the module docstring)."""

    name = "describe"

    def __init__(self, fuse: str, weight: float) -> None:
        self.fuse, self.weight = fuse, float(weight)
        self.options = {"fuse": fuse, **({"weight": self.weight} if fuse != "none" else {})}

    def query_vector(self, vecs: dict[str, np.ndarray]) -> np.ndarray:
        d = vecs["description"]
        other = vecs.get({"image": "image", "text": "text"}.get(self.fuse, ""))
        if self.fuse == "none" or other is None:
            return np.asarray(d / max(float(np.linalg.norm(d)), 1e-12), np.float32)
        return fuse_weighted(other, d, self.weight)

    def describe(self) -> dict[str, Any]:
        return {"fusion": f"describe:{self.fuse}", **({"weight": self.weight} if self.fuse != "none" else {})}


class Describer:
    """The ``describe`` stage (see the module docstring); options: ``prompt`` (auto / target / caption /
    expand, or a YAML path), ``fuse``, ``weight``, ``max_pixels`` and the model's (``GEN_OPTIONS``)."""

    name = "describe"
    OPTIONS = ("prompt", "fuse", "weight", "max_pixels", "frames", *GEN_OPTIONS)

    def __init__(self, **options: Any) -> None:
        check_options("the describe stage", options, self.OPTIONS)
        self.prompt = str(options.pop("prompt", "auto"))
        self.fuse = str(options.pop("fuse", "none"))
        if self.fuse not in FUSE:
            raise UsageError(f"describe: fuse must be one of {', '.join(FUSE)}, got {self.fuse!r}")
        self.weight = float(options.pop("weight", 0.5))
        if not 0.0 <= self.weight <= 1.0:
            raise UsageError(f"describe: weight must be in [0, 1] (the description's weight), got {self.weight}")
        mp = options.pop("max_pixels", 448 * 448)
        self.max_pixels = int(mp) if mp else None
        self.frames = int(options.pop("frames", 4))
        options.setdefault("max_new_tokens", 64)
        self.gen = GenStage("describe", options)
        self._templates = _load_templates(self.prompt)

    @classmethod
    def from_spec(cls, spec: str | dict) -> Describer:
        """``"mllm:model=DIR,fuse=image,weight=0.3"`` (CLI), or a dict of options (a preset's ``describe:``)."""
        if isinstance(spec, dict):
            return cls(**spec)
        from mmretrieve.config import parse_spec

        name, opts = parse_spec(spec)
        if name not in ("mllm", "describe"):
            raise UsageError(f"--describe takes 'mllm:model=...,prompt=target' (or 'describe:...'), got {name!r}")
        return cls(**opts)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "prompt": self.prompt, "fuse": self.fuse, "weight": self.weight,
                "max_pixels": self.max_pixels, **self.gen.config()}

    def template(self, kind: str) -> tuple[str, dict]:
        t = self._templates
        name = self.prompt if self.prompt in t else PROMPT_FOR_KIND[kind]
        if name not in t and len(t) == 1:  # a YAML file of one template: for every kind
            name = next(iter(t))
        if name not in t:
            raise MLLMError(f"describe: the prompt file has no {name!r} template (for {kind} queries)")
        return name, t[name]

    def prompt_for(self, query) -> tuple[str, Prompt]:
        from mmretrieve.rerank.vlm import item_image

        name, tpl = self.template(query.kind)
        text = self.query_text(query)
        parts: list = []
        src = query.image if query.image is not None else query.video
        for role in tpl.get("images", []):
            if role not in ("reference", "query"):
                raise MLLMError(f"describe: unknown image role {role!r} in the {name!r} template (reference or query)")
            if src is not None:
                parts.append(item_image(str(src) if not hasattr(src, "convert") else src, self.max_pixels, frames=self.frames))
        parts.append(tpl["prompt"].format(text=text or ""))
        return name + ":" + tpl["prompt"], Prompt(parts)

    def describe(self, queries: list) -> tuple[list[str | None], Cost]:
        """One description per query (None: the answer held none), in one batch, and what it cost."""
        if not queries:
            return [], Cost()
        built = [self.prompt_for(q) for q in queries]
        gen = self.gen.generator()
        cost = Cost()
        by_template: dict[str, list[int]] = {}
        for i, (tpl, _) in enumerate(built):
            by_template.setdefault(tpl, []).append(i)
        answers = [""] * len(built)
        for tpl, idxs in by_template.items():
            got, c = gen.generate([built[i][1] for i in idxs], template=tpl)
            cost.add(c)
            for i, a in zip(idxs, got):
                answers[i] = a
        out = [read_description(a) for a in answers]
        cost.unparsed += sum(d is None for d in out)
        return out, cost

    def apply(self, encoder, query: EncodedQuery, description: str | None) -> EncodedQuery:
        """``query`` with its coarse stage searching for ``description`` (the query's text when None)."""
        return self.apply_many(encoder, [query], [description])[0]

    def apply_many(self, encoder, queries: list[EncodedQuery], descriptions: list[str | None]) -> list[EncodedQuery]:
        """``apply`` for many queries, their texts encoded in one batch."""
        texts = [d if d is not None else self.query_text(q) for q, d in zip(queries, descriptions)]
        todo = [i for i, t in enumerate(texts) if t is not None]  # none: an image query whose caption failed
        V = encoder.encode_texts([texts[i] for i in todo]) if todo else np.zeros((0, 0), np.float32)
        vec = {i: (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32) for i, v in zip(todo, V)}
        return [self._described(q, texts[i], vec[i]) if i in vec else q for i, q in enumerate(queries)]

    @staticmethod
    def query_text(query) -> str | None:
        return query.text if isinstance(query.text, str) else (query.text[0] if query.text else None)

    def _described(self, query: EncodedQuery, text: str, v: np.ndarray) -> EncodedQuery:
        if self.fuse == "query" and query.kind.startswith("composed"):
            return EncodedQuery(query.query, {**query.sides, "text": v}, description=text)
        fuse = self.fuse
        if fuse == "query":  # a text or image query has no fusion of its own: the description with its image, or alone
            fuse = "image" if query.kind in ("image", "video") else "none"
        return EncodedQuery(query.query, {**query.sides, "description": v}, DescribedFusion(fuse, self.weight),
                            description=text)


def _load_templates(prompt: str) -> dict[str, dict]:
    try:
        cfg = load_config(prompt) if prompt.endswith((".yaml", ".yml")) else load_config("prompts/describe")
    except FileNotFoundError:
        raise MLLMError(f"describe: prompt file {prompt!r} not found") from None
    if not isinstance(cfg, dict) or not all(isinstance(v, dict) and "prompt" in v for v in cfg.values()):
        raise MLLMError(f"describe: prompt file {prompt!r}: every entry needs a 'prompt' (and optional 'images')")
    if prompt not in ("auto", *cfg) and not prompt.endswith((".yaml", ".yml")):
        raise UsageError(f"describe: prompt must be auto, {', '.join(cfg)} or a YAML path, got {prompt!r}")
    return cfg


__all__ = ["Describer", "DescribedFusion", "read_description", "FUSE"]
