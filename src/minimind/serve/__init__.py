"""OpenAI-compatible serving: ``create_app`` builds the FastAPI app over an engine service, and
``minimind serve`` runs it. Imports are lazy so ``import minimind`` does not pull in FastAPI."""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from minimind.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'minimind.serve' has no attribute {name!r}")
