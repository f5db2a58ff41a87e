"""The rerank stages: coarse top K1 -> reranker -> top K2 -> next reranker -> results.

A ``Pipeline`` holds the stages; the search path (``mmretrieve.index.search.run``) runs the coarse
search and hands its ranking to ``Pipeline.rerank``. Each stage re-scores the top ``k`` of the current
ranking, fuses its score with the current one (``alpha * fine + (1 - alpha) * previous``, or replaces
it with ``alpha = 1``), re-sorts that shortlist and keeps everything beyond it in its previous order.

**Scores fall with rank.** A stage's scale may differ from the tail's (P(yes) in [0, 1] against cosine
similarities): after each stage, when the best score of the untouched tail is not below the worst score
of the re-scored head, the whole tail is shifted down by the same amount so that its best sits just
below the head (its own order and gaps kept). ``hit.score`` is this final, rank-consistent score; each
stage's own score stays in ``Hit.stage_scores`` and the rank after every stage in ``Hit.stage_ranks``,
so what each reranker fixed or broke is visible.

Configured in code, from ``--rerank "emd:k=100,alpha=0.7"`` specs, or from YAML presets::

    # configs/pipelines/emd.yaml
    coarse: {k: 100}
    stages:
      - {name: emd, k: 100, alpha: 0.7, weights: apc}
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmretrieve.config import check_options, load_config, parse_spec
from mmretrieve.errors import ConfigNotFoundError, RerankError, UsageError
from mmretrieve.rerank.base import Reranker, create_reranker


@dataclass
class StageResult:
    """One stage's output over a ranking: the new order and scores, the stage's own (fine) score of
    each item it re-scored, per-item extras (e.g. a video's best moment) and its time."""

    label: str
    ids: np.ndarray
    scores: np.ndarray
    fine: dict[int, float] = field(default_factory=dict)
    extra: dict[int, dict[str, Any]] = field(default_factory=dict)
    ms: float = 0.0
    #: what the stage reports about the query (``RerankOutput.info``: a generative stage's cost, reasoning)
    info: dict[str, Any] = field(default_factory=dict)


class Pipeline:
    def __init__(self, stages: Sequence[Reranker] = (), *, coarse_k: int | None = None, coarse_fusion: str | None = None,
                 describe=None) -> None:
        self.stages = list(stages)
        #: the query-side ``describe`` stage (``rerank.describe.Describer``): a model writes the target and
        #: the coarse stage searches for it; None: the query as given
        self.describer = describe
        self.coarse_k = coarse_k
        #: the composed fusion this pipeline was designed for (e.g. SETR: intersection); used when the
        #: caller does not choose one
        self.coarse_fusion = coarse_fusion
        self.labels = []
        seen: dict[str, int] = {}
        for st in self.stages:
            seen[st.name] = seen.get(st.name, 0) + 1
            self.labels.append(st.name if seen[st.name] == 1 else f"{st.name}#{seen[st.name]}")

    @classmethod
    def from_specs(cls, specs: Sequence[str] | str, *, coarse_k: int | None = None, describe=None) -> Pipeline:
        """``["emd:k=100,alpha=0.7", "mllm:k=20"]`` (a single string may hold several specs separated by '|');
        ``describe``: a describe spec (``"mllm:model=DIR,fuse=image"``) or options."""
        if isinstance(specs, str):
            specs = [s for s in specs.split("|") if s.strip()]
        stages = []
        for spec in specs:
            name, opts = parse_spec(spec)
            stages.append(create_reranker(name, **opts))
        return cls(stages, coarse_k=coarse_k, describe=_describer(describe))

    @classmethod
    def from_config(cls, cfg: str | dict, *, vlm: dict | None = None) -> Pipeline:
        """A preset name (``configs/pipelines/<name>.yaml``), a YAML path, or an already-loaded dict.
        ``vlm``: the model every generative stage uses instead of the preset's (``{"model": DIR}`` or
        ``{"api": URL, "api_model": NAME, "api_key_env": VAR}``; see ``with_vlm``)."""
        if not isinstance(cfg, dict):
            name = str(cfg)
            try:
                cfg = load_config(name)
            except ConfigNotFoundError:
                cfg = load_config(f"pipelines/{name}")
        check_options("a pipeline config", cfg, ("coarse", "stages", "description", "describe", "source"), noun="key")
        if vlm:
            cfg = with_vlm(cfg, vlm)
        stages = []
        for st in cfg.get("stages") or []:
            st = dict(st)
            if "name" not in st:
                raise UsageError(f"pipeline config: a stage needs a 'name', got {st}")
            stages.append(create_reranker(st.pop("name"), **st))
        coarse = cfg.get("coarse") or {}
        check_options("a pipeline's coarse stage", coarse, ("k", "fusion"))
        if coarse.get("fusion") is not None:
            from mmretrieve.query import FUSIONS

            FUSIONS.get(coarse["fusion"])
        return cls(stages, coarse_k=coarse.get("k"), coarse_fusion=coarse.get("fusion"),
                   describe=_describer(cfg.get("describe")))

    def with_describe(self, describe) -> Pipeline:
        """This pipeline with ``describe`` (a spec, options or a ``Describer``) as its query-side stage."""
        return type(self)(self.stages, coarse_k=self.coarse_k, coarse_fusion=self.coarse_fusion,
                          describe=_describer(describe))

    def config(self) -> dict[str, Any]:
        d = {"coarse": {"k": self.coarse_k, "fusion": self.coarse_fusion}, "stages": [st.config() for st in self.stages]}
        if self.describer is not None:
            d["describe"] = self.describer.config()
        return d

    def shortlist_size(self, k: int) -> int:
        """How many items the coarse stage must return for a final top ``k``."""
        return max(int(k), int(self.coarse_k or 0), max((st.k for st in self.stages), default=0))

    def rerank(self, view, query, ids: np.ndarray, scores: np.ndarray) -> Iterator[StageResult]:
        """Every stage over a coarse ranking (``view``: the index's ``IndexView``; ``query``: the
        ``EncodedQuery``); yields one ``StageResult`` per stage."""
        cur_ids, cur_scores = np.asarray(ids, dtype=np.int64), np.asarray(scores, dtype=np.float64)
        for label, st in zip(self.labels, self.stages):
            t0 = time.perf_counter()
            cur_ids, cur_scores, fine, ex, info = self.apply_stage(st, view, query, cur_ids, cur_scores)
            yield StageResult(label, cur_ids, cur_scores, fine, ex, (time.perf_counter() - t0) * 1000, info)

    @staticmethod
    def apply_stage(st: Reranker, view, query, ids: np.ndarray, scores: np.ndarray):
        """One stage over a ranking: returns (new ids, new scores, {id: fine score}, extras, query info)."""
        n = min(st.k, len(ids))
        head, rest = ids[:n], ids[n:]
        out = st.score(view, query, head, scores[:n].copy())
        fine = np.asarray(out.scores, dtype=np.float64)
        if fine.shape != (n,):
            raise RerankError(f"reranker {st.name} returned {fine.shape} scores for {n} candidates")
        fused = st.fuse(fine, scores[:n])
        order = np.argsort(-fused, kind="stable")
        new_ids = np.concatenate([head[order], rest])
        new_scores = np.concatenate([fused[order], below(scores[n:], fused[order])])
        return new_ids, new_scores, dict(zip(head.tolist(), fine.tolist())), out.extra, out.info


#: the stages that take a vision-language model (``model=`` or ``api=``)
VLM_STAGES = ("mllm", "listwise", "pairwise")
VLM_KEYS = ("model", "api", "api_model", "api_key_env")


def with_vlm(cfg: dict, vlm: dict) -> dict:
    """A pipeline config whose generative stages (and describe) use ``vlm`` (``model`` or ``api`` +
    ``api_model`` [+ ``api_key_env``]) instead of the model they name."""
    vlm = {k: v for k, v in dict(vlm).items() if v is not None}
    check_options("vlm", vlm, VLM_KEYS)
    if "api" in vlm and "model" in vlm:
        raise UsageError("give a local model or an endpoint (api=, api_model=), not both")
    if "mllm" in (s.get("name") for s in cfg.get("stages") or []) and "api" in vlm:
        raise UsageError("the mllm yes/no verifier reads the model's logits and runs a local model only (model=); "
                         "an endpoint serves the describe, listwise and pairwise stages")

    def swap(opts: dict) -> dict:
        return {**{k: v for k, v in opts.items() if k not in VLM_KEYS}, **vlm}

    out = dict(cfg)
    out["stages"] = [swap(s) if s.get("name") in VLM_STAGES else s for s in cfg.get("stages") or []]
    if isinstance(cfg.get("describe"), dict):
        out["describe"] = swap(cfg["describe"])
    return out


def pipeline_from_options(*, pipeline: str | None = None, rerank=None, describe=None, vlm: dict | None = None):
    """The ``Pipeline`` a command line or a request asks for: a preset (``pipeline``) or reranker specs
    (``rerank``), plus a ``describe`` spec, with ``vlm`` as every generative stage's model; None when
    nothing is asked."""
    vlm = {k: v for k, v in (vlm or {}).items() if v is not None}
    if pipeline and rerank:
        raise UsageError("give a pipeline preset or reranker specs, not both")
    if pipeline:
        pipe = Pipeline.from_config(pipeline, vlm=vlm)
    elif rerank or describe:
        cfg = {"stages": [dict(name=n, **o) for n, o in map(parse_spec, rerank or [])]}
        pipe = Pipeline.from_config(with_vlm(cfg, vlm) if vlm else cfg)
    else:
        if vlm:
            raise UsageError("a model for generative stages (--vlm / --vlm-api) needs a --pipeline, --rerank or --describe")
        return None
    if describe:
        d = describe
        if vlm and isinstance(describe, str):
            name, opts = parse_spec(describe)
            d = {k: v for k, v in opts.items() if k not in VLM_KEYS} | vlm
        pipe = pipe.with_describe(d)
    return pipe


def _describer(spec):
    if spec is None or spec is False:
        return None
    from mmretrieve.rerank.describe import Describer

    return spec if isinstance(spec, Describer) else Describer.from_spec(spec)


#: how far below the head's worst score a shifted tail starts (relative to the scores' magnitude)
TAIL_GAP = 1e-6


def below(tail: np.ndarray, head: np.ndarray) -> np.ndarray:
    """``tail`` shifted down so that its best is below the worst of ``head`` (unchanged when it already
    is): a ranking's scores then fall with rank across a stage's boundary."""
    tail = np.asarray(tail, dtype=np.float64)
    if not len(tail) or not len(head):
        return tail
    top, floor = float(tail.max()), float(np.min(head))
    if top < floor:
        return tail
    gap = TAIL_GAP * max(1.0, abs(floor), abs(top))
    return tail - (top - floor + gap)


def as_pipeline(p) -> Pipeline:
    if isinstance(p, Pipeline):
        return p
    if isinstance(p, Reranker):
        return Pipeline([p])
    if isinstance(p, dict):
        return Pipeline.from_config(p)
    if isinstance(p, (list, tuple)):
        return Pipeline.from_specs(list(p))
    if isinstance(p, str):
        return Pipeline.from_config(p) if is_preset(p) else Pipeline.from_specs(p)
    raise UsageError(f"cannot make a pipeline from {type(p).__name__}")


def is_preset(name: str) -> bool:
    """Whether a pipeline string names a preset (``configs/pipelines/<name>.yaml``) or a YAML file, as
    ``--pipeline`` takes it; anything else is reranker specs, as ``--rerank`` takes them. So
    ``pipeline="emd"`` is the ``emd`` preset in Python, on the command line and over HTTP alike."""
    from mmretrieve.config import list_presets

    return f"pipelines/{name}" in list_presets("pipelines") or (name.endswith((".yaml", ".yml")) and Path(name).is_file())


__all__ = ["Pipeline", "StageResult", "as_pipeline", "below", "with_vlm", "VLM_STAGES", "pipeline_from_options"]
