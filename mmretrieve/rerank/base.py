"""The reranker interface: ``score(view, query, ids, scores) -> RerankOutput`` over a shortlist.

A reranker only scores; the ``Pipeline`` decides which items it sees (the top ``k`` of the previous
stage), fuses its score with the previous one (``alpha * fine + (1 - alpha) * previous``; ``alpha=1``
replaces) and keeps every item beyond the shortlist in its previous order.

A reranker sees the index through the small read interface ``IndexView`` (``Index.view``: items,
stored vectors, patches, frames, the query encoder), the ``EncodedQuery`` (``.text``, ``.image``,
``.video``, ``.image_id``, ``.kind``, the encoded ``.sides`` and the strategy's ``.vector``), the
shortlisted ids and their current scores. It never searches or hydrates: the search path
(``mmretrieve.index.search.run``) owns the order of the stages.

Options are the keyword arguments of a reranker's ``__init__``; ``create_reranker`` refuses unknown
ones and parses values by their declared types (``"100"`` -> 100 for an ``int`` option), with errors
that name the reranker and the option.
"""

from __future__ import annotations

import inspect
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from mmretrieve.config import check_options, positive_int
from mmretrieve.errors import UsageError
from mmretrieve.registry import Registry


class IndexView(Protocol):
    """What rerankers read of an index (``Index.view``, a ``mmretrieve.index.ReadView``)."""

    path: Any
    manifest: dict

    @property
    def encoder(self): ...
    def items(self, ids): ...
    def vectors(self, ids) -> np.ndarray: ...
    def patches(self, ids) -> np.ndarray: ...
    def patch_projection(self) -> np.ndarray | None: ...
    def frames_matrix(self, ids, *, as_torch: bool = False): ...
    def frame_similarities(self, E, q: np.ndarray) -> np.ndarray: ...


@dataclass
class RerankOutput:
    """Fine scores for the candidate ids, in the order they were given, plus per-id extras."""

    scores: np.ndarray
    extra: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: what the stage reports about the query as a whole (a generative stage's cost, reasoning, answers
    #: it could not read, candidates it skipped)
    info: dict[str, Any] = field(default_factory=dict)


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
    raise UsageError(f"unknown score normalisation {how!r}; expected one of {', '.join(NORMS)}")


class Reranker(ABC):
    """Base class. Subclasses declare their options as keyword arguments of ``__init__``."""

    name: str = "reranker"

    def __init__(self, *, k: int = 100, alpha: float | None = 0.5, norm: str = "none") -> None:
        k = positive_int(k, "k", self.name)
        if alpha is not None and not 0.0 <= float(alpha) <= 1.0:
            raise UsageError(f"{self.name}: alpha must be in [0, 1] (1 = replace the previous score), got {alpha}")
        if norm not in NORMS:
            raise UsageError(f"{self.name}: norm must be one of {', '.join(NORMS)}, got {norm!r}")
        self.k = int(k)
        self.alpha = 1.0 if alpha is None else float(alpha)
        self.norm = norm

    @abstractmethod
    def score(self, view: IndexView, query, ids: np.ndarray, scores: np.ndarray) -> RerankOutput:
        """Fine scores of the shortlisted ``ids`` for ``query`` (an ``EncodedQuery``), higher is better;
        ``scores`` are the shortlist's current scores (the pipeline does the fusing)."""

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
    """Create a reranker by registered name with its options; unknown options and values of the wrong
    type are clear errors.

    >>> create_reranker("emd", k=50, alpha=0.7, weights="apc")   # doctest: +SKIP
    """
    from mmretrieve.rerank import _load_builtin

    _load_builtin()
    cls = RERANKERS.get(name)
    types_ = option_types(cls)
    check_options(f"reranker {name!r}", cfg, types_)
    return cls(**{k: parse_option(name, k, v, types_[k]) for k, v in cfg.items()})


def option_types(cls) -> dict[str, Any]:
    """Keyword-only options of ``cls.__init__`` (and its bases) -> their annotated types."""
    out: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = vars(klass).get("__init__")
        if init is None:
            continue
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # an annotation that does not resolve: accept any value
            hints = {}
        for p, v in inspect.signature(init).parameters.items():
            if p != "self" and v.kind is v.KEYWORD_ONLY:
                out[p] = hints.get(p, Any)
    return out


def parse_option(reranker: str, option: str, value: Any, typ: Any) -> Any:
    """``value`` as ``typ`` (int, float, bool, str, optionally ``| None``; anything else passes as is)."""
    args = typing.get_args(typ) if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union else ()
    allowed = [a for a in args if a is not type(None)] if args else [typ]
    if value is None:
        if args and type(None) in args:
            return None
        raise UsageError(f"reranker {reranker!r}: option {option} needs a value")
    for t in allowed:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, str):
            return value
        if t is Any or t not in (bool, int, float, str):
            return value
    names = " or ".join({bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(t, str(t))
                        for t in allowed)
    raise UsageError(f"reranker {reranker!r}: option {option} must be {names}, got {value!r}")


def option_device(reranker: str, device: str | None):
    """A reranker's ``device`` option as a torch device; a bad one names the reranker and the option."""
    from mmretrieve.runtime import resolve_device

    try:
        return resolve_device(device)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"{reranker}: option device: {e}") from None


def list_rerankers() -> list[str]:
    from mmretrieve.rerank import _load_builtin

    _load_builtin()
    return RERANKERS.names()


__all__ = ["IndexView", "RerankOutput", "Reranker", "RERANKERS", "create_reranker", "list_rerankers", "normalize_scores"]
