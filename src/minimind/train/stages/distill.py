"""White-box knowledge distillation: a student learns the teacher's full next-token distribution.

``loss = alpha * CE(student, y) + (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T)`` over target
tokens of SFT data (see :func:`minimind.train.losses.distill_loss`).  Teacher and student may differ
in size and in dense / MoE, but must share the tokenizer: the KL compares distributions over the same
ids.  The teacher is frozen, in eval mode, on the run's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from minimind.train.losses import distill_loss
from minimind.train.stages.base import LossOutput, StageContext
from minimind.train.stages.lm import LMStage


@dataclass
class DistillOptions:
    from_teacher_weight: str = "full_sft"  # stage name (resolved with the teacher shape) or a path
    teacher_hidden_size: int = 0  # 0 = the student's
    teacher_use_moe: int = -1  # -1 = the student's
    alpha: float = 0.5  # weight of the hard-label cross-entropy
    temperature: float = 1.5

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be positive, got {self.temperature}")
        if self.teacher_use_moe not in (-1, 0, 1):
            raise ValueError(f"--teacher_use_moe must be -1, 0 or 1, got {self.teacher_use_moe}")


class DistillStage(LMStage):
    """Student trained on SFT data towards a frozen teacher's distribution."""

    name = "distill"
    kind = "sft"
    Options = DistillOptions
    defaults: ClassVar[dict[str, Any]] = {
        "save_weight": "full_dist", "batch_size": 32, "learning_rate": 5e-6, "max_seq_len": 340, "epochs": 6,
        "data_path": "dataset/sft_t2t_mini.jsonl", "from_weight": "full_sft", "warmup_steps": 0,
        "wandb_project": "MiniMind-Distillation"}

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.teacher: nn.Module | None = None

    def setup(self, ctx: StageContext) -> None:
        opts = self.options
        path = ctx.resolve_weight(opts.from_teacher_weight, opts.teacher_hidden_size, opts.teacher_use_moe)
        self.teacher = ctx.frozen_model(path)
        check_same_tokenizer(self.teacher, ctx.tokenizer, path)

    def compute_loss(self, model: nn.Module, batch: Any) -> LossOutput:
        assert self.teacher is not None, "setup() loads the teacher"
        return distill_batch_loss(model, self.teacher, batch, self.options.alpha, self.options.temperature)


def distill_batch_loss(model: nn.Module, teacher: nn.Module, batch: Any, alpha: float,
                       temperature: float) -> LossOutput:
    """:func:`~minimind.train.losses.distill_loss` of ``model`` towards a frozen ``teacher`` on one
    packed batch (plus the MoE balancing loss). RL's retain term (``--ptx_loss kl``) is this with
    ``alpha = 0, T = 1`` and the reference model as the teacher: ``KL(p_ref || p_theta)`` per token."""
    out = model(batch.input_ids, position_ids=batch.position_ids, doc_ids=batch.doc_ids)
    with torch.no_grad():
        teacher_logits = teacher(batch.input_ids, position_ids=batch.position_ids,
                                 doc_ids=batch.doc_ids).logits
    loss, ce, kl = distill_loss(out.logits, teacher_logits, batch.targets, alpha, temperature)
    return LossOutput(loss=loss + out.aux_loss, weight=float(batch.num_target_tokens),
                      metrics={"ce": ce, "kl": kl, "aux_loss": out.aux_loss.detach()})


def check_same_tokenizer(teacher: nn.Module, tokenizer: Any, teacher_path: Path) -> None:
    """Refuse a teacher whose ids mean something else: a smaller vocabulary, or a tokenizer saved
    next to its weights that differs from the run's."""
    if tokenizer is None:
        return
    if teacher.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"teacher {teacher_path} has vocab_size {teacher.config.vocab_size} < the "
                         f"tokenizer's {tokenizer.vocab_size}: teacher and student must share the tokenizer")
    from minimind.tokenizer import MiniMindTokenizer
    for folder in (teacher_path.parent, teacher_path.parent / "tokenizer"):
        if (folder / "tokenizer.json").is_file():
            if MiniMindTokenizer.from_dir(folder).hash != tokenizer.hash:
                raise ValueError(f"the teacher's tokenizer ({folder}) differs from the run's tokenizer: "
                                 "distillation needs teacher and student to share one tokenizer")
            return
