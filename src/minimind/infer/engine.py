"""The inference engine shared by chat, the API server, evaluation and RL rollouts.

One ``generate`` call serves a batch of prompts of different lengths:

* **Prefill** runs all prompts at once, right-padded to the longest, into a pre-allocated
  :class:`~minimind.model.KVCache` of ``max_prompt + max_new_tokens`` slots.  Every row's tokens
  sit at their true positions ``0..len-1`` (no left padding, so RoPE positions are exact), and
  plain causal attention is already correct for the real tokens of a right-padded row: they only
  look left.  Padding slots hold junk that no real query sees; row ``b``'s first generated token
  is later written over slot ``len_b``.
* Only one hidden state per row is turned into logits (the row's last prompt position, gathered
  per row) instead of ``[B, P, vocab]`` logits for every prompt position.
* **Decode** feeds one token per unfinished row at position ``cur_len - 1`` with a mask that lets a
  query at position ``p`` see slots ``<= p``.  The attended length ``kv_len = max(cur_len)`` is
  computed on the host from Python ints, so no GPU->CPU sync is spent on it; the one sync per step
  is reading the sampled ids, which streaming and stop checks need anyway.
* **Finished rows are compacted away**: when rows finish, the surviving rows' cache slices are
  moved to the front (one gather of ``kv_len`` slots, roughly the memory traffic of a single
  decode step) and the batch shrinks, so long stragglers do not pay for finished rows, and
  ``kv_len`` drops when the longest row is done.

The engine prints nothing; callers observe tokens through ``on_token`` or :meth:`stream`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch

from minimind.infer.sampling import SamplingParams, sample_next, seen_token_mask
from minimind.model.kv_cache import KVCache
from minimind.model.masks import cache_attention_mask
from minimind.model.modeling import MiniMindForCausalLM

FinishReason = Literal["stop", "length", "interrupted"]  # interrupted: Ctrl-C in chat
OnToken = Callable[[int, int], None]


@dataclass
class GenerationResult:
    """One row's outcome.

    ``token_ids`` are all sampled ids, including a terminating stop token (RL needs to score the
    decision to stop); ``text`` excludes that token and is cut before a matched stop string
    (``None`` without a tokenizer).  ``stop`` is the stop token id or stop string that ended the row.
    """

    token_ids: list[int]
    text: str | None
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    stop: int | str | None = None


class TextStream(Iterator[str]):
    """Iterator of text pieces; ``result`` holds the :class:`GenerationResult` once exhausted."""

    def __init__(self, pieces: Iterator[str]) -> None:
        self._pieces = pieces
        self.result: GenerationResult | None = None

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        try:
            return next(self._pieces)
        except StopIteration as done:
            self.result = done.value
            raise StopIteration from None

    def close(self) -> None:
        """Stop generating early (e.g. the client disconnected)."""
        self._pieces.close()  # type: ignore[attr-defined]


class _Row:
    """Host-side state of one request: its tokens, incremental text and stop checks."""

    def __init__(self, prompt_len: int, budget: int, params: SamplingParams,
                 decoder: Any | None) -> None:
        self.prompt_len = prompt_len
        self.budget = budget
        self.ids: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.stop: int | str | None = None
        self.decoder = decoder  # a StreamDecoder when text is tracked token by token
        self.text = ""
        self.safe_len = 0  # text[:safe_len] is final: it can no longer become part of a stop string
        self._stop_ids = frozenset(params.stop_token_ids)
        self._stop_strings = params.stop_strings
        self._hold = max((len(s) for s in self._stop_strings), default=1) - 1

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def cur_len(self) -> int:
        return self.prompt_len + len(self.ids)

    def push(self, token: int) -> None:
        self.ids.append(token)
        if token in self._stop_ids:
            self._finish("stop", token)
            return
        if self.decoder is not None:
            start = max(0, len(self.text) - self._hold)  # a new match must end in the new text
            self.text += self.decoder.put(token)
            if self._match_stop_string(start):
                return
            self.safe_len = len(self.text) - self._stop_prefix_len()
        if len(self.ids) >= self.budget:
            self._finish("length", None)

    def _finish(self, reason: FinishReason, stop: int | str | None) -> None:
        self.finish_reason, self.stop = reason, stop
        if self.decoder is not None:
            start = max(0, len(self.text) - self._hold)
            self.text += self.decoder.flush()
            self._match_stop_string(start)
            self.safe_len = len(self.text)

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


def _compact_cache(cache: KVCache, keep: torch.Tensor, upto: int) -> None:
    """Move the cache rows ``keep`` (slots ``:upto``) to the front, in order."""
    n = keep.numel()
    cache.k[:, :n, :, :upto] = cache.k[:, keep, :, :upto]
    cache.v[:, :n, :, :upto] = cache.v[:, keep, :, :upto]


class GenerationEngine:
    """Batched, streaming generation with a static KV cache.

    ``dtype`` is an autocast dtype (e.g. ``torch.bfloat16`` on CUDA); ``None`` or float32 runs in
    the model's own dtype.  ``max_batch_len`` caps the positions per row (prompt + completion)
    below ``config.max_position_embeddings`` to bound cache memory.  The model must expose
    ``model.model`` (the decoder) and ``model.lm_head``, as :class:`MiniMindForCausalLM` does.
    """

    def __init__(self, model: MiniMindForCausalLM, tokenizer: Any | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 max_batch_len: int | None = None) -> None:
        if device is not None:
            model = model.to(device)
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = None if dtype in (None, torch.float32) else dtype
        if max_batch_len is not None and max_batch_len < 2:
            raise ValueError(f"max_batch_len must be >= 2, got {max_batch_len}")
        self.max_batch_len = max_batch_len

    # ---- public API ----------------------------------------------------------------------------
    @property
    def max_context(self) -> int:
        """Positions a row may use (read live, so :func:`enable_yarn` after construction counts)."""
        limit = self.model.config.max_position_embeddings
        return min(limit, self.max_batch_len) if self.max_batch_len else limit

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None,
                 on_token: OnToken | None = None) -> list[GenerationResult]:
        """Complete every prompt (token ids); ``on_token(row, token_id)`` sees each sampled id.

        Rows finish independently on a stop token, a stop string or their token budget.
        """
        params = params or SamplingParams()
        rows = self._prepare(prompts, params, track_text=bool(params.stop_strings))
        for emitted in self._run(prompts, params, rows):
            if on_token is not None:
                for r in emitted:
                    on_token(r, rows[r].ids[-1])
        return [self._result(row) for row in rows]

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> TextStream:
        """Text pieces of one completion as they become final (complete UTF-8, not part of a
        possible stop string); ``.result`` of the returned stream holds the full result."""
        if self.tokenizer is None:
            raise ValueError("stream() needs a tokenizer")
        params = params or SamplingParams()
        rows = self._prepare([prompt_ids], params, track_text=True)

        def pieces() -> Iterator[str]:
            row, sent = rows[0], 0
            for _ in self._run([prompt_ids], params, rows):
                if row.safe_len > sent:
                    yield row.text[sent:row.safe_len]
                    sent = row.safe_len
            result = self._result(row)
            if result.text and len(result.text) > sent:
                yield result.text[sent:]
            return result

        return TextStream(pieces())

    def chat_prompt_ids(self, messages: Sequence[Mapping[str, Any]],
                        tools: Sequence[Mapping[str, Any]] | None = None,
                        open_thinking: bool = False) -> list[int]:
        """Token ids of ``messages`` rendered with the chat template plus the generation prompt."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer")
        text = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                  tokenize=False, open_thinking=open_thinking)
        return list(self.tokenizer.encode(text))

    def chat(self, messages: Sequence[Mapping[str, Any]], params: SamplingParams | None = None,
             tools: Sequence[Mapping[str, Any]] | None = None,
             open_thinking: bool = False) -> GenerationResult:
        """One assistant reply to ``messages`` (OpenAI-style dicts)."""
        return self.generate([self.chat_prompt_ids(messages, tools, open_thinking)], params)[0]

    # ---- internals -----------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _prepare(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 track_text: bool) -> list[_Row]:
        """Validate prompts and create the per-row state (budgets follow the cache length)."""
        if not prompts:
            raise ValueError("no prompts given")
        if isinstance(prompts[0], int):
            raise TypeError("prompts must be a list of token-id lists, e.g. [[1, 2, 3]]")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to decode text")
        limit, vocab = self.max_context, self.model.config.vocab_size
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            if len(p) >= limit:
                raise ValueError(f"prompt {i} has {len(p)} tokens but the model holds at most {limit} "
                                 f"positions (max_position_embeddings / max_batch_len); shorten it "
                                 f"or enable YaRN for a longer context")
            if min(p) < 0 or max(p) >= vocab:
                raise ValueError(f"prompt {i} has token ids outside [0, {vocab})")
        cache_len = min(max(len(p) for p in prompts) + params.max_new_tokens, limit)
        rows = []
        for p in prompts:
            decoder = None
            if track_text and self.tokenizer is not None:
                from minimind.tokenizer import StreamDecoder
                decoder = StreamDecoder(self.tokenizer)
            rows.append(_Row(len(p), min(params.max_new_tokens, cache_len - len(p)), params, decoder))
        return rows

    def _result(self, row: _Row) -> GenerationResult:
        text = None
        if self.tokenizer is not None:
            if row.decoder is not None:
                text = row.text
            else:
                content = row.ids[:-1] if isinstance(row.stop, int) else row.ids
                text = self.tokenizer.decode(content)
        return GenerationResult(token_ids=list(row.ids), text=text,
                                finish_reason=row.finish_reason or "length",
                                prompt_tokens=row.prompt_len, completion_tokens=len(row.ids),
                                stop=row.stop)

    def _hidden(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache) -> torch.Tensor:
        with self._autocast():
            hidden, _ = self.model.model(ids, pos, mask, cache)
        return hidden

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.model.lm_head(hidden).float()

    @torch.inference_mode()
    def _run(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
             rows: list[_Row]) -> Iterator[list[int]]:
        """Drive prefill and decode; after each step yield the row indices that got a token."""
        model, dev = self.model, self.device
        was_training = model.training
        model.eval()
        try:
            lens = [r.prompt_len for r in rows]
            width = max(lens)
            cache_len = max(r.prompt_len + r.budget for r in rows)
            kv_dtype = self.dtype or next(model.parameters()).dtype
            cache = KVCache(model.config, len(rows), cache_len, dev, kv_dtype)
            pad = model.config.pad_token_id
            ids = torch.tensor([list(p) + [pad] * (width - len(p)) for p in prompts],
                               dtype=torch.long).to(dev)
            lens_t = torch.tensor(lens, dtype=torch.long).to(dev)
            positions = torch.arange(width, device=dev)
            hidden = self._hidden(ids, positions.expand(len(rows), width), None, cache)
            logits = self._logits(hidden[torch.arange(len(rows), device=dev), lens_t - 1])
            seen = None
            if params.repetition_penalty != 1.0:
                valid = positions.unsqueeze(0) < lens_t.unsqueeze(1)
                seen = seen_token_mask(ids, model.config.vocab_size, valid)
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=dev).manual_seed(params.seed)

            active = list(range(len(rows)))  # batch slot -> row index
            pos = lens_t  # position at which each slot's next fed token is written
            while True:
                tok = sample_next(logits, params, seen, generator)
                for slot, t in enumerate(tok.tolist()):
                    rows[active[slot]].push(t)
                yield list(active)
                keep = [s for s, r in enumerate(active) if not rows[r].done]
                if not keep:
                    return
                if seen is not None:
                    seen[torch.arange(len(active), device=dev), tok] = True
                kv_len = max(rows[active[s]].cur_len for s in keep)
                if len(keep) < len(active):
                    idx = torch.tensor(keep, dtype=torch.long).to(dev)
                    _compact_cache(cache, idx, kv_len)
                    tok, pos = tok[idx], pos[idx]
                    seen = seen[idx] if seen is not None else None
                    active = [active[s] for s in keep]
                step_pos = pos.unsqueeze(1)
                mask = cache_attention_mask(step_pos, kv_len)
                hidden = self._hidden(tok.unsqueeze(1), step_pos, mask, cache)
                logits = self._logits(hidden[:, -1])
                pos = pos + 1
        finally:
            model.train(was_training)
