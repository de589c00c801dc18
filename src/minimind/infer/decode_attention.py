"""Attention of one new token per row over the KV cache, for CPU decode (``csrc/decode_attention_avx2.cpp``).

Why: a decode step attends one query per row to the cached keys, a few hundred positions of a few
heads: microseconds of arithmetic.  torch's CPU kernels for it are built for blocks of queries and
cost far more than the arithmetic: on a 2-core AMD EPYC with AVX-512 BF16, the compiled bf16/int8
decode step of minimind-3 (8 layers, one row, ~100-300 cached positions) spent ~1.0 ms of a
3.3 ms step in ``_scaled_dot_product_flash_attention_for_cpu`` (124 us a call), a third of the step;
fp32 attends through two batched matmuls instead, with the copies and softmax kernels between them.

The kernel does the whole of it in one call per layer: for every (row, KV head) its ``H / KV`` query
heads (grouped-query attention: K/V read once per group, never copied), ``softmax(q kᵀ / sqrt(d))
v`` over the unmasked positions, in float32, reading the cache's strided K/V slices in place.  The
result is SDPA's up to float32 summation order (then rounded to the cache dtype, as SDPA rounds it).
The query heads of a group (up to 4 at a time) share each K/V load, exp is vectorised, keys are
scored four positions at a time and K/V rows are prefetched ahead (eight layers of eight rows over 200
cold positions: 178-190 -> 105-138 us a layer).

Measured on that EPYC, 2 threads, one minimind-3 layer at 300 cached positions, bf16: 18.9 us against
144.9 us for SDPA at one row, 108 against 1149 us at eight; float32: 18.9 us against 33.3 us for the
two batched matmuls at one row, 125 against 137 at eight.  Whole decode steps with the kernel's
first version (one head at a time, scalar exp) vs SDPA, engines taking turns: int8 compiled, one
row, 366.6 vs 257.9 tok/s; bf16 eager, eight rows, 905 vs 556.

Built on first use and checked against float64 (:mod:`minimind.infer.cpp_kernels`); registered as
``torch.ops.minimind_attention_avx2.decode`` with a fake implementation, so compiled decode graphs
call it as an opaque op.  :func:`use_decode_attention_` switches an engine's model copy to it.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from minimind.infer.cpp_kernels import build_and_check, load_extension

__all__ = ["attend", "available", "use_decode_attention_"]

_NAME = "minimind_attention_avx2"


def _build() -> None:
    from torch.utils.cpp_extension import load

    load_extension(load, _NAME, "decode_attention_avx2.cpp")

    @torch.library.register_fake(f"{_NAME}::decode")
    def _decode_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(q, memory_format=torch.contiguous_format)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The same attention in float64 with plain tensor ops (``q [B, H, d]``, ``k, v [B, KV, S, d]``,
    ``mask [B, S]``); zeros for a row that attends to nothing."""
    b, h, d = q.shape
    kv = k.shape[1]
    qg = q.double().view(b, kv, h // kv, d)
    scores = torch.einsum("bgjd,bgsd->bgjs", qg, k.double()) / d ** 0.5
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bgjs,bgsd->bgjd", p, v.double()).reshape(b, h, d)


def _exact() -> bool:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 20, generator=gen)
    k, v = torch.randn(2, 2, 9, 20, generator=gen), torch.randn(2, 2, 9, 20, generator=gen)
    mask = torch.rand(2, 9, generator=gen) > 0.3
    mask[:, 0] = True
    got = torch.ops.minimind_attention_avx2.decode(q, k, v, mask)
    return bool(torch.allclose(got.double(), reference(q, k, v, mask), rtol=1e-5, atol=1e-5))


@functools.cache
def available() -> bool:
    """Whether the kernel runs here: x86 with AVX2 + FMA, built, and exact on a small case."""
    return build_and_check("decode attention", _build, _exact)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``softmax(q kᵀ / sqrt(d) + mask) v`` for one query per row: ``q [B, H, 1, d]``, ``k, v [B, KV,
    S, d]`` (float32 or bf16, last dim contiguous), ``mask [B, 1, 1, S]`` bool (True = attend);
    returns ``[B, H, 1, d]`` like :func:`minimind.model.attention.attend`."""
    b, h, _, d = q.shape
    out = torch.ops.minimind_attention_avx2.decode(q.reshape(b, h, d), k, v, mask.reshape(b, mask.shape[-1]))
    return out.view(b, h, 1, d)


def use_decode_attention_(model: nn.Module) -> int:
    """Let every attention layer of ``model`` (an engine's own copy) attend its CPU decode steps
    through the kernel, where it runs here; returns how many layers do (0: the model is untouched)."""
    from minimind.model.attention import Attention

    layers = [m for m in model.modules() if isinstance(m, Attention)]
    if not layers or not available():
        return 0
    for layer in layers:
        layer.decode_attend = attend
    return len(layers)
