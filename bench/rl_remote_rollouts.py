"""Rollout tokens/s in-process vs through ``minimind serve`` (the HTTP rollout backend), printed as JSON.

The same random-weight model (``--preset``, the toy task's 300-token tokenizer) samples ``--prompts``
x ``--group`` completions of exactly ``--tokens`` tokens (no stop token), once through the in-process
engine (:class:`~minimind.rl.rollout.EngineBackend`) and once through a ``minimind serve`` subprocess
(:class:`~minimind.rl.remote.HTTPRolloutBackend`, SGLang dialect), alternating ``--repeats`` times;
both sides use one intra-op thread.  Includes one weight sync (write + ``/update_weights_from_disk``)::

    python bench/rl_remote_rollouts.py [--preset small] [--prompts 8] [--group 8] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from minimind.config import TrainConfig
from minimind.infer.engine import GenerationEngine
from minimind.infer.sampling import SamplingParams
from minimind.model.weights import save_weights
from minimind.rl.remote import HTTPRolloutBackend
from minimind.rl.rollout import EngineBackend
from minimind.rl.toy import write_toy_task
from minimind.tokenizer import MiniMindTokenizer
from minimind.train.core import build_model


def start_server(weights: Path, tok_dir: Path, slots: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", "import sys; from minimind.cli import main; sys.exit(main(sys.argv[1:]))",
           "serve", "--weight", str(weights), "--tokenizer", str(tok_dir), "--port", str(port), "--no_ui",
           "--device", "cpu", "--dtype", "float32", "--slots", str(slots), "--log_level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("minimind serve did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok_dir, _ = write_toy_task(root)
        tok = MiniMindTokenizer.from_dir(tok_dir)
        cfg = TrainConfig(stage="grpo", preset=args.preset, from_weight="none", vocab_size=tok.vocab_size)
        torch.manual_seed(0)
        model, _ = build_model(cfg, tok.vocab_size)
        model.eval()
        weights = save_weights(model, root / "policy.safetensors")
        rows = args.prompts * args.group
        prompts = [list(tok.encode(f"say {d % 4} digit {d}")) for d in range(args.prompts)]
        params = SamplingParams(max_new_tokens=args.tokens, temperature=1.0, top_k=0, top_p=1.0,
                                stop_token_ids=(), seed=0)
        local = EngineBackend(GenerationEngine(model, tok, num_slots=rows))
        proc, url = start_server(weights, tok_dir, rows)
        remote = HTTPRolloutBackend(url, tokenizer=tok, sync_dir=root / "sync", sync_interval=1)
        try:
            t0 = time.perf_counter()
            remote.sync(model)
            sync_s = time.perf_counter() - t0
            local.generate(prompts, params, args.group)  # warm both paths
            remote.generate(prompts, params, args.group)
            times: dict[str, list[float]] = {"in_process": [], "server": []}
            for _ in range(args.repeats):
                for name, backend in (("in_process", local), ("server", remote)):
                    t0 = time.perf_counter()
                    out = backend.generate(prompts, params, args.group)
                    times[name].append(time.perf_counter() - t0)
                    assert sum(len(r.token_ids) for r in out) == rows * args.tokens
        finally:
            remote.close()
            proc.kill()
    tokens = rows * args.tokens
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "benchmark": "rl_rollouts_in_process_vs_server", "preset": args.preset,
        "parameters": sum(p.numel() for p in model.parameters()), "prompts": args.prompts,
        "group": args.group,
        "tokens_per_completion": args.tokens, "repeats": args.repeats, "threads_each": 1,
        "tokens_per_s": {k: round(tokens / v, 1) for k, v in med.items()},
        "server_over_in_process": round(med["in_process"] / med["server"], 3),
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "weight_sync_s": round(sync_s, 3), "cpu": "shared 2-core Xeon (other jobs running)"}, indent=2))


if __name__ == "__main__":
    main()
