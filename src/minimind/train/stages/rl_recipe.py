"""The RL recipe: rollouts -> rewards -> advantages -> optimizer steps, for every RL objective.

It sits beside the supervised loop (:mod:`minimind.train.loop`) and shares its run scaffolding
(:class:`~minimind.train.core.Trainer`, output paths, :func:`~minimind.train.loop.resume_if_asked`,
:func:`~minimind.train.loop.open_metrics`, the interrupt-and-save path); the components live in
:mod:`minimind.rl` (objective, rollout, rewards, data, critic, options). One step, on each rank
(``B`` prompts of ``--batch_size``, ``G = --num_generations``)::

    prompts     the epoch's order (SPO: drawn by baseline uncertainty)
    rollout     G samples per prompt through the backend, every request its own seed
    score       CombinedReward (+ soft overlong punishment); DAPO: resample prompts until the batch
                has groups whose rewards differ (at most --dynamic_sampling extra rounds)
    old         one no-grad pass in eval mode: old_logp (skipped when mu = 1 and one optimizer step
                per rollout: then old = logp.detach()), ref_logp (beta > 0), the critic's values (PPO)
    advantages  compute_advantages (group, batch, SPO baseline, GAE with KL in the reward)
    update      mu = --ppo_epochs passes; each splits the rows (shuffled) into
                --steps_per_generation mini-batches, one Trainer.step each; --target_kl stops early;
                a mini-batch without signal (all advantages 0, no KL / value term) takes no step
    metrics     reward, advantage, ratio spread, clip fraction, approx-KL, seconds per phase

Every log-prob is of ``softmax(logits / T)`` with ``T`` the rollout temperature: the distribution
the backend sampled from and whose log-probs it returns (:func:`minimind.rl.objective.tempered_logps`).

Because the loss of a micro-batch is a mean over its own tokens (or sequences, or a constant), each
micro-batch is weighted by that count and :meth:`Trainer.step` combines them as
``sum(loss_i * w_i) / sum(w_i)`` over micro-batches and ranks -- the aggregation the objective
defines over the mini-batch.

PPO (Ouyang et al. 2022 style): the per-token reward is ``r_t = -beta * (old_logp_t - ref_logp_t)``
plus the sequence reward on the last completion token; GAE gives ``A_t`` and the returns
``R_t = A_t + V_old(s_t)``; advantages are whitened over the batch's completion tokens; the value
loss is clipped around the rollout's values::

    L_V = 0.5 * mean_t max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)

Prompt order, sampling seeds, thinking draws and mini-batch shuffles are pure functions of
(seed, step, rank), and the SPO baseline is identical on every rank and saved whole, so a resumed
run continues the interrupted one.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from minimind.config import TrainConfig
from minimind.data.batch import IGNORE_INDEX
from minimind.infer.engine import GenerationEngine
from minimind.infer.sampling import SamplingParams
from minimind.rl.critic import Critic, ValueHead
from minimind.rl.data import PromptDataset, PromptRow
from minimind.rl.objective import (
    ObjectiveConfig,
    SPOBaseline,
    batch_normalized_advantages,
    compute_advantages,
    group_advantages,
    mask_truncated,
    policy_loss,
    tempered_logps,
)
from minimind.rl.options import GROUP_ADVANTAGES, RLOptions, parse_reward_spec
from minimind.rl.rewards import CombinedReward, RewardModel
from minimind.rl.rollout import (
    EngineBackend,
    RolloutBackend,
    RolloutBatch,
    agent_rollouts,
    derive_seed,
    single_turn_rollouts,
    thinking_prompt,
)
from minimind.train.core import Trainer, weights_path
from minimind.train.distributed import DistInfo, all_gather_objects, all_reduce_sum, cleanup
from minimind.train.loop import TrainingInterrupted, TrainResult, open_metrics, resume_if_asked
from minimind.train.metrics import read_metrics
from minimind.train.schedule import lr_at
from minimind.train.stages.base import LossOutput, StageBase

__all__ = ["MessagesRewardModel", "RLContext", "RLMicroBatch", "RLParts", "RLResult", "micro_batch_weight",
           "policy_logps", "rl_loss", "rollout", "train_rl"]


# ---- what the recipe needs from a stage, and the run's context ----------------------------------------
@dataclass
class RLParts:
    """The stage's pieces the recipe reads (built by :meth:`minimind.train.stages.rl.RLStage.parts`):
    resolved options, the objective, and the models besides the policy."""

    name: str
    options: RLOptions
    objective: ObjectiveConfig
    agentic: bool = False
    reference: nn.Module | None = None
    critic: Critic | None = None
    value_head: ValueHead | None = None
    baseline: SPOBaseline | None = None

    @property
    def temperature(self) -> float:
        return float(self.options.temperature)

    @property
    def has_values(self) -> bool:
        return self.critic is not None or self.value_head is not None


@dataclass
class RLContext:
    """One run's moving parts, passed explicitly to every phase of a step."""

    trainer: Trainer
    parts: RLParts
    dataset: PromptDataset
    backend: RolloutBackend
    reward_fn: CombinedReward
    tokenizer: Any
    total: int
    warmup: int
    steps_per_epoch: int

    @property
    def cfg(self) -> TrainConfig:
        return self.trainer.cfg

    @property
    def info(self) -> DistInfo:
        return self.trainer.info

    @property
    def o(self) -> RLOptions:
        return self.parts.options

    @property
    def obj(self) -> ObjectiveConfig:
        return self.parts.objective


# ---- micro-batches and the loss --------------------------------------------------------------------
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


# ---- rollout and score ----------------------------------------------------------------------------
@dataclass
class Scored:
    """A scored rollout batch: row ``k`` is a sample of dataset prompt ``prompt_ids[k]``; groups of
    ``G`` rows are contiguous."""

    batch: RolloutBatch
    prompt_ids: list[int]
    prompt_texts: list[str]
    rewards: Tensor
    parts: dict[str, Tensor]
    rounds: int = 1
    spread_share: float = 1.0


def _concat(batches: Sequence[RolloutBatch], pad_id: int) -> RolloutBatch:
    """Rows of several rollout batches as one, right-padded to the widest."""
    if len(batches) == 1:
        return batches[0]
    width = max(b.shape[1] for b in batches)

    def pad(t: Tensor, value: float) -> Tensor:
        if t.dtype == torch.bool:
            return pad(t.to(torch.uint8), value).bool()
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    def cat(name: str, value: float) -> Tensor:
        return torch.cat([pad(getattr(b, name), value) for b in batches])

    ids = cat("input_ids", pad_id)
    return replace(
        batches[0], input_ids=ids, attention_mask=cat("attention_mask", 0),
        targets=cat("targets", IGNORE_INDEX),
        position_ids=torch.arange(width).expand(ids.shape[0], width).contiguous(),
        completion_mask=cat("completion_mask", 0.0), rollout_logp=cat("rollout_logp", 0.0),
        **{k: torch.cat([getattr(b, k) for b in batches]) for k in
           ("prompt_index", "truncated", "completion_lengths", "prompt_lengths", "sequence_lengths", "turns",
            "tool_calls")},
        texts=[t for b in batches for t in b.texts],
        messages=[m for b in batches for m in (b.messages or [[] for _ in b.texts])])


def _select(batch: RolloutBatch, idx: Sequence[int]) -> RolloutBatch:
    t = torch.tensor(list(idx), dtype=torch.long)
    tensors = {k: v[t] for k, v in vars(batch).items() if isinstance(v, Tensor)}
    return replace(batch, **tensors, texts=[batch.texts[i] for i in idx],
                   messages=[batch.messages[i] for i in idx] if batch.messages is not None else None)


def rollout(parts: RLParts, backend: RolloutBackend, tokenizer: Any, rows: Sequence[PromptRow],
            params: SamplingParams, rng: random.Random, max_prompt: int) -> tuple[RolloutBatch, list[str]]:
    """``G`` samples of every prompt (row ``i * G + j`` is sample ``j`` of prompt ``i``) and the
    rendered prompt texts, one per row, as the rewards read them."""
    o = parts.options
    g = o.num_generations
    pad = int(getattr(tokenizer, "pad_id", 0) or 0)
    if not parts.agentic:
        prompts, texts = [], []
        for r in rows:
            ids, _ = thinking_prompt(r.messages, tokenizer, None, o.thinking_ratio, rng, tools=r.tools)
            ids = ids[-max_prompt:]  # left-truncate, as the reference: the generation prompt survives
            prompts.append(ids)
            texts.append(tokenizer.decode(ids))
        batch = single_turn_rollouts(backend, prompts, params, n=g, pad_id=pad)
        return batch, [texts[i // g] for i in range(len(batch))]
    # agentic: one call per distinct tool set (agent_rollouts offers one list of tools per call)
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(json.dumps(r.tools, sort_keys=True), []).append(i)
    out, order = [], []
    thinking = [rng.random() < o.thinking_ratio for _ in rows]
    for k, idx in enumerate(groups.values()):
        seeded = replace(params, seed=derive_seed(params.seed, k)) if params.seed is not None else params
        part = agent_rollouts(backend, tokenizer, [rows[i].messages for i in idx], rows[idx[0]].tools, seeded,
                              max_turns=o.max_turns, n=g, open_thinking=[thinking[i] for i in idx],
                              max_length=o.max_total_len, pad_id=pad)
        part.prompt_index = torch.tensor([idx[int(p)] for p in part.prompt_index.tolist()])
        out.append(part)
        order += part.prompt_index.tolist()
    batch = _concat(out, pad)
    perm = sorted(range(len(order)), key=lambda k: (order[k], k))  # prompt-major again: groups contiguous
    batch = _select(batch, perm)
    texts = [tokenizer.apply_chat_template(rows[i].messages, tools=rows[i].tools, add_generation_prompt=True,
                                           tokenize=False) for i in batch.prompt_index.tolist()]
    return batch, texts


def _sample_and_score(ctx: RLContext, idx: Sequence[int], params: SamplingParams,
                      rng: random.Random) -> Scored:
    """Roll out the dataset prompts ``idx`` and score every completion (each reward component kept)."""
    rows = [ctx.dataset.rows[i] for i in idx]
    batch, texts = rollout(ctx.parts, ctx.backend, ctx.tokenizer, rows, params, rng, ctx.cfg.max_seq_len)
    row_cols = []
    for k in range(len(batch)):
        row = rows[int(batch.prompt_index[k])]
        cols = dict(row.columns)
        cols.setdefault("max_len", ctx.o.max_gen_len)
        if ctx.o.overlong_buffer > 0:
            cols["cache_len"] = ctx.o.overlong_buffer
        cols["prompt_messages"] = row.messages
        cols["episode_turns"] = int(batch.turns[k])  # for rewards of multi-turn episodes
        cols["episode_tool_calls"] = int(batch.tool_calls[k])
        cols["completion_tokens"] = int(batch.completion_lengths[k])
        row_cols.append(cols)
    rewards, parts = ctx.reward_fn(texts, batch.texts, row_cols)
    return Scored(batch, [idx[int(p)] for p in batch.prompt_index.tolist()], texts, rewards.float().cpu(),
                  {k: v.float().cpu() for k, v in parts.items()})


def _merge(scored: Sequence[Scored], rows: Sequence[int], pad_id: int) -> Scored:
    """The rows ``rows`` (indices into the concatenation of ``scored``) as one :class:`Scored`."""
    batch = _select(_concat([s.batch for s in scored], pad_id), rows)
    ids = [p for s in scored for p in s.prompt_ids]
    texts = [t for s in scored for t in s.prompt_texts]
    sel = torch.tensor(list(rows), dtype=torch.long)
    keys = scored[0].parts.keys()
    return Scored(batch, [ids[i] for i in rows], [texts[i] for i in rows],
                  torch.cat([s.rewards for s in scored])[sel],
                  {k: torch.cat([s.parts[k] for s in scored])[sel] for k in keys})


def dynamic_sampling(ctx: RLContext, first: Scored, draw: Callable[[int], Scored]) -> Scored:
    """DAPO's dynamic sampling: keep the groups whose rewards differ (a group with equal rewards has
    advantage 0 everywhere: no signal) and roll out more prompts (``draw(round)``) until the batch
    holds ``B`` such groups or ``--dynamic_sampling`` extra rounds are spent. Short of ``B``, the
    batch is filled with signal-less groups, whose rows then carry no loss (the step costs what it
    always does, and every rank keeps the same number of rows)."""
    g, want = ctx.o.num_generations, ctx.cfg.batch_size
    rounds = [first]

    def spread(s: Scored) -> list[bool]:
        r = s.rewards.view(-1, g)
        ok = r.max(-1).values - r.min(-1).values > 1e-6
        if ctx.obj.mask_truncated:  # a group whose rows are all cut off trains nothing either
            ok &= ~s.batch.truncated.view(-1, g).all(-1)
        return ok.tolist()

    kept: list[int] = []  # group indices over the concatenation of every round
    flat: list[int] = []
    offset = 0
    for k in range(ctx.o.dynamic_sampling + 1):
        if k > 0:
            if len(kept) >= want:
                break
            rounds.append(draw(k))
        flags = spread(rounds[-1])
        kept += [offset + i for i, f in enumerate(flags) if f]
        flat += [offset + i for i, f in enumerate(flags) if not f]
        offset += len(flags)
    groups = (kept + flat)[:want]
    pad = int(getattr(ctx.tokenizer, "pad_id", 0) or 0)
    merged = _merge(rounds, [gi * g + j for gi in groups for j in range(g)], pad)
    merged.rounds = len(rounds)
    first_flags = spread(first)
    merged.spread_share = sum(first_flags) / max(len(first_flags), 1)
    n_kept = min(len(kept), want)
    if n_kept < want:  # the filler groups: no loss on their rows
        merged.batch.completion_mask[n_kept * g:] = 0.0
    return merged


def rollout_and_score(ctx: RLContext, step: int, idx: list[int]) -> Scored:
    """Phase 1-2: sample and score; every request gets a seed derived from (seed, step, rank, round,
    prompt, sample, turn), so samples are independent and the run reproduces."""
    cfg, o = ctx.cfg, ctx.o
    seed = derive_seed(cfg.seed, step, ctx.info.rank)
    params = SamplingParams(max_new_tokens=o.max_gen_len, temperature=o.temperature, top_k=o.top_k,
                            top_p=o.top_p, stop_token_ids=(ctx.tokenizer.eos_id,), seed=seed)
    first = _sample_and_score(ctx, idx, params, random.Random(seed))
    if o.dynamic_sampling <= 0 or ctx.obj.advantage not in GROUP_ADVANTAGES:
        return first

    def draw(k: int) -> Scored:
        rng = random.Random(derive_seed(seed, k))
        extra = [rng.randrange(len(ctx.dataset)) for _ in range(len(idx))]
        return _sample_and_score(ctx, extra, replace(params, seed=derive_seed(seed, k)), rng)

    return dynamic_sampling(ctx, first, draw)


def pick_prompts(ctx: RLContext, step: int) -> list[int]:
    """This rank's ``--batch_size`` dataset prompts: the epoch's fixed shuffle, or for SPO with
    prioritised sampling a draw (without replacement) weighted by :meth:`SPOBaseline.priorities`;
    both are the same on every rank (the baseline is), and each rank takes its own slice."""
    cfg, info = ctx.cfg, ctx.info
    per_step = cfg.batch_size * info.world_size
    start = info.rank * cfg.batch_size
    base = ctx.parts.baseline
    if base is not None and getattr(ctx.o, "spo_prioritized", 0):
        weights = base.priorities(list(range(len(ctx.dataset))))
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, step, 17))
        chosen = torch.multinomial(weights, per_step, replacement=False, generator=gen).tolist()
        return chosen[start:start + cfg.batch_size]
    epoch, in_epoch = divmod(step, ctx.steps_per_epoch)
    order = ctx.dataset.order(cfg.seed, epoch)
    first = in_epoch * per_step + start
    return order[first:first + cfg.batch_size]


# ---- old log-probs, advantages ---------------------------------------------------------------------
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
        if parts.reference is not None else None
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


# ---- the update ------------------------------------------------------------------------------------
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
            st = tr.step(mbs, lr, loss_fn=loss_fn, weights=[micro_batch_weight(ctx.obj, mb) for mb in mbs])
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
def _spo_drift(ctx: RLContext, batch: RolloutBatch, old_logp: Tensor, mask: Tensor) -> float:
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


# ---- metrics ----------------------------------------------------------------------------------------
_LOSS_KEYS = ("loss", "policy_loss", "kl", "clip_frac", "entropy")


def step_metrics(ctx: RLContext, step: int, scored: Scored, old: OldPass, adv: Advantages, upd: UpdateStats,
                 lr: float, seconds: dict[str, float]) -> dict[str, Any]:
    """Phase 6: one record. Loss metrics are this rank's share of the global mean (summed over
    ranks); rollout statistics are per-rank means of equal-sized batches (averaged over ranks)."""
    info, dev = ctx.info, ctx.trainer.device
    batch, mask = scored.batch, adv.mask
    summed = dict(upd.metrics)
    for k in _LOSS_KEYS:
        summed.setdefault(k, torch.zeros((), device=dev))
    keys = sorted(summed)
    step_vals = all_reduce_sum(torch.stack([summed[k].to(dev) for k in keys]), info).tolist()
    v = adv.adv[mask.bool()] if adv.adv.dim() == 2 else adv.adv
    own = {"reward": scored.rewards.mean().item(), "reward_std": scored.rewards.std(correction=0).item(),
           **CombinedReward.summary(scored.parts), "adv_mean": v.mean().item() if v.numel() else 0.0,
           "adv_std": v.std(correction=0).item() if v.numel() else 0.0,
           "completion_len": batch.completion_lengths.float().mean().item(),
           "truncated_rate": batch.truncated.float().mean().item()}
    if ctx.parts.agentic:
        own["turns"] = batch.turns.float().mean().item()
        own["tool_calls"] = batch.tool_calls.float().mean().item()
    if old.ref_logp is not None and old.old_logp is not None:
        own["kl_ref"] = ((old.old_logp - old.ref_logp) * mask).sum().item() / max(mask.sum().item(), 1.0)
    if ctx.o.dynamic_sampling > 0 and ctx.obj.advantage in GROUP_ADVANTAGES:
        own["sampling_rounds"] = float(scored.rounds)
        own["spread_share"] = float(scored.spread_share)
    own_keys = sorted(own)
    own_vals = (all_reduce_sum(torch.tensor([own[k] for k in own_keys], device=dev), info)
                / info.world_size).tolist()
    gen_tokens = all_reduce_sum(torch.tensor(float(batch.num_completion_tokens), device=dev), info).item()
    epoch = step // ctx.steps_per_epoch
    rec: dict[str, Any] = {"step": step + 1, "epoch": epoch, "lr": lr, "grad_norm": round(upd.grad_norm, 4),
                           "skipped": int(upd.steps == 0), "optimizer_steps": upd.steps,
                           "skipped_steps": upd.skipped, "early_stop": upd.early_stop}
    rec.update({k: round(x, 6) for k, x in zip(keys, step_vals)})
    rec.update({k: round(x, 6) for k, x in zip(own_keys, own_vals)})
    no_update = {"ratio_mean": 1.0, "ratio_std": 0.0, "ratio_min": 1.0, "ratio_max": 1.0, "approx_kl": 0.0}
    rec.update({k: round(x, 6) for k, x in (upd.ratio or no_update).items()})
    rec["rollout_tokens"] = int(gen_tokens)
    rec["rollout_tok_per_s"] = round(gen_tokens / max(seconds["rollout"], 1e-9), 1)
    rec.update({f"sec_{k}": round(x, 3) for k, x in seconds.items() if k != "step"})
    rec["sec_per_step"] = round(seconds["step"], 3)
    return rec


def _debug_print(ctx: RLContext, step: int, scored: Scored) -> None:
    if ctx.o.debug_interval and (step + 1) % ctx.o.debug_interval == 0 and ctx.info.is_main:
        print(f"[step {step + 1}] prompt: {scored.prompt_texts[0]!r}")
        for k in range(min(ctx.o.num_generations, len(scored.batch))):
            print(f"  reward {scored.rewards[k].item():+.3f}: {scored.batch.texts[k]!r}")


def rl_step(ctx: RLContext, step: int) -> dict[str, Any]:
    """One RL step: rollout -> score -> old log-probs -> advantages -> update -> metrics."""
    t0 = time.perf_counter()
    idx = pick_prompts(ctx, step)
    ahead = getattr(ctx.backend, "ahead", None) if ctx.o.overlap else None
    scored = (ahead.take(step, lambda: rollout_and_score(ctx, step, idx)) if ahead is not None
              else rollout_and_score(ctx, step, idx))
    t1 = time.perf_counter()
    old = old_log_probs(ctx, scored.batch)
    adv = advantages(ctx, scored, old)
    lr = lr_at(step, ctx.total, ctx.cfg.learning_rate, ctx.warmup, ctx.cfg.min_lr_ratio)
    t2 = time.perf_counter()
    if ahead is not None and step + 1 < ctx.total:  # --overlap: step k+1's rollouts while this one trains
        ahead.start(step + 1, lambda: rollout_and_score(ctx, step + 1, pick_prompts(ctx, step + 1)))
    upd = update(ctx, step, scored, old, adv, lr)
    if ctx.parts.baseline is not None and old.old_logp is not None and upd.steps:
        ctx.parts.baseline.advance(_spo_drift(ctx, scored.batch, old.old_logp, adv.mask))
    t3 = time.perf_counter()
    _debug_print(ctx, step, scored)
    seconds = {"rollout": t1 - t0, "prepare": t2 - t1, "update": t3 - t2, "step": time.perf_counter() - t0}
    return step_metrics(ctx, step, scored, old, adv, upd, lr, seconds)


# ---- the driver -----------------------------------------------------------------------------------
@dataclass
class RLResult(TrainResult):
    """:class:`TrainResult` plus the logged reward means and every logged record."""

    rewards: list[float] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)


class MessagesRewardModel:
    """A :class:`RewardModel` scoring the prompt's chat *messages* (rendered with the reward model's
    own template) rather than our rendered prompt text, clipped to ``[-clip, clip]`` as the reference
    does (its InternLM2 reward model scores were clipped to [-3, 3])."""

    batched = True
    name = "reward_model"

    def __init__(self, model: RewardModel, clip: float = 3.0) -> None:
        self.model, self.clip = model, clip

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 rows: Sequence[dict[str, Any]]) -> Tensor:
        messages = [list(r.get("prompt_messages") or [{"role": "user", "content": p}])
                    for p, r in zip(prompts, rows)]
        return self.model.score(messages, [c.rsplit("</think>", 1)[-1].strip() for c in completions]
                                ).clamp(-self.clip, self.clip)


def make_reward(o: RLOptions, agentic: bool) -> CombinedReward:
    """The weighted rewards of ``--reward`` (+ the reward model, + DAPO's soft overlong punishment
    as the ``length`` reward over the last ``--overlong_buffer`` tokens, single-turn only)."""
    specs: list[tuple[Any, float]] = list(parse_reward_spec(o.reward, allow_empty=bool(o.reward_model_path)))
    if o.overlong_buffer > 0 and not agentic and not any(name == "length" for name, _ in specs):
        specs.append(("length", 1.0))
    if o.reward_model_path:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = MessagesRewardModel(RewardModel(o.reward_model_path, device=device))
        specs.append((model, o.reward_model_weight))
    return CombinedReward(specs)


def make_backend(trainer: Trainer, tokenizer: Any, parts: RLParts, limit: int) -> RolloutBackend:
    """The one place a rollout backend is built: the in-process engine over the policy, or the
    inference servers of ``--rollout_url`` (:mod:`minimind.rl.remote`)."""
    if parts.options.rollout_backend == "server":
        from minimind.rl.remote import server_backend
        return server_backend(parts.options, trainer.cfg, tokenizer, trainer.base_model, limit, trainer.info)
    engine = GenerationEngine(trainer.base_model, tokenizer, dtype=trainer.dtype, max_batch_len=limit,
                              num_slots=max(1, trainer.cfg.batch_size * parts.options.num_generations),
                              quantize=getattr(parts.options, "quantize", "") or None)
    return EngineBackend(engine)


@dataclass
class RunFiles:
    """Where a run writes: the exported weights, the resume file, the metrics log."""

    weights: Path
    resume: Path
    metrics: Path


def build_context(trainer: Trainer, stage: StageBase, tokenizer: Any) -> tuple[RLContext, RunFiles]:
    """Data, model, optimizer, the stage's parts, rewards and the rollout backend of a run (no step
    taken, nothing resumed); every rank calls it."""
    cfg, info = trainer.cfg, trainer.info
    dataset: PromptDataset = trainer.prepare_data()
    model = trainer.setup_model()
    parts: RLParts = stage.parts()  # type: ignore[attr-defined]
    o = parts.options
    mcfg = model.config
    limit = o.max_total_len if parts.agentic else cfg.max_seq_len + o.max_gen_len
    if limit > mcfg.max_position_embeddings:
        raise ValueError(f"prompt + completion ({limit} positions) exceed the model's "
                         f"max_position_embeddings {mcfg.max_position_embeddings}")
    per_step = cfg.batch_size * info.world_size
    steps_per_epoch = len(dataset) // per_step
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} prompts are fewer than one step's {per_step} "
                         f"(--batch_size x processes)")
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps > 0:
        total = min(total, cfg.max_steps)
    stem = f"{cfg.save_weight}_{mcfg.weight_suffix}"
    files = RunFiles(weights_path(cfg, mcfg), Path(cfg.checkpoint_dir) / f"{stem}_resume.pt",
                     Path(cfg.metrics_path or Path(cfg.save_dir) / f"{stem}_metrics.jsonl"))
    ctx = RLContext(trainer, parts, dataset, make_backend(trainer, tokenizer, parts, limit),
                    make_reward(o, parts.agentic), tokenizer, total, cfg.warmup_steps, steps_per_epoch)
    return ctx, files


def train_rl(stage: StageBase, cfg: TrainConfig, tokenizer: Any,
             on_step: Callable[[int, dict[str, Any]], None] | None = None) -> RLResult:
    """Run an RL stage (:class:`minimind.train.stages.rl.RLStage`, which provides ``parts()``)."""
    trainer = Trainer(stage, cfg, tokenizer)
    try:
        ctx, files = build_context(trainer, stage, tokenizer)
        o = ctx.o
        record = trainer.config_record()
        step = resume_if_asked(trainer, cfg, files.resume, ctx.total)
        if step:
            ctx.backend.refresh(trainer.base_model)
        elif trainer.info.is_main:
            print(f"{trainer.base_model.describe()}  device={trainer.device} "
                  f"dtype={str(trainer.dtype).split('.')[-1]}  {ctx.parts.name} loss_type={o.loss_type} "
                  f"G={o.num_generations} beta={o.beta} mu={o.ppo_epochs} steps_per_generation="
                  f"{o.steps_per_generation}{'  from ' + str(trainer.source) if trainer.source else ''}")
        return _run(ctx, step, files, record, on_step)
    finally:
        cleanup(trainer.info)


def _run(ctx: RLContext, step: int, files: RunFiles, record: dict[str, Any],
         on_step: Callable[[int, dict[str, Any]], None] | None) -> RLResult:
    """Steps until the end (or Ctrl-C: save and raise :class:`TrainingInterrupted`), logging and saving."""
    trainer, cfg, info, total = ctx.trainer, ctx.cfg, ctx.info, ctx.total
    out_path, resume_path, metrics_path = files.weights, files.resume, files.metrics
    metrics = open_metrics(trainer, metrics_path, record, step)
    records: list[dict[str, Any]] = []
    t_run = time.perf_counter()

    def save(at: int) -> None:
        trainer.save(out_path, resume_path, step=at, epoch=min(at // ctx.steps_per_epoch, cfg.epochs - 1),
                     config=record)

    try:
        while step < total:
            rec = rl_step(ctx, step)
            step += 1
            if info.is_main and (step % cfg.log_interval == 0 or step == total):
                metrics.log(rec)
                if cfg.progress:
                    print(f"step {step}/{total} reward {rec['reward']:.4f} loss {rec['loss']:.4f} "
                          f"kl {rec['kl']:.4f} clip {rec['clip_frac']:.3f} len {rec['completion_len']:.1f} "
                          f"{rec['sec_per_step']:.2f}s")
            records.append(rec)
            if (cfg.save_interval > 0 and step % cfg.save_interval == 0) or step == total:
                save(step)
            if on_step is not None:
                on_step(step, rec)
    except KeyboardInterrupt:
        if info.enabled:
            raise
        trainer.optimizer.zero_grad(set_to_none=True)
        save(step)
        print(f"\ninterrupted at step {step}/{total}; saved {resume_path}. Continue with the same "
              f"command plus --from_resume 1", file=sys.stderr)
        raise TrainingInterrupted(step, resume_path) from None
    if not records and metrics_path.exists():
        records = read_metrics(metrics_path)
    seconds = time.perf_counter() - t_run
    losses = [r["loss"] for r in records]
    generated = sum(r["rollout_tokens"] for r in records if "rollout_tokens" in r) / max(seconds, 1e-9)
    return RLResult(weights_path=out_path, resume_path=resume_path, metrics_path=metrics_path, steps=step,
                    final_loss=losses[-1] if losses else math.nan, losses=losses, seconds=seconds,
                    tokens_per_s=generated, useful_tokens_per_s=generated,
                    rewards=[r["reward"] for r in records], records=records)
