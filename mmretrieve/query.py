"""Queries and composed-query fusion.

A ``Query`` is a text, an image, or both (a *composed* query: a reference image plus a modification
text). Composed queries are fused by a named strategy:

- ``sum``: ``normalize(normalize(img) + normalize(txt))``, the standard zero-shot baseline;
- ``weighted``: ``normalize((1 - w) * img + w * txt)`` with text weight ``w`` (``weight``, default 0.5);
- ``text`` / ``image``: one side only (the usual ablations);
- ``intersection``: a soft AND in the spirit of SETR -- retrieve the top ``k1`` for the image and for
  the text separately, score every item of the union by both similarities, min-max normalise each over
  the union, and rank by ``min`` (``mode="min"``, default) or ``product`` of the two. Items strong on one
  side only drop, where ``sum`` lets one strong side carry them.

Vector fusions produce one query vector and search once; ``intersection`` searches twice.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmretrieve.registry import Registry

FUSIONS: Registry[Callable[..., Any]] = Registry("fusion")


@dataclass
class Query:
    """A text, an image, or both. ``text`` may be a list of phrasings: their normalised embeddings are
    averaged (e.g. FashionIQ's two captions in both orders). ``image_id``: the query image's id when it
    is itself in the index (its stored embedding and patches are reused instead of re-encoding)."""

    text: str | list[str] | None = None
    image: Image.Image | str | os.PathLike | None = None
    video: str | os.PathLike | None = None
    fusion: str = "sum"
    options: dict[str, Any] = field(default_factory=dict)
    image_id: int | None = None
    #: per-query memo of encoded vectors (filled by the index; not part of the query's identity)
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.text, (list, tuple)):
            self.text = [str(t) for t in self.text]
            if not self.text or not all(t.strip() for t in self.text):
                raise ValueError("empty query text")
        elif self.text is not None and not str(self.text).strip():
            raise ValueError("empty query text")
        if self.text is None and self.image is None and self.video is None:
            raise ValueError("a query needs a text, an image, a video, or an image/video plus a text")

    @property
    def kind(self) -> str:
        visual = "video" if self.video is not None else "image" if self.image is not None else None
        if visual and self.text is not None:
            return "composed" if visual == "image" else "composed-video"
        return visual or "text"

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
        if self.kind.startswith("composed"):
            d["fusion"] = self.fusion
            d.update({k: v for k, v in self.options.items()})
        return d


def _norm(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(n, 1e-12)


@FUSIONS.register("sum")
def fuse_sum(img: np.ndarray, txt: np.ndarray, **_: Any) -> np.ndarray:
    """normalize(normalize(img) + normalize(txt))"""
    return _norm(_norm(img) + _norm(txt))


@FUSIONS.register("weighted")
def fuse_weighted(img: np.ndarray, txt: np.ndarray, weight: float = 0.5, **_: Any) -> np.ndarray:
    """normalize((1-w)·img + w·txt), w = text weight"""
    w = float(weight)
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"weighted fusion: weight must be in [0, 1], got {w}")
    return _norm((1 - w) * _norm(img) + w * _norm(txt))


@FUSIONS.register("text")
def fuse_text(img: np.ndarray, txt: np.ndarray, **_: Any) -> np.ndarray:
    """text side only (ablation)"""
    return _norm(txt)


@FUSIONS.register("image")
def fuse_image(img: np.ndarray, txt: np.ndarray, **_: Any) -> np.ndarray:
    """image side only (ablation)"""
    return _norm(img)


@FUSIONS.register("intersection")
def fuse_intersection(*_: Any, **__: Any) -> None:
    """soft AND of image and text similarity over the union of both top lists (SETR-style)"""
    return None  # list-level: handled by intersection_scores


def list_fusions() -> list[str]:
    return FUSIONS.names()


def minmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.ones_like(x)


def intersection_scores(s_img: np.ndarray, s_txt: np.ndarray, mode: str = "min") -> np.ndarray:
    """Soft AND of two similarity vectors over the same candidates (min-max normalised over them)."""
    a, b = minmax(s_img), minmax(s_txt)
    if mode == "min":
        return np.minimum(a, b)
    if mode == "product":
        return a * b
    raise ValueError(f"intersection fusion: mode must be 'min' or 'product', got {mode!r}")
