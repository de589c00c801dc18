"""An int8 product of a few activation rows on AVX2 (``csrc/int8_avx2.cpp``), made for CPUs without
int8 dot-product instructions and used on those with them for one or two rows.

Why: on such a CPU (many laptops, AMD Zen 1-3, Intel before Ice Lake) torch has no fast int8 kernel
for a few activation rows.  ``torch._int_mm`` and oneDNN's int8 GEMM are emulated there, and
``torch._weight_int8pack_mm`` (the int8 weight-only GEMV) converts every weight to a float and
re-reads the whole matrix for each activation row (the products of a minimind-3 decode step: 6.1 ms
for one row, 17.9 ms for eight).  This kernel multiplies in integers with AVX2's ``vpmaddubsw``, reading
each weight once for up to 4 activation rows.

Numbers.  The weights are :class:`~minimind.infer.quant.Int8Linear`'s own per-row codes, unchanged.
Each activation row is written in two 7-bit digits, ``x = a (hi + lo / 127)`` with
``a = max|x| / 63``, so it is carried to 1/16002 of the row's maximum: the product is closer to the
float one than the bf16 activations of ``_weight_int8pack_mm`` (relative error ~1e-4 against ~3e-3,
measured on a random 2432 x 768 matrix).  One digit would be llama.cpp's q8_0 precision (error
~5e-3); the second digit costs ~10% at one row.  Over the 57 products of a minimind-3 decode step
(2-core AVX2 EPYC) it took 4.5 ms at one row against 6.1 ms for ``_weight_int8pack_mm``, 16.4
against 17.9 ms at eight, and was slower from 12 rows on, so it serves up to 8 rows.  Those figures
were one thread's (the build lacked ``-fopenmp``, see :func:`~minimind.infer.cpp_kernels.load_extension`); split over 2 threads the 33
fused products of a step take 3.9 ms at one row and 8.9 ms at eight.

Where the CPU has int8 dot products it still wins at one and two rows, where the product is bound by
memory: on a 2-core AMD EPYC with AVX-512 BF16/VNNI, 2 threads, the 33 fused products of a step took
1.20 / 1.50 ms at 1 / 2 rows against 2.33 / 2.13 ms for ``_weight_int8pack_mm`` (53 against 28 GB/s
at one row).  From 3 rows on, the AVX2 tile (three instructions per product, 2.78 ms at 4 rows) lost to
the native kernels, so where the CPU has AVX-512 VNNI the kernel multiplies with ``vpdpbusd`` instead
(one instruction, the same integer sums, so bit for bit the same results; :func:`vnni`): the same
33 products took 1.9 / 3.3 / 6.6 ms at 4 / 8 / 16 rows against 2.8 / 5.3 / 10.4 ms for the AVX2
tile, 2.4 ms for ``_weight_int8pack_mm`` at 4 rows and 6.1 / 8.2 ms for the two-digit
``torch._int_mm`` at 8 / 16 (12.8 against 11.9 ms at 32 rows), so there it serves up to 16 rows
(:data:`~minimind.infer.quant.VNNI_MAX_ROWS`; 2 on CPUs with other int8 dot products,
:data:`~minimind.infer.quant.AVX2_MAX_ROWS_VNNI`).

It is built on first use and used only where :func:`available` says so (see
:mod:`minimind.infer.cpp_kernels`).  The ops are registered with torch
(``torch.ops.minimind_int8_avx2``) with fake implementations, so ``torch.compile`` traces them as
opaque calls.
"""

from __future__ import annotations

import functools

import torch

from minimind.infer.cpp_kernels import build_and_check, load_extension

__all__ = ["available", "linear", "pack", "parallel_threads", "use_vnni", "vnni"]

_NAME = "minimind_int8_avx2"


def _build() -> None:
    from torch.utils.cpp_extension import load

    load_extension(load, _NAME, "int8_avx2.cpp")

    @torch.library.register_fake(f"{_NAME}::pack")
    def _pack_fake(codes: torch.Tensor) -> torch.Tensor:
        return codes.new_empty(codes.numel(), dtype=torch.uint8)

    @torch.library.register_fake(f"{_NAME}::linear")
    def _linear_fake(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], scale.shape[0], dtype=torch.float32)


def _exact() -> bool:
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (16, 64), generator=gen, dtype=torch.int8)
    scale = torch.rand(16, generator=gen) + 0.5
    x = torch.randn(5, 64, generator=gen)
    got = linear(x, pack(codes), scale).double()
    want = x.double() @ (codes.double() * scale.double().unsqueeze(1)).t()
    return bool(torch.allclose(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item()))


@functools.cache
def available() -> bool:
    """Whether the kernel runs here: x86 with AVX2 + FMA, built, and exact on a small product."""
    return build_and_check("int8", _build, _exact)


def parallel_threads(n: int = 64) -> int:
    """How many threads the kernel's row split uses for ``n`` tiles (``torch.get_num_threads()`` when
    the build is parallel)."""
    return torch.ops.minimind_int8_avx2.parallel_threads(n)


def vnni() -> bool:
    """Whether the products run on the AVX-512 VNNI tile (the CPU has it and :func:`use_vnni` left it on)."""
    return available() and torch.ops.minimind_int8_avx2.vnni()


def use_vnni(on: bool = True) -> bool:
    """Switch the VNNI tile on or off (on by default where the CPU has it; off gives the AVX2 tile, with
    the same results); returns whether it is on now.  For tests and A/B timing."""
    return available() and torch.ops.minimind_int8_avx2.use_vnni(on)


def supports(out_features: int, in_features: int) -> bool:
    """Shapes the tiles cover: 8 output rows by 4 inputs."""
    return out_features % 8 == 0 and in_features % 4 == 0


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Int8 codes ``[N, K]`` as the kernel's tiled u8 weight (``codes + 128``, 8 rows x 4 inputs)."""
    return torch.ops.minimind_int8_avx2.pack(codes)


def linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x (codes * scale)ᵀ`` as float32 ``[M, N]`` for ``x [M, K]`` (float32 or bf16), ``scale``
    float32 ``[N]`` and ``packed`` from :func:`pack`."""
    return torch.ops.minimind_int8_avx2.linear(x, packed, scale)
