"""What keeps the service up under load and abuse: admission control (503) and a request body cap (413)."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from starlette.exceptions import HTTPException

from .errors import error_json


class Saturated(RuntimeError):
    """Every admission slot is taken (and stayed taken for the whole queue timeout)."""


class Admission:
    """At most `limit` generation requests admitted at once; the rest wait `timeout_s` then get 503.

    With timeout 0 the check is a non-blocking acquire: a saturated service answers at once instead of
    piling up requests whose clients will have given up by the time they run. Create it inside the
    serving event loop (asyncio primitives bind to the loop they first wait in).
    """

    def __init__(self, limit: int, timeout_s: float):
        self.limit = limit
        self.timeout_s = timeout_s
        self._sem = asyncio.Semaphore(limit)
        self.taken = 0  # slots held now

    async def acquire(self) -> None:
        """Take one slot, or raise Saturated; the caller must `release()` it (a stream holds its slot
        until the response is sent, past the route's return)."""
        if self.timeout_s <= 0:
            if self._sem.locked():
                raise Saturated(
                    f"all {self.limit} generation slots are busy (serve.max_concurrency); retry later"
                )
            await self._sem.acquire()  # cannot block: a slot is free and nothing awaits in between
        else:
            try:
                await asyncio.wait_for(self._sem.acquire(), self.timeout_s)
            except TimeoutError:
                raise Saturated(
                    f"no generation slot freed within {self.timeout_s:g} s (serve.max_concurrency={self.limit}); "
                    "retry later"
                ) from None
        self.taken += 1

    def release(self) -> None:
        """Give back a slot taken by `acquire`."""
        self.taken -= 1
        self._sem.release()

    @asynccontextmanager
    async def slot(self):
        """Hold one slot for the duration of the block, or raise Saturated."""
        await self.acquire()
        try:
            yield
        finally:
            self.release()


class BodyLimitMiddleware:
    """Pure ASGI middleware: request bodies over `max_bytes` get 413 before anything parses them.

    A declared Content-Length is checked up front; a chunked body is counted as it streams in and the
    HTTPException raised mid-read reaches the app's exception handlers like any other.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _message(self, size: str) -> str:
        return f"request body is {size} bytes; the limit is {self.max_bytes} (serve.max_body_bytes)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = error_json(413, self._message(declared.decode()), "body_too_large")
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._message(f"more than {self.max_bytes}"))
            return message

        await self.app(scope, counting_receive, send)
