"""The benchmark's reference baseline computes what our model computes.

``bench/reference_decode.py`` re-implements the reference decoder and its sampling loop so that
inference speed can be compared against it; a speed comparison only means something if both sides
produce the same tokens, which these tests pin down in float32.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from minimind.config import ModelConfig
from minimind.model import MiniMindForCausalLM

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str) -> ModuleType:
    """Import a bench script by path (bench/ is not a package; its scripts import ``_common`` from
    their own folder)."""
    if name in sys.modules:
        return sys.modules[name]
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module while the class is created
    spec.loader.exec_module(module)
    return module


ref = _load("reference_decode")


def tiny_pair(tie: bool, seed: int = 0) -> tuple[MiniMindForCausalLM, torch.nn.Module]:
    """Our random tiny model (large weights so greedy tokens vary) and the reference loaded from it."""
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=300, max_position_embeddings=256, tie_word_embeddings=tie)
    ours = MiniMindForCausalLM(cfg)
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
            else:
                p.uniform_(0.5, 1.5)  # norm weights away from 1 so a mis-wired norm shows
    theirs = ref.ReferenceForCausalLM(ref.ReferenceConfig.from_config(cfg))
    theirs.load_state_dict(ours.state_dict())
    return ours.eval(), theirs.eval()


def our_greedy(model: MiniMindForCausalLM, prompt: list[int], n: int) -> list[int]:
    """No cache: a full forward over the growing sequence, argmax of the last position."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("tie", [False, True])
def test_reference_logits_equal_ours(tie: bool) -> None:
    ours, theirs = tiny_pair(tie)
    ids = torch.randint(3, 300, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ours(ids).logits
        got = theirs(ids).logits  # unpadded prefill: the SDPA path
        masked = theirs(ids, attention_mask=torch.ones_like(ids)).logits  # all-ones mask: same path
    scale = want.abs().max()
    assert (got - want).abs().max() <= 1e-4 * scale
    assert (masked - want).abs().max() <= 1e-4 * scale


def test_reference_manual_attention_path_equals_ours() -> None:
    """Prefill in chunks (cache + manual path with the causal triangle on the last columns)."""
    ours, theirs = tiny_pair(False)
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ours(ids).logits[:, 7:]
        first = theirs(ids[:, :7], use_cache=True)
        got = theirs(ids[:, 7:], past_key_values=first.past_key_values, use_cache=True).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("tie", [False, True])
def test_reference_greedy_generate_equals_our_greedy(tie: bool) -> None:
    ours, theirs = tiny_pair(tie, seed=3)
    prompts = [[5, 6, 7, 8, 9], [40, 41, 42, 43, 44]]  # equal lengths: the reference needs no padding
    n = 24
    want = [our_greedy(ours, p, n) for p in prompts]
    assert len({tuple(w) for w in want}) == 2 and all(len(set(w)) > 2 for w in want)  # non-trivial
    prompt_t = torch.tensor(prompts)
    out = theirs.generate(prompt_t, attention_mask=torch.ones_like(prompt_t), max_new_tokens=n,
                          do_sample=False, eos_token_id=None)
    assert out[:, 5:].tolist() == want
    no_cache = theirs.generate(prompt_t, max_new_tokens=n, do_sample=False, eos_token_id=None,
                               use_cache=False)
    assert no_cache.tolist() == out.tolist()


def test_reference_sampling_and_eos_bookkeeping() -> None:
    """Sampling is seed-reproducible, and rows that emitted EOS keep emitting it."""
    _, theirs = tiny_pair(False, seed=4)
    prompt = torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13]])
    torch.manual_seed(0)
    a = theirs.generate(prompt, max_new_tokens=12, eos_token_id=None)
    torch.manual_seed(0)
    b = theirs.generate(prompt, max_new_tokens=12, eos_token_id=None)
    assert a.tolist() == b.tolist() and a.shape == (3, 15)
    eos = int(a[0, 4])  # row 0's second sampled token plays EOS
    torch.manual_seed(0)
    c = theirs.generate(prompt, max_new_tokens=12, eos_token_id=eos)
    row = c[0, 3:].tolist()
    first = row.index(eos)
    assert all(t == eos for t in row[first:])


def test_reference_refuses_moe_config() -> None:
    with pytest.raises(ValueError, match="dense"):
        ref.ReferenceConfig.from_config(ModelConfig(hidden_size=64, num_hidden_layers=1,
                                                    num_attention_heads=4, num_key_value_heads=2,
                                                    use_moe=True))


def test_bench_engine_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    """The benchmark runs end to end on a tiny model and reports every measured figure.

    One thread: on a busy machine multi-threaded kernels wait on each other's cores and a tiny run
    takes many times longer; ``main`` restores the thread count afterwards."""
    import json

    bench = _load("bench_engine")
    report = bench.main(["--preset", "tiny", "--batches", "1,2", "--prompt_len", "6", "--new_tokens", "4",
                         "--dtypes", "float32", "--repeats", "1", "--floor_iters", "2",
                         "--max_positions", "64", "--threads", "1"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(report))
    cell = report["results"]["float32"]["2"]
    for side in ("engine", "reference"):
        assert cell[side]["decode_tok_s"] > 0 and cell[side]["ttft_s"] > 0
        assert cell[side]["completion_tokens"] == 2 * 4
    assert cell["matmul_floor"]["tok_s"] > 0
    assert cell["engine_vs_reference"]["decode"] > 0


def test_bench_engine_b8_target_uses_the_fp32_reference_where_bf16_was_not_run() -> None:
    """On an AVX2-only CPU the bench runs float32 and int8 (bf16 is emulated there): the b8 target
    is then the best engine against the float32 reference loop, and says so in its key."""
    bench = _load("bench_engine")
    cell = {"reference": {"decode_tok_s": 100.0}, "engine": {"decode_tok_s": 250.0}}
    results = {"float32": {"8": cell}, "int8": {"8": {"engine_compiled": {"decode_tok_s": 340.0}}}}
    t = bench.targets(results)
    assert "b8_best_engine_vs_reference_bf16" not in t
    assert t["b8_best_engine_vs_reference_fp32"] == {"ratio": 3.4, "target": 3.0,
                                                     "engine_variant": "engine_compiled", "engine_mode": "int8"}
    results["bfloat16"] = {"8": {"reference": {"decode_tok_s": 170.0}, "engine": {"decode_tok_s": 300.0}}}
    assert bench.targets(results)["b8_best_engine_vs_reference_bf16"]["ratio"] == 2.0


def test_bench_engine_gpu_bandwidth_target_uses_the_fastest_b1_variant() -> None:
    """On a GPU of the bandwidth table the b1 target is the fastest bf16 variant's weight bandwidth
    over the datasheet's; on a CPU (no GPU name) there is no such target."""
    bench = _load("bench_engine")
    cell = {"engine": {"decode_tok_s": 100.0, "weight_gb_s": 12.8},
            "engine_cudagraphs": {"decode_tok_s": 800.0, "weight_gb_s": 102.4},
            "reference": {"decode_tok_s": 120.0, "weight_gb_s": 15.4}}
    results = {"bfloat16": {"1": cell}}
    t = bench.targets(results, "NVIDIA H200")["b1_bf16_bandwidth_fraction"]
    assert t["engine_variant"] == "engine_cudagraphs" and t["peak_tb_s"] == 4.8
    assert t["ratio"] == pytest.approx(102.4 / 4800)
    assert "b1_bf16_bandwidth_fraction" not in bench.targets(results)
