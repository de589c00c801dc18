"""The RL recipe: rollouts -> rewards -> advantages -> optimizer steps, for every RL objective.

It sits beside the supervised loop (:mod:`minimind.train.loop`) and shares its run scaffolding
(:class:`~minimind.train.core.Trainer`, output paths, :func:`~minimind.train.loop.resume_if_asked`,
:func:`~minimind.train.loop.open_metrics`, the interrupt-and-save path); the components live in
:mod:`minimind.rl` (objective, rollout, rewards, data, critic, options). One step, on each rank
(``B`` prompts of ``--batch_size``, ``G = --num_generations``)::

    prompts     the epoch's order (SPO: drawn by baseline uncertainty)
    rollout     G samples per prompt through the backend, every request its own seed
    score       CombinedReward (+ soft overlong punishment); --guidance: a group that misses its
                row's reference reply gets it in place of its last sample (LUFFY); DAPO: resample
                prompts until the batch has groups whose rewards differ (at most --dynamic_sampling
                extra rounds)
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

Where the pieces are: the stage's parts and the run's context in
:mod:`~minimind.train.stages.rl_context`, the run's setup (rewards, backend, files) in
:mod:`~minimind.train.stages.rl_setup`, rollouts and DAPO in :mod:`~minimind.train.stages.rl_rollout`,
the old pass and advantages in :mod:`~minimind.train.stages.rl_advantages`, the loss in
:mod:`~minimind.train.stages.rl_loss`, the optimizer steps in :mod:`~minimind.train.stages.rl_update`;
this module holds the step that strings them together and the driver. Their public names are
re-exported here, and the step calls :func:`rollout` through this module, so a test that replaces
``rl_recipe.rollout`` sees every rollout of the run.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from minimind.config import TrainConfig
from minimind.infer.sampling import SamplingParams
from minimind.rl.data import PromptRow
from minimind.rl.options import GROUP_ADVANTAGES
from minimind.rl.rewards import CombinedReward
from minimind.rl.rollout import derive_seed
from minimind.train.core import Trainer
from minimind.train.distributed import all_reduce_sum
from minimind.train.loop import TrainingInterrupted, TrainResult, open_metrics, resume_if_asked
from minimind.train.metrics import read_metrics
from minimind.train.schedule import lr_at
from minimind.train.stages.base import StageBase
from minimind.train.stages.rl_advantages import Advantages, OldPass, advantages, old_log_probs, policy_logps
from minimind.train.stages.rl_context import RLContext, RLParts
from minimind.train.stages.rl_guidance import guide
from minimind.train.stages.rl_loss import (
    RatioStats,
    RLMicroBatch,
    clipped_value_loss,
    masked_entropy,
    micro_batch_weight,
    rl_loss,
)
from minimind.train.stages.rl_rollout import Scored, dynamic_sampling, pick_prompts, rollout
from minimind.train.stages.rl_setup import (
    MessagesRewardModel,
    RunFiles,
    build_context,
    make_backend,
    make_reward,
)
from minimind.train.stages.rl_update import UpdateStats, spo_drift, update

__all__ = ["Advantages", "MessagesRewardModel", "OldPass", "RLContext", "RLMicroBatch", "RLParts", "RLResult",
           "RatioStats", "RunFiles", "Scored", "UpdateStats", "advantages", "build_context",
           "clipped_value_loss", "dynamic_sampling", "make_backend", "make_reward", "masked_entropy",
           "micro_batch_weight", "old_log_probs", "pick_prompts", "policy_logps", "rl_loss", "rl_step",
           "rollout", "rollout_and_score", "step_metrics", "train_rl", "update"]


# ---- rollout and score ----------------------------------------------------------------------------
def _reward_columns(ctx: RLContext, row: PromptRow, turns: int, tool_calls: int,
                    completion_tokens: int) -> dict[str, Any]:
    """What the rewards read of one completion besides its text: the row's columns and the episode's."""
    cols = dict(row.columns)
    cols.setdefault("max_len", ctx.o.max_gen_len)
    if ctx.o.overlong_buffer > 0:
        cols["cache_len"] = ctx.o.overlong_buffer
    cols["prompt_messages"] = row.messages
    cols["episode_turns"] = turns  # for rewards of multi-turn episodes
    cols["episode_tool_calls"] = tool_calls
    cols["completion_tokens"] = completion_tokens
    return cols


def _sample_and_score(ctx: RLContext, idx: Sequence[int], params: SamplingParams,
                      rng: random.Random) -> Scored:
    """Roll out the dataset prompts ``idx`` and score every completion (each reward component kept);
    with ``--guidance``, groups that miss their row's reference get it (:mod:`rl_guidance`).
    ``rollout`` is looked up in this module at call time: a test may replace ``rl_recipe.rollout``."""
    rows = [ctx.dataset.rows[i] for i in idx]
    batch, texts = rollout(ctx.parts, ctx.backend, ctx.tokenizer, rows, params, rng, ctx.cfg.max_seq_len)
    row_cols = [_reward_columns(ctx, rows[int(batch.prompt_index[k])], int(batch.turns[k]),
                                int(batch.tool_calls[k]), int(batch.completion_lengths[k]))
                for k in range(len(batch))]
    rewards, parts = ctx.reward_fn(texts, batch.texts, row_cols)
    prompt_ids = [idx[int(p)] for p in batch.prompt_index.tolist()]
    rewards, parts = rewards.float().cpu(), {k: v.float().cpu() for k, v in parts.items()}
    if not getattr(ctx.o, "guidance", 0) or ctx.parts.agentic:
        return Scored(batch, prompt_ids, texts, rewards, parts)

    def score(prompts: list[str], replies: list[str], ids: list[int],
              tokens: list[int]) -> tuple[Tensor, dict[str, Tensor]]:
        cols = [_reward_columns(ctx, ctx.dataset.rows[i], 1, 0, n) for i, n in zip(ids, tokens)]
        return ctx.reward_fn(prompts, replies, cols)

    batch, rewards, parts, refs = guide(ctx.tokenizer, ctx.dataset.rows, batch, prompt_ids, texts, rewards,
                                        parts, ctx.o.num_generations, ctx.o.max_gen_len, score)
    references = torch.zeros(len(batch), dtype=torch.bool)
    references[refs] = True
    return Scored(batch, prompt_ids, texts, rewards, parts, references=references)


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
    sampled = scored.sampled  # rollout statistics of the policy's own samples (not --guidance's references)
    rewards = scored.rewards[sampled]
    parts = {name: part[sampled] for name, part in scored.parts.items()}
    own = {"reward": rewards.mean().item(), "reward_std": rewards.std(correction=0).item(),
           **CombinedReward.summary(parts), "adv_mean": v.mean().item() if v.numel() else 0.0,
           "adv_std": v.std(correction=0).item() if v.numel() else 0.0,
           "completion_len": batch.completion_lengths[sampled].float().mean().item(),
           "truncated_rate": batch.truncated[sampled].float().mean().item()}
    if ctx.parts.agentic:
        own["turns"] = batch.turns.float().mean().item()
        own["tool_calls"] = batch.tool_calls.float().mean().item()
    if old.ref_logp is not None and old.old_logp is not None:
        own["kl_ref"] = ((old.old_logp - old.ref_logp) * mask).sum().item() / max(mask.sum().item(), 1.0)
    if getattr(ctx.o, "guidance", 0):
        own["guided"] = float((~sampled).sum()) * ctx.o.num_generations / max(len(batch), 1)  # share of groups
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
        ctx.parts.baseline.advance(spo_drift(ctx, scored.batch, old.old_logp, adv.mask))
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


def train_rl(stage: StageBase, cfg: TrainConfig, tokenizer: Any,
             on_step: Callable[[int, dict[str, Any]], None] | None = None) -> RLResult:
    """Run an RL stage (:class:`minimind.train.stages.rl.RLStage`, which provides ``parts()``)."""
    trainer = Trainer(stage, cfg, tokenizer)
    finished = False  # every rank got to the end: meet at a barrier before the group goes
    try:
        ctx, files = build_context(trainer, stage, tokenizer)
        o = ctx.o
        record = trainer.config_record()
        step = resume_if_asked(trainer, cfg, files.resume, ctx.total)
        trainer.keep_tokenizer()
        if step:
            ctx.backend.refresh(trainer.base_model)
        elif trainer.info.is_main:
            print(f"{trainer.base_model.describe()}  device={trainer.device} "
                  f"dtype={str(trainer.dtype).split('.')[-1]}  {ctx.parts.name} loss_type={o.loss_type} "
                  f"G={o.num_generations} beta={o.beta} mu={o.ppo_epochs} steps_per_generation="
                  f"{o.steps_per_generation}{'  from ' + str(trainer.source) if trainer.source else ''}")
        result = _run(ctx, step, files, record, on_step)
        finished = True
        return result
    finally:
        trainer.close(finished)


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
