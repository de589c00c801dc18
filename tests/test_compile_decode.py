"""The engine's decode step compiles as one graph that writes the KV cache in place.

``GenerationEngine(compile=True)`` hands the decode forward of the engine's own modules (float
``GemvLinear`` views, ``Int8Linear``) to ``torch.compile``.  Two things made that slower than eager
before: a call that returns a Python int (``torch.get_num_threads``) split the step into a graph per
layer, and the cache write went through a view of the whole ``[layers, slots, heads, len, d]`` cache,
which functionalization turns into a rebuilt copy of the whole cache for every layer of every step.
These tests trace the step through AOTAutograd (no inductor code generation, seconds on a CPU) with
``fullgraph=True`` and read the graph it produced.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

from minimind.infer import GenerationEngine, SamplingParams
from minimind.infer.engine import decode_and_sample_step
from minimind.infer.sampling import RowKnobs
from minimind.infer.scheduler import Request
from minimind.model.masks import cache_attention_mask
from tests.test_generation import reference_greedy, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

SCATTERS = ("select_scatter", "slice_scatter", "as_strided_scatter")


def _traced_decode(engine: GenerationEngine, rows: int, positions: list[int], tokens: list[int]):
    """One decode step of ``engine``'s model compiled with ``fullgraph=True``: its logits, the
    eager logits of the same step on a copy of the cache, and the traced forward graph's ops."""
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, _inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=record, bw_compiler=record)
    compiled = torch.compile(engine.model, fullgraph=True, dynamic=False, backend=backend)
    tok = torch.tensor(tokens).view(rows, 1)
    pos = torch.tensor(positions).view(rows, 1)
    mask = cache_attention_mask(pos, engine.cache.max_len)
    k0, v0 = engine.cache.k.clone(), engine.cache.v.clone()
    with torch.inference_mode():
        got = compiled(tok, pos, mask, kv_cache=engine.cache.slots(slice(0, rows)), logits_to_keep=1).logits
        k1, v1 = engine.cache.k.clone(), engine.cache.v.clone()
        engine.cache.k.copy_(k0)
        engine.cache.v.copy_(v0)
        want = engine.model(tok, pos, mask, kv_cache=engine.cache.slots(slice(0, rows)), logits_to_keep=1).logits
    torch.testing.assert_close(engine.cache.k, k1, rtol=1e-5, atol=1e-6)  # the compiled step wrote the cache
    torch.testing.assert_close(engine.cache.v, v1, rtol=1e-5, atol=1e-6)
    ops = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    return got, want, ops


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_decode_step_is_one_graph_without_cache_copies(quantize) -> None:
    model = tiny_model()
    engine = GenerationEngine(model, dtype=torch.float32, quantize=quantize, num_slots=4)
    prompts = [[5, 9, 17, 33, 2], [7, 7, 8]]
    engine.prefill([0, 1], prompts)
    got, want, ops = _traced_decode(engine, 2, [len(p) for p in prompts], [11, 12])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert any("index_put" in op for op in ops), "the cache write is not in the graph"
    copies = [op for op in ops if any(s in op for s in SCATTERS)]
    assert not copies, f"the cache is rebuilt through view scatters: {copies}"


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_compiled_engine_greedy_equals_recomputation(quantize) -> None:
    """Inductor end to end: the compiled engine (the whole cache length; row counts 3, 2, 1 as
    rows finish) decodes the greedy tokens of a cache-free recomputation of its own weights."""
    torch._dynamo.reset()
    model = tiny_model()
    engine = GenerationEngine(model, dtype=torch.float32, quantize=quantize, compile=True, num_slots=4)
    prompts = [[5, 9, 17, 33, 2, 40], [7, 7, 8], [90, 91, 92, 93]]
    reference = engine.model if quantize else model  # int8: the engine's own (quantized) weights
    one = engine.generate(prompts[:1], SamplingParams(max_new_tokens=4, temperature=0.0, stop_token_ids=()))
    assert one[0].token_ids == reference_greedy(reference, prompts[0], 4)  # the first, specialised graph
    budgets = [9, 5, 2]  # rows leave at different steps: 3, then 2, then 1 row per step
    reqs = [Request(p, SamplingParams(max_new_tokens=k, temperature=0.0, stop_token_ids=()), track_text=False)
            for p, k in zip(prompts, budgets)]
    for r in reqs:
        engine.scheduler.add(r)
    engine.run(reqs)
    for prompt, k, req in zip(prompts, budgets, reqs):
        assert req.results[0].token_ids == reference_greedy(reference, prompt, k)


def test_compiled_decode_attends_over_the_used_length_in_buckets(monkeypatch) -> None:
    """A compiled engine attends over the used cache length rounded up to 64 positions, not over the
    whole allocated cache (a 2048-position cache for a few hundred tokens read 2048 keys per step),
    and still decodes the cache-free greedy tokens across a bucket boundary."""
    import minimind.infer.engine as engine_mod

    seen: list[int] = []
    real = engine_mod.cache_attention_mask
    monkeypatch.setattr(engine_mod, "cache_attention_mask", lambda pos, kv_len: seen.append(kv_len) or real(pos, kv_len))
    model = tiny_model(max_position_embeddings=2048)
    engine = GenerationEngine(model, dtype=torch.float32, compile=True, num_slots=2, max_batch_len=2048)
    engine._decode_call = torch.compile(engine.model, dynamic=None, backend="eager")  # dynamo only: seconds
    engine._sample_call = torch.compile(decode_and_sample_step, dynamic=None, backend="eager")
    engine.reserve(2, 2048)
    prompt = [5, 9, 17, 33, 2] * 11  # 55 tokens: decoding crosses position 64
    got = engine.generate([prompt], SamplingParams(max_new_tokens=30, temperature=0.0, stop_token_ids=()))
    assert got[0].token_ids == reference_greedy(model, prompt, 30)
    decode_lens = seen[-29:]  # one mask per decode step (prefill builds none)
    assert decode_lens[0] == 64 and decode_lens[-1] == 128 and engine.cache.max_len == 2048


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_decode_and_sampling_trace_as_one_graph_with_the_eager_draws(penalty: float) -> None:
    """A compiled CPU engine runs the step and its sampling (temperature, top-k / top-p, the
    counter-based draw of seeded rows, log-probs, the repetition penalty's seen-token update) as one
    graph: traced here with ``fullgraph=True`` (no graph break, nothing read back) through
    AOTAutograd without code generation, it must draw the eager path's tokens and log-probs."""
    model = tiny_model()
    engines = [GenerationEngine(model, dtype=torch.float32, num_slots=3) for _ in range(2)]
    prompts = [[5, 9, 17, 33, 2], [7, 7, 8], [40, 41]]
    params = [SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=1, repetition_penalty=penalty),
              SamplingParams(temperature=0.0, repetition_penalty=penalty),
              SamplingParams(temperature=1.3, top_p=0.8, seed=7, repetition_penalty=penalty)]
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, _inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    fused = torch.compile(decode_and_sample_step, fullgraph=True, dynamic=False,
                          backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    outs = []
    for engine, call in zip(engines, (fused, None)):
        outs.append(_decode_and_sample_six(engine, call, prompts, params))
    assert len(graphs) == 6  # one whole graph a step (static shapes; the attended length grows by one)
    torch.testing.assert_close(outs[0][:, :2], outs[1][:, :2], rtol=0, atol=0)  # tokens, error flags
    torch.testing.assert_close(outs[0][:, 2], outs[1][:, 2], rtol=1e-5, atol=1e-5)  # log-probs
    assert len(set(outs[0][:, 0, 0].tolist())) > 1  # the seeded row really samples


@torch.inference_mode()
def _decode_and_sample_six(engine: GenerationEngine, call, prompts: list[list[int]],
                           params: list[SamplingParams]) -> torch.Tensor:
    """Six decode-and-sample steps of three rows (the scheduler's calls), the outputs stacked."""
    engine.prefill([0, 1, 2], prompts)
    engine.mark_seen(0, prompts)
    knobs = RowKnobs.build(params, engine.model.config.vocab_size, seeds=[11, None, 12], steps=[0, 0, 0])
    engine._sample_call = call
    tok, pos, steps = torch.tensor([3, 4, 5]), torch.tensor([len(p) for p in prompts]), []
    for _ in range(6):
        seen = engine.seen[:3] if knobs.any_penalty else None
        out = engine.decode_and_sample(3, tok, pos, int(pos.max()), knobs, seen, logprobs=True)
        steps.append(out)
        tok, pos = out[0].long(), pos + 1
    return torch.stack(steps)


@pytest.mark.slow
def test_an_inductor_compiled_engine_draws_the_eager_engines_seeded_samples() -> None:
    """Inductor end to end: seeded top-k / top-p samples of the fused step equal the eager engine's
    (the logits differ by float32 rounding only; a uniform landing within that of a CDF boundary
    is a ~1e-4 event over these 90 draws)."""
    torch._dynamo.reset()
    model = tiny_model()
    prompts = [[5, 9, 17, 33, 2], [7, 7, 8], [40, 41]]
    params = SamplingParams(max_new_tokens=30, temperature=0.8, top_k=30, top_p=0.9, seed=3, stop_token_ids=())
    compiled = GenerationEngine(model, dtype=torch.float32, compile=True, num_slots=3)
    assert compiled._sample_call is not None
    got = compiled.generate(prompts, params)
    want = GenerationEngine(model, dtype=torch.float32, num_slots=3).generate(prompts, params)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert len(set(got[0].token_ids)) > 5  # really sampled
