"""Muon for the hidden weight matrices, AdamW for everything else, in one optimizer.

Muon (Jordan et al., 2024) replaces each 2-D hidden matrix's update by the orthogonalised momentum:

    m_t = μ m_{t-1} + g_t                      (momentum; Nesterov: u = g_t + μ m_t, else u = m_t)
    O_t = NewtonSchulz5(u) ≈ U Vᵀ              (for u = U Σ Vᵀ: every singular value pushed to ~1)
    W  ← W (1 − lr·λ) − lr · sqrt(max(1, rows / cols)) · O_t

so every direction of the matrix moves at the same rate, whatever the gradient's spectrum.  The
embedding, the (tied) output head, norm gains and other parameters keep AdamW: Muon is defined for
hidden matrices, and the embedding's rows are updated sparsely.

Why one class rather than two optimizers: the training loop owns exactly one optimizer (its learning
rate schedule, gradient clipping, checkpoint and exact resume all go through ``param_groups`` and
``state_dict``), so a group's ``muon`` flag picks the update rule.  Muon groups carry
``lr_scale = muon_lr / learning_rate`` so the loop's one schedule drives both rates.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

#: Coefficients of the quintic iteration ``X ← aX + (b A + c A²) X`` with ``A = X Xᵀ`` (Jordan et al.):
#: chosen for the steepest rise of small singular values, converging to ~[0.7, 1.2] rather than 1.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalise ``g`` (2-D): ``U Vᵀ`` of its SVD, singular values in ~[0.7, 1.2].

    Works on the wide orientation (rows ≤ cols) so ``X Xᵀ`` is the small Gram matrix; computes in
    float32 on CPU (bf16 matmuls are emulated on many CPUs) and bfloat16 on CUDA.
    """
    a, b, c = NS_COEFFS
    dtype = torch.bfloat16 if g.is_cuda else torch.float32
    x = g.to(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + eps)  # spectral norm <= Frobenius norm = 1: inside the iteration's basin
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * (A @ A)) @ x
    return (x.T if tall else x).to(g.dtype)


def is_hidden_matrix(name: str, p: Tensor) -> bool:
    """Muon's parameters: 2-D weights inside the decoder blocks (not the embedding or the head)."""
    return p.dim() == 2 and ".layers." in f".{name}" and "embed" not in name and "lm_head" not in name


class MuonAdamW(torch.optim.Optimizer):
    """Groups with ``muon=True`` take Muon steps, the others AdamW steps (decoupled weight decay).

    Group keys: ``lr``, ``weight_decay``; Muon: ``momentum``, ``nesterov``, ``ns_steps``; AdamW:
    ``betas``, ``eps``.  State: ``momentum_buffer`` (Muon) or ``step``/``exp_avg``/``exp_avg_sq``.
    """

    def __init__(self, params: Iterable[dict[str, Any]], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "momentum": momentum,
                    "nesterov": nesterov, "ns_steps": ns_steps, "muon": False}
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon groups hold 2-D matrices only")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (self._muon if group["muon"] else self._adamw)(group)
        return loss

    def _muon(self, group: dict[str, Any]) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(p.grad)
            u = p.grad.add(buf, alpha=mu) if group["nesterov"] else buf
            o = newton_schulz(u, group["ns_steps"])
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(o, alpha=-lr * max(1.0, p.shape[0] / p.shape[1]) ** 0.5)

    def _adamw(self, group: dict[str, Any]) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        b1, b2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            t = float(state["step"])
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            if wd:
                p.mul_(1 - lr * wd)
            denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
            p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
