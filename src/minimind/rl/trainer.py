"""The one RL driver: rollouts -> rewards -> advantages -> optimizer steps, for every RL objective.

One step, on each rank (``B`` prompts of ``--batch_size``, ``G = --num_generations``)::

    prompts (chat template; <think> opened with probability --thinking_ratio)
    -> rollouts: G samples per prompt through the inference engine (token ids + the engine's log-probs)
    -> rewards: CombinedReward over --reward specs (+ a reward model), every component logged
    -> one no-grad pass of the policy: old_logp (= the policy's log-probs before the first update),
       ref_logp from the frozen reference only when beta > 0, values V(s_t) for PPO
    -> advantages: compute_advantages(ObjectiveConfig)  (group z-score, group mean, batch, SPO, GAE)
    -> --ppo_epochs x Trainer.step(micro-batches, loss_fn=rl_loss): the policy's logp with gradient,
       policy_loss(cfg, logp, old_logp, adv, mask, ref_logp, rollout_logp)  (+ PPO's value loss)
    -> engine.refresh_weights(model): the next rollouts sample from the updated policy

Because the loss of a micro-batch is a mean over its own tokens (or sequences, or a constant), each
micro-batch is weighted by that count and :meth:`Trainer.step` combines them as
``sum(loss_i * w_i) / sum(w_i)`` over micro-batches and ranks -- exactly the aggregation the
objective defines over the whole rollout batch.

PPO (Ouyang et al. 2022 style): the per-token reward is ``r_t = -beta * (old_logp_t - ref_logp_t)``
plus the sequence reward on the last completion token; GAE gives ``A_t`` and the returns
``R_t = A_t + V_old(s_t)``; advantages are whitened over the batch's completion tokens; the value
loss is clipped around the rollout's values::

    L_V = 0.5 * mean_t max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)

Prompt order is a pure function of (seed, epoch, step) and every step's sampling seed and thinking
draws are derived from (seed, step, rank), so a resumed run continues the interrupted one.
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
from torch import Tensor, nn

from minimind.config import TrainConfig
from minimind.data.batch import IGNORE_INDEX
from minimind.data.formats import chat_messages
from minimind.infer.engine import GenerationEngine
from minimind.infer.sampling import SamplingParams
from minimind.rl.objective import (
    ObjectiveConfig,
    batch_normalized_advantages,
    compute_advantages,
    mask_truncated,
    policy_loss,
)
from minimind.rl.rewards import CombinedReward, RewardModel
from minimind.rl.rollout import (
    EngineBackend,
    RolloutBatch,
    agent_rollouts,
    single_turn_rollouts,
    thinking_prompt,
)
from minimind.train.core import Trainer, weights_path
from minimind.train.distributed import all_reduce_sum, cleanup
from minimind.train.loop import TrainingInterrupted, TrainResult, open_metrics, resume_if_asked
from minimind.train.losses import token_logps
from minimind.train.metrics import read_metrics
from minimind.train.schedule import lr_at
from minimind.train.stages.base import LossOutput

__all__ = ["MessagesRewardModel", "PromptDataset", "PromptRow", "RLMicroBatch", "RLResult", "micro_batch_weight",
           "rl_loss", "train_rl"]

#: The columns each registered rule reward reads from a row (checked when the data is loaded).
REWARD_COLUMNS: dict[str, tuple[str, ...]] = {"task": ("kind", "gt"), "math": ("gt",),
                                              "task_format": ("kind",), "tool_call": ("tool_calls",)}


# ---- data ----------------------------------------------------------------------------------------
@dataclass
class PromptRow:
    """One RL prompt: the messages before the reply, the tools offered, and the row's other columns
    (``gt``, ``kind``, ``tool_calls`` ...) that rewards read."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    columns: dict[str, Any]


class PromptDataset:
    """RL prompt rows (``{"conversations": [..., user, (empty assistant placeholder)], "gt", "kind"}``:
    the reference ``rlaif.jsonl`` / ``agent_rl.jsonl`` shape and :func:`minimind.tasks.task_to_rl_row`)."""

    def __init__(self, rows: list[PromptRow]) -> None:
        if not rows:
            raise ValueError("no RL prompts")
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def num_rows(self, epoch: int) -> int:
        return len(self.rows)

    @staticmethod
    def parse(obj: Any) -> PromptRow:
        if not isinstance(obj, dict) or "conversations" not in obj:
            raise ValueError("expected an object with 'conversations'")
        conv = obj["conversations"]
        if isinstance(conv, str):
            conv = json.loads(conv)
        conv = [json.loads(m) if isinstance(m, str) else m for m in conv]
        messages, tools = chat_messages(conv, require_assistant=False)
        while messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"].strip() \
                and "tool_calls" not in messages[-1]:
            messages.pop()  # the empty placeholder of the reply to generate
        if not messages or messages[-1]["role"] not in ("user", "tool"):
            raise ValueError("the prompt must end with a user (or tool) turn, optionally followed by an "
                             "empty assistant placeholder")
        columns = {k: v for k, v in obj.items() if k != "conversations"}
        return PromptRow(messages, tools, columns)

    @classmethod
    def from_jsonl(cls, path: str | Path, skip_bad_lines: bool = False,
                   rewards: Sequence[str] = ()) -> PromptDataset:
        """Read and validate every row; rows lacking a column a named reward reads are refused."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"RL data not found: {path}")
        rows: list[PromptRow] = []
        skipped = 0
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = cls.parse(json.loads(line))
                    for name in rewards:
                        missing = [c for c in REWARD_COLUMNS.get(name, ()) if c not in row.columns]
                        if missing:
                            raise ValueError(f"reward {name!r} needs the column(s) {missing}; choose "
                                             f"--reward to fit the data (e.g. format:1, or a reward model)")
                except (ValueError, json.JSONDecodeError) as e:
                    if not skip_bad_lines:
                        raise ValueError(f"{path}:{n}: {e}") from None
                    skipped += 1
                    continue
                rows.append(row)
        if skipped:
            print(f"warning: skipped {skipped} bad lines of {path}", file=sys.stderr)
        return cls(rows)

    def order(self, seed: int, epoch: int) -> list[int]:
        """The epoch's prompt order: a fixed shuffle of (seed, epoch)."""
        idx = list(range(len(self.rows)))
        random.Random(seed * 1_000_003 + epoch).shuffle(idx)
        return idx


# ---- micro-batches and the loss --------------------------------------------------------------------
@dataclass
class RLMicroBatch:
    """Rows of a rollout batch with everything the loss needs, aligned like :class:`RolloutBatch`
    (per-token tensors are indexed by the position whose *target* is the token)."""

    input_ids: Tensor
    position_ids: Tensor
    targets: Tensor
    mask: Tensor
    adv: Tensor
    old_logp: Tensor
    rollout_logp: Tensor
    ref_logp: Tensor | None = None
    old_values: Tensor | None = None
    returns: Tensor | None = None
    max_tokens: int | None = None

    def to(self, device: torch.device | str) -> RLMicroBatch:
        return replace(self, **{k: v.to(device) for k, v in vars(self).items() if isinstance(v, Tensor)})


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
    """Mean entropy ``H = logsumexp(z) - sum softmax(z) * z`` of the policy over completion tokens,
    in chunks so no ``[N, V]`` float32 copy of every position is held at once."""
    sel = logits[mask.bool()]
    if sel.numel() == 0:
        return torch.zeros((), device=logits.device)
    total = torch.zeros((), device=logits.device)
    for chunk in sel.split(1024):
        z = chunk.float()
        total += (torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)).sum()
    return total / sel.shape[0]


def rl_loss(stage: Any, model: nn.Module, mb: RLMicroBatch) -> LossOutput:
    """``policy_loss`` of the micro-batch (plus PPO's clipped value loss and the MoE aux loss)."""
    cfg: ObjectiveConfig = stage.objective
    out = model(mb.input_ids, position_ids=mb.position_ids)
    logp = token_logps(out.logits, mb.targets)
    loss, stats = policy_loss(cfg, logp, mb.old_logp, mb.adv, mb.mask, ref_logp=mb.ref_logp,
                              rollout_logp=mb.rollout_logp, max_tokens=mb.max_tokens)
    m = mb.mask
    n = m.sum().clamp(min=1.0)
    log_ratio = (logp.detach() - mb.old_logp) * m
    metrics: dict[str, Any] = {**stats, "kl": stats.get("kl", 0.0), "clip_frac": stats.get("clip_frac", 0.0),
                               "approx_kl": (0.5 * log_ratio ** 2).sum() / n,
                               "entropy": masked_entropy(out.logits.detach(), m)}
    if stage.value_head is not None and mb.returns is not None and mb.old_values is not None:
        values = stage.value_head(out.hidden_states)
        err = (values - mb.returns) ** 2
        c = getattr(stage.options, "cliprange_value", 0.0)
        if c > 0:
            clipped = mb.old_values + (values - mb.old_values).clamp(-c, c)
            err = torch.maximum(err, (clipped - mb.returns) ** 2)
        value_loss = 0.5 * (err * m).sum() / n
        loss = loss + stage.options.vf_coef * value_loss
        metrics["value_loss"] = value_loss.detach()
        metrics["value_mean"] = ((values.detach() * m).sum() / n)
    return LossOutput(loss=loss + out.aux_loss, weight=micro_batch_weight(cfg, mb), metrics=metrics)


# ---- one rollout batch ------------------------------------------------------------------------------
def _concat(batches: Sequence[RolloutBatch], pad_id: int) -> RolloutBatch:
    """Rows of several rollout batches as one, right-padded to the widest (agent groups by tool set)."""
    width = max(b.shape[1] for b in batches)

    def pad(t: Tensor, value: float) -> Tensor:
        if t.dtype == torch.bool:
            return pad(t.to(torch.uint8), value).bool()
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    def cat(name: str, value: float) -> Tensor:
        return torch.cat([pad(getattr(b, name), value) for b in batches])

    ids = cat("input_ids", pad_id)
    return replace(
        batches[0], input_ids=ids, attention_mask=cat("attention_mask", 0), targets=cat("targets", IGNORE_INDEX),
        position_ids=torch.arange(width).expand(ids.shape[0], width).contiguous(),
        completion_mask=cat("completion_mask", 0.0), rollout_logp=cat("rollout_logp", 0.0),
        **{k: torch.cat([getattr(b, k) for b in batches]) for k in
           ("prompt_index", "truncated", "completion_lengths", "prompt_lengths", "sequence_lengths", "turns",
            "tool_calls")},
        texts=[t for b in batches for t in b.texts],
        messages=[m for b in batches for m in (b.messages or [[] for _ in b.texts])])


def rollout(stage: Any, backend: EngineBackend, tokenizer: Any, rows: Sequence[PromptRow], params: SamplingParams,
            rng: random.Random, max_prompt: int) -> tuple[RolloutBatch, list[str]]:
    """``G`` samples of every prompt (row ``i * G + j`` is sample ``j`` of prompt ``i``) and the
    rendered prompt texts, one per row, as the rewards read them."""
    o = stage.options
    g = o.num_generations
    pad = int(getattr(tokenizer, "pad_id", 0) or 0)
    if not stage.agentic:
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
    parts, order = [], []
    thinking = [rng.random() < o.thinking_ratio for _ in rows]
    for idx in groups.values():
        part = agent_rollouts(backend, tokenizer, [rows[i].messages for i in idx], rows[idx[0]].tools, params,
                              max_turns=o.max_turns, n=g, open_thinking=[thinking[i] for i in idx],
                              max_length=o.max_total_len, pad_id=pad)
        part.prompt_index = torch.tensor([idx[int(k)] for k in part.prompt_index.tolist()])
        parts.append(part)
        order += part.prompt_index.tolist()
    batch = _concat(parts, pad) if len(parts) > 1 else parts[0]
    perm = sorted(range(len(order)), key=lambda k: (order[k], k))  # prompt-major again: groups contiguous
    batch = _select(batch, perm)
    texts = [tokenizer.apply_chat_template(rows[i].messages, tools=rows[i].tools, add_generation_prompt=True,
                                           tokenize=False) for i in batch.prompt_index.tolist()]
    return batch, texts


def _select(batch: RolloutBatch, idx: Sequence[int]) -> RolloutBatch:
    t = torch.tensor(list(idx), dtype=torch.long)
    tensors = {k: v[t] for k, v in vars(batch).items() if isinstance(v, Tensor)}
    return replace(batch, **tensors, texts=[batch.texts[i] for i in idx],
                   messages=[batch.messages[i] for i in idx] if batch.messages is not None else None)


@torch.no_grad()
def _forward_pass(trainer: Trainer, stage: Any, batch: RolloutBatch, rows_per_mb: int
                  ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``old_logp`` (the policy before this step's updates), ``ref_logp`` (beta > 0) and the values
    (PPO), computed in micro-batches without gradient."""
    old, ref, val = [], [], []
    for s in range(0, len(batch), rows_per_mb):
        ids = batch.input_ids[s:s + rows_per_mb].to(trainer.device)
        pos = batch.position_ids[s:s + rows_per_mb].to(trainer.device)
        tgt = batch.targets[s:s + rows_per_mb].to(trainer.device)
        with trainer.ctx.autocast():
            out = trainer.model(ids, position_ids=pos)
            old.append(token_logps(out.logits, tgt))
            if stage.value_head is not None:
                val.append(stage.value_head(out.hidden_states).float())
            if stage.reference is not None:
                ref.append(token_logps(stage.reference(ids, position_ids=pos).logits, tgt))
    return torch.cat(old), (torch.cat(ref) if ref else None), (torch.cat(val) if val else None)


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


def _reward_fn(stage: Any) -> CombinedReward:
    from minimind.train.stages.rl import parse_reward_spec
    o = stage.options
    specs: list[tuple[Any, float]] = list(parse_reward_spec(o.reward, allow_empty=bool(o.reward_model_path)))
    if o.reward_model_path:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        specs.append((MessagesRewardModel(RewardModel(o.reward_model_path, device=device)), o.reward_model_weight))
    return CombinedReward(specs)


def train_rl(stage: Any, cfg: TrainConfig, tokenizer: Any,
             on_step: Callable[[int, dict[str, float]], None] | None = None) -> RLResult:
    """Run the RL ``stage`` (:class:`minimind.train.stages.rl.RLStage`) with ``cfg``."""
    trainer = Trainer(stage, cfg, tokenizer)
    info = trainer.info
    try:
        dataset: PromptDataset = trainer.prepare_data()
        reward_fn = _reward_fn(stage)
        model = trainer.setup_model()
        mcfg = model.config
        o = stage.options
        limit = o.max_total_len if stage.agentic else cfg.max_seq_len + o.max_gen_len
        if limit > mcfg.max_position_embeddings:
            raise ValueError(f"prompt + completion ({limit} positions) exceed the model's "
                             f"max_position_embeddings {mcfg.max_position_embeddings}")
        out_path = weights_path(cfg, mcfg)
        resume_path = Path(cfg.checkpoint_dir) / f"{cfg.save_weight}_{mcfg.weight_suffix}_resume.pt"
        metrics_path = Path(cfg.metrics_path or Path(cfg.save_dir) /
                            f"{cfg.save_weight}_{mcfg.weight_suffix}_metrics.jsonl")
        per_step = cfg.batch_size * info.world_size
        steps_per_epoch = len(dataset) // per_step
        if steps_per_epoch == 0:
            raise ValueError(f"{len(dataset)} prompts are fewer than one step's {per_step} "
                             f"(--batch_size x processes)")
        total = steps_per_epoch * cfg.epochs
        if cfg.max_steps > 0:
            total = min(total, cfg.max_steps)
        warmup = cfg.warmup_steps
        record = trainer.config_record()
        step = resume_if_asked(trainer, cfg, resume_path, total)
        if not step and info.is_main:
            print(f"{model.describe()}  device={trainer.device} dtype={str(trainer.dtype).split('.')[-1]}  "
                  f"{stage.name} loss_type={o.loss_type} G={o.num_generations} beta={o.beta}"
                  f"{'  from ' + str(trainer.source) if trainer.source else ''}")
        engine = GenerationEngine(model, tokenizer, dtype=trainer.dtype, max_batch_len=limit,
                                  num_slots=max(1, cfg.batch_size * o.num_generations))
        backend = EngineBackend(engine)
        if step:
            backend.refresh(model)
        metrics = open_metrics(trainer, metrics_path, record, step)
        records: list[dict[str, Any]] = []
        t_run = time.perf_counter()

        def save(at: int) -> None:
            trainer.save(out_path, resume_path, step=at, epoch=min(at // steps_per_epoch, cfg.epochs - 1),
                         config=record)

        try:
            while step < total:
                rec = _one_step(trainer, stage, dataset, backend, reward_fn, tokenizer, step, total, warmup,
                                steps_per_epoch)
                step += 1
                if info.is_main and (step % cfg.log_interval == 0 or step == total):
                    metrics.log(rec)
                    if cfg.progress:
                        print(f"step {step}/{total} reward {rec['reward']:.4f} loss {rec['loss']:.4f} "
                              f"kl {rec['kl']:.4f} len {rec['completion_len']:.1f} {rec['sec_per_step']:.2f}s")
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
    finally:
        cleanup(info)


def _one_step(trainer: Trainer, stage: Any, dataset: PromptDataset, backend: EngineBackend,
              reward_fn: CombinedReward, tokenizer: Any, step: int, total: int, warmup: int,
              steps_per_epoch: int) -> dict[str, Any]:
    cfg, info, o = trainer.cfg, trainer.info, stage.options
    obj: ObjectiveConfig = stage.objective
    t0 = time.perf_counter()
    epoch, in_epoch = divmod(step, steps_per_epoch)
    order = dataset.order(cfg.seed, epoch)
    first = (in_epoch * info.world_size + info.rank) * cfg.batch_size
    idx = order[first:first + cfg.batch_size]
    rows = [dataset.rows[i] for i in idx]
    seed = (cfg.seed * 1_000_003 + step) * 1009 + info.rank
    rng = random.Random(seed)
    params = SamplingParams(max_new_tokens=o.max_gen_len, temperature=o.temperature, top_k=o.top_k,
                            top_p=o.top_p, stop_token_ids=(tokenizer.eos_id,), seed=seed % (2 ** 63))

    # 1. rollouts
    t_gen = time.perf_counter()
    batch, prompt_texts = rollout(stage, backend, tokenizer, rows, params, rng, cfg.max_seq_len)
    gen_seconds = time.perf_counter() - t_gen
    n = len(batch)
    group = o.num_generations

    # 2. rewards (every component logged)
    row_cols = []
    for k in range(n):
        cols = dict(rows[int(batch.prompt_index[k])].columns)
        cols.setdefault("max_len", o.max_gen_len)
        cols["prompt_messages"] = rows[int(batch.prompt_index[k])].messages
        cols["episode_turns"] = int(batch.turns[k])  # for rewards of multi-turn episodes
        cols["episode_tool_calls"] = int(batch.tool_calls[k])
        cols["completion_tokens"] = int(batch.completion_lengths[k])
        row_cols.append(cols)
    rewards, parts = reward_fn(prompt_texts, batch.texts, row_cols)

    # 3. old / reference log-probs and values, no gradient
    rows_per_mb = o.mini_batch_size or n
    old_logp, ref_logp, values = _forward_pass(trainer, stage, batch, rows_per_mb)
    dev = old_logp.device
    mask = batch.completion_mask.to(dev)
    if obj.mask_truncated:
        mask = mask_truncated(mask, batch.truncated.to(dev))

    # 4. advantages
    returns = None
    if obj.advantage == "gae":
        token_rewards = torch.zeros_like(mask)
        if ref_logp is not None:
            token_rewards -= o.beta * (old_logp - ref_logp) * mask
        last = (mask * torch.arange(mask.shape[1], device=dev)).argmax(-1)
        has = mask.sum(-1) > 0
        token_rewards[has, last[has]] += rewards.to(dev)[has]
        raw = compute_advantages(obj, token_rewards, values=values, mask=mask, gamma=o.gamma, lam=o.lam)
        returns = (raw + values) * mask
        adv = batch_normalized_advantages(raw, mask=mask)
    else:
        prompt_ids = [idx[int(p)] for p in batch.prompt_index.tolist()]
        adv = compute_advantages(obj, rewards, group_size=group, prompt_ids=prompt_ids,
                                 baseline=stage.baseline).to(dev)

    # 5. optimizer steps over micro-batches
    def micro(s: int) -> RLMicroBatch:
        sl = slice(s, s + rows_per_mb)
        return RLMicroBatch(
            input_ids=batch.input_ids[sl], position_ids=batch.position_ids[sl], targets=batch.targets[sl],
            mask=mask[sl], adv=adv[sl], old_logp=old_logp[sl], rollout_logp=batch.rollout_logp[sl],
            ref_logp=ref_logp[sl] if ref_logp is not None and obj.kl != "none" else None,
            old_values=values[sl] if values is not None else None,
            returns=returns[sl] if returns is not None else None, max_tokens=o.max_gen_len)

    micro_batches = [micro(s) for s in range(0, n, rows_per_mb)]
    lr = lr_at(step, total, cfg.learning_rate, warmup, cfg.min_lr_ratio)
    summed: dict[str, Tensor] = {}
    grad_norm = 0.0
    # No signal, no update: when every advantage is zero (each group's rewards all equal) and no KL
    # or value term is trained, the gradient is exactly zero, yet an Adam step would still move the
    # weights along its momentum.  Such a step runs at lr 0 (the loss statistics are still logged).
    # Every rank must agree, so the flag is summed over ranks.
    signal = float(adv.abs().max().item() > 1e-8 or obj.kl != "none" or returns is not None)
    skip = all_reduce_sum(torch.tensor(signal, device=trainer.device), info).item() == 0
    for _ in range(o.ppo_epochs):
        st = trainer.step(micro_batches, 0.0 if skip else lr, loss_fn=lambda model, mb: rl_loss(stage, model, mb))
        for k, v in {"loss": st.loss, **st.metrics}.items():
            summed[k] = summed.get(k, 0.0) + v.float() / o.ppo_epochs
        grad_norm = float(st.grad_norm)
    if not skip:
        backend.refresh(trainer.base_model)

    # 6. metrics: the step's loss metrics are this rank's share of the global mean (sum over ranks);
    # the rollout statistics are per-rank means of equal-sized batches (average over ranks)
    keys = sorted(summed)
    step_vals = all_reduce_sum(torch.stack([summed[k] for k in keys]).to(trainer.device), info).tolist()
    own = {"reward": rewards.mean().item(), "reward_std": rewards.std(correction=0).item(),
           **CombinedReward.summary(parts),
           "adv_mean": _masked_or_plain(adv, mask, "mean"), "adv_std": _masked_or_plain(adv, mask, "std"),
           "completion_len": batch.completion_lengths.float().mean().item(),
           "truncated_rate": batch.truncated.float().mean().item()}
    if stage.agentic:
        own["turns"] = batch.turns.float().mean().item()
        own["tool_calls"] = batch.tool_calls.float().mean().item()
    if ref_logp is not None:
        own["kl_ref"] = ((old_logp - ref_logp) * mask).sum().item() / max(mask.sum().item(), 1.0)
    own_keys = sorted(own)
    own_vals = (all_reduce_sum(torch.tensor([own[k] for k in own_keys], device=trainer.device), info)
                / info.world_size).tolist()
    gen_tokens = all_reduce_sum(torch.tensor(float(batch.num_completion_tokens), device=trainer.device),
                                info).item()
    rec: dict[str, Any] = {"step": step + 1, "epoch": epoch, "lr": lr, "grad_norm": round(grad_norm, 4),
                           "skipped": int(skip)}
    rec.update({k: round(v, 6) for k, v in zip(keys, step_vals)})
    rec.update({k: round(v, 6) for k, v in zip(own_keys, own_vals)})
    rec["rollout_tokens"] = int(gen_tokens)
    rec["rollout_tok_per_s"] = round(gen_tokens / max(gen_seconds, 1e-9), 1)
    rec["sec_per_step"] = round(time.perf_counter() - t0, 3)
    if o.debug_interval and (step + 1) % o.debug_interval == 0 and info.is_main:
        print(f"[step {step + 1}] prompt: {prompt_texts[0]!r}")
        for k in range(min(group, n)):
            print(f"  reward {rewards[k].item():+.3f}: {batch.texts[k]!r}")
    return rec


def _masked_or_plain(x: Tensor, mask: Tensor, what: str) -> float:
    """Mean / std of per-sequence advantages ``[B]``, or of per-token ones over the mask."""
    if x.dim() == 1:
        return (x.mean() if what == "mean" else x.std(correction=0)).item()
    v = x[mask.bool()]
    if v.numel() == 0:
        return 0.0
    return (v.mean() if what == "mean" else v.std(correction=0)).item()
