"""Throughput and latency of ``minimind serve`` under 1, 8 and 32 concurrent streaming clients.

What runs: a random-weight model of ``--preset`` (with a throwaway BPE tokenizer trained on random
words) behind the real server stack (uvicorn in a thread, the engine service's scheduler thread,
FastAPI, SSE), and for each concurrency level that many asyncio clients (httpx) each stream
``--requests`` chat completions of exactly ``--max_tokens`` tokens (``ignore_eos``: random weights
would otherwise stop at arbitrary points, making lengths and throughput incomparable).

Reported per level: aggregate completion tokens/s (all tokens of all clients / wall time), per
request latency p50/p90/p99 and time to first token p50/p90 (first streamed text, i.e. queueing +
prefill + one decode step + one SSE hop). The clients run in the same process as the server, so
their JSON parsing shares the GIL with it; numbers are a floor for a separate-process client.

Run it on an otherwise idle machine (the report records the load average and CPU flags):

    python bench/bench_server.py                          # preset small, 1/8/32 clients, 128 tokens
    python bench/bench_server.py --device cuda --preset minimind-3
    python bench/bench_server.py --quick                  # tiny model, short requests: a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn

from minimind.config import preset
from minimind.infer.engine import GenerationEngine
from minimind.infer.service import EngineService
from minimind.model import MiniMindForCausalLM
from minimind.serve.app import create_app
from minimind.tokenizer import train_tokenizer
from minimind.train.device import pick_device, pick_dtype

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit_json  # bench/ is not a package: its scripts import each other by path
from bench_engine import cpu_info, load_average

FULL: dict[str, Any] = {"preset": "small", "concurrency": "1,8,32", "max_tokens": 128, "prompt_words": 48,
                        "requests": 2, "vocab_size": 6400}
QUICK: dict[str, Any] = {"preset": "tiny", "concurrency": "1,4", "max_tokens": 16, "prompt_words": 16,
                         "requests": 1, "vocab_size": 1000}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and short requests (< 1 min)")
    p.add_argument("--preset", default=None, help=f"model shape (default {FULL['preset']})")
    p.add_argument("--concurrency", default=None, help=f"comma-separated client counts ({FULL['concurrency']})")
    p.add_argument("--max_tokens", type=int, default=None, help=f"tokens per request ({FULL['max_tokens']})")
    p.add_argument("--prompt_words", type=int, default=None, help="random words in each user message")
    p.add_argument("--requests", type=int, default=None, help="requests per client, one after another")
    p.add_argument("--vocab_size", type=int, default=None, help="throwaway tokenizer's vocabulary")
    p.add_argument("--slots", type=int, default=0, help="engine slots (0 = the largest concurrency)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = leave as is)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the JSON report here")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def random_words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
                    for _ in range(n))


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (``q`` in 0..100) of ``values``."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return round(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo), 4)


class ServerThread:
    """uvicorn on a free loopback port in a daemon thread."""

    def __init__(self, app: Any) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("server failed to start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


async def one_request(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, float]:
    """Stream one chat completion; latency, time to first text and completion tokens."""
    start = time.perf_counter()
    first: float | None = None
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", {})
                if first is None and (delta.get("content") or delta.get("reasoning_content")):
                    first = time.perf_counter() - start
    latency = time.perf_counter() - start
    return {"latency": latency, "ttft": latency if first is None else first, "tokens": tokens}


async def run_level(url: str, concurrency: int, requests: int, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        await one_request(client, bodies[0])  # warm-up (allocates the cache, compiles nothing)

        async def worker(k: int) -> list[dict[str, float]]:
            return [await one_request(client, bodies[(k * requests + j) % len(bodies)]) for j in range(requests)]

        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(worker(k) for k in range(concurrency)))
        wall = time.perf_counter() - t0
    done = [r for rs in per_client for r in rs]
    tokens = sum(int(r["tokens"]) for r in done)
    latencies = [r["latency"] for r in done]
    ttfts = [r["ttft"] for r in done]
    return {
        "concurrency": concurrency, "requests": len(done), "completion_tokens": tokens,
        "wall_s": round(wall, 3), "completion_tok_per_s": round(tokens / wall, 1),
        "per_request_tok_per_s_p50": percentile([r["tokens"] / r["latency"] for r in done], 50),
        "latency_s": {"p50": percentile(latencies, 50), "p90": percentile(latencies, 90),
                      "p99": percentile(latencies, 99)},
        "ttft_s": {"p50": percentile(ttfts, 50), "p90": percentile(ttfts, 90)},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",") if c]
    rng = random.Random(args.seed)
    load_start = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = [random_words(rng, 60) for _ in range(400)]
        tok = train_tokenizer(corpus, Path(tmp) / "tok", vocab_size=args.vocab_size, show_progress=False)
    torch.manual_seed(args.seed)
    cfg = preset(args.preset, vocab_size=tok.vocab_size)
    model = MiniMindForCausalLM(cfg).eval()
    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    slots = args.slots or max(levels)
    engine = GenerationEngine(model, tok, device=device, dtype=dtype, num_slots=slots)
    service = EngineService(engine)
    app = create_app(service, f"random-{args.preset}", max_tokens_cap=max(args.max_tokens, 1),
                     static_dir=None)
    server = ServerThread(app)
    bodies = [{"model": f"random-{args.preset}", "stream": True, "stream_options": {"include_usage": True},
               "messages": [{"role": "user", "content": random_words(rng, args.prompt_words)}],
               "max_tokens": args.max_tokens, "ignore_eos": True, "temperature": 0.85, "top_p": 0.85,
               "top_k": 50} for _ in range(64)]
    try:
        results = [asyncio.run(run_level(server.url, c, args.requests, bodies)) for c in levels]
    finally:
        server.stop()
        service.close()
    prompt_tokens = [len(engine.chat_prompt_ids(b["messages"])) for b in bodies]
    report = {
        "benchmark": "server",
        "preset": args.preset,
        "model": {"parameters": model.num_parameters(), "hidden_size": cfg.hidden_size,
                  "num_hidden_layers": cfg.num_hidden_layers, "vocab_size": cfg.vocab_size},
        "settings": {"concurrency": levels, "max_tokens": args.max_tokens, "requests_per_client": args.requests,
                     "prompt_tokens_mean": round(sum(prompt_tokens) / len(prompt_tokens), 1), "slots": slots,
                     "device": str(device), "dtype": str(dtype).replace("torch.", ""), "quick": args.quick},
        "torch": {"version": torch.__version__, "threads": torch.get_num_threads()},
        "cpu": cpu_info(),
        "load_average": {"start": load_start, "end": load_average()},
        "cpu_count": os.cpu_count(),
        "results": results,
    }
    return emit_json(report, args.out)


if __name__ == "__main__":
    main()
