"""The open routes (``GET /health``, the web UI's page and assets) and the web UI's tool routes.

``/health`` and the page are served without an API key (the page asks for the key itself); the
built-in tools (``GET /api/tools``, ``POST /api/tools/call``) run server-side and need the key like
the ``/v1`` routes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from minimind.serve.schemas import ToolCallRequest
from minimind.serve.state import ServerState
from minimind.tasks.tools import call_tool, tool_result_text, tool_schemas

__all__ = ["DEFAULT_STATIC_DIR", "register_health", "register_tools", "register_ui"]

#: Where the web UI's ``index.html`` and assets live inside the package.
DEFAULT_STATIC_DIR = Path(__file__).resolve().parent / "static"

_PLACEHOLDER_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>MiniMind</title></head>
<body><h1>MiniMind server</h1><p>The web UI is not installed. The API is at <code>/v1</code>:
<code>GET /v1/models</code>, <code>POST /v1/chat/completions</code>.</p></body></html>"""


def register_health(app: FastAPI, state: ServerState) -> None:
    """``GET /health``: the model, rows decoding, rows waiting (engine queue + admission gate), slots."""
    router = APIRouter()

    @router.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": state.model_name, "active": state.service.active_rows,
                "waiting": state.service.waiting + state.gate.queued_rows, "slots": state.engine.num_slots}

    app.include_router(router)


def register_ui(app: FastAPI, state: ServerState, static_dir: Path | None = DEFAULT_STATIC_DIR) -> None:
    """``GET /`` (the page; a placeholder if ``static_dir`` has no ``index.html``) and ``/static/*``."""
    index = static_dir / "index.html" if static_dir is not None else None

    @app.get("/", include_in_schema=False)
    async def page() -> Any:
        if index is not None and index.is_file():
            return FileResponse(index, media_type="text/html",
                                headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})
        return HTMLResponse(_PLACEHOLDER_PAGE)

    if static_dir is not None and static_dir.is_dir():
        app.mount("/static", StaticFiles(directory=static_dir), name="static")


def register_tools(app: FastAPI, state: ServerState) -> None:
    """``GET /api/tools`` (the built-in tools' schemas) and ``POST /api/tools/call`` (run one)."""
    router = APIRouter()

    @router.get("/api/tools")
    async def list_tools() -> dict[str, Any]:
        return {"tools": tool_schemas()}

    @router.post("/api/tools/call")
    async def run_tool(req: ToolCallRequest) -> dict[str, Any]:
        # Runs on a worker thread: the tools are bounded, but none of them should stall the loop.
        result = await asyncio.to_thread(call_tool, req.name, req.arguments)
        return {"name": req.name, "content": tool_result_text(result), "result": result,
                "is_error": "error" in result}

    app.include_router(router)
