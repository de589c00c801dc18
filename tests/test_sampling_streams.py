"""Independent random streams: each sample of each request draws from its own seeded stream.

The old engine gave row i of a request the seed ``seed + i``: seeds s and s + 1 shared streams
(row 1 of seed s was row 0 of seed s + 1), and requests with equal seeds continued identically.
"""

from __future__ import annotations

import pytest
import torch

from minimind.infer import GenerationEngine, SamplingParams
from minimind.infer.sampling import _GOLDEN, _mix64, counter_uniforms, derive_seed
from minimind.infer.scheduler import Request
from tests.test_generation import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

HOT = {"max_new_tokens": 12, "temperature": 1.5, "top_k": 0, "top_p": 1.0, "stop_token_ids": ()}


def _prompt(seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (length,), generator=g).tolist()


def _run(engine: GenerationEngine, *pairs: tuple[list[int], SamplingParams, int]) -> list[list[list[int]]]:
    """Run (prompt, params, n) requests together; token ids per request and sample."""
    reqs = [Request(p, s, n=n, track_text=False) for p, s, n in pairs]
    for r in reqs:
        engine.scheduler.add(r)
    engine.run(reqs)
    return [[res.token_ids for res in r.results] for r in reqs]


def test_mixer_is_splitmix64() -> None:
    """The reference outputs of splitmix64 seeded with 1234567 (Vigna's splitmix64.c)."""
    want = [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431,
            16408922859458223821]
    assert [_mix64(1234567 + n * _GOLDEN) for n in range(1, 6)] == want


def test_tensor_uniforms_are_splitmix64_outputs() -> None:
    """The int64 tensor version (wrapping multiply, logical shifts) gives splitmix64's outputs, also
    for negative seeds (where an arithmetic shift would differ): step t is output t + 1."""
    seeds = torch.tensor([1234567] * 5 + [-5, -(2 ** 63), 2 ** 62 + 3])
    steps = torch.tensor([0, 1, 2, 3, 4, 7, 1, 100])
    got = counter_uniforms(seeds, steps)
    mask = (1 << 64) - 1
    for b in range(len(seeds)):
        h = _mix64((int(seeds[b]) & mask) + (int(steps[b]) + 1) * _GOLDEN)
        assert float(got[b]) == (h >> 11) * 2.0 ** -53
    assert float(got[0]) == (6457827717110365317 >> 11) * 2.0 ** -53


def test_counter_uniforms_look_uniform() -> None:
    """100k uniforms of consecutive seeds and steps: decile counts within 5 sigma, all in [0, 1)."""
    seeds = torch.arange(100).repeat_interleave(1000)
    u = counter_uniforms(seeds, torch.arange(1000).repeat(100))
    assert 0 <= float(u.min()) and float(u.max()) < 1
    counts = torch.histc(u.float(), bins=10, min=0, max=1)
    expected = u.numel() / 10
    assert ((counts - expected).abs() < 5 * (expected * 0.9) ** 0.5).all()


def test_derive_seed_mixes_neighbours_apart() -> None:
    s = 12345
    values = {derive_seed(s, 1), derive_seed(s + 1, 0), derive_seed(s, 0), derive_seed(s),
              derive_seed(1, s), derive_seed(s, 0, 0)}
    assert len(values) == 6
    for v in values | {derive_seed(-1), derive_seed(2 ** 80, -(2 ** 70))}:
        assert 0 <= v < 2 ** 63
    assert derive_seed(s, 1) == derive_seed(s, 1)


def test_seeds_s_and_s_plus_1_are_not_shifted_copies() -> None:
    """Old code: sample 1 of seed s used seed s + 1, exactly sample 0 of a request seeded s + 1."""
    model = tiny_model()
    prompt = _prompt(1, 6)
    two = GenerationEngine(model).generate([prompt], SamplingParams(**HOT, seed=40), n=2)
    one = GenerationEngine(model).generate([prompt], SamplingParams(**HOT, seed=41), n=1)
    assert two[1].token_ids != one[0].token_ids
    assert two[0].token_ids != two[1].token_ids


def test_identical_prompts_with_derived_seeds_diverge_and_fixed_seeds_reproduce() -> None:
    """Two identical prompts sent as separate n=1 requests: seeds derived from (step, prompt index)
    give different samples; equal seeds give equal samples; a seeded request gets the same tokens alone
    and beside other requests (greedy, unseeded, filtered, penalised, n=3)."""
    model = tiny_model()
    prompt = _prompt(2, 7)
    a, b = (SamplingParams(**HOT, seed=derive_seed(99, i)) for i in range(2))
    engine = GenerationEngine(model, num_slots=8)
    (ra,), (rb,), (rc,) = _run(engine, (prompt, a, 1), (prompt, b, 1), (prompt, a, 1))
    assert ra != rb
    assert ra == rc
    alone = _run(GenerationEngine(model, num_slots=8), (prompt, a, 1))[0]
    crowd = _run(GenerationEngine(model, num_slots=8),
                 (_prompt(3, 4), SamplingParams(max_new_tokens=5, temperature=0.0, stop_token_ids=()), 1),
                 (_prompt(4, 9), SamplingParams(**{**HOT, "top_k": 7}), 3),
                 (prompt, a, 1),
                 (_prompt(5, 3), SamplingParams(**{**HOT, "top_p": 0.5, "repetition_penalty": 1.4}, seed=3), 2))
    assert crowd[2] == alone == [ra]
