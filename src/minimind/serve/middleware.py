"""ASGI middleware that caps request bodies.

Why here and not in a handler: by the time FastAPI validates a body it has already read all of it
into memory, so a client could send gigabytes before any check ran. This middleware counts bytes as
they arrive and answers 413 as soon as the limit is passed. It also buffers the (small, bounded)
body and replays it to the application, which keeps disconnect detection working afterwards: once
the body is replayed, further ``receive`` calls go to the server and report ``http.disconnect``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from minimind.serve.errors import error_response

__all__ = ["BodySizeLimit"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: How much of an oversized body is read and dropped before answering: HTTP/1.1 clients usually
#: send the whole body before reading the response, so answering early could look like a reset.
DRAIN_FACTOR = 8


class BodySizeLimit:
    """Reject request bodies larger than ``max_bytes`` with an OpenAI-shaped 413."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, scope: Scope, receive: Receive, send: Send, more: bool, seen: int) -> None:
        # Drain (up to a bound) so the client gets to read the 413 instead of a broken pipe.
        while more and seen <= self.max_bytes * DRAIN_FACTOR:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            more = bool(message.get("more_body"))
        response = error_response(413, f"request body too large: the limit is {self.max_bytes} bytes "
                                       f"(--max_body_bytes)", code="request_too_large",
                                  headers={"Connection": "close"})
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send, more=True, seen=0)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            more = bool(message.get("more_body"))
            if size > self.max_bytes:
                await self._reject(scope, receive, send, more=more, seen=size)
                return
            chunks.append(chunk)
            if not more:
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
