"""Run observability: a metrics JSONL file for every run, a live progress line, optional trackers."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

#: Supported trackers (``--use_wandb``: reference 1 = SwanLab, 2 = Weights & Biases).
TRACKERS = ("swanlab", "wandb")


def check_tracker(name: str) -> None:
    """Fail fast, before any data preparation, when the selected tracker is not installed.

    Opening the tracker happens only once training starts; without this check a missing optional
    package surfaced as an ``ImportError`` traceback after minutes of tokenising.  ``find_spec``
    looks the package up without importing it (importing wandb alone takes seconds).
    """
    if not name:
        return
    if name not in TRACKERS:
        raise ValueError(f"unknown tracker {name!r} (wandb | swanlab)")
    if importlib.util.find_spec(name) is None:
        raise ValueError(f"--use_wandb needs the `{name}` package: pip install {name}")


class MetricsWriter:
    """Appends one JSON object per logged step; trackers (wandb / swanlab) mirror the same dict."""

    def __init__(self, path: str | Path, enabled: bool = True, tracker: str = "",
                 run_name: str = "", config: dict[str, Any] | None = None,
                 project: str = "MiniMind") -> None:
        """``project`` is the tracker's project name (``--wandb_project``; reference: MiniMind)."""
        self.path = Path(path)
        self.enabled = enabled
        self._replace = False
        self._tracker = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tracker:
                self._tracker = _open_tracker(tracker, run_name, config or {}, project)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        mode, self._replace = ("w" if self._replace else "a"), False
        with open(self.path, mode, encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self._tracker is not None:
            self._tracker.log({k: v for k, v in record.items() if isinstance(v, (int, float))})

    def start_fresh(self) -> None:
        """A fresh run replaces an earlier run's file, but only with its first record: a run that
        fails before logging anything (bad data, an interrupt at step 0) leaves the old curve."""
        self._replace = True

    def truncate_after(self, step: int) -> None:
        """On resume, drop records of steps that the resumed run will redo."""
        if not (self.enabled and self.path.exists()):
            return
        keep = [ln for ln in self.path.read_text(encoding="utf-8").splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= step]
        self.path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]


def _open_tracker(name: str, run_name: str, config: dict[str, Any], project: str = "MiniMind") -> Any:
    check_tracker(name)
    if name == "wandb":
        import wandb  # optional dependency
        wandb.init(project=project, name=run_name, config=config)
        return wandb
    import swanlab  # optional dependency
    swanlab.init(project=project, experiment_name=run_name, config=config)
    return swanlab


def model_flops_per_token(n_matmul_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: ``6 * N + 12 * L * H * T`` (PaLM appendix B).

    ``N`` counts matmul weights (for a tied model the embedding counts once, as the output head;
    for MoE only the active experts); ``12 L H T`` is attention scores and values, fwd + bwd.
    """
    return 6.0 * n_matmul_params + 12.0 * n_layers * hidden * seq_len


def training_flops_per_token(model: Any, seq_len: int) -> float:
    """:func:`model_flops_per_token` of a :class:`~minimind.model.MiniMindForCausalLM`: its active
    parameters, less the input embedding of an untied model (a lookup, not a product)."""
    cfg = model.config
    n_matmul = model.num_parameters(active=True)
    if not cfg.tie_word_embeddings:
        n_matmul -= model.model.embed_tokens.weight.numel()
    return model_flops_per_token(n_matmul, cfg.num_hidden_layers, cfg.hidden_size, seq_len)
