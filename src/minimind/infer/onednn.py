"""oneDNN prepacked weights for the engine's own CPU weight copy (bf16 linears, int8 GEMMs).

Why: a decode step multiplies every weight matrix by one (or a few) activation rows, so its time
is the time the kernels take to stream the weights.  The kernels ``F.linear`` reaches in eager mode
re-lay the weight out for the GEMM on every call; oneDNN can do that once, at load, into its own
blocked layout (what inductor's ``freezing`` does for bf16 linears), and the products then run on
the blocked weight directly.  Measured on a 2-core Xeon with AVX-512 BF16/VNNI and AMX, one thread,
the 57 products of a minimind-3 decode step (8 blocks' seven matrices and the LM head, median of
interleaved runs, ``bench/bench_engine.py`` notes in the README):

* bf16, ``torch.ops.mkldnn._linear_pointwise`` on a weight packed by
  ``torch.ops.mkldnn._reorder_linear_weight``: 11.5 ms at 1-16 rows, against 15.9-16.4 ms for
  ``F.linear`` (1.38x) and ~1.15x faster than ``torch.mv`` at one row; also faster for 100-row
  prefill chunks (18.6 vs 27.7 ms).  In whole decode steps of the engine (blocks of 25 steps, the
  two sides taking turns): 8 rows 1.29x faster than before, one row the same as ``torch.mv``
  (0.99-1.03x), and the first token of a 100-token prompt ~1.6x sooner.  Same numbers as ``F.linear`` bit for bit (both are oneDNN's
  bf16 GEMM with fp32 accumulation).  In float32 the packed weight was slower than ``torch.mv``
  (44 vs 38 ms), so only bf16 is packed.
* int8, ``torch.ops.onednn.qlinear_pointwise`` (the x86 inductor quantization kernel, VNNI/AMX) on
  codes packed by ``torch.ops.onednn.qlinear_prepack``: run with unit scales it returns the exact
  int32 products ``digits qᵀ`` as float32, a drop-in for ``torch._int_mm`` in the two-digit scheme
  of :mod:`minimind.infer.quant` (same results, measured identical), and faster: 9.6 / 11.7 /
  14.7 ms at 2 / 8 / 16 rows against 13.4 / 16.3 / 20.0 ms for ``torch._int_mm`` and 10.7 / 21.5 ms
  (2 / 8 rows) for ``torch._weight_int8pack_mm``.  At one row ``_weight_int8pack_mm`` stays ahead
  (9.0 vs 9.5 ms), so the dispatch keeps it there.  Whole int8 decode steps at 8 rows: 1.16x.

Both are used only where the CPU runs them natively, checked when the engine loads (not assumed):
the ops must exist, oneDNN must report bf16 support and ``/proc/cpuinfo`` must list a native bf16
(``avx512_bf16`` / ``amx_bf16``) or int8 dot-product (``avx512_vnni`` / ``avx_vnni`` /
``amx_int8``) instruction, and a small product must match the plain kernel (int8: and run within 2x
of ``torch._int_mm``, see :func:`_int8_gemm_not_slow`).  Elsewhere (AVX2-only
CPUs, where bf16 is emulated; other builds) the engine keeps its previous kernels.

Packed weights are opaque oneDNN tensors: they cannot be deep-copied or saved, so the modules holding
them drop the packed copy when pickled or deep-copied and rebuild it from the plain weight, and
rebuild it after every ``load_state_dict`` (:meth:`GenerationEngine.refresh_weights`).

Compiled decode calls the packed bf16 products too, from two rows on.  An opaque packed tensor cannot
be a graph input, so :class:`PackedLinear` keeps it in a registry under an integer key and calls the
op ``minimind_onednn::packed_linear(x, weight, key)``, which the graph calls opaquely (its output
shape comes from ``weight``; the packed copy is looked up at run time, so a re-pack after
``load_state_dict`` reaches the compiled step without a recompile).  Without it, compiled decode ran
inductor's unpacked products: measured on a 2-core AMD EPYC with AVX-512 BF16, 57 products of a
minimind-3 step at eight rows cost 5.9 ms in a compiled step (8.3 ms a step in all) against 3.35 ms
packed and fused (5.5 ms a step).  One row stays on inductor's own kernel (``torch.mv`` on the plain
weight, a reduction the graph fuses with the casts around it): as fast or faster in whole steps on
that CPU (265.8 and 274.6 tok/s against 243.4 and 283.1 through the op, runs of
``bench/bench_engine.py`` that alternated), without 33 op dispatches a step.
"""

from __future__ import annotations

import functools
import itertools
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minimind.train.device import cpu_has_fast_bf16, cpu_has_fast_int8

__all__ = ["PackedLinear", "bf16_packing_supported", "int8_gemm", "int8_gemm_supported",
           "pack_bf16", "pack_int8"]

def _has_ops(namespace: Any, *names: str) -> bool:
    return all(hasattr(namespace, n) for n in names)


@functools.cache
def bf16_packing_supported() -> bool:
    """Whether packed bf16 linears run natively here and match ``F.linear`` on a small product."""
    if not torch.backends.mkldnn.is_available():
        return False
    if not _has_ops(torch.ops.mkldnn, "_reorder_linear_weight", "_linear_pointwise", "_is_mkldnn_bf16_supported"):
        return False
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported() or not cpu_has_fast_bf16():
            return False
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(24, 40, generator=gen).to(torch.bfloat16)
        x = torch.randn(3, 40, generator=gen).to(torch.bfloat16)
        got = _packed_bf16_linear(x, pack_bf16(w)).float()
    except RuntimeError:
        return False
    want = F.linear(x.float(), w.float())
    return bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2))


@functools.cache
def int8_gemm_supported() -> bool:
    """Whether oneDNN's int8 GEMM runs natively here and returns exact int32 products."""
    if not torch.backends.mkldnn.is_available():
        return False
    if not _has_ops(torch.ops.onednn, "qlinear_prepack", "qlinear_pointwise") or not cpu_has_fast_int8():
        return False
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (24, 40), generator=gen, dtype=torch.int8)
    digits = torch.randint(-127, 128, (3, 40), generator=gen, dtype=torch.int8)
    try:
        got = int8_gemm(digits, pack_int8(codes))
    except RuntimeError:
        return False
    want = (digits.double() @ codes.double().t()).float()  # |sum| < 2^24: exact in float32
    return bool(torch.equal(got, want)) and _int8_gemm_not_slow()


def _best_seconds(fn: Callable[[], object], runs: int = 3) -> float:
    """The fastest of ``runs`` calls of ``fn``, after one untimed call (it creates oneDNN's primitive)."""
    fn()
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _int8_gemm_not_slow() -> bool:
    """Whether oneDNN's int8 GEMM runs at native speed, not through a reference fallback.

    On some CPUs that list VNNI oneDNN picks a plain C++ implementation for this product: on a 2-core
    AMD EPYC with AVX-512 VNNI (torch 2.13) it took 16 ms per activation row of a 768 x 2432 product,
    ~100x ``torch._int_mm`` on the same digits, and the engine ran int8 decode of 2-32 rows on it.  Right numbers,
    so the exactness check passes; this one times both on one small product (best of 3) and keeps
    oneDNN only within 2x of ``torch._int_mm`` (it was faster where it runs natively)."""
    if not hasattr(torch, "_int_mm"):
        return True  # nothing to compare with; exactness was checked
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(-127, 128, (1024, 768), generator=gen, dtype=torch.int8)
    digits = torch.randint(-64, 65, (4, 768), generator=gen, dtype=torch.int8)
    packed, codes_t = pack_int8(codes), codes.t()
    ours = _best_seconds(lambda: int8_gemm(digits, packed))
    plain = _best_seconds(lambda: torch._int_mm(digits, codes_t))
    return ours <= 2.0 * plain + 1e-4


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """``weight [out, in]`` (bf16) in oneDNN's blocked layout, for any number of rows."""
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def _packed_bf16_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")


# ---- packed bf16 products inside compiled graphs ----------------------------------------------------
#: key -> the packed copy of a live PackedLinear's weight (the entry goes with its module)
_PACKED: dict[int, torch.Tensor] = {}
_KEYS = itertools.count()
_LIB = torch.library.Library("minimind_onednn", "DEF")
_LIB.define("packed_linear(Tensor x, Tensor weight, int key) -> Tensor")


def _packed_linear_cpu(x: torch.Tensor, weight: torch.Tensor, key: int) -> torch.Tensor:
    """``x weightᵀ`` on the packed copy registered under ``key`` (``F.linear`` if there is none)."""
    packed = _PACKED.get(key)
    if packed is None or x.dtype != torch.bfloat16:
        return F.linear(x, weight)
    return _packed_bf16_linear(x, packed)


_LIB.impl("packed_linear", _packed_linear_cpu, "CPU")


@torch.library.register_fake("minimind_onednn::packed_linear")
def _packed_linear_fake(x: torch.Tensor, weight: torch.Tensor, key: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class _Int8Packed:
    """oneDNN-packed int8 codes with the unit scales / zero points the kernel call needs."""

    def __init__(self, codes: torch.Tensor) -> None:
        with torch.no_grad():
            self.packed = torch.ops.onednn.qlinear_prepack(codes.contiguous(), None)
        self.ones = torch.ones(codes.shape[0], dtype=torch.float32)
        self.zeros = torch.zeros(codes.shape[0], dtype=torch.int64)


def pack_int8(codes: torch.Tensor) -> _Int8Packed:
    """Int8 weight codes ``[out, in]`` prepacked for :func:`int8_gemm`."""
    return _Int8Packed(codes)


def int8_gemm(digits: torch.Tensor, packed: _Int8Packed) -> torch.Tensor:
    """``digits codesᵀ`` for int8 ``digits [M, in]``: the int32 sums as float32 ``[M, out]`` (unit
    activation and weight scales; exact while ``|sum| < 2^24``, relative error 6e-8 beyond)."""
    return torch.ops.onednn.qlinear_pointwise(digits.contiguous(), 1.0, 0, packed.packed, packed.ones,
                                              packed.zeros, None, 1.0, 0, torch.float32, "none", [], "")


class PackedLinear(nn.Module):
    """A bias-free bf16 linear layer computed on a oneDNN-packed copy of its weight.

    ``weight`` is the parameter of the layer it replaces (shared, not copied: same state-dict key,
    tied weights stay tied); the packed copy is rebuilt after ``load_state_dict`` and on deep copy.
    It lives in a registry under ``self.key`` (see the module docstring: compiled graphs reach it
    through an op).  Inputs that are not bf16 CPU tensors go through ``F.linear``."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        if getattr(linear, "bias", None) is not None:
            raise ValueError("PackedLinear has no bias; the MiniMind projections have none")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        if self.weight.dtype != torch.bfloat16 or self.weight.device.type != "cpu":
            raise ValueError("PackedLinear packs bf16 CPU weights only")
        # a part of a fused layer (minimind.infer.fuse): its weight is rows of the fused weight, it is
        # never called, and it keeps no packed copy
        self.fused_part = False
        self._new_key()

    def _new_key(self) -> None:
        self.key = next(_KEYS)
        weakref.finalize(self, _PACKED.pop, self.key, None)
        self.repack()

    @property
    def packed(self) -> bool:
        return self.key in _PACKED

    def repack(self) -> None:
        """Re-lay out ``weight`` (call after changing it other than through ``load_state_dict``)."""
        if self.fused_part:
            _PACKED.pop(self.key, None)
        else:
            _PACKED[self.key] = pack_bf16(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16 or x.device.type != "cpu":
            return F.linear(x, self.weight)
        if torch.compiler.is_compiling():  # the graph calls the op; eager skips its dispatch
            if x.numel() == self.in_features:  # one row: inductor's own kernel (module docstring)
                return torch.mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], self.out_features)
            return torch.ops.minimind_onednn.packed_linear(x, self.weight, self.key)
        return _packed_linear_cpu(x, self.weight, self.key)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.repack()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._new_key()  # a copy (deepcopy, unpickling) packs its own weight under a key of its own

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed bf16"
