"""Shared pytest fixtures (kept minimal)."""

from __future__ import annotations

from pathlib import Path

import pytest


def shared_path() -> Path:
    """``<repo>/../shared``: reference fixtures and docs, present only in the full workspace."""
    return Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = shared_path()
    if not path.is_dir():
        pytest.skip(f"shared fixtures folder {path} absent")
    return path
