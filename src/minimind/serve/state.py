"""What every route group of the server shares: the engine service, the limits, the admission gate.

A route group is registered with one call, ``register_xxx(app, state)``, and reads everything it
needs from :class:`ServerState` (found again at ``app.state.server``), so adding a group (e.g. the RL
rollout routes) does not touch the others.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from minimind.infer.sampling import SamplingParams
from minimind.infer.scheduler import GenerationResult
from minimind.infer.service import EngineService
from minimind.serve.admission import AdmissionGate, QueueFull, Ticket
from minimind.serve.errors import APIError
from minimind.serve.schemas import SamplingFields
from minimind.tokenizer.byte_level import token_bytes

__all__ = ["DEFAULT_TEMPERATURE", "DEFAULT_TOP_P", "Prepared", "ServerLimits", "ServerState",
           "generation_failed", "row_error"]

#: OpenAI's defaults, so a request means the same thing here as elsewhere.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
#: Temperatures below this are treated as 0 (greedy).
MIN_TEMPERATURE = 1e-5
#: Seconds a client is asked to wait after a 429.
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ServerLimits:
    """Per-request and per-server limits (each one a ``minimind serve`` flag)."""

    max_tokens_cap: int = 4096  # --max_tokens_cap: completion tokens per request
    max_rows_per_request: int = 256  # --max_rows_per_request: prompts x n in one request
    max_queue_rows: int = 1024  # --max_queue: rows waiting for a slot, all requests together

    def __post_init__(self) -> None:
        for name in ("max_tokens_cap", "max_rows_per_request"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue_rows < 0:
            raise ValueError(f"max_queue_rows must be >= 0, got {self.max_queue_rows}")


@dataclass
class Prepared:
    """A validated prompt ready to submit."""

    ids: list[int]
    params: SamplingParams
    text: str | None = None  # the prompt text (completions with echo)


def generation_failed(exc: BaseException) -> APIError:
    """A whole engine step failed (every request in it hears about it)."""
    return APIError(500, f"generation failed: {exc.__cause__ or exc}", type_="server_error")


def row_error(result: GenerationResult | None) -> APIError | None:
    """The error of a sample that the engine ended alone (its numbers went non-finite), or None.

    The engine marks such a row ``finish_reason == "error"`` with a message in ``result.error``; only
    the request owning it fails, every other row decodes on.
    """
    if result is None or result.finish_reason != "error":
        return None
    detail = getattr(result, "error", None) or "the sample's probabilities were not finite"
    return APIError(500, f"generation failed for this request: {detail}", type_="server_error",
                    code="generation_error")


class ServerState:
    """State shared by the handlers of one app: the service, limits, gate and the model's tokenizer."""

    def __init__(self, service: EngineService, model_name: str, limits: ServerLimits) -> None:
        self.service = service
        self.engine = service.engine
        self.tokenizer = service.engine.tokenizer
        if self.tokenizer is None:
            raise ValueError("the engine has no tokenizer: the server needs one to render chats")
        self.model_name = model_name
        self.limits = limits
        self.gate = AdmissionGate(service, limits.max_queue_rows)
        self.created = int(time.time())

    @property
    def max_tokens_cap(self) -> int:
        return self.limits.max_tokens_cap

    # ---- request checks --------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        """404 for a model this server does not serve (as OpenAI answers); no name = the served one."""
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           "model", "model_not_found")

    def check_rows(self, n: int, prompts: int = 1) -> None:
        """``n`` against the slots, and prompts x n against ``--max_rows_per_request``."""
        if prompts < 1:
            raise APIError(400, "no prompt given", "prompt")
        slots = self.engine.num_slots
        if n > slots:
            raise APIError(400, f"n is {n}, but this server decodes at most {slots} sequences of one "
                                f"prompt together (--slots)", "n")
        cap = self.limits.max_rows_per_request
        if prompts * n > cap:
            raise APIError(400, f"this request asks for {prompts} prompt(s) x n={n} = {prompts * n} "
                                f"completions, but this server allows at most {cap} per request "
                                f"(--max_rows_per_request)", "prompt" if prompts > 1 else "n",
                           "too_many_completions")

    # ---- request -> prompt + sampling ------------------------------------------------------------
    def sampling(self, req: SamplingFields, requested: int | None, prompt_len: int, what: str) -> SamplingParams:
        """Sampling settings with the token budget checked against the cap and the context."""
        cap, ctx = self.max_tokens_cap, self.engine.max_context
        if requested is not None and requested > cap:
            raise APIError(400, f"max_tokens is {requested}, but this server allows at most {cap} "
                                f"completion tokens per request", "max_tokens", "max_tokens_exceeded")
        room = ctx - prompt_len
        if requested is None:
            if room < 1:
                raise APIError(400, f"this model's maximum context length is {ctx} tokens; the {what} use "
                                    f"{prompt_len}, leaving no room for a completion", what,
                               "context_length_exceeded")
            requested = min(cap, room)
        elif prompt_len + requested > ctx:
            raise APIError(400, f"this model's maximum context length is {ctx} tokens; the {what} use "
                                f"{prompt_len} and max_tokens asks for {requested} more "
                                f"({prompt_len + requested} in total). Shorten the {what} or lower max_tokens.",
                           what, "context_length_exceeded")
        temperature = DEFAULT_TEMPERATURE if req.temperature is None else req.temperature
        top_p = DEFAULT_TOP_P if req.top_p is None else req.top_p
        if temperature < MIN_TEMPERATURE:
            # Dividing logits by a denormal temperature overflows to inf/NaN; such a temperature means greedy.
            temperature = 0.0
        if top_p < 1.0 / self.engine.model.config.vocab_size:
            # The most likely token has probability >= 1/V, so a nucleus this small is that token alone:
            # greedy, exactly (and 1e-46 would round to 0 in float32 inside the sampler).
            temperature = 0.0
        try:
            return SamplingParams(
                max_new_tokens=requested, temperature=temperature,
                top_k=max(req.top_k or 0, 0),
                top_p=1.0 if temperature == 0 else top_p,
                repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                stop_token_ids=() if req.ignore_eos else (self.tokenizer.eos_id,),
                stop_strings=req.stop_strings(), greedy=temperature == 0, seed=req.seed)
        except ValueError as exc:
            raise APIError(400, str(exc)) from None

    def submit(self, prepared: Sequence[Prepared], n: int, logprobs: bool, param: str = "messages") -> list[Ticket]:
        """Queue one request's prompts in the admission gate (400 if the engine cannot run one, 429 if
        the queue is full)."""
        try:
            for p in prepared:
                self.engine.check_prompt(p.ids, n)
        except ValueError as exc:
            raise APIError(400, str(exc), param) from None
        try:
            return self.gate.enqueue([(p.ids, p.params) for p in prepared], n, logprobs)
        except QueueFull as exc:
            raise APIError(429, str(exc), code="queue_full", type_="server_busy",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    # ---- logprobs --------------------------------------------------------------------------------
    def chat_logprob(self, token_id: int, logprob: float, top: int) -> dict[str, Any]:
        entry = {"token": self.tokenizer.decode([token_id]), "logprob": logprob,
                 "bytes": token_bytes(self.tokenizer, token_id)}
        # Only the chosen token's log-prob is computed; top_logprobs lists just that token.
        return {**entry, "top_logprobs": [dict(entry)] if top > 0 else []}
