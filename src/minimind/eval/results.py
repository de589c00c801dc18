"""One results format for every evaluation, written as JSON and shown as a table.

The JSON file (``--out``) holds::

    {"format": "minimind-eval/1", "task": "mc", "model": "full_sft_768.safetensors",
     "model_path": "...", "data": "...", "settings": {...flags that change the numbers...},
     "metrics": {"acc_letter": 0.31, ...}, "subjects": {"agronomy": {"n": 5, ...}, ...},
     "timestamp": "2025-01-01T12:00:00+00:00", "seconds": 12.3, "samples": [...]}

so runs of different models, stages or settings can be compared by a script (``jq`` or pandas)
without knowing which command wrote them.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from minimind.fileio import atomic_write_text

FORMAT = "minimind-eval/1"


@dataclass
class EvalResult:
    """What one ``minimind eval`` run measured, on what, with which settings, in how long."""

    task: str
    model: str
    metrics: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    subjects: dict[str, dict[str, Any]] = field(default_factory=dict)
    model_path: str = ""
    data: str = ""
    seconds: float = 0.0
    timestamp: str = field(
        default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    samples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "task": self.task, "model": self.model, "model_path": self.model_path,
                "data": self.data, "settings": self.settings, "metrics": self.metrics,
                "subjects": self.subjects,
                "timestamp": self.timestamp, "seconds": round(self.seconds, 3), "samples": self.samples}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalResult:
        return cls(task=d["task"], model=d["model"], metrics=d["metrics"], settings=d.get("settings", {}),
                   subjects=d.get("subjects", {}), model_path=d.get("model_path", ""), data=d.get("data", ""),
                   seconds=d.get("seconds", 0.0), timestamp=d.get("timestamp", ""),
                   samples=d.get("samples", []))


def _json_safe(value: Any) -> Any:
    """NaN / inf are not JSON: written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_results(result: EvalResult, path: str | Path) -> Path:
    """Write ``result`` as indented UTF-8 JSON (atomically; parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(_json_safe(result.to_dict()), indent=2, ensure_ascii=False) + "\n")
    return path


def read_results(path: str | Path) -> EvalResult:
    return EvalResult.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 1e5:
            return f"{value:,.1f}"
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.3g}"
        return f"{value:.4f}"
    return str(value)


def headline(result: EvalResult) -> str:
    """``eval mc | full_sft_768.safetensors | cmmlu_dev | 12.3 s``."""
    data = Path(result.data).name if result.data else ""
    return " | ".join(x for x in (f"eval {result.task}", result.model, data, f"{result.seconds:.1f} s") if x)


def results_tables(result: EvalResult) -> list[Table]:
    """The per-subject table (when there is a breakdown), then the metrics table, so the summary
    is the last thing on screen."""
    head = Table()
    head.add_column("metric")
    head.add_column("value", justify="right")
    for key, value in result.metrics.items():
        head.add_row(key, _fmt(value))
    tables = [head]
    if result.subjects:
        cols: list[str] = []
        for row in result.subjects.values():
            cols += [c for c in row if c not in cols]
        sub = Table()
        sub.add_column(f"subject ({len(result.subjects)})")
        for c in cols:
            sub.add_column(c, justify="right")
        for name, row in result.subjects.items():
            sub.add_row(name, *(_fmt(row.get(c, "")) for c in cols))
        tables.insert(0, sub)
    return tables


def print_results(result: EvalResult, console: Console | None = None) -> None:
    """Print the tables of :func:`results_tables`, the headline just above the metrics."""
    console = console or Console(highlight=False)
    tables = results_tables(result)
    for table in tables[:-1]:
        console.print(table)
    console.print(headline(result), style="bold", markup=False)
    console.print(tables[-1])
