"""Fused projections in the engine's weight copy: q/k/v as one product, gate/up as another.

A decode step of a small model is many small matrix-vector products, and each call pays more than
its bytes: an op dispatch, the activation conversion of the AVX2 kernel (its two digits), a wake-up of
the worker threads.  The same rows in fewer, larger products cost less: a minimind-3 step has 57
products, 33 fused.  Int8 scales are per output row, so stacking the parts' rows is exact:

    W_qkv = [W_q; W_k; W_v],  s_qkv = [s_q; s_k; s_v],  x W_qkvᵀ = [x W_qᵀ, x W_kᵀ, x W_vᵀ]

and the block splits the fused output back (:class:`~minimind.model.attention.Attention`,
:class:`~minimind.model.layers.SwiGLU`).

The parts stay in the model so that a state dict keeps its keys (``q_proj.weight`` …) and
``refresh_weights`` loads the same way as before: their codes and scales become *views* of the fused
layer's, so loading a part writes its rows of the fused codes, and a load-state-dict hook on the block
re-packs the fused layer's kernel copy afterwards.  The parts hold no kernel copies of their own and
are never called.

The same holds for bf16 layers on the AVX2 bf16 kernel (:class:`FusedGemvLinear`, on CPUs without
native bf16): the kernel reads the fused weight in place, and the parts' weights are views of its
rows, so loading a part updates the fused product with nothing to re-pack.  And for bf16 layers on
oneDNN-packed weights (:class:`FusedPackedLinear`, CPUs with native bf16): the block's hook re-packs
the fused weight after a load.  Measured on a 2-core AMD EPYC with AVX-512 BF16, the packed products
of a minimind-3 step: 3.10 -> 2.52 ms at one row, 3.95 -> 3.35 ms at eight (57 calls -> 33).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from minimind.infer.onednn import PackedLinear
from minimind.infer.quant import GemvLinear, Int8Linear
from minimind.model.attention import Attention
from minimind.model.layers import SwiGLU

#: block type -> (name of the fused layer, names of the parts in output order)
FUSIONS: dict[type[nn.Module], tuple[str, tuple[str, ...]]] = {
    Attention: ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    SwiGLU: ("gate_up_proj", ("gate_proj", "up_proj")),
}


class _NoStateOfItsOwn:
    """A fused layer saves and loads nothing itself: the parts carry the state-dict keys and load into
    its weight (their views of it); where it keeps a kernel copy, the block's hook re-packs after."""

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: Any,
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        pass

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        pass


class FusedInt8Linear(_NoStateOfItsOwn, Int8Linear):
    """The stacked rows of several :class:`Int8Linear` parts.  Saves and loads nothing itself: the
    parts carry the state-dict keys, and their codes are views of this layer's."""

    def extra_repr(self) -> str:
        return super().extra_repr() + ", fused"


class FusedGemvLinear(_NoStateOfItsOwn, GemvLinear):
    """The stacked bf16 weights of several :class:`GemvLinear` parts on the AVX2 bf16 kernel.  Saves
    and loads nothing itself: the parts carry the state-dict keys, and their weights are views of
    this layer's."""

    def __init__(self, weight: torch.Tensor) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self._avx2 = False
        self.use_avx2_kernel()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16, fused"


class FusedPackedLinear(_NoStateOfItsOwn, PackedLinear):
    """The stacked bf16 weights of several :class:`~minimind.infer.onednn.PackedLinear` parts, packed
    once.  Saves and loads nothing itself: the parts carry the state-dict keys, their weights are
    views of this layer's, and the block's hook re-packs it after a load."""

    def __init__(self, weight: torch.Tensor) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.fused_part = False
        self._new_key()

    def _repack(self) -> None:  # the name the block's load hook calls (as on FusedInt8Linear)
        self.repack()

    def extra_repr(self) -> str:
        return super().extra_repr() + ", fused"


@torch.no_grad()
def fuse_int8_projections_(model: nn.Module) -> int:
    """Fuse, **in place**, the q/k/v and gate/up :class:`Int8Linear` layers of every block of ``model``
    into one :class:`FusedInt8Linear` each, on the kernels the parts used (later ``use_onednn_`` /
    ``use_avx2_kernel_`` calls pack the fused layers and skip the parts); returns the number of
    fused layers (0 where no block's parts are all int8 with the same input)."""
    return _fuse_all(model, _fuse_int8)


@torch.no_grad()
def fuse_bf16_projections_(model: nn.Module) -> int:
    """Fuse, **in place**, the q/k/v and gate/up bf16 layers of every block into one layer each: 33
    kernel calls per minimind-3 step instead of 57.  :class:`GemvLinear` parts on the AVX2 bf16 kernel
    (``use_avx2_kernel_`` first) become a :class:`FusedGemvLinear`, oneDNN-packed parts (``use_onednn_``
    first) a :class:`FusedPackedLinear`.  Returns the number of fused layers (0 where no block's parts
    all use one of the two)."""
    return _fuse_all(model, _fuse_bf16)


def _fuse_all(model: nn.Module, fuse: Callable[[nn.Module, str, tuple[str, ...]], int]) -> int:
    fused = 0
    for block in list(model.modules()):
        spec = FUSIONS.get(type(block))
        if spec is not None and getattr(block, spec[0]) is None:
            fused += fuse(block, *spec)
    return fused


def _fuse_bf16(block: nn.Module, name: str, part_names: tuple[str, ...]) -> int:
    parts: list[nn.Module] = [getattr(block, n) for n in part_names]
    packed = all(type(p) is PackedLinear for p in parts)
    if not packed and not all(type(p) is GemvLinear and p._avx2 for p in parts):
        return 0
    if len({(p.in_features, p.weight.device) for p in parts}) != 1:
        return 0
    weight = torch.cat([p.weight for p in parts])
    fused = FusedPackedLinear(weight) if packed else FusedGemvLinear(weight)
    start = 0
    for p in parts:  # each part's weight becomes its rows of the fused weight (a view, no copy)
        p.weight = nn.Parameter(fused.weight[start:start + p.out_features], requires_grad=False)
        start += p.out_features
        if packed:
            p.fused_part = True
            p.repack()  # drops its own packed copy
    setattr(block, name, fused)
    if packed:
        block.register_load_state_dict_post_hook(_repack_fused)
    return 1


def _fuse_int8(block: nn.Module, name: str, part_names: tuple[str, ...]) -> int:
    parts: list[Int8Linear] = [getattr(block, n) for n in part_names]
    if not all(type(p) is Int8Linear for p in parts):
        return 0
    first = parts[0]
    if len({(p.in_features, p.out_dtype, p.qweight.device, p.scale.dtype) for p in parts}) != 1:
        return 0
    fused = FusedInt8Linear(first.in_features, sum(p.out_features for p in parts), first.out_dtype,
                            device=first.qweight.device)
    fused.qweight.copy_(torch.cat([p.qweight for p in parts]))
    fused.scale.copy_(torch.cat([p.scale for p in parts]))
    fused.use_onednn(first._onednn)  # the kernels the parts used (none, before the engine picks them)
    fused.use_avx2_kernel(first._avx2)
    start = 0
    for p in parts:
        rows = slice(start, start + p.out_features)
        p.qweight, p.scale = fused.qweight[rows], fused.scale[rows]
        p.use_onednn(False)  # a fused part keeps no kernel copies (Int8Linear.fused_part)
        p.use_avx2_kernel(False)
        start += p.out_features
    setattr(block, name, fused)
    block.register_load_state_dict_post_hook(_repack_fused)
    return 1


def _repack_fused(block: nn.Module, incompatible_keys: Any) -> None:
    """After a state dict loaded into the parts (and so into the fused codes), rebuild the fused
    layer's kernel copies.  A module-level function, not a closure: it survives ``deepcopy``."""
    name = FUSIONS[type(block)][0]
    fused = getattr(block, name, None)
    if fused is not None:
        fused._repack()
