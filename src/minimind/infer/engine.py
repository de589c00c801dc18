"""The inference engine shared by chat, the API server, evaluation and RL rollouts.

The core is a **slot-addressed KV cache** (:class:`~minimind.model.KVCache`): ``S`` slots, each
holding one sequence at its true positions ``0..len-1`` (no left padding, so RoPE positions are
exact).  Three primitives act on slots, all through the model's own ``forward`` (so a compiled or
wrapped model works unchanged):

* :meth:`GenerationEngine.prefill` ``(slots, prompts)`` runs right-padded prompts in one pass, writes
  their keys/values into the given slots and returns the logits of each prompt's last token only
  (not ``[B, P, vocab]``).  Plain causal attention is exact for the real tokens of a right-padded
  row: they only look left; padding writes junk that no real query ever sees.
* :meth:`GenerationEngine.decode_step` ``(count, tokens, positions)`` feeds one token to each of the
  slots ``0..count-1``, each at its own position, with a mask letting a query at position ``p`` see
  slots ``<= p`` of its own row.  The attended length comes from host ints (no device sync).
* :meth:`GenerationEngine.copy_slot` / :meth:`GenerationEngine.move_slot` copy a prompt's keys into
  the slots of its other samples and keep the busy slots contiguous.

:class:`~minimind.infer.scheduler.Scheduler` runs continuous batching on top (requests join and
leave at any step, per-row sampling settings).  ``generate``, ``stream`` and ``chat`` below, the
server's :class:`~minimind.infer.service.EngineService`, evaluation and RL rollouts are thin drivers
over it.

**Weights in the compute dtype.**  With ``dtype=torch.bfloat16`` the engine keeps its own bf16 copy
of the model instead of autocasting, which would re-cast every weight at every decode step; the
copy is refreshed from the training model with :meth:`GenerationEngine.refresh_weights` (RL does this
after each optimizer step).  In the model's own dtype the engine uses the model itself.

The engine prints nothing; callers observe tokens through callbacks or :meth:`stream`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from minimind.infer.decode_attention import use_decode_attention_
from minimind.infer.fuse import fuse_bf16_projections_, fuse_int8_projections_
from minimind.infer.quant import quantize_model_, use_avx2_kernel_, use_gemv_, use_onednn_
from minimind.infer.sampling import RowKnobs, SamplingParams, sample_packed, seen_token_mask
from minimind.infer.scheduler import (
    FinishReason,
    GenerationResult,
    Request,
    Row,
    Scheduler,
    TokenEvent,
    expand_requests,
)
from minimind.model.kv_cache import KVCache
from minimind.model.masks import cache_attention_mask
from minimind.model.modeling import MiniMindForCausalLM

__all__ = ["FinishReason", "GenerationEngine", "GenerationResult", "TextStream", "TokenEvent", "compile_mode"]

OnToken = Callable[[int, int], None]
# compile="frozen": weights become constants of the graph, so inductor may prepack them and pick its
# own GEMM kernels by timing them (the CPP backend's micro-kernels beat _weight_int8pack_mm at one row).
# No epilogue fusion: with the whole step in one graph, inductor (torch 2.13) fused the v-projection's
# cache write into its CPP GEMM template and failed an indexing assertion at compile time.
# Every compiled decode step: no size/stride asserts on the graph's inputs (the cache and the weights,
# whose shapes and strides dynamo's guards already check): ~150 asserts, ~60 us of a 2.4 ms int8 step.
_COMPILE_OPTIONS = {"size_asserts": False}
_FROZEN_OPTIONS = {**_COMPILE_OPTIONS, "freezing": True, "max_autotune": True,
                   "max_autotune_gemm_backends": "CPP,ATEN", "epilogue_fusion": False}
_MIN_CACHE_LEN = 256
# Compiled decode attends over the used cache length rounded up to a multiple of this: the second
# length a graph meets recompiles it once with the length symbolic, and no step reads more than
# _KV_BUCKET - 1 unused positions (attending over a whole 8k cache for a 100-token chat would).
_KV_BUCKET = 64
_MULTI_STEP = 8  # default tokens per host read off the CPU (see GenerationEngine.multi_step)


def compile_mode(enabled: bool, device: torch.device | str) -> bool | str:
    """The engine's ``compile`` for a command's ``--compile 1`` on ``device``: the decode step replayed
    as a CUDA graph on CUDA (7.0x the eager engine at one and at eight rows on an H200, against 2.9x
    and 2.6x for the compiled step alone), inductor's fused kernels elsewhere."""
    if not enabled:
        return False
    return "cudagraphs" if torch.device(device).type == "cuda" else True


class TextStream(Iterator[str]):
    """Iterator of text pieces; ``result`` holds the :class:`GenerationResult` once exhausted."""

    def __init__(self, pieces: Iterator[str]) -> None:
        self._pieces = pieces
        self.result: GenerationResult | None = None

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        try:
            return next(self._pieces)
        except StopIteration as done:
            self.result = done.value
            raise StopIteration from None

    def close(self) -> None:
        """Stop generating early (e.g. the client disconnected); the slot is freed."""
        self._pieces.close()  # type: ignore[attr-defined]


class GenerationEngine:
    """Slots, prefill/decode primitives and the synchronous drivers.

    ``dtype`` is the compute dtype (``None`` = the model's own); ``max_batch_len`` caps the positions
    per row (prompt + completion) below ``config.max_position_embeddings``; ``num_slots`` is how many
    rows decode together (``generate`` raises it for a larger batch); ``compile`` runs the decode step
    through ``torch.compile``, attending over the used cache length rounded up to 64 positions (a
    graph that writes the cache in place; torch's automatic dynamic shapes: the first graph is
    specialised, a new row count or attended length recompiles once with that size symbolic):
    measured on a 2-core AVX2 EPYC, fp32 and int8 steps 1.3-1.6x faster than eager after ~30-40 s
    per compile; ``compile="frozen"``
    also compiles the weights in as constants (inductor ``freezing`` with ``max_autotune``: its own
    prepacked CPU GEMV/GEMM kernels: the 57 int8 products of a minimind-3 step alone ran 1.35x
    faster at one row, whole one-row int8 steps 1.0-1.46x in A/B runs on a loaded 2-core Xeon, so
    it stays opt-in; bf16 steps were slower; a compile takes ~100 s per batch shape, seconds once
    inductor's cache holds it) — for fixed weights only: it needs the engine's own weight copy and
    :meth:`refresh_weights` raises (build a new engine instead); ``compile="cudagraphs"`` (CUDA
    only) compiles the decode step in inductor's ``reduce-overhead`` mode, which replays it as a CUDA
    graph.  ``quantize="int8"`` stores the block matrices and LM head of the engine's own weight copy as int8 (see
    :mod:`minimind.infer.quant`; the model passed in is never modified).  ``onednn`` (default on)
    lets the engine's own CPU weight copy use oneDNN-packed weights where the CPU runs them natively
    (bf16 linears, also inside compiled decode from two rows on; int8 products of 2-32 rows in eager
    decode; :mod:`minimind.infer.onednn`, checked at load), and int8 products of 1-8 rows use
    :mod:`minimind.infer.avx2_int8` on CPUs without int8 dot-product instructions (1-16 rows on its
    AVX-512 VNNI tile where the CPU has that), bf16 products through :mod:`minimind.infer.avx2_bf16`
    on CPUs without native bf16;
    ``onednn=False`` keeps the plain kernels (``torch.mv`` for single rows).  With ``quantize``, and
    for bf16 on the AVX2 bf16 kernel, the q/k/v and the gate/up products of each block become one
    product each (``fuse``, default on; exact, :mod:`minimind.infer.fuse`).  The cache grows on
    demand (more slots, longer rows) and keeps its contents when it does.  ``multi_step`` is how
    many tokens each row decodes before the host reads them back (default 1 on a CPU, 8 elsewhere):
    the same tokens as single steps, with the host no longer waiting on the device for each one.
    """

    def __init__(self, model: MiniMindForCausalLM, tokenizer: Any | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 max_batch_len: int | None = None, num_slots: int = 8, compile: bool | str = False,
                 quantize: str | None = None, onednn: bool = True, fuse: bool = True,
                 multi_step: int | None = None) -> None:
        if device is not None:
            model = model.to(device)
        if max_batch_len is not None and max_batch_len < 2:
            raise ValueError(f"max_batch_len must be >= 2, got {max_batch_len}")
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.source = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        own = next(model.parameters()).dtype
        self.dtype = dtype or own
        self.model = model if self.dtype == own else _inference_copy(model, self.dtype)
        self.quantize = quantize
        self.onednn_layers = 0  # layers on oneDNN-packed weights (0: the plain kernels everywhere)
        self.avx2_layers = 0  # layers on our AVX2 kernels (int8 or bf16)
        self.fused_layers = 0  # q/k/v and gate/up products fused into one each (int8, or bf16 on AVX2)
        self.attention_layers = 0  # layers attending decode steps through our kernel
        if quantize is not None:  # refresh_weights re-quantizes: Int8Linear loads float weights
            base = _inference_copy(model, self.dtype) if self.model is model else self.model
            self.model = quantize_model_(base, quantize)
            # q/k/v and gate/up as one product each (minimind.infer.fuse): 33 products per minimind-3
            # step instead of 57; the kernels chosen below pack the fused layers only.
            self.fused_layers = fuse_int8_projections_(self.model) if fuse else 0
        self._shares_source = False
        if self.model is model and self.device.type == "cpu":
            # The caller's dtype: decode through a view of its model -- our own modules (so the layer
            # swaps below leave the caller's model alone) over the caller's very parameters and
            # buffers (so in-place updates, e.g. an RL policy's, are what the next rollout uses).
            self.model, self._shares_source = _weight_sharing_view(model), True
        if self.model is not model and self.device.type == "cpu":
            # Few-row products through GemvLinear: float32 split into one row block per thread
            # (torch's own runs on one thread: 1.7x at one row on 2 cores), one bf16 row through
            # torch.mv (1.3x), with the same logits up to summation order.
            use_gemv_(self.model)
            # oneDNN-packed weights where this CPU has the native kernels (same results): measured
            # decode steps of 8 rows 1.29x (bf16) / 1.16x (int8) faster, one row unchanged.  Compiled
            # decode calls the packed bf16 products through an op (minimind.infer.onednn; 8-row steps
            # 8.3 -> 5.5 ms on an AVX-512 BF16 EPYC); int8 there stays on the kernels below, and
            # compile="frozen" on inductor's own.  Packed and fused weights are copies: a view of the
            # caller's weights keeps the kernels that read them in place, or in-place updates (an RL
            # policy's) would never reach decode.
            copies = not self._shares_source
            self.onednn_layers = (use_onednn_(self.model, int8=not compile)
                                  if onednn and compile != "frozen" and copies else 0)
            # Our AVX2 kernels, opaque ops that compiled graphs call too: int8 few-row products in
            # integers (minimind.infer.avx2_int8: up to 8 rows without int8 dot products, 1-2 with them,
            # where it streams the weights ~1.9x faster than _weight_int8pack_mm), bf16 on a CPU without
            # native bf16 (minimind.infer.avx2_bf16: 3.1x the tokens/s at 8 rows).
            self.avx2_layers = use_avx2_kernel_(self.model) if onednn else 0
            if fuse and not quantize and copies:  # bf16, packed or on the AVX2 kernel: 33 calls a step, not 57
                self.fused_layers = fuse_bf16_projections_(self.model)
            # One query per row over the cache: our kernel instead of torch's attention kernels, whose
            # per-call cost is several times the arithmetic (minimind.infer.decode_attention).
            self.attention_layers = use_decode_attention_(self.model) if onednn else 0
        # torch.compile fuses the many small per-token kernels (norms, RoPE, casts, cache writes) of
        # the decode step.  Compiled decode attends over the used length rounded up to _KV_BUCKET under
        # the mask, so the attended length is not a shape that changes every step; it and the row count
        # change rarely, and each change recompiles once with that size symbolic (dynamic=None: measured
        # as fast as static graphs at 1, 3 and 8 rows).  Prefill, whose shapes vary, stays eager.
        if compile not in (False, True, "frozen", "cudagraphs"):
            raise ValueError(f"compile must be False, True, 'frozen' or 'cudagraphs', got {compile!r}")
        if compile == "cudagraphs" and self.device.type != "cuda":
            raise ValueError("compile='cudagraphs' replays CUDA graphs: it needs a CUDA device")
        self.frozen = compile == "frozen"
        # compile="cudagraphs": inductor's "reduce-overhead" mode records each decode graph once per
        # row count and replays it, one launch for the whole step instead of hundreds of small ones.
        # The graph writes the KV cache in place, which a replay may only do to tensors whose address
        # never changes: reserve() marks each new cache's k/v as such static inputs.
        self._cudagraphs = compile == "cudagraphs"
        if self.frozen and (self._shares_source or self.model is model):
            raise ValueError("compile='frozen' compiles the weights in as constants, so it needs the engine's "
                             "own weight copy: pass a dtype or quantize that differs from the model's")
        options = _FROZEN_OPTIONS if self.frozen else _COMPILE_OPTIONS
        if self._cudagraphs:
            self._decode_call = torch.compile(self.model, mode="reduce-overhead", dynamic=False)
        else:
            self._decode_call = torch.compile(self.model, dynamic=None, options=options) if compile else None
        # compile=True on a CPU: the step and its sampling as one graph (decode_and_sample), so the
        # ~35 small sampling ops (temperature, top-k / top-p, the counter-based draw) run as fused
        # kernels, not one dispatch each, and one dynamo lookup serves both.  Measured on a 2-core
        # AVX-512 BF16 EPYC: the eager sampling took ~0.3 ms of a 2.3 ms int8 step at one row.  Seeded
        # rows draw what eager decode draws (counter-based); unseeded rows draw from inductor's own
        # generator (seeded by torch.manual_seed too, but another stream than eager's).
        self._sample_call = (torch.compile(decode_and_sample_step, dynamic=None, options=_COMPILE_OPTIONS)
                             if compile is True and self.device.type == "cpu" else None)
        if multi_step is not None and multi_step < 1:
            raise ValueError(f"multi_step must be >= 1, got {multi_step}")
        # Tokens decoded per host read (Scheduler._steps_ahead).  On a CPU the host and the "device"
        # are the same cores, so waiting for each token costs nothing and a finished row's extra
        # steps would: 1.  On an accelerator the host queues the next steps while the device runs.
        self.multi_step = multi_step or (1 if self.device.type == "cpu" else _MULTI_STEP)
        self.max_batch_len = max_batch_len
        self.num_slots = num_slots
        self.cache: KVCache | None = None
        self.seen: torch.Tensor = torch.zeros(0, model.config.vocab_size, dtype=torch.bool, device=self.device)
        self.scheduler = Scheduler(self)

    # ---- weights -------------------------------------------------------------------------------
    @torch.no_grad()
    def refresh_weights(self, source: nn.Module | Mapping[str, torch.Tensor] | None = None) -> None:
        """Copy the training weights (``source``, default the model given at construction) into the
        inference weights, casting to the compute dtype.  A no-op when they are the same tensors."""
        src = self.source if source is None else source
        if src is self.model or (src is self.source and self._shares_source):
            return
        if self.frozen:
            raise RuntimeError("this engine's decode step has its weights compiled in (compile='frozen'); "
                               "build a new engine for new weights")
        state = src.state_dict() if isinstance(src, nn.Module) else src
        self.model.load_state_dict(state)

    # ---- limits and validation -----------------------------------------------------------------
    @property
    def max_context(self) -> int:
        """Positions a row may use (read live, so :func:`enable_yarn` after construction counts)."""
        limit = self.model.config.max_position_embeddings
        return min(limit, self.max_batch_len) if self.max_batch_len else limit

    def check_prompt(self, ids: Sequence[int], n: int = 1) -> None:
        """Raise ``ValueError`` naming the limit for a prompt the engine cannot complete."""
        limit, vocab = self.max_context, self.model.config.vocab_size
        if len(ids) == 0:
            raise ValueError("the prompt is empty")
        if len(ids) >= limit:
            raise ValueError(f"the prompt has {len(ids)} tokens but this model holds at most {limit} "
                             f"positions (prompt + completion; max_position_embeddings / max_batch_len); "
                             f"shorten it or enable YaRN for a longer "
                             f"context")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"the prompt has token ids outside [0, {vocab})")
        if not 1 <= n <= self.num_slots:
            raise ValueError(f"n must be between 1 and {self.num_slots} (the engine's slots), got {n}")

    # ---- slot primitives -----------------------------------------------------------------------
    def reserve(self, slots: int, length: int) -> None:
        """Make the cache hold ``slots`` slots of ``length`` positions, keeping what it holds."""
        cur = self.cache
        if cur is not None and cur.batch_size >= slots and cur.max_len >= length:
            return
        n = max(slots, cur.batch_size if cur else 0, self.num_slots)
        want = max(length, 2 * cur.max_len if cur else _MIN_CACHE_LEN)
        new = KVCache(self.model.config, n, min(want, self.max_context), self.device, self.dtype)
        if self._cudagraphs:
            torch._dynamo.mark_static_address(new.k)
            torch._dynamo.mark_static_address(new.v)
        seen = torch.zeros(n, self.model.config.vocab_size, dtype=torch.bool, device=self.device)
        if cur is not None:
            new.k[:, :cur.batch_size, :, :cur.max_len] = cur.k
            new.v[:, :cur.batch_size, :, :cur.max_len] = cur.v
            seen[:cur.batch_size] = self.seen
        self.cache, self.seen = new, seen

    @torch.inference_mode()
    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Write the prompts' keys/values into ``slots``; float32 logits ``[len(prompts), V]`` of each
        prompt's last token."""
        lens = [len(p) for p in prompts]
        self.reserve(max(slots) + 1, max(lens))
        width, pad = max(lens), self.model.config.pad_token_id
        ids = torch.tensor([list(p) + [pad] * (width - len(p)) for p in prompts], dtype=torch.long)
        ids = ids.to(self.device)
        pos = torch.arange(width, device=self.device).expand(len(prompts), width)
        last = torch.tensor(lens, dtype=torch.long).to(self.device) - 1
        out = self._forward(ids, pos, None, self.cache.slots(list(slots)), last)
        return out[:, -1].float()

    @torch.inference_mode()
    def decode_step(self, count: int, tokens: Sequence[int] | torch.Tensor,
                    positions: Sequence[int] | torch.Tensor, max_position: int | None = None) -> torch.Tensor:
        """Feed ``tokens[i]`` at ``positions[i]`` into slot ``i`` for ``i < count``; float32 logits
        ``[count, V]``.  Tokens and positions may be device tensors ``[count]`` (a multi-step decode
        feeds the last step's samples without reading them); ``max_position`` (their maximum, a
        host int) is then required, as it sets the attended length without a device read."""
        if max_position is None:
            if isinstance(positions, torch.Tensor):
                raise ValueError("decode_step needs max_position when positions are a tensor")
            max_position = max(positions)
        tok, pos, mask = self._step_inputs(count, tokens, positions, max_position)
        out = self._forward(tok, pos, mask, self.cache.slots(slice(0, count)), 1, self._decode_call)
        if self._cudagraphs:  # a replay's output lives in the graph's pool: the next replay overwrites it
            return out[:count, -1].float().clone()
        return out[:count, -1].float()

    @torch.inference_mode()
    def decode_and_sample(self, count: int, tokens: torch.Tensor, positions: torch.Tensor, max_position: int,
                          knobs: RowKnobs, seen: torch.Tensor | None = None, logprobs: bool = False) -> torch.Tensor:
        """:meth:`decode_step` then :func:`~minimind.infer.sampling.sample_packed` of its logits: float64
        ``[2 or 3, count]`` (tokens, error flags, log-probs), nothing read back.  A CPU engine with
        ``compile=True`` runs both as one compiled graph; the others call the two in turn."""
        if self._sample_call is None:
            return sample_packed(self.decode_step(count, tokens, positions, max_position), knobs, seen, logprobs)
        tok, pos, mask = self._step_inputs(count, tokens, positions, max_position)
        with _eval_mode(self.model):
            return self._sample_call(self.model, tok, pos, mask, self.cache.slots(slice(0, count)), knobs, seen,
                                     logprobs)

    def _step_inputs(self, count: int, tokens: Sequence[int] | torch.Tensor, positions: Sequence[int] | torch.Tensor,
                     max_position: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token and position columns ``[count, 1]`` and the attention mask of one decode step."""
        kv_len = max_position + 1
        if self._cudagraphs:  # the cache's whole length: one recorded graph per row count
            kv_len = self.cache.max_len
        elif self._decode_call is not None:  # the used length, rounded up: a new shape every _KV_BUCKET
            kv_len = min(self.cache.max_len, -(-kv_len // _KV_BUCKET) * _KV_BUCKET)
        tok = torch.as_tensor(tokens, dtype=torch.long).view(count, 1).to(self.device)
        pos = torch.as_tensor(positions, dtype=torch.long).view(count, 1).to(self.device)
        return tok, pos, cache_attention_mask(pos, kv_len)

    def copy_slot(self, src: int, dst: Sequence[int], length: int) -> None:
        """Copy positions ``:length`` of slot ``src`` into ``dst`` (n samples share one prefill)."""
        self.cache.copy_slot(src, list(dst), length)

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Move a row's keys/values and seen-token mask from slot ``src`` to slot ``dst``."""
        self.cache.copy_slot(src, [dst], length)
        self.seen[dst] = self.seen[src]

    def mark_seen(self, first: int, prompts: Sequence[Sequence[int]]) -> None:
        """Set the seen-token masks of slots ``first...`` from their prompts (repetition penalty)."""
        width = max(len(p) for p in prompts)
        ids = torch.tensor([list(p) + [0] * (width - len(p)) for p in prompts], dtype=torch.long)
        valid = torch.arange(width).unsqueeze(0) < torch.tensor([len(p) for p in prompts]).unsqueeze(1)
        mask = seen_token_mask(ids, self.model.config.vocab_size, valid)
        self.seen[first:first + len(prompts)] = mask.to(self.device)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, cache: Any,
                 keep: int | torch.Tensor, call: Callable[..., Any] | None = None) -> torch.Tensor:
        with _eval_mode(self.model):
            fn = call if call is not None else self.model
            return fn(ids, pos, mask, kv_cache=cache, logits_to_keep=keep).logits

    # ---- rows -> results -----------------------------------------------------------------------
    def new_decoder(self) -> Any | None:
        if self.tokenizer is None:
            return None
        from minimind.tokenizer import StreamDecoder
        return StreamDecoder(self.tokenizer)

    def make_result(self, row: Row) -> GenerationResult:
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
                                stop=row.stop, logprobs=list(row.logprobs) if row.logprobs is not None else None,
                                error=row.error)

    # ---- synchronous drivers -------------------------------------------------------------------
    def run(self, requests: Sequence[Request]) -> None:
        """Step the scheduler until ``requests`` are finished (other queued requests advance too)."""
        while not all(r.done for r in requests):
            self.scheduler.step()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None,
                 on_token: OnToken | None = None, n: int = 1, logprobs: bool = False
                 ) -> list[GenerationResult]:
        """Complete every prompt (token ids) ``n`` times; results are prompt-major
        (``results[i * n + j]`` is sample ``j`` of prompt ``i``).  ``on_token(row, token_id)`` sees
        each sampled id.  Rows finish independently on a stop token, a stop string or their budget.
        """
        params = params or SamplingParams()
        requests = expand_requests(prompts, params, n, logprobs, track_text=bool(params.stop_strings))
        with self.scheduler.lock:
            if not self.scheduler.has_work:  # a batch call decodes all its rows together
                self.num_slots = max(self.num_slots, len(requests) * n)
            for i, req in enumerate(requests):
                if on_token is not None:
                    req.on_event = lambda ev, base=i * n: on_token(base + ev.index, ev.token_id)
                self.scheduler.add(req)
            self.run(requests)
        return [res for req in requests for res in req.results]  # type: ignore[misc]

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> TextStream:
        """Text pieces of one completion as they become final (complete UTF-8, not part of a
        possible stop string); ``.result`` of the returned stream holds the full result."""
        if self.tokenizer is None:
            raise ValueError("stream() needs a tokenizer")
        pieces: list[str] = []
        req = Request(list(prompt_ids), params or SamplingParams(),
                      on_event=lambda ev: pieces.append(ev.text) if ev.text else None)
        self.scheduler.add(req)

        def run() -> Iterator[str]:
            try:
                while not req.done:
                    self.scheduler.step()
                    yield from pieces
                    pieces.clear()
                return req.results[0]
            finally:
                if not req.done:  # closed early: free the slot now so the engine is reusable
                    self.scheduler.cancel(req)
                    self.scheduler.step()

        return TextStream(run())

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


def decode_and_sample_step(model: nn.Module, tok: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, cache: Any,
                           knobs: RowKnobs, seen: torch.Tensor | None, logprobs: bool) -> torch.Tensor:
    """One decode step of ``model`` and the sampling of its last logits (what a compiled engine
    compiles as one graph, :meth:`GenerationEngine.decode_and_sample`)."""
    logits = model(tok, pos, mask, kv_cache=cache, logits_to_keep=1).logits
    return sample_packed(logits[:, -1].float(), knobs, seen, logprobs)


def _inference_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A frozen eval-mode copy of ``model`` with its parameters in ``dtype``.

    Buffers (the RoPE tables) stay float32: the model casts them per step, and bf16 tables would
    lose the low bits of large positions' angles."""
    clone = copy.deepcopy(model).eval()
    for p in clone.parameters():
        p.requires_grad_(False)
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    return clone


def _weight_sharing_view(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that holds the very same parameters, buffers and config objects
    (nothing numeric is copied): layers of the copy can be swapped without touching ``model``, and
    any in-place change to ``model``'s weights is the copy's too."""
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None:
            memo[id(config)] = config
    return copy.deepcopy(model, memo)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run in eval mode (no dropout) and restore a training model afterwards."""
    if not model.training:
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train()
