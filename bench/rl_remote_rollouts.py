"""Rollout tokens/s in-process vs through ``minimind serve`` (the HTTP rollout backend), and GRPO's
seconds per step through the server with and without ``--overlap``, printed as JSON.

The same random-weight model (``--preset``, the toy task's 300-token tokenizer) samples ``--prompts``
x ``--group`` completions of exactly ``--tokens`` tokens (no stop token), once through the in-process
engine (:class:`~minimind.rl.rollout.EngineBackend`) and once through a ``minimind serve`` subprocess
(:class:`~minimind.rl.remote.HTTPRolloutBackend`, SGLang dialect), alternating ``--repeats`` times;
both sides use one intra-op thread.  Includes one weight sync (write + ``/update_weights_from_disk``).
Then ``--grpo_steps`` GRPO steps on the toy task (``--grpo_hidden`` wide, 4 layers, ``--prompts`` x
``--group`` samples of ``--grpo_tokens`` tokens) through a ``minimind serve`` subprocess, lockstep and
with ``--overlap 1`` (rollouts of step k+1 while step k trains)::

    python bench/rl_remote_rollouts.py [--preset small] [--prompts 8] [--group 8] [--tokens 64] [--out F]

Stdout carries only the JSON (with the environment block: CPU model, flags, load average); the
stages' own progress lines go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit_json, environment  # noqa: E402


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
    ap.add_argument("--grpo_steps", type=int, default=8, help="0 = skip the GRPO comparison")
    ap.add_argument("--grpo_hidden", type=int, default=256)
    ap.add_argument("--grpo_tokens", type=int, default=32)
    ap.add_argument("--out", default="", help="also write the JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON's alone
        report = measure(args)
    emit_json(report, args.out)


def measure(args: argparse.Namespace) -> dict[str, object]:
    """Rollout tokens/s both ways, one weight sync, then the GRPO lockstep/overlap comparison."""
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
    grpo = grpo_overlap(args) if args.grpo_steps else None
    return {
        "benchmark": "rl_rollouts_in_process_vs_server", "environment": environment(torch.device("cpu")),
        "preset": args.preset,
        "parameters": sum(p.numel() for p in model.parameters()), "prompts": args.prompts,
        "group": args.group,
        "tokens_per_completion": args.tokens, "repeats": args.repeats, "threads_each": 1,
        "tokens_per_s": {k: round(tokens / v, 1) for k, v in med.items()},
        "server_over_in_process": round(med["in_process"] / med["server"], 3),
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "weight_sync_s": round(sync_s, 3), "grpo_through_server": grpo}


def grpo_overlap(args: argparse.Namespace) -> dict[str, object]:
    """Median seconds per GRPO step (after the first) through a server, lockstep vs ``--overlap 1``."""
    from minimind.rl.toy import register_toy_reward
    from minimind.train.stages.rl import GRPOOptions, GRPOStage

    register_toy_reward()
    out: dict[str, object] = {"steps": args.grpo_steps, "hidden_size": args.grpo_hidden,
                              "num_hidden_layers": 4, "tokens_per_completion": args.grpo_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok_dir, data = write_toy_task(root)
        tok = MiniMindTokenizer.from_dir(tok_dir)

        def cfg(name: str) -> TrainConfig:
            return TrainConfig(stage="grpo", save_weight=name, data_path=str(data),
                               tokenizer_path=str(tok_dir), save_dir=str(root / "out"),
                               checkpoint_dir=str(root / "ckpt"), from_weight="none",
                               preset="tiny", hidden_size=args.grpo_hidden, num_hidden_layers=4,
                               batch_size=args.prompts, max_seq_len=64, learning_rate=1e-3, warmup_steps=0,
                               log_interval=1, save_interval=0, progress=0, device="cpu", dtype="float32",
                               seed=0, max_steps=args.grpo_steps, epochs=10)

        model, _ = build_model(cfg("probe"), tok.vocab_size)
        proc, url = start_server(save_weights(model, root / "served.safetensors"), tok_dir,
                                 args.prompts * args.group)
        try:
            for overlap in (0, 1):
                opts = GRPOOptions(loss_type="grpo", num_generations=args.group, beta=0.0,
                                   reward="toy_digit:1", max_gen_len=args.grpo_tokens, temperature=1.0,
                                   thinking_ratio=0.0, rollout_backend="server", rollout_url=url,
                                   overlap=overlap, tis_cap=2.0 if overlap else 0.0)
                res = GRPOStage(opts).run(cfg(f"overlap{overlap}"), tok)
                sec = [r["sec_per_step"] for r in res.records[1:]]
                out[f"overlap_{overlap}"] = {"median_s_per_step": round(statistics.median(sec), 3),
                                             "s_per_step": [round(x, 3) for x in sec]}
        finally:
            proc.kill()
    return out


if __name__ == "__main__":
    main()
