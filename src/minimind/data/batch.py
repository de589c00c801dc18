"""The one batch type every training stage consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Target value the loss ignores (``F.cross_entropy(ignore_index=-100)``, as in the reference).
IGNORE_INDEX = -100


@dataclass
class Batch:
    """A packed batch of ``B`` rows of ``T`` tokens.

    * ``input_ids`` [B, T] long -- tokens fed to the model.
    * ``targets`` [B, T] long -- the next token where it is trained, else ``IGNORE_INDEX``; never
      crosses a document boundary, never points at padding, and honours the loss mask.
    * ``position_ids`` [B, T] long -- RoPE positions, restarting at 0 at every document start (a
      continuation of a cropped document continues from its offset in the document).
    * ``doc_ids`` [B, T] int32 -- segment index within the row; attention must be causal *and*
      restricted to equal ``doc_ids`` (padding is its own segment, so it never mixes with text).
      ``None`` after :meth:`plain_causal`: plain causal attention over the whole row.
    * ``num_target_tokens`` -- ``(targets != IGNORE_INDEX).sum()``, for token-weighted loss averaging
      across micro-batches and ranks.
    * ``num_real_tokens`` -- inputs that are not padding (throughput accounting); defaults to B*T.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor
    doc_ids: torch.Tensor | None
    num_target_tokens: int
    num_real_tokens: int = -1

    def __post_init__(self) -> None:
        if self.num_real_tokens < 0:
            self.num_real_tokens = int(self.input_ids.numel())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor on ``device`` (``non_blocking`` pays off with pinned memory)."""
        return Batch(
            input_ids=self.input_ids.to(device, non_blocking=non_blocking),
            targets=self.targets.to(device, non_blocking=non_blocking),
            position_ids=self.position_ids.to(device, non_blocking=non_blocking),
            doc_ids=None if self.doc_ids is None else self.doc_ids.to(device, non_blocking=non_blocking),
            num_target_tokens=self.num_target_tokens,
            num_real_tokens=self.num_real_tokens,
        )

    def pin_memory(self) -> "Batch":
        """Page-locked host copy, so that ``to(cuda, non_blocking=True)`` overlaps with compute."""
        return Batch(self.input_ids.pin_memory(), self.targets.pin_memory(),
                     self.position_ids.pin_memory(),
                     None if self.doc_ids is None else self.doc_ids.pin_memory(),
                     self.num_target_tokens, self.num_real_tokens)

    def plain_causal(self) -> "Batch":
        """The same rows for ``--attention causal``: no document mask (every token sees the whole row
        before it, documents told apart by their BOS/EOS tokens, as GPT-2 and nanochat pack) and RoPE
        positions that *continue* across documents, ``0..T-1`` per row.  Targets are unchanged, so
        both modes train and score the same tokens."""
        positions = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return Batch(self.input_ids, self.targets, positions.expand_as(self.input_ids), None,
                     self.num_target_tokens, self.num_real_tokens)

    @property
    def shape(self) -> tuple[int, int]:
        """``(B, T)``."""
        return tuple(self.input_ids.shape)  # type: ignore[return-value]
