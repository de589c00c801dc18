"""The demo's training step with glibc's default malloc and with :func:`minimind.cpu_allocator.tune_malloc`.

Each side runs in its own interpreter (the thresholds are process-wide), the sides take turns
(``--rounds`` each, medians), and every process takes the same seeded steps: the model, batch shape
and optimizer of ``minimind demo``'s pretraining (the tiny preset with 2 layers, vocabulary 4096, 8
packed rows of 256 tokens, Muon for the blocks' matrices, bf16 autocast where the CPU has it);
``--rows 3 --seq_len 640`` is the shape of its SFT step.
Prints one JSON object: seconds per step, minor page faults per step (fresh pages the kernel had to
zero) and peak resident memory of each side, their ratios, the final loss of each (equal: the
allocator changes where bytes live, not what is computed) and the CPU's flags.

    python bench/cpu_allocator.py --steps 40 --rounds 2 [--dtype float32] [--rows 3 --seq_len 640]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from _common import emit_json, environment, optimizer_step
from bench_pretrain import packed_batch

from minimind.config import TrainConfig, preset
from minimind.model import MiniMindForCausalLM
from minimind.train.core import make_optimizer
from minimind.train.device import pick_device, pick_dtype
from minimind.train.stages.base import next_token_loss


def worker(mode: str, steps: int, warmup: int, dtype_name: str, rows: int = 8, seq_len: int = 256) -> dict[str, float]:
    """Time ``steps`` demo-shaped training steps after ``warmup`` in this process."""
    if mode == "tuned":
        from minimind.cpu_allocator import tune_malloc
        if tune_malloc() is None:
            raise SystemExit("tune_malloc() changed nothing on this system (not glibc, or told not to)")
    torch.manual_seed(0)
    device = pick_device("cpu")
    dtype = pick_dtype(device, dtype_name)
    model = MiniMindForCausalLM(preset("tiny", num_hidden_layers=2, vocab_size=4096))
    cfg = TrainConfig(optimizer="muon", learning_rate=3e-3, muon_lr=0.02, weight_decay=0.1)
    opt = make_optimizer(model, cfg, device)
    gen = torch.Generator().manual_seed(0)
    batches = [packed_batch(rows, seq_len, 4096, gen) for _ in range(4)]
    times, faults, loss = [], [], 0.0
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        loss = float(optimizer_step(model, opt, lambda b=batch: next_token_loss(model, b).loss, device, dtype))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return {"sec_per_step": statistics.median(times), "minor_faults_per_step": statistics.median(faults),
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "final_loss": loss,
            "dtype": str(dtype).removeprefix("torch.")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--dtype", default="auto", help="auto (bf16 where the CPU has it) or float32")
    p.add_argument("--rounds", type=int, default=2, help="processes per side, taking turns")
    p.add_argument("--rows", type=int, default=8, help="packed rows per step (the demo's SFT: 3)")
    p.add_argument("--seq_len", type=int, default=256, help="tokens per row (the demo's SFT: 640)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--worker", choices=("plain", "tuned"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.warmup, args.dtype, args.rows, args.seq_len)))
        return
    runs: dict[str, list[dict]] = {"plain": [], "tuned": []}
    for _ in range(args.rounds):
        for mode, results in runs.items():
            env = {**os.environ, "MINIMIND_MALLOC_TUNING": "0" if mode == "plain" else "1"}
            out = subprocess.run([sys.executable, __file__, "--worker", mode, "--steps", str(args.steps),
                                  "--warmup", str(args.warmup), "--dtype", args.dtype, "--rows", str(args.rows),
                                  "--seq_len", str(args.seq_len)], env=env, capture_output=True, text=True,
                                 check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    sides = {mode: {key: statistics.median(r[key] for r in rs) if key not in ("final_loss", "dtype")
                    else rs[0][key] for key in rs[0]} for mode, rs in runs.items()}
    report = {"benchmark": "cpu_allocator", "steps": args.steps, "rounds": args.rounds,
              "batch": f"{args.rows} x {args.seq_len}", **sides,
              "speedup": round(sides["plain"]["sec_per_step"] / sides["tuned"]["sec_per_step"], 3),
              "same_loss": sides["plain"]["final_loss"] == sides["tuned"]["final_loss"],
              "environment": environment(torch.device("cpu"))}
    emit_json(report, args.out)


if __name__ == "__main__":
    main()
