"""Small building blocks of the decoder: RMSNorm, rotary embeddings (with YaRN) and SwiGLU.

Everything here follows the Qwen3 / reference MiniMind math exactly (RMSNorm in fp32, half-split RoPE with YaRN, SwiGLU),
because reference checkpoints must give the reference logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 and cast back.

    The weight is applied in float32 as the reference does (HF Qwen3 applies it after the cast; the
    difference is below bf16 resolution).
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = torch.promote_types(x.dtype, torch.float32)  # fp16/bf16 -> fp32, fp64 stays fp64
        xf = x.to(dt)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.to(dt) * y).to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, max_positions: int,
                  rope_scaling: dict | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``1 / theta^(2i/d)``, optionally YaRN-scaled, and the cos/sin factor.

    YaRN (only when the table is longer than the original context):
      ``inv_dim(b) = d * ln(orig / (b * 2*pi)) / (2 ln theta)``,
      ``low = max(floor(inv_dim(beta_fast)), 0)``, ``high = min(ceil(inv_dim(beta_slow)), d/2 - 1)``,
      ``ramp_i = clamp((i - low) / max(high - low, 0.001), 0, 1)``,
      ``inv_freq_i *= (1 - ramp_i) + ramp_i / factor``;
    cos and sin are multiplied by ``attention_factor`` (reference default 1.0, i.e. no mscale).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    attention_factor = 1.0
    if rope_scaling is not None:
        orig = rope_scaling.get("original_max_position_embeddings", 2048)
        factor = rope_scaling.get("factor", 16.0)
        beta_fast = rope_scaling.get("beta_fast", 32.0)
        beta_slow = rope_scaling.get("beta_slow", 1.0)
        attention_factor = float(rope_scaling.get("attention_factor", 1.0))
        if max_positions / orig > 1.0:
            def inv_dim(b: float) -> float:
                return head_dim * math.log(orig / (b * 2 * math.pi)) / (2 * math.log(theta))

            low = max(math.floor(inv_dim(beta_fast)), 0)
            high = min(math.ceil(inv_dim(beta_slow)), head_dim // 2 - 1)
            i = torch.arange(head_dim // 2, dtype=torch.float64)
            ramp = ((i - low) / max(high - low, 0.001)).clamp(0, 1)
            inv_freq = inv_freq * (1 - ramp + ramp / factor)
    return inv_freq.float(), attention_factor


def rope_tables(head_dim: int, theta: float, max_positions: int,
                rope_scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[max_positions, head_dim]`` in the half-split (rotate_half) layout."""
    inv_freq, attention_factor = rope_inv_freq(head_dim, theta, max_positions, rope_scaling)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for ``x [B, T, heads, d]`` and ``cos/sin [B, T, 1, d]``."""
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` — the Qwen3 MLP, no bias."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up as one product (minimind.infer.fuse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
