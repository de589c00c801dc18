"""``GenerationEngine(multi_step=k)``: ``k`` decode steps per host read give the tokens of single steps.

Each step feeds the previous step's samples straight from the device; the host reads ``k`` steps of
tokens at once and drops what a row sampled after it stopped.  Seeded sampling draws from
counter-based streams, so every token, log-prob, stop and text must equal the single-step engine's.
"""

from __future__ import annotations

import pytest
import torch

from minimind.infer import GenerationEngine, SamplingParams
from minimind.infer.scheduler import Request
from tests.test_generation import FakeTokenizer, tiny_model


def _prompt(seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (length,), generator=g).tolist()


def _requests(stop_token: int, stop_string: str) -> list[tuple[int, Request]]:
    """(arrival step, request): seeded hot rows with a penalty, greedy rows, truncated sampling, a
    stop token and a stop string that fire mid-run, budgets that end at different steps, n > 1."""
    hot = {"temperature": 1.3, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.5}
    specs = [
        (0, _prompt(1, 7), SamplingParams(max_new_tokens=23, seed=4, stop_token_ids=(stop_token,), **hot), 3),
        (0, _prompt(2, 4), SamplingParams(max_new_tokens=9, temperature=0.0, stop_token_ids=()), 1),
        (2, _prompt(3, 11), SamplingParams(max_new_tokens=30, temperature=0.8, top_k=20, top_p=0.9, seed=9,
                                           stop_token_ids=(), stop_strings=(stop_string,)), 2),
        (5, _prompt(4, 5), SamplingParams(max_new_tokens=17, seed=1, stop_token_ids=(stop_token,), **hot), 1),
        (6, _prompt(5, 3), SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=()), 1),
    ]
    return [(at, Request(p, params, n=n, logprobs=True)) for at, p, params, n in specs]


def _run(model: torch.nn.Module, multi_step: int, stop_token: int, stop_string: str):
    engine = GenerationEngine(model, tokenizer=FakeTokenizer(), num_slots=5, multi_step=multi_step)
    calls = {"decode_step": 0, "reads": 0}
    real_step, real_decode = engine.decode_step, engine.scheduler._decode

    def counting_step(*a, **k):
        calls["decode_step"] += 1
        return real_step(*a, **k)

    def counting_decode():
        calls["reads"] += 1
        real_decode()

    engine.decode_step = counting_step  # type: ignore[method-assign]
    engine.scheduler._decode = counting_decode  # type: ignore[method-assign]
    timed = _requests(stop_token, stop_string)
    events: dict[int, list[tuple[int, int]]] = {}
    for _, req in timed:
        seen = events.setdefault(id(req), [])
        req.on_event = lambda ev, seen=seen: seen.append((ev.index, ev.token_id))
    step = 0
    while not all(r.done for _, r in timed):
        for at, req in timed:
            if at == step:
                engine.scheduler.add(req)
        engine.scheduler.step()
        step += 1
    results = [[(r.token_ids, r.logprobs, r.finish_reason, r.stop, r.text) for r in req.results]
               for _, req in timed]
    streamed = [[[t for i, t in events[id(req)] if i == j] for j in range(req.n)] for _, req in timed]
    return results, streamed, calls


def test_multi_step_equals_single_steps_and_reads_back_once_per_k_steps() -> None:
    model = tiny_model()
    free = GenerationEngine(model).generate([_prompt(1, 7)], SamplingParams(
        max_new_tokens=23, seed=4, temperature=1.3, top_k=0, top_p=1.0, repetition_penalty=1.5,
        stop_token_ids=()))[0]
    stop_token = free.token_ids[6]  # sample 0 of the first request draws it: its stop fires mid-run
    greedy3 = GenerationEngine(model).generate([_prompt(3, 11)], SamplingParams(
        max_new_tokens=30, temperature=0.8, top_k=20, top_p=0.9, seed=9, stop_token_ids=()))[0]
    stop_string = f"[{greedy3.token_ids[12]}]"
    one, one_streamed, one_calls = _run(model, 1, stop_token, stop_string)
    five, five_streamed, five_calls = _run(model, 5, stop_token, stop_string)
    assert one[0][0][2:4] == ("stop", stop_token) and one[2][0][2:4] == ("stop", stop_string), \
        "a stop token and a stop string must end rows mid-run (tokens past them are discarded)"
    # Tokens, stops and texts exactly; log-probs to float32 rounding (a request that arrives at
    # another step shares its products with other rows, which may change the last bits).
    assert [[(ids, reason, stop, text) for ids, _, reason, stop, text in req] for req in five] == \
        [[(ids, reason, stop, text) for ids, _, reason, stop, text in req] for req in one]
    for req5, req1 in zip(five, one):
        for res5, res1 in zip(req5, req1):
            assert res5[1] == pytest.approx(res1[1], rel=1e-5, abs=1e-5)
    assert five_streamed == one_streamed
    for req, streamed in zip(five, five_streamed):  # events carry exactly the kept tokens
        assert [ids for ids, *_ in req] == streamed
    assert one_calls["decode_step"] == one_calls["reads"]
    assert five_calls["decode_step"] > 2.5 * five_calls["reads"], five_calls


def test_multi_step_stops_at_the_budget_and_admits_waiting_requests_at_once() -> None:
    """No step past a row's budget (its cache holds prompt + budget positions), and a request that
    fits the free slots is admitted after one step rather than ``k``."""
    model = tiny_model(max_position_embeddings=64)
    engine = GenerationEngine(model, num_slots=2, multi_step=8)
    sched = engine.scheduler
    first = Request(_prompt(1, 50), SamplingParams(max_new_tokens=13, temperature=0.0, stop_token_ids=()),
                    track_text=False)
    sched.add(first)
    sched.step()  # prefill, first token
    sched.step()
    assert len(first.rows[0].ids) == 1 + 8
    late = Request(_prompt(2, 5), SamplingParams(max_new_tokens=3, temperature=0.0, stop_token_ids=()),
                   track_text=False)
    sched.add(late)
    sched.step()  # one step, then the late request is admitted
    assert len(first.rows[0].ids) == 10 and len(late.rows) == 1
    engine.run([first, late])
    assert len(first.results[0].token_ids) == 13 and len(late.results[0].token_ids) == 3
    assert engine.cache.max_len <= 64


def test_multi_step_must_be_positive() -> None:
    with pytest.raises(ValueError, match="multi_step"):
        GenerationEngine(tiny_model(), multi_step=0)
    assert GenerationEngine(tiny_model()).multi_step == 1  # one row's tokens per read on a CPU
