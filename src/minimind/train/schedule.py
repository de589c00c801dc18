"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio * lr``.

``lr(t) = lr * t / W`` for ``t < W``; afterwards with ``p = (t - W) / (T - W)``:
``lr(t) = lr * (r + (1 - r) * (1 + cos(pi * p)) / 2)``.  Stepped per optimizer step (the reference
steps per micro-batch and has no warmup).
"""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
