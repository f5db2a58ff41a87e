"""HTTP responses for an item's bytes read back by ``media.readback``: the sniffed type only, never run as a
page (``nosniff``, ``Content-Security-Policy: sandbox``), a download where a browser would not display it,
and single byte ranges (video seeking) served from the checked descriptor."""

from __future__ import annotations

import os
import re
import urllib.parse

import anyio
from starlette.responses import Response

#: headers every response carrying an item's bytes sends (the page's own CSP stays on the page)
ITEM_BYTES_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox",
                      "Cache-Control": "private, max-age=3600"}
_RANGE = re.compile(r"bytes=(\d*)-(\d*)\Z")
CHUNK = 1 << 20


def disposition(media) -> str:
    kind = "inline" if media.displayable else "attachment"
    return f"{kind}; filename*=UTF-8''{urllib.parse.quote(media.name)}"


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end)`` inclusive of one ``Range: bytes=a-b`` (or ``a-``, ``-n``); None for no header, or
    one this server does not honour (several ranges: the whole file is sent); ``ValueError`` when
    unsatisfiable."""
    if not header:
        return None
    m = _RANGE.match(header.strip())
    if m is None:
        return None
    a, b = m.groups()
    if not a and not b:
        return None
    if not a:  # the last n bytes
        n = int(b)
        if n == 0:
            raise ValueError("empty suffix range")
        return max(size - n, 0), size - 1
    start, end = int(a), (int(b) if b else size - 1)
    if start >= size or end < start:
        raise ValueError("range outside the file")
    return start, min(end, size - 1)


class FdResponse(Response):
    """The bytes ``[start, end]`` of an open descriptor, read in chunks off the event loop; closes it."""

    def __init__(self, media, start: int, end: int, status_code: int, headers: dict) -> None:
        super().__init__(status_code=status_code, headers=headers, media_type=media.media_type)
        self.media, self.start, self.end = media, start, end
        self.headers["content-length"] = str(end - start + 1)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            if scope.get("method") == "HEAD":
                await send({"type": "http.response.body", "body": b""})
                return
            pos = self.start
            while pos <= self.end:
                chunk = await anyio.to_thread.run_sync(os.pread, self.media.fd, min(CHUNK, self.end - pos + 1), pos)
                if not chunk:
                    break
                pos += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": pos <= self.end})
            if pos <= self.end:  # the file shrank under us: end the body (the length tells the client)
                await send({"type": "http.response.body", "body": b""})
        finally:
            self.media.close()


def media_response(media, range_header: str | None) -> Response:
    """The response for an item's bytes (``IndexedMedia``), honouring one byte range."""
    headers = {**ITEM_BYTES_HEADERS, "Content-Disposition": disposition(media), "Accept-Ranges": "bytes"}
    try:
        rng = byte_range(range_header, media.size)
    except ValueError:
        media.close()
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{media.size}"})
    start, end = rng if rng is not None else (0, media.size - 1)
    status = 206 if rng is not None else 200
    if rng is not None:
        headers["Content-Range"] = f"bytes {start}-{end}/{media.size}"
    if media.data is not None:
        return Response(media.data[start:end + 1], status_code=status, media_type=media.media_type, headers=headers)
    if media.size == 0:
        media.close()
        return Response(b"", media_type=media.media_type, headers=headers)
    return FdResponse(media, start, end, status, headers)


__all__ = ["media_response", "byte_range", "ITEM_BYTES_HEADERS", "FdResponse"]
