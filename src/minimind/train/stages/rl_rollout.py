"""Rollout batches of an RL step: ``G`` samples of every prompt (single-turn or agentic tool
episodes), DAPO's dynamic sampling over scored rounds, and which prompts a rank rolls out.

Scoring (the rewards of a batch) is the recipe's (:func:`minimind.train.stages.rl_recipe.rollout_and_score`),
which calls :func:`rollout` through its own namespace.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from minimind.data.batch import IGNORE_INDEX
from minimind.infer.sampling import SamplingParams
from minimind.rl.data import PromptRow
from minimind.rl.rollout import (
    RolloutBackend,
    RolloutBatch,
    agent_rollouts,
    derive_seed,
    single_turn_rollouts,
    thinking_prompt,
)
from minimind.train.stages.rl_context import RLContext, RLParts

__all__ = ["Scored", "concat_rows", "dynamic_sampling", "pick_prompts", "rollout", "select_rows"]


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
    references: Tensor | None = None  # [N] bool: the row is a group's reference reply (--guidance)

    @property
    def sampled(self) -> Tensor:
        """[N] bool: the rows the policy sampled (every row but the references)."""
        if self.references is None:
            return torch.ones(len(self.batch), dtype=torch.bool)
        return ~self.references


def concat_rows(batches: Sequence[RolloutBatch], pad_id: int) -> RolloutBatch:
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


def select_rows(batch: RolloutBatch, idx: Sequence[int]) -> RolloutBatch:
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
    batch = concat_rows(out, pad)
    perm = sorted(range(len(order)), key=lambda k: (order[k], k))  # prompt-major again: groups contiguous
    batch = select_rows(batch, perm)
    texts = [tokenizer.apply_chat_template(rows[i].messages, tools=rows[i].tools, add_generation_prompt=True,
                                           tokenize=False) for i in batch.prompt_index.tolist()]
    return batch, texts


def _merge(scored: Sequence[Scored], rows: Sequence[int], pad_id: int) -> Scored:
    """The rows ``rows`` (indices into the concatenation of ``scored``) as one :class:`Scored`."""
    batch = select_rows(concat_rows([s.batch for s in scored], pad_id), rows)
    ids = [p for s in scored for p in s.prompt_ids]
    texts = [t for s in scored for t in s.prompt_texts]
    sel = torch.tensor(list(rows), dtype=torch.long)
    keys = scored[0].parts.keys()
    refs = None
    if any(s.references is not None for s in scored):
        refs = torch.cat([~s.sampled for s in scored])[sel]
    return Scored(batch, [ids[i] for i in rows], [texts[i] for i in rows],
                  torch.cat([s.rewards for s in scored])[sel],
                  {k: torch.cat([s.parts[k] for s in scored])[sel] for k in keys}, references=refs)


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
