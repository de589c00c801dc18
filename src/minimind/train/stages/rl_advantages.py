"""What an RL update learns from: the no-grad pass before it (old and reference log-probs, the
critic's values) and the advantages (group, batch, SPO baseline, or GAE with KL in the reward).

PPO (Ouyang et al. 2022 style): the per-token reward is ``r_t = -beta * (old_logp_t - ref_logp_t)``
plus the sequence reward on the last completion token; GAE gives ``A_t`` and the returns
``R_t = A_t + V_old(s_t)``; advantages are whitened over the batch's completion tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from minimind.rl.objective import (
    batch_normalized_advantages,
    compute_advantages,
    group_advantages,
    mask_truncated,
    tempered_logps,
)
from minimind.rl.rollout import RolloutBatch
from minimind.train.distributed import DistInfo, all_gather_objects, all_reduce_sum
from minimind.train.stages.rl_context import RLContext
from minimind.train.stages.rl_rollout import Scored

__all__ = ["Advantages", "OldPass", "advantages", "old_log_probs", "policy_logps"]


@torch.no_grad()
def policy_logps(model: nn.Module, batch: RolloutBatch, temperature: float, rows_per_pass: int,
                 device: torch.device, autocast: Any = None) -> Tensor:
    """``log softmax(z / T)`` of every target of ``batch`` under ``model`` (no gradient), in chunks."""
    out = []
    for s in range(0, len(batch), rows_per_pass):
        ids = batch.input_ids[s:s + rows_per_pass].to(device)
        pos = batch.position_ids[s:s + rows_per_pass].to(device)
        tgt = batch.targets[s:s + rows_per_pass].to(device)
        with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
            logits = model(ids, position_ids=pos).logits
        out.append(tempered_logps(logits, tgt, temperature))
    return torch.cat(out)


@dataclass
class OldPass:
    """What the no-grad pass before the updates yields (``None`` where not needed)."""

    old_logp: Tensor | None
    ref_logp: Tensor | None
    values: Tensor | None


def _needs_old_logp(ctx: RLContext) -> bool:
    """The old policy's log-probs are needed unless every update is the first on its rows (mu = 1,
    one mini-batch), where they equal ``logp.detach()``; PPO's KL reward and SPO's drift need them."""
    o = ctx.o
    return (o.ppo_epochs > 1 or o.steps_per_generation > 1 or ctx.parts.has_values
            or ctx.parts.baseline is not None)


@torch.no_grad()
def old_log_probs(ctx: RLContext, batch: RolloutBatch) -> OldPass:
    """Phase 3, one no-grad pass in eval mode (no dropout noise in the ratio): the policy's old_logp
    (when needed) and a shared value head's values, the reference's ref_logp, the critic's values."""
    tr, parts = ctx.trainer, ctx.parts
    chunk = ctx.o.micro_batch_size or len(batch)
    model, need_old = tr.base_model, _needs_old_logp(ctx)
    old, vals = [], []
    models = [m for m in (model, parts.critic) if m is not None]
    for m in models:
        m.eval()
    try:
        for s in range(0, len(batch), chunk):
            ids = batch.input_ids[s:s + chunk].to(tr.device)
            pos = batch.position_ids[s:s + chunk].to(tr.device)
            with tr.ctx.autocast():
                if need_old or parts.value_head is not None:
                    out = model(ids, position_ids=pos)
                    if need_old:
                        old.append(tempered_logps(out.logits, batch.targets[s:s + chunk].to(tr.device),
                                                  parts.temperature))
                    if parts.value_head is not None:
                        vals.append(parts.value_head(out.hidden_states).float())
                if parts.critic is not None:
                    vals.append(parts.critic(ids, pos).float())
    finally:
        for m in models:
            m.train()
    ref = policy_logps(parts.reference, batch, parts.temperature, chunk, tr.device, tr.ctx.autocast) \
        if parts.reference is not None and parts.options.beta > 0 else None  # else only --ptx_loss kl uses it
    return OldPass(torch.cat(old) if old else None, ref, torch.cat(vals) if vals else None)


def _global_zscore(x: Tensor, mask: Tensor | None, info: DistInfo, eps: float = 1e-6) -> Tensor:
    """``(x - mean) / (std + eps)`` with the statistics of every rank's batch (over ``mask`` if given)."""
    if not info.enabled:
        return batch_normalized_advantages(x, eps, mask=mask)
    m = torch.ones_like(x) if mask is None else mask.to(x.dtype)
    s = all_reduce_sum(torch.stack([m.sum(), (x * m).sum(), (x * x * m).sum()]), info)
    n = s[0].clamp(min=1.0)
    mean = s[1] / n
    std = (s[2] / n - mean ** 2).clamp(min=0.0).sqrt()
    return (x - mean) / (std + eps) * m


def _spo_advantages(ctx: RLContext, scored: Scored) -> Tensor:
    """SPO: ``r - v(x)`` with the pre-update baseline, z-scored over the global batch; then every
    rank folds every rank's (prompt, reward) pairs, in rank order, into its baseline copy, so the
    copies stay identical."""
    base = ctx.parts.baseline
    assert base is not None
    raw = scored.rewards - base.values(scored.prompt_ids)
    pairs = all_gather_objects(list(zip(scored.prompt_ids, scored.rewards.tolist())), ctx.info) \
        if ctx.info.enabled else [list(zip(scored.prompt_ids, scored.rewards.tolist()))]
    for rank_pairs in pairs:
        for p, r in rank_pairs:
            base.update(p, r)
    return _global_zscore(raw.to(ctx.trainer.device), None, ctx.info)


@dataclass
class Advantages:
    """Per-row (``[B]``) or per-token (``[B, T]``, GAE) advantages, the loss mask (completion tokens,
    minus truncated rows under overlong filtering) and GAE's value targets."""

    adv: Tensor
    mask: Tensor
    returns: Tensor | None = None


def _gae_advantages(ctx: RLContext, rewards: Tensor, old: OldPass, mask: Tensor) -> Advantages:
    """PPO: per-token reward ``-beta * (old_logp - ref_logp)`` (k1) plus the sequence reward on the
    last completion token, GAE over the critic's values, advantages whitened over every rank's tokens."""
    assert old.values is not None
    o, dev = ctx.o, mask.device
    token_rewards = torch.zeros_like(mask)
    if old.ref_logp is not None and old.old_logp is not None:
        token_rewards -= o.beta * (old.old_logp - old.ref_logp) * mask
    last = (mask * torch.arange(mask.shape[1], device=dev)).argmax(-1)
    has = mask.sum(-1) > 0
    token_rewards[has, last[has]] += rewards[has]
    raw = compute_advantages(ctx.obj, token_rewards, values=old.values, mask=mask,
                             gamma=getattr(o, "gamma", 1.0), lam=getattr(o, "lam", 0.95))
    return Advantages(_global_zscore(raw, mask, ctx.info), mask, (raw + old.values) * mask)


def advantages(ctx: RLContext, scored: Scored, old: OldPass) -> Advantages:
    """Phase 4: the objective's advantage (plus GAE's returns), and the loss mask."""
    dev, obj = ctx.trainer.device, ctx.obj
    mask = scored.batch.completion_mask.to(dev)
    if obj.mask_truncated:
        mask = mask_truncated(mask, scored.batch.truncated.to(dev))
    rewards = scored.rewards.to(dev)
    if obj.advantage == "gae":
        return _gae_advantages(ctx, rewards, old, mask)
    if obj.advantage == "spo":
        return Advantages(_spo_advantages(ctx, scored), mask)
    if obj.advantage == "batch":
        return Advantages(_global_zscore(rewards, None, ctx.info), mask)
    adv = group_advantages(rewards, ctx.o.num_generations, scale=obj.advantage == "group")
    return Advantages(adv.to(dev), mask)
