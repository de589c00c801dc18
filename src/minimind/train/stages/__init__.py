"""Training stages: each contributes data, an optional model wrapper, a loss and hooks to the one loop.

``STAGES`` maps a sub-command name to its stage class; ``cls(options)`` makes a stage object.
"""

from minimind.train.stages.base import LossOutput, Stage, StageBase, StageContext, next_token_loss
from minimind.train.stages.distill import DistillOptions, DistillStage
from minimind.train.stages.dpo import DPOOptions, DPOStage
from minimind.train.stages.lm import PRETRAIN, SFT, LMStage, PretrainStage, SFTStage
from minimind.train.stages.lora import LoRAOptions, LoRAStage
from minimind.train.stages.rl import AgentStage, GRPOStage, PPOStage, RLOptions, RLStage, SPOStage

STAGES: dict[str, type[StageBase]] = {"pretrain": PretrainStage, "sft": SFTStage, "lora": LoRAStage,
                                      "dpo": DPOStage, "distill": DistillStage, "grpo": GRPOStage,
                                      "spo": SPOStage, "ppo": PPOStage, "agent": AgentStage}

__all__ = [
    "PRETRAIN",
    "SFT",
    "STAGES",
    "AgentStage",
    "DPOOptions",
    "DPOStage",
    "DistillOptions",
    "DistillStage",
    "GRPOStage",
    "LMStage",
    "LoRAOptions",
    "LoRAStage",
    "LossOutput",
    "PPOStage",
    "PretrainStage",
    "RLOptions",
    "RLStage",
    "SFTStage",
    "SPOStage",
    "Stage",
    "StageBase",
    "StageContext",
    "next_token_loss",
]
