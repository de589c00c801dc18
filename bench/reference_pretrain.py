"""The reference project's own ``trainer/train_pretrain.py``, timed on this machine.

``bench_pretrain.py`` rebuilds the reference's training step beside ours; this script runs the real
thing from a checkout of jingyaogong/minimind that you provide (nothing of it is in this repository),
so the two trainers can be put side by side on the same GPU and data:

    python bench/reference_pretrain.py --reference_repo ~/src/minimind --data_path pretrain.jsonl \\
        --seconds 90 --out bench/results/reference_pretrain.json

It starts the script with its own defaults (batch 32, 340 tokens, bf16 autocast, 8 loader workers,
gradient accumulation 8) plus ``--log_interval`` and a save interval it never reaches, stamps each
log line ``(step/steps)`` with the time it arrived and stops the run after ``--seconds``.  Throughput
comes from the log lines after the first (the first pays start-up and CUDA warm-up):
``micro-steps/s = (last step - first step) / (last time - first time)``.  Each micro-step holds
``batch_size x max_seq_len`` positions, of which the non-padding ones (``min(tokens, L - 2) + 2``
per row, BOS and EOS included, as its ``PretrainDataset`` builds them) are the useful tokens; MFU
takes the same ``6 N + 12 L H T`` FLOPs per token and peak table as ``minimind``'s own loop.  The
script needs the reference's requirements (``transformers``, ``datasets``) installed.  Prints one JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from _common import emit_json, environment

from minimind.config import ModelConfig
from minimind.model import MiniMindForCausalLM
from minimind.train.device import peak_flops
from minimind.train.metrics import training_flops_per_token

STEP = re.compile(r"\((\d+)/(\d+)\)")


def useful_fraction(data_path: Path, tokenizer_json: Path, seq_len: int, rows: int = 2000) -> float:
    """Share of the reference's padded positions that hold tokens, over the first ``rows`` texts."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    lens = []
    with data_path.open(encoding="utf-8") as f:
        for line, _ in zip(f, range(rows)):
            ids = tok.encode(str(json.loads(line)["text"]), add_special_tokens=False).ids
            lens.append(min(len(ids), seq_len - 2) + 2)
    return statistics.fmean(lens) / seq_len


def stamped_steps(cmd: list[str], cwd: Path, seconds: float) -> tuple[list[tuple[float, int]], list[str]]:
    """Run ``cmd`` for at most ``seconds``; ``(arrival time, step)`` of each log line, and the output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stamps: list[tuple[float, int]] = []
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line.rstrip())
            m = STEP.search(line)
            if m and "loss" in line:
                stamps.append((time.monotonic(), int(m.group(1))))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    reader.join(timeout=5)
    return stamps, lines


def main() -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference_repo", required=True, help="checkout of jingyaogong/minimind")
    p.add_argument("--data_path", required=True, help="pretraining JSONL ({'text': ...} per line)")
    p.add_argument("--seconds", type=float, default=90)
    p.add_argument("--log_interval", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_seq_len", type=int, default=340)
    p.add_argument("--hidden_size", type=int, default=768)
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--extra", default="", help="more arguments for train_pretrain.py, e.g. '--use_compile 1'")
    p.add_argument("--out", default="")
    args = p.parse_args()
    repo, data = Path(args.reference_repo).resolve(), Path(args.data_path).resolve()
    script = repo / "trainer" / "train_pretrain.py"
    if not script.is_file():
        p.error(f"{script} does not exist: --reference_repo must be a checkout of jingyaogong/minimind")
    if not data.is_file():
        p.error(f"--data_path {data} does not exist")
    save_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "reference_pretrain_out"
    cmd = [sys.executable, "-u", str(script), "--data_path", str(data), "--save_dir", str(save_dir),
           "--save_interval", str(10**9), "--log_interval", str(args.log_interval), "--epochs", "1",
           "--batch_size", str(args.batch_size), "--max_seq_len", str(args.max_seq_len),
           "--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers),
           *args.extra.split()]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: dict[str, Any] = {**environment(device), "command": " ".join(cmd[1:]), "seconds": args.seconds}
    stamps, lines = stamped_steps(cmd, script.parent, args.seconds)
    out["log_lines"] = len(stamps)
    if len(stamps) < 3:
        out["error"] = "fewer than 3 step log lines arrived"
        out["output_tail"] = lines[-30:]
        return emit_json(out, args.out)
    (t0, s0), (t1, s1) = stamps[1], stamps[-1]
    steps_s = (s1 - s0) / (t1 - t0)
    frac = useful_fraction(data, repo / "model" / "tokenizer.json", args.max_seq_len)
    positions = args.batch_size * args.max_seq_len
    # the same architecture and parameter count as the reference's model
    model = MiniMindForCausalLM(ModelConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers))
    per_tok = training_flops_per_token(model, args.max_seq_len)
    useful = steps_s * positions * frac
    # the reference trains under bf16 autocast on CUDA and in fp32 on a CPU
    peak = peak_flops(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    out.update(micro_steps_per_s=round(steps_s, 3), timed_steps=s1 - s0, timed_s=round(t1 - t0, 2),
               positions_per_s=round(steps_s * positions, 1), useful_fraction=round(frac, 4),
               useful_tokens_per_s=round(useful, 1),
               mfu=round(useful * per_tok / peak, 4),
               last_log=lines[-1] if lines else "")
    return emit_json(out, args.out)


if __name__ == "__main__":
    main()
