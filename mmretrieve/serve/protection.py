"""What keeps idle and slow clients from holding the server: a header deadline per connection (uvicorn
arms its keep-alive timer only after a first response, and a byte of a new request cancels it, so a
connection that never finishes its headers was held forever) and a minimum body rate per request.

uvicorn's own ``limit_concurrency`` is not used: it counts *connections*, so ~330 idle sockets made every
request a 503. Requests in progress are counted by the service's guard instead, with a separate, smaller
budget for requests that carry no valid token.
"""

from __future__ import annotations

import asyncio
import time

from mmretrieve.errors import SlowRequestError


def _with_header_deadline(base: type, header_timeout_s: float) -> type:
    """A subclass of a uvicorn HTTP protocol whose connections are closed when a request's headers are not
    complete ``header_timeout_s`` after the connection opened or the last response ended."""

    class HeaderDeadline(base):
        _deadline: asyncio.TimerHandle | None = None
        _timed_cycle = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and self.cycle is not self._timed_cycle:  # a request's headers are in
                self._timed_cycle = self.cycle
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this connection has the same deadline

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    HeaderDeadline.__name__ = HeaderDeadline.__qualname__ = f"HeaderDeadline{base.__name__}"
    return HeaderDeadline


def http_protocol(header_timeout_s: float) -> type:
    """uvicorn's fastest HTTP/1.1 protocol available here (httptools, else h11), with the header deadline."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # httptools not installed
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    return _with_header_deadline(base, header_timeout_s)


def rate_limited(receive, min_rate: int, grace_s: float):
    """``receive`` for one request whose body must arrive at ``min_rate`` bytes/s on average after its
    first ``grace_s`` seconds; a wait past that deadline raises ``SlowRequestError`` (answered 408)."""
    t0 = time.monotonic()
    got, done = 0, False

    async def receive_in_time():
        nonlocal got, done
        if done:  # the body is in: later waits (a response listening for the client's disconnect) are free
            return await receive()
        deadline = t0 + grace_s + got / max(min_rate, 1)
        try:
            msg = await asyncio.wait_for(receive(), timeout=max(deadline - time.monotonic(), 0.001))
        except asyncio.TimeoutError:
            raise SlowRequestError(f"the request body came slower than {min_rate} bytes/s (after {grace_s:g} s); "
                                   f"{got} bytes arrived in {time.monotonic() - t0:.1f} s") from None
        if msg.get("type") == "http.request":
            got += len(msg.get("body", b""))
            done = not msg.get("more_body", False)
        else:
            done = True
        return msg

    return receive_in_time


__all__ = ["http_protocol", "rate_limited"]
