"""Direct Preference Optimization on ``{"chosen": [...], "rejected": [...]}`` pairs.

Each pair's two sides are packed as two segments of one row; a forward pass gives every side's
response log-probability ``log pi(y|x)`` (summed over the final assistant turn's tokens).  With the
frozen reference model's ``log pi_ref(y|x)``, the implicit reward margin is
``h = (log pi(y_c|x) - log pi(y_r|x)) - (log pi_ref(y_c|x) - log pi_ref(y_r|x))`` and the loss is a
function of ``beta * h`` chosen by ``--loss_type`` (see :func:`minimind.train.losses.dpo_loss`).

The reference log-probs never change, so by default each pair's are computed once, the first time
the pair is seen, and kept in memory (``--ref_cache 0`` recomputes them every time).

``--rpo_alpha a > 0`` adds the chosen answers' per-token negative log-likelihood (RPO, Pang et al.
2024): ``L = L_DPO + a * (-sum log pi(y_c|x)) / |y_c|``, which keeps the policy's probability of the
chosen answers from falling while their margin over the rejected ones grows.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from minimind.config import TrainConfig
from minimind.data import ShardInfo, ShardReader
from minimind.data.dpo import DPODataset, PairBatch, load_or_prepare_dpo_shards
from minimind.train.losses import DPO_LOSS_TYPES, dpo_loss, sequence_logps, sequence_token_counts
from minimind.train.stages.base import LossOutput, StageBase, StageContext, shard_dir_for


@dataclass
class DPOOptions:
    beta: float = 0.15  # the reference's default
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo | hinge
    ref_weight: str = ""  # reference model; "" = the --from_weight model
    ref_cache: int = 1  # 1 = compute each pair's reference log-probs once and keep them
    rpo_alpha: float = 0.0  # weight of the NLL of the chosen answers (0 = plain DPO)

    def validate(self) -> None:
        if self.rpo_alpha < 0:
            raise ValueError(f"--rpo_alpha must not be negative, got {self.rpo_alpha}")
        if self.beta <= 0:
            raise ValueError(f"--beta must be positive, got {self.beta}")
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"--loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got {self.loss_type!r}")
        if self.ref_cache not in (0, 1):
            raise ValueError(f"--ref_cache must be 0 or 1, got {self.ref_cache}")


class DPOStage(StageBase):
    """Policy trained to prefer chosen over rejected answers, relative to a frozen reference."""

    name = "dpo"
    Options = DPOOptions
    defaults = dict(save_weight="dpo", batch_size=4, learning_rate=4e-8, max_seq_len=1024, epochs=1,
                    data_path="dataset/dpo.jsonl", from_weight="full_sft", warmup_steps=0,
                    wandb_project="MiniMind-DPO")

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.reference: nn.Module | None = None
        self._ref_cache: dict[int, tuple[float, float]] = {}

    def validate(self, cfg: TrainConfig) -> None:
        super().validate(cfg)
        if cfg.from_weight in ("", "none") and not self.options.ref_weight:
            raise ValueError("DPO starts from a trained model: pass --from_weight (e.g. full_sft or a path)")

    # ---- data ------------------------------------------------------------------------------------
    def prepare_data(self, cfg: TrainConfig, tokenizer: Any, *, progress: bool = True) -> ShardInfo:
        out_dir = shard_dir_for(cfg, "dpo", tokenizer.hash, cfg.data_path)
        return load_or_prepare_dpo_shards(cfg.data_path, out_dir, tokenizer, max_len=cfg.max_seq_len + 1,
                                          num_proc=cfg.num_workers, skip_bad_lines=bool(cfg.skip_bad_lines),
                                          progress=progress)

    def build_dataset(self, cfg: TrainConfig, tokenizer: Any, *, rank: int = 0) -> DPODataset:
        """The pairs, less those whose response ``--max_seq_len`` cuts away on a side.

        Both sides of a pair share one row of ``max_seq_len + 1`` tokens, so a long prompt can leave
        a side with no response token: such a pair has margin 0 at every step (loss log 2, no
        gradient) while still counting in the batch mean.  It is dropped with one counted warning
        that names the flag to raise; a file where every pair is cut is refused."""
        info = self.prepare_data(cfg, tokenizer, progress=bool(cfg.progress) and rank == 0)
        ds = DPODataset(ShardReader(info.out_dir), seq_len=cfg.max_seq_len, seed=cfg.seed,
                        drop_cut_pairs=True)
        dropped = ds.num_dropped_pairs
        if dropped == ds.num_pairs:
            raise ValueError(f"{cfg.data_path}: every one of the {dropped} pairs loses its whole chosen or "
                             f"rejected answer to --max_seq_len {cfg.max_seq_len} (both sides share one "
                             f"row); raise --max_seq_len")
        if dropped and rank == 0:
            warnings.warn(f"{cfg.data_path}: dropped {dropped} of {ds.num_pairs} pairs whose chosen or "
                          f"rejected answer is cut off entirely by --max_seq_len {cfg.max_seq_len} (both "
                          f"sides share one row); raise --max_seq_len to train them", RuntimeWarning,
                          stacklevel=2)
        return ds

    def setup(self, ctx: StageContext) -> None:
        self.reference = ctx.frozen_model(ctx.resolve_weight(self.options.ref_weight or ctx.cfg.from_weight))

    # ---- loss ------------------------------------------------------------------------------------
    @staticmethod
    def response_logps(model: nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``[2P]`` summed response log-probs (``2p`` chosen, ``2p + 1`` rejected) and the MoE aux loss."""
        out = model(batch.input_ids, position_ids=batch.position_ids, doc_ids=batch.doc_ids)
        return sequence_logps(out.logits, batch.targets, batch.seq_index, batch.num_seqs), out.aux_loss

    @torch.no_grad()
    def reference_logps(self, batch: PairBatch) -> torch.Tensor:
        """The reference model's ``[2P]`` response log-probs, from the cache where possible."""
        assert self.reference is not None, "setup() loads the reference model"
        ids = [int(i) for i in batch.pair_ids.tolist()]
        if not self.options.ref_cache or any(i not in self._ref_cache for i in ids):
            logps, _ = self.response_logps(self.reference, batch)
            if not self.options.ref_cache:
                return logps
            for p, i in enumerate(ids):
                self._ref_cache[i] = (float(logps[2 * p]), float(logps[2 * p + 1]))
        vals = [v for i in ids for v in self._ref_cache[i]]
        return torch.tensor(vals, dtype=torch.float32, device=batch.input_ids.device)

    def compute_loss(self, model: nn.Module, batch: PairBatch) -> LossOutput:
        policy, aux = self.response_logps(model, batch)
        ref = self.reference_logps(batch)
        losses, chosen_reward, rejected_reward = dpo_loss(
            policy[0::2], policy[1::2], ref[0::2], ref[1::2], self.options.beta, self.options.loss_type)
        margin = chosen_reward - rejected_reward
        loss = losses.mean() + aux
        metrics: dict[str, torch.Tensor] = {}
        if self.options.rpo_alpha > 0:
            n_chosen = sequence_token_counts(batch.targets, batch.seq_index, batch.num_seqs)[0::2]
            nll = -policy[0::2].sum() / n_chosen.sum().clamp(min=1.0)
            loss = loss + self.options.rpo_alpha * nll
            metrics["nll_chosen"] = nll.detach()
        return LossOutput(loss=loss, weight=float(batch.num_pairs), metrics={**metrics,
            "reward_chosen": chosen_reward.mean(), "reward_rejected": rejected_reward.mean(),
            "margin": margin.mean(), "pref_accuracy": (margin > 0).float().mean(),
            "aux_loss": aux.detach()})

    def batch_weight(self, batch: PairBatch) -> float:
        return float(batch.num_pairs)
