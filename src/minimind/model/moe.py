"""Mixture-of-experts feed-forward (Qwen3-MoE / reference minimind-3 routing).

Routing: ``p = softmax(W_g x)``; keep the top-k experts; if ``norm_topk_prob`` renormalise the kept
weights to sum to 1.  Dispatch sorts the (token, slot) pairs by expert once and runs each expert on
one contiguous slice, instead of a boolean-mask pass over all tokens per expert.

Load-balancing loss (as the reference computes it), per layer and summed over layers by the model:
``aux = coef * E * sum_{slot, e} f_{slot,e} * P_e`` with ``f_{slot,e}`` the fraction of tokens whose
``slot``-th choice is expert e and ``P_e`` the mean router probability of e.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minimind.config import ModelConfig
from minimind.model.layers import SwiGLU


class MoEFeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.aux_coef = config.router_aux_loss_coef
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            SwiGLU(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(x), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1, sorted=False)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights.to(x.dtype)

        flat_expert = experts.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        token_of = order // self.top_k
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()
        chunks = x[token_of].split(counts)
        outs = [expert(chunk) for expert, chunk in zip(self.experts, chunks)]
        routed = torch.cat(outs) * weights.reshape(-1)[order].unsqueeze(-1)
        y = torch.zeros_like(x).index_add_(0, token_of, routed)

        aux = x.new_zeros((), dtype=torch.float32)
        if self.training:
            if self.aux_coef > 0:
                load = F.one_hot(experts, self.num_experts).float().mean(0)  # [k, E]
                aux = (load * probs.float().mean(0)).sum() * self.num_experts * self.aux_coef
            # An expert that saw no token still has to produce a gradient so that DDP's reducer
            # finds every parameter used; a zero-valued term does that without changing the output.
            idle = [e for e, c in enumerate(counts) if c == 0]
            if idle:
                y = y + 0.0 * sum(p.sum() for e in idle for p in self.experts[e].parameters())
        return y.reshape(shape), aux
