"""A bf16-weight product for CPUs with AVX2 and no native bf16 arithmetic (``csrc/bf16_avx2.cpp``).

Why: with ``--dtype bfloat16`` on such a CPU (AMD Zen 1-3, Intel before Cooper Lake) torch's bf16
GEMM is emulated.  Decode of one row goes through ``torch.mv`` (17 GB/s over a minimind-3 step's
matrices on a 2-core AVX2 EPYC, close to its memory bandwidth), but a few rows together (a server
with several clients, RL rollouts) and a prompt's prefill fall onto the emulated GEMM: 60 ms for the
57 products of a step at eight rows, 22 ms for one 100 x 768 x 2432 prefill product.

The kernel reads the layer's own bf16 matrix in place (no packed copy: an in-place weight update is
seen at once).  A 32-byte load holds 16 weights of one row; as 32-bit words, a left shift by 16 gives
the even ones as float32 and masking the low half the odd ones, which meet the activations' even and
odd values (de-interleaved once per call).  Sums are float32 FMAs, so the result is the float64 one
to float32 rounding, the same numbers as torch's bf16 kernels up to summation order.  Measured on the
2-core AVX2 EPYC (2 threads, the 57 products of a minimind-3 step): one row 7.4 ms against 7.4-8.7
for ``torch.mv``, eight rows 16 ms against 60 ms; one 2432 x 768 product at 100 rows 4.1 ms against
22.5 ms for the bf16 GEMM and 4.9 ms for a float32 GEMM on an upcast weight.  At 400 rows the float32
GEMM wins (13 against 23 ms), so :class:`~minimind.infer.quant.GemvLinear` sends up to
:data:`MAX_ROWS` rows here and larger products to float32.  It prefetches the next block of 4 rows
while it reads the current one: the 33 fused products of a step at one row 7.9 -> 6.7 ms (13.9 -> 16.4
GB/s; the machine reads ~20 GB/s).

Built on first use and checked against float64 (:mod:`minimind.infer.cpp_kernels`); registered as
``torch.ops.minimind_bf16_avx2.linear`` with a fake implementation, so compiled graphs call it as an
opaque op.
"""

from __future__ import annotations

import functools

import torch

from minimind.infer.cpp_kernels import build_and_check, load_extension

__all__ = ["MAX_ROWS", "available", "linear"]

_NAME = "minimind_bf16_avx2"
MAX_ROWS = 128  # rows up to which the kernel beats a float32 GEMM on an upcast weight (measured above)


def _build() -> None:
    from torch.utils.cpp_extension import load

    load_extension(load, _NAME, "bf16_avx2.cpp")

    @torch.library.register_fake(f"{_NAME}::linear")
    def _linear_fake(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


def _exact() -> bool:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(13, 40, generator=gen).bfloat16()
    x = torch.randn(3, 40, generator=gen)
    want = x.double() @ weight.double().t()
    return bool(torch.allclose(linear(x, weight).double(), want, rtol=1e-5, atol=1e-5))


@functools.cache
def available() -> bool:
    """Whether the kernel runs here: x86 with AVX2 + FMA, built, and exact on a small product."""
    return build_and_check("bf16", _build, _exact)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x weightᵀ`` as float32 ``[M, N]`` for ``x [M, K]`` (float32 or bf16) and a bf16 ``weight
    [N, K]``."""
    return torch.ops.minimind_bf16_avx2.linear(x, weight)
