"""The OpenAI-compatible HTTP server (``minimind serve``): ``create_app`` assembles the route groups.

Each route group lives in its own module and is registered with one call, ``register_xxx(app,
state)``, over one shared :class:`~minimind.serve.state.ServerState` (the engine service, the
limits and the admission gate):

* :mod:`minimind.serve.openai_routes` -- ``GET /v1/models``, ``POST /v1/chat/completions``,
  ``POST /v1/completions``;
* :mod:`minimind.serve.ui_routes` -- ``GET /health``, the web UI at ``GET /`` and ``/static/*``, and
  its built-in tools ``GET /api/tools``, ``POST /api/tools/call``;
* :mod:`minimind.serve.rollout_api` -- RL rollouts in SGLang's dialect: ``POST /generate``,
  ``POST /update_weights_from_disk``, ``GET /get_weight_version`` (and ``X-Weight-Version`` on every
  response).

In front of every route, :class:`~minimind.serve.middleware.RequestGuard` checks the Host header
(DNS rebinding), the API key (before the body is read) and the body's size and arrival time; errors
anywhere have OpenAI's shape (:mod:`minimind.serve.errors`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from minimind.infer.service import EngineService
from minimind.serve.errors import install_error_handlers
from minimind.serve.middleware import LOOPBACK_HOSTS, RequestGuard
from minimind.serve.openai_routes import register_chat, register_completions, register_models
from minimind.serve.rollout_api import register_rollout
from minimind.serve.state import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, ServerLimits, ServerState
from minimind.serve.ui_routes import DEFAULT_STATIC_DIR, register_health, register_tools, register_ui

__all__ = ["DEFAULT_STATIC_DIR", "DEFAULT_TEMPERATURE", "DEFAULT_TOP_P", "create_app"]


def create_app(service: EngineService, model_name: str, *, api_key: str | None = None,
               max_body_bytes: int = 1_000_000, max_tokens_cap: int = 4096,
               max_rows_per_request: int = 256, max_queue: int = 1024,
               cors_origins: list[str] | None = None,
               allowed_hosts: Sequence[str] | None = LOOPBACK_HOSTS, body_timeout: float = 30.0,
               static_dir: Path | None = DEFAULT_STATIC_DIR) -> FastAPI:
    """Build the FastAPI app serving ``service``'s model as ``model_name``.

    ``api_key``: when set, every route but ``/health`` and the page needs ``Authorization: Bearer
    <key>``. ``max_body_bytes``: larger bodies get 413; ``body_timeout``: seconds the whole body may
    take to arrive (else 408). ``max_tokens_cap``: the most completion tokens one request may ask
    for (also the default when it asks for none, bounded by the context left).
    ``max_rows_per_request``: prompts x n of one request; ``max_queue``: rows that may wait for a
    slot, all requests together (more gets 429). ``cors_origins``: browser origins allowed to call
    the API (none by default). ``allowed_hosts``: names the Host header may carry (default: the
    loopback names; ``None`` or ``["*"]``: any). ``static_dir``: the web UI folder (``None`` = no
    UI; a placeholder page if the folder has no ``index.html``).
    """
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    if not body_timeout > 0:
        raise ValueError(f"body_timeout must be > 0, got {body_timeout}")
    limits = ServerLimits(max_tokens_cap=max_tokens_cap, max_rows_per_request=max_rows_per_request,
                          max_queue_rows=max_queue)
    state = ServerState(service, model_name, limits)
    app = FastAPI(title="MiniMind", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(RequestGuard, max_bytes=max_body_bytes, api_key=api_key, allowed_hosts=allowed_hosts,
                       body_timeout=body_timeout)
    if cors_origins:
        # Added last = outermost, so preflight requests are answered before auth or size checks.
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=False)

    register_health(app, state)
    register_ui(app, state, static_dir)
    register_models(app, state)
    register_chat(app, state)
    register_completions(app, state)
    register_tools(app, state)
    register_rollout(app, state)
    return app
