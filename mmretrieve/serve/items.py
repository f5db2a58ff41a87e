"""Items of the served snapshots and their files: lookups by id, thumbnails (a bounded in-memory cache)
and the indexed bytes, read back only as indexed (``media.readback``: no symlink followed, the size and
mtime fingerprint checked)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from mmretrieve.errors import ItemNotFoundError, UsageError
from mmretrieve.lru import LRU

THUMB_SIZES = (64, 128, 160, 256, 384, 512)


def has_file(item) -> bool:
    """Whether an item's uri is a file on this machine, or a member of a shard that is (not e.g.
    ``vec://3``)."""
    from mmretrieve.media.shards import split_member_uri

    uri = str(item.uri)
    if "://" in uri:
        return False
    if Path(uri).is_file():
        return True
    member = split_member_uri(uri)
    return member is not None and member[0].is_file()


class ItemFiles:
    """Item lookups and their files over an ``IndexManager``'s snapshots."""

    def __init__(self, manager, cache_size: int) -> None:
        self.manager = manager
        self.cache_size = int(cache_size)
        self._thumbs: LRU[bytes] = LRU(self.cache_size)

    def item(self, name: str, item_id: int):
        """(snapshot, item) for this id in the served snapshot (ids only: no keys, no paths)."""
        idx = self.manager.get(name).index
        it = idx.items([int(item_id)]).get(int(item_id))
        if it is None:
            raise ItemNotFoundError(f"no item with id {item_id} in index {name!r}")
        return idx, it

    def thumbnail(self, name: str, item_id: int, size: int = 256) -> tuple[bytes, str]:
        """(JPEG bytes, ETag) of an item's thumbnail, made from the bytes that were indexed only."""
        from mmretrieve.media.readback import open_indexed
        from mmretrieve.media.thumbs import indexed_thumbnail_jpeg

        if size not in THUMB_SIZES:
            raise UsageError(f"thumbnail size must be one of {', '.join(map(str, THUMB_SIZES))}, got {size}")
        _, it = self.item(name, item_id)
        if not has_file(it):
            raise ItemNotFoundError(f"item {item_id} of index {name!r} has no media file to show")
        media = open_indexed(it)  # checked on every call: a cached thumbnail of a file changed since is not shown
        key = (name, it.id, it.uri, it.size, it.mtime, size)
        etag = '"t' + hashlib.sha1(repr(key).encode()).hexdigest()[:16] + '"'
        data = self._thumbs.get(key)
        if data is not None:
            media.close()
            return data, etag
        try:
            data = indexed_thumbnail_jpeg(media, size)
        except Exception as e:  # an indexed file that went bad since: not found, not a 500
            raise ItemNotFoundError(f"item {item_id} of index {name!r}: its file cannot be shown ({type(e).__name__})") from None
        return self._thumbs.put(key, data), etag

    def media(self, name: str, item_id: int):
        """An indexed item's bytes as indexed (``media.readback.IndexedMedia``: the sniffed type, the bytes
        or a checked descriptor the response closes); ``ItemChangedError`` when the file is not what was
        indexed."""
        from mmretrieve.media.readback import open_indexed

        _, it = self.item(name, item_id)
        if not has_file(it):
            raise ItemNotFoundError(f"item {item_id} of index {name!r} has no media file")
        return open_indexed(it)


__all__ = ["ItemFiles", "THUMB_SIZES", "has_file"]
