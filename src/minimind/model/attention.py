"""Grouped-query attention with per-head q/k RMSNorm, RoPE and one SDPA call for every path.

Training on packed rows, padded batches, prefill and decode all go through
``F.scaled_dot_product_attention``; they differ only in the boolean mask they pass (see
:mod:`minimind.model.masks`) and in whether a KV cache supplies the keys.

One exception, for speed: a single query per row on the CPU (the decode step) is computed as
``softmax(q kᵀ / sqrt(d) + mask) v`` with two small batched matmuls, the query heads grouped by their
KV head.  PyTorch's CPU SDPA kernel is built for long queries; for one query in bf16 it costs several
times these two matmuls, and the decode step runs once per generated token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from minimind.config import ModelConfig
from minimind.model.layers import RMSNorm, apply_rope

if TYPE_CHECKING:
    from minimind.model.kv_cache import KVCache, SlotView


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None, position_ids: torch.Tensor,
                kv_cache: "KVCache | SlotView | None" = None) -> torch.Tensor:
        """x ``[B, T, H]``; cos/sin ``[B, T, 1, d]``; attn_mask bool ``[B, 1, T, S]`` (True = attend)
        or None for plain causal attention over this call's own tokens."""
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.n_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(b, t, self.n_kv, self.head_dim))
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, d]
        if kv_cache is not None:
            kv_len = attn_mask.shape[-1] if attn_mask is not None else None
            k, v = kv_cache.update(self.layer_idx, k, v, position_ids, kv_len)
        if t == 1 and attn_mask is not None and q.device.type == "cpu" and not self.training:
            out = _single_query_attention(q, k, v, attn_mask)
            return self.resid_dropout(self.o_proj(out.reshape(b, 1, self.n_heads * self.head_dim)))
        # enable_gqa avoids materialising repeated KV heads; CUDA's masked (mem-efficient) kernel
        # does not take it, so there the heads are expanded instead.
        use_gqa = self.n_kv != self.n_heads
        if use_gqa and attn_mask is not None and q.device.type == "cuda":
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            use_gqa = False
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=use_gqa)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.resid_dropout(self.o_proj(out))


def _single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            mask: torch.Tensor) -> torch.Tensor:
    """``softmax(q kᵀ / sqrt(d) + mask) v`` for ``q [B, H, 1, d]``, ``k, v [B, KV, S, d]``,
    ``mask [B, 1, 1, S]`` (True = attend); the ``H / KV`` query heads of a group share their K/V
    without copies.  Scores and softmax in float32.  Returns ``[B, H, 1, d]``."""
    b, h, _, d = q.shape
    kv = k.shape[1]
    scores = torch.matmul(q.view(b, kv, h // kv, d), k.transpose(-1, -2)).float() * d ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)  # [B, KV, H/KV, d]
    return out.view(b, h, 1, d)
