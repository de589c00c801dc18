"""Continuous batching over the engine's slots: requests join at any step, finished rows leave at once.

A :class:`Request` is one prompt with ``n`` samples.  Each sample is a row (:class:`Row`) that lives
in one KV-cache slot from admission to its last token.  One :meth:`Scheduler.step`:

1. drops the rows of cancelled requests;
2. **decodes** one token for every running row in a single forward pass over slots ``0..A-1`` (or
   ``k`` tokens in ``k`` passes before reading any back, the engine's ``multi_step``);
3. **frees** the slots of finished rows, moving the last running row into each hole so the busy
   slots stay a contiguous run (a slice of the cache, read without gathers);
4. **admits** waiting requests into the free slots: their prompts are prefilled together in one
   forward pass (one row per request), the prompt's keys/values are copied into the slots of the
   request's other samples, and every sample draws its first token from the prompt's logits.

Every row keeps its own sampling settings, random stream and stop rules; the per-row knobs are
tensors rebuilt only when the set of running rows changes.  A step samples every row at once and
reads tokens, log-probs and per-row error flags back to the host in one transfer (one per ``k``
tokens with ``multi_step = k``: on a GPU the host then queues the next step while the device runs
this one, instead of waiting for each token).  A row whose
logits go bad (NaN or inf) ends alone with ``finish_reason == "error"``; the others carry on.  Events reach their owners through the request's
``on_event`` callback, so any caller may drive :meth:`step` (the synchronous ``generate`` or the
server's background thread) and every request still hears about its own tokens.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from minimind.infer.sampling import RowKnobs, SamplingParams, derive_seed, sample_packed

if TYPE_CHECKING:
    from minimind.infer.engine import GenerationEngine

# interrupted: Ctrl-C in chat; error: this row's numbers went bad (see GenerationResult.error)
FinishReason = Literal["stop", "length", "interrupted", "cancelled", "error"]


@dataclass
class GenerationResult:
    """One sample's outcome.

    ``token_ids`` are all sampled ids, including a terminating stop token (RL needs to score the
    decision to stop); ``text`` excludes that token and is cut before a matched stop string
    (``None`` without a tokenizer).  ``stop`` is the stop token id or stop string that ended the row.
    ``logprobs[i]`` (when the request asked for log-probs) is ``log p(token_ids[i])`` under the
    distribution the token was sampled from, before truncation: ``log_softmax(z' / T)`` with ``z'`` the
    logits after the repetition penalty and ``T`` the temperature (``T = 1`` for greedy requests).
    Top-k/top-p are not applied to it: the sample comes from the renormalised truncated distribution,
    the reported value is the tempered full-vocabulary log-prob, which is what a training forward
    computing ``log_softmax(logits / T)`` reproduces (with ``top_k=0``, ``top_p=1`` and no penalty,
    the RL defaults, the two are the same distribution).

    ``finish_reason == "error"`` means this row's logits became unusable (NaN or inf); ``error`` then
    says why, and ``token_ids`` hold the tokens sampled before it.  Other rows are not affected.
    """

    token_ids: list[int]
    text: str | None
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    stop: int | str | None = None
    logprobs: list[float] | None = None
    error: str | None = None


@dataclass
class TokenEvent:
    """One sampled token of sample ``index`` of a request.

    ``text`` is the text that became final with this token: ``""`` while it is held back (an
    incomplete UTF-8 character, or a possible start of a stop string).  The last event of a sample
    has ``finish_reason`` and ``result`` set.  When that is ``"error"`` no token was sampled:
    ``token_id`` is -1 and ``logprob`` ``None``.
    """

    index: int
    token_id: int
    text: str
    logprob: float | None
    finish_reason: FinishReason | None = None
    result: GenerationResult | None = None


class Row:
    """Host-side state of one sample: its tokens, incremental text and stop checks."""

    def __init__(self, request: Request, index: int, budget: int, decoder: Any | None) -> None:
        params = request.params
        self.request = request
        self.index = index
        self.prompt_len = len(request.prompt_ids)
        self.budget = budget
        self.ids: list[int] = []
        self.logprobs: list[float] | None = [] if request.logprobs else None
        self.finish_reason: FinishReason | None = None
        self.stop: int | str | None = None
        self.decoder = decoder  # a StreamDecoder when text is tracked token by token
        self.text = ""
        self.safe_len = 0  # text[:safe_len] is final: it can no longer become part of a stop string
        self.sent = 0  # characters already reported in events
        self.error: str | None = None
        # Sample i of a seeded request draws from its own stream (see SamplingParams.seed).
        seeded = params.seed is not None and not params.is_greedy
        self.seed: int | None = derive_seed(params.seed, index) if seeded else None
        self._stop_ids = frozenset(params.stop_token_ids)
        self._stop_strings = params.stop_strings
        self._hold = max((len(s) for s in self._stop_strings), default=1) - 1

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def cur_len(self) -> int:
        return self.prompt_len + len(self.ids)

    def push(self, token: int, logprob: float | None) -> None:
        self.ids.append(token)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        if token in self._stop_ids:
            self.finish("stop", token)
            return
        if self.decoder is not None:
            start = max(0, len(self.text) - self._hold)  # a new match must end in the new text
            self.text += self.decoder.put(token)
            if self._match_stop_string(start):
                return
            self.safe_len = len(self.text) - self._stop_prefix_len()
        if len(self.ids) >= self.budget:
            self.finish("length", None)

    def fail(self, message: str) -> None:
        """End this row alone: its numbers went bad, the rest of the batch is unharmed."""
        self.error = message
        self.finish("error", None)

    def finish(self, reason: FinishReason, stop: int | str | None) -> None:
        self.finish_reason, self.stop = reason, stop
        if self.decoder is not None:
            start = max(0, len(self.text) - self._hold)
            self.text += self.decoder.flush()
            self._match_stop_string(start)
            self.safe_len = len(self.text)

    def new_text(self) -> str:
        """Text that became final since the last call."""
        piece = self.text[self.sent:self.safe_len] if self.safe_len > self.sent else ""
        self.sent = max(self.sent, self.safe_len)
        return piece

    def _match_stop_string(self, start: int) -> bool:
        hits = [(i, s) for s in self._stop_strings if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        i, s = min(hits)
        self.text = self.text[:i]
        self.safe_len = len(self.text)
        self.decoder.reset()
        self.finish_reason, self.stop = "stop", s
        return True

    def _stop_prefix_len(self) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop string."""
        for k in range(min(self._hold, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self._stop_strings):
                return k
        return 0


@dataclass
class Request:
    """A prompt, its sampling settings and ``n`` samples; ``on_event`` hears every token."""

    prompt_ids: list[int]
    params: SamplingParams
    n: int = 1
    logprobs: bool = False
    track_text: bool = True
    on_event: Callable[[TokenEvent], None] | None = None
    rows: list[Row] = field(default_factory=list)
    results: list[GenerationResult | None] = field(default_factory=list)
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return len(self.results) == self.n and all(r is not None for r in self.results)


class Scheduler:
    """Owns the running rows of one engine; see the module docstring for one step."""

    def __init__(self, engine: GenerationEngine) -> None:
        self.engine = engine
        self.waiting: deque[Request] = deque()
        self.running: list[Row] = []  # running[i] lives in slot i
        self.lock = threading.RLock()  # held by whoever steps; add/cancel may come from other threads
        self._knobs: RowKnobs | None = None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> Request:
        """Queue a validated request (see :meth:`GenerationEngine.check_prompt`)."""
        self.engine.check_prompt(request.prompt_ids, request.n)
        if request.params.stop_strings and self.engine.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to decode text")
        request.results = [None] * request.n
        with self.lock:
            self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request; its slots are freed at the start of the next step."""
        request.cancelled = True

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> None:
        with self.lock:
            self._drop_cancelled()
            if self.running:
                self._decode()
            self._free_finished()
            self._admit()

    def _decode(self) -> None:
        """Decode ``k`` tokens for every running row (:meth:`_steps_ahead`), reading them back once.

        Each step feeds the previous step's sampled tokens, still on the device, at positions one
        further; the host learns the ``k`` tokens of every row in one read and pushes them in order.
        A row that stops at step ``j < k`` keeps none of its later tokens (their compute is wasted,
        its slot is freed as usual), so the results equal ``k`` single steps: the rows' random
        streams are counter-based and advance once per step either way."""
        rows, eng = self.running, self.engine
        if self._knobs is None:
            self._knobs = self._build_knobs(rows, eng.model.config.vocab_size)
        positions = [r.cur_len - 1 for r in rows]
        tok = torch.tensor([r.ids[-1] for r in rows], dtype=torch.long).to(eng.device)
        pos = torch.tensor(positions, dtype=torch.long).to(eng.device)
        seen = eng.seen[:len(rows)] if self._knobs.any_penalty else None
        logprobs = any(r.logprobs is not None for r in rows)
        outs = []
        for k in range(self._steps_ahead(rows)):
            outs.append(eng.decode_and_sample(len(rows), tok, pos, max(positions) + k, self._knobs, seen, logprobs))
            tok, pos = outs[-1][0].long(), pos + 1
        for host in torch.stack(outs).tolist():
            self._push(rows, host)

    def _steps_ahead(self, rows: list[Row]) -> int:
        """Steps to decode before the host reads the tokens: the engine's ``multi_step``, but one
        while a waiting request fits the free slots (admit it now) and never past a row's budget
        (the cache holds prompt + budget positions)."""
        eng = self.engine
        if eng.multi_step <= 1 or (self.waiting and self.waiting[0].n <= eng.num_slots - len(rows)):
            return 1
        return min(eng.multi_step, *(r.budget - len(r.ids) for r in rows))  # running rows have >= 1 left

    def _build_knobs(self, rows: list[Row], vocab: int) -> RowKnobs:
        return RowKnobs.build([r.request.params for r in rows], vocab, self.engine.device,
                              seeds=[r.seed for r in rows], steps=[len(r.ids) for r in rows])

    def _sample(self, rows: list[Row], logits: torch.Tensor, first_slot: int, knobs: RowKnobs) -> torch.Tensor:
        """Sample a token for ``rows`` (slots ``first_slot...``) without reading anything back
        (:func:`~minimind.infer.sampling.sample_packed`)."""
        seen = self.engine.seen[first_slot:first_slot + len(rows)] if knobs.any_penalty else None
        return sample_packed(logits, knobs, seen, logprobs=any(r.logprobs is not None for r in rows))

    def _push(self, rows: list[Row], host: list[list[float]]) -> None:
        """Record one step's tokens (``host`` from :meth:`_sample`) and tell the owners; rows already
        finished (earlier in a multi-step decode) ignore theirs."""
        lps = host[2] if len(host) > 2 else [None] * len(rows)
        for row, t, bad, lp in zip(rows, host[0], host[1], lps):
            if row.done:
                continue
            if bad:
                row.fail(f"the model's logits for this row are not finite (NaN or inf) at generated "
                         f"token {len(row.ids)}; the row was stopped")
                self._emit(row, -1, None)
                continue
            row.push(int(t), lp)
            self._emit(row, int(t), lp)

    def _emit(self, row: Row, token: int, logprob: float | None) -> None:
        req = row.request
        result = None
        if row.done:
            result = self.engine.make_result(row)
            req.results[row.index] = result
        if req.on_event is not None:
            req.on_event(TokenEvent(row.index, token, row.new_text(), logprob, row.finish_reason, result))

    def _drop_cancelled(self) -> None:
        for row in self.running:
            if row.request.cancelled and not row.done:
                row.finish("cancelled", None)
                row.request.results[row.index] = self.engine.make_result(row)
        for req in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(req)
        self._free_finished()

    def _free_finished(self) -> None:
        """Fill every finished row's slot with the last running row (slots stay contiguous)."""
        changed = False
        for slot in range(len(self.running) - 1, -1, -1):
            if not self.running[slot].done:
                continue
            last = len(self.running) - 1
            if slot != last:
                moved = self.running[last]
                self.engine.move_slot(last, slot, moved.cur_len)
                self.running[slot] = moved
            self.running.pop()
            changed = True
        if changed:
            self._knobs = None

    def _admit(self) -> None:
        eng = self.engine
        free = eng.num_slots - len(self.running)
        batch: list[Request] = []
        while self.waiting and self.waiting[0].n <= free:
            req = self.waiting.popleft()
            batch.append(req)
            free -= req.n
        if not batch:
            return
        first = len(self.running)
        heads, rows = [], []
        for req in batch:
            head = first + len(rows)
            heads.append(head)
            budget = min(req.params.max_new_tokens, eng.max_context - len(req.prompt_ids))
            for i in range(req.n):
                row = Row(req, i, budget, eng.new_decoder() if req.track_text else None)
                req.rows.append(row)
                rows.append(row)
        eng.reserve(first + len(rows), max(r.prompt_len + r.budget for r in rows))
        logits = eng.prefill(heads, [req.prompt_ids for req in batch])
        for req, head in zip(batch, heads):
            if req.n > 1:
                eng.copy_slot(head, list(range(head + 1, head + req.n)), len(req.prompt_ids))
        self.running.extend(rows)
        self._knobs = None  # the next decode covers every running row
        knobs = self._build_knobs(rows, logits.shape[-1])
        if knobs.any_penalty:
            eng.mark_seen(first, [req.prompt_ids for req in batch for _ in range(req.n)])
        repeats = torch.tensor([req.n for req in batch], device=logits.device)
        self._push(rows, self._sample(rows, logits.repeat_interleave(repeats, dim=0), first, knobs).tolist())


def expand_requests(prompts: Sequence[Sequence[int]], params: SamplingParams, n: int, logprobs: bool,
                    track_text: bool) -> list[Request]:
    """One request per prompt (token-id lists), validated for shape."""
    if not prompts:
        raise ValueError("no prompts given")
    if isinstance(prompts[0], int):
        raise TypeError("prompts must be a list of token-id lists, e.g. [[1, 2, 3]]")
    return [Request(list(p), params, n=n, logprobs=logprobs, track_text=track_text) for p in prompts]
