"""The reranker interface: ``score(index, query, ids) -> RerankOutput`` over a shortlist.

A reranker only scores; the ``Pipeline`` decides which items it sees (the top ``k`` of the previous
stage), fuses its score with the previous one (``alpha * fine + (1 - alpha) * previous``; ``alpha=1``
replaces) and keeps every item beyond the shortlist in its previous order.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmretrieve.registry import Registry


@dataclass
class RerankOutput:
    """Fine scores for the candidate ids, in the order they were given, plus per-id extras."""

    scores: np.ndarray
    extra: dict[int, dict[str, Any]] = field(default_factory=dict)


NORMS = ("none", "minmax", "zscore")


def normalize_scores(x: np.ndarray, how: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if how == "none" or len(x) == 0:
        return x
    if how == "minmax":
        lo, hi = x.min(), x.max()
        return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    if how == "zscore":
        sd = x.std()
        return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)
    raise ValueError(f"unknown score normalisation {how!r}; expected one of {', '.join(NORMS)}")


class Reranker(ABC):
    """Base class. Subclasses declare their options as keyword arguments of ``__init__``."""

    name: str = "reranker"

    def __init__(self, *, k: int = 100, alpha: float | None = 0.5, norm: str = "none") -> None:
        if int(k) < 1:
            raise ValueError(f"{self.name}: k must be >= 1, got {k}")
        if alpha is not None and not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"{self.name}: alpha must be in [0, 1] (1 = replace the previous score), got {alpha}")
        if norm not in NORMS:
            raise ValueError(f"{self.name}: norm must be one of {', '.join(NORMS)}, got {norm!r}")
        self.k = int(k)
        self.alpha = 1.0 if alpha is None else float(alpha)
        self.norm = norm

    @abstractmethod
    def score(self, index, query, ids: np.ndarray) -> RerankOutput:
        """Fine scores of the shortlisted ``ids`` for ``query`` (higher is better)."""

    def fuse(self, fine: np.ndarray, previous: np.ndarray) -> np.ndarray:
        """``alpha * fine + (1 - alpha) * previous`` after the configured normalisation."""
        if self.alpha >= 1.0:
            return np.asarray(fine, dtype=np.float64)
        f, p = normalize_scores(fine, self.norm), normalize_scores(previous, self.norm)
        return self.alpha * f + (1.0 - self.alpha) * p

    def config(self) -> dict[str, Any]:
        """The resolved options (saved with results and reports)."""
        sig = inspect.signature(type(self).__init__)
        return {"name": self.name, **{p: getattr(self, p) for p in sig.parameters if p != "self" and hasattr(self, p)}}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({opts})"


RERANKERS: Registry[Reranker] = Registry("reranker")


def create_reranker(name: str, **cfg: Any) -> Reranker:
    """Create a reranker by registered name with its options; unknown options are a clear error.

    >>> create_reranker("emd", k=50, alpha=0.7, weights="apc")   # doctest: +SKIP
    """
    from mmretrieve.rerank import _load_builtin

    _load_builtin()
    cls = RERANKERS.get(name)
    params = _accepted_options(cls)
    unknown = sorted(set(cfg) - set(params))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} for reranker {name!r}; known: {', '.join(sorted(params))}")
    return cls(**cfg)


def _accepted_options(cls) -> set[str]:
    params: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            sig = inspect.signature(vars(klass)["__init__"])
            params |= {p for p, v in sig.parameters.items() if p != "self" and v.kind is v.KEYWORD_ONLY}
    return params


def list_rerankers() -> list[str]:
    from mmretrieve.rerank import _load_builtin

    _load_builtin()
    return RERANKERS.names()
