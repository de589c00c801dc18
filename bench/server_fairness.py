"""How long a small request waits when it arrives just after a large batch request (fair admission).

What runs: a tiny random-weight model (1 layer, width 32; the tests' helper) behind the real app
(``create_app``, in process over ASGI, no sockets) with ``--slots`` slots. A 16-token completions
request is timed alone, then sent ``--delay`` seconds after a ``/v1/completions`` request of
``--prompts`` prompts x 16 tokens. With first-come admission it would wait for the whole batch; with
the server's round-robin admission it waits for about one freed slot. Printed as JSON: both
latencies, the batch's total time and the ratios (seconds on a shared machine are noisy; the ratios
within one run are what to compare).

    python bench/server_fairness.py                    # 256 prompts, 8 slots
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minimind.serve.app import create_app
from tests.tiny_server import asgi_client, tiny_model, tiny_service, tiny_tokenizer


async def measure(app: object, prompts: int, delay: float) -> dict[str, float]:
    small = {"prompt": "Hi there", "max_tokens": 16, "ignore_eos": True, "temperature": 0}
    big = {"prompt": [[5, 6, 7]] * prompts, "max_tokens": 16, "ignore_eos": True, "temperature": 0}
    async with asgi_client(app) as c:
        t = time.perf_counter()
        (await c.post("/v1/completions", json=small)).raise_for_status()
        alone = time.perf_counter() - t
        t0 = time.perf_counter()
        task = asyncio.create_task(c.post("/v1/completions", json=big))
        await asyncio.sleep(delay)
        t = time.perf_counter()
        (await c.post("/v1/completions", json=small)).raise_for_status()
        beside = time.perf_counter() - t
        (await task).raise_for_status()
        total = time.perf_counter() - t0
    return {"small_alone_s": round(alone, 3), "small_beside_batch_s": round(beside, 3),
            "batch_total_s": round(total, 2), "beside_over_alone": round(beside / alone, 2),
            "beside_over_batch_total": round(beside / total, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=256, help="prompts in the large request")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--delay", type=float, default=0.05, help="seconds between the large and the small request")
    args = p.parse_args()
    torch.set_num_threads(1)
    tok = tiny_tokenizer(Path(tempfile.mkdtemp()))
    service = tiny_service(tiny_model(tok.vocab_size), tok, args.slots)
    app = create_app(service, "tiny", max_tokens_cap=64, max_rows_per_request=max(args.prompts, 1))
    try:
        result = asyncio.run(measure(app, args.prompts, args.delay))
    finally:
        service.close()
    print(json.dumps({"prompts": args.prompts, "slots": args.slots, **result}))


if __name__ == "__main__":
    main()
