"""Thumbnails for HTML pages (demo contact sheet, evaluation galleries): self-contained data URIs."""

from __future__ import annotations

import base64
import io

from PIL import Image

from mmretrieve.media.images import load_image


def thumbnail_data_uri(path: str | None, size: int = 160) -> str:
    """A JPEG data URI of ``path`` (a video: its middle frame) fitted in ``size`` px; a grey square when
    the file cannot be read."""
    from mmretrieve.media.scan import media_kind

    try:
        if path and media_kind(path) == "video":
            from mmretrieve.media.video import sample_frames

            im = sample_frames(path, num_frames=1).images[0]
        else:
            im = load_image(path, draft_size=size) if path else None
    except Exception:
        im = None
    if im is None:
        im = Image.new("RGB", (size, size), (220, 220, 220))
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def thumbnail_jpeg(path: str, size: int = 256, *, quality: int = 82) -> bytes:
    """JPEG bytes of ``path`` (a video: its middle frame) fitted in ``size`` px, for HTTP thumbnails.
    Raises ``BadImageError`` / ``BadVideoError`` when the file cannot be read (the caller answers 404)."""
    from mmretrieve.media.scan import media_kind

    if media_kind(path) == "video":
        from mmretrieve.media.video import sample_frames

        im = sample_frames(path, num_frames=1).images[0]
    else:
        im = load_image(path, draft_size=size)
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def indexed_thumbnail_jpeg(media, size: int = 256, *, quality: int = 82) -> bytes:
    """JPEG bytes of an item read back by ``media.readback.open_indexed`` (a video: its middle frame, decoded
    from the checked descriptor), fitted in ``size`` px. Closes the media."""
    from mmretrieve.media.images import load_image_bytes

    try:
        if media.media_type.startswith("video/"):
            from mmretrieve.media.video import sample_frames

            im = sample_frames(media.path(), num_frames=1).images[0]
        else:
            im = load_image_bytes(media.read(), name=media.name, draft_size=size)
    finally:
        media.close()
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()
