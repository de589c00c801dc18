"""What the RL recipe (:mod:`minimind.train.stages.rl_recipe`) works on: the stage's parts and one
run's context.

Both live apart from the phases that read them (rollout, loss, advantages, update), so those modules
import this one and never each other in a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from minimind.config import TrainConfig
from minimind.data import PackedDataset
from minimind.rl.critic import Critic, ValueHead
from minimind.rl.data import PromptDataset
from minimind.rl.objective import ObjectiveConfig, SPOBaseline
from minimind.rl.options import RLOptions
from minimind.rl.rewards import CombinedReward
from minimind.rl.rollout import RolloutBackend
from minimind.train.core import Trainer
from minimind.train.distributed import DistInfo

__all__ = ["RLContext", "RLParts"]


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
    ptx: PackedDataset | None = None  # --ptx_data's packed SFT rows (None: --ptx_coef 0)

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
