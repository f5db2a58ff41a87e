"""mmretrieve: multimodal retrieval and re-ranking.

>>> import mmretrieve as mr
>>> report = mr.build_index("photos", "~/Pictures")              # doctest: +SKIP
>>> idx = mr.open_index("photos")                                # doctest: +SKIP
>>> for hit in idx.search(text="a photo of a cat", k=5):         # doctest: +SKIP
...     print(hit.rank, round(hit.score, 3), hit.key)
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # decoder workers fork after tokenizers ran

__version__ = "0.1.0"

logging.getLogger("mmretrieve").addHandler(logging.NullHandler())

from mmretrieve.encoders import Encoder, create_encoder, list_encoders  # noqa: E402
from mmretrieve.index import Index, add_to_index, build_index, open_index, remove_from_index  # noqa: E402
from mmretrieve.query import Query, list_fusions  # noqa: E402
from mmretrieve.results import Hit, SearchResults  # noqa: E402

__all__ = [
    "__version__", "Encoder", "create_encoder", "list_encoders", "Index", "open_index", "build_index",
    "add_to_index", "remove_from_index", "Query", "list_fusions", "Hit", "SearchResults",
]
