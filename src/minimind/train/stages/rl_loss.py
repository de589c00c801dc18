"""The RL loss of one micro-batch: ``policy_loss`` on the tempered log-probs, PPO's clipped value
loss, the entropy, the ratio statistics and the weight :meth:`Trainer.step` combines micro-batches by.

Because the loss of a micro-batch is a mean over its own tokens (or sequences, or a constant), each
micro-batch is weighted by that count and :meth:`Trainer.step` combines them as
``sum(loss_i * w_i) / sum(w_i)`` over micro-batches and ranks -- the aggregation the objective
defines over the mini-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from minimind.rl.objective import ObjectiveConfig, policy_loss, tempered_logps
from minimind.train.distributed import DistInfo, all_reduce_sum
from minimind.train.stages.base import LossOutput
from minimind.train.stages.rl_context import RLParts

__all__ = ["RLMicroBatch", "RatioStats", "clipped_value_loss", "masked_entropy", "micro_batch_weight",
           "rl_loss"]


@dataclass
class RLMicroBatch:
    """Rows of a rollout batch with everything the loss needs, aligned like :class:`RolloutBatch`
    (per-token tensors are indexed by the position whose *target* is the token). ``old_logp`` is
    ``None`` on a strictly on-policy update (the loss then uses ``logp.detach()``)."""

    input_ids: Tensor
    position_ids: Tensor
    targets: Tensor
    mask: Tensor
    adv: Tensor
    old_logp: Tensor | None
    rollout_logp: Tensor
    ref_logp: Tensor | None = None
    old_values: Tensor | None = None
    returns: Tensor | None = None
    max_tokens: int | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RLMicroBatch:
        return replace(self, **{k: v.to(device, non_blocking=non_blocking) for k, v in vars(self).items()
                                if isinstance(v, Tensor)})


def micro_batch_weight(cfg: ObjectiveConfig, mb: RLMicroBatch) -> float:
    """The count a micro-batch's loss is a mean over (see :func:`minimind.rl.objective.aggregate`):
    completion tokens (``token_mean``), sequences with a token (``seq_mean``), rows (``constant``)."""
    if cfg.aggregation == "token_mean":
        return float(mb.mask.sum())
    if cfg.aggregation == "seq_mean":
        return float((mb.mask.sum(-1) > 0).sum())
    return float(mb.mask.shape[0])


@torch.no_grad()
def masked_entropy(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean entropy ``H = logsumexp(z) - sum softmax(z) * z`` over completion tokens, in chunks so no
    ``[N, V]`` float32 copy of every position is held at once."""
    sel = logits[mask.bool()]
    if sel.numel() == 0:
        return torch.zeros((), device=logits.device)
    total = torch.zeros((), device=logits.device)
    for chunk in sel.split(1024):
        z = chunk.float()
        total += (torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)).sum()
    return total / sel.shape[0]


class RatioStats:
    """Token ratios ``r = exp(logp - old_logp)`` seen by the loss, reduced over ranks once per optimizer
    step: :meth:`end_step` returns that step's k3 approx-KL ``E[(r - 1) - log r]`` of the policy from
    the rollout policy (what ``--target_kl`` watches) and adds to the update's :meth:`summary` (mean,
    std, min and max of the ratio over every trained token)."""

    def __init__(self) -> None:
        self.parts: list[Tensor] = []
        self.sums = torch.zeros(4, dtype=torch.float64)  # tokens, sum r, sum r^2, sum k3
        self.lo, self.hi = math.inf, -math.inf

    def add(self, log_ratio: Tensor, mask: Tensor) -> None:
        self.parts.append(log_ratio.detach().float()[mask.bool()])

    def end_step(self, info: DistInfo, device: torch.device) -> float:
        lr = torch.cat(self.parts) if self.parts else torch.zeros(0, device=device)
        self.parts = []
        r = lr.exp()
        sums = torch.stack([torch.tensor(float(r.numel()), device=device), r.sum(), (r * r).sum(),
                            ((r - 1.0) - lr).sum()])
        sums = all_reduce_sum(sums, info).double().cpu()
        lo = r.min() if r.numel() else torch.tensor(math.inf, device=device)
        hi = r.max() if r.numel() else torch.tensor(-math.inf, device=device)
        if info.enabled:
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        self.sums += sums
        self.lo, self.hi = min(self.lo, float(lo)), max(self.hi, float(hi))
        return float(sums[3] / sums[0].clamp(min=1.0))

    def summary(self) -> dict[str, float]:
        n = max(float(self.sums[0]), 1.0)
        mean = float(self.sums[1]) / n
        return {"ratio_mean": mean, "ratio_std": math.sqrt(max(float(self.sums[2]) / n - mean ** 2, 0.0)),
                "ratio_min": self.lo, "ratio_max": self.hi, "approx_kl": float(self.sums[3]) / n}


def rl_loss(parts: RLParts, model: nn.Module, mb: RLMicroBatch,
            ratios: RatioStats | None = None) -> LossOutput:
    """``policy_loss`` of the micro-batch on ``log softmax(logits / T)`` (plus PPO's clipped value
    loss and the MoE aux loss)."""
    cfg = parts.objective
    out = model(mb.input_ids, position_ids=mb.position_ids)
    logits = out.logits if parts.temperature == 1.0 else out.logits.float() / parts.temperature
    logp = tempered_logps(logits, mb.targets)
    old = mb.old_logp if mb.old_logp is not None else logp.detach()
    loss, stats = policy_loss(cfg, logp, old, mb.adv, mb.mask, ref_logp=mb.ref_logp,
                              rollout_logp=mb.rollout_logp, max_tokens=mb.max_tokens)
    if ratios is not None:
        ratios.add(logp.detach() - old, mb.mask)
    stats.pop("ratio_mean", None)  # the exact spread comes from RatioStats
    metrics: dict[str, Any] = {**stats, "kl": stats.get("kl", 0.0), "clip_frac": stats.get("clip_frac", 0.0),
                               "entropy": masked_entropy(logits.detach(), mb.mask)}
    if parts.has_values and mb.returns is not None and mb.old_values is not None:
        values = parts.critic(mb.input_ids, mb.position_ids) if parts.critic is not None \
            else parts.value_head(out.hidden_states)
        value_loss = clipped_value_loss(values, mb.old_values, mb.returns, mb.mask,
                                        getattr(parts.options, "cliprange_value", 0.0))
        loss = loss + getattr(parts.options, "vf_coef", 0.5) * value_loss
        m = mb.mask
        metrics["value_loss"] = value_loss.detach()
        metrics["value_mean"] = (values.detach() * m).sum() / m.sum().clamp(min=1.0)
    return LossOutput(loss=loss + out.aux_loss, weight=micro_batch_weight(cfg, mb), metrics=metrics)


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                       clip: float) -> Tensor:
    """``0.5 * mean_t max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)`` over the mask
    (``c = 0``: the plain squared error)."""
    err = (values - returns) ** 2
    if clip > 0:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        err = torch.maximum(err, (clipped - returns) ** 2)
    return 0.5 * (err * mask).sum() / mask.sum().clamp(min=1.0)
