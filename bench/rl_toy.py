"""Every RL loss_type on the toy digit task: the reward it reaches, how off-policy its updates are,
and seconds per step split into rollout and update, printed as JSON.

The prompt says "say <d>" (d in 0..3); the reward is 0.5 for a reply starting with a digit and 0.5
more for the digit asked for (:mod:`minimind.rl.toy`).  A fresh 2-layer, 32-wide model starts near 0
(a digit is ~3% of its vocabulary).  Each loss type runs with its own defaults (the README table:
KL weight, mu, mini-batches per rollout, DAPO's dynamic sampling and overlong shaping), on 64
completions per step: 8 prompts x 8 samples for the group objectives, 64 prompts x 1 sample for SPO
and PPO.  Writes the reward curves to ``--out`` and prints one JSON object::

    OMP_NUM_THREADS=1 python bench/rl_toy.py [--steps 150] [--loss_types grpo,dapo] [--out rl_toy.png]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import emit_json, environment  # bench/ is not a package: scripts import it from their own folder

from minimind.config import TrainConfig
from minimind.rl.objective import LOSS_TYPES
from minimind.rl.toy import register_toy_reward, write_toy_task
from minimind.tokenizer import MiniMindTokenizer
from minimind.train.plots import plot_metrics
from minimind.train.stages.rl import GRPOOptions, GRPOStage, PPOOptions, PPOStage, SPOOptions, SPOStage

#: The toy's 2-token budget truncates nearly every completion of a fresh model (it almost never
#: samples the end-of-turn token), and DAPO's overlong filtering drops truncated completions from the
#: loss: with its default DAPO would train on ~0.2% of the rows.  Everything else is DAPO's default.
TOY_OVERRIDES: dict[str, dict[str, Any]] = {"dapo": {"overlong_filter": 0}}


def run_one(loss_type: str, root: Path, tok: MiniMindTokenizer, data: Path,
            args: argparse.Namespace) -> dict[str, Any]:
    """Train one loss type from scratch and summarise its metrics."""
    single = loss_type in ("spo", "ppo")
    stage_cls, opt_cls = {"spo": (SPOStage, SPOOptions), "ppo": (PPOStage, PPOOptions)}.get(
        loss_type, (GRPOStage, GRPOOptions))
    cfg = TrainConfig(stage=stage_cls.name, save_weight=loss_type, data_path=str(data),
                      tokenizer_path=str(root / "tok"), save_dir=str(root / "out"),
                      checkpoint_dir=str(root / "ckpt"), from_weight="none", preset="tiny", hidden_size=32,
                      num_hidden_layers=2, batch_size=64 if single else 8, max_seq_len=64,
                      learning_rate=args.lr, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0,
                      log_interval=1, save_interval=0, progress=0, device=args.device, dtype=args.dtype,
                      seed=args.seed, epochs=100, max_steps=args.steps)
    overrides = TOY_OVERRIDES.get(loss_type, {})
    opts = opt_cls(loss_type=loss_type, num_generations=1 if single else 8, reward="toy_digit:1",
                   max_gen_len=2, temperature=1.0, thinking_ratio=0.0, **overrides)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
        res = stage_cls(opts).run(cfg, tok)
    wall = time.perf_counter() - t0
    recs = res.records
    k = min(20, len(recs) // 2)
    o = opts.resolved()

    def mean(key: str, rows: list[dict[str, Any]] = recs) -> float:
        vals = [r[key] for r in rows if key in r]
        return round(sum(vals) / max(len(vals), 1), 4)

    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in recs), 4)

    return {"loss_type": loss_type, "overrides": overrides, "beta": o.beta, "ppo_epochs": o.ppo_epochs,
            "steps_per_generation": o.steps_per_generation, "steps": len(recs),
            "reward_first": mean("reward", recs[:k]), "reward_last": mean("reward", recs[-k:]),
            "clip_frac": mean("clip_frac"), "approx_kl": mean("approx_kl"), "ratio_std": mean("ratio_std"),
            "optimizer_steps": sum(r["optimizer_steps"] for r in recs),
            "truncated_rate": mean("truncated_rate"),
            "sec_rollout": median("sec_rollout"), "sec_update": median("sec_update"),
            "sec_per_step": median("sec_per_step"), "wall_s": round(wall, 1), "metrics": res.metrics_path}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--loss_types", default=",".join(LOSS_TYPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/img/rl_toy_reward.png", help="reward curves ('' = no plot)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (the engine then samples from a bf16 copy)")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 (training autocast)")
    ap.add_argument("--json", default="", help="also write the JSON report here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    register_toy_reward()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok_dir, data = write_toy_task(root)
        tok = MiniMindTokenizer.from_dir(tok_dir)
        for lt in args.loss_types.split(","):
            results.append(run_one(lt.strip(), root, tok, data, args))
        if args.out:
            plot_metrics([r["metrics"] for r in results], Path(args.out), keys=("reward", "clip_frac"),
                         title="toy digit task, every loss_type (64 completions per step)")
    for r in results:
        r.pop("metrics")
    emit_json({"task": "toy digit (say <d>), 2-layer 32-wide model from scratch, 64 completions/step, "
                       "max_gen_len 2, T 1", "device": args.device, "dtype": args.dtype, "lr": args.lr,
               "environment": environment(torch.device(args.device)), "results": results}, args.json or None)


if __name__ == "__main__":
    main()
