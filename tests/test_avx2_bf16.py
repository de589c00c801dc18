"""The AVX2 bf16 kernel (``minimind.infer.avx2_bf16``) and its use by the engine's bf16 weight copy.

The kernel must give the float64 product of its bf16 weights to float32 rounding for any shape (tails
of the 16-value loads and the 4-row blocks included), read the weight in place, and leave the engine's
bf16 logits and greedy tokens those of torch's own kernels.  It is used only on CPUs without native
bf16 (elsewhere oneDNN's packed bf16 kernels serve); skips where it does not build (not x86 with AVX2,
or no C++ compiler).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minimind.infer import GenerationEngine, SamplingParams, avx2_bf16
from minimind.infer.quant import GemvLinear, use_avx2_kernel_, weight_bytes
from minimind.model import MiniMindForCausalLM
from minimind.train.device import cpu_has_fast_bf16
from tests.test_quant_onednn import _decode_logits

needs_kernel = pytest.mark.skipif(not avx2_bf16.available(), reason="the AVX2 bf16 kernel does not build here")
used_here = pytest.mark.skipif(not avx2_bf16.available() or cpu_has_fast_bf16(),
                               reason="the engine uses the kernel only on CPUs without native bf16")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "out", "inp"), [(1, 64, 64), (2, 70, 768), (3, 13, 33), (8, 96, 2432),
                                                  (9, 5, 17), (100, 36, 48)])
def test_kernel_equals_the_float64_product(rows: int, out: int, inp: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(rows * 1000 + inp)
    weight = torch.randn(out, inp, generator=gen).bfloat16()
    x = torch.randn(rows, inp, generator=gen).to(dtype)
    want = x.double() @ weight.double().t()
    got = avx2_bf16.linear(x, weight)
    assert got.dtype == torch.float32 and got.shape == (rows, out)
    # float32 sums of inp products: a few float32 ulps of the terms' magnitude
    tol = 4 * inp ** 0.5 * 2 ** -24 * float((x.double().abs() @ weight.double().abs().t()).max())
    assert float((got.double() - want).abs().max()) <= tol


@needs_kernel
def test_kernel_reads_the_weight_in_place_and_splits_over_threads_exactly() -> None:
    weight = torch.randn(256, 96).bfloat16()
    x = torch.randn(3, 96)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = avx2_bf16.linear(x, weight)
        torch.set_num_threads(2)
        assert torch.equal(avx2_bf16.linear(x, weight), one)  # each output is one thread's sum
    finally:
        torch.set_num_threads(threads)
    weight.mul_(2)
    torch.testing.assert_close(avx2_bf16.linear(x, weight), 2 * one, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="bfloat16"):
        avx2_bf16.linear(x, weight.float())


@used_here
def test_gemv_linear_routes_bf16_rows_to_the_kernel_and_large_batches_to_float32() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=False).to(torch.bfloat16)
    plain, fast = GemvLinear(lin), GemvLinear(lin)
    assert fast.use_avx2_kernel() and not GemvLinear(nn.Linear(96, 40, bias=False)).use_avx2_kernel()
    for rows in (1, 8, avx2_bf16.MAX_ROWS, avx2_bf16.MAX_ROWS + 1):
        x = torch.randn(rows, 96).bfloat16()
        got = fast(x)
        assert got.dtype == torch.bfloat16
        if rows <= avx2_bf16.MAX_ROWS:
            assert torch.equal(got, avx2_bf16.linear(x, lin.weight).bfloat16())
        # both round one float32 sum to bf16: at most one bf16 step apart
        torch.testing.assert_close(got.float(), plain(x).float(), rtol=2 ** -7, atol=1e-6)


@used_here
def test_engine_bf16_logits_and_greedy_tokens_match_torch_kernels(
        chain: tuple[MiniMindForCausalLM, torch.Tensor]) -> None:
    model, perm = chain
    plain = GenerationEngine(model, dtype=torch.bfloat16, num_slots=3, onednn=False)
    fast = GenerationEngine(model, dtype=torch.bfloat16, num_slots=3)
    assert plain.avx2_layers == 0 and fast.avx2_layers > 0
    assert all(m._avx2 for m in fast.model.modules() if isinstance(m, GemvLinear))
    for prompts in ([[7, int(perm[7])]], [[7], [3, 4], [50, 51, 52]]):  # one row, three rows
        got, want = _decode_logits(fast, prompts, 6), _decode_logits(plain, prompts, 6)
        assert float((got - want).abs().max()) <= 2 ** -5 * float(want.abs().max())
    params = SamplingParams(max_new_tokens=32, temperature=0.0, stop_token_ids=())
    for batch in ([[7]], [[3, int(perm[3])], [50]]):
        a, b = fast.generate(batch, params), plain.generate(batch, params)
        assert [r.token_ids for r in a] == [r.token_ids for r in b]
        assert a[0].token_ids[:2] == [int(perm[batch[0][-1]]), int(perm[perm[batch[0][-1]]])]
    fast.source = model  # refresh_weights: the kernel reads the engine copy's weights in place
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)
    try:
        fast.refresh_weights()
        assert fast.generate([[7]], params)[0].token_ids[0] != int(perm[7])
    finally:
        with torch.no_grad():
            model.lm_head.weight.mul_(-1)


def test_without_the_kernel_the_bf16_copy_is_left_alone(monkeypatch: pytest.MonkeyPatch,
                                                        chain: tuple[MiniMindForCausalLM, torch.Tensor]) -> None:
    monkeypatch.setattr(avx2_bf16, "available", lambda: False)
    engine = GenerationEngine(chain[0], dtype=torch.bfloat16)
    assert engine.avx2_layers == 0 and use_avx2_kernel_(engine.model) == 0


@used_here
def test_fused_bf16_projections_give_the_parts_logits_and_load_in_place(
        chain: tuple[MiniMindForCausalLM, torch.Tensor]) -> None:
    """q/k/v and gate/up as one kernel call each: every output is the same float32 sum, so the logits
    equal the unfused engine's exactly; the parts' weights are views of the fused one, so a refresh
    loads into it; the state dict keeps the parts' keys."""
    model, perm = chain
    plain = GenerationEngine(model, dtype=torch.bfloat16, num_slots=3, fuse=False)
    fused = GenerationEngine(model, dtype=torch.bfloat16, num_slots=3)
    blocks = len(model.model.layers)
    assert plain.fused_layers == 0 and fused.fused_layers == 2 * blocks
    attn = fused.model.model.layers[0].self_attn
    assert attn.k_proj.weight.data_ptr() == attn.qkv_proj.weight[attn.q_proj.out_features:].data_ptr()
    for prompts in ([[7, int(perm[7])]], [[7], [3, 4], [50, 51, 52]]):
        assert torch.equal(_decode_logits(fused, prompts, 4), _decode_logits(plain, prompts, 4))
    assert fused.model.state_dict().keys() == plain.model.state_dict().keys()
    assert weight_bytes(fused.model) == weight_bytes(plain.model)  # the parts' rows are not counted twice
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight.mul_(-1)
    try:
        plain.refresh_weights()
        fused.refresh_weights()
        assert torch.equal(_decode_logits(fused, [[7]], 2), _decode_logits(plain, [[7]], 2))
    finally:
        with torch.no_grad():
            model.model.layers[0].self_attn.v_proj.weight.mul_(-1)
