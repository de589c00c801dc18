"""Shared pytest fixtures (kept minimal)."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Tune glibc malloc as the CLI does (large tensors reuse heap pages): faster, the same results."""
    from minimind.cpu_allocator import tune_malloc

    tune_malloc()


def shared_path() -> Path:
    """``<repo>/../shared``: reference fixtures and docs, present only in the full workspace."""
    return Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = shared_path()
    if not path.is_dir():
        pytest.skip(f"shared fixtures folder {path} absent")
    return path


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny tensors: on a shared 2-core box, extra threads spin
    against other processes (a 2-layer forward took 250 ms with 2 threads under load, 2 ms with one).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``; the count is restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def chain():
    """A tiny model trained (one thread, fixed seed) to continue a fixed permutation chain, with
    wide argmax margins: the quantized-engine tests compare its greedy tokens and logits."""
    import torch

    from tests.test_quant import chain_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return chain_model()
    finally:
        torch.set_num_threads(threads)
