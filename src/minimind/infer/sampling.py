"""Next-token sampling: repetition penalty, temperature, top-k, top-p, multinomial.

The steps run in the order HF ``transformers`` uses, on purpose:

1. **Repetition penalty on the raw logits** (CTRL rule: a seen token's positive logit is divided by
   ``p``, a negative one multiplied by ``p``, so both move towards "less likely").  The reference
   applied it *after* dividing by the temperature.  For a positive
   temperature both orders give the same numbers (dividing by T > 0 keeps the sign), but only
   penalty-first also works when there is no temperature to divide by: greedy decoding sees the
   penalised logits, and temperature 0 never enters the arithmetic.
2. **Greedy short-circuit**: ``greedy=True`` or ``temperature == 0`` takes the argmax of the
   penalised logits.  The reference divided by the temperature before its argmax, so temperature 0
   produced ``inf/inf = NaN`` logits.
3. **Temperature**: ``logits / T``.
4. **Top-k**: keep exactly the k largest logits (ties at the k-th value do not widen the set).
5. **Top-p** (nucleus): keep the smallest set of most likely tokens whose probability sums to at
   least ``top_p``; the most likely token is always kept, so the set is never empty.
6. **Multinomial** draw from the renormalised distribution, with an optional ``torch.Generator`` so
   that a seed reproduces the samples.

Everything is batched over rows, and every row may have its own settings (:class:`RowKnobs`): the
continuous-batching engine decodes requests with different temperatures, filters and penalties in one
step.  Top-k and top-p work on the ``k_max`` best logits only (``torch.topk`` instead of a full sort of
the vocabulary) unless some row disables top-k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    ``top_k=0`` and ``top_p=1.0`` disable those filters; ``repetition_penalty=1.0`` disables the
    penalty.  ``stop_token_ids`` end a row (the token is kept in ``token_ids`` but not in the text);
    ``stop_strings`` end a row when its decoded text contains one (the text is cut before it).
    ``seed`` makes sampling reproducible for a given batch (the draws of all rows share one
    generator, so the same prompt in a different batch may get different samples).
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
        if not self.temperature >= 0:  # also rejects NaN
            problems.append(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if int(self.top_k) < 0:
            problems.append(f"top_k must be >= 0 (0 = disabled), got {self.top_k}")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if any(t < 0 for t in self.stop_token_ids):
            problems.append(f"stop_token_ids must be non-negative, got {self.stop_token_ids}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            problems.append(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")
        if problems:
            raise ValueError("invalid sampling params: " + "; ".join(problems))

    @property
    def is_greedy(self) -> bool:
        # Below 1e-5, logits / T overflows to inf and the softmax turns to NaN: that *is* argmax.
        return self.greedy or self.temperature < 1e-5


@dataclass
class RowKnobs:
    """Per-row sampling settings as tensors ``[B]``, plus host-side flags that let a step skip work.

    ``top_k`` holds ``V`` for rows without a top-k filter; ``k_max`` is the largest of them.
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    penalty: torch.Tensor
    greedy: torch.Tensor
    k_max: int
    any_penalty: bool
    all_greedy: bool

    @classmethod
    def build(cls, params: Sequence[SamplingParams], vocab_size: int,
              device: torch.device | str = "cpu") -> RowKnobs:
        ks = [int(p.top_k) if 0 < int(p.top_k) < vocab_size else vocab_size for p in params]
        greedy = [p.is_greedy for p in params]
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32).to(device),
            top_k=torch.tensor(ks, dtype=torch.long).to(device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32).to(device),
            penalty=torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32).to(device),
            greedy=torch.tensor(greedy, dtype=torch.bool).to(device),
            k_max=max((k for k, g in zip(ks, greedy) if not g), default=1),
            any_penalty=any(p.repetition_penalty != 1.0 for p in params),
            all_greedy=all(greedy),
        )


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
    reaches ``top_p``; the first token has zero mass before it, so at least one token survives.
    """
    if not isinstance(top_p, torch.Tensor) and top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    drop_sorted = _nucleus_drop(sorted_logits, top_p)
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _nucleus_drop(sorted_logits: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """Which of the descending-sorted logits fall outside the nucleus (rows with top_p = 1 keep all)."""
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    if isinstance(top_p, torch.Tensor):
        top_p = top_p.unsqueeze(-1)
        return (mass_before >= top_p) & (top_p < 1.0)  # cumsum rounding must not cut a top_p=1 row
    return mass_before >= top_p


def sample_rows(logits: torch.Tensor, knobs: RowKnobs, seen: torch.Tensor | None = None,
                generators: Sequence[torch.Generator | None] | torch.Generator | None = None
                ) -> torch.Tensor:
    """One token per row of ``logits [B, V]``, each row with its own settings; ``LongTensor [B]``.

    ``generators`` is one generator for the whole batch, or one per row (``None`` = the global RNG),
    so a seeded request draws the same tokens whatever else shares its batch.
    """
    logits = logits.float()
    if knobs.any_penalty:
        if seen is None:
            raise ValueError("repetition_penalty != 1 needs the seen-token mask")
        logits = apply_repetition_penalty(logits, seen, knobs.penalty)
    best = logits.argmax(dim=-1)
    if knobs.all_greedy:
        return best
    scaled = logits / torch.where(knobs.greedy, 1.0, knobs.temperature).unsqueeze(-1)
    if knobs.k_max < logits.shape[-1]:
        vals, idx = torch.topk(scaled, knobs.k_max, dim=-1)
    else:
        vals, idx = torch.sort(scaled, dim=-1, descending=True)
    rank = torch.arange(vals.shape[-1], device=vals.device)
    vals = vals.masked_fill(rank >= knobs.top_k.unsqueeze(-1), float("-inf"))
    vals = vals.masked_fill(_nucleus_drop(vals, knobs.top_p), float("-inf"))
    probs = torch.softmax(vals, dim=-1)
    choice = _multinomial(probs, generators, knobs.top_k)
    picked = idx.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
    return torch.where(knobs.greedy, best, picked)


def _multinomial(probs: torch.Tensor, generators: Sequence[torch.Generator | None] | torch.Generator | None,
                 top_k: torch.Tensor) -> torch.Tensor:
    """Draw one index per row of the descending ``probs``.

    A row with its own generator draws from its own ``top_k`` entries only, so the draw does not
    depend on how many candidates the batch's other rows needed (``torch.multinomial`` consumes
    random numbers differently for vectors of different lengths).
    """
    if generators is None or isinstance(generators, torch.Generator):
        return torch.multinomial(probs, 1, generator=generators).squeeze(-1)
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    shared = [i for i, g in enumerate(generators) if g is None]
    if shared:
        rows = torch.tensor(shared, device=probs.device)
        out[rows] = torch.multinomial(probs[rows], 1).squeeze(-1)
    for i, g in enumerate(generators):
        if g is not None:
            out[i] = torch.multinomial(probs[i, : int(top_k[i])], 1, generator=g)[0]
    return out


def sample_next(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from ``logits [B, V]`` with one setting for all rows.

    ``seen [B, V]`` (see :func:`seen_token_mask`) lists the tokens of prompt and generation so far;
    it is only needed when ``params.repetition_penalty != 1``.  The steps and their order are
    described in the module docstring.
    """
    knobs = RowKnobs.build([params] * logits.shape[0], logits.shape[-1], logits.device)
    return sample_rows(logits, knobs, seen, generator)
