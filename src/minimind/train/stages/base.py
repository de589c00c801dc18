"""What a training stage contributes to the one loop: data, a model wrapper, a loss, and hooks.

A stage is a small object; everything else (precision, accumulation, clipping, schedule, logging,
checkpoints, resume, DDP) lives once in :mod:`minimind.train.core` and :mod:`minimind.train.loop`.

Hooks, in the order the loop calls them::

    setup(ctx)                 device/dtype/rank known: load and freeze reference / teacher models
    build_dataset(cfg, tok)    token shards (rank 0 of each node builds, the others wait and read)
    prepare_model(model, cfg)  e.g. attach LoRA adapters and freeze the base
    extra_param_groups(ctx)    trainable parameters the stage owns besides the model's (a critic)
    compute_loss(model, batch) -> LossOutput      (once per micro-batch)
    batch_weight(batch)        how many units (target tokens, pairs) the loss averages over
    state_dict / load_state_dict   stage state inside the resume file
    export(model, path)        what a finished (or periodically saved) run writes
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from minimind.config import TrainConfig
from minimind.model.masks import document_attention_mask
from minimind.train.device import autocast
from minimind.train.distributed import DistInfo
from minimind.train.losses import token_nll


@dataclass
class LossOutput:
    """``loss`` is a mean over ``weight`` units (target tokens, pairs ...); the loop combines
    micro-batches (and ranks) as ``sum(loss_i * weight_i) / sum(weight_i)`` so accumulation is exact."""

    loss: torch.Tensor
    weight: float
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)


class Dataset(Protocol):
    def num_rows(self, epoch: int) -> int: ...
    def get_batch(self, epoch: int, row_indices: Any) -> Any: ...


@dataclass
class StageContext:
    """What a stage may need to know about the run when it sets itself up."""

    cfg: TrainConfig
    device: torch.device
    dtype: torch.dtype
    info: DistInfo
    tokenizer: Any = None

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world_size(self) -> int:
        return self.info.world_size

    def autocast(self):
        return autocast(self.device, self.dtype)

    def resolve_weight(self, weight: str | Path, hidden_size: int = 0, use_moe: int = -1) -> Path:
        """A weights path, or a stage name (``full_sft`` -> ``<save_dir>/full_sft_<H>[_moe]``)
        resolved with ``hidden_size`` / ``use_moe`` (0 / -1: the run's own model shape)."""
        from minimind.model.weights import resolve_weight_path
        mcfg = self.cfg.model_config()
        return resolve_weight_path(weight, self.cfg.save_dir, hidden_size or mcfg.hidden_size,
                                   use_moe if use_moe >= 0 else int(mcfg.use_moe))

    def frozen_model(self, path: str | Path) -> nn.Module:
        """A reference / teacher model on the run's device, in eval mode, without gradients."""
        from minimind.model import load_model
        model = load_model(path, preset=self.cfg.preset).to(self.device).eval()
        model.requires_grad_(False)
        return model


class StageBase:
    """Defaults for every hook; a concrete stage overrides what it changes.

    ``Options`` is an optional dataclass of stage-only settings (``--beta``, ``--lora_rank`` ...):
    the CLI turns its fields into flags of that stage's sub-command only.
    """

    name: ClassVar[str] = "base"
    #: TrainConfig field values this stage uses when the user does not set them
    defaults: ClassVar[dict[str, Any]] = {}
    Options: ClassVar[type | None] = None

    def __init__(self, options: Any = None) -> None:
        if options is None and self.Options is not None:
            options = self.Options()
        self.options = options

    # ---- setup -----------------------------------------------------------------------------------
    def validate(self, cfg: TrainConfig) -> None:
        """Check stage options against the config; called before any data is read."""
        check = getattr(self.options, "validate", None)
        if check is not None:
            check()

    def setup(self, ctx: StageContext) -> None:
        """Place the stage's extra models (reference, teacher, critic) on ``ctx.device``."""

    def build_dataset(self, cfg: TrainConfig, tokenizer: Any, *, rank: int = 0) -> Dataset:
        raise NotImplementedError

    def prepare_model(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        return model

    def extra_param_groups(self, ctx: StageContext) -> list[dict[str, Any]]:
        return []

    # ---- the step --------------------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, batch: Any) -> LossOutput:
        raise NotImplementedError

    def batch_weight(self, batch: Any) -> float:
        return float(batch.num_target_tokens)

    def useful_tokens(self, batch: Any) -> int:
        """Tokens that are not padding (packing leaves none in pretraining)."""
        return int(batch.num_real_tokens)

    # ---- persistence -----------------------------------------------------------------------------
    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options) if self.options is not None else {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def export(self, model: nn.Module, path: Path) -> Path:
        """Write the run's result to ``path`` (``.safetensors``): full weights by default."""
        from minimind.model import save_weights
        return save_weights(model, path)


#: Kept for type hints in code that accepts any stage object.
Stage = StageBase


def next_token_loss(model: nn.Module, batch: Any) -> LossOutput:
    """Mean cross-entropy over target tokens, plus the MoE load-balancing loss.

    ``L = -(1/N) * sum_{i: y_i != -100} log p(y_i | x_<=i) + aux``; ``N`` = number of targets.

    The document mask is built here, outside the (possibly compiled) model, once per micro-batch;
    a batch without ``doc_ids`` (``--attention causal``) runs plain causal attention.  The
    cross-entropy never upcasts the whole ``[N, V]`` logits to fp32 (:func:`token_nll`), and nothing
    here reads a device value back to the host.
    """
    attn_mask = None if batch.doc_ids is None else document_attention_mask(batch.doc_ids)
    out = model(batch.input_ids, position_ids=batch.position_ids, attn_mask=attn_mask)
    # sum / max(N, 1) rather than "mean": a batch whose rows are all truncated prompts (no target)
    # contributes zero loss and zero gradient instead of NaN.
    ce = token_nll(out.logits, batch.targets).sum() / max(int(batch.num_target_tokens), 1)
    return LossOutput(loss=ce + out.aux_loss, weight=float(batch.num_target_tokens),
                      metrics={"ce": ce.detach(), "aux_loss": out.aux_loss.detach()})


def shard_dir_for(cfg: TrainConfig, kind: str, tokenizer_hash: str, data_path: str) -> Path:
    """Where the token cache of ``data_path`` lives: ``--shard_dir`` or
    ``data_cache/<stem>-<kind>-<max_seq_len>-<tokenizer hash>`` (the same for ``minimind data
    prepare`` and training, so one command's output is the other's input)."""
    if cfg.shard_dir:
        return Path(cfg.shard_dir)
    return Path("data_cache") / f"{Path(data_path).stem}-{kind}-{cfg.max_seq_len}-{tokenizer_hash}"
