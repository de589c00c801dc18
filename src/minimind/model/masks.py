"""Boolean attention masks (True = may attend) for the single SDPA path.

Packed training rows hold several documents; a token may attend only to earlier tokens of its own
document.  Inference batches hold prompts of different lengths; a query may attend only to cache
slots that its own row has written.
"""

from __future__ import annotations

import torch


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """``mask[b, 0, i, j] = doc[b, i] == doc[b, j] and j <= i`` for ``doc_ids [B, T]``."""
    t = doc_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)
    return (same_doc & causal).unsqueeze(1)


def cache_attention_mask(position_ids: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Mask for queries at ``position_ids [B, T]`` over cache slots ``0..kv_len-1``.

    Each row's tokens sit at their own positions in the cache (no left padding), so a query at
    position p sees slots ``<= p``; slots beyond a row's length hold stale values and stay hidden.
    """
    slots = torch.arange(kv_len, device=position_ids.device)
    return (slots.view(1, 1, kv_len) <= position_ids.unsqueeze(-1)).unsqueeze(1)
