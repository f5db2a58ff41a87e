"""Queries and their coarse stage.

A ``Query`` is a text, an image (or a video), or both (a *composed* query: a reference image plus a
modification text). How a composed query's two sides make the coarse ranking is a named **coarse
strategy** (``FUSIONS``, listed by ``list_fusions()``):

- vector fusions, which make one query vector and search once:
  ``sum`` = ``normalize(normalize(img) + normalize(txt))`` (the standard zero-shot baseline);
  ``weighted`` = ``normalize((1 - w) * img + w * txt)`` with text weight ``w`` (option ``weight``, 0.5);
  ``text`` / ``image``: one side only (the usual ablations);
- ``intersection``, a soft AND in the spirit of SETR: retrieve the top ``k1`` for the image and for the
  text separately, score every item of the union by both similarities, min-max normalise each over the
  union, and rank by ``min`` (``mode="min"``, default) or ``product`` of the two. Items strong on one
  side only drop, where ``sum`` lets one strong side carry them. It searches twice.

Every strategy declares its options; anything else is refused with the list of valid ones.

A strategy never searches: ``plan(vectors, k)`` returns a ``CoarsePlan`` (the query rows to search and,
for list-level strategies, how to merge their lists), and the index runs it. A query's encoded sides
travel as an explicit value, ``EncodedQuery`` (what the coarse stage and the rerankers get).

>>> strategy = coarse_strategy("weighted", {"weight": 0.7})
>>> strategy.describe()
{'fusion': 'weighted', 'weight': 0.7}
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmretrieve.config import check_options
from mmretrieve.errors import UsageError
from mmretrieve.registry import Registry


def _norm(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(n, 1e-12)


def fuse_sum(img: np.ndarray, txt: np.ndarray) -> np.ndarray:
    """normalize(normalize(img) + normalize(txt))"""
    return _norm(_norm(img) + _norm(txt))


def fuse_weighted(img: np.ndarray, txt: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """normalize((1-w)·img + w·txt), w = text weight"""
    w = float(weight)
    if not 0.0 <= w <= 1.0:
        raise UsageError(f"weighted fusion: weight must be in [0, 1], got {w}")
    return _norm((1 - w) * _norm(img) + w * _norm(txt))


def minmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.ones_like(x)


INTERSECTION_MODES = ("min", "product")


def intersection_scores(s_img: np.ndarray, s_txt: np.ndarray, mode: str = "min") -> np.ndarray:
    """Soft AND of two similarity vectors over the same candidates (min-max normalised over them)."""
    a, b = minmax(s_img), minmax(s_txt)
    if mode == "min":
        return np.minimum(a, b)
    if mode == "product":
        return a * b
    raise UsageError(f"intersection fusion: mode must be 'min' or 'product', got {mode!r}")


# ---- coarse strategies ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CoarsePlan:
    """What the index searches for a coarse ranking: every row of ``queries`` for its top ``k``. With no
    ``merge`` the plan has one row and its list is the ranking; otherwise the index gathers the stored
    vectors of the union of the lists and ``merge(union ids, their vectors)`` returns ``(ids, scores)``
    of the ranking, best first."""

    queries: np.ndarray
    k: int
    merge: Callable[..., tuple[np.ndarray, np.ndarray]] | None = None
    #: a full-text query (plain words) whose BM25 top ``k`` is a list too (``hybrid``): the union then
    #: includes its items and ``merge(union, vectors, lists)`` also gets ``lists = {"vector": [(ids,
    #: scores) per row], "text": (ids, BM25 scores)}``
    text: str | None = None

    @property
    def single(self) -> bool:
        """One vector, one top-k: what concurrent requests can share one scan for."""
        return self.merge is None and self.text is None and len(self.queries) == 1


class CoarseStrategy(ABC):
    """How a query's encoded sides become what the coarse stage searches (``plan``); the index runs the
    searches, so a strategy never sees an index."""

    name: str = ""
    #: the options this strategy takes (anything else is refused)
    option_names: tuple[str, ...] = ()

    def __init__(self, **options: Any) -> None:
        check_options(f"fusion {self.name!r}", options, self.option_names)
        self.options = dict(options)

    @abstractmethod
    def query_vector(self, vecs: dict[str, np.ndarray]) -> np.ndarray:
        """One vector for the query (what rerankers that score items against the query use)."""

    def plan(self, vecs: dict[str, np.ndarray], k: int, *, k1: int | None = None) -> CoarsePlan:
        """What to search for the top ``k``. ``k1``: the breadth of list-level strategies when their
        options do not set it (vector fusions ignore it)."""
        return CoarsePlan(np.asarray(self.query_vector(vecs), np.float32)[None], int(k))

    def describe(self) -> dict[str, Any]:
        return {"fusion": self.name, **self.options}


class SingleSide(CoarseStrategy):
    """A text, image or video query: its one vector."""

    name = "single"

    def query_vector(self, vecs):
        return vecs["image"] if "image" in vecs else vecs["text"]


class VectorFusion(CoarseStrategy):
    """A composed query's two vectors fused into one (``fn(img, txt, **options)``), searched once."""

    fn = staticmethod(fuse_sum)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.query_vector({"image": np.ones(2, np.float32), "text": np.ones(2, np.float32)})  # bad values fail now

    def query_vector(self, vecs):
        return type(self).fn(vecs["image"], vecs["text"], **self.options)


def k1_option(fusion: str, options: dict[str, Any]) -> int | None:
    """A list-level strategy's ``k1`` (the breadth of each list): a positive integer, or None (the default)."""
    k1 = options.get("k1")
    if k1 is not None and (isinstance(k1, bool) or not isinstance(k1, (int, np.integer)) or k1 < 1):
        raise UsageError(f"{fusion} fusion: k1 must be a positive integer, got {k1!r}")
    return None if k1 is None else int(k1)


class Intersection(CoarseStrategy):
    """SETR-style soft AND over the union of the image's and the text's top ``k1`` lists."""

    name = "intersection"
    option_names = ("k1", "mode")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.mode = str(options.get("mode", "min"))
        if self.mode not in INTERSECTION_MODES:
            raise UsageError(f"intersection fusion: mode must be 'min' or 'product', got {self.mode!r}")
        self.k1 = k1_option("intersection", options)

    def query_vector(self, vecs):  # rerankers that need one vector get the sum's
        return fuse_sum(vecs["image"], vecs["text"])

    def plan(self, vecs, k, *, k1=None):
        img, txt = np.asarray(vecs["image"], np.float32), np.asarray(vecs["text"], np.float32)

        def merge(union: np.ndarray, V: np.ndarray):
            s = intersection_scores(V @ img, V @ txt, mode=self.mode)
            order = np.argsort(-s, kind="stable")[:k]
            return union[order], s[order].astype(np.float32)

        return CoarsePlan(np.stack([img, txt]), self.k1 or k1 or max(4 * k, 100), merge)


HYBRID_MODES = ("rrf", "weighted")


def hybrid_scores(vec_ids, txt_ids, txt_scores, union, sims, *, mode: str = "rrf", k_rrf: float = 60,
                  weight: float = 0.5) -> np.ndarray:
    """The hybrid score of every item of ``union`` (whose vector similarities are ``sims``) from the
    vector ranking ``vec_ids`` and the BM25 ranking ``txt_ids`` / ``txt_scores`` (best first).

    ``rrf``: ``sum over the lists an item is in of 1 / (k_rrf + rank)`` (ranks from 1); a list an item
    is not in adds nothing (no penalty beyond lacking that term). ``weighted``: ``(1 - w) * minmax(sims)
    + w * minmax(bm25)`` over the union, an item that no text matched having BM25 0 (what it scores)."""
    union = np.asarray(union, np.int64)
    if mode == "rrf":
        out = np.zeros(len(union), np.float64)
        for ids in (vec_ids, txt_ids):
            rank = {int(i): r for r, i in enumerate(np.asarray(ids).tolist(), 1)}
            out += np.array([1.0 / (k_rrf + rank[i]) if i in rank else 0.0 for i in union.tolist()])
        return out
    if mode == "weighted":
        bm = dict(zip(np.asarray(txt_ids).tolist(), np.asarray(txt_scores, np.float64).tolist()))
        t = np.array([bm.get(i, 0.0) for i in union.tolist()])
        return (1 - weight) * minmax(sims) + weight * (minmax(t) if t.max() > t.min() else np.zeros_like(t))
    raise UsageError(f"hybrid fusion: mode must be 'rrf' or 'weighted', got {mode!r}")


class Hybrid(CoarseStrategy):
    """Vector ranking + BM25 full-text ranking (over captions and string metadata), fused over the union
    of both top ``k1`` lists by reciprocal-rank fusion (``mode="rrf"``, ``k_rrf`` 60) or min-max
    normalised scores (``mode="weighted"``, text ``weight`` 0.5). A text query's text is both the vector
    query and the BM25 query; a composed query searches the sum fusion's vector and the modification
    text. Ties go to the higher vector similarity, so a visually perfect match without text is not
    buried under text matches that are weak on the image side."""

    name = "hybrid"
    option_names = ("k1", "mode", "k_rrf", "weight")
    #: plans with the query's text (``plan(..., text=)``), for text queries too
    uses_text = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.mode = str(options.get("mode", "rrf"))
        if self.mode not in HYBRID_MODES:
            raise UsageError(f"hybrid fusion: mode must be 'rrf' or 'weighted', got {self.mode!r}")
        self.k_rrf = float(options.get("k_rrf", 60))
        self.weight = float(options.get("weight", 0.5))
        if not self.k_rrf >= 0 or not 0.0 <= self.weight <= 1.0:
            raise UsageError(f"hybrid fusion: k_rrf must be >= 0 and weight in [0, 1], got {self.k_rrf}, {self.weight}")
        self.k1 = k1_option("hybrid", options)

    def query_vector(self, vecs):
        if "image" in vecs and "text" in vecs:
            return fuse_sum(vecs["image"], vecs["text"])
        return _norm(vecs["image"] if "image" in vecs else vecs["text"])

    def plan(self, vecs, k, *, k1=None, text: str | None = None):
        q = np.asarray(self.query_vector(vecs), np.float32)

        def merge(union: np.ndarray, V: np.ndarray, lists: dict | None = None):
            vec_ids = np.concatenate([ids for ids, _ in lists["vector"]]) if lists else np.zeros(0, np.int64)
            txt_ids, txt_scores = lists["text"] if lists else (np.zeros(0, np.int64), np.zeros(0))
            sims = V @ q
            s = hybrid_scores(vec_ids, txt_ids, txt_scores, union, sims, mode=self.mode, k_rrf=self.k_rrf,
                              weight=self.weight)
            order = np.lexsort((-sims, -s))[:k]  # by score, ties by vector similarity
            return union[order], s[order].astype(np.float32)

        return CoarsePlan(q[None], self.k1 or k1 or max(4 * k, 100), merge, text=text)


def _vector_fusion(name: str, fn, options: tuple[str, ...] = (), doc: str = ""):
    return type(f"{name.title()}Fusion", (VectorFusion,), {"name": name, "fn": staticmethod(fn),
                                                          "option_names": options, "__doc__": doc})


FUSIONS: Registry[CoarseStrategy] = Registry("fusion")
FUSIONS.register("sum", doc="normalize(normalize(img) + normalize(txt))")(_vector_fusion("sum", fuse_sum))
FUSIONS.register("weighted", doc="normalize((1-w)·img + w·txt), w = text weight (option weight)")(
    _vector_fusion("weighted", fuse_weighted, ("weight",)))
FUSIONS.register("text", doc="text side only (ablation)")(_vector_fusion("text", lambda img, txt: _norm(txt)))
FUSIONS.register("image", doc="image side only (ablation)")(_vector_fusion("image", lambda img, txt: _norm(img)))
FUSIONS.register("intersection", doc="soft AND of image and text similarity over the union of both top lists (SETR)")(
    Intersection)
FUSIONS.register("hybrid", doc="vector ranking + BM25 full text over captions and metadata, reciprocal-rank fused "
                 "(text queries too)")(Hybrid)


def list_fusions() -> list[str]:
    return FUSIONS.names()


def coarse_strategy(fusion: str, options: dict[str, Any] | None = None) -> CoarseStrategy:
    """The named composed-query strategy with its options (unknown names or options are refused)."""
    return FUSIONS.create(fusion, **dict(options or {}))


# ---- queries --------------------------------------------------------------------------------------
@dataclass
class Query:
    """A text, an image, or both. ``text`` may be a list of phrasings: their normalised embeddings are
    averaged (e.g. FashionIQ's two captions in both orders). ``image`` is always a file (or a PIL image);
    ``item`` names an item of the index instead (an id, a key, ``id:N`` / ``key:K``), whose stored
    embedding is the visual side. ``image_id``: the visual side's id when it is itself in the index (its
    stored embedding and patches are reused instead of re-encoding; the index sets it).
    ``options`` are the fusion's (e.g. ``weight`` for ``weighted``; ``k1``, ``mode`` for ``intersection``)."""

    text: str | list[str] | None = None
    image: Any = None  # a PIL image or a path
    video: str | os.PathLike | None = None
    item: int | str | None = None
    fusion: str = "sum"
    options: dict[str, Any] = field(default_factory=dict)
    image_id: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.text, (list, tuple)):
            self.text = [str(t) for t in self.text]
            if not self.text or not all(t.strip() for t in self.text):
                raise UsageError("empty query text")
        elif self.text is not None and not str(self.text).strip():
            raise UsageError("empty query text")
        if self.text is None and self.image is None and self.video is None and self.item is None:
            raise UsageError("a query needs a text, an image, a video or an item, or one of those plus a text")
        if sum(x is not None for x in (self.image, self.video, self.item)) > 1:
            raise UsageError("a query has one of an image, a video or an item, not several")
        self.options = dict(self.options or {})
        strategy = coarse_strategy(self.fusion, self.options)  # unknown fusion or option: refused here
        if self.options and not self.kind.startswith("composed") and not self._for_text(strategy):
            raise UsageError(f"fusion options {sorted(self.options)} apply to composed queries (an image or video "
                             f"plus a text) only; this is a {self.kind} query")
        self._strategy = strategy

    def _for_text(self, strategy: CoarseStrategy) -> bool:
        """Whether a text query uses this strategy (one that plans with the query's text: ``hybrid``)."""
        return self.kind == "text" and getattr(strategy, "uses_text", False)

    @property
    def kind(self) -> str:
        visual = "video" if self.video is not None else "image" if self.image is not None or self.item is not None else None
        if visual and self.text is not None:
            return "composed" if visual == "image" else "composed-video"
        return visual or "text"

    @property
    def strategy(self) -> CoarseStrategy:
        """The coarse strategy: the fusion for composed queries, the single side otherwise."""
        if self.kind.startswith("composed") or self._for_text(self._strategy):
            return self._strategy
        return SingleSide()

    @property
    def image_path(self) -> str | None:
        return str(self.image) if isinstance(self.image, (str, Path, os.PathLike)) else None

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind}
        if self.text is not None:
            d["text"] = self.text
        if self.image is not None:
            d["image"] = self.image_path or "<PIL image>"
        if self.video is not None:
            d["video"] = str(self.video)
        if self.item is not None:
            d["item"] = self.item
        if self.kind.startswith("composed") or self._for_text(self._strategy):
            d.update(self._strategy.describe())
        return d


@dataclass(frozen=True)
class EncodedQuery:
    """A ``Query`` with its sides encoded (``{'image': (d,), 'text': (d,)}``, the ones it has): the value
    the coarse stage plans from and rerankers read. ``vector`` is the strategy's single query vector."""

    query: Query
    sides: dict[str, np.ndarray]
    #: a coarse strategy that replaces the query's own (a ``describe`` stage's: the description alone, or
    #: fused with the reference image or the modification text)
    coarse: CoarseStrategy | None = None
    #: the target description a ``describe`` stage wrote for this query (the coarse stage searched for it)
    description: str | None = None

    @property
    def strategy(self) -> CoarseStrategy:
        return self.coarse if self.coarse is not None else self.query.strategy

    @property
    def vector(self) -> np.ndarray:
        return self.strategy.query_vector(self.sides)

    @property
    def text(self) -> str | list[str] | None:
        return self.query.text

    @property
    def image(self) -> Any:
        return self.query.image

    @property
    def video(self):
        return self.query.video

    @property
    def image_id(self) -> int | None:
        return self.query.image_id

    @property
    def kind(self) -> str:
        return self.query.kind

    def plan(self, k: int, *, k1: int | None = None) -> CoarsePlan:
        if getattr(self.strategy, "uses_text", False):  # hybrid: the query's text (a composed query's modification)
            text = self.text if isinstance(self.text, str) or self.text is None else " ".join(self.text)
            return self.strategy.plan(self.sides, k, k1=k1, text=text)
        return self.strategy.plan(self.sides, k, k1=k1)

    def describe(self) -> dict[str, Any]:
        d = self.query.describe()
        if self.description is not None:
            d["description"] = self.description
            if self.coarse is not None:
                d.update(self.coarse.describe())
        return d


__all__ = ["Query", "EncodedQuery", "CoarsePlan", "FUSIONS", "list_fusions", "coarse_strategy", "CoarseStrategy", "VectorFusion", "Intersection",
           "Hybrid", "hybrid_scores",
           "SingleSide", "fuse_sum", "fuse_weighted", "intersection_scores", "minmax"]
