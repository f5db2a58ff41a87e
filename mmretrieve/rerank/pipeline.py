"""The multi-stage pipeline: coarse top K1 -> reranker -> top K2 -> next reranker -> results.

Each stage re-scores the top ``k`` of the current ranking, fuses its score with the current one
(``alpha * fine + (1 - alpha) * previous``, or replaces it with ``alpha = 1``), re-sorts that shortlist
and keeps everything beyond it in its previous order. The rank of every item after every stage is
recorded in the results (``Hit.stage_ranks``), so what each reranker fixed or broke is visible.

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
from typing import Any

import numpy as np

from mmretrieve.config import check_options, load_config, parse_spec, positive_int
from mmretrieve.errors import ConfigNotFoundError, RerankError, UsageError
from mmretrieve.rerank.base import Reranker, create_reranker
from mmretrieve.results import SearchResults


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


class Pipeline:
    def __init__(self, stages: Sequence[Reranker] = (), *, coarse_k: int | None = None, coarse_fusion: str | None = None) -> None:
        self.stages = list(stages)
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
    def from_specs(cls, specs: Sequence[str] | str, *, coarse_k: int | None = None) -> Pipeline:
        """``["emd:k=100,alpha=0.7", "mllm:k=20"]`` (a single string may hold several specs separated by '|')."""
        if isinstance(specs, str):
            specs = [s for s in specs.split("|") if s.strip()]
        stages = []
        for spec in specs:
            name, opts = parse_spec(spec)
            stages.append(create_reranker(name, **opts))
        return cls(stages, coarse_k=coarse_k)

    @classmethod
    def from_config(cls, cfg: str | dict) -> Pipeline:
        """A preset name (``configs/pipelines/<name>.yaml``), a YAML path, or an already-loaded dict."""
        if not isinstance(cfg, dict):
            name = str(cfg)
            try:
                cfg = load_config(name)
            except ConfigNotFoundError:
                cfg = load_config(f"pipelines/{name}")
        check_options("a pipeline config", cfg, ("coarse", "stages", "description"), noun="key")
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
        return cls(stages, coarse_k=coarse.get("k"), coarse_fusion=coarse.get("fusion"))

    def config(self) -> dict[str, Any]:
        return {"coarse": {"k": self.coarse_k, "fusion": self.coarse_fusion}, "stages": [st.config() for st in self.stages]}

    def shortlist_size(self, k: int) -> int:
        """How many items the coarse stage must return for a final top ``k``."""
        return max(int(k), int(self.coarse_k or 0), max((st.k for st in self.stages), default=0))

    def stages_from(self, index, query, ids: np.ndarray, scores: np.ndarray) -> Iterator[StageResult]:
        """Run every stage over a coarse ranking; yields one ``StageResult`` per stage."""
        cur_ids, cur_scores = np.asarray(ids, dtype=np.int64), np.asarray(scores, dtype=np.float64)
        for label, st in zip(self.labels, self.stages):
            t0 = time.perf_counter()
            cur_ids, cur_scores, fine, ex = self.apply_stage(st, index, query, cur_ids, cur_scores)
            yield StageResult(label, cur_ids, cur_scores, fine, ex, (time.perf_counter() - t0) * 1000)

    def run(self, index, query, *, k: int = 10, exclude: Sequence[int] = ()) -> SearchResults:
        """Coarse search then every stage; returns the top ``k`` with per-stage ranks and scores."""
        k = positive_int(k, "k", "Pipeline.run")
        _ = index.encoder  # load the model outside the timed stages
        t0 = time.perf_counter()
        ids, scores = index.coarse(query, self.shortlist_size(k), exclude=list(exclude))
        timings = {"coarse": (time.perf_counter() - t0) * 1000}
        order_by_stage = {"coarse": ids.copy()}
        stage_scores = {"coarse": dict(zip(ids.tolist(), np.asarray(scores, np.float64).tolist()))}
        extra: dict[int, dict] = {}
        cur_ids, cur_scores = ids, scores
        for r in self.stages_from(index, query, ids, scores):
            cur_ids, cur_scores = r.ids, r.scores
            timings[r.label] = r.ms
            order_by_stage[r.label] = cur_ids.copy()
            stage_scores[r.label] = r.fine
            for i, d in r.extra.items():
                extra.setdefault(int(i), {}).update(d)
        return index.hydrate(
            {**query.describe(), "pipeline": [st.config() for st in self.stages]},
            cur_ids[:k], cur_scores[:k], stages=order_by_stage, stage_scores=stage_scores, extra=extra, timings=timings,
        )

    @staticmethod
    def apply_stage(st: Reranker, index, query, ids: np.ndarray, scores: np.ndarray):
        """One stage over a ranking: returns (new ids, new scores, {id: fine score}, extras)."""
        n = min(st.k, len(ids))
        head, rest = ids[:n], ids[n:]
        out = st.score(index, query, head)
        fine = np.asarray(out.scores, dtype=np.float64)
        if fine.shape != (n,):
            raise RerankError(f"reranker {st.name} returned {fine.shape} scores for {n} candidates")
        fused = st.fuse(fine, scores[:n])
        order = np.argsort(-fused, kind="stable")
        new_ids = np.concatenate([head[order], rest])
        new_scores = np.concatenate([fused[order], scores[n:]])
        return new_ids, new_scores, dict(zip(head.tolist(), fine.tolist())), out.extra


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
        return Pipeline.from_specs(p) if ":" in p or p in _names() else Pipeline.from_config(p)
    raise UsageError(f"cannot make a pipeline from {type(p).__name__}")


def _names() -> list[str]:
    from mmretrieve.rerank.base import list_rerankers

    return list_rerankers()


__all__ = ["Pipeline", "StageResult", "as_pipeline"]
