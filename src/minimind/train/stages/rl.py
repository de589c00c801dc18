"""RL stages (``minimind grpo | spo | ppo | agent``): options, validation and the stage hooks.

Every algorithm runs through one driver, :func:`minimind.rl.trainer.train_rl`, and through the
project's one optimizer step (:meth:`minimind.train.core.Trainer.step`); the sub-commands differ only
in their defaults and in the :class:`~minimind.rl.objective.ObjectiveConfig` they resolve to
(``--loss_type``), plus a value head for PPO and multi-turn tool rollouts for ``agent``.

Why stages and not separate scripts: the flags, checkpoints, resume, DDP, precision and metrics are
the training loop's; an RL stage contributes the prompt data (:meth:`RLStage.build_dataset`), the
frozen reference model (only when ``--beta > 0``), the PPO value head, its resume state (the SPO
baseline, the value head) and the loss (:func:`minimind.rl.trainer.rl_loss`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from minimind.config import TrainConfig
from minimind.rl.objective import LOSS_TYPES, ObjectiveConfig, SPOBaseline
from minimind.train.stages.base import LossOutput, StageBase, StageContext

#: The rewards a spec like ``task:1,format:0.1`` may name are those of :mod:`minimind.rl.rewards`.
GROUP_ADVANTAGES = ("group", "group_mean")


def _opt(default: Any, help_text: str) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass
class RLOptions:
    """Settings shared by every RL sub-command (the reference's GRPO flags, plus the objective's)."""

    loss_type: str = _opt("grpo", f"objective: {', '.join(LOSS_TYPES)}")
    num_generations: int = _opt(6, "samples per prompt (a GRPO group)")
    beta: float = _opt(0.0, "KL weight against the frozen reference model (0 = no reference model "
                            "is loaded); PPO adds -beta * KL to the per-token reward")
    ref_weight: str = _opt("", "reference model for beta > 0: stage name or path (default: --from_weight)")
    reward: str = _opt("task:1", "weighted rule rewards, e.g. task:1,format:0.1 or math:1,format:0.1 "
                                 "(math, format, tool_format, length, task, tool_call, task_format)")
    reward_model_path: str = _opt("", "Hugging Face reward model folder added to the reward ('' = none)")
    reward_model_weight: float = _opt(1.0, "weight of the reward model's score")
    max_gen_len: int = _opt(1024, "new tokens per completion (per turn for agent)")
    temperature: float = _opt(0.8, "rollout sampling temperature")
    top_p: float = _opt(1.0, "rollout nucleus filter (1 = off)")
    top_k: int = _opt(0, "rollout top-k filter (0 = off)")
    thinking_ratio: float = _opt(0.9, "share of prompts whose generation prompt opens <think>")
    ppo_epochs: int = _opt(1, "optimizer passes over each rollout batch")
    mini_batch_size: int = _opt(0, "completions per micro-batch of an optimizer step (0 = all)")
    epsilon: float = _opt(-1.0, "clip range below 1 (-1 = the loss type's default)")
    epsilon_high: float = _opt(-1.0, "clip range above 1 (-1 = the loss type's default)")
    tis_cap: float = _opt(0.0, "truncated importance sampling cap vs the rollout engine (0 = off)")
    debug_interval: int = _opt(0, "print a prompt, its completions and rewards every N steps (0 = off)")

    def objective(self) -> ObjectiveConfig:
        """The :class:`ObjectiveConfig` these options select (KL on iff ``beta > 0``, except PPO,
        whose KL goes into the reward instead)."""
        cfg = LOSS_TYPES[self.loss_type]
        changes: dict[str, Any] = {}
        if self.epsilon >= 0:
            changes["eps_low"] = self.epsilon
        if self.epsilon_high >= 0:
            changes["eps_high"] = self.epsilon_high
        if self.tis_cap > 0:
            changes["tis_cap"] = self.tis_cap
        if cfg.advantage == "gae":
            changes.update(kl="none", beta=0.0)
        elif self.beta > 0:
            changes.update(kl=cfg.kl if cfg.kl != "none" else "k3", beta=self.beta)
        else:
            changes.update(kl="none", beta=0.0)
        return cfg.with_(**changes)

    def validate(self) -> None:
        problems = []
        if self.loss_type not in LOSS_TYPES:
            problems.append(f"--loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.num_generations < 1:
            problems.append(f"--num_generations must be >= 1, got {self.num_generations}")
        elif self.loss_type in LOSS_TYPES and LOSS_TYPES[self.loss_type].advantage in GROUP_ADVANTAGES \
                and self.num_generations < 2:
            problems.append(f"--loss_type {self.loss_type} uses group-relative advantages: "
                            f"--num_generations must be >= 2, got {self.num_generations}")
        if self.beta < 0:
            problems.append(f"--beta must not be negative, got {self.beta}")
        for name in ("max_gen_len", "ppo_epochs"):
            if getattr(self, name) < 1:
                problems.append(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.mini_batch_size < 0:
            problems.append(f"--mini_batch_size must not be negative, got {self.mini_batch_size}")
        if not self.temperature > 0:
            problems.append(f"--temperature must be > 0 (sampling; the objective needs exploration), "
                            f"got {self.temperature}")
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            problems.append("--top_p must be in (0, 1] and --top_k >= 0")
        if not 0 <= self.thinking_ratio <= 1:
            problems.append(f"--thinking_ratio must be in [0, 1], got {self.thinking_ratio}")
        if self.tis_cap < 0:
            problems.append(f"--tis_cap must not be negative, got {self.tis_cap}")
        try:
            parse_reward_spec(self.reward, allow_empty=bool(self.reward_model_path))
        except (ValueError, KeyError) as e:
            problems.append(str(e).strip('"'))
        if self.reward_model_path and not Path(self.reward_model_path).is_dir():
            problems.append(f"--reward_model_path {self.reward_model_path}: no such folder")
        if problems:
            raise ValueError("; ".join(problems))


def parse_reward_spec(spec: str, allow_empty: bool = False) -> list[tuple[str, float]]:
    """``"task:1,format:0.1"`` -> ``[("task", 1.0), ("format", 0.1)]`` (a bare name weighs 1)."""
    from minimind.rl.rewards import REWARD_FUNCTIONS

    out: list[tuple[str, float]] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, weight = part.partition(":")
        name = name.strip()
        if name not in REWARD_FUNCTIONS:
            raise ValueError(f"--reward: unknown reward {name!r}; registered: {', '.join(sorted(REWARD_FUNCTIONS))}")
        try:
            out.append((name, float(weight) if weight.strip() else 1.0))
        except ValueError:
            raise ValueError(f"--reward: weight of {name!r} is not a number: {weight!r}") from None
    if not out and not allow_empty:
        raise ValueError("--reward names no reward (e.g. --reward task:1,format:0.1)")
    return out


@dataclass
class GRPOOptions(RLOptions):
    """GRPO family (grpo, dr_grpo, dapo, bnpo, gspo, cispo): group samples, one objective each."""


@dataclass
class SPOOptions(RLOptions):
    """Single-stream policy optimisation: one sample per prompt against a persistent baseline."""

    loss_type: str = _opt("spo", "objective (spo: REINFORCE against the per-prompt baseline)")
    num_generations: int = _opt(1, "samples per prompt (SPO needs no group)")
    spo_discount: float = _opt(0.9, "forgetting factor rho of the per-prompt Beta baseline")
    spo_prior: float = _opt(0.5, "baseline of an unseen prompt (success-rate prior)")


@dataclass
class PPOOptions(RLOptions):
    """PPO: clipped surrogate, GAE advantages from a value head, KL folded into the reward."""

    loss_type: str = _opt("ppo", "objective (ppo: clipped surrogate + GAE)")
    num_generations: int = _opt(1, "samples per prompt")
    ppo_epochs: int = _opt(2, "optimizer passes over each rollout batch (reference ppo_update_iters)")
    beta: float = _opt(0.02, "KL coefficient folded into the per-token reward (reference kl_coef); "
                             "0 = no reference model")
    vf_coef: float = _opt(0.5, "weight of the value loss")
    cliprange_value: float = _opt(0.2, "value clipping around the rollout's values (0 = off)")
    gamma: float = _opt(1.0, "GAE discount")
    lam: float = _opt(0.95, "GAE lambda")
    critic_lr_scale: float = _opt(1.0, "value head learning rate = this x --learning_rate")


@dataclass
class AgentOptions(RLOptions):
    """Multi-turn tool use: the environment runs the tool calls between assistant turns."""

    loss_type: str = _opt("cispo", f"objective: {', '.join(LOSS_TYPES)}")
    num_generations: int = _opt(4, "samples per prompt (a group)")
    max_gen_len: int = _opt(768, "new tokens per assistant turn")
    thinking_ratio: float = _opt(0.1, "share of episodes whose generation prompts open <think>")
    max_turns: int = _opt(3, "assistant turns per episode")
    max_total_len: int = _opt(2500, "positions an episode may use (prompt + turns + tool results)")

    def validate(self) -> None:
        super().validate()
        if self.max_turns < 1 or self.max_total_len < 2:
            raise ValueError("--max_turns must be >= 1 and --max_total_len >= 2")


class ValueHead(nn.Module):
    """``V(s_t) = w . h_t + b`` on the policy's final (normed) hidden states: PPO's critic.

    It shares the policy's trunk, so its gradient (weighted by ``--vf_coef``) also shapes the trunk:
    one forward per micro-batch serves actor and critic, and no second model is held in memory."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.float()).squeeze(-1)


class RLStage(StageBase):
    """The hooks every RL sub-command shares; :meth:`run` hands the stage to the RL driver."""

    name = "grpo"
    Options: ClassVar[type | None] = GRPOOptions
    #: multi-turn tool episodes (agent) instead of single-turn completions
    agentic: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {
        "save_weight": "grpo", "batch_size": 2, "learning_rate": 3e-7, "max_seq_len": 768, "epochs": 1,
        "data_path": "dataset/rlaif.jsonl", "from_weight": "full_sft", "warmup_steps": 0, "log_interval": 1,
        "save_interval": 10, "wandb_project": "MiniMind-GRPO"}

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.reference: nn.Module | None = None
        self.value_head: ValueHead | None = None
        self.baseline: SPOBaseline | None = None
        if self.objective.advantage == "spo":
            self.baseline = SPOBaseline(discount=getattr(self.options, "spo_discount", 0.9),
                                        prior_mean=getattr(self.options, "spo_prior", 0.5))

    @property
    def objective(self) -> ObjectiveConfig:
        return self.options.objective() if self.options.loss_type in LOSS_TYPES else LOSS_TYPES["grpo"]

    @property
    def uses_values(self) -> bool:
        return self.objective.advantage == "gae"

    # ---- setup -----------------------------------------------------------------------------------
    def validate(self, cfg: TrainConfig) -> None:
        super().validate(cfg)
        if self.uses_values and not isinstance(self.options, PPOOptions):
            raise ValueError(f"--loss_type {self.options.loss_type} needs a value model: use `minimind ppo`")
        if self.objective.advantage == "spo" and self.baseline is None:
            raise ValueError("--loss_type spo needs the persistent baseline: use `minimind spo`")
        if self.options.beta > 0 and not self.options.ref_weight and cfg.from_weight in ("", "none"):
            raise ValueError("--beta > 0 needs a reference model: pass --from_weight or --ref_weight "
                             "(or --beta 0 for no KL term)")
        if self.options.beta > 0:  # resolve now: a missing file fails before any data is read
            from minimind.model.weights import resolve_weight_path
            mcfg = cfg.model_config()
            resolve_weight_path(self.options.ref_weight or cfg.from_weight, cfg.save_dir, mcfg.hidden_size,
                                int(mcfg.use_moe))

    def setup(self, ctx: StageContext) -> None:
        if self.options.beta > 0:
            self.reference = ctx.frozen_model(ctx.resolve_weight(self.options.ref_weight or ctx.cfg.from_weight))
        if self.value_head is not None:
            self.value_head.to(ctx.device)
            if ctx.info.enabled:  # outside DDP: average its gradient over ranks ourselves
                from minimind.train.distributed import all_reduce_mean
                for p in self.value_head.parameters():
                    p.register_post_accumulate_grad_hook(
                        lambda q, info=ctx.info: q.grad.copy_(all_reduce_mean(q.grad, info)))

    def prepare_model(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        if self.uses_values and self.value_head is None:
            self.value_head = ValueHead(model.config.hidden_size)
        return model

    def extra_param_groups(self, ctx: StageContext) -> list[dict[str, Any]]:
        if self.value_head is None:
            return []
        return [{"params": list(self.value_head.parameters()), "weight_decay": 0.0,
                 "lr_scale": getattr(self.options, "critic_lr_scale", 1.0)}]

    def build_dataset(self, cfg: TrainConfig, tokenizer: Any, *, rank: int = 0) -> Any:
        from minimind.rl.trainer import PromptDataset
        return PromptDataset.from_jsonl(cfg.data_path, skip_bad_lines=bool(cfg.skip_bad_lines),
                                        rewards=[n for n, _ in parse_reward_spec(self.options.reward, True)])

    # ---- the step --------------------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, batch: Any) -> LossOutput:
        from minimind.rl.trainer import rl_loss
        return rl_loss(self, model, batch)

    def batch_weight(self, batch: Any) -> float:
        from minimind.rl.trainer import micro_batch_weight
        return micro_batch_weight(self.objective, batch)

    def useful_tokens(self, batch: Any) -> int:
        return int(batch.mask.sum())

    # ---- persistence -----------------------------------------------------------------------------
    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.baseline is not None:
            state["spo_baseline"] = self.baseline.state_dict()
        if self.value_head is not None:
            state["value_head"] = {k: v.detach().cpu() for k, v in self.value_head.state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.baseline is not None and "spo_baseline" in state:
            self.baseline.load_state_dict(state["spo_baseline"])
        if self.value_head is not None and "value_head" in state:
            self.value_head.load_state_dict(state["value_head"])

    def run(self, cfg: TrainConfig, tokenizer: Any, on_step: Any = None) -> Any:
        """Train with the RL driver (the CLI calls this instead of the epoch loop)."""
        from minimind.rl.trainer import train_rl
        return train_rl(self, cfg, tokenizer, on_step=on_step)


class GRPOStage(RLStage):
    """Group-relative policy optimisation and its variants (--loss_type)."""

    name = "grpo"
    Options = GRPOOptions


class SPOStage(RLStage):
    """Single-stream policy optimisation with a persistent per-prompt baseline."""

    name = "spo"
    Options = SPOOptions
    defaults: ClassVar[dict[str, Any]] = {**RLStage.defaults, "save_weight": "spo", "wandb_project": "MiniMind-SPO"}

    def validate(self, cfg: TrainConfig) -> None:
        if self.options.loss_type != "spo":
            raise ValueError(f"`minimind spo` trains --loss_type spo; got {self.options.loss_type!r} "
                             f"(use `minimind grpo` for the group objectives)")
        super().validate(cfg)


class PPOStage(RLStage):
    """Proximal policy optimisation with a value head, GAE and value clipping."""

    name = "ppo"
    Options = PPOOptions
    defaults: ClassVar[dict[str, Any]] = {**RLStage.defaults, "save_weight": "ppo_actor", "wandb_project": "MiniMind-PPO"}

    def validate(self, cfg: TrainConfig) -> None:
        if self.options.loss_type != "ppo":
            raise ValueError(f"`minimind ppo` trains --loss_type ppo; got {self.options.loss_type!r}")
        super().validate(cfg)
        o = self.options
        if o.vf_coef < 0 or o.cliprange_value < 0 or not 0 <= o.gamma <= 1 or not 0 <= o.lam <= 1 \
                or o.critic_lr_scale <= 0:
            raise ValueError("--vf_coef and --cliprange_value must be >= 0, --gamma and --lam in [0, 1], "
                             "--critic_lr_scale > 0")


class AgentStage(RLStage):
    """Multi-turn tool-use RL: rollouts run tool calls, rewards grade the final answer."""

    name = "agent"
    Options = AgentOptions
    agentic = True
    defaults: ClassVar[dict[str, Any]] = {**RLStage.defaults, "save_weight": "agent", "max_seq_len": 1024,
                "data_path": "dataset/agent_rl.jsonl", "wandb_project": "MiniMind-Agent-RL"}

    def validate(self, cfg: TrainConfig) -> None:
        super().validate(cfg)
        if self.uses_values or self.objective.advantage == "spo":
            raise ValueError(f"`minimind agent` trains the group objectives; got {self.options.loss_type!r}")


__all__ = ["AgentOptions", "AgentStage", "GRPOOptions", "GRPOStage", "PPOOptions", "PPOStage", "RLOptions",
           "RLStage", "SPOOptions", "SPOStage", "ValueHead", "parse_reward_spec"]
