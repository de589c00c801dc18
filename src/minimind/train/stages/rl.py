"""RL stages (``minimind grpo | spo | ppo | agent``): the stage hooks around the RL recipe.

Every algorithm runs through one driver, :func:`minimind.train.stages.rl_recipe.train_rl`, and through
the project's one optimizer step (:meth:`minimind.train.core.Trainer.step`); the sub-commands differ
only in their defaults (:mod:`minimind.rl.options`) and in the
:class:`~minimind.rl.objective.ObjectiveConfig` they resolve to (``--loss_type``), plus a critic for
PPO, the persistent baseline for SPO and multi-turn tool rollouts for ``agent``.

Why stages and not separate scripts: the flags, checkpoints, resume, DDP, precision and metrics are
the training loop's; an RL stage contributes the prompt data (:meth:`RLStage.build_dataset`), the
frozen reference model (only when ``beta > 0``), PPO's critic (its parameters join the optimizer),
its resume state (the SPO baseline, the critic) and hands itself to the recipe in :meth:`RLStage.run`.
The recipe never reaches back into the stage object: it reads an explicit
:class:`~minimind.train.stages.rl_context.RLParts` (:meth:`RLStage.parts`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from minimind.config import TrainConfig
from minimind.rl.critic import Critic, ValueHead, broadcast_module
from minimind.rl.objective import LOSS_TYPES, ObjectiveConfig, SPOBaseline
from minimind.rl.options import (
    GROUP_ADVANTAGES,
    AgentOptions,
    GRPOOptions,
    PPOOptions,
    RLOptions,
    SPOOptions,
    parse_reward_spec,
)
from minimind.train.stages.base import StageBase, StageContext

__all__ = ["GROUP_ADVANTAGES", "AgentOptions", "AgentStage", "GRPOOptions", "GRPOStage", "PPOOptions",
           "PPOStage", "RLOptions", "RLStage", "SPOOptions", "SPOStage", "ValueHead", "parse_reward_spec"]


class RLStage(StageBase):
    """The hooks every RL sub-command shares; :meth:`run` hands the stage to the RL recipe."""

    name = "grpo"
    Options: ClassVar[type | None] = GRPOOptions
    #: multi-turn tool episodes (agent) instead of single-turn completions
    agentic: ClassVar[bool] = False
    #: the one ``--loss_type`` the sub-command trains (``None``: any), and what to add when refused
    only_loss_type: ClassVar[str | None] = None
    loss_type_hint: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {
        "save_weight": "grpo", "batch_size": 2, "learning_rate": 3e-7, "max_seq_len": 768, "epochs": 1,
        "data_path": "dataset/rlaif.jsonl", "from_weight": "full_sft", "warmup_steps": 0, "log_interval": 1,
        "save_interval": 10, "wandb_project": "MiniMind-GRPO"}

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.reference: nn.Module | None = None
        self.critic: Critic | None = None
        self.value_head: ValueHead | None = None  # --critic shared
        self.baseline: SPOBaseline | None = None
        if self.objective.advantage == "spo":
            o = self.options
            self.baseline = SPOBaseline(prior_mean=getattr(o, "spo_prior", 0.5),
                                        rho_min=getattr(o, "spo_rho_min", 0.875),
                                        rho_max=getattr(o, "spo_rho_max", 0.96),
                                        kl_half=getattr(o, "spo_kl_half", 0.06))

    @property
    def settings(self) -> RLOptions:
        """The options with every loss-type default filled in (:meth:`RLOptions.resolved`)."""
        return self.options.resolved()

    @property
    def objective(self) -> ObjectiveConfig:
        return self.options.objective() if self.options.loss_type in LOSS_TYPES else LOSS_TYPES["grpo"]

    @property
    def uses_values(self) -> bool:
        return self.objective.advantage == "gae"

    # ---- setup -----------------------------------------------------------------------------------
    def validate(self, cfg: TrainConfig) -> None:
        if self.only_loss_type is not None and self.options.loss_type != self.only_loss_type:
            raise ValueError(f"`minimind {self.name}` trains --loss_type {self.only_loss_type}; "
                             f"got {self.options.loss_type!r}{self.loss_type_hint}")
        super().validate(cfg)
        o = self.settings
        if self.uses_values and not isinstance(self.options, PPOOptions):
            raise ValueError(f"--loss_type {o.loss_type} needs a value model: use `minimind ppo`")
        if self.objective.advantage == "spo" and self.baseline is None:
            raise ValueError("--loss_type spo needs the persistent baseline: use `minimind spo`")
        rows = cfg.batch_size * o.num_generations
        if self.options.steps_per_generation > rows:
            raise ValueError(f"--steps_per_generation {o.steps_per_generation} exceeds the {rows} "
                             f"completions of a rollout batch (--batch_size x --num_generations)")
        if o.needs_reference and o.ref_weight:  # resolve now: a missing file fails before any data is read
            from minimind.model.weights import resolve_weight_path
            mcfg = cfg.model_config()
            resolve_weight_path(o.ref_weight, cfg.save_dir, mcfg.hidden_size, int(mcfg.use_moe))

    def prepare_model(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        """Build the models that start as copies of the policy: the reference (beta > 0 or
        ``--ptx_loss kl``, no ``--ref_weight``) and PPO's critic; their parameters are synchronised
        over ranks in :meth:`setup`.
        Then, with ``--lora_rank``, freeze the policy and give it adapters (the copies stay whole)."""
        o = self.settings
        if o.needs_reference and not o.ref_weight:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        if self.uses_values:
            if getattr(o, "critic", "separate") == "shared":
                self.value_head = ValueHead(model.config.hidden_size)
            else:
                self.critic = Critic(model)
        lora = o.lora_config()
        if lora is not None:
            from minimind.model.lora import apply_lora
            apply_lora(model, lora)
        return model

    def export(self, model: nn.Module, path: Path) -> Path:
        """Full weights, with LoRA adapters (``--lora_rank``) merged: the result loads as any model."""
        from minimind.model import save_weights
        from minimind.model.lora import merged_copy
        return save_weights(merged_copy(model), path)

    def setup(self, ctx: StageContext) -> None:
        o = self.settings
        if o.needs_reference and o.ref_weight:
            self.reference = ctx.frozen_model(ctx.resolve_weight(o.ref_weight))
        for module in (self.reference, self.critic, self.value_head):
            if module is None:
                continue
            module.to(ctx.device)
            if ctx.info.enabled:
                broadcast_module(module)  # from-scratch runs seed each rank differently
        trained = self.critic if self.critic is not None else self.value_head
        if trained is not None and ctx.info.enabled:  # outside DDP: average its gradient over ranks ourselves
            from minimind.train.distributed import all_reduce_mean
            for p in trained.parameters():
                p.register_post_accumulate_grad_hook(
                    lambda q, info=ctx.info: q.grad.copy_(all_reduce_mean(q.grad, info)))

    def extra_param_groups(self, ctx: StageContext) -> list[dict[str, Any]]:
        trained = self.critic if self.critic is not None else self.value_head
        if trained is None:
            return []
        return [{"params": list(trained.parameters()), "weight_decay": 0.0,
                 "lr_scale": getattr(self.options, "critic_lr_scale", 1.0)}]

    def build_dataset(self, cfg: TrainConfig, tokenizer: Any, *, rank: int = 0) -> Any:
        from minimind.rl.data import PromptDataset
        data = PromptDataset.from_jsonl(cfg.data_path, skip_bad_lines=bool(cfg.skip_bad_lines),
                                        rewards=[n for n, _ in parse_reward_spec(self.options.reward, True)])
        if getattr(self.options, "guidance", 0) and not any("reference" in r.columns for r in data.rows):
            raise ValueError(f"--guidance 1: no row of {cfg.data_path} has a 'reference' reply to guide with")
        return data

    def batch_weight(self, batch: Any) -> float:
        from minimind.train.stages.rl_loss import micro_batch_weight
        return micro_batch_weight(self.objective, batch)

    def useful_tokens(self, batch: Any) -> int:
        """Trained completion tokens (a PPO-ptx batch of SFT rows: its target tokens)."""
        return int(batch.mask.sum()) if hasattr(batch, "mask") else int(batch.num_target_tokens)

    # ---- persistence -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.baseline is not None:
            state["spo_baseline"] = self.baseline.state_dict()
        if self.critic is not None:
            state["critic"] = {k: v.detach().cpu() for k, v in self.critic.state_dict().items()}
        if self.value_head is not None:
            state["value_head"] = {k: v.detach().cpu() for k, v in self.value_head.state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.baseline is not None and "spo_baseline" in state:
            self.baseline.load_state_dict(state["spo_baseline"])
        if self.critic is not None and "critic" in state:
            self.critic.load_state_dict(state["critic"])
        if self.value_head is not None and "value_head" in state:
            self.value_head.load_state_dict(state["value_head"])

    def parts(self) -> Any:
        """What the recipe needs from this stage, explicitly
        (:class:`~minimind.train.stages.rl_context.RLParts`)."""
        from minimind.train.stages.rl_context import RLParts
        return RLParts(name=self.name, options=self.settings, objective=self.objective, agentic=self.agentic,
                       reference=self.reference, critic=self.critic, value_head=self.value_head,
                       baseline=self.baseline)

    def run(self, cfg: TrainConfig, tokenizer: Any, on_step: Any = None) -> Any:
        """Train with the RL recipe (the CLI calls this instead of the epoch loop)."""
        from minimind.train.stages.rl_recipe import train_rl
        return train_rl(self, cfg, tokenizer, on_step=on_step)


class GRPOStage(RLStage):
    """Group-relative policy optimisation and its variants (--loss_type)."""

    name = "grpo"
    Options = GRPOOptions


class SPOStage(RLStage):
    """Single-stream policy optimisation with a persistent per-prompt baseline."""

    name = "spo"
    Options = SPOOptions
    defaults: ClassVar[dict[str, Any]] = {**RLStage.defaults, "save_weight": "spo",
                                          "wandb_project": "MiniMind-SPO"}
    only_loss_type = "spo"
    loss_type_hint = " (use `minimind grpo` for the group objectives)"


class PPOStage(RLStage):
    """Proximal policy optimisation with a critic, GAE, value clipping and KL in the reward."""

    name = "ppo"
    Options = PPOOptions
    defaults: ClassVar[dict[str, Any]] = {**RLStage.defaults, "save_weight": "ppo_actor",
                                          "wandb_project": "MiniMind-PPO"}
    only_loss_type = "ppo"


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
