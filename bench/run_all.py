"""Every benchmark in one command, one JSON of the ratios: pretrain, SFT, decode, RL step, allocator.

Runs, one after the other, each as its own process (so one's threads, compiled graphs and memory do
not leak into the next) and with its own arguments:

* ``pretrain`` -- ``bench_pretrain.py``: reference-style padded rows vs our packed rows,
  ``--attention doc`` vs ``causal``, fp32 vs bf16;
* ``sft`` -- ``bench_sft.py``: reference-style padded conversations vs ``minimind sft``'s packed rows
  with the assistant-only loss mask, fp32 vs bf16;
* ``decode`` -- ``bench_engine.py``: our engine vs the reference ``generate()`` loop vs llama.cpp
  (where ``llama-cpp-python`` is installed), per dtype and batch size;
* ``rl`` -- ``rl_toy.py``: seconds per RL step split into rollout and update, per loss type;
* ``allocator`` -- ``cpu_allocator.py``: the demo's training step with glibc's default malloc and with
  :func:`minimind.cpu_allocator.tune_malloc` (always on the CPU);
* ``reference_pretrain`` -- ``reference_pretrain.py``: the reference project's own
  ``train_pretrain.py`` timed from its log (only with ``--reference_pretrain_args "--reference_repo
  <checkout> --data_path <jsonl>"``: nothing of that project ships here).

``--quick`` gives every part small sizes (a tiny model, short rows, a few steps: about 3 minutes
on 2 CPU cores); without it each part runs its own full defaults.  ``--device auto`` picks CUDA when
present.  The JSON (printed, and written to ``--out``) holds the environment block, the command of
every part, its wall seconds, a ``ratios`` summary and every part's full report; a part that fails
is recorded with its exit code and the tail of its stderr, and the others still run::

    python bench/run_all.py --quick
    python bench/run_all.py --only sft,decode --sft_args "--batch_size 16"
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import emit_json, environment

from minimind.train.device import pick_device

BENCH = Path(__file__).resolve().parent

#: Arguments of each part under ``--quick`` (tiny model, short rows, few steps).
QUICK_ARGS: dict[str, list[str]] = {
    "pretrain": ["--hidden_size", "128", "--num_hidden_layers", "2", "--batch_size", "4", "--seq_len", "256",
                 "--steps", "2"],
    "sft": ["--hidden_size", "128", "--num_hidden_layers", "2", "--batch_size", "4", "--seq_len", "512",
            "--conversations", "150", "--steps", "2"],
    "decode": ["--quick", "--repeats", "1"],
    "rl": ["--steps", "20", "--loss_types", "grpo,ppo"],
    "allocator": ["--steps", "8", "--warmup", "2", "--rounds", "1"],
    "reference_pretrain": ["--seconds", "40", "--batch_size", "4", "--hidden_size", "128",
                           "--num_hidden_layers", "2", "--extra", "--num_workers 1"],
}
SCRIPTS = {"pretrain": "bench_pretrain.py", "sft": "bench_sft.py", "decode": "bench_engine.py", "rl": "rl_toy.py",
           "allocator": "cpu_allocator.py", "reference_pretrain": "reference_pretrain.py"}


def part_args(name: str, device: torch.device, quick: bool, extra: str) -> list[str]:
    """The command-line arguments of one part: device, quick sizes, then the user's extras (argparse
    keeps the last value of a repeated flag, so the extras win)."""
    args = list(QUICK_ARGS[name]) if quick else []
    if name in ("reference_pretrain", "allocator"):  # its own device: the reference's choice, the CPU
        return args + shlex.split(extra)
    if name == "rl":
        args += ["--out", "", "--device", device.type,
                 "--dtype", "bfloat16" if device.type == "cuda" else "float32"]
    else:
        args += ["--device", str(device)]
    return args + shlex.split(extra)


def parse_report(stdout: str) -> dict[str, Any]:
    """The JSON object a part prints (its stdout may start with other lines)."""
    start = next((i for i, ln in enumerate(stdout.splitlines()) if ln.startswith("{")), None)
    if start is None:
        raise ValueError("no JSON object in the output")
    return json.loads("\n".join(stdout.splitlines()[start:]))


def run_part(name: str, args: list[str], timeout: float) -> dict[str, Any]:
    """Run one part as a subprocess; its report, or its exit code and stderr tail."""
    cmd = [sys.executable, str(BENCH / SCRIPTS[name]), *args]
    t0 = time.perf_counter()
    entry: dict[str, Any] = {"command": shlex.join(["python", f"bench/{SCRIPTS[name]}", *args])}
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        entry.update(error=f"timed out after {timeout:.0f} s", wall_s=round(time.perf_counter() - t0, 1))
        return entry
    entry["wall_s"] = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        entry.update(error=f"exit code {proc.returncode}", stderr_tail=proc.stderr[-2000:])
        return entry
    try:
        entry["report"] = parse_report(proc.stdout)
    except ValueError as exc:
        entry.update(error=f"unreadable output: {exc}", stdout_tail=proc.stdout[-2000:])
    return entry


def summary(name: str, report: dict[str, Any]) -> dict[str, Any]:
    """The ratios of one part's report."""
    if name == "pretrain":
        return {k: report.get(k) for k in ("vs_reference_style", "causal_vs_doc", "bf16_vs_fp32")}
    if name == "sft":
        return {k: report.get(k) for k in ("packed_vs_reference", "bf16_vs_fp32")}
    if name == "reference_pretrain":
        return {k: report.get(k) for k in ("useful_tokens_per_s", "mfu", "micro_steps_per_s")}
    if name == "allocator":
        return {"speedup": report.get("speedup"), "same_loss": report.get("same_loss"),
                "faults_per_step": {side: report.get(side, {}).get("minor_faults_per_step")
                                    for side in ("plain", "tuned")}}
    if name == "decode":  # decode tok/s of each engine variant over the other sides, per mode and batch
        per_mode = {mode: {b: {k: round(v["decode"], 3) for k, v in cell.items() if "_vs_" in k}
                           for b, cell in batches.items()}
                    for mode, batches in report.get("results", {}).items()}
        return {"decode_vs": per_mode, "targets": report.get("targets")}
    rows = {}
    for r in report.get("results", []):
        step = r["sec_rollout"] + r["sec_update"]
        rows[r["loss_type"]] = {"sec_rollout": r["sec_rollout"], "sec_update": r["sec_update"],
                                "rollout_share": round(r["sec_rollout"] / step, 3) if step else None}
    return {"rl_step": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes for every part (~3 min on 2 CPU cores)")
    p.add_argument("--only", default="pretrain,sft,decode,rl,allocator", help="comma-separated parts to run")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--timeout", type=float, default=0, help="seconds per part (0: 900 quick, 7200 full)")
    for name, script in SCRIPTS.items():
        p.add_argument(f"--{name}_args", default="", help=f"extra arguments for bench/{script}")
    p.add_argument("--out", default=str(BENCH / "results" / "run_all.json"),
                   help="where the JSON goes ('' = print only)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    parts = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in parts if n not in SCRIPTS]
    if unknown:
        p.error(f"--only: unknown parts {unknown}; choose from {', '.join(SCRIPTS)}")
    if args.reference_pretrain_args and "reference_pretrain" not in parts:
        parts.append("reference_pretrain")
    if "reference_pretrain" in parts and "--reference_repo" not in args.reference_pretrain_args:
        p.error("reference_pretrain needs --reference_pretrain_args \"--reference_repo DIR --data_path JSONL\"")
    timeout = args.timeout or (900 if args.quick else 7200)
    out: dict[str, Any] = {**environment(device), "quick": args.quick, "ratios": {}, "parts": {}}
    for name in parts:
        print(f"[run_all] {name} ...", file=sys.stderr, flush=True)
        entry = run_part(name, part_args(name, device, args.quick, getattr(args, f"{name}_args")), timeout)
        out["parts"][name] = entry
        out["ratios"][name] = summary(name, entry["report"]) if "report" in entry else {"error": entry["error"]}
        print(f"[run_all] {name}: {entry['wall_s']} s{'' if 'report' in entry else ', ' + entry['error']}",
              file=sys.stderr, flush=True)
    return emit_json(out, args.out)


if __name__ == "__main__":
    main()
