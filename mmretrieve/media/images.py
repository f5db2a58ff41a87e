"""Safe image loading.

Every image that enters mmretrieve goes through ``load_image``:

- only formats on an allowlist are opened (``Image.open(formats=...)``), so EPS, FITS, PSD and other
  parsers with a history of vulnerabilities are never reached, even when such a file is renamed ``.png``;
- decompression bombs are refused both above Pillow's hard limit and between 1x and 2x of it (Pillow
  only *warns* there; we turn the warning into an error);
- the whole image is decoded (``load()``), so a truncated file fails here rather than later, and
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left ``False``;
- EXIF orientation is applied and transparency is composited on white, giving plain RGB.

Failures raise ``BadImageError`` with the file and a short reason; ingestion records them and moves on.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageOps

from mmretrieve.errors import BadImageError

#: formats opened by default (Pillow format names)
DEFAULT_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")
#: Pillow's default pixel limit (about 89.5 megapixels); images above it are refused
DEFAULT_MAX_PIXELS: int = 89_478_485
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)


def load_image(
    path: str | os.PathLike,
    *,
    formats: tuple[str, ...] | list[str] | None = DEFAULT_FORMATS,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = (255, 255, 255),
    draft_size: int | None = None,
) -> Image.Image:
    """Open, validate and fully decode an image file into an RGB ``PIL.Image``.

    ``draft_size``: the caller only needs an image whose short side is at least this many pixels;
    JPEGs are then decoded at a reduced DCT scale (much faster for large photos).

    >>> load_image("/nonexistent.jpg")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    BadImageError: /nonexistent.jpg: file not found
    """
    p = Path(path)
    member = _shard_member(str(path))  # the uri decides: `<shard>.tar#<member>` is a member, never a file so named
    if member is not None:  # an image inside a webdataset / parquet shard
        return load_image_bytes(member, name=str(path), formats=formats, max_pixels=max_pixels,
                                background=background, draft_size=draft_size)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise BadImageError(p, "file not found") from None
    except OSError as e:
        raise BadImageError(p, f"cannot stat file: {e.strerror or e}") from None
    if not p.is_file():
        raise BadImageError(p, "not a regular file")
    if size == 0:
        raise BadImageError(p, "empty file (0 bytes)")
    try:
        with open(p, "rb") as fh:
            im = _open_checked(fh, formats, max_pixels, p, draft_size)
            return to_rgb(im, background)
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:
        raise BadImageError(p, f"decompression bomb: {e}") from None
    except Image.DecompressionBombWarning as e:
        raise BadImageError(p, f"decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        allowed = ", ".join(formats) if formats else "any"
        raise BadImageError(p, f"not an image, or a format outside the allowlist ({allowed})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower() or isinstance(e, EOFError):
            raise BadImageError(p, f"truncated or corrupt image data: {msg}") from None
        raise BadImageError(p, f"cannot decode image: {msg}") from None
    except MemoryError:
        raise BadImageError(p, "out of memory while decoding") from None


def _shard_member(uri: str) -> bytes | None:
    """The bytes of a shard member uri (``<shard>.tar#<member>``), None when ``uri`` is not one; a member
    that cannot be read is a ``BadImageError`` naming it."""
    from mmretrieve.media.shards import read_member, split_member_uri

    if split_member_uri(uri) is None:
        return None
    try:
        return read_member(uri)
    except FileNotFoundError as e:
        raise BadImageError(uri, f"not found in its shard: {e}") from None
    except OSError as e:
        raise BadImageError(uri, f"cannot read its shard: {e}") from None


def pixel_limit(max_pixels: int | None) -> int | None:
    """The pixel cap applied: ``max_pixels``, and never above Pillow's own bomb threshold (what Pillow only
    warns about is refused here, by this check, without changing the process's warnings filters)."""
    caps = [c for c in (max_pixels, Image.MAX_IMAGE_PIXELS) if c]
    return min(caps) if caps else None


def _open_checked(fh, formats, max_pixels, p: Path, draft_size: int | None = None) -> Image.Image:
    im = Image.open(fh, formats=list(formats) if formats else None)
    w, h = im.size
    if w <= 0 or h <= 0:
        raise BadImageError(p, f"invalid image size {w}x{h}")
    max_pixels = pixel_limit(max_pixels)
    if max_pixels is not None and w * h > max_pixels:
        raise BadImageError(p, f"decompression bomb: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)  # first frame of animations / multi-page files
    if draft_size and im.format == "JPEG":
        im.draft("RGB", (draft_size, draft_size))
    im.load()
    return im


def to_rgb(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Apply EXIF orientation and composite any transparency on ``background``; return RGB."""
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # broken EXIF must not lose the image
        pass
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):  # I;16, I;16B (big-endian), I;16L, I;16N
        # 16-bit / float greyscale: scale to 8 bits instead of clipping
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.astype("uint8")).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def load_image_bytes(
    data: bytes,
    *,
    name: str = "upload",
    formats: tuple[str, ...] | list[str] | None = DEFAULT_FORMATS,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = (255, 255, 255),
    draft_size: int | None = None,
) -> Image.Image:
    """``load_image`` for an image held in memory (an HTTP upload): the same allowlist, bomb limits,
    full decode and RGB conversion. ``name`` stands for the file in error messages.

    >>> load_image_bytes(b"")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    BadImageError: upload: empty file (0 bytes)
    """
    import io

    if not data:
        raise BadImageError(name, "empty file (0 bytes)")
    try:
        im = _open_checked(io.BytesIO(data), formats, max_pixels, Path(name), draft_size)
        return to_rgb(im, background)
    except BadImageError as e:
        raise BadImageError(name, e.reason) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(name, f"decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        allowed = ", ".join(formats) if formats else "any"
        raise BadImageError(name, f"not an image, or a format outside the allowlist ({allowed})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower() or isinstance(e, EOFError):
            raise BadImageError(name, f"truncated or corrupt image data: {msg}") from None
        raise BadImageError(name, f"cannot decode image: {msg}") from None
    except MemoryError:
        raise BadImageError(name, "out of memory while decoding") from None
