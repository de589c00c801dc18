"""Int8 weight-only decode (minimind.infer.quant): codes, the kernel, model logits, greedy decoding.

Tolerances, and why:

* The codes: ``|W - s q| <= s / 2`` per element (round to nearest), exactly.
* One layer: the int8 kernel against ``x (q s)ᵀ`` computed in float32 from the same codes differs
  only by bf16 rounding of the activations and of the output (the kernel's fast path is bf16):
  relative L2 error below 1%.
* Whole-model logits: weight rounding adds independent errors of RMS ``s / sqrt(12)`` per weight,
  about 0.7-1% of a Gaussian row's RMS; through a few layers the logits' relative L2 error stays a
  few percent.  We assert below 5% on a random model and below 3% on a trained one, and that int8 is
  no more than 20x the error of plain bf16 weights on the same model (bf16 rounds to 2^-9, int8 to
  1/254 of the row maximum: about 8x coarser on Gaussian rows).
* Greedy equality is only meaningful when the argmax margins exceed that noise: a random model's
  top-2 logits are often nearly tied, so we train a small model for a few hundred steps on a
  deterministic token chain (``next = perm[cur]``); its margins are several logits wide, and greedy
  decoding through the engine must then give identical tokens with and without int8 for 48 steps.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minimind.config import ModelConfig
from minimind.infer import GenerationEngine, SamplingParams, quant
from minimind.infer.quant import Int8Linear, quantize_int8_, quantize_model_, quantize_rows, weight_bytes
from minimind.model import MiniMindForCausalLM
from tests.test_generation import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def chain_model(steps: int = 300) -> tuple[MiniMindForCausalLM, torch.Tensor]:
    """A small model trained until it follows ``next = perm[cur]``; returns it and ``perm``."""
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, intermediate_size=192, vocab_size=VOCAB, max_position_embeddings=128,
                      tie_word_embeddings=False)
    model = MiniMindForCausalLM(cfg)
    perm = torch.randperm(VOCAB)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        seq = [torch.randint(0, VOCAB, (16,))]
        for _ in range(31):
            seq.append(perm[seq[-1]])
        ids = torch.stack(seq, dim=1)  # [16, 32]
        logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), perm


def test_codes_round_to_nearest_within_half_a_step() -> None:
    torch.manual_seed(0)
    w = torch.randn(37, 50) * torch.logspace(-3, 1, 37).unsqueeze(1)  # rows of very different scales
    w[5] = 0.0
    codes, scale = quantize_rows(w)  # scales stored in bf16, as Int8Linear keeps them
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 127
    assert torch.equal(scale.to(torch.bfloat16).float(), scale)  # exactly what the kernel reads
    assert torch.equal(codes[5], torch.zeros(50, dtype=torch.int8)) and float(scale[5]) == 1.0
    err = (w - codes.float() * scale.unsqueeze(1)).abs()
    assert bool((err <= scale.unsqueeze(1) / 2 * (1 + 1e-6)).all())
    # every nonzero row uses (nearly) the full range: the scale was rounded up by under 2^-8
    assert bool((codes.abs().amax(1)[torch.arange(37) != 5] >= 126).all())


@pytest.mark.parametrize("kernels", [(True, True), (False, False)], ids=["vnni_bf16", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 4, 11])  # 3, 12, 33 rows: each CPU kernel (quant doc)
def test_int8_linear_equals_dequantized_product(dtype: torch.dtype, rows: int, kernels: tuple[bool, bool],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kernel the CPU may pick (the kinds are forced: each runs, emulated if need be, anywhere)."""
    monkeypatch.setattr(quant, "cpu_kernels", lambda: kernels)
    torch.manual_seed(1)
    lin = nn.Linear(64, 96, bias=False)
    q = Int8Linear.from_linear(lin, out_dtype=dtype)
    x = torch.randn(rows, 3, 64)
    ref = x @ q.dequantized().t()  # float32, from the same codes
    y = q(x.to(dtype))
    assert y.dtype == dtype and y.shape == (rows, 3, 96)
    assert rel_err(y, ref) < 1e-2
    assert rel_err(y, lin(x)) < 2e-2  # and close to the float layer itself
    monkeypatch.setattr(quant, "_HAS_INT8PACK", False)  # the non-CPU fallback: same numbers
    assert rel_err(q(x.to(dtype)), ref) < 1e-2


def test_two_digit_activations_are_exact_to_the_weight_codes() -> None:
    """The int8 GEMM path splits activations into two int8 digits: with heavy outlier channels its
    product equals the float32 product with the dequantized weight to 3e-4 (measured 1.0e-4; one
    int8 digit alone, i.e. int8-quantized activations, is off by 2.5e-2 here)."""
    torch.manual_seed(5)
    lin = nn.Linear(128, 64, bias=False)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(9, 128)
    x[:, 3] *= 60.0  # an outlier channel sets the row maximum
    ref = x @ q.dequantized().t()
    assert rel_err(quant._two_digit_int8_mm(x, q.qweight, q.scale), ref) < 3e-4


def test_loading_a_float_state_dict_requantizes() -> None:
    torch.manual_seed(2)
    a, b = tiny_model(seed=2), tiny_model(seed=3)
    qa = quantize_int8_(copy.deepcopy(a))
    qa.load_state_dict(b.state_dict())  # strict: float keys in, int8 codes out
    qb = quantize_int8_(copy.deepcopy(b))
    for (name, ma), mb in zip(qa.named_modules(), qb.modules()):
        if isinstance(ma, Int8Linear):
            assert torch.equal(ma.qweight, mb.qweight) and torch.equal(ma.scale, mb.scale), name
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(qa(ids).logits, qb(ids).logits)
    bad = {k: (v[:, :-1] if k.endswith("q_proj.weight") else v) for k, v in b.state_dict().items()}
    with pytest.raises(RuntimeError, match="q_proj.weight"):
        qa.load_state_dict(bad)


def test_what_is_quantized_and_what_is_not() -> None:
    model = tiny_model(use_moe=True)
    q = quantize_model_(copy.deepcopy(model), "int8")
    layer = q.model.layers[0]
    assert isinstance(layer.mlp.experts[3].down_proj, Int8Linear)
    assert isinstance(layer.self_attn.v_proj, Int8Linear) and isinstance(q.lm_head, Int8Linear)
    assert type(layer.mlp.gate) is nn.Linear  # the router stays float
    assert type(q.model.embed_tokens) is nn.Embedding
    assert weight_bytes(q) < weight_bytes(model) / 3  # fp32 -> int8 codes plus small scales
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        quantize_model_(copy.deepcopy(model), "int4")


@pytest.mark.parametrize("use_moe", [False, True])
def test_random_model_logits_within_tolerance(use_moe: bool) -> None:
    torch.manual_seed(4)
    cfg = ModelConfig(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=384, vocab_size=512, max_position_embeddings=128, use_moe=use_moe,
                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=192)
    model = MiniMindForCausalLM(cfg).eval()
    q = quantize_int8_(copy.deepcopy(model))
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        ref, got, half = model(ids).logits, q(ids).logits, bf16(ids).logits
    err, err_bf16 = rel_err(got, ref), rel_err(half, ref)
    assert 0 < err < 0.05
    assert err < 20 * err_bf16


def test_trained_model_logits_and_greedy_decoding_match(chain: tuple[MiniMindForCausalLM, torch.Tensor]
                                                        ) -> None:
    model, perm = chain
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # 6 rows decode through the two-digit int8 GEMM (quant doc); a 2-row call below through the GEMV
    prompts = [[7], [3, int(perm[3])], [50, int(perm[50]), int(perm[perm[50]])], [11], [60], [81, 2]]
    params = SamplingParams(max_new_tokens=48, temperature=0.0, stop_token_ids=())
    full = GenerationEngine(model, num_slots=6).generate(prompts, params)
    for dtype in (torch.float32, torch.bfloat16):
        engine = GenerationEngine(model, dtype=dtype, num_slots=6, quantize="int8")
        assert isinstance(engine.model.lm_head, Int8Linear)
        got = engine.generate(prompts, params)
        for p, f, g in zip(prompts, full, got):
            chain_ids = [int(perm[p[-1]])]
            for _ in range(47):
                chain_ids.append(int(perm[chain_ids[-1]]))
            assert f.token_ids == chain_ids  # the float model really follows the chain ...
            assert g.token_ids == f.token_ids  # ... and int8 decoding gives the same tokens
        two = engine.generate(prompts[:2], params)  # 2 rows: the GEMV kernel
        assert [r.token_ids for r in two] == [r.token_ids for r in full[:2]]
        ids = torch.tensor([[5, int(perm[5]), 9, 11, 40, int(perm[40])]])
        with torch.no_grad():
            err = rel_err(engine.model(ids).logits, model(ids).logits)
        assert 0 < err < 0.03
    # the training model was not touched
    assert all(type(m) is not Int8Linear for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_refresh_requantizes_the_new_weights(chain: tuple[MiniMindForCausalLM, torch.Tensor]) -> None:
    model, _ = chain
    trained = copy.deepcopy(model)
    engine = GenerationEngine(trained, quantize="int8")
    with torch.no_grad():  # an "optimizer step" on the training model
        for p in trained.parameters():
            p.mul_(0.5)
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        stale = engine.model(ids).logits
        engine.refresh_weights()
        fresh = engine.model(ids).logits
        fresh_model = quantize_int8_(copy.deepcopy(trained))
        if engine.onednn_layers:  # the same kernels as the engine's copy (oneDNN-packed codes)
            quant.use_onednn_(fresh_model)
        if engine.avx2_layers:  # (the AVX2 integer kernel)
            quant.use_avx2_kernel_(fresh_model)
        want = fresh_model(ids).logits
    assert torch.equal(fresh, want)
    assert rel_err(stale, want) > 0.1


def test_bench_reports_int8_bandwidth_and_skips_a_missing_llama_cpp(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]
                                                                    ) -> None:
    """bench/bench_engine.py: the int8 mode runs the quantized engine, reports the bytes a step
    streams (int8 below bf16) and skips llama.cpp with a reason when llama-cpp-python is absent."""
    import importlib.util

    from tests.test_bench_reference import _load

    bench = _load("bench_engine")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    report = bench.main(["--preset", "tiny", "--batches", "1", "--prompt_len", "6", "--new_tokens", "3",
                         "--dtypes", "bfloat16,int8", "--repeats", "1", "--floor_iters", "1",
                         "--max_positions", "64", "--threads", "1"])
    capsys.readouterr()
    bf16, int8 = report["results"]["bfloat16"]["1"], report["results"]["int8"]["1"]
    assert "llama_cpp is not installed" in int8["llama_cpp"]["skipped"]
    assert int8["engine"]["completion_tokens"] == 3 and "reference" not in int8
    assert int8["engine"]["weight_bytes_per_step"] < 0.6 * bf16["engine"]["weight_bytes_per_step"]
    assert int8["engine"]["weight_gb_s"] > 0 and bf16["engine_vs_reference"]["decode"] > 0
    assert report["targets"]["b1_int8_vs_llama_cpp_q8_0"]["ratio"] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_layers_compute_the_same_logits_and_keep_weights_shared(dtype: torch.dtype) -> None:
    model = tiny_model(seed=6).to(dtype)
    fast = copy.deepcopy(model)
    assert quant.use_gemv_(fast) == 2 * 7 + 1  # every block projection and the LM head
    assert isinstance(fast.lm_head, quant.GemvLinear)
    ids = torch.randint(0, 300, (3, 7))
    threads = torch.get_num_threads()
    with torch.no_grad():
        # one row: torch.mv (fp32 on several threads: one row block per thread, as up to 8 rows);
        # many rows: F.linear.  The same products, only the summation order may differ.
        for k in (1, 2, 3):
            torch.set_num_threads(k)
            try:
                for batch in (ids[:1, :1], ids[:1], ids[:, :2], ids):
                    tol = 1e-5 if dtype == torch.float32 else 1e-2
                    assert rel_err(fast(batch).logits, model(batch).logits) < tol, (k, batch.shape)
            finally:
                torch.set_num_threads(threads)
        fast.load_state_dict(model.state_dict())  # same keys as the float model
        layer = fast.model.layers[0].self_attn.q_proj
        assert layer.weight is dict(fast.named_parameters())["model.layers.0.self_attn.q_proj.weight"]


def test_rl_rollouts_decode_with_int8_and_stay_close_to_the_trainer(tmp_path) -> None:
    """``--quantize int8`` on an RL stage: the rollout engine's copy is int8 (the trainer's model is
    not), and the rollout log-probs stay close to the trainer's old log-probs of the same tokens: the
    truncated-IS weight ``exp(old - rollout)`` is within 2% of 1 on this tiny policy (measured 0.2%)."""
    from minimind.rl.rollout import EngineBackend
    from minimind.train.stages.rl import GRPOStage
    from minimind.train.stages.rl_recipe import old_log_probs, pick_prompts, rollout_and_score
    from tests.test_rl_recipe import _context, _opts  # importing it registers the toy reward

    ctx = _context(_toy_ws(tmp_path), tmp_path, GRPOStage(_opts(quantize="int8", steps_per_generation=2)))
    assert isinstance(ctx.backend, EngineBackend)
    assert isinstance(ctx.backend.engine.model.lm_head, Int8Linear)
    assert all(type(m) is not Int8Linear for m in ctx.trainer.base_model.modules())
    batch = rollout_and_score(ctx, 0, pick_prompts(ctx, 0)).batch
    mask = batch.completion_mask.bool()
    old = old_log_probs(ctx, batch).old_logp
    assert old is not None and bool(mask.any())
    weight = (old[mask] - batch.rollout_logp[mask]).exp()
    assert float((weight - 1).abs().max()) < 0.02
    assert float((old[mask] - batch.rollout_logp[mask]).abs().max()) > 0  # int8 really decoded them


def _toy_ws(root) -> dict:
    from minimind.rl.toy import write_toy_task

    write_toy_task(root)
    return {"root": root, "tok": root / "tok", "data": root / "toy.jsonl"}
