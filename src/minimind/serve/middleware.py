"""ASGI middleware that guards every request before FastAPI sees it: Host, API key, body size and time.

Why one pass in front of the app, in this order:

1. **Host header** (DNS rebinding): a web page on ``evil.example`` whose name the attacker re-points
   to 127.0.0.1 makes the victim's browser send requests to the local server, with
   ``Host: evil.example``. Answering only the names the server is really reached by (loopback names,
   the bound address, ``--allowed_hosts``) stops that; the browser cannot forge the header.
2. **API key**: checked before the body is read, so an unauthenticated client learns nothing (an
   invalid JSON body gets 401, not a parse error) and cannot make the server buffer a body.
3. **Body size and time**: FastAPI reads a whole body into memory before validating it, so a client
   could send gigabytes; bytes are counted as they arrive and 413 is answered once the limit is
   passed. A body shorter than its ``Content-Length`` would hold the connection forever (uvicorn has
   no body timeout), so the whole body must arrive within ``body_timeout`` seconds or the request
   gets 408 and the connection is closed.

The (small, bounded) body is buffered and replayed to the application, which keeps disconnect
detection working afterwards: once the body is replayed, further ``receive`` calls go to the server
and report ``http.disconnect``.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from minimind.serve.errors import error_response

__all__ = ["LOOPBACK_HOSTS", "OPEN_PATHS", "RequestGuard", "host_allowed", "is_loopback"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: How much of an oversized body is read and dropped before answering: HTTP/1.1 clients usually
#: send the whole body before reading the response, so answering early could look like a reset.
DRAIN_FACTOR = 8
#: Names that always reach a loopback server.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
#: Paths served without an API key: the health check and the web UI's page and assets (the page
#: asks for the key itself). Everything else, routes added later included, needs the key.
OPEN_PATHS = ("/", "/health", "/favicon.ico")
OPEN_PREFIXES = ("/static/",)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(value: str) -> str:
    """The name part of a Host header: ``[::1]:8998`` -> ``::1``, ``Example.com:80`` -> ``example.com``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def host_allowed(header: str, allowed: Iterable[str]) -> bool:
    """Whether a Host header names one of ``allowed`` (``*`` allows any)."""
    names = {a.strip("[]").lower() for a in allowed}
    name = _host_name(header)
    if "*" in names or name in names:
        return True
    # Any loopback address (127.0.0.2 too) is as safe as the loopback names.
    return is_loopback(name) and bool(names & set(LOOPBACK_HOSTS))


class RequestGuard:
    """Check Host, the API key and the body (size, arrival time) of every HTTP request.

    ``allowed_hosts``: names the Host header may carry (``None`` or ``["*"]``: any). ``api_key``:
    when set, every path but :data:`OPEN_PATHS` needs ``Authorization: Bearer <key>``.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, *, api_key: str | None = None,
                 allowed_hosts: Iterable[str] | None = None, body_timeout: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.allowed_hosts = None if allowed_hosts is None else list(allowed_hosts)
        self.body_timeout = body_timeout

    # ---- checks ----------------------------------------------------------------------------------
    def _host_ok(self, headers: dict[bytes, bytes]) -> bool:
        if self.allowed_hosts is None:
            return True
        host = headers.get(b"host")
        return host is not None and host_allowed(host.decode("latin-1"), self.allowed_hosts)

    def _key_ok(self, path: str, headers: dict[bytes, bytes]) -> bool:
        if self.expected is None or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return True
        return hmac.compare_digest(headers.get(b"authorization", b""), self.expected)

    # ---- body ----------------------------------------------------------------------------------------
    async def _reject_large(self, scope: Scope, receive: Receive, send: Send, more: bool, seen: int) -> None:
        # Drain (up to a bound and the deadline) so the client reads the 413 instead of a broken pipe.
        deadline = time.monotonic() + min(self.body_timeout, 5.0)
        while more and seen <= self.max_bytes * DRAIN_FACTOR:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                break
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            more = bool(message.get("more_body"))
        response = error_response(413, f"request body too large: the limit is {self.max_bytes} bytes "
                                       f"(--max_body_bytes)", code="request_too_large",
                                  headers={"Connection": "close"})
        await response(scope, receive, send)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or ``None`` once an error was answered (or the client left)."""
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                response = error_response(408, f"the request body did not arrive within {self.body_timeout:g} s "
                                               f"(is Content-Length larger than the body?)",
                                          code="request_timeout", headers={"Connection": "close"})
                await response(scope, receive, send)
                return None
            if message["type"] != "http.request":  # the client left before sending its body
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            more = bool(message.get("more_body"))
            if size > self.max_bytes:
                await self._reject_large(scope, receive, send, more=more, seen=size)
                return None
            chunks.append(chunk)
            if not more:
                return b"".join(chunks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if not self._host_ok(headers):
            response = error_response(400, "invalid Host header: this server answers only the names it is "
                                           "served under (add yours with --allowed_hosts)", "host",
                                      "invalid_host")
            await response(scope, receive, send)
            return
        if not self._key_ok(scope.get("path", ""), headers):
            response = error_response(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                      code="invalid_api_key")
            await response(scope, receive, send)
            return
        declared = headers.get(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            await self._reject_large(scope, receive, send, more=True, seen=0)
            return
        body = await self._read_body(scope, receive, send)
        if body is None:
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
