"""Reading an indexed item's bytes back (the service's media and thumbnail routes): only what was indexed.

- **The uri decides** what is read: ``<shard>.tar#<member>`` / ``<file>.parquet#<row>`` is a shard member,
  never a plain file of that name (a file planted as ``evil.tar#x`` is not read); anything else is a file.
- **No symlink is followed** anywhere on the path: uris are real paths when indexed, so every component is
  opened with ``O_NOFOLLOW`` from the root; a file or folder replaced by a link since is refused.
- **The fingerprint must hold**: the file's (or shard's) size and mtime, and a member's size, must be the
  ones recorded when the item was indexed; otherwise ``ItemChangedError`` (the service answers 410), never
  the new bytes. The bytes come from the descriptor that was checked (no second open by name).
- **The type is sniffed from the bytes** (never guessed from the name): images of the ingest allowlist and
  the video containers the index reads; anything else is refused. ``displayable`` says whether a browser
  shows it inline (TIFF and PPM are offered as downloads).
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from mmretrieve.errors import ItemChangedError, ItemNotFoundError

#: bytes read to sniff a type (JPEG's EXIF segment may take 64 KB before the frame header)
SNIFF_BYTES = 256 << 10
#: image types browsers display inline; the others of the allowlist are sent as attachments
DISPLAYABLE = frozenset({"image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "video/mp4", "video/webm",
                         "video/quicktime", "video/x-matroska"})
_PIL_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp",
              "TIFF": "image/tiff", "PPM": "image/x-portable-anymap"}


@dataclass
class IndexedMedia:
    """An item's bytes as indexed: ``data`` (a shard member, or a file read whole) or ``fd`` (a large file,
    open and checked; the caller closes it), with the sniffed type."""

    name: str
    media_type: str
    size: int
    data: bytes | None = None
    fd: int | None = None

    @property
    def displayable(self) -> bool:
        return self.media_type in DISPLAYABLE

    def read(self) -> bytes:
        """All the bytes (closes ``fd``)."""
        if self.data is not None:
            return self.data
        try:
            return _pread_all(self.fd, self.size)
        finally:
            self.close()

    def path(self) -> str:
        """A name that opens the very file checked (``/proc/self/fd/N``: the same inode, whatever its name
        is now), for decoders that take a path; the uri's own name where /proc is not there."""
        if self.fd is None:
            raise ValueError("in-memory media has no path")
        proc = f"/proc/self/fd/{self.fd}"
        return proc if os.path.exists(proc) else self.name

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def sniff_type(head: bytes) -> str | None:
    """The media type of a file from its first bytes: an image format of the ingest allowlist (through
    Pillow's own identification, as ``load_image`` opens it) or a video container; None for anything else."""
    video = _video_type(head)
    if video is not None:
        return video
    from PIL import Image

    from mmretrieve.media.images import DEFAULT_FORMATS

    try:
        with Image.open(io.BytesIO(head), formats=list(DEFAULT_FORMATS)) as im:
            return _PIL_TYPES.get(im.format or "")
    except Exception:  # not an image of the allowlist (Pillow raises several types)
        return None


def _video_type(head: bytes) -> str | None:
    if head[4:8] == b"ftyp":
        return "video/quicktime" if head[8:10] == b"qt" else "video/mp4"
    if head.startswith(b"\x1aE\xdf\xa3"):
        return "video/webm" if b"webm" in head[:64] else "video/x-matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "video/x-msvideo"
    if head[:4] in (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3"):
        return "video/mpeg"
    return None


def open_nofollow(path: str | os.PathLike) -> int:
    """A read-only descriptor of ``path`` opened without following a symlink at any component (``ELOOP`` /
    ``ENOTDIR`` when one is a link); only regular files (a FIFO is not waited on)."""
    parts = Path(os.path.abspath(path)).parts
    fd = os.open(parts[0], os.O_RDONLY | os.O_DIRECTORY)
    try:
        for comp in parts[1:-1]:
            nxt = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
        out = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(out).st_mode):
        os.close(out)
        raise OSError(f"{path}: not a regular file")
    return out


def open_indexed(item, *, in_memory_bytes: int = 16 << 20) -> IndexedMedia:
    """The bytes of an indexed item (``uri``, ``size``, ``mtime``, ``id``), checked against its fingerprint.
    Raises ``ItemNotFoundError`` (gone, unreadable, not an image or video) or ``ItemChangedError``."""
    from mmretrieve.media.shards import split_member_uri

    uri = str(item.uri)
    member = split_member_uri(uri)
    try:
        fd = open_nofollow(member[0] if member is not None else uri)
    except FileNotFoundError:
        raise ItemNotFoundError(f"item {item.id}: its file is gone ({_name(uri)})") from None
    except OSError as e:
        raise ItemChangedError(f"item {item.id}: {_name(uri)} cannot be read as indexed (a link, or not a regular "
                               f"file now: {e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if item.mtime is not None and st.st_mtime != item.mtime:
            raise ItemChangedError(f"item {item.id}: {_name(uri)} changed since it was indexed (modified); "
                                   "run `mmretrieve index add` to index it again")
        if member is not None:
            media = _member(fd, member, item)
        else:
            media = _file(fd, uri, st, item, in_memory_bytes)
            if media.fd is not None:
                fd = None  # now the media's
        return media
    finally:
        if fd is not None:
            os.close(fd)


def _file(fd: int, uri: str, st: os.stat_result, item, in_memory_bytes: int) -> IndexedMedia:
    if item.size is not None and st.st_size != item.size:
        raise ItemChangedError(f"item {item.id}: {_name(uri)} changed since it was indexed ({item.size} bytes then, "
                               f"{st.st_size} now); run `mmretrieve index add` to index it again")
    kind = _checked_type(os.pread(fd, SNIFF_BYTES, 0), item, uri)
    if st.st_size <= in_memory_bytes and not kind.startswith("video/"):  # videos are decoded from the descriptor
        return IndexedMedia(Path(uri).name, kind, st.st_size, data=_pread_all(fd, st.st_size))
    return IndexedMedia(Path(uri).name, kind, st.st_size, fd=fd)


def _member(fd: int, member: tuple[Path, str], item) -> IndexedMedia:
    from mmretrieve.media.shards import _parquet_member, read_tar_member

    shard, name = member
    try:
        if shard.suffix.lower() == ".parquet":
            with os.fdopen(os.dup(fd), "rb") as fh:
                data = _parquet_member(shard, name, fh)
        else:
            with os.fdopen(os.dup(fd), "rb") as fh:
                data = read_tar_member(fh, shard, name)
    except FileNotFoundError as e:
        raise ItemNotFoundError(f"item {item.id}: {_name(str(e))}") from None
    if item.size is not None and len(data) != item.size:
        raise ItemChangedError(f"item {item.id}: member {name!r} of {shard.name} changed since it was indexed")
    return IndexedMedia(Path(name).name, _checked_type(data[:SNIFF_BYTES], item, f"{shard.name}#{name}"), len(data), data=data)


def _checked_type(head: bytes, item, uri: str) -> str:
    kind = sniff_type(head)
    if kind is None:
        raise ItemNotFoundError(f"item {item.id}: {_name(uri)} is not an image or a video (by its bytes); not served")
    return kind


def _pread_all(fd: int, size: int) -> bytes:
    chunks, off = [], 0
    while off < size:
        b = os.pread(fd, min(size - off, 8 << 20), off)
        if not b:
            break
        chunks.append(b)
        off += len(b)
    return b"".join(chunks)


def _name(uri: str) -> str:
    """What a client may see of a path: its last component (server paths stay on the server)."""
    return os.path.basename(uri.rstrip("/")) or uri


__all__ = ["IndexedMedia", "open_indexed", "open_nofollow", "sniff_type", "DISPLAYABLE"]
