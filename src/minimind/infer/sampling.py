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

Everything is batched over rows; no Python loop over the batch.
"""

from __future__ import annotations

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
        return self.greedy or self.temperature == 0


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


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL penalty on seen tokens: positive logits ``/= p``, negative ``*= p`` (new tensor)."""
    if penalty == 1.0:
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


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens with total probability ``>= top_p``.

    A token is dropped when the probability mass strictly before it (in descending order) already
    reaches ``top_p``; the first token has zero mass before it, so at least one token survives.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from ``logits [B, V]``; returns ``LongTensor [B]``.

    ``seen [B, V]`` (see :func:`seen_token_mask`) lists the tokens of prompt and generation so far;
    it is only needed when ``params.repetition_penalty != 1``.  The steps and their order are
    described in the module docstring.
    """
    logits = logits.float()
    if params.repetition_penalty != 1.0:
        if seen is None:
            raise ValueError("repetition_penalty != 1 needs the seen-token mask")
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.is_greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    logits = top_k_filter(logits, int(params.top_k))
    logits = top_p_filter(logits, float(params.top_p))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
