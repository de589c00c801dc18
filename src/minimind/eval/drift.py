"""How far a tuned model moved from the one it started from, on replies it was not tuned for.

Accuracy on held-out items only shows a drift once it flips an answer; the per-token KL from the
start model on the items' reference replies shows it before:

``KL = sum_i sum_v p_start(v | x_<i) * (log p_start(v | x_<i) - log p_tuned(v | x_<i)) / N``

over the ``N`` reply tokens ``i`` (the assistant spans, as SFT trains them) of the conversations,
rendered with the chat template as they are (no augmentation; an assistant turn without
``reasoning_content`` renders the empty think block, the thinking-off mode). The demo reports it
for the kinds GRPO does not train.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from minimind.data.batch import IGNORE_INDEX
from minimind.data.formats import sft_conversation
from minimind.data.sft import MaskMarkers, tokenize_conversation
from minimind.train.losses import distill_loss

__all__ = ["reply_kl"]


@torch.no_grad()
def reply_kl(start: nn.Module, tuned: nn.Module, tokenizer: Any, conversations: Iterable[list[dict]],
             max_len: int | None = None) -> float:
    """Mean per-reply-token ``KL(p_start || p_tuned)`` over ``conversations`` (lists of messages in
    the SFT format); 0.0 when none has a reply token."""
    markers = MaskMarkers(tokenizer)
    total, tokens = 0.0, 0
    for messages in conversations:
        msgs, tools = sft_conversation({"conversations": messages})
        ids, mask = tokenize_conversation(tokenizer, msgs, tools, random.Random(0), add_system_ratio=0.0,
                                          empty_think_ratio=1.0, max_len=max_len, markers=markers)
        x = torch.tensor([ids])
        targets = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])] + [IGNORE_INDEX]
        targets = torch.tensor([targets])
        n = int((targets != IGNORE_INDEX).sum())
        if n == 0:
            continue
        _, _, kl = distill_loss(tuned(x).logits, start(x).logits, targets, alpha=0.0, temperature=1.0)
        total += float(kl) * n
        tokens += n
    return total / tokens if tokens else 0.0
