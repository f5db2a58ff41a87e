"""Rerankers behind one front door (``create_reranker(name, **cfg)``, ``list_rerankers()``) and the
multi-stage ``Pipeline``.

>>> from mmretrieve.rerank import Pipeline, create_reranker
>>> pipe = Pipeline([create_reranker("emd", k=100, alpha=0.7)])          # doctest: +SKIP
>>> pipe = Pipeline.from_specs(["emd:k=100,weights=apc,solver=exact"])  # doctest: +SKIP
>>> idx.search(image="q.jpg", k=10, pipeline=pipe)                       # doctest: +SKIP
"""

from __future__ import annotations

import importlib

from mmretrieve.rerank.base import (
    RERANKERS,
    IndexView,
    Reranker,
    RerankOutput,
    create_reranker,
    list_rerankers,
)

_BUILTIN = ("mmretrieve.rerank.emd", "mmretrieve.rerank.frames", "mmretrieve.rerank.mllm", "mmretrieve.rerank.listwise",
            "mmretrieve.rerank.pairwise", "mmretrieve.rerank.locore")
_loaded = False


def _load_builtin() -> None:
    """Import the built-in rerankers so they register themselves (lazily: torch-heavy modules)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BUILTIN:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def __getattr__(name: str):
    if name in ("Pipeline", "StageResult"):
        from mmretrieve.rerank import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)


__all__ = ["RERANKERS", "Reranker", "RerankOutput", "IndexView", "create_reranker", "list_rerankers", "Pipeline",
           "StageResult"]
