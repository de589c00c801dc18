"""Model math against a naive float64 re-implementation of the reference model math.

The reference below is deliberately written the slow, obvious way (explicit softmax with -inf masking,
explicit repetition of KV heads, rotate_half RoPE from the formula, per-token MoE loops) and shares no
code with :mod:`minimind.model`; it only reads the model's ``state_dict``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minimind.config import ModelConfig, preset
from minimind.model import KVCache, MiniMindForCausalLM, cache_attention_mask
from minimind.model.layers import RMSNorm, rope_inv_freq, rope_tables

# ------------------------------------------------------------------------------------------------
# Naive reference (float64)
# ------------------------------------------------------------------------------------------------


def naive_inv_freq(head_dim: int, theta: float, max_pos: int, scaling: dict | None):
    """Spec 1.5 in numpy float64: inverse frequencies (YaRN-scaled when applicable) and the factor."""
    i = np.arange(head_dim // 2, dtype=np.float64)
    inv = 1.0 / theta ** (2.0 * i / head_dim)
    factor_cs = 1.0
    if scaling is not None:
        factor_cs = float(scaling.get("attention_factor", 1.0))
        orig = scaling["original_max_position_embeddings"]
        if max_pos / orig > 1:
            def inv_dim(b):
                return head_dim * math.log(orig / (b * 2 * math.pi)) / (2 * math.log(theta))
            low = max(math.floor(inv_dim(scaling["beta_fast"])), 0)
            high = min(math.ceil(inv_dim(scaling["beta_slow"])), head_dim // 2 - 1)
            ramp = np.clip((i - low) / max(high - low, 0.001), 0.0, 1.0)
            inv = inv * (1 - ramp + ramp / scaling["factor"])
    return inv, factor_cs


def naive_rope_table(cfg: ModelConfig):
    inv, fac = naive_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings, cfg.rope_scaling)
    ang = np.arange(cfg.max_position_embeddings, dtype=np.float64)[:, None] * inv[None, :]
    ang = np.concatenate([ang, ang], axis=1)
    return torch.from_numpy(np.cos(ang) * fac), torch.from_numpy(np.sin(ang) * fac)


def naive_rmsnorm(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def naive_rotate_half(x):
    d = x.shape[-1] // 2
    return torch.cat([-x[..., d:], x[..., :d]], dim=-1)


def naive_swiglu(x, wg, wu, wd):
    g = x @ wg.T
    return ((g / (1 + torch.exp(-g))) * (x @ wu.T)) @ wd.T


def naive_moe(x, sd, p, cfg):
    """Per-token loop: softmax router, top-k (descending), renormalised weights.  Returns y and the
    per-layer aux loss (fraction of tokens per expert times mean probability)."""
    n_tok = x.shape[0]
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    logits = x @ sd[p + "gate.weight"].T
    probs = torch.exp(logits - logits.max(-1, keepdim=True).values)
    probs = probs / probs.sum(-1, keepdim=True)
    y = torch.zeros_like(x)
    counts = [0] * E
    for t in range(n_tok):
        ranked = sorted(range(E), key=lambda e: -probs[t, e].item())[:k]
        w = [probs[t, e].item() for e in ranked]
        if cfg.norm_topk_prob:
            s = sum(w) + 1e-20
            w = [v / s for v in w]
        for e, we in zip(ranked, w):
            counts[e] += 1
            q = f"{p}experts.{e}."
            y[t] += we * naive_swiglu(x[t], sd[q + "gate_proj.weight"], sd[q + "up_proj.weight"],
                                      sd[q + "down_proj.weight"])
    mean_p = probs.mean(0)
    # sum over (slot, e) of f_{slot,e} P_e == sum_e (tokens choosing e in any slot / N) P_e
    aux = sum(counts[e] / n_tok * mean_p[e].item() for e in range(E)) * E * cfg.router_aux_loss_coef
    return y, aux


def naive_forward(sd, cfg: ModelConfig, ids, pos=None, allowed=None):
    """Logits ``[B, T, V]`` and summed aux loss. ``allowed[b, i, j]``: query i may see key j."""
    sd = {k: v.detach().double() for k, v in sd.items()}
    B, T = ids.shape
    nH, nKV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rep = nH // nKV
    if pos is None:
        pos = torch.arange(T).expand(B, T)
    if allowed is None:
        allowed = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)
    cos_t, sin_t = naive_rope_table(cfg)
    cos, sin = cos_t[pos][:, :, None, :], sin_t[pos][:, :, None, :]  # [B, T, 1, hd]
    x = sd["model.embed_tokens.weight"][ids]
    aux_total = 0.0
    eps = cfg.rms_norm_eps
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        h = naive_rmsnorm(x, sd[p + "input_layernorm.weight"], eps)
        q = torch.einsum("bth,oh->bto", h, sd[p + "self_attn.q_proj.weight"]).reshape(B, T, nH, hd)
        k = torch.einsum("bth,oh->bto", h, sd[p + "self_attn.k_proj.weight"]).reshape(B, T, nKV, hd)
        v = torch.einsum("bth,oh->bto", h, sd[p + "self_attn.v_proj.weight"]).reshape(B, T, nKV, hd)
        q = naive_rmsnorm(q, sd[p + "self_attn.q_norm.weight"], eps)
        k = naive_rmsnorm(k, sd[p + "self_attn.k_norm.weight"], eps)
        q = q * cos + naive_rotate_half(q) * sin
        k = k * cos + naive_rotate_half(k) * sin
        # explicit KV-head repetition: query head j reads KV head j // rep
        k = torch.stack([k[:, :, j // rep] for j in range(nH)], dim=2)
        v = torch.stack([v[:, :, j // rep] for j in range(nH)], dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        m = scores.max(-1, keepdim=True).values
        e = torch.exp(scores - m)
        attn = e / e.sum(-1, keepdim=True)
        o = torch.einsum("bhqk,bkhd->bqhd", attn, v).reshape(B, T, nH * hd)
        x = x + o @ sd[p + "self_attn.o_proj.weight"].T
        h2 = naive_rmsnorm(x, sd[p + "post_attention_layernorm.weight"], eps)
        if cfg.use_moe:
            y, aux = naive_moe(h2.reshape(B * T, -1), sd, p + "mlp.", cfg)
            x = x + y.reshape(B, T, -1)
            aux_total += aux
        else:
            x = x + naive_swiglu(h2, sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"],
                                 sd[p + "mlp.down_proj.weight"])
    x = naive_rmsnorm(x, sd["model.norm.weight"], eps)
    head = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["model.embed_tokens.weight"]
    return x @ head.T, aux_total


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

VOCAB = 61


def tiny_config(**over) -> ModelConfig:
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=12, intermediate_size=40, vocab_size=VOCAB, max_position_embeddings=64,
                rms_norm_eps=1e-5, rope_theta=1e4)
    base.update(over)
    return ModelConfig(**base)


def moe_config(top_k: int, **over) -> ModelConfig:
    return tiny_config(use_moe=True, num_experts=4, num_experts_per_tok=top_k, moe_intermediate_size=24,
                       router_aux_loss_coef=0.01, **over)


def random_model(cfg: ModelConfig, seed: int = 0) -> MiniMindForCausalLM:
    """Model with non-trivial weights: norms away from 1, router logits far from uniform."""
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.6)
            else:
                p.normal_(0.0, 0.25)
    return model.eval()


def as_float64(model: MiniMindForCausalLM) -> MiniMindForCausalLM:
    """``model.double()`` with the RoPE tables replaced by the float64 formula.

    The model builds its tables in float32 (as the reference does); that precision is checked by
    ``test_yarn_tables_match_formula``.  Here the tables are exact so that everything else can be
    compared at 1e-9.
    """
    model = model.double()
    cos, sin = naive_rope_table(model.config)
    assert model.model.rope_cos.shape == cos.shape, "RoPE buffer layout changed"
    model.model.rope_cos.copy_(cos)
    model.model.rope_sin.copy_(sin)
    return model


def assert_matches_naive(model, ref, monkeypatch=None, **kwargs):
    """Model (float64) logits vs the naive float64 logits ``ref``: equal to 1e-9."""
    with torch.no_grad():
        out = model(**kwargs).logits
    diff = (out - ref).abs().max().item()
    assert diff < 1e-9, f"model differs from the naive float64 reference by {diff:.3e}"


#: float32 vs float32 through different kernels (packed vs separate, cached vs full): matmul blocking
#: differs between shapes and between CPU kinds (AVX2, AVX-512, AMX), so the round-off scales with
#: the logits (~1 ulp at |logit| ~ 12 is 1e-6, a few of them add up to ~1e-5).  A relative term
#: keeps the check valid everywhere; real bugs (a leaked document, a wrong cache slot) are O(1).
F32_RTOL, F32_ATOL = 1e-5, 1e-5


def assert_close_f32(actual: torch.Tensor, expected: torch.Tensor, atol: float = F32_ATOL,
                     rtol: float = F32_RTOL, msg: str = "") -> None:
    """``|a - e| <= atol + rtol * |e|`` elementwise, with the worst element in the message."""
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol,
                               msg=lambda m: f"{msg}\n{m}" if msg else m)


def rand_ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, t), generator=g)


# ------------------------------------------------------------------------------------------------
# Forward equivalence
# ------------------------------------------------------------------------------------------------

CONFIGS = {
    "dense_gqa": lambda: tiny_config(),
    "moe_top1": lambda: moe_config(1),
    "moe_top2": lambda: moe_config(2),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_naive_float64(name, monkeypatch):
    cfg = CONFIGS[name]()
    model = as_float64(random_model(cfg))
    ids = rand_ids(2, 9)
    ref, _ = naive_forward(model.state_dict(), cfg, ids)
    assert_matches_naive(model, ref, monkeypatch, input_ids=ids)
    # the naive model is sensitive to the things it checks: a wrong KV-head mapping changes logits
    if cfg.num_key_value_heads > 1:
        sd = dict(model.state_dict())
        kw = sd["model.layers.0.self_attn.k_proj.weight"]
        sd["model.layers.0.self_attn.k_proj.weight"] = kw.reshape(2, -1, kw.shape[-1]).flip(0).reshape_as(kw)
        wrong, _ = naive_forward(sd, cfg, ids)
        assert (wrong - ref).abs().max() > 1e-3


def test_rmsnorm_formula():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = 0.01 * torch.randn(3, 5, 16)  # mean(x^2) ~ 1e-4: eps changes the result by ~5%
    ref = naive_rmsnorm(x.double(), norm.weight.double(), 1e-5)
    assert torch.allclose(norm(x).double(), ref, atol=0, rtol=1e-5)
    assert not torch.allclose(naive_rmsnorm(x.double(), norm.weight.double(), 1e-6), ref, rtol=1e-3)
    xb = x.bfloat16()
    assert norm(xb).dtype == torch.bfloat16
    # the config's eps reaches every norm of the model
    model = MiniMindForCausalLM(tiny_config(rms_norm_eps=3e-5))
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 1 + 4 * model.config.num_hidden_layers
    assert all(m.eps == 3e-5 for m in norms)


def test_rmsnorm_keeps_float64():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-6).double()
    x = torch.randn(4, 16, dtype=torch.float64)
    assert (norm(x) - naive_rmsnorm(x, norm.weight, 1e-6)).abs().max().item() < 1e-12


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_aux_loss_matches_formula(top_k):
    cfg = moe_config(top_k)
    model = as_float64(random_model(cfg, seed=3))
    ids = rand_ids(3, 7, seed=5)
    _, ref_aux = naive_forward(model.state_dict(), cfg, ids)
    model.train()  # dropout is 0: same outputs, aux loss on
    with torch.no_grad():
        out = model(ids)
    assert ref_aux > 0
    assert out.aux_loss.item() == pytest.approx(ref_aux, rel=1e-6)
    model.eval()
    with torch.no_grad():
        assert model(ids).aux_loss.item() == 0.0


def test_moe_aux_loss_is_summed_over_layers():
    cfg1 = moe_config(1, num_hidden_layers=1)
    cfg3 = moe_config(1, num_hidden_layers=3)
    m3 = random_model(cfg3, seed=4).double().train()
    ids = rand_ids(2, 6, seed=2)
    _, ref = naive_forward(m3.state_dict(), cfg3, ids)
    with torch.no_grad():
        assert m3(ids).aux_loss.item() == pytest.approx(ref, rel=1e-6)
    # a one-layer model gives a single term, so the three-layer value is not a mean
    m1 = random_model(cfg1, seed=4).double().train()
    _, ref1 = naive_forward(m1.state_dict(), cfg1, ids)
    with torch.no_grad():
        assert m1(ids).aux_loss.item() == pytest.approx(ref1, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# RoPE / YaRN tables
# ------------------------------------------------------------------------------------------------

YARN = {"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 2048, "beta_fast": 32.0,
        "beta_slow": 1.0, "attention_factor": 1.0}


def _float32_angle_table(inv64: np.ndarray, n: int) -> np.ndarray:
    """Angles as a float32 table computes them: float32 inverse frequencies times float32 positions
    (one correctly rounded multiply), then cos/sin evaluated in float64."""
    ang = np.arange(n, dtype=np.float32)[:, None] * inv64.astype(np.float32)[None, :]
    ang = ang.astype(np.float64)
    return np.concatenate([ang, ang], axis=1)


def test_yarn_tables_match_formula():
    hd, theta, n = 96, 1e6, 4096
    inv_plain, _ = naive_inv_freq(hd, theta, n, None)
    inv_yarn, fac = naive_inv_freq(hd, theta, n, YARN)
    ratio = inv_yarn / inv_plain
    # YaRN ramp bounds: low = 8, high = 21 for these settings
    assert np.allclose(ratio[:9], 1.0, rtol=0, atol=1e-15)
    assert np.allclose(ratio[21:], 1 / 16, rtol=1e-13)
    assert np.all((ratio[9:21] < 1) & (ratio[9:21] > 1 / 16))
    assert np.all(np.diff(ratio[8:22]) < 0)

    ours_inv, ours_fac = rope_inv_freq(hd, theta, n, YARN)
    assert ours_fac == fac == 1.0
    assert np.allclose(ours_inv.double().numpy(), inv_yarn, rtol=1e-7, atol=0)
    ours_ratio = ours_inv.double().numpy() / rope_inv_freq(hd, theta, n, None)[0].double().numpy()
    assert np.allclose(ours_ratio[:8], 1.0, atol=1e-7) and np.allclose(ours_ratio[22:], 1 / 16, rtol=1e-6)

    cos, sin = rope_tables(hd, theta, n, YARN)
    assert cos.shape == (n, hd) and sin.shape == (n, hd)
    ang = _float32_angle_table(inv_yarn, n)
    assert np.abs(cos.double().numpy() - np.cos(ang)).max() < 1e-6
    assert np.abs(sin.double().numpy() - np.sin(ang)).max() < 1e-6
    # positions 0..63: float32 angle rounding is negligible, so compare to the exact formula too
    exact = np.arange(64, dtype=np.float64)[:, None] * inv_yarn[None, :]
    exact = np.concatenate([exact, exact], axis=1)
    assert np.abs(cos[:64].double().numpy() - np.cos(exact)).max() < 1e-5
    assert np.abs(sin[:64].double().numpy() - np.sin(exact)).max() < 1e-5


def test_yarn_only_beyond_original_context_and_attention_factor():
    hd, theta = 96, 1e6
    plain_cos, plain_sin = rope_tables(hd, theta, 2048, None)
    # table not longer than the original context: YaRN must not change anything
    cos, sin = rope_tables(hd, theta, 2048, YARN)
    assert torch.equal(cos, plain_cos) and torch.equal(sin, plain_sin)
    # attention_factor multiplies cos and sin
    c1, s1 = rope_tables(hd, theta, 4096, YARN)
    c2, s2 = rope_tables(hd, theta, 4096, {**YARN, "attention_factor": 0.7})
    assert torch.allclose(c2, 0.7 * c1, atol=1e-6) and torch.allclose(s2, 0.7 * s1, atol=1e-6)
    assert not torch.allclose(c1, rope_tables(hd, theta, 4096, None)[0])
    # the config switch installs exactly the reference YaRN dict
    cfg = ModelConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      inference_rope_scaling=True)
    assert cfg.rope_scaling == YARN


def test_plain_rope_matches_formula():
    hd, theta, n = 16, 1e4, 128
    cos, sin = rope_tables(hd, theta, n, None)
    inv, _ = naive_inv_freq(hd, theta, n, None)
    ang = _float32_angle_table(inv, n)
    assert np.abs(cos.double().numpy() - np.cos(ang)).max() < 1e-6
    assert np.abs(sin.double().numpy() - np.sin(ang)).max() < 1e-6


# ------------------------------------------------------------------------------------------------
# Packing, padding, KV cache
# ------------------------------------------------------------------------------------------------


def test_packed_documents_equal_separate_runs():
    cfg = tiny_config()
    model = random_model(cfg, seed=7)
    docs = [rand_ids(1, n, seed=10 + n)[0] for n in (5, 3, 6)]
    ids = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=pos, doc_ids=doc_ids).logits[0]
        alone = torch.cat([model(d[None]).logits[0] for d in docs])
        leaky = model(ids, position_ids=pos).logits[0]
    assert_close_f32(packed, alone, msg="packed documents differ from separate runs")
    # without the document mask later documents see earlier ones: the test can tell
    first = len(docs[0])
    assert_close_f32(leaky[:first], alone[:first])
    leak = (leaky[first:] - alone[first:]).abs().max().item()
    # the leak must be far outside the tolerance used above, not just above an absolute 1e-2
    bound = (F32_ATOL + F32_RTOL * alone[first:].abs().max()).item()
    assert leak > 1e-2 and leak > 100 * bound, (leak, bound)


def test_packed_matches_naive_document_mask(monkeypatch):
    cfg = moe_config(2)
    model = as_float64(random_model(cfg, seed=8))
    lens = (4, 2, 5)
    ids = rand_ids(1, sum(lens), seed=3)
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    allowed = (doc[:, :, None] == doc[:, None, :]) & torch.ones(sum(lens), sum(lens), dtype=torch.bool).tril()
    ref, _ = naive_forward(model.state_dict(), cfg, ids, pos=pos, allowed=allowed)
    assert_matches_naive(model, ref, monkeypatch, input_ids=ids, position_ids=pos, doc_ids=doc)


def test_padded_batch_with_cache_mask_matches_naive(monkeypatch):
    cfg = tiny_config()
    model = as_float64(random_model(cfg, seed=9))
    lens = [7, 4]
    T = max(lens)
    ids = rand_ids(2, T, seed=4)
    ids[1, lens[1]:] = 0  # right padding
    pos = torch.arange(T).expand(2, T)
    mask = cache_attention_mask(pos, T)
    assert mask.shape == (2, 1, T, T) and mask.dtype == torch.bool
    ref, _ = naive_forward(model.state_dict(), cfg, ids, pos=pos, allowed=mask[:, 0])
    assert_matches_naive(model, ref, monkeypatch, input_ids=ids, position_ids=pos, attn_mask=mask)
    # the real tokens of the short row equal the row run alone
    with torch.no_grad():
        alone = model(ids[1:, :lens[1]]).logits
        padded = model(ids, position_ids=pos, attn_mask=mask).logits
    assert (padded[1:, :lens[1]] - alone).abs().max().item() < 1e-9


@pytest.mark.parametrize("use_moe", [False, True])
def test_prefill_then_decode_equals_single_pass(use_moe):
    cfg = moe_config(2) if use_moe else tiny_config()
    model = random_model(cfg, seed=11)
    lens = [9, 6]
    T = max(lens)
    ids = rand_ids(2, T, seed=6)
    with torch.no_grad():
        full = [model(ids[b:b + 1, :lens[b]]).logits[0] for b in range(2)]
        cache = KVCache(cfg, batch_size=2, max_len=16)
        # prefill of different lengths: row 0 gets 5 prompt tokens, row 1 gets 3; pad to 5
        pre = [5, 3]
        pre_ids = ids[:, :5].clone()
        pre_ids[1, 3:] = 0
        pos = torch.arange(5).expand(2, 5)
        out = model(pre_ids, position_ids=pos, attn_mask=cache_attention_mask(pos, cache.max_len),
                    kv_cache=cache).logits
        got = [[out[b, :pre[b]]] for b in range(2)]
        # decode token by token, each row at its own position (row 1 overwrites its pad slots)
        cur = list(pre)
        while any(c < n for c, n in zip(cur, lens)):
            step_pos = torch.tensor([[min(c, n - 1)] for c, n in zip(cur, lens)])
            step_ids = torch.stack([ids[b, step_pos[b, 0]] for b in range(2)])[:, None]
            o = model(step_ids, position_ids=step_pos,
                      attn_mask=cache_attention_mask(step_pos, cache.max_len),
                      kv_cache=cache, logits_to_keep=1).logits
            for b in range(2):
                if cur[b] < lens[b]:
                    got[b].append(o[b])
                    cur[b] += 1
    for b in range(2):
        inc = torch.cat(got[b])
        assert inc.shape == full[b].shape
        # logits are O(10) here; float32 round-off is ~1e-5, a cache/position mistake is O(1)
        assert_close_f32(inc, full[b], atol=1e-4, msg=f"row {b}")


def test_causal_prefill_with_cache_then_decode():
    """Prefill without an explicit mask (causal from 0), then single-token decode with the cache mask."""
    cfg = tiny_config()
    model = random_model(cfg, seed=12)
    ids = rand_ids(1, 8, seed=8)
    with torch.no_grad():
        full = model(ids).logits[0]
        cache = KVCache(cfg, 1, 8)
        first = model(ids[:, :4], kv_cache=cache).logits[0]
        steps = []
        for p in range(4, 8):
            pos = torch.tensor([[p]])
            steps.append(model(ids[:, p:p + 1], position_ids=pos, kv_cache=cache,
                               attn_mask=cache_attention_mask(pos, p + 1)).logits[0])
    inc = torch.cat([first] + steps)
    assert_close_f32(inc, full, atol=1e-4)
    # a decode step that ignored the cache would differ
    with torch.no_grad():
        lone = model(ids[:, 7:8], position_ids=torch.tensor([[7]])).logits[0]
    assert (lone - full[7:8]).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------------


def _backward(model, ids):
    out = model(ids)
    loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1))
    (loss + out.aux_loss).backward()
    return out


@pytest.mark.parametrize("use_moe", [False, True])
def test_every_parameter_gets_a_gradient(use_moe):
    cfg = moe_config(1) if use_moe else tiny_config()
    model = random_model(cfg, seed=13).train()
    _backward(model, rand_ids(4, 12, seed=9))
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    if use_moe:
        # with top-1 the renormalised weight is 1, so the router learns only through the aux loss
        with_aux = model.model.layers[0].mlp.gate.weight.grad.abs().max().item()
        model.zero_grad()
        model.config.router_aux_loss_coef = 0.0
        for layer in model.model.layers:
            layer.mlp.aux_coef = 0.0
        _backward(model, rand_ids(4, 12, seed=9))
        without_aux = model.model.layers[0].mlp.gate.weight.grad.abs().max().item()
        assert without_aux < 1e-3 * with_aux  # float32 round-off of p / (p + 1e-20) only


def test_idle_experts_still_get_gradients():
    cfg = moe_config(1)
    model = random_model(cfg, seed=14).train()
    ids = rand_ids(1, 2, seed=1)  # two tokens, four experts: at least two idle experts per layer
    with torch.no_grad():
        eval_logits = model.eval()(ids).logits
    model.train()
    out = _backward(model, ids)
    assert torch.allclose(out.logits.detach(), eval_logits, atol=1e-6)  # the DDP term adds zero
    idle_seen = 0
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} has no gradient (DDP would hang / error)"
        if ".experts." in name and p.grad.abs().sum() == 0:
            idle_seen += 1
    assert idle_seen >= 2 * 3 * cfg.num_hidden_layers


# ------------------------------------------------------------------------------------------------
# Parameter counts and config validation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, over, total, active, text", [
    ("minimind-3", {}, 63_912_192, 63_912_192, "Model Params: 63.91M"),
    ("minimind-3-moe", {}, 198_416_640, 63_936_768, "Model Params: 198.42M-A63.94M"),
    ("small", {}, 30_025_216, 30_025_216, "Model Params: 30.03M"),
    ("small", {"use_moe": True, "num_experts": 4, "num_experts_per_tok": 1}, 91_383_296, 30_041_600,
     "Model Params: 91.38M-A30.04M"),
])
def test_parameter_counts(name, over, total, active, text):
    cfg = preset(name, max_position_embeddings=16, **over)
    with torch.device("meta"):  # counts only: no memory, no init cost
        model = MiniMindForCausalLM(cfg)
    assert model.num_parameters() == total
    assert model.num_parameters(active=True) == active
    assert model.describe() == text
    # the tied embedding is counted once; state_dict still shows both keys (reference layout)
    sd_keys = set(model.state_dict())
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= sd_keys
    assert sum(p.numel() for p in model.parameters()) == total


def test_parameter_count_independent_of_max_positions():
    with torch.device("meta"):
        a = MiniMindForCausalLM(preset("small", max_position_embeddings=16))
        b = MiniMindForCausalLM(preset("small", max_position_embeddings=4096))
    assert a.num_parameters() == b.num_parameters()


@pytest.mark.parametrize("kwargs, needle", [
    (dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
    (dict(hidden_size=64, num_attention_heads=6, num_key_value_heads=4), "num_key_value_heads"),
    (dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=0), "num_key_value_heads"),
    (dict(hidden_size=64, num_attention_heads=0, num_key_value_heads=1), "num_attention_heads"),
    (dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=0),
     "num_hidden_layers"),
    (dict(hidden_size=36, num_attention_heads=4, num_key_value_heads=2), "head_dim"),
    (dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=15), "head_dim"),
    (dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, use_moe=True, num_experts=4,
          num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, use_moe=True, num_experts=4,
          num_experts_per_tok=0), "num_experts_per_tok"),
    (dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, dropout=1.0), "dropout"),
])
def test_config_validation(kwargs, needle, monkeypatch):
    allocated = []
    real_init = torch.nn.Module.__init__

    def spy(self, *a, **k):
        allocated.append(type(self).__name__)
        real_init(self, *a, **k)

    monkeypatch.setattr(torch.nn.Module, "__init__", spy)
    with pytest.raises(ValueError, match=needle):
        MiniMindForCausalLM(ModelConfig(**kwargs))
    with pytest.raises(ValueError, match=needle):
        ModelConfig.from_dict(kwargs)
    assert allocated == [], f"modules were built before the config was rejected: {allocated}"


def test_valid_config_derivations():
    cfg = ModelConfig(hidden_size=512, num_attention_heads=8, num_key_value_heads=4)
    assert cfg.head_dim == 64 and cfg.intermediate_size == 1664 and cfg.moe_intermediate_size == 1664
    assert ModelConfig().intermediate_size == 2432 and ModelConfig().head_dim == 96
    with pytest.raises(ValueError):
        ModelConfig.from_dict({"hidden_size": 64, "n_routed_experts": 4})
