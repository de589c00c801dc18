"""A tiny random-weight model served in-process, for the server's hostile-input and guard tests.

Why random weights: these tests check what the server does with requests (status codes, error
bodies, isolation, fairness), not what the model says, and a random model is built in milliseconds.
Its output head is scaled up so every greedy choice wins by a wide margin: a well-formed request
then gets exactly the same tokens alone or batched beside any other rows (no near-ties that batch
shapes could flip), which is what "completes unharmed" is checked against.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn

from minimind.config import ModelConfig
from minimind.infer.engine import GenerationEngine
from minimind.infer.service import EngineService
from minimind.model import MiniMindForCausalLM
from tests.scripted_model import small_tokenizer

__all__ = ["LOOPBACK", "Running", "asgi_client", "tiny_model", "tiny_service", "tiny_tokenizer"]

LOOPBACK = "http://127.0.0.1"


def tiny_tokenizer(tmp_dir: Path) -> Any:
    return small_tokenizer(tmp_dir)


def tiny_model(vocab_size: int, seed: int = 0, context: int = 256) -> MiniMindForCausalLM:
    """A 1-layer random model whose logits are spread far apart (see the module docstring)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      vocab_size=vocab_size, max_position_embeddings=context)
    model = MiniMindForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model


def tiny_service(model: MiniMindForCausalLM, tok: Any, slots: int = 4) -> EngineService:
    return EngineService(GenerationEngine(model, tok, num_slots=slots))


def asgi_client(app: Any) -> httpx.AsyncClient:
    """An in-process client (no sockets): ``Host: 127.0.0.1`` like a loopback client sends."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=LOOPBACK, timeout=60)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


class Running:
    """A uvicorn server on a free loopback port, in a daemon thread."""

    def __init__(self, app: Any) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="critical", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
