"""PNG plots of metrics JSONL files (loss curves and friends), for people who would rather look."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from minimind.train.metrics import read_metrics


def plot_metrics(paths: Sequence[Path], out: Path, keys: Sequence[str] = ("loss",),
                 title: str | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for path in paths:
            rows = [r for r in read_metrics(path) if key in r]
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
