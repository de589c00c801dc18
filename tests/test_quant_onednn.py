"""oneDNN-packed weights in the engine's CPU copy (minimind.infer.onednn, quant.use_onednn_).

Tolerances, and why:

* bf16 packed linears run oneDNN's bf16 GEMM with float32 accumulation, as ``F.linear`` on bf16 does;
  only the summation order may differ (measured: identical logits on this CPU).  Layers are asserted
  within ``rtol=1e-2, atol=2e-2`` of the plain path (a few bf16 steps of 2^-8 on values of size
  ~1-10).  Whole engines also differ in how they attend (the engine's decode-attention kernel rounds
  once to bf16, SDPA in its own order): one bf16 step on logits up to ~14 (measured 0.0625, rel. L2
  0.4%; both engines 0.64% from the float32 engine), so engine logits get the int8 bound below, and
  greedy tokens must be equal on a model whose argmax margins are several logits wide.
* int8: the packed GEMM returns the int32 sums of the same two-digit products as ``torch._int_mm``
  (unit scales), so a layer's output must be *identical* (``torch.equal``) wherever both paths take
  the two-digit GEMM (5-32 rows).  At 2-4 rows the plain path takes ``_weight_int8pack_mm`` (bf16
  activations) and the packed path the two-digit GEMM (activations to 1/64516 of the row maximum),
  so the engine's logits differ by bf16 rounding there: asserted ``max|diff| <= 2^-6 max|logit|``
  and relative L2 error below 1% (measured 0.031 on logits up to 13.6, i.e. 2^-8.8, and 0.3%).

The kernel tests skip on CPUs without the native instructions (the engine then keeps its plain
kernels, which the fallback test checks everywhere).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from minimind.infer import GenerationEngine, SamplingParams, onednn, quant
from minimind.infer.quant import GemvLinear, Int8Linear, use_onednn_
from minimind.model import MiniMindForCausalLM
from tests.test_generation import tiny_model
from tests.test_quant import rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL, ATOL = 1e-2, 2e-2
needs_bf16 = pytest.mark.skipif(not onednn.bf16_packing_supported(),
                                reason="no native oneDNN bf16 kernel on this CPU")
needs_int8 = pytest.mark.skipif(not onednn.int8_gemm_supported(),
                                reason="no native oneDNN int8 kernel on this CPU")


def test_probes_answer_and_a_missing_kernel_leaves_the_model_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(onednn.bf16_packing_supported(), bool) and isinstance(onednn.int8_gemm_supported(), bool)
    model = quant.quantize_int8_(tiny_model(seed=1).to(torch.bfloat16))
    monkeypatch.setattr(onednn, "bf16_packing_supported", lambda: False)
    monkeypatch.setattr(onednn, "int8_gemm_supported", lambda: False)
    assert use_onednn_(model) == 0
    assert not any(isinstance(m, onednn.PackedLinear) for m in model.modules())
    assert all(m._packed is None for m in model.modules() if isinstance(m, Int8Linear))
    engine = GenerationEngine(tiny_model(seed=1), dtype=torch.bfloat16)
    assert engine.onednn_layers == 0 and isinstance(engine.model.lm_head, GemvLinear)


@pytest.mark.skipif(not hasattr(torch, "_int_mm"), reason="nothing to time oneDNN against")
def test_a_slow_int8_fallback_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exact but ~100x slower: on an AMD EPYC with AVX-512 VNNI oneDNN ran this GEMM through a plain
    C++ fallback (16 ms per row of a 768 x 2432 product), and the engine took it for 2-32 row int8
    decode.  The probe times it against ``torch._int_mm`` on the same digits."""
    # a kernel at torch._int_mm's speed passes ...
    monkeypatch.setattr(onednn, "int8_gemm", lambda digits, packed: torch._int_mm(digits, packed.codes_t))
    monkeypatch.setattr(onednn, "pack_int8", lambda codes: type("P", (), {"codes_t": codes.t()})())
    assert onednn._int8_gemm_not_slow()

    def slow(digits: torch.Tensor, packed: object) -> torch.Tensor:  # ... one 20x slower does not
        for _ in range(20):
            out = torch._int_mm(digits, packed.codes_t)
        return out

    monkeypatch.setattr(onednn, "int8_gemm", slow)
    assert not onednn._int8_gemm_not_slow()


@needs_bf16
def test_packed_bf16_layers_match_the_plain_model_and_keep_weights_shared() -> None:
    model = tiny_model(seed=6).to(torch.bfloat16).eval()
    fast = copy.deepcopy(model)
    assert use_onednn_(fast) == 2 * 7 + 1  # every block projection and the LM head
    assert isinstance(fast.lm_head, onednn.PackedLinear)
    ids = torch.randint(0, 300, (3, 7))
    with torch.no_grad():
        for batch in (ids[:1, :1], ids[:, :1], ids):  # one row, three rows, a prefill
            got, want = fast(batch).logits.float(), model(batch).logits.float()
            assert torch.allclose(got, want, rtol=RTOL, atol=ATOL)
        layer = fast.model.layers[0].self_attn.q_proj
        assert layer.weight is dict(fast.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
        assert set(fast.state_dict()) == set(model.state_dict())
        # loading other weights repacks: the packed model follows them
        other = tiny_model(seed=7).to(torch.bfloat16).eval()
        fast.load_state_dict(other.state_dict())
        assert torch.allclose(fast(ids).logits.float(), other(ids).logits.float(), rtol=RTOL, atol=ATOL)
        assert rel_err(fast(ids).logits, model(ids).logits) > 0.1
        clone = copy.deepcopy(fast)  # the opaque packed tensor is rebuilt, not copied
        assert torch.equal(clone(ids).logits, fast(ids).logits)
    with pytest.raises(ValueError, match="bf16 CPU weights only"):
        onednn.PackedLinear(nn.Linear(4, 3, bias=False))


@needs_int8
@pytest.mark.parametrize("rows", [1, 2, 5, 32, 40])
def test_packed_int8_products_equal_the_int_mm_ones(rows: int) -> None:
    torch.manual_seed(3)
    lin = nn.Linear(96, 80, bias=False)
    plain = Int8Linear.from_linear(lin, out_dtype=torch.bfloat16)
    packed = copy.deepcopy(plain)
    assert packed.use_onednn() and packed._packed is not None
    x = torch.randn(rows, 96)
    x[:, 7] *= 40.0  # an outlier channel sets the row maximum
    xb = x.to(torch.bfloat16)
    ref = xb.float() @ plain.dequantized().t()
    if 1 < rows <= quant.INT_MM_MAX_ROWS:  # the packed two-digit GEMM, which the plain path uses at 5+
        want = quant._two_digit_int8_mm(xb, plain.qweight, plain.scale).to(torch.bfloat16)
    else:  # 1 row: _weight_int8pack_mm; prefill: dequantized bf16 GEMM, as without packing
        want = plain(xb)
    assert torch.equal(packed(xb), want)
    assert rel_err(packed(xb), ref) < 1e-2
    exact = quant._two_digit_int8_mm(x, packed.qweight, packed.scale, packed._packed)
    assert rel_err(exact, x @ plain.dequantized().t()) < 3e-4  # the two-digit bound of test_quant, on the packed GEMM
    assert torch.equal(exact, quant._two_digit_int8_mm(x, plain.qweight, plain.scale))
    packed.set_weight(lin.weight * 2)  # re-quantizing repacks
    assert torch.allclose(packed(x.to(torch.bfloat16)).float(), 2 * plain(x.to(torch.bfloat16)).float(),
                          rtol=RTOL, atol=ATOL)
    assert not packed.use_onednn(False) and packed._packed is None


def _decode_logits(engine: GenerationEngine, prompts: list[list[int]], steps: int) -> torch.Tensor:
    """Prefill then ``steps`` decode steps feeding fixed tokens; every step's logits stacked."""
    b = len(prompts)
    out = [engine.prefill(list(range(b)), prompts)]
    pos = [len(p) for p in prompts]
    for i in range(steps):
        out.append(engine.decode_step(b, [(5 * r + i) % 96 for r in range(b)], [p + i for p in pos]))
    return torch.stack(out)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_engine_logits_and_greedy_tokens_match_the_plain_kernels(
        chain: tuple[MiniMindForCausalLM, torch.Tensor], quantize: str | None) -> None:
    model, perm = chain
    if not (onednn.int8_gemm_supported() if quantize else onednn.bf16_packing_supported()):
        pytest.skip("no native oneDNN kernel for this mode on this CPU")
    plain = GenerationEngine(model, dtype=torch.bfloat16, num_slots=6, quantize=quantize, onednn=False)
    fast = GenerationEngine(model, dtype=torch.bfloat16, num_slots=6, quantize=quantize)
    assert plain.onednn_layers == 0 and fast.onednn_layers > 0
    for prompts in ([[7, int(perm[7])]], [[7], [3, 4], [50, 51, 52], [11], [60], [81, 2]]):  # 1 row, 6 rows
        got, want = _decode_logits(fast, prompts, 6), _decode_logits(plain, prompts, 6)
        # the engines also attend differently (our decode-attention kernel vs SDPA): a bf16 step apart
        assert float((got - want).abs().max()) <= 2 ** -6 * float(want.abs().max())
        assert rel_err(got, want) < 1e-2
    params = SamplingParams(max_new_tokens=32, temperature=0.0, stop_token_ids=())
    prompts = [[7], [3, int(perm[3])], [50], [11], [60], [81, 2]]
    for batch in (prompts[:1], prompts):
        a, b = fast.generate(batch, params), plain.generate(batch, params)
        assert [r.token_ids for r in a] == [r.token_ids for r in b]
        assert a[0].token_ids[:3] == [int(perm[batch[0][-1]]), int(perm[perm[batch[0][-1]]]),
                                      int(perm[perm[perm[batch[0][-1]]]])]  # really the chain


def test_an_engine_sharing_a_bf16_models_weights_sees_in_place_updates(
        chain: tuple[MiniMindForCausalLM, torch.Tensor]) -> None:
    """An engine in the model's own dtype decodes through a view of the model's parameters, so that
    an optimizer step (in place) is what the next rollout uses, with no refresh.  Packed (oneDNN) and
    fused (q/k/v, gate/up) weights are copies: they used to be made for these views too, and decode
    then kept the old weights (AVX-512 BF16 CPUs: packed; AVX2: fused)."""
    model = copy.deepcopy(chain[0]).to(torch.bfloat16)
    engine = GenerationEngine(model, num_slots=2)
    prompts = [[7, int(chain[1][7])], [3]]
    before = _decode_logits(engine, prompts, 3)
    with torch.no_grad():  # an "optimizer step" on the shared weights, a fused part's included
        model.model.layers[0].self_attn.q_proj.weight.mul_(0.5)
        model.model.layers[0].mlp.up_proj.weight.mul_(-1)
        model.lm_head.weight.mul_(-1)
    got = _decode_logits(engine, prompts, 3)
    want = _decode_logits(GenerationEngine(copy.deepcopy(model), num_slots=2), prompts, 3)
    assert rel_err(got, before) > 0.5
    assert torch.equal(got, want)
    assert engine.onednn_layers == 0 and engine.fused_layers == 0  # the plain kernels, on the shared weights


@needs_bf16
def test_fused_packed_projections_give_the_parts_logits_and_repack_on_refresh(
        chain: tuple[MiniMindForCausalLM, torch.Tensor]) -> None:
    """q/k/v and gate/up as one packed product each: the parts' weights are rows of the fused weight
    (so a refresh loads into it) and keep no packed copies; the block's hook re-packs after a load."""
    from minimind.infer.fuse import FusedPackedLinear

    model, perm = chain
    plain = GenerationEngine(model, dtype=torch.bfloat16, num_slots=3, fuse=False)
    fused = GenerationEngine(model, dtype=torch.bfloat16, num_slots=3)
    assert plain.fused_layers == 0 and fused.fused_layers == 2 * len(model.model.layers)
    attn = fused.model.model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, FusedPackedLinear) and not attn.k_proj.packed
    assert attn.k_proj.weight.data_ptr() == attn.qkv_proj.weight[attn.q_proj.out_features:].data_ptr()
    prompts = [[7, int(perm[7])], [3, 4], [50]]
    for batch in (prompts[:1], prompts):
        torch.testing.assert_close(_decode_logits(fused, batch, 4), _decode_logits(plain, batch, 4),
                                   rtol=RTOL, atol=ATOL)
    assert fused.model.state_dict().keys() == plain.model.state_dict().keys()
    twin = copy.deepcopy(fused.model)  # packed copies rebuilt, the parts still rows of the fused weight
    assert not twin.model.layers[0].self_attn.k_proj.packed
    before = _decode_logits(fused, prompts, 3)
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight.mul_(-1)
        model.model.layers[1].mlp.up_proj.weight.mul_(-1)
    try:
        plain.refresh_weights()
        fused.refresh_weights()
        got = _decode_logits(fused, prompts, 3)
        assert rel_err(got, before) > 0.05  # the fused products follow the new weights
        torch.testing.assert_close(got, _decode_logits(plain, prompts, 3), rtol=RTOL, atol=ATOL)
    finally:
        with torch.no_grad():
            model.model.layers[0].self_attn.v_proj.weight.mul_(-1)
            model.model.layers[1].mlp.up_proj.weight.mul_(-1)


@needs_bf16
def test_refresh_repacks_the_new_weights(chain: tuple[MiniMindForCausalLM, torch.Tensor]) -> None:
    trained = copy.deepcopy(chain[0])
    engine = GenerationEngine(trained, dtype=torch.bfloat16)
    assert isinstance(engine.model.lm_head, onednn.PackedLinear)
    with torch.no_grad():  # an "optimizer step" on the training model
        for p in trained.parameters():
            p.mul_(0.5)
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        stale = engine.model(ids).logits.float()
        engine.refresh_weights()
        fresh = engine.model(ids).logits.float()
        want = GenerationEngine(trained, dtype=torch.bfloat16, onednn=False).model(ids).logits.float()
    assert torch.allclose(fresh, want, rtol=RTOL, atol=ATOL)
    assert rel_err(stale, want) > 0.1


@needs_bf16
def test_compiled_decode_runs_the_packed_products_and_sees_a_refresh(
        chain: tuple[MiniMindForCausalLM, torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled decode of two or more rows calls the packed (and fused) bf16 products through the
    registered op, which reads the packed copy at run time: the graph's logits match the eager packed engine's (inductor
    fuses the norms and casts, a few bf16 steps), and a refresh re-packs into the running graph.
    Before the op, compiled engines ran inductor's unpacked products (0 packed calls)."""
    model, perm = chain
    model = copy.deepcopy(model)
    torch._dynamo.reset()
    calls = []
    real = onednn._packed_bf16_linear
    monkeypatch.setattr(onednn, "_packed_bf16_linear", lambda x, packed: calls.append(1) or real(x, packed))
    eager = GenerationEngine(model, dtype=torch.bfloat16, num_slots=2)
    compiled = GenerationEngine(model, dtype=torch.bfloat16, num_slots=2, compile=True)
    assert compiled.onednn_layers == eager.onednn_layers > 0 and compiled.fused_layers == eager.fused_layers > 0
    one = [[7, int(perm[7])]]  # one row: inductor's own kernel on the plain weight
    one_got, one_want = _decode_logits(compiled, one, 3), _decode_logits(eager, one, 3)
    assert float((one_got - one_want).abs().max()) <= 2 ** -6 * float(one_want.abs().max())
    prompts = [[7, int(perm[7])], [3]]
    want = _decode_logits(eager, prompts, 3)
    calls.clear()
    got = _decode_logits(compiled, prompts, 3)
    per_step = len(model.model.layers) * 4 + 1  # fused q/k/v, o, fused gate/up, down; the LM head
    assert len(calls) >= 4 * per_step  # prefill (eager) and three compiled steps of two rows
    assert float((got - want).abs().max()) <= 2 ** -6 * float(want.abs().max())
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)
        model.model.layers[0].self_attn.v_proj.weight.mul_(-1)
    eager.refresh_weights()
    compiled.refresh_weights()
    again, want = _decode_logits(compiled, prompts, 3), _decode_logits(eager, prompts, 3)
    assert rel_err(again, got) > 0.5
    assert float((again - want).abs().max()) <= 2 ** -6 * float(want.abs().max())


def test_frozen_compile_needs_an_own_copy_and_refuses_new_weights() -> None:
    model = tiny_model(seed=2)
    with pytest.raises(ValueError, match="own weight copy"):
        GenerationEngine(model, compile="frozen")
    with pytest.raises(ValueError, match="compile must be"):
        GenerationEngine(model, compile="max")
    engine = GenerationEngine(model, dtype=torch.bfloat16, compile="frozen")  # compiles lazily
    with pytest.raises(RuntimeError, match="build a new engine"):
        engine.refresh_weights()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_frozen_int8_decode_matches_eager(chain: tuple[MiniMindForCausalLM, torch.Tensor], dtype) -> None:
    """compile="frozen" (inductor freezing + max_autotune): its GEMV kernels round differently from
    ``_weight_int8pack_mm`` (float32 sums of bf16 activations, then bf16 outputs), so logits are held
    to the int8 bound above (max|diff| <= 2^-6 max|logit|) and greedy tokens must be equal.  float32
    is what an AVX2-only CPU runs (its whole one-graph step once failed to compile there)."""
    model, perm = chain
    torch._dynamo.reset()
    eager = GenerationEngine(model, dtype=dtype, num_slots=1, quantize="int8", onednn=False)
    frozen = GenerationEngine(model, dtype=dtype, num_slots=1, quantize="int8", compile="frozen")
    got, want = _decode_logits(frozen, [[7, int(perm[7])]], 4), _decode_logits(eager, [[7, int(perm[7])]], 4)
    assert float((got - want).abs().max()) <= 2 ** -6 * float(want.abs().max())
    params = SamplingParams(max_new_tokens=24, temperature=0.0, stop_token_ids=())
    a, b = frozen.generate([[11]], params), eager.generate([[11]], params)
    assert a[0].token_ids == b[0].token_ids
    assert a[0].token_ids[0] == int(perm[11])
