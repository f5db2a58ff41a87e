"""The on-disk format of an index (see ``layout`` for the files and guarantees): segments (``segments``),
metadata (``meta``), the patch projection (``sidestores``), readers' leases (``leases``), file writing
with checksums (``io``), merging (``compaction``), retention and collection (``retention``),
verification (``verify``) and the one way to write a version (``IndexWriter``, from its lock (``lock``),
its row feed (``feed``) and the draft of the next version (``draft``)). Searching is the ``index``
layer's job."""

from mmretrieve.store.layout import (
    DEFAULT_FACTORY,
    MANIFEST,
    check_encoder_compat,
    default_index_dir,
    describe_manifest,
    list_versions,
    read_manifest,
    resolve_index_path,
)
from mmretrieve.store.maintenance import (
    compact_index,
    index_versions,
    repair_index,
    rollback_index,
    verify_index,
)
from mmretrieve.store.meta import Item, MetaDB, Skipped, Visibility, resolve_item
from mmretrieve.store.writer import IndexWriter, rollback

__all__ = [
    "DEFAULT_FACTORY", "MANIFEST", "IndexWriter", "Item", "MetaDB", "Skipped", "check_encoder_compat",
    "default_index_dir", "describe_manifest", "read_manifest", "resolve_index_path", "resolve_item", "rollback",
    "Visibility", "list_versions", "compact_index", "index_versions", "repair_index", "rollback_index", "verify_index",
]
