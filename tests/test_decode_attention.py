"""The decode-attention kernel (minimind.infer.decode_attention) and the engine's use of it.

Tolerances, and why: the kernel computes scores, softmax and the weighted sum in float32 and rounds
the result once to the inputs' dtype.  Against the float64 reference: float32 inputs within 1e-5
(float32 sums over a few hundred terms), bf16 inputs within one bf16 step of the outputs' size
(``2^-7`` relative to max|out|), which is also how far SDPA's bf16 result is from it.  Engine logits
with and without the kernel: within ``2^-6 max|logit|`` in bf16 (a bf16 step where the attention
rounds differently) and 1e-4 relative in float32; greedy tokens equal on the chain model, whose
argmax margins are several logits wide.

Skips where the kernel does not build (not x86 with AVX2, or no C++ compiler); the fallback test runs
everywhere.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minimind.infer import GenerationEngine, SamplingParams, decode_attention
from minimind.model import MiniMindForCausalLM
from minimind.model.attention import Attention
from tests.test_quant import rel_err
from tests.test_quant_onednn import _decode_logits

needs_kernel = pytest.mark.skipif(not decode_attention.available(),
                                  reason="the decode-attention kernel does not build here")


def _case(b: int, h: int, kv: int, s: int, d: int, dtype: torch.dtype, seed: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, H, 1, d]; k, v as the cache hands them out: the first ``s`` positions of a longer buffer
    (strided, not contiguous); mask [B, 1, 1, s] with some positions masked."""
    gen = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, b, kv, s + 7, d, generator=gen).to(dtype)
    q = torch.randn(b, h, 1, d, generator=gen).to(dtype)
    mask = torch.rand(b, 1, 1, s, generator=gen) > 0.25
    mask[..., -1] = True  # the new token always sees itself
    return q, cache[0, :, :, :s], cache[1, :, :, :s], mask


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("b", "h", "kv", "s", "d"), [(1, 8, 4, 300, 96), (3, 6, 2, 17, 13), (2, 4, 4, 1, 8),
                                                      (5, 8, 1, 64, 40)])
def test_kernel_equals_the_float64_attention(b: int, h: int, kv: int, s: int, d: int, dtype: torch.dtype) -> None:
    q, k, v, mask = _case(b, h, kv, s, d, dtype, seed=b * 100 + s)
    assert not k.is_contiguous()  # read in place, with the cache's strides
    got = decode_attention.attend(q, k, v, mask)
    assert got.dtype == dtype and got.shape == (b, h, 1, d)
    want = decode_attention.reference(q.view(b, h, d), k, v, mask.view(b, s)).view(b, h, 1, d)
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    else:
        bound = 2 ** -7 * float(want.abs().max())
        assert float((got.double() - want).abs().max()) <= bound
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=h != kv)
        assert float((sdpa.double() - want).abs().max()) <= bound  # the bound SDPA itself meets


@needs_kernel
def test_a_row_that_attends_to_nothing_gets_zeros_and_bad_input_is_refused() -> None:
    q, k, v, mask = _case(2, 4, 2, 9, 16, torch.float32, seed=1)
    mask[1] = False
    out = decode_attention.attend(q, k, v, mask)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and bool(out[0].abs().sum() > 0)
    with pytest.raises(RuntimeError, match="bool"):
        decode_attention.attend(q, k, v, mask.float())
    with pytest.raises(RuntimeError, match="multiple of KV"):
        decode_attention.attend(q[:, :3], k, v, mask)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        decode_attention.attend(q.bfloat16(), k, v, mask)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_decodes_through_the_kernel_with_the_same_logits_and_tokens(
        chain: tuple[MiniMindForCausalLM, torch.Tensor], dtype: torch.dtype) -> None:
    model, perm = chain
    plain = GenerationEngine(model, dtype=dtype, num_slots=6, onednn=False)
    fast = GenerationEngine(model, dtype=dtype, num_slots=6)
    layers = [m for m in fast.model.modules() if isinstance(m, Attention)]
    assert plain.attention_layers == 0 and fast.attention_layers == len(layers) > 0
    assert all(m.decode_attend is decode_attention.attend for m in layers)
    assert all(m.decode_attend is None for m in model.modules() if isinstance(m, Attention))  # caller's model
    for prompts in ([[7, int(perm[7])]], [[7], [3, 4], [50, 51, 52], [11], [60], [81, 2]]):
        got, want = _decode_logits(fast, prompts, 6), _decode_logits(plain, prompts, 6)
        if dtype == torch.float32:
            assert rel_err(got, want) < 1e-4
        else:
            assert float((got - want).abs().max()) <= 2 ** -6 * float(want.abs().max())
    params = SamplingParams(max_new_tokens=24, temperature=0.0, stop_token_ids=())
    batch = [[7], [3, int(perm[3])], [50], [11]]
    assert [r.token_ids for r in fast.generate(batch, params)] == [r.token_ids for r in plain.generate(batch, params)]


def test_without_the_kernel_layers_keep_torch_attention(monkeypatch: pytest.MonkeyPatch,
                                                        chain: tuple[MiniMindForCausalLM, torch.Tensor]) -> None:
    monkeypatch.setattr(decode_attention, "available", lambda: False)
    engine = GenerationEngine(chain[0], dtype=torch.float32)
    assert engine.attention_layers == 0
    assert all(m.decode_attend is None for m in engine.model.modules() if isinstance(m, Attention))
