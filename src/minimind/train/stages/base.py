"""What a training stage contributes to the one loop: its data, an optional model wrapper, its loss.

A stage is a small object; everything else (precision, accumulation, clipping, schedule, logging,
checkpoints, resume, DDP) lives once in :mod:`minimind.train.loop`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from minimind.config import TrainConfig


@dataclass
class LossOutput:
    """``loss`` is a mean over ``weight`` units (target tokens, pairs ...); the loop combines
    micro-batches as ``sum(loss_i * weight_i) / sum(weight_i)`` so accumulation is exact."""

    loss: torch.Tensor
    weight: float
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)


class Dataset(Protocol):
    def num_rows(self, epoch: int) -> int: ...
    def get_batch(self, epoch: int, row_indices: Any) -> Any: ...


class Stage(Protocol):
    name: str
    #: TrainConfig field values this stage uses when the user does not set them
    defaults: dict[str, Any]

    def build_dataset(self, cfg: TrainConfig, tokenizer: Any, *, rank: int = 0) -> Dataset: ...
    def prepare_model(self, model: nn.Module, cfg: TrainConfig) -> nn.Module: ...
    def compute_loss(self, model: nn.Module, batch: Any) -> LossOutput: ...
    def batch_weight(self, batch: Any) -> float: ...
    def useful_tokens(self, batch: Any) -> int: ...


def next_token_loss(model: nn.Module, batch: Any) -> LossOutput:
    """Mean cross-entropy over target tokens, plus the MoE load-balancing loss.

    ``L = -(1/N) * sum_{i: y_i != -100} log p(y_i | x_<=i) + aux``; ``N`` = number of targets.
    """
    out = model(batch.input_ids, position_ids=batch.position_ids, doc_ids=batch.doc_ids)
    logits = out.logits.float()
    # sum / max(N, 1) rather than "mean": a batch whose rows are all truncated prompts (no target)
    # contributes zero loss and zero gradient instead of NaN.
    ce = F.cross_entropy(logits.view(-1, logits.shape[-1]), batch.targets.view(-1), ignore_index=-100,
                         reduction="sum") / max(int(batch.num_target_tokens), 1)
    return LossOutput(loss=ce + out.aux_loss, weight=float(batch.num_target_tokens),
                      metrics={"ce": ce.detach(), "aux_loss": out.aux_loss.detach()})


def shard_dir_for(cfg: TrainConfig, kind: str, tokenizer_hash: str, data_path: str) -> Path:
    if cfg.shard_dir:
        return Path(cfg.shard_dir)
    return Path("data_cache") / f"{Path(data_path).stem}-{kind}-{cfg.max_seq_len}-{tokenizer_hash}"
