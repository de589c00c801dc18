"""The optimizer steps of one rollout batch: ``mu`` passes, each split (shuffled) into
mini-batches of micro-batches, skipping mini-batches without signal and stopping at ``--target_kl``;
the optional supervised term (PPO-ptx); and SPO's drift (the policy's KL from before to after them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from minimind.data import Batch
from minimind.rl.rollout import RolloutBatch, derive_seed
from minimind.train.distributed import all_reduce_sum
from minimind.train.stages.base import LossOutput, next_token_loss
from minimind.train.stages.distill import distill_batch_loss
from minimind.train.stages.rl_advantages import Advantages, OldPass, policy_logps
from minimind.train.stages.rl_context import RLContext
from minimind.train.stages.rl_loss import RatioStats, RLMicroBatch, micro_batch_weight, rl_loss
from minimind.train.stages.rl_rollout import Scored

__all__ = ["UpdateStats", "ptx_batch", "spo_drift", "update", "with_ptx"]


@dataclass
class UpdateStats:
    """What the optimizer steps of one rollout batch did (metrics averaged over the steps taken)."""

    steps: int = 0
    skipped: int = 0
    early_stop: int = 0
    grad_norm: float = 0.0
    metrics: dict[str, Tensor] = field(default_factory=dict)
    ratio: dict[str, float] = field(default_factory=dict)


def _rows(t: Tensor | None, rows: Tensor, width: int) -> Tensor | None:
    """``rows`` of a per-row or per-token tensor, per-token ones cut to ``width`` columns."""
    if t is None:
        return None
    t = t[rows.to(t.device)]
    return t[:, :width] if t.dim() == 2 else t


def _micro_batches(ctx: RLContext, scored: Scored, old: OldPass, adv: Advantages,
                   rows: Tensor) -> list[RLMicroBatch]:
    """The rows of one mini-batch as micro-batches of ``--micro_batch_size`` rows, each cut to its
    longest row (right padding beyond it changes nothing: causal attention looks left)."""
    b = scored.batch
    ref = old.ref_logp if ctx.obj.kl != "none" else None
    out = []
    for part in rows.split(ctx.o.micro_batch_size or len(rows)):
        w = int(b.sequence_lengths[part].max())
        out.append(RLMicroBatch(
            *(_rows(t, part, w) for t in (b.input_ids, b.position_ids, b.targets, adv.mask, adv.adv,
                                          old.old_logp, b.rollout_logp, ref, old.values, adv.returns)),
            max_tokens=ctx.o.max_gen_len))
    return out


def _has_signal(ctx: RLContext, mbs: Sequence[RLMicroBatch]) -> bool:
    """Whether a mini-batch has a gradient to follow, agreed by every rank: a trained token (mask 1)
    with a non-zero advantage, or any trained token when a KL or value term pulls even at advantage 0."""
    pulls = (ctx.obj.kl != "none" and ctx.obj.beta > 0) or ctx.parts.has_values
    own = False
    for mb in mbs:
        adv = mb.adv if mb.adv.dim() == 2 else mb.adv.unsqueeze(-1)
        own = own or bool((adv * mb.mask).abs().max() > 1e-8) or (pulls and bool(mb.mask.sum() > 0))
    flag = torch.tensor(float(own), device=ctx.trainer.device)
    return all_reduce_sum(flag, ctx.info).item() > 0


def ptx_batch(ctx: RLContext, step: int, k: int) -> Batch:
    """The ``k``-th optimizer step's supervised rows of rollout step ``step``: ``--ptx_rows`` rows of
    the packed ``--ptx_data``, drawn from a stream fixed by (seed, step, rank, k), so a resumed run
    draws the same rows without saving any data position."""
    assert ctx.ptx is not None
    n_rows = ctx.ptx.num_rows(0)
    gen = torch.Generator().manual_seed(derive_seed(ctx.cfg.seed, step, ctx.info.rank, 31, k))
    rows = torch.randint(n_rows, (ctx.o.ptx_rows or ctx.cfg.batch_size,), generator=gen)
    return ctx.ptx.get_batch(0, rows.tolist())


def with_ptx(loss_fn: Callable[[nn.Module, Any], LossOutput], mbs: list[Any], weights: list[float],
             ptx: Batch | None, gamma: float, reference: nn.Module | None = None
             ) -> tuple[Callable[[nn.Module, Any], LossOutput], list[Any], list[float]]:
    """Add a supervised term on the rows in ``ptx`` to one optimizer step:

        L = L_RL + gamma * NLL_SFT                          (``--ptx_loss nll``: PPO-ptx, Ouyang et al. 2022)
        L = L_RL + gamma * KL(p_ref || p_theta)             (``--ptx_loss kl``: a retain set)

    ``NLL_SFT`` is the mean token NLL of the rows' assistant spans: it pulls the policy towards the
    data. The KL, summed over the vocabulary and averaged over the same positions (``reference``
    given), pulls it towards the reference model's distribution instead, so on rows the reward never
    sees (other kinds, the thinking-off mode) the policy stays where RL started, as learning without
    forgetting (Li & Hoiem 2016) keeps old tasks: it teaches nothing new, where NLL also moves the
    model to whatever the data says. ``L_RL`` is the micro-batches' weighted mean. The trainer
    averages micro-batch losses by weight, ``sum_i w_i L_i / sum_i w_i``, so the ptx micro-batch gets
    the weight of all RL micro-batches together, ``W = sum_i w_i``, and every loss is doubled:
    ``(sum_i w_i 2 L_i + W 2 gamma T) / 2W = L_RL + gamma T``. Metrics are doubled the same way, so
    the RL ones keep their values and ``ptx_nll`` / ``ptx_kl`` is the term's value."""
    if ptx is None or gamma <= 0:
        return loss_fn, mbs, weights

    def mixed(model: nn.Module, mb: Any) -> LossOutput:
        if isinstance(mb, Batch):
            if reference is None:
                out = next_token_loss(model, mb)
                name, value = "ptx_nll", out.metrics["ce"]
            else:
                out = distill_batch_loss(model, reference, mb, alpha=0.0, temperature=1.0)
                name, value = "ptx_kl", out.metrics["kl"]
            return LossOutput(2.0 * gamma * out.loss, out.weight, {name: 2.0 * value})
        out = loss_fn(model, mb)
        return LossOutput(2.0 * out.loss, out.weight, {k: 2.0 * v for k, v in out.metrics.items()})

    return mixed, [*mbs, ptx], [*weights, float(sum(weights))]


def update(ctx: RLContext, step: int, scored: Scored, old: OldPass, adv: Advantages,
           lr: float) -> UpdateStats:
    """Phase 5: ``mu`` passes over the rollout batch, each split (shuffled) into
    ``steps_per_generation`` mini-batches of one :meth:`Trainer.step` each. A mini-batch without
    signal costs no forward, backward or optimizer step (no lr-0 step decaying Adam's moments);
    ``--target_kl`` ends the batch's updates once the approx-KL to the rollout policy exceeds it."""
    tr, o = ctx.trainer, ctx.o
    n = len(scored.batch)
    n_mini = max(1, min(o.steps_per_generation, n))
    gen = torch.Generator().manual_seed(derive_seed(ctx.cfg.seed, step, ctx.info.rank, 29))
    stats, ratios = UpdateStats(), RatioStats()

    def loss_fn(model: nn.Module, mb: RLMicroBatch) -> LossOutput:
        return rl_loss(ctx.parts, model, mb, ratios)

    for _ in range(o.ppo_epochs):
        order = torch.randperm(n, generator=gen) if n_mini > 1 else torch.arange(n)
        for rows in order.tensor_split(n_mini):
            mbs = _micro_batches(ctx, scored, old, adv, rows)
            if not _has_signal(ctx, mbs):
                stats.skipped += 1
                continue
            ptx = ptx_batch(ctx, step, stats.steps) if ctx.ptx is not None else None
            fn, mbs, weights = with_ptx(loss_fn, mbs, [micro_batch_weight(ctx.obj, mb) for mb in mbs], ptx,
                                        o.ptx_coef, ctx.parts.reference if o.ptx_loss == "kl" else None)
            st = tr.step(mbs, lr, loss_fn=fn, weights=weights)
            for k, v in {"loss": st.loss, **st.metrics}.items():
                stats.metrics[k] = stats.metrics.get(k, 0.0) + v.float()
            stats.steps += 1
            stats.grad_norm = float(st.grad_norm)
            if ratios.end_step(ctx.info, tr.device) > o.target_kl > 0:
                stats.early_stop = 1
                break
        if stats.early_stop:
            break
    if stats.steps:
        stats.metrics = {k: v / stats.steps for k, v in stats.metrics.items()}
        stats.ratio = ratios.summary()
        ctx.backend.refresh(tr.base_model)
    return stats


@torch.no_grad()
def spo_drift(ctx: RLContext, batch: RolloutBatch, old_logp: Tensor, mask: Tensor) -> float:
    """The policy's k3 KL from before to after this step's updates, on this step's tokens, averaged
    over ranks: the drift SPO's baseline forgets by."""
    tr = ctx.trainer
    model = tr.base_model
    model.eval()
    try:
        new = policy_logps(model, batch, ctx.parts.temperature, ctx.o.micro_batch_size or len(batch),
                           tr.device, tr.ctx.autocast)
    finally:
        model.train()
    lr = (new - old_logp) * mask
    s = all_reduce_sum(torch.stack([((lr.exp() - 1.0 - lr) * mask).sum(), mask.sum()]), ctx.info)
    return float(s[0] / s[1].clamp(min=1.0))
