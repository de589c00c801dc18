"""Comparing the weights of two training runs that should agree up to float rounding."""

from __future__ import annotations

import torch


def assert_same_weights(ma: dict[str, torch.Tensor], mb: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    """Tensor-wise ``||a - b|| <= rtol * ||a||``: two runs that differ only in summation order agree
    to float32 rounding as a whole, while Adam may still flip a lone element whose gradient is ~0
    (its update is ``lr * m / sqrt(v)``, near +-lr whatever the gradient's size), by an amount that
    depends on the CPU's kernels, so an element-wise bound is no portable test."""
    for k in ma:
        a, b = ma[k].double(), mb[k].double()
        err, ref = float((a - b).norm()), float(a.norm())
        assert err <= rtol * ref + 1e-12, f"{k}: |a - b| = {err:.3e} > {rtol} x |a| = {rtol * ref:.3e}"
