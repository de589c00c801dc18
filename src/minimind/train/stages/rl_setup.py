"""How an RL run is put together: its rewards, its rollout backend, where it writes, and the
:class:`~minimind.train.stages.rl_context.RLContext` every phase of a step reads (nothing trained,
nothing resumed yet).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from minimind.config import TrainConfig
from minimind.data import PackedDataset
from minimind.infer.engine import GenerationEngine
from minimind.model.lora import merged_copy
from minimind.rl.data import PromptDataset
from minimind.rl.options import RLOptions, parse_reward_spec
from minimind.rl.rewards import CombinedReward, RewardModel
from minimind.rl.rollout import EngineBackend, RolloutBackend
from minimind.train.core import Trainer, weights_path
from minimind.train.stages.base import StageBase
from minimind.train.stages.rl_context import RLContext, RLParts

__all__ = ["MessagesRewardModel", "RunFiles", "build_context", "make_backend", "make_ptx_data", "make_reward"]


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
    # a LoRA'd policy decodes from a merged plain copy (EngineBackend.refresh keeps it current)
    engine = GenerationEngine(merged_copy(trainer.base_model), tokenizer, dtype=trainer.dtype,
                              max_batch_len=limit, num_slots=max(1, trainer.cfg.batch_size * parts.options.num_generations),
                              quantize=getattr(parts.options, "quantize", "") or None,
                              compile=bool(getattr(parts.options, "compile_rollouts", 0)))
    return EngineBackend(engine)


def make_ptx_data(cfg: TrainConfig, o: RLOptions, tokenizer: Any, rank: int) -> PackedDataset | None:
    """``--ptx_data`` as packed SFT rows of ``--max_seq_len`` tokens (loss on assistant spans only,
    as ``minimind sft`` trains), in a token cache of its own; ``None`` when ``--ptx_coef`` is 0."""
    if o.ptx_coef <= 0:
        return None
    from minimind.train.stages.lm import SFT
    shard_dir = str(Path(cfg.shard_dir) / "ptx") if cfg.shard_dir else ""
    return SFT.build_dataset(dataclasses.replace(cfg, data_path=o.ptx_data, shard_dir=shard_dir), tokenizer,
                             rank=rank)


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
                    make_reward(o, parts.agentic), tokenizer, total, cfg.warmup_steps, steps_per_epoch,
                    make_ptx_data(cfg, o, tokenizer, info.rank))
    return ctx, files
