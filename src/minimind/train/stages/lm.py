"""Next-token stages: pretraining (``{"text"}`` rows) and full SFT (``{"conversations"}`` rows).

They share the loss (:func:`next_token_loss`) and differ only in how documents become token shards:
pretrain trains on every token of BOS-aligned packed rows, SFT on assistant spans only.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from minimind.config import TrainConfig
from minimind.data import PackedDataset, ShardInfo, ShardReader, load_or_prepare_shards
from minimind.train.stages.base import LossOutput, StageBase, next_token_loss, shard_dir_for


class LMStage(StageBase):
    """Next-token prediction on packed rows; ``kind`` picks the shard format (pretrain | sft)."""

    kind: ClassVar[str] = "pretrain"

    def prepare_data(self, cfg: TrainConfig, tokenizer: Any, *, progress: bool = True) -> ShardInfo:
        """Tokenize ``cfg.data_path`` once into the shard cache (reused when nothing changed)."""
        out_dir = shard_dir_for(cfg, self.kind, tokenizer.hash, cfg.data_path)
        return load_or_prepare_shards(
            cfg.data_path, out_dir, tokenizer, kind=self.kind, num_proc=cfg.num_workers, seed=cfg.seed,
            skip_bad_lines=bool(cfg.skip_bad_lines),
            max_len=cfg.max_seq_len + 1 if self.kind == "sft" else None,
            add_system_ratio=cfg.add_system_ratio, empty_think_ratio=cfg.empty_think_ratio,
            progress=progress)

    def build_dataset(self, cfg: TrainConfig, tokenizer: Any, *, rank: int = 0) -> PackedDataset:
        info = self.prepare_data(cfg, tokenizer, progress=bool(cfg.progress) and rank == 0)
        return PackedDataset(ShardReader(info.out_dir), seq_len=cfg.max_seq_len, seed=cfg.seed,
                             mode=self.kind, max_position=cfg.model_config().max_position_embeddings)

    def compute_loss(self, model: nn.Module, batch: Any) -> LossOutput:
        return next_token_loss(model, batch)


class PretrainStage(LMStage):
    name = "pretrain"
    kind = "pretrain"
    defaults = dict(save_weight="pretrain", batch_size=32, learning_rate=5e-4, max_seq_len=340, epochs=1,
                    data_path="dataset/pretrain_t2t_mini.jsonl", from_weight="none",
                    wandb_project="MiniMind-Pretrain")


class SFTStage(LMStage):
    name = "sft"
    kind = "sft"
    defaults = dict(save_weight="full_sft", batch_size=16, learning_rate=1e-5, max_seq_len=768, epochs=2,
                    data_path="dataset/sft_t2t_mini.jsonl", from_weight="pretrain", warmup_steps=0,
                    wandb_project="MiniMind-Full-SFT")


PRETRAIN = PretrainStage()
SFT = SFTStage()
