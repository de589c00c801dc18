"""LoRA fine-tuning: SFT data and loss, but only low-rank adapters train and only they are exported.

The stage is SFT plus two hooks: ``prepare_model`` attaches the adapters (and freezes the base, so the
loop's optimizer sees adapter parameters only) and ``export`` writes the adapters alone.  The result
loads onto its base model with ``minimind chat --lora_weight`` or merges with ``minimind lora merge``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from minimind.config import TrainConfig
from minimind.model.lora import LoRAConfig, apply_lora, save_lora
from minimind.train.stages.lm import LMStage


@dataclass
class LoRAOptions:
    lora_rank: int = 16
    lora_alpha: float = 0.0  # 0 = alpha equals rank: the adapter is added unscaled, as the reference does
    lora_dropout: float = 0.0
    lora_targets: str = "square"  # square (reference: Linears with in == out) | all | q_proj,v_proj,...

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          targets=self.lora_targets)

    def validate(self) -> None:
        self.lora_config().validate()


class LoRAStage(LMStage):
    """Adapters on a frozen base model, trained on SFT conversations."""

    name = "lora"
    kind = "sft"
    Options = LoRAOptions
    defaults = dict(save_weight="lora_medical", batch_size=32, learning_rate=1e-4, max_seq_len=340,
                    epochs=10, data_path="dataset/lora_medical.jsonl", from_weight="full_sft",
                    warmup_steps=0, wandb_project="MiniMind-LoRA")

    def validate(self, cfg: TrainConfig) -> None:
        super().validate(cfg)
        if cfg.from_weight in ("", "none"):
            raise ValueError("LoRA adapts an existing model: pass --from_weight (e.g. full_sft or a path)")

    def prepare_model(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        apply_lora(model, self.options.lora_config())
        return model

    def export(self, model: nn.Module, path: Path) -> Path:
        return save_lora(model, path, self.options.lora_config())
