"""Packed-row attention: document-causal (FlexAttention block mask or dense mask), plain causal,
and grouped-query attention without K/V copies.

Each model-level test runs a dense and an MoE model.  FlexAttention has no CPU backward in torch 2.13,
so its gradient test runs on CUDA only; its forward is checked on the CPU with the eager (reference)
FlexAttention implementation, which computes the same thing as the compiled kernel.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minimind.config import ModelConfig
from minimind.data.batch import Batch
from minimind.model import KVCache, MiniMindForCausalLM, cache_attention_mask, masks
from minimind.model import attention as attention_mod
from minimind.model.attention import _folded_gqa_sdpa, attend
from minimind.train.stages.base import next_token_loss

pytestmark = pytest.mark.usefixtures("one_thread")

DOC_LENGTHS = (7, 12, 5, 8)  # one packed row of 32 tokens, four documents


def tiny_model(use_moe: bool, seed: int = 0) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                      vocab_size=97, use_moe=use_moe, num_experts=4, num_experts_per_tok=2,
                      max_position_embeddings=128)
    return MiniMindForCausalLM(cfg)


def packed_row(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, position_ids, doc_ids)`` of ``batch`` rows packing DOC_LENGTHS (rotated per row)."""
    g = torch.Generator().manual_seed(1)
    ids, pos, doc = [], [], []
    for b in range(batch):
        lengths = DOC_LENGTHS[b % len(DOC_LENGTHS):] + DOC_LENGTHS[:b % len(DOC_LENGTHS)]
        ids.append(torch.randint(0, 97, (sum(lengths),), generator=g))
        pos.append(torch.cat([torch.arange(n) for n in lengths]))
        doc.append(torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)]))
    return torch.stack(ids), torch.stack(pos), torch.stack(doc)


def param_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_moe", [False, True])
def test_document_causal_rows_equal_documents_run_alone(use_moe):
    """A packed row with doc_ids gives each document the logits (and the parameter gradients) it gets
    when run alone from position 0: nothing leaks across documents, in forward or backward."""
    model = tiny_model(use_moe)
    ids, pos, doc = packed_row(batch=1)
    weights = torch.randn(1, ids.shape[1], 97, generator=torch.Generator().manual_seed(2))
    packed = model(ids, position_ids=pos, doc_ids=doc).logits
    (packed * weights).sum().backward()
    packed_grads = param_grads(model)
    model.zero_grad()
    start, alone = 0, []
    for n in DOC_LENGTHS:
        logits = model(ids[:, start:start + n]).logits
        (logits * weights[:, start:start + n]).sum().backward()
        alone.append(logits)
        start += n
    torch.testing.assert_close(packed, torch.cat(alone, dim=1), atol=2e-5, rtol=1e-4)
    for name, g in param_grads(model).items():
        torch.testing.assert_close(packed_grads[name], g, atol=5e-5, rtol=1e-4, msg=name)


@pytest.fixture
def eager_flex(monkeypatch):
    """Route document masks through FlexAttention block masks on the CPU, with the eager reference
    implementation of flex_attention (compiling it on the CPU takes ~20 s)."""
    if masks.create_block_mask is None:
        pytest.skip("this torch has no FlexAttention")
    from torch.nn.attention.flex_attention import flex_attention
    monkeypatch.setattr(masks, "flex_available", lambda device: True)
    monkeypatch.setattr(attention_mod, "compiled_flex_attention", lambda: flex_attention)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("use_moe", [False, True])
def test_flex_block_mask_forward_equals_dense_mask(eager_flex, use_moe):
    model = tiny_model(use_moe).eval()
    ids, pos, doc = packed_row()
    block = masks.document_attention_mask(doc)
    assert isinstance(block, masks.BlockMask)
    with torch.no_grad():
        flex = model(ids, position_ids=pos, attn_mask=block).logits
        dense = model(ids, position_ids=pos, attn_mask=masks.document_causal_mask(doc)).logits
    torch.testing.assert_close(flex, dense, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no CPU backward (torch 2.13)")
@pytest.mark.parametrize("use_moe", [False, True])
def test_flex_block_mask_loss_and_gradient_equal_dense_mask_cuda(use_moe):
    """On CUDA the training path: compiled FlexAttention vs SDPA with the dense mask."""
    model = tiny_model(use_moe).cuda()
    ids, pos, doc = (t.cuda() for t in packed_row())
    results = []
    for mask in (masks.document_block_mask(doc), masks.document_causal_mask(doc)):
        model.zero_grad()
        logits = model(ids, position_ids=pos, attn_mask=mask).logits
        F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
        results.append((logits.detach(), param_grads(model)))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-4, rtol=1e-3)
    for name, g in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], g, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="block masks are built where FlexAttention trains")
@pytest.mark.parametrize("use_moe", [False, True])
def test_document_loss_step_compiles_fullgraph_with_its_block_mask_cuda(use_moe):
    """The compiled loss step builds its block mask inside the graph: ``create_block_mask`` must not
    hit code dynamo refuses (its ``_compile=True`` flag warns since torch 2.11, a graph break that
    ``fullgraph=True`` turns into an error), and the compiled loss equals the eager one."""
    model = tiny_model(use_moe).cuda()
    ids, pos, doc = (t.cuda() for t in packed_row())
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    batch = Batch(ids, targets, pos, doc, num_target_tokens=int((targets != -100).sum()))

    def step(m: torch.nn.Module, b: Batch) -> torch.Tensor:
        return next_token_loss(m, b).loss

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(model, batch), step(model, batch), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("use_moe", [False, True])
def test_causal_mode_is_sdpa_causal_over_the_row_with_continuing_positions(use_moe):
    """``--attention causal``: the loss of a packed batch equals cross-entropy of the model run with
    an explicit lower-triangular mask and positions 0..T-1 (documents see each other)."""
    model = tiny_model(use_moe)
    ids, pos, doc = packed_row()
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    batch = Batch(ids, targets, pos, doc, num_target_tokens=int((targets != -100).sum()))
    causal = batch.plain_causal()
    assert causal.doc_ids is None
    assert torch.equal(causal.position_ids, torch.arange(ids.shape[1]).expand_as(ids))
    loss = next_token_loss(model, causal).loss
    t = ids.shape[1]
    tril = torch.ones(t, t, dtype=torch.bool).tril().expand(ids.shape[0], 1, t, t)
    logits = model(ids, position_ids=causal.position_ids, attn_mask=tril).logits
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    expected = expected + model(ids).aux_loss
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    doc_loss = next_token_loss(model, batch).loss
    # the modes differ: the document mask matters
    assert abs(float(doc_loss.detach()) - float(loss.detach())) > 1e-4


def _forbid_kv_copies(monkeypatch):
    """Fail on the ops that would copy K/V per query head."""
    def refuse(*args, **kwargs):
        raise AssertionError("K/V heads were copied (repeat / repeat_interleave)")
    monkeypatch.setattr(torch, "repeat_interleave", refuse)
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", refuse)
    monkeypatch.setattr(torch.Tensor, "repeat", refuse)


@pytest.mark.parametrize("use_moe", [False, True])
def test_no_kv_copies_in_training_prefill_and_decode(monkeypatch, use_moe):
    model = tiny_model(use_moe)
    ids, pos, doc = packed_row()
    _forbid_kv_copies(monkeypatch)
    model(ids, position_ids=pos, doc_ids=doc).logits.sum().backward()  # document-causal
    model(ids).logits.sum().backward()  # plain causal
    model.eval()
    cache = KVCache(model.config, batch_size=2, max_len=40)
    with torch.no_grad():
        prompt = torch.arange(10).expand(2, 10)
        model(ids[:, :10], position_ids=prompt, attn_mask=cache_attention_mask(prompt, 40), kv_cache=cache)
        step = torch.full((2, 1), 10)
        model(ids[:, 10:11], position_ids=step, attn_mask=cache_attention_mask(step, 40), kv_cache=cache)


def test_folded_gqa_sdpa_equals_repeated_heads_forward_and_gradient(monkeypatch):
    """The CUDA masked path (query heads folded into the query length) against SDPA over K/V
    repeated per query head, the formulation it replaces."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 8, 9, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 13, 16, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 13, 16, generator=g, requires_grad=True)
    mask = torch.rand(2, 1, 9, 13, generator=g) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                              attn_mask=mask)
    grads_expected = torch.autograd.grad(expected.square().sum(), (q, k, v))
    _forbid_kv_copies(monkeypatch)
    got = _folded_gqa_sdpa(q, k, v, mask, 0.0)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, grads_expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attend(q, k, v, mask), expected, atol=1e-5, rtol=1e-5)  # CPU path


def test_folded_gqa_sdpa_takes_outputs_in_any_stride_order(monkeypatch):
    """CUDA's attention kernels return ``[B, KV, r*T, d]`` laid out as ``[B, r*T, KV, d]``: the
    folded path must regroup that without assuming a contiguous output (``view`` raised there)."""
    sdpa = F.scaled_dot_product_attention

    def strided_sdpa(*args, **kwargs):
        return sdpa(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2)

    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(2, 8, 5, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g), \
        torch.randn(2, 2, 7, 16, generator=g)
    mask = torch.rand(2, 1, 5, 7, generator=g) > 0.3
    mask[..., 0] = True
    expected = _folded_gqa_sdpa(q, k, v, mask, 0.0)
    monkeypatch.setattr(F, "scaled_dot_product_attention", strided_sdpa)
    torch.testing.assert_close(_folded_gqa_sdpa(q, k, v, mask, 0.0), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("dtype", "bf16_native"), [(torch.float32, True), (torch.bfloat16, True),
                                                    (torch.bfloat16, False)])
def test_cpu_decode_attention_on_strided_cache_slices_equals_naive(monkeypatch, dtype, bf16_native):
    """One query per row over the first ``n`` positions of a longer cache (the engine's strided K/V
    views), grouped heads, a padding mask: equals float64 softmax attention to the dtype's precision,
    without copying K/V per query head.  (fp32 runs the grouped matmuls; bf16 SDPA where the CPU has
    native bf16, else the grouped matmuls in float32.)"""
    monkeypatch.setattr(attention_mod, "_cpu_bf16_native", lambda: bf16_native)
    g = torch.Generator().manual_seed(5)
    b, h, kv, d, n, cap = 3, 8, 2, 16, 21, 40
    cache_k = torch.randn(b, kv, cap, d, generator=g).to(dtype)
    cache_v = torch.randn(b, kv, cap, d, generator=g).to(dtype)
    k, v = cache_k[:, :, :n], cache_v[:, :, :n]
    q = torch.randn(b, h, 1, d, generator=g).to(dtype)
    mask = torch.ones(b, 1, 1, n, dtype=torch.bool)
    mask[1, ..., :7] = False  # a left-padded row
    kk, vv = (t.double().repeat_interleave(h // kv, 1) for t in (k, v))
    scores = (q.double() @ kk.transpose(-1, -2)) * d ** -0.5
    expected = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ vv
    _forbid_kv_copies(monkeypatch)
    got = attend(q, k, v, mask)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)
