"""PPO's critic: ``V(s_t)`` for every position of a rollout row.

Two layouts (``--critic``):

* ``separate`` (default, as the reference trains it): a model of its own -- a copy of the policy's
  decoder trunk, initialised from the policy's weights, with a scalar value head. The value loss
  trains only the critic; the language model's gradient is the policy objective's alone.
* ``shared``: a value head on the policy's own final hidden states. One forward serves actor and
  critic and no second model is held, but the value loss (weighted by ``--vf_coef``) also
  shapes the policy's trunk.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

__all__ = ["Critic", "ValueHead"]


class ValueHead(nn.Module):
    """``V(s_t) = w . h_t + b`` on final (normed) hidden states; zero-initialised (``V = 0`` at first)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.proj(hidden.float()).squeeze(-1)


class Critic(nn.Module):
    """A separate critic: the policy's decoder trunk (copied, so it starts from the policy's features)
    and a :class:`ValueHead`; the language-model head is not copied (a critic needs no vocabulary)."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        trunk = getattr(policy, "model", None)
        if trunk is None:
            raise TypeError("the separate critic copies the policy's decoder trunk (policy.model)")
        self.trunk = copy.deepcopy(trunk)
        self.trunk.requires_grad_(True)
        self.head = ValueHead(policy.config.hidden_size)

    def forward(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        """Values ``[B, T]`` (fp32) of every position of right-padded rows (plain causal attention)."""
        hidden, _ = self.trunk(input_ids, position_ids, None, None)
        return self.head(hidden)


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Make every rank's copy of ``module`` rank ``src``'s (ranks seed their own initialisation)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)
