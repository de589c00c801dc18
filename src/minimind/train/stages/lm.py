"""Next-token stages: pretraining (``{"text"}`` rows) and full SFT (``{"conversations"}`` rows).

They share the loss (:func:`next_token_loss`) and differ only in how documents become token shards:
pretrain trains on every token of BOS-aligned packed rows, SFT on assistant spans only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from minimind.config import TrainConfig
from minimind.data import PackedDataset, ShardReader, load_or_prepare_shards
from minimind.train.stages.base import LossOutput, next_token_loss, shard_dir_for


@dataclass
class LMStage:
    name: str
    kind: str  # "pretrain" | "sft"
    defaults: dict[str, Any] = field(default_factory=dict)

    def build_dataset(self, cfg: TrainConfig, tokenizer: Any, *, rank: int = 0) -> PackedDataset:
        out_dir = shard_dir_for(cfg, self.kind, tokenizer.hash, cfg.data_path)
        load_or_prepare_shards(
            cfg.data_path, out_dir, tokenizer, kind=self.kind, num_proc=cfg.num_workers, seed=cfg.seed,
            skip_bad_lines=bool(cfg.skip_bad_lines),
            max_len=cfg.max_seq_len + 1 if self.kind == "sft" else None,
            add_system_ratio=cfg.add_system_ratio, empty_think_ratio=cfg.empty_think_ratio,
            progress=bool(cfg.progress) and rank == 0)
        return PackedDataset(ShardReader(out_dir), seq_len=cfg.max_seq_len, seed=cfg.seed, mode=self.kind,
                             max_position=cfg.model_config().max_position_embeddings)

    def prepare_model(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        return model

    def compute_loss(self, model: nn.Module, batch: Any) -> LossOutput:
        return next_token_loss(model, batch)

    def batch_weight(self, batch: Any) -> float:
        return float(batch.num_target_tokens)

    def useful_tokens(self, batch: Any) -> int:
        """Tokens that are not padding (packing leaves none in pretraining)."""
        return int(batch.num_real_tokens)


PRETRAIN = LMStage("pretrain", "pretrain", defaults=dict(
    save_weight="pretrain", batch_size=32, learning_rate=5e-4, max_seq_len=340, epochs=1,
    data_path="dataset/pretrain_t2t_mini.jsonl", from_weight="none"))

SFT = LMStage("sft", "sft", defaults=dict(
    save_weight="full_sft", batch_size=16, learning_rate=1e-5, max_seq_len=768, epochs=2,
    data_path="dataset/sft_t2t_mini.jsonl", from_weight="pretrain", warmup_steps=0))

STAGES = {"pretrain": PRETRAIN, "sft": SFT}
