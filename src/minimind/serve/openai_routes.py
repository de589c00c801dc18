"""The OpenAI routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``.

* **All generation goes through** the admission gate (:mod:`minimind.serve.admission`) into the
  :class:`~minimind.infer.service.EngineService`, whose background thread runs continuous batching.
  Handlers only queue prompts and ``await`` their token events, so the event loop never blocks on a
  forward pass, concurrent requests decode in one batch, and slots are shared round-robin.
* **Every limit is checked before queueing** (model name, ranges, max_tokens cap, context length,
  n vs the slots, prompts x n vs ``--max_rows_per_request``) and reported as an OpenAI-shaped error
  naming the limit, instead of the engine silently truncating the completion.
* **Chats are encoded with the messages' text kept literal** (:func:`~minimind.tokenizer.chat_template.encode_chat`):
  ``<|im_end|>`` typed in a message is text, not the role token.
* **Streaming is split on the fly** (:mod:`minimind.serve.streaming`) into ``reasoning_content``,
  ``content`` and ``tool_calls`` deltas, and a client that goes away cancels its request so its
  batch slot is free at the next step. Non-streamed replies are parsed whole with
  :func:`minimind.tasks.toolcalls.parse_reply`; both give the same reply.
* **A sample the engine ends alone with an error** (its numbers went non-finite) fails only its own
  request: a 500 error body, or mid-stream an ``error`` event followed by ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from minimind.infer.scheduler import GenerationResult, TokenEvent
from minimind.serve.admission import Ticket
from minimind.serve.errors import APIError
from minimind.serve.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest
from minimind.serve.state import Prepared, ServerState, generation_failed, row_error
from minimind.serve.streaming import SSE_DONE, ReplyStreamParser, sse_event
from minimind.tasks.toolcalls import ToolCall, parse_reply, parse_tool_calls, split_reasoning
from minimind.tokenizer.chat_template import encode_chat

__all__ = ["register_chat", "register_completions", "register_models"]

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _logprob_tokens(result: GenerationResult) -> list[tuple[int, float]]:
    """(token, logprob) pairs of a finished sample, without its terminating stop token."""
    ids, lps = result.token_ids, result.logprobs or []
    if isinstance(result.stop, int) and ids and ids[-1] == result.stop:
        ids = ids[:-1]
    return list(zip(ids, lps))


def _finish_reason(result: GenerationResult | None, has_calls: bool) -> str:
    """OpenAI's finish reason: ``length``, ``tool_calls`` or ``stop`` (a malformed ``<tool_call>``
    block is content, so its reply ends with ``stop``)."""
    reason = result.finish_reason if result is not None else "stop"
    if reason == "length":
        return "length"
    return "tool_calls" if has_calls else "stop"


def _tool_call_json(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {} if index is None else {"index": index}
    out.update({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}})
    return out


def _parse_whole(text: str, thinking: bool, parse_tools: bool) -> tuple[str | None, str, list[ToolCall]]:
    """(reasoning, content, calls) of a finished reply, with the same rules as the stream parser:
    a reasoning block exists only if the prompt opened one or the reply starts with ``<think>``."""
    if thinking or text.lstrip().startswith("<think>"):
        source = ("<think>" if thinking else "") + text
        if parse_tools:
            parsed = parse_reply(source)
            return parsed.reasoning, parsed.content, parsed.tool_calls
        reasoning, rest = split_reasoning(source)
        return reasoning, rest.strip(), []
    if parse_tools:
        content, calls, _ = parse_tool_calls(text)
        return None, content, calls
    return None, text.strip(), []


def _template_message(m: ChatMessage) -> dict[str, Any]:
    """A request message as the chat template expects it (OpenAI tool-call form is understood)."""
    role = "system" if m.role == "developer" else m.role
    out: dict[str, Any] = {"role": role, "content": m.text()}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.function.name, "arguments": c.function.arguments}}
                             for c in m.tool_calls]
    if m.reasoning_content is not None:
        out["reasoning_content"] = m.reasoning_content
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


async def _merged(handles: Sequence[Ticket]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """Events of several handles as ``(handle index, event)``, in arrival order."""
    if len(handles) == 1:
        async for ev in handles[0]:
            yield 0, ev
        return
    queue: asyncio.Queue[tuple[int, TokenEvent] | tuple[int, None] | BaseException] = asyncio.Queue()

    async def pump(k: int, h: Ticket) -> None:
        try:
            async for ev in h:
                await queue.put((k, ev))
            await queue.put((k, None))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            await queue.put(exc)

    tasks = [asyncio.create_task(pump(k, h)) for k, h in enumerate(handles)]
    try:
        open_handles = len(handles)
        while open_handles:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            k, ev = item
            if ev is None:
                open_handles -= 1
            else:
                yield k, ev
    finally:
        for t in tasks:
            t.cancel()


async def _drain_watching(handles: Sequence[Ticket], request: Request) -> None:
    """Wait for every handle to finish; cancel them all if the client disconnects meanwhile."""
    async def drain() -> None:
        async for _ in _merged(handles):
            pass

    task = asyncio.create_task(drain())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                task.result()
                return
            if await request.is_disconnected():
                for h in handles:
                    h.cancel()
                task.cancel()
                return
    finally:
        if not task.done():
            task.cancel()
            for h in handles:
                h.cancel()



def _raise_row_errors(tickets: Sequence[Ticket]) -> None:
    for t in tickets:
        for result in t.results:
            err = row_error(result)
            if err is not None:
                raise err


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---- route groups ----------------------------------------------------------------------------------
def register_models(app: FastAPI, state: ServerState) -> None:
    """``GET /v1/models`` and ``GET /v1/models/{name}`` (404 ``model_not_found`` for other names)."""
    router = APIRouter()

    def model_card() -> dict[str, Any]:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "minimind",
                "max_model_len": state.engine.max_context}

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @router.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        state.check_model(name)
        return model_card()

    app.include_router(router)


def register_chat(app: FastAPI, state: ServerState) -> None:
    """``POST /v1/chat/completions`` (streamed or whole; reasoning, tools, logprobs, n)."""
    router = APIRouter()

    @router.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
        state.check_model(req.model)
        state.check_rows(req.n)
        use_tools = bool(req.tools) and req.tool_choice != "none"
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []] if use_tools else None
        messages = [_template_message(m) for m in req.messages]
        thinking_requested = req.thinking()

        def render() -> tuple[str, list[int]]:
            return encode_chat(state.tokenizer, messages, tools=tools, add_generation_prompt=True,
                               open_thinking=thinking_requested)

        try:
            prompt_text, ids = await asyncio.to_thread(render)
        except Exception as exc:  # noqa: BLE001 - a template error is the request's fault
            raise APIError(400, f"could not render the messages with the chat template: {exc}",
                           "messages") from None
        # The reply starts inside a reasoning block when the generation prompt opened one.
        thinking = prompt_text.rstrip().endswith("<think>")
        params = state.sampling(req, req.requested_max_tokens(), len(ids), "messages")
        top = req.top_logprobs or 0
        (ticket,) = state.submit([Prepared(ids, params)], req.n, req.logprobs)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            gen = _chat_stream(state, ticket, cid, created, req.n, len(ids), thinking, use_tools,
                               req.logprobs, top, include_usage)
            return StreamingResponse(gen, media_type="text/event-stream", headers=_SSE_HEADERS)
        try:
            await _drain_watching([ticket], request)
        except RuntimeError as exc:
            raise generation_failed(exc) from None
        _raise_row_errors([ticket])
        choices = []
        completion_tokens = 0
        for i, result in enumerate(ticket.results):
            if result is None:  # cancelled: the client is gone
                continue
            completion_tokens += result.completion_tokens
            reasoning, content, calls = _parse_whole(result.text or "", thinking, use_tools)
            message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
            if reasoning is not None:
                message["reasoning_content"] = reasoning
            if calls:
                message["tool_calls"] = [_tool_call_json(c) for c in calls]
            logprobs = None
            if req.logprobs:
                logprobs = {"content": [state.chat_logprob(t, lp, top) for t, lp in _logprob_tokens(result)]}
            choices.append({"index": i, "message": message, "logprobs": logprobs,
                            "finish_reason": _finish_reason(result, bool(calls))})
        return JSONResponse({"id": cid, "object": "chat.completion", "created": created,
                             "model": state.model_name, "choices": choices,
                             "usage": _usage(len(ids), completion_tokens)})

    app.include_router(router)


def _completion_prompts(state: ServerState, req: CompletionRequest) -> list[Prepared]:
    """Each prompt of a completions request, tokenised and checked (ids in range, not empty, fits)."""
    prompts = req.prompts()
    prepared: list[Prepared] = []
    vocab = state.engine.model.config.vocab_size
    for k, p in enumerate(prompts):
        what = "prompt" if len(prompts) == 1 else f"prompt[{k}]"
        if isinstance(p, str):
            ids = list(state.tokenizer.encode(p))
            text: str | None = p
        else:
            ids, text = list(p), None
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"{what} has token ids outside [0, {vocab})", "prompt")
        if not ids:
            raise APIError(400, f"{what} is empty", "prompt")
        params = state.sampling(req, req.max_tokens, len(ids), "prompt")
        prepared.append(Prepared(ids, params, text if text is not None else state.tokenizer.decode(ids)))
    return prepared


def register_completions(app: FastAPI, state: ServerState) -> None:
    """``POST /v1/completions``: raw prompts (text or token ids, one or a list), no chat template."""
    router = APIRouter()

    @router.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        state.check_model(req.model)
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo together with logprobs is not supported (prompt log-probs are not "
                                "computed)", "echo")
        state.check_rows(req.n, len(req.prompts()))
        prepared = _completion_prompts(state, req)
        want_lp = req.logprobs is not None
        tickets = state.submit(prepared, req.n, want_lp, "prompt")
        cid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        prompt_tokens = sum(len(p.ids) for p in prepared)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            gen = _completion_stream(state, tickets, prepared, cid, created, req.n, req.echo, want_lp,
                                     req.logprobs or 0, prompt_tokens, include_usage)
            return StreamingResponse(gen, media_type="text/event-stream", headers=_SSE_HEADERS)
        try:
            await _drain_watching(tickets, request)
        except RuntimeError as exc:
            raise generation_failed(exc) from None
        _raise_row_errors(tickets)
        choices = []
        completion_tokens = 0
        for k, (t, p) in enumerate(zip(tickets, prepared)):
            for i, result in enumerate(t.results):
                if result is None:
                    continue
                completion_tokens += result.completion_tokens
                text = (p.text if req.echo else "") + (result.text or "")
                lp = _completion_logprobs(state, _logprob_tokens(result), req.logprobs or 0) if want_lp else None
                choices.append({"index": k * req.n + i, "text": text, "logprobs": lp,
                                "finish_reason": _finish_reason(result, False)})
        return JSONResponse({"id": cid, "object": "text_completion", "created": created,
                             "model": state.model_name, "choices": choices,
                             "usage": _usage(prompt_tokens, completion_tokens)})

    app.include_router(router)

# ---- streaming generators --------------------------------------------------------------------------
async def _chat_stream(server: ServerState, handle: Ticket, cid: str, created: int, n: int,
                       prompt_tokens: int, thinking: bool, use_tools: bool, logprobs: bool, top: int,
                       include_usage: bool) -> AsyncIterator[str]:
    """SSE chunks of one chat request; cancels the request if the client disconnects."""
    def chunk(index: int, delta: dict[str, Any], finish: str | None = None,
              lp: list[dict[str, Any]] | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": {"content": lp} if lp else None,
                  "finish_reason": finish}
        return sse_event({"id": cid, "object": "chat.completion.chunk", "created": created,
                          "model": server.model_name, "choices": [choice]})

    parsers = [ReplyStreamParser(thinking=thinking, parse_tools=use_tools) for _ in range(n)]
    pending: list[list[dict[str, Any]]] = [[] for _ in range(n)]  # logprobs not yet sent
    n_calls = [0] * n
    completion_tokens = 0
    try:
        for i in range(n):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for ev in handle:
            i = ev.index
            err = row_error(ev.result)
            if err is not None:
                yield _error_event(err)
                yield SSE_DONE
                return
            if logprobs and ev.logprob is not None:
                is_stop_token = ev.result is not None and isinstance(ev.result.stop, int) \
                    and ev.token_id == ev.result.stop
                if not is_stop_token:
                    pending[i].append(server.chat_logprob(ev.token_id, ev.logprob, top))
            deltas = parsers[i].feed(ev.text) if ev.text else []
            if ev.finish_reason is not None:
                deltas += parsers[i].finish()
            for d in deltas:
                if d.kind == "tool_call":
                    assert d.call is not None
                    body: dict[str, Any] = {"tool_calls": [_tool_call_json(d.call, n_calls[i])]}
                    n_calls[i] += 1
                else:
                    body = {"reasoning_content" if d.kind == "reasoning" else "content": d.text}
                yield chunk(i, body, lp=pending[i])
                pending[i] = []
            if ev.finish_reason is not None:
                if ev.result is not None:
                    completion_tokens += ev.result.completion_tokens
                yield chunk(i, {}, _finish_reason(ev.result, n_calls[i] > 0), lp=pending[i])
                pending[i] = []
        if include_usage:
            yield _usage_event(cid, "chat.completion.chunk", created, server.model_name, prompt_tokens,
                               completion_tokens)
        yield SSE_DONE
    except RuntimeError as exc:
        yield _error_event(generation_failed(exc))
        yield SSE_DONE
    finally:
        if not handle.done:
            handle.cancel()


def _usage_event(cid: str, obj: str, created: int, model: str, prompt_tokens: int,
                 completion_tokens: int) -> str:
    """The final stream chunk with ``usage`` (sent when ``stream_options.include_usage``)."""
    return sse_event({"id": cid, "object": obj, "created": created, "model": model, "choices": [],
                      "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                "total_tokens": prompt_tokens + completion_tokens}})


def _error_event(err: APIError) -> str:
    """A failed generation mid-stream: headers are sent, so the error travels as an SSE event."""
    return sse_event({"error": {"message": err.message, "type": err.type, "param": None, "code": err.code}})


def _completion_logprobs(server: ServerState, tokens: list[tuple[int, float]], top: int,
                         offset: int = 0) -> dict[str, Any]:
    texts = [server.tokenizer.decode([t]) for t, _ in tokens]
    offsets = []
    for s in texts:
        offsets.append(offset)
        offset += len(s)
    return {"tokens": texts, "token_logprobs": [lp for _, lp in tokens],
            "top_logprobs": [{s: lp} for s, (_, lp) in zip(texts, tokens)] if top > 0 else None,
            "text_offset": offsets}


async def _completion_stream(server: ServerState, handles: list[Ticket], prepared: list[Prepared],
                             cid: str, created: int, n: int, echo: bool, logprobs: bool, top: int,
                             prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    """SSE chunks of a completions request (several prompts interleave, each choice has its index)."""
    def chunk(index: int, text: str, finish: str | None = None, lp: dict[str, Any] | None = None) -> str:
        return sse_event({"id": cid, "object": "text_completion", "created": created, "model": server.model_name,
                          "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}]})

    completion_tokens = 0
    offsets: dict[int, int] = {}
    try:
        if echo:
            for k, p in enumerate(prepared):
                for i in range(n):
                    yield chunk(k * n + i, p.text or "")
        async for k, ev in _merged(handles):
            index = k * n + ev.index
            err = row_error(ev.result)
            if err is not None:
                yield _error_event(err)
                yield SSE_DONE
                return
            lp = None
            if logprobs and ev.logprob is not None and not (
                    ev.result is not None and isinstance(ev.result.stop, int) and ev.token_id == ev.result.stop):
                lp = _completion_logprobs(server, [(ev.token_id, ev.logprob)], top, offsets.get(index, 0))
                offsets[index] = lp["text_offset"][-1] + len(lp["tokens"][-1])
            if ev.text or lp is not None:
                yield chunk(index, ev.text, lp=lp)
            if ev.finish_reason is not None:
                if ev.result is not None:
                    completion_tokens += ev.result.completion_tokens
                yield chunk(index, "", _finish_reason(ev.result, False))
        if include_usage:
            yield _usage_event(cid, "text_completion", created, server.model_name, prompt_tokens,
                               completion_tokens)
        yield SSE_DONE
    except RuntimeError as exc:
        yield _error_event(generation_failed(exc))
        yield SSE_DONE
    finally:
        for h in handles:
            if not h.done:
                h.cancel()
