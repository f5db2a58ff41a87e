"""The on-disk format of an index: layout and manifest (``layout``), FAISS operations (``faiss_ops``),
metadata (``meta``), patch / frame side-stores and the patch projection (``sidestores``), and the one
way to write a version (``IndexWriter``). Reading is the ``index`` layer's job."""

from mmretrieve.store.layout import (
    DEFAULT_FACTORY,
    MANIFEST,
    check_encoder_compat,
    default_index_dir,
    describe_manifest,
    read_manifest,
    resolve_index_path,
)
from mmretrieve.store.meta import Item, MetaDB, Skipped, resolve_item
from mmretrieve.store.writer import IndexWriter

__all__ = [
    "DEFAULT_FACTORY", "MANIFEST", "IndexWriter", "Item", "MetaDB", "Skipped", "check_encoder_compat",
    "default_index_dir", "describe_manifest", "read_manifest", "resolve_index_path", "resolve_item",
]
