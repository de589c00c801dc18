"""The OpenAI-compatible HTTP server (``minimind serve``) on top of the engine service.

Why it is built this way:

* **All generation goes through** :class:`~minimind.infer.service.EngineService`, whose background
  thread runs continuous batching. Handlers only submit a prompt and ``await`` its token events, so
  the event loop never blocks on a forward pass and concurrent requests decode in one batch.
* **Every limit is checked before submitting** (max_tokens cap, context length, n vs the engine's
  slots) and reported as an OpenAI-shaped 400 naming the limit, instead of the engine silently
  truncating the completion.
* **Streaming is split on the fly** (:mod:`minimind.serve.streaming`) into ``reasoning_content``,
  ``content`` and ``tool_calls`` deltas, and a client that goes away cancels its request so its
  batch slot is free at the next step. Non-streamed replies are parsed whole with
  :func:`minimind.tasks.toolcalls.parse_reply`; both give the same reply.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``,
``POST /v1/completions``, and for the web UI ``GET /`` (the page), ``/static/*``,
``GET /api/tools`` and ``POST /api/tools/call`` (built-in tools run server-side).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from minimind.infer.sampling import SamplingParams
from minimind.infer.scheduler import GenerationResult, TokenEvent
from minimind.infer.service import EngineService, RequestHandle
from minimind.serve.errors import APIError, install_error_handlers
from minimind.serve.middleware import BodySizeLimit
from minimind.serve.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingFields,
    ToolCallRequest,
)
from minimind.serve.streaming import SSE_DONE, ReplyStreamParser, sse_event
from minimind.tasks.toolcalls import ToolCall, parse_reply, parse_tool_calls, split_reasoning
from minimind.tasks.tools import call_tool, tool_result_text, tool_schemas
from minimind.tokenizer.byte_level import token_bytes

__all__ = ["DEFAULT_STATIC_DIR", "DEFAULT_TEMPERATURE", "DEFAULT_TOP_P", "create_app"]

#: Where the web UI's ``index.html`` and assets live inside the package.
DEFAULT_STATIC_DIR = Path(__file__).resolve().parent / "static"
#: OpenAI's defaults, so a request means the same thing here as elsewhere.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
#: Temperatures below this are treated as 0 (greedy).
MIN_TEMPERATURE = 1e-5

_PLACEHOLDER_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>MiniMind</title></head>
<body><h1>MiniMind server</h1><p>The web UI is not installed. The API is at <code>/v1</code>:
<code>GET /v1/models</code>, <code>POST /v1/chat/completions</code>.</p></body></html>"""
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class _Prepared:
    """A validated prompt ready to submit."""

    ids: list[int]
    params: SamplingParams
    text: str | None = None  # the prompt text (completions with echo)


class _Server:
    """State shared by the handlers of one app: the service, limits and the model's tokenizer."""

    def __init__(self, service: EngineService, model_name: str, max_tokens_cap: int) -> None:
        self.service = service
        self.engine = service.engine
        self.tokenizer = service.engine.tokenizer
        if self.tokenizer is None:
            raise ValueError("the engine has no tokenizer: the server needs one to render chats")
        self.model_name = model_name
        self.max_tokens_cap = max_tokens_cap
        self.created = int(time.time())

    # ---- request -> prompt + sampling ----------------------------------------------------------
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
        if temperature < MIN_TEMPERATURE:
            # Dividing logits by a denormal temperature overflows to inf/NaN inside the batch step,
            # which would fail every request decoding alongside; such a temperature means greedy.
            temperature = 0.0
        try:
            return SamplingParams(
                max_new_tokens=requested, temperature=temperature,
                top_k=max(req.top_k or 0, 0),
                top_p=DEFAULT_TOP_P if req.top_p is None else req.top_p,
                repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                stop_token_ids=() if req.ignore_eos else (self.tokenizer.eos_id,),
                stop_strings=req.stop_strings(), greedy=temperature == 0, seed=req.seed)
        except ValueError as exc:
            raise APIError(400, str(exc)) from None

    def check_n(self, n: int, prompts: int = 1) -> None:
        slots = self.engine.num_slots
        if n > slots:
            raise APIError(400, f"n is {n}, but this server decodes at most {slots} sequences of one "
                                f"prompt together (--slots)", "n")
        if prompts < 1:
            raise APIError(400, "no prompt given", "prompt")

    def submit(self, prepared: Sequence[_Prepared], n: int, logprobs: bool,
               param: str = "messages") -> list[RequestHandle]:
        handles: list[RequestHandle] = []
        try:
            for p in prepared:
                handles.append(self.service.submit(p.ids, p.params, n=n, logprobs=logprobs))
        except ValueError as exc:
            for h in handles:
                h.cancel()
            raise APIError(400, str(exc), param) from None
        except RuntimeError as exc:  # the service is closed (shutting down)
            for h in handles:
                h.cancel()
            raise APIError(503, str(exc), type_="server_error") from None
        return handles

    # ---- logprobs ------------------------------------------------------------------------------
    def chat_logprob(self, token_id: int, logprob: float, top: int) -> dict[str, Any]:
        entry = {"token": self.tokenizer.decode([token_id]), "logprob": logprob,
                 "bytes": token_bytes(self.tokenizer, token_id)}
        # Only the chosen token's log-prob is computed; top_logprobs lists just that token.
        return {**entry, "top_logprobs": [dict(entry)] if top > 0 else []}


def _logprob_tokens(result: GenerationResult) -> list[tuple[int, float]]:
    """(token, logprob) pairs of a finished sample, without its terminating stop token."""
    ids, lps = result.token_ids, result.logprobs or []
    if isinstance(result.stop, int) and ids and ids[-1] == result.stop:
        ids = ids[:-1]
    return list(zip(ids, lps))


def _finish_reason(result: GenerationResult | None, has_calls: bool) -> str:
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


async def _merged(handles: Sequence[RequestHandle]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """Events of several handles as ``(handle index, event)``, in arrival order."""
    if len(handles) == 1:
        async for ev in handles[0]:
            yield 0, ev
        return
    queue: asyncio.Queue[tuple[int, TokenEvent] | tuple[int, None] | BaseException] = asyncio.Queue()

    async def pump(k: int, h: RequestHandle) -> None:
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


async def _drain_watching(handles: Sequence[RequestHandle], request: Request) -> None:
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


def _generation_failed(exc: BaseException) -> APIError:
    return APIError(500, f"generation failed: {exc.__cause__ or exc}", type_="server_error")


# ---- the app ---------------------------------------------------------------------------------------
def create_app(service: EngineService, model_name: str, *, api_key: str | None = None,
               max_body_bytes: int = 1_000_000, max_tokens_cap: int = 4096,
               cors_origins: list[str] | None = None,
               static_dir: Path | None = DEFAULT_STATIC_DIR) -> FastAPI:
    """Build the FastAPI app serving ``service``'s model as ``model_name``.

    ``api_key``: when set, ``/v1/*`` and ``/api/*`` need ``Authorization: Bearer <key>`` (``/health``
    and the page stay open). ``max_body_bytes``: larger bodies get 413. ``max_tokens_cap``: the
    most completion tokens one request may ask for (also the default when it asks for none, bounded
    by the context left). ``cors_origins``: browser origins allowed to call the API (none by
    default). ``static_dir``: the web UI folder (``None`` = no UI; a placeholder page if the folder
    has no ``index.html``).
    """
    if max_tokens_cap < 1:
        raise ValueError(f"max_tokens_cap must be >= 1, got {max_tokens_cap}")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    server = _Server(service, model_name, max_tokens_cap)
    app = FastAPI(title="MiniMind", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    if cors_origins:
        # Added last = outermost, so preflight requests are answered before auth or size checks.
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=False)

    expected = f"Bearer {api_key}".encode() if api_key else None

    async def require_key(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    api = APIRouter(dependencies=[Depends(require_key)])

    # ---- open routes ----------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "active": service.active_rows,
                "waiting": service.waiting, "slots": server.engine.num_slots}

    index = static_dir / "index.html" if static_dir is not None else None

    @app.get("/", include_in_schema=False)
    async def page() -> Any:
        if index is not None and index.is_file():
            return FileResponse(index, media_type="text/html",
                                headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})
        return HTMLResponse(_PLACEHOLDER_PAGE)

    if static_dir is not None and static_dir.is_dir():
        app.mount("/static", StaticFiles(directory=static_dir), name="static")

    # ---- models ---------------------------------------------------------------------------------
    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": server.created, "owned_by": "minimind",
                "max_model_len": server.engine.max_context}

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @api.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           "model", "model_not_found")
        return model_card()

    # ---- chat -----------------------------------------------------------------------------------
    @api.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
        use_tools = bool(req.tools) and req.tool_choice != "none"
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []] if use_tools else None
        messages = [_template_message(m) for m in req.messages]
        thinking_requested = req.thinking()

        def render() -> tuple[str, list[int]]:
            text = server.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                        tokenize=False, open_thinking=thinking_requested)
            return text, list(server.tokenizer.encode(text))

        try:
            prompt_text, ids = await asyncio.to_thread(render)
        except Exception as exc:  # noqa: BLE001 - a template error is the request's fault
            raise APIError(400, f"could not render the messages with the chat template: {exc}",
                           "messages") from None
        # The reply starts inside a reasoning block when the generation prompt opened one.
        thinking = prompt_text.rstrip().endswith("<think>")
        server.check_n(req.n)
        params = server.sampling(req, req.requested_max_tokens(), len(ids), "messages")
        top = req.top_logprobs or 0
        (handle,) = server.submit([_Prepared(ids, params)], req.n, req.logprobs)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            gen = _chat_stream(server, handle, cid, created, req.n, len(ids), thinking, use_tools,
                               req.logprobs, top, include_usage)
            return StreamingResponse(gen, media_type="text/event-stream", headers=_SSE_HEADERS)
        try:
            await _drain_watching([handle], request)
        except RuntimeError as exc:
            raise _generation_failed(exc) from None
        choices = []
        completion_tokens = 0
        for i, result in enumerate(handle.results):
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
                logprobs = {"content": [server.chat_logprob(t, lp, top) for t, lp in _logprob_tokens(result)]}
            choices.append({"index": i, "message": message, "logprobs": logprobs,
                            "finish_reason": _finish_reason(result, bool(calls))})
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": model_name,
            "choices": choices,
            "usage": {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                      "total_tokens": len(ids) + completion_tokens},
        })

    # ---- completions ----------------------------------------------------------------------------
    @api.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo together with logprobs is not supported (prompt log-probs are not "
                                "computed)", "echo")
        prompts = req.prompts()
        server.check_n(req.n, len(prompts))
        prepared: list[_Prepared] = []
        for k, p in enumerate(prompts):
            what = "prompt" if len(prompts) == 1 else f"prompt[{k}]"
            if isinstance(p, str):
                ids = list(server.tokenizer.encode(p))
                text: str | None = p
            else:
                ids, text = list(p), None
                vocab = server.engine.model.config.vocab_size
                if any(not 0 <= t < vocab for t in ids):
                    raise APIError(400, f"{what} has token ids outside [0, {vocab})", "prompt")
            if not ids:
                raise APIError(400, f"{what} is empty", "prompt")
            params = server.sampling(req, req.max_tokens, len(ids), "prompt")
            prepared.append(_Prepared(ids, params, text if text is not None else server.tokenizer.decode(ids)))
        want_lp = req.logprobs is not None
        handles = server.submit(prepared, req.n, want_lp, "prompt")
        cid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        prompt_tokens = sum(len(p.ids) for p in prepared)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            gen = _completion_stream(server, handles, prepared, cid, created, req.n, req.echo, want_lp,
                                     req.logprobs or 0, prompt_tokens, include_usage)
            return StreamingResponse(gen, media_type="text/event-stream", headers=_SSE_HEADERS)
        try:
            await _drain_watching(handles, request)
        except RuntimeError as exc:
            raise _generation_failed(exc) from None
        choices = []
        completion_tokens = 0
        for k, (h, p) in enumerate(zip(handles, prepared)):
            for i, result in enumerate(h.results):
                if result is None:
                    continue
                completion_tokens += result.completion_tokens
                text = (p.text if req.echo else "") + (result.text or "")
                lp = _completion_logprobs(server, _logprob_tokens(result), req.logprobs or 0) if want_lp else None
                choices.append({"index": k * req.n + i, "text": text, "logprobs": lp,
                                "finish_reason": _finish_reason(result, False)})
        return JSONResponse({
            "id": cid, "object": "text_completion", "created": created, "model": model_name,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })

    # ---- built-in tools for the web UI --------------------------------------------------------
    @api.get("/api/tools")
    async def list_tools() -> dict[str, Any]:
        return {"tools": tool_schemas()}

    @api.post("/api/tools/call")
    async def run_tool(req: ToolCallRequest) -> dict[str, Any]:
        # Runs on a worker thread: the tools are bounded, but none of them should stall the loop.
        result = await asyncio.to_thread(call_tool, req.name, req.arguments)
        return {"name": req.name, "content": tool_result_text(result), "result": result,
                "is_error": "error" in result}

    app.include_router(api)
    return app


# ---- streaming generators --------------------------------------------------------------------------
async def _chat_stream(server: _Server, handle: RequestHandle, cid: str, created: int, n: int,
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
        yield _error_event(exc)
    finally:
        if not handle.done:
            handle.cancel()


def _usage_event(cid: str, obj: str, created: int, model: str, prompt_tokens: int,
                 completion_tokens: int) -> str:
    """The final stream chunk with ``usage`` (sent when ``stream_options.include_usage``)."""
    return sse_event({"id": cid, "object": obj, "created": created, "model": model, "choices": [],
                      "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                "total_tokens": prompt_tokens + completion_tokens}})


def _error_event(exc: RuntimeError) -> str:
    """A failed generation mid-stream: headers are sent, so the error travels as an SSE event."""
    err = _generation_failed(exc)
    return sse_event({"error": {"message": err.message, "type": err.type, "param": None, "code": None}})


def _completion_logprobs(server: _Server, tokens: list[tuple[int, float]], top: int,
                         offset: int = 0) -> dict[str, Any]:
    texts = [server.tokenizer.decode([t]) for t, _ in tokens]
    offsets = []
    for s in texts:
        offsets.append(offset)
        offset += len(s)
    return {"tokens": texts, "token_logprobs": [lp for _, lp in tokens],
            "top_logprobs": [{s: lp} for s, (_, lp) in zip(texts, tokens)] if top > 0 else None,
            "text_offset": offsets}


async def _completion_stream(server: _Server, handles: list[RequestHandle], prepared: list[_Prepared],
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
        yield _error_event(exc)
    finally:
        for h in handles:
            if not h.done:
                h.cancel()
