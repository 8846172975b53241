"""Request bodies bounded before anything reads or parses them: :class:`BodyLimit`, an ASGI middleware.

Why: FastAPI reads a whole body into memory before it validates it, and its 422 echoed the input, so an
unauthenticated 100 MB POST to the review service's login came back whole (four at once took the process from
109 MB to 1.28 GB). Here the body is read into a buffer no bigger than its route's limit; a body over the limit
is refused with 413 and never reaches the application:

* a declared ``Content-Length`` over the limit is refused before a byte is read;
* a body without one (chunked) is counted as it arrives and refused as soon as it passes the limit.

The 413 leaves the connection open: the server (uvicorn) reads and drops whatever the client still sends, for at
most its keep-alive timeout (5 s), then closes. Closing at once would be cheaper, but a client still sending would
then usually see its connection reset instead of the 413; reading and dropping costs no memory.

Limits are per route: ``max_bytes`` for every route, ``routes`` for the exact paths that carry user content (an
appeal with its item, the gateway's publish), sized by :func:`content_body_bytes` so that the longest text the
pipeline accepts always fits, however JSON escapes it. The application sees the body as one message, exactly as
sent.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pipeline import metrics
from pipeline.http.errors import send_json

logger = logging.getLogger(__name__)

# The most bytes JSON can spend on one character of text (``\u00XX``); pipeline.codec bounds raw messages alike.
JSON_BYTES_PER_CHAR = 6

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def content_body_bytes(max_body_bytes: int, max_text_chars: int) -> int:
    """The body limit of a route that carries one item: the ordinary limit plus the longest text, fully escaped."""
    return max_body_bytes + max_text_chars * JSON_BYTES_PER_CHAR


def client_address(scope: Mapping[str, Any]) -> str:
    """The caller's address as the server sees it (uvicorn rewrites it from ``X-Forwarded-For`` for trusted proxies
    only, ``MODPIPE_HTTP__TRUSTED_PROXIES``)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


_INVALID = -1


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return _INVALID
            return length if length >= 0 else _INVALID
    return None


class BodyLimit:
    """ASGI middleware: request bodies over their route's limit get 413 and never reach ``app``.

    ``service`` names the service in the ``modpipe_http_refused_total`` metric (review, gateway).
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, routes: Mapping[str, int] | None = None,
                 service: str = "http") -> None:
        if max_bytes < 0 or any(v < 0 for v in (routes or {}).values()):
            raise ValueError("body limits must be non-negative")
        self.app = app
        self.max_bytes = max_bytes
        self.routes = dict(routes or {})
        self.service = service

    def limit_for(self, path: str) -> int:
        return self.routes.get(path, self.max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", ""))
        declared = _declared_length(scope)
        if declared == _INVALID:
            metrics.http_refused_total.labels(self.service, "invalid_request").inc()
            await send_json(send, 400, {"error": "invalid Content-Length header"}, close=True)
            return
        if declared is not None and declared > limit:
            await self._refuse(scope, send, limit)
            return

        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body was complete: nobody to answer
            chunk = message.get("body", b"")
            more_body = message.get("more_body", False)
            size += len(chunk)
            if size > limit:
                await self._refuse(scope, send, limit)
                return
            chunks.append(chunk)
            if not more_body:
                break

        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: what the server says next (a disconnect)

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send, limit: int) -> None:
        metrics.http_refused_total.labels(self.service, "body_too_large").inc()
        logger.debug("%s: refused a request body over %d bytes from %s (%s %.80s)", self.service, limit,
                     client_address(scope), scope.get("method"), scope.get("path"))
        await send_json(send, 413, {"error": "request body too large", "limit_bytes": limit})
