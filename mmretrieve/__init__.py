"""mmretrieve: multimodal retrieval and re-ranking.

>>> import mmretrieve as mr
>>> report = mr.build_index("photos", "~/Pictures")              # doctest: +SKIP
>>> idx = mr.open_index("photos")                                # doctest: +SKIP
>>> for hit in idx.search(text="a photo of a cat", k=5):         # doctest: +SKIP
...     print(hit.rank, round(hit.score, 3), hit.key)

The names below are loaded on first use, so ``import mmretrieve`` (and the command line's ``--help``)
stays fast and imports neither torch nor FAISS. Errors: ``mmretrieve.errors`` (all exported here).
"""

from __future__ import annotations

import logging
import os

from mmretrieve.errors import *  # noqa: F403 - the hierarchy is part of the public API
from mmretrieve.errors import __all__ as _error_names
from mmretrieve.registry import lazy_exports

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # decoder workers fork after tokenizers ran

__version__ = "0.1.0"

logging.getLogger("mmretrieve").addHandler(logging.NullHandler())

#: public name -> the module that defines it (imported on first access)
_LAZY = {
    "Encoder": "mmretrieve.encoders",
    "create_encoder": "mmretrieve.encoders",
    "list_encoders": "mmretrieve.encoders",
    "Index": "mmretrieve.index",
    "open_index": "mmretrieve.index",
    "build_index": "mmretrieve.ingest",
    "add_to_index": "mmretrieve.ingest",
    "remove_from_index": "mmretrieve.ingest",
    "IngestReport": "mmretrieve.ingest",
    "import_embeddings": "mmretrieve.ingest",
    "add_vectors": "mmretrieve.ingest",
    "compact_index": "mmretrieve.store",
    "rollback_index": "mmretrieve.store",
    "verify_index": "mmretrieve.store",
    "index_versions": "mmretrieve.store",
    "Query": "mmretrieve.query",
    "list_fusions": "mmretrieve.query",
    "Hit": "mmretrieve.results",
    "SearchResults": "mmretrieve.results",
    "Pipeline": "mmretrieve.rerank",
    "create_reranker": "mmretrieve.rerank",
    "list_rerankers": "mmretrieve.rerank",
    "load_dataset": "mmretrieve.eval",
    "evaluate": "mmretrieve.eval",
}


__getattr__ = lazy_exports("mmretrieve", _LAZY, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["__version__", *_LAZY, *_error_names]
