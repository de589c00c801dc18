"""Compatibility with reference MiniMind checkpoints (shared fixtures) and with HF Qwen3 / Qwen3-MoE."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.test_model_numerics import random_model

from minimind.config import ModelConfig
from minimind.model import KVCache, MiniMindForCausalLM, cache_attention_mask, load_weights, read_state_dict

VARIANTS = ["dense_tiny", "moe_tiny", "moe_top2_tiny", "dense_tiny_yarn"]


@pytest.fixture(scope="module")
def compat_dir(shared_dir):
    path = shared_dir / "compat"
    if not (path / "manifest.json").is_file():
        pytest.skip(f"{path}/manifest.json absent")
    return path


@pytest.fixture(scope="module")
def manifest(compat_dir):
    return json.loads((compat_dir / "manifest.json").read_text(encoding="utf-8"))


def _reference(compat_dir, variant):
    folder = compat_dir / variant
    cfg = ModelConfig.from_dict(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    sd = read_state_dict(folder / "model.pth")
    logits = np.load(folder / "logits.npy")
    return cfg, sd, logits


def _rel_err(got: torch.Tensor, ref: np.ndarray) -> float:
    ref_t = torch.from_numpy(ref).double()
    return ((got.double() - ref_t).norm() / ref_t.norm()).item()


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_checkpoint_logits(compat_dir, manifest, variant):
    cfg, sd, ref = _reference(compat_dir, variant)
    entry = manifest["models"][variant]
    # the manifest's config keywords survive the reference -> ModelConfig translation
    for key, value in entry["config"].items():
        if key == "inference_rope_scaling":
            assert cfg.rope_scaling is not None and cfg.rope_scaling["factor"] == 16
        else:
            assert getattr(cfg, key) == value, key
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= sd.keys()  # reference layout
    model = MiniMindForCausalLM(cfg)
    load_weights(model, sd)
    assert model.num_parameters() == entry["n_params"]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = manifest["input_ids"]
    got = _logits(model, ids)
    assert got.shape == ref.shape == (len(ids), cfg.vocab_size)
    err = _rel_err(got, ref)
    assert err <= 1e-4, f"{variant}: relative error {err:.2e}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_greedy_continuation_with_kv_cache(compat_dir, manifest, variant):
    """Prefill + 24 cached single-token argmax steps reproduce the reference ``generate()`` tokens."""
    cfg, sd, _ = _reference(compat_dir, variant)
    model = MiniMindForCausalLM(cfg)
    load_weights(model, sd)
    model.eval()
    expected = manifest["models"][variant]["greedy_continuation"]
    ids = torch.tensor([manifest["input_ids"]])
    cache = KVCache(cfg, 1, ids.shape[1] + len(expected))
    tokens = []
    with torch.no_grad():
        logits = model(ids, kv_cache=cache, logits_to_keep=1).logits
        p = ids.shape[1]
        for _ in expected:
            tokens.append(int(logits[0, -1].argmax()))
            pos = torch.tensor([[p]])
            logits = model(torch.tensor([[tokens[-1]]]), position_ids=pos, kv_cache=cache,
                           attn_mask=cache_attention_mask(pos, p + 1)).logits
            p += 1
    assert tokens == expected


def test_yarn_variant_differs_from_plain(compat_dir):
    """The YaRN fixture really exercises YaRN: the same weights without scaling give other logits."""
    cfg, sd, ref = _reference(compat_dir, "dense_tiny_yarn")
    assert cfg.rope_scaling is not None and cfg.max_position_embeddings == 4096
    plain = MiniMindForCausalLM(ModelConfig.from_dict({**cfg.to_dict(), "rope_scaling": None,
                                                       "inference_rope_scaling": False}))
    load_weights(plain, sd)
    ids = json.loads((compat_dir / "manifest.json").read_text())["input_ids"]
    assert _rel_err(_logits(plain, ids), ref) > 1e-3


@pytest.mark.parametrize("variant", ["dense_tiny", "moe_top2_tiny"])
def test_fp16_state_dict_loads(compat_dir, manifest, variant):
    cfg, sd, ref = _reference(compat_dir, variant)
    half = {k: v.half() for k, v in sd.items()}
    model = MiniMindForCausalLM(cfg)
    load_weights(model, half)
    for name, p in model.state_dict().items():
        assert p.dtype == torch.float32
        assert torch.equal(p, half[name].float()), name
    err = _rel_err(_logits(model, manifest["input_ids"]), ref)
    assert err < 2e-2, err  # fp16 weight rounding only


def test_dense_weights_into_moe_config_fail_loudly(compat_dir):
    _, dense_sd, _ = _reference(compat_dir, "dense_tiny")
    moe_cfg, _, _ = _reference(compat_dir, "moe_tiny")
    model = MiniMindForCausalLM(moe_cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="missing") as exc:
        load_weights(model, dense_sd)
    msg = str(exc.value)
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in msg or "model.layers.0.mlp.gate.weight" in msg
    assert "model.layers.0.mlp.gate_proj.weight" in msg  # the dense keys are reported as unexpected
    # nothing was half-loaded
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_moe_weights_into_dense_config_fail_loudly(compat_dir):
    dense_cfg, _, _ = _reference(compat_dir, "dense_tiny")
    _, moe_sd, _ = _reference(compat_dir, "moe_tiny")
    with pytest.raises(ValueError, match="unexpected"):
        load_weights(MiniMindForCausalLM(dense_cfg), moe_sd)


# ------------------------------------------------------------------------------------------------
# HF transformers Qwen3 equivalence (same parameter names, same math)
# ------------------------------------------------------------------------------------------------


def _tiny_cfg(**over) -> ModelConfig:
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, vocab_size=97, max_position_embeddings=64, rms_norm_eps=1e-6,
                rope_theta=1e4)
    base.update(over)
    return ModelConfig(**base)


def _hf_common(cfg: ModelConfig) -> dict:
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
                rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=True,
                attn_implementation="eager")


def _transformers_major(transformers) -> int:
    return int(transformers.__version__.split(".")[0])


def _compare_with_hf(ours: MiniMindForCausalLM, hf, ids):
    hf = hf.float().eval()
    inv = getattr(hf.model.rotary_emb, "inv_freq", None)
    if inv is not None:  # rope_theta reached HF (v4 kwarg or v5 rope_parameters)
        exp = 1.0 / ours.config.rope_theta ** (torch.arange(0, ours.config.head_dim, 2).double() / ours.config.head_dim)
        assert torch.allclose(inv.double(), exp, rtol=1e-6)
    with torch.no_grad():
        a = ours(ids).logits
        b = hf(input_ids=ids).logits
    assert a.shape == b.shape
    diff = (a - b).abs().max().item()
    assert diff < 1e-4, f"logits differ from HF by {diff:.2e}"


def test_hf_qwen3_dense_equivalence():
    transformers = pytest.importorskip("transformers")
    cfg = _tiny_cfg(head_dim=12)  # a head_dim that is not hidden/heads: must still map 1:1
    ours = random_model(cfg)
    hf_cfg = transformers.Qwen3Config(**_hf_common(cfg), use_sliding_window=False, sliding_window=None)
    torch.manual_seed(1)
    hf = transformers.Qwen3ForCausalLM(hf_cfg)
    sd = ours.state_dict()
    assert set(sd) == set(hf.state_dict()), "parameter names differ from HF Qwen3"
    hf.load_state_dict(sd, strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(2))
    _compare_with_hf(ours, hf, ids)


def _to_hf_moe_state_dict(sd: dict, cfg: ModelConfig, fused: bool) -> dict:
    """Spec 1.13: identical names for transformers 4.x; fused experts for >= 5."""
    if not fused:
        return dict(sd)
    out = {k: v for k, v in sd.items() if ".mlp.experts." not in k}
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}.mlp.experts"
        gate = torch.stack([sd[f"{p}.{e}.gate_proj.weight"] for e in range(cfg.num_experts)])
        up = torch.stack([sd[f"{p}.{e}.up_proj.weight"] for e in range(cfg.num_experts)])
        out[f"{p}.gate_up_proj"] = torch.cat([gate, up], dim=1)
        out[f"{p}.down_proj"] = torch.stack([sd[f"{p}.{e}.down_proj.weight"] for e in range(cfg.num_experts)])
    return out


@pytest.mark.parametrize("top_k", [1, 2])
def test_hf_qwen3_moe_equivalence(top_k):
    transformers = pytest.importorskip("transformers")
    cfg = _tiny_cfg(use_moe=True, num_experts=4, num_experts_per_tok=top_k, moe_intermediate_size=24)
    ours = random_model(cfg)
    hf_cfg = transformers.Qwen3MoeConfig(**_hf_common(cfg), num_experts=cfg.num_experts,
                                         num_experts_per_tok=top_k,
                                         moe_intermediate_size=cfg.moe_intermediate_size,
                                         norm_topk_prob=cfg.norm_topk_prob)
    torch.manual_seed(1)
    hf = transformers.Qwen3MoeForCausalLM(hf_cfg)
    hf_keys = set(hf.state_dict())
    fused = any(k.endswith("mlp.experts.gate_up_proj") for k in hf_keys)
    assert fused == (_transformers_major(transformers) >= 5), "unexpected HF MoE expert layout"
    sd = _to_hf_moe_state_dict(ours.state_dict(), cfg, fused)
    assert set(sd) == hf_keys, sorted(set(sd) ^ hf_keys)[:6]
    hf.load_state_dict(sd, strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    _compare_with_hf(ours, hf, ids)
