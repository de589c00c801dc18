"""Grouped-query attention with per-head q/k RMSNorm and RoPE; every path ends in :func:`attend`.

Training on packed rows, padded batches, prefill and decode differ only in the mask they hand to
:func:`attend` (see :mod:`minimind.model.masks`) and in whether a KV cache supplies the keys.
Grouped-query attention never copies K/V per query head: SDPA and FlexAttention take ``enable_gqa``,
and where a kernel does not (CUDA's masked SDPA kernel), the query heads of a group are folded into
the query length so that each KV head is read once, as it is stored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from minimind.config import ModelConfig
from minimind.model.layers import RMSNorm, apply_rope
from minimind.model.masks import BlockMask, compiled_flex_attention
from minimind.train.device import cpu_has_fast_bf16

if TYPE_CHECKING:
    from minimind.model.kv_cache import KVCache, SlotView


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | BlockMask | None,
           dropout_p: float = 0.0) -> torch.Tensor:
    """``softmax(q kᵀ / sqrt(d) + mask) v`` for ``q [B, H, T, d]``, ``k, v [B, KV, S, d]`` with
    ``H`` a multiple of ``KV``; returns ``[B, H, T, d]``.

    ``mask`` is ``None`` (causal over the call's own tokens: flash on CUDA), a FlexAttention block
    mask (document-causal packed rows on CUDA), or a bool tensor ``[B, 1, T, S]``, True = attend.
    """
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=gqa)
    if BlockMask is not None and isinstance(mask, BlockMask):
        if dropout_p:
            raise ValueError("attention dropout is not supported with FlexAttention block masks")
        return compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=gqa)
    if q.shape[2] == 1 and q.device.type == "cpu" and not dropout_p:
        # Decode step on the CPU.  fp32: two small batched matmuls are ~20 % faster than SDPA's CPU
        # kernel at 8 rows.  bf16 with native bf16: the opposite, by 3-4x (the bf16 batched matmul
        # copies the cache's strided K/V slices, SDPA reads them in place).  bf16 without (AVX2):
        # SDPA's products are emulated, and the matmuls on K/V upcast to float32 (a copy of the
        # attended positions, once per KV head) decoded 8 rows 1.26x faster, one row the same.
        if q.dtype == torch.float32:
            return _grouped_matmul_attention(q, k, v, mask)
        if not _cpu_bf16_native():
            return _grouped_matmul_attention(q.float(), k.float(), v.float(), mask).to(q.dtype)
    if gqa and q.device.type == "cuda":
        return _folded_gqa_sdpa(q, k, v, mask, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)


@torch.compiler.assume_constant_result
def _cpu_bf16_native() -> bool:
    """:func:`~minimind.train.device.cpu_has_fast_bf16` (the test the engine's kernels use), a
    constant to dynamo."""
    return cpu_has_fast_bf16()


def _folded_gqa_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     dropout_p: float) -> torch.Tensor:
    """Masked GQA without K/V copies: the ``r = H / KV`` query heads of a group become ``r * T``
    queries of one head ``[B, KV, r*T, d]`` over that group's own K/V; only the (bool) mask is
    repeated, ``[B, 1, r*T, S]``.  For the kernels that take a mask but not ``enable_gqa``."""
    b, h, t, d = q.shape
    kv = k.shape[1]
    r = h // kv
    folded_mask = mask.unsqueeze(2).expand(b, mask.shape[1], r, t, mask.shape[-1])
    folded_mask = folded_mask.reshape(b, mask.shape[1], r * t, mask.shape[-1])
    out = F.scaled_dot_product_attention(q.reshape(b, kv, r * t, d), k, v, attn_mask=folded_mask,
                                         dropout_p=dropout_p)
    # reshape, not view: CUDA's attention kernels may return the heads and rows in another stride order
    return out.reshape(b, h, t, d)


def _grouped_matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              mask: torch.Tensor) -> torch.Tensor:
    """``softmax(q kᵀ / sqrt(d) + mask) v`` for one query per row, ``q [B, H, 1, d]``, ``k, v
    [B, KV, S, d]``, ``mask [B, 1, 1, S]``; the ``H / KV`` query heads of a group share their K/V
    without copies.  Scores and softmax in float32.  Returns ``[B, H, 1, d]``."""
    b, h, _, d = q.shape
    kv = k.shape[1]
    scores = torch.matmul(q.view(b, kv, h // kv, d), k.transpose(-1, -2)).float() * d ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)  # [B, KV, H/KV, d]
    return out.view(b, h, 1, d)


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
        # An inference copy may replace the three projections' products by one (the same rows,
        # stacked; minimind.infer.fuse): fewer, larger products decode faster.
        self.qkv_proj: nn.Module | None = None
        self.qkv_sizes = (self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim)
        # ... and attend its CPU decode steps (one query per row over the cache) through a kernel made
        # for that shape (minimind.infer.decode_attention), with attend()'s arguments and result.
        self.decode_attend: Callable[..., torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | BlockMask | None, position_ids: torch.Tensor,
                kv_cache: KVCache | SlotView | None = None) -> torch.Tensor:
        """x ``[B, T, H]``; cos/sin ``[B, T, 1, d]``; ``attn_mask`` as :func:`attend` takes it (a
        bool mask ``[B, 1, T, S]`` when a KV cache supplies ``S`` keys)."""
        b, t, _ = x.shape
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        q = self.q_norm(q.view(b, t, self.n_heads, self.head_dim))
        k = self.k_norm(k.view(b, t, self.n_kv, self.head_dim))
        v = v.view(b, t, self.n_kv, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, d]
        if kv_cache is not None:
            kv_len = attn_mask.shape[-1] if isinstance(attn_mask, torch.Tensor) else None
            k, v = kv_cache.update(self.layer_idx, k, v, position_ids, kv_len)
        if self.decode_attend is not None and self._one_query_per_row(q, k, attn_mask):
            out = self.decode_attend(q, k, v, attn_mask)
        else:
            out = attend(q, k, v, attn_mask, self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.resid_dropout(self.o_proj(out))

    def _one_query_per_row(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | BlockMask | None) -> bool:
        """A CPU decode step that :attr:`decode_attend` takes: one query per row, a bool mask ``[B, 1, 1,
        S]``, the cache's dtype, no attention dropout."""
        return (q.shape[2] == 1 and q.device.type == "cpu" and isinstance(mask, torch.Tensor)
                and mask.dtype == torch.bool and mask.shape[0] == q.shape[0] and mask.shape[2] == 1
                and q.dtype == k.dtype and not (self.training and self.dropout))
