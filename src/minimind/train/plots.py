"""PNG plots of metrics JSONL files (loss curves and friends), for people who would rather look."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from minimind.train.metrics import read_metrics


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    try:
        return read_metrics(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not a metrics JSONL line ({e.msg})") from None


def plot_metrics(paths: Sequence[Path], out: Path, keys: Sequence[str] = ("loss",),
                 title: str | None = None, strict: bool = False) -> Path:
    """One panel per key, one line per metrics file.  ``strict`` (``minimind plot``): a key that no
    file has is an error naming the keys there are -- an empty panel in a PNG says nothing about the
    typo that caused it.  Reports leave it off: a run may lack a metric another run logs."""
    records = {Path(p): _read(Path(p)) for p in paths}
    available = sorted({k for rows in records.values() for r in rows for k, v in r.items()
                        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})
    if strict and not available:
        raise ValueError(f"no metrics to plot in {', '.join(map(str, paths))} (empty files?)")
    unknown = [k for k in keys if k not in available]
    if strict and unknown:
        raise ValueError(f"--keys {','.join(unknown)}: not in the metrics; available: {', '.join(available)}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for path, recs in records.items():
            rows = [r for r in recs if key in r]
            if rows:
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=Path(path).stem)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
