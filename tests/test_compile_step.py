"""The training step has no host syncs: the loss step (forward, loss and backward) compiles with
``fullgraph=True`` (a graph break or a ``.tolist()`` / ``.item()`` would raise), for a dense and an
MoE model, and gives the eager loss and gradients.  Plus the three MoE dispatchers agree.
"""

from __future__ import annotations

import pytest
import torch

from minimind.config import ModelConfig
from minimind.data.batch import Batch
from minimind.model import MiniMindForCausalLM
from minimind.model.moe import MoEFeedForward
from minimind.train.stages.base import next_token_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(use_moe: bool) -> MiniMindForCausalLM:
    torch.manual_seed(0)
    return MiniMindForCausalLM(ModelConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=97,
        use_moe=use_moe, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64))


def packed_batch(attention: str) -> Batch:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 24), generator=g)
    doc = torch.tensor([[0] * 10 + [1] * 14, [0] * 5 + [1] * 9 + [2] * 10], dtype=torch.int32)
    pos = torch.cat([torch.arange(10), torch.arange(14), torch.arange(5), torch.arange(9),
                     torch.arange(10)]).view(2, 24)
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    targets[0, 9] = -100  # no target across a document boundary
    batch = Batch(ids, targets, pos, doc, num_target_tokens=int((targets != -100).sum()))
    return batch.plain_causal() if attention == "causal" else batch


def loss_and_grads(step, model: MiniMindForCausalLM, batch: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = step(model, batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def check_fullgraph_step(use_moe: bool, attention: str, backend: str) -> None:
    torch._dynamo.reset()
    model = tiny(use_moe)
    batch = packed_batch(attention)

    def step(m: torch.nn.Module, b: Batch) -> torch.Tensor:
        return next_token_loss(m, b).loss

    compiled = torch.compile(step, fullgraph=True, dynamic=False, backend=backend)
    loss_c, grads_c = loss_and_grads(compiled, model, batch)
    loss_e, grads_e = loss_and_grads(step, model, batch)
    torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attention", ["doc", "causal"])
@pytest.mark.parametrize("use_moe", [False, True])
def test_loss_step_traces_as_one_graph_forward_and_backward(use_moe, attention):
    """Dynamo + AOTAutograd (``aot_eager``: the forward and the backward graph, without inductor's
    code generation, which takes minutes on a shared 2-core box): ``fullgraph=True`` raises on any
    graph break or host read."""
    check_fullgraph_step(use_moe, attention, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["doc", "causal"])
@pytest.mark.parametrize("use_moe", [False, True])
def test_loss_step_compiles_fullgraph_with_inductor(use_moe, attention):
    check_fullgraph_step(use_moe, attention, "inductor")


@pytest.mark.slow
def test_moe_bf16_loss_step_compiles_fullgraph_with_grouped_mm():
    """bf16 autocast on the CPU: the compiled MoE step runs ``torch._grouped_mm`` (no fallback)."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("no torch._grouped_mm in this build")
    torch._dynamo.reset()
    model = tiny(True)
    batch = packed_batch("doc")

    def step(m: torch.nn.Module, b: Batch) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return next_token_loss(m, b).loss

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    loss_c, grads_c = loss_and_grads(compiled, model, batch)
    loss_e, grads_e = loss_and_grads(step, model, batch)
    torch.testing.assert_close(loss_c, loss_e, atol=2e-2, rtol=2e-2)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, atol=2e-2, rtol=5e-2)


def test_moe_dispatchers_agree_forward_and_gradient():
    """grouped (_grouped_mm), dense (every expert, zero weights) and loop (host counts) compute the
    same output and parameter gradients, also when an expert gets no token."""
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, use_moe=True,
                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)
    moe = MoEFeedForward(cfg)
    x = torch.randn(3, 5, 32)
    with torch.no_grad():  # make expert 3 unpopular: its gate row points away from every token
        moe.gate.weight[3] = -10 * x.reshape(-1, 32).mean(0)
    probs = torch.softmax(moe.gate(x.reshape(-1, 32)), -1)
    weights, experts = torch.topk(probs, 2, dim=-1, sorted=False)
    weights = weights / weights.sum(-1, keepdim=True)
    assert not (experts == 3).any()
    results = []
    kinds = ["dense", "loop"] + (["grouped"] if hasattr(torch, "_grouped_mm") else [])
    for kind in kinds:
        moe.zero_grad(set_to_none=True)
        xs = x.reshape(-1, 32)
        if kind == "grouped":
            y = moe._dispatch_grouped(xs, weights.detach(), experts, torch.float32)
        else:
            y = getattr(moe, f"_dispatch_{kind}")(xs, weights.detach(), experts)
        (y * torch.linspace(-1, 1, 32)).sum().backward()
        results.append((y.detach(), {n: p.grad for n, p in moe.named_parameters() if p.grad is not None}))
    for y, grads in results[1:]:
        torch.testing.assert_close(y, results[0][0], atol=1e-5, rtol=1e-5)
        for name, g in grads.items():
            if name in results[0][1]:
                torch.testing.assert_close(g, results[0][1][name], atol=1e-5, rtol=1e-5, msg=name)
    if "grouped" in kinds:  # the idle expert is in the graph: DDP's reducer finds its gradient
        assert torch.count_nonzero(results[-1][1]["experts.3.down_proj.weight"]) == 0
