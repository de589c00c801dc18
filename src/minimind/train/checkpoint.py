"""Resume checkpoints: everything needed to continue a run exactly where it stopped.

A resume file holds the fp32 model weights (the reference stored fp16, so its resumes were lossy),
the optimizer state, the data cursor (epoch, optimizer step), one RNG state per rank (dropout and
sampling draw differently on each rank), the stage's own state and the run's config.  It is written to
a temporary name and renamed, and read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from minimind.fileio import atomic_path


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _py_state_to_list()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_list_to_py_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_list() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _list_to_py_state(s: list) -> tuple:
    return (s[0], tuple(s[1]), s[2])


def save_resume(path: str | Path, *, model_state: dict[str, torch.Tensor],
                optimizer: torch.optim.Optimizer, epoch: int, step: int, micro_step: int,
                world_size: int, config: dict[str, Any], extra: dict[str, Any] | None = None,
                rng_per_rank: list[dict[str, Any]] | None = None,
                stage_state: dict[str, Any] | None = None) -> Path:
    """``rng_per_rank``: every rank's :func:`rng_state` (default: this process's only)."""
    payload = {
        "model": {k: v.detach().cpu() for k, v in model_state.items()},
        "optimizer": optimizer.state_dict(),
        "epoch": epoch, "step": step, "micro_step": micro_step, "world_size": world_size,
        "rng": (rng_per_rank or [rng_state()])[0], "rng_per_rank": rng_per_rank or [rng_state()],
        "config": config, "extra": extra or {}, "stage": stage_state or {},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_resume(path: str | Path) -> dict[str, Any]:
    return torch.load(Path(path), map_location="cpu", weights_only=True)
