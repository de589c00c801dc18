"""The slot engine: continuous batching equals recomputation, shared prefills, log-probs, per-row
settings, weight refresh, and the background service."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from minimind.infer import GenerationEngine, SamplingParams
from minimind.infer.scheduler import Request
from minimind.infer.service import EngineService
from tests.test_generation import FakeTokenizer, reference_greedy, tiny_model

GREEDY = {"temperature": 0.0, "stop_token_ids": ()}


def _prompt(seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (length,), generator=g).tolist()


def test_staggered_arrivals_and_departures_equal_recomputation() -> None:
    """Requests join while others decode and leave at different steps (slots are refilled and
    moved); every greedy output equals a cache-free recomputation of its own prompt."""
    model = tiny_model()
    engine = GenerationEngine(model, num_slots=3)
    sched = engine.scheduler
    specs = [(_prompt(i, 3 + 5 * i), 4 + 3 * (i % 4)) for i in range(7)]  # (prompt, new tokens)
    reqs = [Request(p, SamplingParams(max_new_tokens=k, **GREEDY), track_text=False) for p, k in specs]
    arrivals = {0: [0, 1], 2: [2], 3: [3, 4], 7: [5], 9: [6]}  # step -> requests joining then
    step, moved = 0, 0
    orig_move = engine.move_slot

    def counting_move(*a, **k):
        nonlocal moved
        moved += 1
        orig_move(*a, **k)

    engine.move_slot = counting_move  # type: ignore[method-assign]
    while step < 200 and not (all(r.done for r in reqs) and step > max(arrivals)):
        for i in arrivals.get(step, []):
            sched.add(reqs[i])
        sched.step()
        assert len(sched.running) <= 3
        step += 1
    assert moved > 0, "no slot was ever compacted: the test does not exercise departures"
    for (prompt, k), req in zip(specs, reqs):
        assert req.results[0].token_ids == reference_greedy(model, prompt, k)


def test_n_samples_share_one_prefill_and_differ_afterwards() -> None:
    model = tiny_model()
    engine = GenerationEngine(model, num_slots=4)
    calls = []
    real = engine.prefill
    engine.prefill = lambda slots, prompts: calls.append(len(prompts)) or real(slots, prompts)  # type: ignore
    prompt = _prompt(1, 12)
    params = SamplingParams(max_new_tokens=6, temperature=1.5, top_k=0, top_p=1.0, stop_token_ids=(), seed=3)
    results = engine.generate([prompt], params, n=4)
    assert calls == [1], "the prompt must be prefilled once for all n samples"
    k = engine.cache.k  # [layers, slots, heads, pos, d]
    for s in range(1, 4):
        torch.testing.assert_close(k[:, s, :, :12], k[:, 0, :, :12], rtol=0, atol=0)
    assert len({tuple(r.token_ids) for r in results}) > 1, "seeded samples draw from their own streams"
    again = GenerationEngine(model, num_slots=4).generate([prompt], params, n=4)
    assert [r.token_ids for r in again] == [r.token_ids for r in results]


def test_logprobs_equal_log_softmax_of_a_full_forward() -> None:
    """Log-probs are of the tempered distribution (logits / T) over the full vocabulary, also when
    top-k/top-p truncate what is sampled (see GenerationResult)."""
    model = tiny_model()
    engine = GenerationEngine(model)
    prompts = [_prompt(2, 5), _prompt(3, 9)]
    params = SamplingParams(max_new_tokens=7, temperature=0.9, top_k=20, top_p=0.9, stop_token_ids=())
    for prompt, res in zip(prompts, engine.generate(prompts, params, logprobs=True)):
        ids = torch.tensor([prompt + res.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits.float() / 0.9, dim=-1)[0]
        want = [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(res.token_ids)]
        assert res.logprobs == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_per_row_settings_do_not_leak_between_slots() -> None:
    """A greedy request decodes next to hot, penalised and seeded requests: its tokens equal its
    solo run, and the seeded request draws the same tokens alone and in company."""
    model = tiny_model()
    greedy_prompt, hot_prompt, seeded_prompt = _prompt(4, 6), _prompt(5, 10), _prompt(6, 4)
    greedy = SamplingParams(max_new_tokens=10, **GREEDY)
    hot = SamplingParams(max_new_tokens=10, temperature=5.0, top_k=0, top_p=1.0,
                         repetition_penalty=3.0, stop_token_ids=(), seed=5)
    seeded = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=40, top_p=0.95, seed=11,
                            stop_token_ids=())

    def run(*pairs):
        engine = GenerationEngine(model, num_slots=4)
        reqs = [Request(p, s, track_text=False) for p, s in pairs]
        for r in reqs:
            engine.scheduler.add(r)
        engine.run(reqs)
        return [r.results[0].token_ids for r in reqs]

    solo_greedy, = run((greedy_prompt, greedy))
    solo_seeded, = run((seeded_prompt, seeded))
    solo_hot, = run((hot_prompt, hot))
    mixed = run((hot_prompt, hot), (greedy_prompt, greedy), (seeded_prompt, seeded))
    assert mixed[1] == solo_greedy == reference_greedy(model, greedy_prompt, 10)
    assert mixed[2] == solo_seeded
    assert mixed[0] == solo_hot


def test_stop_strings_are_per_row() -> None:
    model = tiny_model()
    engine = GenerationEngine(model, tokenizer=FakeTokenizer())
    prompt = _prompt(7, 5)
    free = engine.generate([prompt], SamplingParams(max_new_tokens=8, **GREEDY))[0]
    stop = f"[{free.token_ids[2]}]"
    reqs = [Request(prompt, SamplingParams(max_new_tokens=8, stop_strings=(stop,), **GREEDY)),
            Request(prompt, SamplingParams(max_new_tokens=8, **GREEDY))]
    for r in reqs:
        engine.scheduler.add(r)
    engine.run(reqs)
    cut, full = reqs[0].results[0], reqs[1].results[0]
    assert cut.finish_reason == "stop" and cut.stop == stop and stop not in cut.text
    assert full.token_ids == free.token_ids and full.finish_reason == "length"


def test_bf16_inference_copy_and_refresh() -> None:
    model = tiny_model()
    engine = GenerationEngine(model, dtype=torch.bfloat16)
    assert engine.model is not model
    assert all(p.dtype == torch.bfloat16 for p in engine.model.parameters())
    assert engine.model.model.rope_cos.dtype == torch.float32
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    before = engine.model.lm_head.weight.clone()
    engine.refresh_weights()
    assert not torch.equal(before, engine.model.lm_head.weight)
    torch.testing.assert_close(engine.model.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))
    out = engine.generate([_prompt(8, 6)], SamplingParams(max_new_tokens=4, **GREEDY))[0]
    assert len(out.token_ids) == 4
    fp32 = GenerationEngine(model)  # same dtype: the caller's very tensors, nothing to refresh
    assert all(a is b for a, b in zip(fp32.model.parameters(), model.parameters()))
    assert all(a is b for a, b in zip(fp32.model.buffers(), model.buffers()))
    # the caller's model keeps its own layers
    assert type(model.lm_head) is torch.nn.Linear and fp32.model.lm_head is not model.lm_head


def test_closing_a_stream_frees_its_slot() -> None:
    engine = GenerationEngine(tiny_model(), tokenizer=FakeTokenizer(), num_slots=1)
    stream = engine.stream(_prompt(9, 4), SamplingParams(max_new_tokens=50, **GREEDY))
    next(stream)
    stream.close()
    assert not engine.scheduler.has_work
    res = engine.generate([_prompt(9, 4)], SamplingParams(max_new_tokens=3, **GREEDY))[0]
    assert res.completion_tokens == 3


def test_service_decodes_concurrent_clients_together_and_cancels() -> None:
    model = tiny_model()
    engine = GenerationEngine(model, tokenizer=FakeTokenizer(), num_slots=4)
    service = EngineService(engine)
    try:
        prompts = [_prompt(10 + i, 3 + i) for i in range(4)]
        outs: dict[int, list[int]] = {}
        peak = []

        def client(i: int) -> None:
            h = service.submit(prompts[i], SamplingParams(max_new_tokens=12, **GREEDY))
            toks = []
            for ev in h:
                toks.append(ev.token_id)
                peak.append(service.active_rows)
            outs[i] = toks

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        for i, p in enumerate(prompts):
            assert outs[i] == reference_greedy(model, p, 12)
        assert max(peak) > 1, "concurrent requests should share decode steps"

        async def cancel_midway() -> tuple[int, int]:
            h = service.submit(prompts[0], SamplingParams(max_new_tokens=200, **GREEDY))
            seen = 0
            async for _ in h:
                seen += 1
                if seen == 3:
                    h.cancel()
            return seen, h.request.n

        seen, _ = asyncio.run(cancel_midway())
        assert 3 <= seen < 200
        for _ in range(100):
            if service.active_rows == 0 and not engine.scheduler.has_work:
                break
            threading.Event().wait(0.02)
        assert service.active_rows == 0
        with pytest.raises(ValueError, match="at most"):
            service.submit(list(range(3, 300)), SamplingParams())
    finally:
        service.close()


@pytest.mark.slow
def test_compiled_decode_equals_recomputation() -> None:
    """``compile=True`` decodes over the cache's whole length, recompiling once per new row count or
    cache size: requests joining and leaving still get exactly their greedy recomputation."""
    model = tiny_model()
    engine = GenerationEngine(model, compile=True, num_slots=4)
    prompts = [_prompt(20 + i, 3 + 4 * i) for i in range(5)]
    results = engine.generate(prompts[:3], SamplingParams(max_new_tokens=9, **GREEDY))
    results += engine.generate(prompts[3:], SamplingParams(max_new_tokens=14, **GREEDY))
    for prompt, res in zip(prompts, results):
        assert res.token_ids == reference_greedy(model, prompt, len(res.token_ids))
    assert [len(r.token_ids) for r in results] == [9, 9, 9, 14, 14]
