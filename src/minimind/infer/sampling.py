"""Next-token sampling: repetition penalty, temperature, top-k, top-p, and a seeded draw per row.

The steps run in the order HF ``transformers`` uses, on purpose:

1. **Repetition penalty on the raw logits** (CTRL rule: a seen token's positive logit is divided by
   ``p``, a negative one multiplied by ``p``, so both move towards "less likely").  The reference
   applied it *after* dividing by the temperature.  For a positive
   temperature both orders give the same numbers (dividing by T > 0 keeps the sign), but only
   penalty-first also works when there is no temperature to divide by: greedy decoding sees the
   penalised logits, and temperature 0 never enters the arithmetic.
2. **Greedy short-circuit**: ``greedy=True`` or ``temperature < 1e-5`` takes the argmax of the
   penalised logits.  The reference divided by the temperature before its argmax, so temperature 0
   produced ``inf/inf = NaN`` logits.
3. **Temperature**: ``(z' - max z') / T``.  Subtracting the row's maximum first changes no
   probability but keeps every tempered logit ``<= 0``, so no temperature overflows to ``inf``.
4. **Top-k**: keep exactly the k largest logits (ties at the k-th value do not widen the set).
5. **Top-p** (nucleus): keep the smallest set of most likely tokens whose probability sums to at
   least ``top_p``; the most likely token is always kept, so the set is never empty.
6. **Draw** from the renormalised distribution by inverting its CDF: with ``w_v = exp(logit_v / T)``
   for kept tokens (0 for dropped ones) in vocabulary order and ``u`` uniform on [0, 1), the token is
   the first ``v`` whose running sum ``w_0 + ... + w_v`` exceeds ``u * sum(w)`` — a draw from
   ``softmax(logit / T)`` restricted to the kept tokens, one uniform per row and one
   ``searchsorted`` for the whole batch (no normalisation, no per-row loop).

**Log-probs** (``sample_rows(..., logprobs=True)``) are ``log_softmax(z' / T)`` at the sampled token,
where ``z'`` are the logits after the repetition penalty and ``T`` the row's temperature (``T = 1``
for greedy rows): the *tempered, full-support* distribution.  Top-k and top-p are not applied to the
reported log-prob: the sample comes from the renormalised truncated distribution, but we report the
tempered full-vocabulary log-prob, which is exactly what a training forward computing
``log_softmax(logits / T)`` reproduces.  With ``top_k=0`` and ``top_p=1`` (the RL defaults) the two
coincide.

**Random streams** are counter-based, so a row's draws depend on nothing but its own seed and
position: the uniform of the row's ``t``-th sampled token is output ``t + 1`` of splitmix64 seeded
with the row's seed (see :func:`counter_uniforms`), computed with integer tensor ops for every row at
once.  The CDF runs over the vocabulary in token-id order (not in a sorted order that depends on the
other rows' top-k), so a seeded row draws the same tokens whatever else shares its batch (exactly on
CPU, where the running sums are sequential).  Rows without a seed take their uniform from the global
torch RNG (or the ``generator`` passed in).  A request's sample ``i`` uses ``derive_seed(seed, i)``
as its row seed, so samples of one request, and requests whose seeds differ by one, are unrelated
streams.

Everything is batched over rows, and every row may have its own settings (:class:`RowKnobs`): the
continuous-batching engine decodes requests with different temperatures, filters and penalties in one
step.  Top-k and top-p work on the ``k_max`` best logits only (``torch.topk`` instead of a full sort of
the vocabulary) unless some row disables top-k; when no row filters at all, nothing is sorted.

**Bad rows.**  A row whose logits are not usable (a NaN anywhere, ``+inf``, or nothing finite) is
flagged in :attr:`Sampled.bad` instead of failing the batch; the engine ends that row alone.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAX_TEMPERATURE = 100.0
PENALTY_RANGE = (0.01, 100.0)
GREEDY_BELOW = 1e-5  # temperatures below this are argmax (logits / T would overflow to inf)

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment: 2^64 / golden ratio, odd
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    ``top_k=0`` and ``top_p=1.0`` disable those filters; ``repetition_penalty=1.0`` disables the
    penalty.  ``stop_token_ids`` end a row (the token is kept in ``token_ids`` but not in the text);
    ``stop_strings`` end a row when its decoded text contains one (the text is cut before it).

    Accepted ranges (a ``ValueError`` names every violation): ``0 <= temperature <= 100`` (below
    ``1e-5`` is greedy; OpenAI caps at 2, vLLM has no cap, and at 100 a distribution is already flat),
    ``0 < top_p <= 1``, ``top_k >= 0``, ``0.01 <= repetition_penalty <= 100`` (HF and vLLM only ask
    for > 0, but a penalty of 1e-38 turns a logit into ``inf``; useful values are 1 to 2).

    ``seed`` (any int) makes sampling reproducible: sample ``i`` of a request draws from the stream
    ``derive_seed(seed, i)``, which depends on nothing else, so the request gets the same tokens alone
    or in any batch.  Requests that must be independent need different seeds, e.g. RL derives one per
    request with ``derive_seed(step_seed, prompt_index, turn, episode)``; never use ``seed + i`` for
    related requests' seeds yourself when ``derive_seed`` can mix them.
    """

    max_new_tokens: int = 512
    temperature: float = 0.85
    top_k: int = 50
    top_p: float = 0.85
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = (2,)
    stop_strings: tuple[str, ...] = ()
    greedy: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        # Accept lists (JSON requests, CLI) but store tuples so params stay hashable-ish and frozen.
        self.stop_token_ids = tuple(int(t) for t in (self.stop_token_ids or ()))
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        self.stop_strings = tuple(self.stop_strings or ())
        problems = []
        if int(self.max_new_tokens) < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:  # also rejects NaN
            problems.append(f"temperature must be in [0, {MAX_TEMPERATURE:g}] (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if int(self.top_k) < 0:
            problems.append(f"top_k must be >= 0 (0 = disabled), got {self.top_k}")
        low, high = PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            problems.append(f"repetition_penalty must be in [{low:g}, {high:g}] (1 = off), "
                            f"got {self.repetition_penalty}")
        if any(t < 0 for t in self.stop_token_ids):
            problems.append(f"stop_token_ids must be non-negative, got {self.stop_token_ids}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            problems.append(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            problems.append(f"seed must be an integer or None, got {self.seed!r}")
        if problems:
            raise ValueError("invalid sampling params: " + "; ".join(problems))

    @property
    def is_greedy(self) -> bool:
        # Below 1e-5, logits / T overflows to inf and the softmax turns to NaN: that *is* argmax.
        return self.greedy or self.temperature < GREEDY_BELOW


# ---- seeds and counter-based random numbers ------------------------------------------------------
def _mix64(x: int) -> int:
    """splitmix64's finaliser on a Python int: a bijection of 64-bit words in which every input bit
    flips each output bit with probability ~1/2."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * _MUL1) & _MASK64
    x = ((x ^ (x >> 27)) * _MUL2) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*values: int) -> int:
    """A seed in ``[0, 2**63)`` mixed from any integers (negative or wider than 64 bits included).

    Each value goes through splitmix64's mixer before it is folded in, so nearby inputs (``s`` and
    ``s + 1``, ``(a, b)`` and ``(b, a)``, ``(s, 1)`` and ``(s + 1, 0)``) give unrelated seeds; the
    result is non-negative and fits ``torch.manual_seed``, an int64 tensor and JSON.  Use it to give
    related requests independent streams: ``derive_seed(step_seed, prompt_index, turn, episode)``.
    """
    h = _GOLDEN
    for v in values:
        h = _mix64(h + _GOLDEN + _mix64(operator.index(v)))
    return h >> 1


def _signed(c: int) -> int:
    """The int64 with the same bits as the 64-bit word ``c`` (torch multiplies int64 modulo 2^64)."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 words (torch's ``>>`` is arithmetic: it copies the sign bit)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64_tensor(x: torch.Tensor) -> torch.Tensor:
    """:func:`_mix64` elementwise on int64 tensors (wrapping multiplication)."""
    x = (x ^ _shr(x, 30)) * _signed(_MUL1)
    x = (x ^ _shr(x, 27)) * _signed(_MUL2)
    return x ^ _shr(x, 31)


def counter_uniforms(row_seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Float64 uniforms on [0, 1), one per row: a pure function of (seed, step).

    ``u = (mix(seed + (step + 1) G) >> 11) / 2^53`` with ``G`` splitmix64's odd increment: output
    ``step + 1`` of the splitmix64 generator seeded with ``seed``, cut to the 53 bits a double holds
    exactly.  ``row_seeds`` and ``steps`` are int64 ``[B]``.
    """
    h = _mix64_tensor(row_seeds + (steps + 1) * _signed(_GOLDEN))
    return _shr(h, 11).double() * 2.0 ** -53


# ---- per-row settings ----------------------------------------------------------------------------
@dataclass
class RowKnobs:
    """Per-row sampling settings as tensors ``[B]``, plus host-side flags that let a step skip work.

    ``temperature`` is 1 for greedy rows (their log-probs are of the untempered distribution);
    ``top_k`` holds ``V`` for rows without a top-k filter and ``k_max`` is the largest among sampled
    rows.  ``seed`` is each row's stream seed (meaningful where ``seeded``) and ``step`` how many
    tokens the row has sampled (the counter of its random stream; :func:`sample_rows` advances it).
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    penalty: torch.Tensor
    greedy: torch.Tensor
    seed: torch.Tensor
    seeded: torch.Tensor
    step: torch.Tensor
    k_max: int
    any_penalty: bool
    all_greedy: bool
    any_greedy: bool
    all_seeded: bool
    any_seeded: bool
    truncate: bool

    @classmethod
    def build(cls, params: Sequence[SamplingParams], vocab_size: int, device: torch.device | str = "cpu",
              seeds: Sequence[int | None] | None = None, steps: Sequence[int] | None = None) -> RowKnobs:
        """Knobs of rows with ``params``; ``seeds`` are the rows' stream seeds (e.g.
        ``derive_seed(request_seed, sample_index)``, ``None`` = global RNG), ``steps`` their counters."""
        n = len(params)
        seeds = list(seeds) if seeds is not None else [None] * n
        steps = list(steps) if steps is not None else [0] * n
        ks = [int(p.top_k) if 0 < int(p.top_k) < vocab_size else vocab_size for p in params]
        greedy = [p.is_greedy for p in params]
        sampled = [i for i in range(n) if not greedy[i]]

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device)

        return cls(
            temperature=tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)], torch.float32),
            top_k=tensor(ks, torch.long),
            top_p=tensor([p.top_p for p in params], torch.float32),
            penalty=tensor([p.repetition_penalty for p in params], torch.float32),
            greedy=tensor(greedy, torch.bool),
            seed=tensor([s if s is not None else 0 for s in seeds], torch.long),
            seeded=tensor([s is not None for s in seeds], torch.bool),
            step=tensor(steps, torch.long),
            k_max=max((ks[i] for i in sampled), default=1),
            any_penalty=any(p.repetition_penalty != 1.0 for p in params),
            all_greedy=not sampled,
            any_greedy=len(sampled) < n,
            all_seeded=all(seeds[i] is not None for i in sampled),
            any_seeded=any(seeds[i] is not None for i in sampled),
            truncate=any(ks[i] < vocab_size or params[i].top_p < 1.0 for i in sampled),
        )


@dataclass
class Sampled:
    """One step's outcome per row: ``tokens`` long ``[B]``, ``logprobs`` float32 ``[B]`` (or ``None``
    when not asked for) and ``bad`` bool ``[B]`` (the row's logits were unusable; its token is 0)."""

    tokens: torch.Tensor
    logprobs: torch.Tensor | None
    bad: torch.Tensor


# ---- filters -------------------------------------------------------------------------------------
def seen_token_mask(token_ids: torch.Tensor, vocab_size: int,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``[B, V]``: which tokens occur in each row of ``token_ids [B, S]``.

    ``valid [B, S]`` marks real tokens in a padded batch.  Counting with ``scatter_add`` (rather
    than scattering booleans) keeps the result deterministic when a pad id also occurs as a real
    token in the same row.
    """
    counts = torch.zeros(token_ids.shape[0], vocab_size, dtype=torch.int32, device=token_ids.device)
    src = (valid if valid is not None else torch.ones_like(token_ids, dtype=torch.bool)).to(torch.int32)
    return counts.scatter_add_(1, token_ids, src) > 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: float | torch.Tensor) -> torch.Tensor:
    """CTRL penalty on seen tokens: positive logits ``/= p``, negative ``*= p`` (new tensor).

    ``penalty`` is one float or a ``[B]`` tensor (one per row; 1 leaves a row unchanged).
    """
    if isinstance(penalty, torch.Tensor):
        penalty = penalty.to(logits.dtype).unsqueeze(-1)
    elif penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the ``k`` largest logits per row; the rest become ``-inf``."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    keep = torch.zeros_like(logits, dtype=torch.bool)
    keep.scatter_(-1, torch.topk(logits, k, dim=-1).indices, True)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens with total probability ``>= top_p``.

    A token is dropped when the probability mass strictly before it (in descending order) already
    reaches ``top_p``; the most likely token is always kept, so at least one token survives (even for
    a ``top_p`` that rounds to 0 in float32).
    """
    if not isinstance(top_p, torch.Tensor) and top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    drop_sorted = _nucleus_drop(sorted_logits, top_p)
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _nucleus_drop(sorted_logits: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """Which of the descending-sorted logits fall outside the nucleus (rows with top_p = 1 keep all;
    rank 0 is always kept)."""
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    not_first = torch.arange(probs.shape[-1], device=probs.device) > 0
    if isinstance(top_p, torch.Tensor):
        top_p = top_p.unsqueeze(-1)
        return (mass_before >= top_p) & (top_p < 1.0) & not_first  # rounding must not cut a top_p=1 row
    return (mass_before >= top_p) & not_first


# ---- the draw ------------------------------------------------------------------------------------
def sample_rows(logits: torch.Tensor, knobs: RowKnobs, seen: torch.Tensor | None = None,
                generator: torch.Generator | None = None, logprobs: bool = False) -> Sampled:
    """One token per row of ``logits [B, V]``, each row with its own settings, all rows at once.

    ``generator`` feeds the uniforms of unseeded rows (default: the global RNG).  With ``logprobs``
    the result carries ``log_softmax(z' / T)`` of each sampled token (see the module docstring for
    what that means under top-k/top-p).  Advances ``knobs.step`` by one.  Nothing here reads a value
    back to the host.
    """
    z = logits.float()
    if knobs.any_penalty:
        if seen is None:
            raise ValueError("repetition_penalty != 1 needs the seen-token mask")
        z = apply_repetition_penalty(z, seen, knobs.penalty)
    top = z.amax(dim=-1)  # a NaN anywhere in a row propagates into its max
    bad = ~torch.isfinite(top)
    shift = torch.where(bad, 0.0, top).unsqueeze(-1)
    scaled = (z - shift) / knobs.temperature.unsqueeze(-1)  # <= 0 in good rows, max 0: no overflow
    full = scaled.exp() if logprobs or (not knobs.all_greedy and not knobs.truncate) else None
    # argmax only where a row is greedy: max-with-indices over [8, 6400] took 31 us, amax 4 us
    if knobs.all_greedy:
        tokens = z.argmax(dim=-1)
    elif knobs.any_greedy:
        tokens = torch.where(knobs.greedy, z.argmax(dim=-1), _draw(scaled, full, knobs, generator))
    else:
        tokens = _draw(scaled, full, knobs, generator)
    tokens = tokens.masked_fill(bad, 0)
    lp = None
    if logprobs:  # sum(full) >= 1 (the maximum contributes exp(0)): its log is safe
        lp = scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - full.sum(dim=-1).log()
    knobs.step += 1
    return Sampled(tokens, lp, bad)


def sample_packed(logits: torch.Tensor, knobs: RowKnobs, seen: torch.Tensor | None = None,
                  logprobs: bool = False) -> torch.Tensor:
    """:func:`sample_rows` for the engine's step: marks each sampled token in ``seen`` (when given, the
    rows' seen-token masks for the repetition penalty) and returns float64 ``[2 or 3, B]`` of tokens,
    error flags and (with ``logprobs``) log-probs, so that one device-to-host read fetches them all
    (float64 holds token ids exactly and float32 log-probs without rounding).  Nothing is read back
    here, so a compiled decode step can end with it (:meth:`GenerationEngine.decode_and_sample`)."""
    out = sample_rows(logits, knobs, seen, logprobs=logprobs)
    if seen is not None:
        seen[torch.arange(logits.shape[0], device=out.tokens.device), out.tokens] = True
    parts = [out.tokens, out.bad] + ([out.logprobs] if out.logprobs is not None else [])
    return torch.stack([part.double() for part in parts])


def _draw(scaled: torch.Tensor, full: torch.Tensor | None, knobs: RowKnobs,
          generator: torch.Generator | None) -> torch.Tensor:
    """Inverse-CDF draw over each row's kept tokens, in vocabulary order (see the module docstring).

    Without filters the CDF runs over ``full = exp(scaled)``.  With filters it runs over the batch's
    ``k_max`` best candidates re-ordered by token id, dropped ones weighing 0: the running sums at a
    row's kept tokens are then the same whatever ``k_max`` is (zeros add exactly), so the row draws
    what it draws alone."""
    if knobs.truncate:
        if knobs.k_max < scaled.shape[-1]:
            vals, idx = torch.topk(scaled, knobs.k_max, dim=-1)
        else:
            vals, idx = torch.sort(scaled, dim=-1, descending=True)
        mass = vals.exp()
        weights = mass.masked_fill(~_kept_sorted(mass, knobs), 0.0)
        idx, by_id = idx.sort(dim=-1)
        weights = weights.gather(-1, by_id)
    else:
        idx, weights = None, full
    cdf = weights.double().cumsum(dim=-1)
    target = (_uniforms(knobs, generator) * cdf[:, -1]).unsqueeze(-1)
    pick = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
    return (idx.gather(-1, pick) if idx is not None else pick).squeeze(-1)


def _kept_sorted(mass: torch.Tensor, knobs: RowKnobs) -> torch.Tensor:
    """Which of the descending candidates (``mass [B, K]``: their unnormalised probabilities
    ``exp(scaled)``) each row's top-k and then top-p keep (a prefix; rank 0 always).  The nucleus is measured on the top-k-renormalised distribution with
    running sums over the sorted candidates, which for a row's first ``top_k`` entries do not depend
    on how many candidates the batch's other rows needed."""
    rank = torch.arange(mass.shape[-1], device=mass.device)
    in_k = rank < knobs.top_k.unsqueeze(-1)
    mass = mass.masked_fill(~in_k, 0.0)
    running = mass.cumsum(dim=-1)
    total = running.gather(-1, (knobs.top_k.clamp(max=mass.shape[-1]) - 1).unsqueeze(-1))
    top_p = knobs.top_p.unsqueeze(-1)
    outside = ((running - mass) >= top_p * total) & (top_p < 1.0) & (rank > 0)
    return in_k & ~outside


def _uniforms(knobs: RowKnobs, generator: torch.Generator | None) -> torch.Tensor:
    """Float64 ``[B]`` on [0, 1): counter-based for seeded rows, the RNG's for the others."""
    n, device = knobs.seed.shape[0], knobs.seed.device
    if not knobs.all_seeded:
        # rand_like: a row count that is symbolic in a compiled step is a valid shape for it
        fresh = (torch.rand_like(knobs.temperature, dtype=torch.float64) if generator is None
                 else torch.rand(n, dtype=torch.float64, generator=generator, device=device))
        if not knobs.any_seeded:
            return fresh
        return torch.where(knobs.seeded, counter_uniforms(knobs.seed, knobs.step), fresh)
    return counter_uniforms(knobs.seed, knobs.step)


def sample_next(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from ``logits [B, V]`` with one setting for all rows.

    ``seen [B, V]`` (see :func:`seen_token_mask`) lists the tokens of prompt and generation so far;
    it is only needed when ``params.repetition_penalty != 1``.  With ``params.seed`` row ``i`` draws
    from ``derive_seed(seed, i)`` (as sample ``i`` of an engine request does at its first token);
    otherwise from ``generator`` or the global RNG.  Raises ``ValueError`` for rows whose logits are
    not finite.  The steps and their order are described in the module docstring.
    """
    n = logits.shape[0]
    seeds = [derive_seed(params.seed, i) for i in range(n)] if params.seed is not None else None
    knobs = RowKnobs.build([params] * n, logits.shape[-1], logits.device, seeds=seeds)
    out = sample_rows(logits, knobs, seen, generator)
    if bool(out.bad.any()):
        raise ValueError(f"non-finite logits in rows {out.bad.nonzero().flatten().tolist()}")
    return out.tokens
