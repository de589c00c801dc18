"""Fused q/k/v and gate/up products in the engine's int8 copy (minimind.infer.fuse).

Int8 scales are per output row and every kernel computes each output row from that row's codes alone,
so a fused product gives the parts' outputs exactly: logits are compared with ``torch.equal``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from minimind.config import ModelConfig
from minimind.infer import GenerationEngine, avx2_int8
from minimind.infer.fuse import FusedInt8Linear, fuse_int8_projections_
from minimind.infer.quant import Int8Linear, quantize_int8_, use_avx2_kernel_, weight_bytes
from minimind.model import MiniMindForCausalLM
from tests.test_quant_onednn import _decode_logits

pytestmark = pytest.mark.usefixtures("one_thread")

KERNELS = ["default", pytest.param("avx2", marks=pytest.mark.skipif(
    not avx2_int8.available(), reason="the AVX2 int8 kernel does not build here"))]


def _model(moe: bool = False, seed: int = 0) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, intermediate_size=96, vocab_size=128, use_moe=moe, num_experts=3,
                      num_experts_per_tok=2, moe_intermediate_size=48)
    return MiniMindForCausalLM(cfg).eval()


def _int8(model: MiniMindForCausalLM, kernel: str) -> MiniMindForCausalLM:
    q = quantize_int8_(copy.deepcopy(model))
    if kernel == "avx2":
        assert use_avx2_kernel_(q) > 0
    return q


IDS = torch.tensor([[3, 9, 27, 81, 115, 7, 64]])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("moe", [False, True])
def test_fused_model_gives_the_parts_logits_and_keeps_its_state_dict(moe: bool, kernel: str) -> None:
    plain = _int8(_model(moe), kernel)
    fused = copy.deepcopy(plain)
    n_blocks = 2 * (1 + (3 if moe else 1))  # per layer: attention + one SwiGLU per expert (or the MLP)
    assert fuse_int8_projections_(fused) == n_blocks
    assert fuse_int8_projections_(fused) == 0  # already fused
    layer = fused.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, FusedInt8Linear)
    # the parts' codes are rows of the fused layer's, not copies; only the fused layer keeps kernel tiles
    assert layer.self_attn.k_proj.qweight.untyped_storage().data_ptr() == \
        layer.self_attn.qkv_proj.qweight.untyped_storage().data_ptr()
    assert layer.self_attn.k_proj._tiled is None
    assert (layer.self_attn.qkv_proj._tiled is not None) == (kernel == "avx2")
    with torch.no_grad():
        for t in (1, 3, IDS.shape[1]):  # one row (the decode GEMV), a few, a prefill
            assert torch.equal(fused(IDS[:, :t]).logits, plain(IDS[:, :t]).logits)
    a, b = plain.state_dict(), fused.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert weight_bytes(fused) == weight_bytes(plain)
    use_avx2_kernel_(fused)  # choosing kernels after the fusion packs the fused layers, never the parts
    assert layer.self_attn.k_proj._tiled is None and layer.self_attn.k_proj.fused_part


@pytest.mark.parametrize("kernel", KERNELS)
def test_loading_new_weights_into_a_fused_model_repacks_it(kernel: str) -> None:
    """Loading writes the parts' rows of the fused codes; the block's hook must re-tile the kernel copy
    (without it the AVX2 path keeps multiplying by the old tiles)."""
    fused = _int8(_model(), kernel)
    fuse_int8_projections_(fused)
    new = _model(seed=1)
    fused.load_state_dict(new.state_dict())
    want = _int8(new, kernel)
    with torch.no_grad():
        assert torch.equal(fused(IDS).logits, want(IDS).logits)
        assert torch.equal(fused(IDS[:, :1]).logits, want(IDS[:, :1]).logits)


@pytest.mark.parametrize("kernel", KERNELS)
def test_deepcopy_of_a_fused_model_owns_its_codes(kernel: str) -> None:
    fused = _int8(_model(), kernel)
    fuse_int8_projections_(fused)
    twin = copy.deepcopy(fused)
    attn = twin.model.layers[0].self_attn
    assert attn.q_proj.qweight.untyped_storage().data_ptr() == attn.qkv_proj.qweight.untyped_storage().data_ptr()
    assert attn.qkv_proj.qweight.data_ptr() != fused.model.layers[0].self_attn.qkv_proj.qweight.data_ptr()
    with torch.no_grad():
        before = fused(IDS).logits
        twin.load_state_dict(_model(seed=2).state_dict())  # the copy's hook, the copy's codes
        assert torch.equal(fused(IDS).logits, before)
        assert torch.equal(twin(IDS).logits, _int8(_model(seed=2), kernel)(IDS).logits)


def test_int8_engine_fuses_and_decodes_as_the_unfused_layers(chain: tuple[MiniMindForCausalLM, torch.Tensor]
                                                              ) -> None:
    model, perm = chain
    engine = GenerationEngine(model, quantize="int8")
    layers = model.config.num_hidden_layers
    assert engine.fused_layers == 2 * layers
    unfused = GenerationEngine(model, quantize="int8")
    for block in unfused.model.modules():  # undo the fusion: the blocks call their parts again
        for name in ("qkv_proj", "gate_up_proj"):
            if getattr(block, name, None) is not None:
                setattr(block, name, None)
                for part in block.children():
                    if type(part) is Int8Linear:
                        part.qweight, part.scale = part.qweight.clone(), part.scale.clone()
                        part.use_avx2_kernel(engine.avx2_layers > 0)
                        part.use_onednn(engine.onednn_layers > 0)
    prompts = [[7, int(perm[7])], [3, 4, 5]]
    assert torch.equal(_decode_logits(engine, prompts, 4), _decode_logits(unfused, prompts, 4))
    # a float engine has nothing to fuse
    assert GenerationEngine(model, dtype=torch.float32).fused_layers == 0
