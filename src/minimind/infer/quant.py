"""Int8 weight-only quantization of the inference engine's own weight copy (``--quantize int8``).

Decoding a small model on a CPU is bound by reading the weights: every generated token streams every
block matrix from memory once.  Storing those matrices as int8 halves the bytes of bf16 (a quarter of
fp32), and with them the time per token.

**Scheme** (per output channel, symmetric, weight-only).  For a linear layer ``y = x Wᵀ`` with
``W [out, in]``, row ``j`` gets one scale and int8 codes::

    s_j = max_i |W_ji| / 127          q_ji = clamp(round(W_ji / s_j), -127, 127)
    y_j = s_j * sum_i x_i q_ji         (= x (q * s)ᵀ, without ever materialising q * s)

The activations stay in floating point (bf16 on the CPU kernel), so the only error is the weight
rounding: ``|W_ji - s_j q_ji| <= s_j / 2``, i.e. at most 0.4% of the row's largest weight.  Rows are
quantized independently, so a row's codes do not depend on which other rows share its matrix.

**Kernels** (CPU), by the number of rows ``M`` in the call, each the fastest measured there:

* ``M <= 2`` where our AVX2 integer kernel builds (see the end of this list and
  :data:`AVX2_MAX_ROWS_VNNI`): it streams the weights ~1.9x faster than the GEMV below at one row;
  ``M <= 16`` where that kernel runs its AVX-512 VNNI tile (:data:`VNNI_MAX_ROWS`), faster than
  every native kernel below up to there.
* ``M <= 4`` (decode of a few rows): ``torch._weight_int8pack_mm``, the GEMV torchao's int8
  weight-only mode calls on the CPU: it converts the codes to floats inside the product and scales the
  output.  Its fast path takes bf16 activations only (fp32 takes a much slower one), so activations are
  cast to bf16 for it.  Its cost grows linearly with ``M`` (it re-reads the weights per row).
* ``4 < M <= 32`` (batched decode): ``torch._int_mm`` (oneDNN's int8 GEMM, VNNI/AMX), whose cost is
  nearly flat in ``M``.  It needs int8 activations, but quantizing them would change the numbers, so
  each row is written in two base-254 int8 digits: ``u = x / a`` with ``a = max|x| / 127``,
  ``hi = round(u)``, ``lo = round(254 (u - hi))``, so ``x = a (hi + lo / 254) + e`` with
  ``|e| <= a / 508`` (1/64516 of the row maximum; one digit alone would err by up to 1/254 of it).
  Both digit rows go through one product: ``y = a s (x_hi qᵀ + x_lo qᵀ / 254)``, exact in int32.
  With oneDNN's int8 kernel available (:mod:`minimind.infer.onednn`: VNNI/AMX CPUs, checked at
  load) the same two-digit product runs on codes prepacked once by ``qlinear_prepack``, with the
  same results and faster from 2 rows on, so there ``M = 1`` keeps ``_weight_int8pack_mm`` and
  ``2 <= M <= 32`` takes the packed GEMM (:meth:`Int8Linear.use_onednn`).
* ``M > 32`` (prefill): the codes are dequantized to bf16 once per call and multiplied with the dense
  bf16 GEMM, whose cost per row is far lower than either int8 kernel's at this size.

On a CPU without int8 and bf16 dot-product instructions (AVX2 only) the two-digit ``_int_mm`` and the
bf16 GEMM are emulated and 10-30x slower, so there (:func:`cpu_kernels`) ``_weight_int8pack_mm`` serves
up to 24 rows and larger products dequantize to float32.  Up to 8 rows go through our own AVX2
integer kernel instead where it builds (:mod:`minimind.infer.avx2_int8`, :meth:`Int8Linear.use_avx2_kernel`):
activations in two 7-bit digits (to 1/16002 of the row maximum, closer than bf16), measured over the
57 products of a minimind-3 step 1.35x faster than ``_weight_int8pack_mm`` at one row, 1.05-1.29x at
2-8 rows, and slower from 12 rows on (it runs out of integer throughput, not bandwidth).

Elsewhere (CUDA, or a build without the ops) ``linear(x, q.to(dtype)) * s`` computes the same numbers.

**What is quantized.**  The seven matrices of every block (q/k/v/o, gate/up/down; for MoE every
expert's three) and, by default, the LM head.  Embeddings, norms and the MoE router stay in floating
point: the embedding is a row lookup (one row per token, not a stream of the whole matrix), norms
are vectors, and routing decisions are discontinuous in the router's logits.

**Float weights, one row** (:func:`use_gemv_`, no quantization): a decode step of one sequence
multiplies each weight by a single activation row, and on the CPU ``F.linear`` sends that through
the general GEMM (oneDNN for bf16), while ``torch.mv`` takes the matrix-vector kernel: measured on a
2-core Xeon, a minimind-3 bf16 decode step took 22-30% less time with the same logits bit for bit.
:class:`GemvLinear` keeps the float ``weight`` parameter (same state-dict key), so loading and
refreshing weights are unchanged.

In the engine's copy each block's q/k/v and gate/up layers are then fused into one product each
(:mod:`minimind.infer.fuse`; exact, since the scales are per row).

Quantized modules load *float* checkpoints: :class:`Int8Linear` takes the ``weight`` key of a state
dict and quantizes it, so ``engine_model.load_state_dict(training_model.state_dict())`` re-quantizes
after every RL update with no special path.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minimind.infer import avx2_bf16, avx2_int8, onednn
from minimind.train.device import cpu_has_fast_bf16, cpu_has_fast_int8

__all__ = ["QUANT_MODES", "GemvLinear", "Int8Linear", "cpu_kernels", "quantize_int8_", "quantize_model_",
           "quantize_rows", "use_avx2_kernel_", "use_gemv_", "use_onednn_", "weight_bytes"]

QUANT_MODES = ("int8",)
_KERNEL_DTYPE = torch.bfloat16  # the activation dtype of the CPU kernel's fast path
_HAS_INT8PACK = hasattr(torch, "_weight_int8pack_mm")
_HAS_INT_MM = hasattr(torch, "_int_mm")
GEMV_MAX_ROWS = 4  # rows up to which _weight_int8pack_mm is the fastest kernel (see module doc)
INT_MM_MAX_ROWS = 32  # rows up to which the two-digit _int_mm beats dequantize + bf16 GEMM
GEMV_MAX_ROWS_NO_VNNI = 24  # without int8 dot-product instructions: _weight_int8pack_mm up to here
AVX2_MAX_ROWS = 8  # without them, the AVX2 integer kernel (minimind.infer.avx2_int8) up to here
# With them, the AVX2 integer kernel still streams the weights fastest at one or two rows (it is bound
# by memory, not by integer throughput there): the 33 fused int8 products of a minimind-3 step on a
# 2-core AMD EPYC with AVX-512 BF16/VNNI, 2 threads, 1.20 / 1.50 ms at 1 / 2 rows against 2.33 / 2.13
# for _weight_int8pack_mm; at 4 rows 2.78 against 2.42, so larger products keep the native kernels.
AVX2_MAX_ROWS_VNNI = 2
# Where the kernel has its AVX-512 VNNI tile (vpdpbusd, minimind.infer.avx2_int8.vnni) it beats the
# native kernels up to here: 3.3 against 6.1 ms (two-digit _int_mm) at 8 rows, 6.6 against 8.2 at 16,
# 12.8 against 11.9 at 32 (same CPU and products).
VNNI_MAX_ROWS = 16


@functools.cache
def cpu_kernels() -> tuple[bool, bool]:
    """``(int8 GEMM native, bf16 GEMM native)`` on this CPU.

    The two-digit ``_int_mm`` and the bf16 prefill GEMM are only fast with the instructions made for
    them (VNNI / AMX-INT8, AVX-512 BF16 / AMX-BF16).  Without them (an AVX2-only CPU) both are
    emulated: measured on a 2-core AVX2 EPYC, a ``[8, 768] x [768, 2432]`` product took 10.4 ms
    through ``_int_mm`` against 0.36 ms through ``_weight_int8pack_mm``, and a 100-row prefill 18.9
    ms dequantized to bf16 against 3.4 ms dequantized to float32.  So there the GEMV kernel serves up
    to :data:`GEMV_MAX_ROWS_NO_VNNI` rows and larger products dequantize to float32."""
    return _HAS_INT_MM and cpu_has_fast_int8(), cpu_has_fast_bf16()


@torch.compiler.assume_constant_result
def _kernels() -> tuple[bool, bool]:
    """:func:`cpu_kernels`, a constant for ``torch.compile``: dynamo traces into a ``functools.cache``
    wrapper (measured: stacking the two decorators on one function breaks the graph)."""
    return cpu_kernels()


def _two_digit_int8_mm(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                       packed: Any | None = None) -> torch.Tensor:
    """``x (codes * scale)ᵀ`` in float32 through one int8 GEMM, ``x`` split into two int8 digits
    per element (module doc): ``y = a s (hi qᵀ + lo qᵀ / 254)``.  ``x [M, K]``, ``codes [N, K]``.
    The GEMM is ``torch._int_mm``, or oneDNN's on ``packed`` (:func:`onednn.pack_int8` of ``codes``)."""
    xf = x.float()
    a = xf.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 127.0
    u = xf / a
    hi = torch.round(u)
    lo = torch.round((u - hi) * 254.0)
    digits = torch.cat([hi, lo]).to(torch.int8)
    if packed is not None:
        acc = onednn.int8_gemm(digits, packed)  # the int32 sums as float32 [2M, N]
    else:
        acc = torch._int_mm(digits, codes.t()).float()  # int32 [2M, N], exact
    m = x.shape[0]
    return (acc[:m] + acc[m:] * (1.0 / 254.0)) * a * scale.float()


def quantize_rows(weight: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 codes and scales of ``weight [out, in]`` (see module doc).

    The scales are returned as float32 but hold values exactly representable in ``scale_dtype`` (the
    dtype they are stored in), rounded *up* from ``max|W_row| / 127`` so that no code exceeds 127, and
    the codes are rounded against these stored scales: ``|W - s q| <= s / 2`` holds for the scales the
    kernel actually multiplies by.  An all-zero row gets scale 1 (its codes are 0 either way)."""
    w = weight.detach().float()
    exact = w.abs().amax(dim=1) / 127.0
    exact = torch.where(exact > 0, exact, torch.ones_like(exact))
    stored = exact.to(scale_dtype)
    up = torch.nextafter(stored, torch.full_like(stored, float("inf")))
    stored = torch.where(stored.float() < exact, up, stored)
    scale = stored.float()
    codes = torch.round(w / scale.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return codes, scale


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weight codes ``[out, in]`` and one scale per output row.

    ``out_dtype`` (the engine's compute dtype) is the dtype of the result.  Loading a state dict reads
    a float ``weight`` (what :class:`torch.nn.Linear` saves) and quantizes it."""

    def __init__(self, in_features: int, out_features: int, out_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.out_dtype = out_dtype
        # Not persistent: the module saves/loads the float ``weight`` key, so checkpoints stay float.
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8,
                                                    device=device), persistent=False)
        self.register_buffer("scale", torch.ones(out_features, dtype=_KERNEL_DTYPE, device=device),
                             persistent=False)
        self._packed: Any | None = None  # oneDNN-packed codes (use_onednn), rebuilt on every set_weight
        self._onednn = False
        self._tiled: torch.Tensor | None = None  # the AVX2 kernel's tiled codes (use_avx2_kernel)
        self._tiled_scale: torch.Tensor | None = None
        self._avx2 = False
        self._avx2_rows = AVX2_MAX_ROWS

    @classmethod
    def from_linear(cls, linear: nn.Linear, out_dtype: torch.dtype | None = None) -> Int8Linear:
        if linear.bias is not None:
            raise ValueError("Int8Linear has no bias; the MiniMind blocks' projections have none")
        w = linear.weight
        mod = cls(linear.in_features, linear.out_features, out_dtype or w.dtype, device=w.device)
        mod.set_weight(w)
        return mod

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize ``weight [out, in]`` (any float dtype) into this module's codes and scales."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} for an Int8Linear of "
                             f"{(self.out_features, self.in_features)}")
        codes, scale = quantize_rows(weight.to(self.qweight.device), self.scale.dtype)
        self.qweight.copy_(codes)
        self.scale.copy_(scale.to(self.scale.dtype))
        self._repack()

    def use_onednn(self, on: bool = True) -> bool:
        """Run 2-32 row products on oneDNN-packed codes where the CPU has its int8 kernel (checked
        once, :func:`onednn.int8_gemm_supported`); returns whether it is on now."""
        self._onednn = (bool(on) and not self.fused_part and self.qweight.device.type == "cpu"
                        and onednn.int8_gemm_supported())
        self._pack_onednn()
        return self._onednn

    def use_avx2_kernel(self, on: bool = True) -> bool:
        """Run few-row products through :mod:`minimind.infer.avx2_int8` where the kernel builds (checked
        once): 1-8 rows where the CPU lacks int8 dot-product instructions, 1-2 where it has them (see
        :data:`AVX2_MAX_ROWS_VNNI`), 1-16 on its AVX-512 VNNI tile (:data:`VNNI_MAX_ROWS`); returns whether
        it is on now."""
        self._avx2 = (bool(on) and not self.fused_part and self.qweight.device.type == "cpu"
                      and avx2_int8.supports(self.out_features, self.in_features) and avx2_int8.available())
        self._avx2_rows = AVX2_MAX_ROWS
        if self._avx2 and cpu_kernels()[0]:
            self._avx2_rows = VNNI_MAX_ROWS if avx2_int8.vnni() else AVX2_MAX_ROWS_VNNI
        self._tile_avx2()
        return self._avx2

    @property
    def fused_part(self) -> bool:
        """Rows of a fused layer (:mod:`minimind.infer.fuse`): its codes are a view of the fused codes
        and it is never called, so it keeps no kernel copies."""
        return self.qweight._base is not None

    def _repack(self) -> None:
        """Rebuild the kernels' own copies of the codes (after the codes change)."""
        self._pack_onednn()
        self._tile_avx2()

    def _pack_onednn(self) -> None:
        self._packed = onednn.pack_int8(self.qweight) if self._onednn else None

    def _tile_avx2(self) -> None:
        self._tiled = avx2_int8.pack(self.qweight) if self._avx2 else None
        self._tiled_scale = self.scale.float() if self._avx2 else None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_packed"] = None  # opaque oneDNN tensor: not copyable, rebuilt from the codes
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._pack_onednn()  # the AVX2 tiles are plain tensors: copied with the rest

    def dequantized(self) -> torch.Tensor:
        """``q * s`` as float32 ``[out, in]``: the weight this module actually multiplies by."""
        return self.qweight.float() * self.scale.float().unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        if x2.device.type != "cpu" or not _HAS_INT8PACK:
            y = F.linear(x2, self.qweight.to(x2.dtype)) * self.scale.to(x2.dtype)
        elif self._tiled is not None and rows <= self._avx2_rows:
            y = avx2_int8.linear(x2, self._tiled, self._tiled_scale)
        elif self._packed is not None and 1 < rows <= INT_MM_MAX_ROWS:
            y = _two_digit_int8_mm(x2, self.qweight, self.scale, self._packed)
        else:
            int8_native, bf16_native = _kernels()
            if rows <= (GEMV_MAX_ROWS if int8_native else GEMV_MAX_ROWS_NO_VNNI):
                y = torch._weight_int8pack_mm(x2.to(_KERNEL_DTYPE).contiguous(), self.qweight, self.scale)
            elif rows <= INT_MM_MAX_ROWS and int8_native:
                y = _two_digit_int8_mm(x2, self.qweight, self.scale)
            else:
                dense = _KERNEL_DTYPE if bf16_native else torch.float32
                y = F.linear(x2.to(dense), self.qweight.to(dense)) * self.scale.to(dense)
        return y.to(self.out_dtype).view(*shape[:-1], self.out_features)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: Any,
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        try:
            self.set_weight(state_dict[key])
        except ValueError as err:
            error_msgs.append(f"{key}: {err}")

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.dequantized().to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


def _swap_linears(module: nn.Module, out_dtype: torch.dtype, skip: tuple[str, ...]) -> int:
    """Replace every bias-free ``nn.Linear`` under ``module`` (names in ``skip`` excepted)."""
    swapped = 0
    for name, child in list(module.named_children()):
        if name in skip:
            continue
        if type(child) is nn.Linear and child.bias is None:
            setattr(module, name, Int8Linear.from_linear(child, out_dtype))
            swapped += 1
        else:
            swapped += _swap_linears(child, out_dtype, skip)
    return swapped


@torch.no_grad()
def quantize_int8_(model: nn.Module, lm_head: bool = True) -> nn.Module:
    """Quantize a :class:`~minimind.model.MiniMindForCausalLM` **in place**: every block projection
    (MoE experts included, the MoE router ``gate`` excluded) and, with ``lm_head``, the LM head.

    A tied LM head is untied here (the embedding keeps its float copy).  Returns ``model``."""
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise TypeError(f"quantize_int8_ expects a MiniMindForCausalLM, got {type(model).__name__}")
    out_dtype = next(model.parameters()).dtype
    swapped = sum(_swap_linears(layer, out_dtype, skip=("gate",)) for layer in layers)
    if lm_head and isinstance(getattr(model, "lm_head", None), nn.Linear):
        model.lm_head = Int8Linear.from_linear(model.lm_head, out_dtype)
        swapped += 1
    if swapped == 0:
        raise ValueError("no linear layer was quantized")
    return model


#: Rows up to which a float32 product on the CPU is split into row blocks, one per thread.
SPLIT_MAX_ROWS = 8


@torch.compiler.assume_constant_result
def _threads() -> int:
    """torch's intra-op thread count; a compiled decode step takes it as a constant (a call to
    ``torch.get_num_threads`` would break the graph)."""
    return torch.get_num_threads()


class GemvLinear(nn.Module):
    """A bias-free linear layer for decode on the CPU; ``weight`` is the float parameter of the layer
    it replaces (shared, not copied).

    * **float32, up to 8 rows, more than one thread**: the weight is cut into ``k`` row blocks (``k``
      = torch's thread count) and ``y_j = x W_jᵀ`` computed as one batched product over the blocks,
      ``y = [y_1 … y_k]``.  torch's float32 product of a few rows runs on one thread (measured on a
      2-core AVX2 EPYC over 300 MB of matrices: 11.8 GB/s with 1 or 2 threads), the batched product
      gives every thread a block (20.3 GB/s at one row, 10.0 against 7.0 at eight).
    * **one row, other dtypes**: ``torch.mv``, the CPU matrix-vector kernel (bf16: 22-30 % faster per
      decode step than ``F.linear``'s GEMM path on a Xeon, the same logits bit for bit).
    * **bf16 on a CPU without native bf16** (:meth:`use_avx2_kernel`): up to ``avx2_bf16.MAX_ROWS``
      rows through :mod:`minimind.infer.avx2_bf16`, more rows as a float32 GEMM on the upcast weight;
      torch's bf16 GEMM is emulated there (5.5x slower than the kernel at 8 and at 100 rows).
    * anything else: ``F.linear``.

    Each output is still one dot product over the input; only the kernel's summation order differs."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("GemvLinear has no bias; the MiniMind projections have none")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self._avx2 = False

    def use_avx2_kernel(self, on: bool = True) -> bool:
        """Run bf16 products through :mod:`minimind.infer.avx2_bf16` where the CPU lacks native bf16
        arithmetic and the kernel builds; returns whether it is used.  (Where bf16 is native, eager
        decode packs the weights for oneDNN, and in compiled decode inductor's own one-row product was
        as fast as the kernel: 231.6 against 231.2 tok/s, bf16 minimind-3, AVX-512 BF16 EPYC.)"""
        self._avx2 = (bool(on) and self.weight.dtype == torch.bfloat16 and self.weight.device.type == "cpu"
                      and not cpu_has_fast_bf16() and avx2_bf16.available())
        return self._avx2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self._avx2:  # CPU weights only (use_avx2_kernel)
            x2 = x.reshape(rows, self.in_features)
            if rows <= avx2_bf16.MAX_ROWS:
                y = avx2_bf16.linear(x2, self.weight)
            else:
                y = F.linear(x2.float(), self.weight.float())
            return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        if x.device.type != "cpu" or rows > SPLIT_MAX_ROWS:
            return F.linear(x, self.weight)
        k = _threads()
        if self.weight.dtype == torch.float32 and k > 1 and self.out_features % k == 0:
            blocks = self.weight.view(k, self.out_features // k, self.in_features)
            x2 = x.reshape(1, rows, self.in_features).expand(k, rows, self.in_features)
            y = torch.bmm(x2, blocks.transpose(1, 2))  # [k, rows, out / k]: block j is x W_jᵀ
            return y.transpose(0, 1).reshape(*x.shape[:-1], self.out_features)
        if rows == 1:
            return torch.mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight)


def use_gemv_(model: nn.Module) -> int:
    """Swap every bias-free ``nn.Linear`` of ``model`` for a :class:`GemvLinear` **in place** (tied
    weights stay tied: the parameters are shared); returns how many were swapped."""
    swapped = 0
    for name, child in list(model.named_children()):
        if type(child) is nn.Linear and child.bias is None:
            setattr(model, name, GemvLinear(child))
            swapped += 1
        else:
            swapped += use_gemv_(child)
    return swapped


def use_onednn_(model: nn.Module, int8: bool = True) -> int:
    """Switch ``model``'s layers **in place** to oneDNN-packed weights where this CPU runs them
    natively (:mod:`minimind.infer.onednn`): bias-free bf16 ``nn.Linear`` / :class:`GemvLinear`
    become :class:`~minimind.infer.onednn.PackedLinear` (weights stay shared), and, with ``int8``,
    :class:`Int8Linear` layers run 2-32 rows on packed codes (eager only: those codes are read in
    the layer's forward, which a compiled graph cannot trace).  Returns how many layers changed (0
    where neither kernel is available: the model is then untouched)."""
    changed = 0
    for name, child in list(model.named_children()):
        if isinstance(child, Int8Linear):
            changed += int(int8 and child.use_onednn())
        elif (type(child) in (nn.Linear, GemvLinear) and getattr(child, "bias", None) is None
              and child.weight.dtype == torch.bfloat16 and child.weight.device.type == "cpu"
              and onednn.bf16_packing_supported()):
            setattr(model, name, onednn.PackedLinear(child))
            changed += 1
        else:
            changed += use_onednn_(child, int8)
    return changed


def use_avx2_kernel_(model: nn.Module) -> int:
    """Switch ``model``'s layers **in place** to our AVX2 kernels: :class:`Int8Linear` to the integer
    kernel (:mod:`minimind.infer.avx2_int8`) for products of up to 8 rows where the CPU lacks int8
    dot-product instructions and up to 2 where it has them, bf16 :class:`GemvLinear` to
    :mod:`minimind.infer.avx2_bf16` where it lacks native bf16; returns how many layers use one (0
    where none applies: the model is then untouched)."""
    return sum(int(m.use_avx2_kernel()) for m in model.modules() if isinstance(m, (Int8Linear, GemvLinear)))


def quantize_model_(model: nn.Module, mode: str | None) -> nn.Module:
    """Apply ``mode`` (``None`` or one of :data:`QUANT_MODES`) to ``model`` in place."""
    if mode is None:
        return model
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose from {', '.join(QUANT_MODES)}")
    return quantize_int8_(model)


def weight_bytes(model: nn.Module, per_token: bool = True) -> int:
    """Bytes of weights one decode step reads: every parameter and int8 code/scale buffer, without
    the embedding table when ``per_token`` (a step reads one row of it per token, not the matrix)."""
    embeds = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)} if per_token else set()
    heads = {id(m.weight) for m in model.modules() if type(m) in (nn.Linear, GemvLinear, onednn.PackedLinear)}
    total, seen = 0, set()
    int8 = [b for m in model.modules() if isinstance(m, Int8Linear) for b in (m.qweight, m.scale)]
    for t in list(model.parameters()) + int8:
        if id(t) in embeds and id(t) not in heads:  # a tied head still streams the matrix
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:  # a fused part's weights are rows of the fused layer's storage
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total
