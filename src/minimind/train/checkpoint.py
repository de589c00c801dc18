"""Resume checkpoints: everything needed to continue a run exactly where it stopped.

A resume file holds the fp32 model weights (the reference stored fp16, so its resumes were lossy),
the optimizer state, the data cursor (epoch, optimizer step), one RNG state per rank (dropout and
sampling draw differently on each rank), the stage's own state and the run's config.  It is written to
a temporary name and renamed, and read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import pickle
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


#: What :func:`save_resume` always writes; a file without these is not one of our resume files.
RESUME_KEYS = ("model", "optimizer", "step", "epoch", "world_size", "config")


def load_resume(path: str | Path) -> dict[str, Any]:
    """The saved state, or a one-line ``ValueError`` naming the file: a truncated copy (a kill
    during ``cp``, a full disk), a file of pickled objects that ``weights_only`` refuses to run, or
    some other ``.pt`` are all refused with what to do instead."""
    path = Path(path)
    advice = "delete it (or move it away) to start over, or pass --from_resume 0"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only: the file holds objects other than tensors/containers
        raise ValueError(f"resume checkpoint {path} holds pickled Python objects, which are not loaded "
                         f"(weights_only); it was not written by minimind: {advice}") from None
    except OSError:
        raise  # permissions, a folder: the OS message says it
    except Exception as e:  # noqa: BLE001 - zip/pickle readers raise RuntimeError, EOFError, KeyError ...
        reason = str(e).splitlines()[0].split(". ")[0][:160] if str(e) else type(e).__name__
        raise ValueError(f"resume checkpoint {path} is unreadable (truncated or corrupt: {reason}); "
                         f"{advice}") from None
    missing = [k for k in RESUME_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path} is not a minimind resume checkpoint (no {', '.join(missing)}); {advice}")
    return state
