"""GRPO on the toy digit task: the reward curve of the RL driver, and seconds per GRPO step on CPU.

The prompt says "say <d>" (d in 0..3); the reward is 0.5 for a reply starting with a digit and 0.5
more for the digit asked for.  A fresh 2-layer, 32-wide model starts near 0 (a digit is ~3% of its
vocabulary).  Writes ``docs/img/grpo_toy_reward.png`` and prints the curve's summary::

    OMP_NUM_THREADS=1 python bench/rl_toy.py [--steps 200] [--out docs/img/grpo_toy_reward.png]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from minimind.config import TrainConfig
from minimind.rl.toy import register_toy_reward, write_toy_task
from minimind.tokenizer import MiniMindTokenizer
from minimind.train.plots import plot_metrics
from minimind.train.stages.rl import GRPOOptions, GRPOStage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--out", default="docs/img/grpo_toy_reward.png")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (the engine then samples from a bf16 copy)")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 (training autocast)")
    ap.add_argument("--tis_cap", type=float, default=0.0, help="truncated importance sampling cap (0 = off)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    register_toy_reward()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok_dir, data = write_toy_task(root)
        tok = MiniMindTokenizer.from_dir(tok_dir)
        cfg = TrainConfig(stage="grpo", save_weight="grpo_toy", data_path=str(data),
                          tokenizer_path=str(tok_dir), save_dir=str(root / "out"),
                          checkpoint_dir=str(root / "ckpt"), from_weight="none", preset="tiny", hidden_size=32,
                          num_hidden_layers=2, batch_size=8, max_seq_len=64, learning_rate=args.lr,
                          warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0, log_interval=1, save_interval=0,
                          progress=0, device=args.device, dtype=args.dtype, seed=0, epochs=100, max_steps=args.steps)
        opts = GRPOOptions(loss_type="grpo", num_generations=8, beta=0.0, reward="toy_digit:1", max_gen_len=2,
                           temperature=1.0, thinking_ratio=0.0, tis_cap=args.tis_cap)
        t0 = time.perf_counter()
        res = GRPOStage(opts).run(cfg, tok)
        wall = time.perf_counter() - t0
        out = plot_metrics([res.metrics_path], Path(args.out), keys=("reward", "entropy"),
                           title="GRPO, toy digit task (8 prompts x 8 samples per step)")
    r = res.rewards
    k = min(20, len(r) // 2)
    sec = [rec["sec_per_step"] for rec in res.records]
    print(f"wrote {out}")
    print(f"steps {len(r)}  mean reward first {k}: {sum(r[:k]) / k:.3f}  last {k}: {sum(r[-k:]) / k:.3f}  "
          f"max {max(r):.3f}")
    print(f"seconds per GRPO step: median {sorted(sec)[len(sec) // 2]:.3f}  (run {wall:.1f}s, 64 completions "
          f"of <= 2 tokens per step, {args.device})")


if __name__ == "__main__":
    main()
