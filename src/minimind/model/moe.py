"""Mixture-of-experts feed-forward (Qwen3-MoE / reference minimind-3 routing).

Routing: ``p = softmax(W_g x)``; keep the top-k experts; if ``norm_topk_prob`` renormalise the kept
weights to sum to 1.  ``y = sum_{e in topk(x)} w_e * SwiGLU_e(x)``.

Dispatch sorts the (token, slot) pairs by expert once, so each expert's tokens are one contiguous
slice, and then runs the experts in one of three ways, all computing the same ``y``:

* grouped (training, and anything compiled; experts not wrapped by LoRA): one ``torch._grouped_mm``
  per projection over all experts' slices, the slice ends given as a device tensor -- no host read,
  no graph break, and every expert's weights take part in the graph (an expert that got no token
  still gets a zero gradient, as DDP's reducer requires);
* dense (compiled where ``_grouped_mm`` cannot run: an fp32 compile on the CPU, GPUs before sm90):
  every expert over every token, weighted by its (mostly zero) routing weight -- static shapes,
  ``num_experts / top_k`` times the FLOPs;
* loop (eager inference, and eager training where ``_grouped_mm`` cannot run): the per-expert
  counts are read to the host once and each expert runs on its own slice, so a decode step reads
  only the weights of the experts it uses.

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


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls of ``x`` run in: the autocast dtype when autocast is on (``_grouped_mm`` is
    not covered by autocast, so the cast is made by hand), else ``x``'s own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_mm_usable(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs here: CPU eager in any float dtype, CPU compiled in bf16
    (its shape function accepts bf16 only), CUDA in bf16 on sm90+."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return dtype == torch.bfloat16 or not torch.compiler.is_compiling()
    if x.device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return False


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

        dtype = compute_dtype(x)
        compiling = torch.compiler.is_compiling()
        grouped = grouped_mm_usable(x, dtype) and self._plain_linear_experts()
        if grouped and (torch.is_grad_enabled() or compiling):
            y = self._dispatch_grouped(x, weights, experts, dtype)
        elif compiling:
            y = self._dispatch_dense(x, weights, experts)
        else:
            y = self._dispatch_loop(x, weights, experts)

        aux = x.new_zeros((), dtype=torch.float32)
        if self.training and self.aux_coef > 0:
            chosen = experts.unsqueeze(-1) == torch.arange(self.num_experts, device=x.device)
            load = chosen.float().mean(0)  # [k, E]: fraction of tokens whose slot-th choice is e
            aux = (load * probs.float().mean(0)).sum() * self.num_experts * self.aux_coef
        return y.reshape(shape), aux

    def _plain_linear_experts(self) -> bool:
        """The grouped path multiplies the experts' weight matrices directly: only right when each
        projection is a plain ``nn.Linear`` (a LoRA-wrapped one must run its own forward)."""
        return all(type(getattr(e, name)) is nn.Linear for e in self.experts
                   for name in ("gate_proj", "up_proj", "down_proj"))

    def _sort_by_expert(self, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(order, token_of, counts)``: the (token, slot) pairs sorted by expert, the token of each
        sorted pair, and the number of pairs per expert (a device tensor)."""
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=flat.device)
        counts = counts.index_add(0, flat, torch.ones_like(flat, dtype=torch.int32))
        return order, order // self.top_k, counts

    def _dispatch_grouped(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                          dtype: torch.dtype) -> torch.Tensor:
        order, token_of, counts = self._sort_by_expert(experts)
        ends = counts.cumsum(0, dtype=torch.int32)  # slice e is rows [ends[e-1], ends[e])

        def grouped(inp: torch.Tensor, name: str) -> torch.Tensor:
            # [E, out, in] -> [E, in, out]: _grouped_mm multiplies each slice by its expert's matrix
            w = torch.stack([getattr(e, name).weight for e in self.experts]).to(dtype)
            return torch._grouped_mm(inp, w.transpose(1, 2), offs=ends)

        xs = x[token_of].to(dtype)
        hidden = F.silu(grouped(xs, "gate_proj")) * grouped(xs, "up_proj")
        routed = grouped(hidden, "down_proj") * weights.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, token_of, routed.to(x.dtype))

    def _dispatch_dense(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        combine = torch.zeros(x.shape[0], self.num_experts, dtype=x.dtype, device=x.device)
        combine = combine.scatter(1, experts, weights)  # [N, E]: the routing weight, 0 if not chosen
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            y = y + expert(x).to(x.dtype) * combine[:, e:e + 1]
        return y

    def _dispatch_loop(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        order, token_of, counts = self._sort_by_expert(experts)
        sizes = counts.tolist()  # the one host read: slice lengths
        chunks = x[token_of].split(sizes)
        outs = [expert(chunk) for expert, chunk in zip(self.experts, chunks) if chunk.shape[0]]
        routed = torch.cat(outs) * weights.reshape(-1)[order].unsqueeze(-1)
        y = torch.zeros_like(x).index_add_(0, token_of, routed.to(x.dtype))
        idle = [e for e, n in enumerate(sizes) if n == 0]
        if idle and torch.is_grad_enabled():
            # DDP's reducer must find a gradient for every parameter: a zero-valued term gives the
            # experts that saw no token one without changing the output.
            y = y + 0.0 * sum(p.sum() for e in idle for p in self.experts[e].parameters())
        return y
