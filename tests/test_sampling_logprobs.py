"""Log-probs are of the distribution actually sampled: log_softmax(z' / T), z' the penalised logits.

Two checks: the engine's log-probs equal a plain training forward's ``log_softmax(logits / T)`` at
the sampled tokens, and the empirical frequencies of many first-token draws match ``exp(logprob)``.
"""

from __future__ import annotations

import math

import pytest
import torch

from minimind.infer import GenerationEngine, SamplingParams
from minimind.infer.sampling import (
    RowKnobs,
    apply_repetition_penalty,
    derive_seed,
    sample_rows,
    seen_token_mask,
)
from tests.test_generation import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _prompt(seed: int, length: int, vocab: int = 300) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=g).tolist()


def test_engine_logprobs_equal_a_training_forward_at_temperature() -> None:
    """What an RL trainer computes (``log_softmax(model(ids).logits / T)`` gathered at the sampled
    tokens, one full forward) equals what the engine reported while sampling, at T = 0.7.  On the old
    code the engine reported T = 1 log-probs, off by far more than the tolerance."""
    model = tiny_model()
    temp = 0.7
    params = SamplingParams(max_new_tokens=12, temperature=temp, top_k=0, top_p=1.0, stop_token_ids=(), seed=4)
    prompts = [_prompt(1, 5), _prompt(2, 11), _prompt(3, 3)]
    results = GenerationEngine(model).generate(prompts, params, n=2, logprobs=True)
    for k, res in enumerate(results):
        prompt = prompts[k // 2]
        ids = torch.tensor([prompt + res.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits.float() / temp, dim=-1)[0]
        steps = torch.arange(len(res.token_ids)) + len(prompt) - 1
        want = logp[steps, torch.tensor(res.token_ids)]
        torch.testing.assert_close(torch.tensor(res.logprobs), want, rtol=1e-5, atol=2e-5)
        untempered = torch.log_softmax(model(ids).logits.float(), dim=-1)[0][steps, torch.tensor(res.token_ids)]
        assert (untempered - want).abs().max() > 1e-2, "T = 0.7 must change the log-probs measurably"


def test_greedy_rows_report_untempered_logprobs_and_penalty_counts() -> None:
    """Greedy rows report T = 1 log-probs; the repetition penalty is part of the sampled distribution
    and therefore of the reported log-prob; top-k/top-p are not (tempered full-support log-prob)."""
    torch.manual_seed(0)
    logits = torch.randn(3, 40) * 3
    seen = seen_token_mask(torch.randint(0, 40, (3, 6)), 40)
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.5),
              SamplingParams(temperature=0.6, top_k=5, top_p=0.8, repetition_penalty=1.5, seed=1),
              SamplingParams(temperature=2.0, top_k=0, top_p=1.0, repetition_penalty=1.5, seed=2)]
    knobs = RowKnobs.build(params, 40, seeds=[None, 11, 12])
    out = sample_rows(logits, knobs, seen, logprobs=True)
    z = apply_repetition_penalty(logits, seen, 1.5)
    temps = torch.tensor([1.0, 0.6, 2.0]).unsqueeze(-1)
    want = torch.log_softmax(z / temps, dim=-1).gather(-1, out.tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out.logprobs, want, rtol=1e-5, atol=1e-6)
    assert int(out.tokens[0]) == int(z[0].argmax())


def _binomial_outliers(counts: torch.Tensor, probs: torch.Tensor, draws: int, sigmas: float = 4.5) -> list[int]:
    """Tokens whose count lies more than ``sigmas`` standard deviations (plus one draw of slack)
    from ``draws * p``; with ~16 tokens a 4.5-sigma bound gives a false alarm < 1e-4."""
    mean = draws * probs
    std = (draws * probs * (1 - probs)).sqrt()
    return ((counts - mean).abs() > sigmas * std + 1).nonzero().flatten().tolist()


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_sample_frequencies_match_reported_logprobs(penalty: float) -> None:
    """20k first-token draws of a 16-token model at T = 0.7 (with and without a repetition penalty):
    each token's frequency matches exp(reported log-prob) within binomial error, and the check has
    teeth: the untempered distribution fails it."""
    model = tiny_model(vocab_size=16, seed=3)
    prompt = [5, 9, 3, 9]
    draws, temp = 20000, 0.7
    engine = GenerationEngine(model, max_batch_len=8)
    params = SamplingParams(max_new_tokens=1, temperature=temp, top_k=0, top_p=1.0,
                            repetition_penalty=penalty, stop_token_ids=(), seed=7)
    results = engine.generate([prompt], params, n=draws, logprobs=True)
    tokens = torch.tensor([r.token_ids[0] for r in results])
    reported = {}
    for r in results:
        reported.setdefault(r.token_ids[0], r.logprobs[0])
    with torch.no_grad():
        z = model(torch.tensor([prompt])).logits[0, -1].float()
    z = apply_repetition_penalty(z.unsqueeze(0), seen_token_mask(torch.tensor([prompt]), 16), penalty)[0]
    probs = torch.softmax(z / temp, dim=-1)
    for tok, lp in reported.items():  # the engine's own numbers for every token it drew
        assert math.exp(lp) == pytest.approx(float(probs[tok]), rel=1e-4, abs=1e-7)
    assert probs.max() < 0.8 and (probs > 0.02).sum() >= 3, "the test needs a spread distribution"
    counts = torch.bincount(tokens, minlength=16).double()
    assert _binomial_outliers(counts, probs.double(), draws) == []
    untempered = torch.softmax(z, dim=-1).double()
    assert _binomial_outliers(counts, untempered, draws) != []


def test_truncated_draws_follow_the_renormalised_nucleus() -> None:
    """Top-k then top-p at T = 0.8, 40k rows with their own counter-based seeds: frequencies match the
    naive renormalised nucleus (computed here with a Python loop), and dropped tokens never appear."""
    logits = torch.tensor([2.0, 1.5, 1.4, 0.9, 0.3, 0.2, 0.1, -0.5, 3.0, -1.0, 0.0, 1.0])
    temp, top_k, top_p, draws = 0.8, 6, 0.8, 40000
    probs = torch.softmax(logits / temp, dim=-1).tolist()
    order = sorted(range(12), key=lambda v: -probs[v])[:top_k]
    mass_k = sum(probs[v] for v in order)
    nucleus, acc = [], 0.0
    for v in order:
        nucleus.append(v)
        acc += probs[v] / mass_k
        if acc >= top_p:
            break
    want = torch.zeros(12, dtype=torch.float64)
    for v in nucleus:
        want[v] = probs[v] / sum(probs[u] for u in nucleus)
    assert 3 <= len(nucleus) < top_k, "the test needs top-p to cut inside top-k"
    params = SamplingParams(temperature=temp, top_k=top_k, top_p=top_p)
    knobs = RowKnobs.build([params] * draws, 12, seeds=[derive_seed(0, i) for i in range(draws)])
    tokens = sample_rows(logits.expand(draws, 12), knobs).tokens
    counts = torch.bincount(tokens, minlength=12).double()
    assert set(tokens.unique().tolist()) == set(nucleus)
    assert _binomial_outliers(counts, want, draws) == []
