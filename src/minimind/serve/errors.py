"""OpenAI-shaped errors: every failure answers ``{"error": {"message", "type", "param", "code"}}``.

Why: OpenAI SDKs turn that shape into typed exceptions with a readable message (``BadRequestError:
max_tokens ...``); FastAPI's default ``{"detail": ...}`` 422 bodies and HTML 500 pages would reach
users as opaque failures. Internal errors keep the shape but never carry a traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["APIError", "error_payload", "error_response", "install_error_handlers"]

log = logging.getLogger("minimind.serve")

_HTTP_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
               413: "request_too_large", 429: "queue_full"}


class APIError(Exception):
    """An error to report to the client with ``status`` (raised anywhere in a request handler)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or ("server_error" if status >= 500 else "invalid_request_error")


def _utf8_safe(text: str | None) -> str | None:
    """``text`` with lone surrogates written as ``\\udXXX``: a message may quote a client's input,
    and a lone surrogate in it would make encoding the error response itself fail (a 500)."""
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_payload(message: str, type_: str = "invalid_request_error", param: str | None = None,
                  code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": _utf8_safe(message), "type": type_, "param": _utf8_safe(param), "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type_: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    kind = type_ or ("server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse(error_payload(message, kind, param, code), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first validation problem as ``(message, param)``, e.g. ``("temperature: Input should ...",
    "temperature")``; a body that is not JSON gets its own message."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error")
        return f"the request body is not valid JSON{f' ({detail})' if detail else ''}", None
    loc = [str(part) for part in first.get("loc", ())]
    if loc and loc[0] == "body":
        loc = loc[1:]
    msg = str(first.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    if first.get("type") == "missing" and not loc:
        return "the request body is missing (expected a JSON object)", None
    if first.get("type") == "model_attributes_type" and not loc:
        return "the request body must be a JSON object", None
    param = ".".join(loc) or None
    return (f"{param}: {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    """Route every error through the OpenAI shape (400 instead of FastAPI's 422 for bad bodies)."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.type, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404 and exc.detail in (None, "Not Found"):
            message = f"unknown route: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, code=_HTTP_CODES.get(exc.status_code),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error", type_="server_error")
