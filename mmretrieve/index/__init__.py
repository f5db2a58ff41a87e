"""The on-disk index store (see ``mmretrieve.index.store`` for the layout and guarantees)."""

from mmretrieve.index.index import (
    Index,
    SkippedInputsError,
    add_to_index,
    build_index,
    open_index,
    remove_from_index,
)
from mmretrieve.index.meta import Item, Skipped
from mmretrieve.index.store import (
    EncoderMismatchError,
    IndexCorruptedError,
    IndexExistsError,
    IndexLockedError,
    IndexNotFoundError,
    resolve_index_path,
)

__all__ = [
    "Index", "open_index", "build_index", "add_to_index", "remove_from_index", "Item", "Skipped",
    "EncoderMismatchError", "IndexCorruptedError", "IndexExistsError", "IndexLockedError", "IndexNotFoundError",
    "resolve_index_path", "SkippedInputsError",
]
