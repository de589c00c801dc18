"""Training stages: each contributes data, an optional model wrapper and a loss to the one loop."""

from minimind.train.stages.base import LossOutput, Stage, next_token_loss
from minimind.train.stages.lm import PRETRAIN, SFT, STAGES, LMStage

__all__ = ["LossOutput", "Stage", "next_token_loss", "LMStage", "PRETRAIN", "SFT", "STAGES"]
