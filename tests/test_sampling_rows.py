"""Vectorised per-row sampling, one host read per step, and row isolation.

* Every row of a mixed batch (temperature, top-k, top-p, penalty, seed, greedy) samples exactly the
  tokens it samples alone.
* A decode step reads tokens, log-probs and error flags back to the host once.
* A row whose logits go bad ends alone with ``finish_reason == "error"``; the others are unharmed.
* Every value :class:`SamplingParams` accepts samples finite tokens; the values that broke the old
  arithmetic (``repetition_penalty=1e-38``, ``top_p=1e-46``) are rejected or handled.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from minimind.infer import GenerationEngine, SamplingParams
from minimind.infer.sampling import RowKnobs, derive_seed, sample_rows, seen_token_mask
from minimind.infer.scheduler import Request, TokenEvent
from tests.test_generation import reference_greedy, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

MIXED = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.7, top_k=5, top_p=1.0, seed=1),
    SamplingParams(temperature=1.3, top_k=0, top_p=0.6, repetition_penalty=1.5, seed=2),
    SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=3),
    SamplingParams(temperature=2.0, top_k=40, top_p=0.9, repetition_penalty=0.7, seed=4),
    SamplingParams(greedy=True, temperature=1.0, repetition_penalty=2.0),
]


def _prompt(seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (length,), generator=g).tolist()


def test_each_row_of_a_mixed_batch_samples_what_it_samples_alone() -> None:
    """Six rows with different settings over 8 steps: the batch's tokens equal each row run alone
    (rows' random streams are keyed by their own seed and step, not by batch position or k_max)."""
    torch.manual_seed(0)
    vocab, steps = 120, 8
    logits = torch.randn(steps, len(MIXED), vocab) * 2.5
    history = torch.randint(0, vocab, (len(MIXED), 5))
    seeds = [derive_seed(p.seed, 0) if p.seed is not None else None for p in MIXED]

    def run(rows: list[int]) -> list[list[int]]:
        knobs = RowKnobs.build([MIXED[i] for i in rows], vocab, seeds=[seeds[i] for i in rows])
        seen = seen_token_mask(history[rows], vocab)
        out = []
        for t in range(steps):
            tok = sample_rows(logits[t, rows], knobs, seen).tokens
            seen[torch.arange(len(rows)), tok] = True
            out.append(tok.tolist())
        return [list(col) for col in zip(*out)]

    batch = run(list(range(len(MIXED))))
    for i in range(len(MIXED)):
        assert batch[i] == run([i])[0], f"row {i} ({MIXED[i]}) changed in company"
    assert batch[0] == logits[:, 0].argmax(-1).tolist()
    assert len({tuple(r) for r in batch[1:5]}) == 4


def test_mixed_engine_batch_equals_solo_runs() -> None:
    """The same through the engine: requests with every setting (n = 2 for one) decode together and
    each sample equals its solo run; greedy ones equal a cache-free recomputation."""
    model = tiny_model()
    prompts = [_prompt(10 + i, 3 + 2 * i) for i in range(len(MIXED))]
    params = [SamplingParams(**{**p.__dict__, "max_new_tokens": 9, "stop_token_ids": ()}) for p in MIXED]

    def run(pairs: list[tuple[list[int], SamplingParams, int]]) -> list[list[list[int]]]:
        engine = GenerationEngine(model, num_slots=8)
        reqs = [Request(p, s, n=n, track_text=False) for p, s, n in pairs]
        for r in reqs:
            engine.scheduler.add(r)
        engine.run(reqs)
        return [[res.token_ids for res in r.results] for r in reqs]

    ns = [1, 2, 1, 1, 1, 1]
    together = run(list(zip(prompts, params, ns)))
    for i, (p, s, n) in enumerate(zip(prompts, params, ns)):
        assert together[i] == run([(p, s, n)])[0], f"request {i} changed in company"
    assert together[0][0] == reference_greedy(model, prompts[0], 9)
    assert together[5][0] == reference_greedy(model, prompts[5], 9, penalty=2.0)


def test_one_host_read_per_decode_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each decode step (model forward, sampling, log-probs, bookkeeping) reads device data back to
    the host exactly once.  The old code read tokens and log-probs separately and, for seeded rows,
    made one ``int()`` per row."""
    engine = GenerationEngine(tiny_model(), num_slots=4)
    reads: Counter[str] = Counter()
    counting = False
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            if counting:
                reads[_name] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    per_step = []
    real_decode = engine.scheduler._decode

    def decode() -> None:
        nonlocal counting
        reads.clear()
        counting = True
        try:
            real_decode()
        finally:
            counting = False
        per_step.append(dict(reads))

    monkeypatch.setattr(engine.scheduler, "_decode", decode)
    params = SamplingParams(max_new_tokens=6, temperature=0.8, top_k=10, top_p=0.9, repetition_penalty=1.2,
                            stop_token_ids=(), seed=1)
    engine.generate([_prompt(1, 4), _prompt(2, 6)], params, n=2, logprobs=True)
    assert len(per_step) == 5
    assert all(step == {"tolist": 1} for step in per_step), per_step


def _poison(engine: GenerationEngine, victim: Request, at: int, value: float, monkeypatch) -> None:
    """Make ``victim``'s logits ``value`` (in one vocabulary entry, or all for NaN) once it has
    generated ``at`` tokens; ``at == 0`` poisons its prefill."""
    sched = engine.scheduler
    real_decode, real_prefill = engine.decode_step, engine.prefill

    def spoil(logits: torch.Tensor, index: int) -> torch.Tensor:
        logits = logits.clone()  # an inference-mode tensor cannot be edited outside inference mode
        if math.isnan(value):
            logits[index] = value
        else:
            logits[index, 17] = value
        return logits

    def decode_step(count, tokens, positions, *rest):
        logits = real_decode(count, tokens, positions, *rest)
        for i, row in enumerate(sched.running[:count]):
            if row.request is victim and len(row.ids) == at:
                logits = spoil(logits, i)
        return logits

    def prefill(slots, prompts):
        logits = real_prefill(slots, prompts)
        for i, p in enumerate(prompts):  # one row per request, in admission order
            if at == 0 and list(p) == victim.prompt_ids:
                logits = spoil(logits, i)
        return logits

    monkeypatch.setattr(engine, "decode_step", decode_step)
    monkeypatch.setattr(engine, "prefill", prefill)


@pytest.mark.parametrize(("at", "value"), [(3, float("nan")), (2, float("inf")), (0, float("nan"))])
def test_a_row_with_bad_logits_ends_alone(at: int, value: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """One row's logits turn NaN/inf mid-decode (or at prefill): it ends with ``"error"`` and a
    message after the tokens it had, while a seeded sampled request and a greedy one beside it get
    exactly their solo tokens.  The old code failed the whole step (multinomial raised)."""
    model = tiny_model()
    victim_p, hot_p, cold_p = _prompt(20, 5), _prompt(21, 7), _prompt(22, 3)
    hot = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0, stop_token_ids=(), seed=9)
    cold = SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=())
    victim_params = SamplingParams(max_new_tokens=8, temperature=0.9, top_k=0, top_p=0.95, stop_token_ids=(),
                                   seed=5)
    solo_hot = GenerationEngine(model).generate([hot_p], hot, logprobs=True)[0]
    engine = GenerationEngine(model, num_slots=4)
    events: list[TokenEvent] = []
    victim = Request(victim_p, victim_params, logprobs=True, track_text=False, on_event=events.append)
    others = [Request(hot_p, hot, logprobs=True, track_text=False), Request(cold_p, cold, track_text=False)]
    _poison(engine, victim, at, value, monkeypatch)
    for r in (others[0], victim, others[1]):
        engine.scheduler.add(r)
    engine.run([victim, *others])
    bad = victim.results[0]
    assert bad.finish_reason == "error" and bad.error and "not finite" in bad.error
    assert len(bad.token_ids) == at and len(bad.logprobs) == at
    assert events[-1].finish_reason == "error" and events[-1].token_id == -1 and events[-1].logprob is None
    assert others[0].results[0].token_ids == solo_hot.token_ids
    assert others[0].results[0].logprobs == pytest.approx(solo_hot.logprobs, rel=1e-5, abs=1e-6)
    assert others[1].results[0].token_ids == reference_greedy(model, cold_p, 8)
    monkeypatch.undo()
    assert engine.generate([victim_p], victim_params)[0].finish_reason == "length"  # the engine is fine


@pytest.mark.parametrize("kw", [{"repetition_penalty": 1e-38}, {"repetition_penalty": 1e6},
                                {"repetition_penalty": float("nan")}, {"temperature": 1e30},
                                {"temperature": float("inf")}, {"top_p": float("nan")}, {"seed": 1.5}])
def test_hostile_params_fail_validation_clearly(kw: dict) -> None:
    name = next(iter(kw))
    with pytest.raises(ValueError, match=f"invalid sampling params: {name} must be"):
        SamplingParams(**kw)


@pytest.mark.parametrize("kw", [{"top_p": 1e-46}, {"top_p": 1e-46, "temperature": 100.0},
                                {"temperature": 1.1e-5, "repetition_penalty": 0.01},
                                {"temperature": 100.0, "repetition_penalty": 100.0, "top_k": 1},
                                {"temperature": 100.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 0.01},
                                {"seed": -(2 ** 63)}, {"seed": 2 ** 90}])
def test_extreme_accepted_params_sample_finite_tokens(kw: dict) -> None:
    """Every accepted extreme samples real tokens beside a normal request, which stays unharmed.
    ``top_p=1e-46`` is 0 in float32; the most likely token stays in the nucleus, so it is greedy
    (on the old code every token was dropped and the softmax was NaN)."""
    model = tiny_model()
    prompt, other_p = _prompt(30, 6), _prompt(31, 4)
    params = SamplingParams(**{"max_new_tokens": 6, "stop_token_ids": (), **kw})
    other = SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=())
    ok = GenerationEngine(model).generate([other_p], other)[0]
    engine = GenerationEngine(model, num_slots=2)
    reqs = [Request(prompt, params, logprobs=True, track_text=False), Request(other_p, other, track_text=False)]
    for r in reqs:
        engine.scheduler.add(r)
    engine.run(reqs)
    res = reqs[0].results[0]
    assert res.finish_reason == "length" and res.error is None
    assert all(0 <= t < 300 for t in res.token_ids)
    assert all(math.isfinite(lp) and lp <= 0 for lp in res.logprobs)
    assert reqs[1].results[0].token_ids == ok.token_ids
    if kw.get("top_p") == 1e-46 and "temperature" not in kw:
        assert res.token_ids == reference_greedy(model, prompt, 6)
