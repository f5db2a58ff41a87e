"""Thumbnails for HTML pages (demo contact sheet, evaluation galleries): self-contained data URIs."""

from __future__ import annotations

import base64
import io

from PIL import Image

from mmretrieve.media.images import load_image


def thumbnail_data_uri(path: str | None, size: int = 160) -> str:
    """A JPEG data URI of ``path`` fitted in ``size`` px; a grey square when the file cannot be read."""
    try:
        im = load_image(path, draft_size=size) if path else None
    except Exception:
        im = None
    if im is None:
        im = Image.new("RGB", (size, size), (220, 220, 220))
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
