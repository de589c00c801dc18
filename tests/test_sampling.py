"""Sampling: each filter keeps exactly what it should, in the documented order."""

from __future__ import annotations

import pytest
import torch

from minimind.infer.sampling import (SamplingParams, apply_repetition_penalty, sample_next,
                                     seen_token_mask, top_k_filter, top_p_filter)


def _params(**kw) -> SamplingParams:
    base = dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    base.update(kw)
    return SamplingParams(**base)


def _draw(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    """n draws per row, as one batched call over a tiled batch."""
    g = torch.Generator().manual_seed(seed)
    tiled = logits.repeat_interleave(n, dim=0)
    return sample_next(tiled, params, generator=g).view(logits.shape[0], n)


def test_top_k_never_samples_outside_top_k() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    k = 5
    draws = _draw(logits, _params(top_k=k), 2000)
    top = torch.topk(logits, k, dim=-1).indices
    for row in range(3):
        got = set(draws[row].tolist())
        assert got <= set(top[row].tolist())
        assert len(got) == k  # with flat-ish logits all k candidates show up in 2000 draws


def test_top_k_filter_keeps_exactly_k_even_with_ties() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])
    kept = torch.isfinite(top_k_filter(logits, 2))
    assert int(kept.sum()) == 2
    assert not kept[0, 0] and not kept[0, 4]


def test_top_p_keeps_the_minimal_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    # 0.5 < 0.7 -> add 0.3 -> 0.8 >= 0.7: exactly the first two survive.
    kept = torch.isfinite(top_p_filter(logits, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    # Exactly reaching the threshold stops there (0.5 + 0.3 = 0.8).
    assert torch.isfinite(top_p_filter(logits, 0.8)).tolist() == [[True, True, False, False]]
    # A tiny top_p still keeps the single most likely token.
    assert torch.isfinite(top_p_filter(logits, 1e-6)).tolist() == [[True, False, False, False]]
    # Order of the vocabulary does not matter.
    perm = torch.tensor([2, 0, 3, 1])
    kept_perm = torch.isfinite(top_p_filter(logits[:, perm], 0.7))
    assert kept_perm.tolist() == [[False, True, False, True]]
    draws = _draw(logits, _params(top_p=0.7), 1000)
    assert set(draws[0].tolist()) == {0, 1}


def test_temperature_zero_is_argmax_without_nan() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 30) * 10
    params = SamplingParams(temperature=0.0)
    assert params.is_greedy
    out = sample_next(logits, params)
    assert out.tolist() == logits.argmax(-1).tolist()
    # Extreme logits must not produce NaN either.
    logits[0, 7] = 1e30
    assert sample_next(logits, params)[0].item() == 7
    greedy_flag = sample_next(logits, SamplingParams(greedy=True, temperature=0.9))
    assert greedy_flag.tolist() == logits.argmax(-1).tolist()


def test_repetition_penalty_positive_and_negative() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = seen_token_mask(torch.tensor([[0, 1]]), 4)
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]  # both seen tokens became less likely
    # Penalty moves the argmax away from a seen token.
    greedy = SamplingParams(temperature=0.0, repetition_penalty=4.0)
    assert sample_next(torch.tensor([[2.0, 1.0]]), greedy, seen=torch.tensor([[True, False]])).item() == 1


def test_penalty_and_temperature_compose_into_the_sampled_distribution() -> None:
    # Seen token 0: raw 3.0 -> penalised 1.0 -> tempered 2.0; the empirical frequency must match.
    logits = torch.tensor([[3.0, 0.0, -30.0]])
    seen = torch.tensor([[True, False, False]])
    params = _params(temperature=0.5, repetition_penalty=3.0)
    g = torch.Generator().manual_seed(3)
    draws = sample_next(logits.expand(4000, 3), params, seen=seen.expand(4000, 3), generator=g)
    frac0 = (draws == 0).float().mean().item()
    p0 = torch.softmax(torch.tensor([3.0 / 3.0, 0.0, -30.0]) / 0.5, dim=-1)[0].item()
    assert abs(frac0 - p0) < 0.03
    # Without the penalty token 0 would dominate (p ~ 0.998), so the check above has teeth.
    assert torch.softmax(logits / 0.5, dim=-1)[0, 0].item() > 0.99


def test_seen_mask_ignores_padding() -> None:
    ids = torch.tensor([[5, 0, 0], [0, 3, 0]])
    valid = torch.tensor([[True, False, False], [True, True, False]])
    seen = seen_token_mask(ids, 8, valid)
    assert seen[0].nonzero().flatten().tolist() == [5]
    assert seen[1].nonzero().flatten().tolist() == [0, 3]


def test_same_seed_same_samples() -> None:
    torch.manual_seed(2)
    logits = torch.randn(4, 100)
    params = _params(top_k=40, top_p=0.9)
    a = _draw(logits, params, 64, seed=123)
    b = _draw(logits, params, 64, seed=123)
    c = _draw(logits, params, 64, seed=124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("kw", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5),
                                dict(max_new_tokens=0), dict(top_k=-1),
                                dict(repetition_penalty=0.0), dict(stop_strings=("",)),
                                dict(temperature=float("nan"))])
def test_invalid_params_raise(kw: dict) -> None:
    with pytest.raises(ValueError, match="invalid sampling params"):
        SamplingParams(**kw)


def test_params_normalise_sequences() -> None:
    p = SamplingParams(stop_token_ids=[2, 3], stop_strings="END")
    assert p.stop_token_ids == (2, 3) and p.stop_strings == ("END",)
