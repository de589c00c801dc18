"""The OpenAI-compatible server end to end: real engine service, real uvicorn, real ``openai`` client.

The model is a tiny one overfitted on scripted conversations (``tests/scripted_model.py``), so the
greedy reply to each scripted prompt is known exactly: a plain answer, a reasoning answer, a tool
call and the answer after the tool result, an answer carrying HTML.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from minimind.infer.engine import GenerationEngine
from minimind.infer.service import EngineService
from minimind.serve.app import create_app
from minimind.serve.streaming import ReplyStreamParser, sse_event
from minimind.tasks.toolcalls import parse_reply
from tests.scripted_model import (
    CALCULATOR_RESULT,
    CALCULATOR_TOOL,
    HTML,
    PLAIN,
    THINKING,
    TOOL_ANSWER,
    TOOL_CALL,
    small_tokenizer,
    train_scripted_model,
)
from tests.tiny_server import Running

API_KEY = "test-key"
MODEL = "scripted"
SLOTS = 4
CAP = 256
BODY_LIMIT = 200_000

PLAIN_REPLY = PLAIN[1]["content"]
THINK_REASONING = THINKING[1]["reasoning_content"]
THINK_ANSWER = THINKING[1]["content"]
FINAL_ANSWER = TOOL_ANSWER["messages"][-1]["content"]
HTML_REPLY = HTML[1]["content"]


# ---- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def scripted_tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scripted_tok")


@pytest.fixture(scope="session")
def scripted(scripted_tok_dir: Path) -> tuple[Any, Any]:
    tok = small_tokenizer(scripted_tok_dir)
    return tok, train_scripted_model(tok)


@pytest.fixture(scope="module")
def stack(scripted: tuple[Any, Any]) -> Iterator[dict[str, Any]]:
    tok, model = scripted
    engine = GenerationEngine(model, tok, num_slots=SLOTS)
    service = EngineService(engine)
    submitted: list[Any] = []
    real_submit = service.submit

    def recording_submit(*args: Any, **kwargs: Any) -> Any:
        handle = real_submit(*args, **kwargs)
        submitted.append(handle)
        return handle

    service.submit = recording_submit  # type: ignore[method-assign]
    app = create_app(service, MODEL, api_key=API_KEY, max_body_bytes=BODY_LIMIT, max_tokens_cap=CAP)
    running = Running(app)
    yield {"tok": tok, "model": model, "engine": engine, "service": service, "url": running.url,
           "submitted": submitted}
    running.stop()
    service.close()


@pytest.fixture()
def client(stack: dict[str, Any]) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack["url"] + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def prompt_ids(tok: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
               thinking: bool = False) -> list[int]:
    text = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, open_thinking=thinking)
    return tok.encode(text)


def collect_stream(stream: Any) -> dict[str, Any]:
    """Concatenate a chat stream (choice 0 unless several) into its parts."""
    out: dict[str, Any] = {"content": {}, "reasoning": {}, "calls": {}, "finish": {}, "roles": {},
                           "chunks": [], "usage": None}
    for chunk in stream:
        out["chunks"].append(chunk)
        if chunk.usage is not None:
            out["usage"] = chunk.usage
        for choice in chunk.choices:
            i, delta = choice.index, choice.delta
            if delta.role:
                out["roles"][i] = delta.role
            if delta.content:
                out["content"][i] = out["content"].get(i, "") + delta.content
            reasoning = getattr(delta, "reasoning_content", None)
            if reasoning:
                out["reasoning"][i] = out["reasoning"].get(i, "") + reasoning
            for call in delta.tool_calls or []:
                out["calls"].setdefault(i, []).append(call)
            if choice.finish_reason:
                out["finish"][i] = choice.finish_reason
    return out


# ---- the streaming parser on its own ------------------------------------------------------------
def _stream_parts(text: str, thinking: bool, tools: bool, sizes: list[int]) -> tuple[str, str, list[str]]:
    parser = ReplyStreamParser(thinking=thinking, parse_tools=tools)
    deltas, pos, k = [], 0, 0
    while pos < len(text):
        size = sizes[k % len(sizes)]
        deltas += parser.feed(text[pos:pos + size])
        pos += size
        k += 1
    deltas += parser.finish()
    reasoning = "".join(d.text for d in deltas if d.kind == "reasoning")
    content = "".join(d.text for d in deltas if d.kind == "content")
    return reasoning, content, [d.call.name for d in deltas if d.kind == "tool_call" and d.call]


CALL = '<tool_call>\n{"name": "calculate_math", "arguments": {"expression": "12*7"}}\n</tool_call>'


@pytest.mark.parametrize("text,thinking", [
    ("Sunlight.\n</think>\n\nBecause of Rayleigh scattering.", True),
    (CALL, False),
    ("Let me compute.\n" + CALL + "\n" + CALL.replace("12*7", "1+1") + "\n  trailing words ", False),
    ("bad <tool_call>{not json}</tool_call> kept as text", False),
    ("unclosed <tool_call>{\"name\": \"x\"}", False),
    ("a <tool_call> b " + CALL + " c", False),
    ("<think>\nhmm\n</think>\n\nanswer <b>x</b> < y", False),
    ("\n\n  spaced  text \n\n", False),
    ("still thinking, cut off", True),
    ("text before <think> is not reasoning", False),
    ("<tool_call", False),
])
def test_stream_parser_agrees_with_the_whole_reply_parser(text: str, thinking: bool) -> None:
    whole = parse_reply(("<think>" if thinking else "") + text)
    want = (whole.reasoning or "", whole.content, [c.name for c in whole.tool_calls])
    for sizes in ([1], [2, 3], [5, 1, 7], [len(text) or 1]):
        assert _stream_parts(text, thinking, True, sizes) == want, sizes


def test_stream_parser_never_leaks_tool_call_markup() -> None:
    text = "Sure.\n" + CALL
    for size in range(1, len(text) + 1):
        parser = ReplyStreamParser(parse_tools=True)
        pieces = [parser.feed(text[i:i + size]) for i in range(0, len(text), size)] + [parser.finish()]
        content = "".join(d.text for batch in pieces for d in batch if d.kind == "content")
        assert content == "Sure." and "<" not in content


def test_stream_parser_without_tools_keeps_blocks_as_content() -> None:
    assert _stream_parts(CALL, False, False, [3]) == ("", CALL, [])


def test_sse_event_framing() -> None:
    assert sse_event({"a": "é"}) == 'data: {"a":"é"}\n\n'


# ---- models, health, page ---------------------------------------------------------------------
def test_models_list_and_retrieve(client: openai.OpenAI, stack: dict[str, Any]) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other-model")


def test_health_and_page_are_open_without_a_key(stack: dict[str, Any]) -> None:
    health = httpx.get(stack["url"] + "/health")
    assert health.status_code == 200 and health.json()["slots"] == SLOTS
    page = httpx.get(stack["url"] + "/")
    assert page.status_code == 200 and "html" in page.text.lower()
    assert page.headers["content-type"].startswith("text/html")


# ---- chat: plain, streaming, usage --------------------------------------------------------------
def test_chat_non_stream_reproduces_the_script(client: openai.OpenAI, stack: dict[str, Any]) -> None:
    tok = stack["tok"]
    r = client.chat.completions.create(model=MODEL, messages=PLAIN[:1], temperature=0)
    choice = r.choices[0]
    assert choice.message.content == PLAIN_REPLY
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert not choice.message.tool_calls
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    # usage: the tokenizer's counts; the completion includes the <|im_end|> that ended it
    assert r.usage.prompt_tokens == len(prompt_ids(tok, PLAIN[:1]))
    assert r.usage.completion_tokens == len(tok.encode(PLAIN_REPLY)) + 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_equals_non_stream(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=PLAIN[:1], temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=PLAIN[:1], temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    got = collect_stream(stream)
    assert got["content"][0] == whole.choices[0].message.content == PLAIN_REPLY
    assert got["roles"] == {0: "assistant"}
    assert got["chunks"][0].choices[0].delta.role == "assistant"
    assert got["finish"] == {0: "stop"}
    ids = {c.id for c in got["chunks"]}
    assert len(ids) == 1 and all(c.object == "chat.completion.chunk" and c.model == MODEL for c in got["chunks"])
    assert got["usage"] is not None and got["usage"] == whole.usage
    assert got["chunks"][-1].choices == []  # the usage chunk comes last, without choices


def test_raw_sse_framing_ends_with_done(stack: dict[str, Any]) -> None:
    body = {"model": MODEL, "messages": PLAIN[:1], "temperature": 0, "stream": True}
    with httpx.stream("POST", stack["url"] + "/v1/chat/completions", json=body, headers=auth()) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all({"id", "object", "created", "model", "choices"} <= set(c) for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == PLAIN_REPLY
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_html_reply_is_returned_verbatim(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HTML[:1], temperature=0)
    assert r.choices[0].message.content == HTML_REPLY


# ---- reasoning ----------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [
    {"chat_template_kwargs": {"open_thinking": True}},
    {"chat_template_kwargs": {"enable_thinking": True}},
    {"open_thinking": True},
])
def test_reasoning_is_separated(client: openai.OpenAI, extra: dict[str, Any]) -> None:
    r = client.chat.completions.create(model=MODEL, messages=THINKING[:1], temperature=0, extra_body=extra)
    message = r.choices[0].message
    assert message.content == THINK_ANSWER
    assert getattr(message, "reasoning_content", None) == THINK_REASONING
    assert "<think>" not in message.content and "</think>" not in message.content
    got = collect_stream(client.chat.completions.create(model=MODEL, messages=THINKING[:1], temperature=0,
                                                        stream=True, extra_body=extra))
    assert got["reasoning"][0] == THINK_REASONING
    assert got["content"][0] == THINK_ANSWER


# ---- tools --------------------------------------------------------------------------------------
def _run_tool(stack: dict[str, Any], name: str, arguments: str) -> str:
    r = httpx.post(stack["url"] + "/api/tools/call", json={"name": name, "arguments": arguments}, headers=auth())
    assert r.status_code == 200
    return r.json()["content"]


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_round_trip(client: openai.OpenAI, stack: dict[str, Any], stream: bool) -> None:
    messages: list[Any] = list(TOOL_CALL["messages"][:1])
    if stream:
        got = collect_stream(client.chat.completions.create(
            model=MODEL, messages=messages, tools=[CALCULATOR_TOOL], temperature=0, stream=True))
        assert got["finish"] == {0: "tool_calls"}
        assert "<tool_call>" not in got["content"].get(0, "") and not got["content"].get(0)
        (call,) = got["calls"][0]
        assert call.index == 0 and call.id and call.type == "function"
        name, arguments, call_id = call.function.name, call.function.arguments, call.id
        assistant: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]}
    else:
        r = client.chat.completions.create(model=MODEL, messages=messages, tools=[CALCULATOR_TOOL], temperature=0)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert not choice.message.content
        (tc,) = choice.message.tool_calls
        name, arguments, call_id = tc.function.name, tc.function.arguments, tc.id
        assistant = choice.message  # the SDK object goes straight back into the history
    assert name == "calculate_math"
    assert json.loads(arguments) == {"expression": "12*7"}
    result = _run_tool(stack, name, arguments)
    assert result == CALCULATOR_RESULT
    messages += [assistant, {"role": "tool", "tool_call_id": call_id, "content": result}]
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=[CALCULATOR_TOOL], temperature=0)
    assert final.choices[0].message.content == FINAL_ANSWER
    assert "84" in final.choices[0].message.content
    assert final.choices[0].finish_reason == "stop"


def test_tool_choice_none_does_not_offer_tools(client: openai.OpenAI, stack: dict[str, Any]) -> None:
    r = client.chat.completions.create(model=MODEL, messages=PLAIN[:1], tools=[CALCULATOR_TOOL],
                                       tool_choice="none", temperature=0)
    assert r.choices[0].message.content == PLAIN_REPLY
    assert r.usage.prompt_tokens == len(prompt_ids(stack["tok"], PLAIN[:1]))  # no tool schema in the prompt


def test_api_tools_listing_and_calls(stack: dict[str, Any]) -> None:
    listed = httpx.get(stack["url"] + "/api/tools", headers=auth())
    assert listed.status_code == 200
    names = [t["function"]["name"] for t in listed.json()["tools"]]
    assert "calculate_math" in names
    ok = httpx.post(stack["url"] + "/api/tools/call", headers=auth(),
                    json={"name": "calculate_math", "arguments": {"expression": "12*7"}})
    assert ok.status_code == 200 and json.loads(ok.json()["content"]) == {"result": "84"}
    for bad in ({"name": "calculate_math", "arguments": {"expression": "__import__('os').system('true')"}},
                {"name": "calculate_math", "arguments": {"expression": "9**9**9**9"}},
                {"name": "calculate_math", "arguments": "not json"},
                {"name": "no_such_tool", "arguments": {}}):
        r = httpx.post(stack["url"] + "/api/tools/call", headers=auth(), json=bad)
        assert r.status_code == 200, r.text
        assert "error" in json.loads(r.json()["content"])
    assert httpx.get(stack["url"] + "/api/tools").status_code == 401


# ---- sampling options ---------------------------------------------------------------------------
def test_n_returns_several_choices(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=PLAIN[:1], temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content == PLAIN_REPLY for c in r.choices)
    got = collect_stream(client.chat.completions.create(model=MODEL, messages=PLAIN[:1], temperature=0, n=2,
                                                        stream=True))
    assert got["content"] == {0: PLAIN_REPLY, 1: PLAIN_REPLY} and got["finish"] == {0: "stop", 1: "stop"}
    sampled = client.chat.completions.create(model=MODEL, messages=PLAIN[:1], temperature=1.0, n=3, seed=7)
    assert len(sampled.choices) == 3


def test_logprobs_match_a_full_forward(client: openai.OpenAI, stack: dict[str, Any]) -> None:
    tok, model = stack["tok"], stack["model"]
    r = client.chat.completions.create(model=MODEL, messages=PLAIN[:1], temperature=0, logprobs=True,
                                       top_logprobs=2)
    entries = r.choices[0].logprobs.content
    reply_ids = tok.encode(PLAIN_REPLY)
    assert len(entries) == len(reply_ids)
    ids = prompt_ids(tok, PLAIN[:1])
    with torch.no_grad():
        logits = model(torch.tensor([ids + reply_ids])).logits[0].float()
    want = torch.log_softmax(logits, dim=-1)
    for k, (entry, token) in enumerate(zip(entries, reply_ids)):
        expected = float(want[len(ids) - 1 + k, token])
        assert math.isclose(entry.logprob, expected, rel_tol=1e-3, abs_tol=1e-4), (k, entry.logprob, expected)
        assert entry.token == tok.decode([token])
        assert bytes(entry.bytes).decode("utf-8") == entry.token
        assert entry.top_logprobs[0].logprob == entry.logprob  # only the chosen token is computed
    got = collect_stream(client.chat.completions.create(model=MODEL, messages=PLAIN[:1], temperature=0,
                                                        logprobs=True, stream=True))
    streamed = [e for c in got["chunks"] for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], rel=1e-5, abs=1e-6)


def test_stop_strings(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=PLAIN[:1], temperature=0, stop=["MiniMind"])
    assert r.choices[0].message.content == "Hello! I am"
    assert r.choices[0].finish_reason == "stop"
    got = collect_stream(client.chat.completions.create(model=MODEL, messages=PLAIN[:1], temperature=0,
                                                        stop="tiny", stream=True))
    assert got["content"][0] == "Hello! I am MiniMind, a"


def test_max_tokens_cuts_with_length(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=PLAIN[:1], temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    r = client.chat.completions.create(model=MODEL, messages=PLAIN[:1], temperature=0, max_completion_tokens=2)
    assert r.usage.completion_tokens == 2


# ---- completions --------------------------------------------------------------------------------
def test_completions_endpoint(client: openai.OpenAI, stack: dict[str, Any]) -> None:
    tok = stack["tok"]
    prompt = tok.apply_chat_template(PLAIN[:1], add_generation_prompt=True)
    html_prompt = tok.apply_chat_template(HTML[:1], add_generation_prompt=True)
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=40)
    assert r.choices[0].text == PLAIN_REPLY and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    both = client.completions.create(model=MODEL, prompt=[prompt, html_prompt], temperature=0, max_tokens=40)
    assert [(c.index, c.text) for c in both.choices] == [(0, PLAIN_REPLY), (1, HTML_REPLY)]
    stream = client.completions.create(model=MODEL, prompt=[prompt, html_prompt], temperature=0, max_tokens=40,
                                       stream=True)
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert texts == {0: PLAIN_REPLY, 1: HTML_REPLY} and finish == {0: "stop", 1: "stop"}
    echoed = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=40, echo=True)
    assert echoed.choices[0].text == prompt + PLAIN_REPLY
    ids = client.completions.create(model=MODEL, prompt=tok.encode(prompt), temperature=0, max_tokens=40)
    assert ids.choices[0].text == PLAIN_REPLY
    lp = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=40, logprobs=1)
    assert len(lp.choices[0].logprobs.token_logprobs) == len(tok.encode(PLAIN_REPLY))


# ---- errors -------------------------------------------------------------------------------------
def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in r.text
    return err


def _post(stack: dict[str, Any], body: Any, path: str = "/v1/chat/completions",
          headers: dict[str, str] | None = None) -> httpx.Response:
    h = auth() if headers is None else headers
    if isinstance(body, (bytes, str)):
        return httpx.post(stack["url"] + path, content=body, headers={**h, "Content-Type": "application/json"})
    return httpx.post(stack["url"] + path, json=body, headers=h)


USER = [{"role": "user", "content": "Hi there"}]


def test_request_errors_are_openai_shaped(stack: dict[str, Any]) -> None:
    err = _error(_post(stack, b"{not json"), 400)
    assert err["type"] == "invalid_request_error" and "JSON" in err["message"]
    err = _error(_post(stack, {"model": MODEL}), 400)
    assert err["param"] == "messages"
    assert _error(_post(stack, {"messages": []}), 400)["param"] == "messages"
    err = _error(_post(stack, {"messages": USER, "temperature": -1}), 400)
    assert err["param"] == "temperature"
    err = _error(_post(stack, {"messages": USER, "max_tokens": CAP + 1}), 400)
    assert str(CAP) in err["message"] and err["param"] == "max_tokens"
    err = _error(_post(stack, {"messages": USER, "n": SLOTS + 1}), 400)
    assert str(SLOTS) in err["message"] and err["param"] == "n"
    err = _error(_post(stack, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), 400)
    _error(_post(stack, {"messages": USER, "tool_choice": {"type": "function", "function": {"name": "x"}}}), 400)
    _error(_post(stack, {"prompt": "x", "suffix": "y"}, "/v1/completions"), 400)
    _error(_post(stack, {"prompt": [[10**9]]}, "/v1/completions"), 400)
    _error(_post(stack, [1, 2]), 400)
    assert _error(_post(stack, {"messages": USER, "seed": 2**70}), 400)["param"] == "seed"
    assert _error(_post(stack, {"messages": USER, "stop": ["x" * 1001]}), 400)["param"] == "stop"
    assert _error(_post(stack, {"messages": USER, "tool_choice": "required"}), 400)


def test_tiny_temperature_is_greedy_not_a_crash(client: openai.OpenAI) -> None:
    # a denormal temperature would turn logits into inf/NaN inside the shared batch step
    r = client.chat.completions.create(model=MODEL, messages=PLAIN[:1], temperature=1e-30)
    assert r.choices[0].message.content == PLAIN_REPLY


def test_context_overflow_names_the_limit(stack: dict[str, Any]) -> None:
    limit = stack["engine"].max_context
    long_text = "hello world " * limit
    err = _error(_post(stack, {"messages": [{"role": "user", "content": long_text}]}), 400)
    assert str(limit) in err["message"] and err["code"] == "context_length_exceeded"
    # a prompt that leaves 100 positions: asking for more fails, asking for exactly 100 works
    words = 1
    while len(prompt_ids(stack["tok"], [{"role": "user", "content": "hello world " * words}])) < limit - 100:
        words += 1
    messages = [{"role": "user", "content": "hello world " * words}]
    room = limit - len(prompt_ids(stack["tok"], messages))
    assert 0 < room <= 100 < CAP
    err = _error(_post(stack, {"messages": messages, "max_tokens": room + 1}), 400)
    assert str(limit) in err["message"] and err["param"] == "messages"
    ok = _post(stack, {"messages": messages, "max_tokens": room, "temperature": 0})
    assert ok.status_code == 200, ok.text
    # max_tokens left out: whatever room is left (bounded by the cap)
    ok = _post(stack, {"messages": messages, "temperature": 0, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == room


def test_auth_size_and_route_errors(stack: dict[str, Any]) -> None:
    body = {"messages": USER}
    assert _error(_post(stack, body, headers={}), 401)["code"] == "invalid_api_key"
    _error(_post(stack, body, headers={"Authorization": "Bearer wrong"}), 401)
    _error(httpx.get(stack["url"] + "/v1/models"), 401)
    big = {"messages": [{"role": "user", "content": "x" * (BODY_LIMIT + 10)}]}
    assert _error(_post(stack, big), 413)["code"] == "request_too_large"
    assert _error(httpx.get(stack["url"] + "/no/such/route", headers=auth()), 404)["code"] == "not_found"
    _error(httpx.get(stack["url"] + "/v1/chat/completions", headers=auth()), 405)


def test_openai_client_raises_typed_errors(stack: dict[str, Any], client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=USER, temperature=-1)
    with pytest.raises(openai.BadRequestError, match=str(CAP)):
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=CAP + 1)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi " * 2000}])
    wrong = openai.OpenAI(base_url=stack["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=MODEL, messages=USER)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * (BODY_LIMIT + 1)}])
    assert info.value.status_code == 413


def test_internal_errors_are_500_without_traceback(stack: dict[str, Any]) -> None:
    class Broken:
        engine = stack["engine"]
        active_rows = 0
        waiting = 0

        def submit(self, *args: Any, **kwargs: Any) -> Any:
            raise KeyError("boom")

    app = create_app(Broken(), MODEL)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            return await c.post("/v1/chat/completions", json={"messages": USER})

    r = asyncio.run(go())
    err = _error(r, 500)
    assert err["type"] == "server_error" and "boom" not in r.text


def test_page_placeholder_and_cors(stack: dict[str, Any], tmp_path: Path) -> None:
    app = create_app(stack["service"], MODEL, static_dir=tmp_path, cors_origins=["http://ui.example"])
    transport = httpx.ASGITransport(app=app)

    async def go() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            page = await c.get("/")
            pre = await c.options("/v1/chat/completions", headers={
                "Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type"})
            other = await c.get("/v1/models", headers={"Origin": "http://evil.example"})
            return page, pre, other

    page, pre, other = asyncio.run(go())
    assert page.status_code == 200 and "MiniMind" in page.text
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://ui.example"
    assert "access-control-allow-origin" not in other.headers
    plain = httpx.get(stack["url"] + "/v1/models", headers={**auth(), "Origin": "http://ui.example"})
    assert "access-control-allow-origin" not in plain.headers  # CORS is off by default


# ---- concurrency and disconnects ------------------------------------------------------------------
def test_concurrent_streams_all_get_their_scripts(stack: dict[str, Any]) -> None:
    scripts = [
        (PLAIN[:1], None, {}, PLAIN_REPLY),
        (HTML[:1], None, {}, HTML_REPLY),
        (THINKING[:1], None, {"chat_template_kwargs": {"open_thinking": True}}, THINK_ANSWER),
        (TOOL_ANSWER["messages"][:-1], [CALCULATOR_TOOL], {}, FINAL_ANSWER),
    ] * 2  # 8 requests on 4 slots: some wait for a free slot

    async def one(c: openai.AsyncOpenAI, messages: Any, tools: Any, extra: dict[str, Any]) -> str:
        kwargs: dict[str, Any] = {"tools": tools} if tools else {}
        stream = await c.chat.completions.create(model=MODEL, messages=messages, temperature=0, stream=True,
                                                 extra_body=extra, **kwargs)
        text = ""
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
        return text

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=stack["url"] + "/v1", api_key=API_KEY, max_retries=0) as c:
            return await asyncio.gather(*(one(c, m, t, e) for m, t, e, _ in scripts))

    assert asyncio.run(main()) == [want for *_, want in scripts]


def _wait_idle(stack: dict[str, Any], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = httpx.get(stack["url"] + "/health").json()
        if h["active"] == 0 and h["waiting"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"engine still busy: {h}")


def test_disconnecting_stream_frees_its_slot(stack: dict[str, Any], client: openai.OpenAI) -> None:
    _wait_idle(stack)
    before = len(stack["submitted"])
    body = {"model": MODEL, "messages": PLAIN[:1], "stream": True, "ignore_eos": True, "max_tokens": CAP,
            "temperature": 1.0}
    with httpx.stream("POST", stack["url"] + "/v1/chat/completions", json=body, headers=auth()) as r:
        lines = r.iter_lines()
        received = [next(lines) for _ in range(4)]  # a few events, then hang up
    assert all(line.startswith("data: ") or not line for line in received)
    _wait_idle(stack)
    handle = stack["submitted"][before]
    result = handle.results[0]
    assert result is not None and result.finish_reason == "cancelled"
    assert result.completion_tokens < CAP
    # every slot is usable again
    async def fill() -> list[str]:
        async with openai.AsyncOpenAI(base_url=stack["url"] + "/v1", api_key=API_KEY, max_retries=0) as c:
            rs = await asyncio.gather(*(c.chat.completions.create(model=MODEL, messages=PLAIN[:1], temperature=0)
                                        for _ in range(SLOTS)))
            return [x.choices[0].message.content for x in rs]

    assert asyncio.run(fill()) == [PLAIN_REPLY] * SLOTS


# ---- the CLI ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_minimind_serve_command(scripted: tuple[Any, Any], scripted_tok_dir: Path, tmp_path: Path) -> None:
    from minimind.model import save_weights

    _, model = scripted
    weights = tmp_path / "scripted.safetensors"
    save_weights(model, weights)
    port = _free_port()
    env = {**os.environ, "MINIMIND_API_KEY": "env-key"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "minimind.cli", "serve", "--weight", str(weights), "--tokenizer",
         str(scripted_tok_dir), "--port", str(port), "--slots", "2", "--max_tokens_cap", "64",
         "--device", "cpu", "--dtype", "float32", "--log_level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited: {proc.stdout.read() if proc.stdout else ''}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("serve did not come up")
            time.sleep(0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key="env-key", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["scripted"]  # default name: the weights' stem
        r = c.chat.completions.create(model="scripted", messages=PLAIN[:1], temperature=0)
        assert r.choices[0].message.content == PLAIN_REPLY
        with pytest.raises(openai.BadRequestError, match="64"):
            c.chat.completions.create(model="scripted", messages=PLAIN[:1], max_tokens=65)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_load_for_inference_reads_hf_folders(scripted: tuple[Any, Any], scripted_tok_dir: Path,
                                             tmp_path: Path) -> None:
    from minimind.export import export_hf
    from minimind.serve.cli import load_for_inference

    _, model = scripted
    out = export_hf(model, tmp_path / "hf", scripted_tok_dir)
    args = argparse.Namespace(weight=str(out), tokenizer_path="", save_dir="out", lora_weight="",
                              hidden_size=0, use_moe=-1, num_hidden_layers=0, preset="minimind-3",
                              inference_rope_scaling=False)
    loaded, tok, source = load_for_inference(args)
    assert source == out and tok.vocab_size == model.config.vocab_size
    ids = torch.tensor([tok.encode("Hi there")])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
