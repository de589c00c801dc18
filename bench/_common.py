"""Helpers the training benchmarks share: the environment block, one optimizer step, round-robin timing.

``bench_pretrain.py`` and ``bench_sft.py`` both compare a reference-style training step with ours on
one machine in one run.  What makes such a comparison fair lives here, once: every side takes the
same optimizer step (autocast forward, backward, clip at 1.0, AdamW), and the sides' steps are timed
in turn, so that a machine whose load drifts (a shared CPU) slows every side alike instead of
whichever one ran during the busy minute.

bench/ is not a package: the scripts import this file as ``_common`` (their own folder is first on
``sys.path`` when run as ``python bench/<script>.py``).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from minimind.train.device import autocast, pick_dtype

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_info() -> dict[str, object]:
    """The CPU's model name, family/model numbers and the flags that decide bf16 matmul speed (Linux;
    empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}

    def field(key: str) -> str:
        return next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.split(":")[0].strip() == key), "")

    flags = set(field("flags").split())
    # family/model tell apart CPUs of one name ("AMD EPYC": family 25 is Zen 3/4, 26 is Zen 5)
    return {"cpu": field("model name"), "cpu_family_model": f"{field('cpu family')}/{field('model')}",
            "cpu_flags": [f for f in CPU_FLAGS if f in flags],
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def environment(device: torch.device) -> dict[str, object]:
    """Where the figures come from: device (GPU name on CUDA), torch, threads, CPU flags, load."""
    env: dict[str, object] = {"device": str(device), "torch": torch.__version__,
                              "threads": torch.get_num_threads(), **cpu_info()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        env["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return env


def bench_dtypes(device: torch.device, names: str = "auto") -> dict[str, torch.dtype]:
    """The compute dtypes to time: fp32 always, bf16 where the hardware runs it fast (CUDA, AVX-512
    BF16 / AMX CPUs: emulated bf16 on an AVX2 CPU is ~70x slower, timing it says nothing).
    ``names`` = ``"fp32,bf16"`` forces a list."""
    table = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if names != "auto":
        return {n: table[n] for n in names.split(",") if n}
    fast = pick_dtype(device, "auto")
    return {"fp32": torch.float32, **({"bf16": fast} if fast == torch.bfloat16 else {})}


def optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor],
                   device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One training step as both trainers take it: forward under ``dtype`` autocast (the weights stay
    fp32), backward, clip the gradient norm at 1.0, AdamW step.  Returns the detached loss (no
    host sync: reading it is the caller's choice)."""
    with autocast(device, dtype):
        loss = loss_fn()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def timed(step: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``step`` (synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def round_robin(steps: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict[str, float]:
    """Median seconds per step of every side, timed ``rounds`` times with one step of each side per
    round (the sides take turns, so load drift hits them alike)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(timed(step, device))
    return {name: statistics.median(ts) for name, ts in times.items()}


def emit_json(report: dict[str, Any], out: str | None) -> dict[str, Any]:
    """Print ``report`` as JSON (stdout carries only it) and, with ``out``, also write it there."""
    text = json.dumps(report, indent=1)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    return report
