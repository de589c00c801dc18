"""Training stages: each contributes data, an optional model wrapper, a loss and hooks to the one loop.

``STAGES`` maps a sub-command name to its stage class; ``cls(options)`` makes a stage object.
"""

from minimind.train.stages.base import LossOutput, Stage, StageBase, StageContext, next_token_loss
from minimind.train.stages.distill import DistillOptions, DistillStage
from minimind.train.stages.dpo import DPOOptions, DPOStage
from minimind.train.stages.lm import PRETRAIN, SFT, LMStage, PretrainStage, SFTStage
from minimind.train.stages.lora import LoRAOptions, LoRAStage

STAGES: dict[str, type[StageBase]] = {"pretrain": PretrainStage, "sft": SFTStage, "lora": LoRAStage,
                                      "dpo": DPOStage, "distill": DistillStage}

__all__ = ["LossOutput", "Stage", "StageBase", "StageContext", "next_token_loss", "LMStage", "PretrainStage",
           "SFTStage", "LoRAStage", "LoRAOptions", "DPOStage", "DPOOptions", "DistillStage", "DistillOptions",
           "PRETRAIN", "SFT", "STAGES"]
