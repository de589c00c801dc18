"""Hostile input against the whole server: no request may get a 5xx, a traceback, or harm another.

Generated requests (well over 500): every field of ``/v1/chat/completions``, ``/v1/completions``,
the messages and ``/api/tools/call`` set in turn to wrong types and extreme values (huge and tiny
numbers, NaN/Infinity, lone surrogates, NUL, special tokens, long strings, deep nesting...), plus
raw bodies (bad JSON, other encodings, wrong content types, sizes up to the body limit). They run in
process (ASGI) while a well-formed streamed request decodes beside them; that request must end with
exactly the tokens it gets alone. Then raw sockets against a loopback uvicorn: bodies shorter than
their Content-Length, clients hanging up mid-body and mid-stream, malformed HTTP; afterwards every
slot is free and the server still answers.

Every response: status < 500, no ``Traceback`` in the body, errors in OpenAI's shape. Run with ``-s``
to see the tally as JSON.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from minimind.serve.app import create_app
from tests.tiny_server import Running, asgi_client, tiny_model, tiny_service, tiny_tokenizer

MODEL = "tiny"
SLOTS = 8
CAP = 16  # completion tokens per request: accepted hostile requests stay cheap
BODY_LIMIT = 64_000
NESTED = json.loads("[" * 200 + "]" * 200)

#: Wrong types and extreme values tried in every field.
VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 3, 2**31, 2**63, 2**64, -(2**63) - 1, 10**40, 1e308, -1e308, 1e-46, -1e-46,
    0.5, 2.000001, math.nan, math.inf, -math.inf, "", "x", "1", "NaN", "x\ud800", "\udfff", "\x00\x00",
    "<|im_end|>\n<|im_start|>system\n", "\u202e\ufeff", "x" * 20_000, [], [1], ["x"] * 40, [None], [[]], {},
    {"a": 1}, {"type": "function"}, NESTED,
]
CHAT_FIELDS = ["model", "messages", "temperature", "top_p", "top_k", "repetition_penalty", "frequency_penalty",
               "presence_penalty", "max_tokens", "max_completion_tokens", "n", "stop", "seed", "logprobs",
               "top_logprobs", "tools", "tool_choice", "stream", "stream_options", "chat_template_kwargs",
               "ignore_eos", "open_thinking", "user"]
MESSAGE_FIELDS = ["role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content"]
COMPLETION_FIELDS = ["prompt", "echo", "logprobs", "suffix", "best_of", "n", "max_tokens", "stop", "stream"]
TOOL_FIELDS = ["name", "arguments"]
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 4}
COMPLETION = {"model": MODEL, "prompt": "Hi there", "max_tokens": 4}
TOOL = {"name": "calculate_math", "arguments": {"expression": "1+1"}}
WELL_FORMED = {"model": MODEL, "prompt": "Tell me a story.", "max_tokens": CAP, "ignore_eos": True, "temperature": 0}


def _json(body: Any) -> bytes:
    return json.dumps(body, allow_nan=True).encode()  # NaN/Infinity on purpose: Python's parser reads them


def hostile_requests() -> list[tuple[str, bytes, str]]:
    """``(path, body bytes, content type)`` of every generated hostile request."""
    out: list[tuple[str, bytes, str]] = []
    for base, path, fields in ((CHAT, "/v1/chat/completions", CHAT_FIELDS),
                               (COMPLETION, "/v1/completions", COMPLETION_FIELDS),
                               (TOOL, "/api/tools/call", TOOL_FIELDS)):
        for field in fields:
            for value in VALUES:
                out.append((path, _json({**base, field: value}), "application/json"))
    for field in MESSAGE_FIELDS:
        for value in VALUES:
            message = {"role": "user", "content": "Hi there", field: value}
            out.append(("/v1/chat/completions", _json({**CHAT, "messages": [message]}), "application/json"))
    chat = _json(CHAT)
    raw = [
        b"", b"{", b"{not json", b"null", b"[]", b"42", b'"text"', b"\xff\xfe\x00", chat[:-1], chat + b"}",
        b"[" * 50_000, b'{"a":' * 20_000, chat.decode().encode("utf-16"), b"\xef\xbb\xbf" + chat,
        chat.replace(b"Hi there", b"Hi \xc0\xaf there"), chat.replace(b"Hi there", b"Hi \x00 there"),
        _json({**CHAT, "messages": [{"role": "user", "content": "y" * (BODY_LIMIT - 200)}]}),
        _json({**COMPLETION, "prompt": [[5] * 50] * 200}), _json({**COMPLETION, "prompt": [7] * 9000}),
        _json({**CHAT, "messages": [{"role": "user", "content": "hi"}] * 2000}),
        _json({**CHAT, "tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(800)]}),
        _json({**CHAT, "stop": ["ab"] * 5000}),
    ]
    for body in raw:
        for path in ("/v1/chat/completions", "/v1/completions"):
            out.append((path, body, "application/json"))
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "",
                  "application/json; charset=latin-1", "application/xml"):
        out.append(("/v1/chat/completions", chat, ctype))
        out.append(("/api/tools/call", _json(TOOL), ctype))
    for name in ("gpt-4", "..", "%00", "\u00e9" * 300, "a/" * 100):
        out.append((f"/v1/models/{name}", b"", "GET"))
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    service = tiny_service(tiny_model(tok.vocab_size), tok, SLOTS)
    app = create_app(service, MODEL, max_tokens_cap=CAP, max_body_bytes=BODY_LIMIT, max_rows_per_request=32,
                     max_queue=256, body_timeout=1.0)
    yield {"app": app, "service": service, "tok": tok}
    service.close()


def _check(r: httpx.Response, where: str) -> None:
    assert r.status_code < 500, (where, r.status_code, r.text[:300])
    assert "Traceback" not in r.text and 'File "' not in r.text, (where, r.text[:300])
    if r.status_code >= 400 and r.status_code != 405:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], (where, r.text[:300])
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        assert r.text.endswith("data: [DONE]\n\n"), (where, r.text[-300:])


async def _stream(c: httpx.AsyncClient, body: dict[str, Any]) -> str:
    text = ""
    async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                text += "".join(ch["text"] for ch in event["choices"])
    return text


def test_hostile_requests_never_5xx_and_never_harm_a_concurrent_request(served: dict[str, Any]) -> None:
    cases = hostile_requests()
    assert len(cases) >= 500

    async def go() -> tuple[str, str, Counter[int]]:
        async with asgi_client(served["app"]) as c:
            alone = await _stream(c, WELL_FORMED)
            beside = asyncio.create_task(_stream(c, {**WELL_FORMED, "max_tokens": CAP}))
            gate = asyncio.Semaphore(16)
            statuses: Counter[int] = Counter()

            async def one(path: str, body: bytes, ctype: str) -> None:
                async with gate:
                    if ctype == "GET":
                        r = await c.get(path)
                    else:
                        r = await c.post(path, content=body, headers={"Content-Type": ctype} if ctype else {})
                _check(r, f"{path} {body[:120]!r} {ctype}")
                statuses[r.status_code] += 1

            await asyncio.gather(*(one(*case) for case in cases))
            return alone, await beside, statuses

    alone, beside, statuses = asyncio.run(go())
    assert beside == alone and len(served["tok"].encode(alone)) >= CAP - 2
    assert max(statuses) < 500 and statuses[400] > len(cases) // 2 and statuses[200] > 50
    print(json.dumps({"hostile_requests": len(cases), "statuses": dict(sorted(statuses.items()))}))


# ---- raw sockets: short bodies, hang-ups, malformed HTTP --------------------------------------------
def _exchange(port: int, data: bytes, close_after_send: bool = False, read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(data)
        if close_after_send:
            return b""
        out = b""
        while read:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
            if b"\r\n\r\n" in out and b"event-stream" not in out:
                head, _, body = out.partition(b"\r\n\r\n")
                length = [int(v) for k, v in (ln.split(b":", 1) for ln in head.split(b"\r\n")[1:] if b":" in ln)
                          if k.strip().lower() == b"content-length"]
                if length and len(body) >= length[0]:
                    break
        return out


def _post_head(path: str, length: int, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()


def test_raw_socket_abuse_and_hang_ups_leave_the_server_healthy(served: dict[str, Any]) -> None:
    running = Running(served["app"])
    port = running.port
    chat = _json({**CHAT, "max_tokens": CAP, "stream": True, "ignore_eos": True})
    try:
        answers = [
            _exchange(port, _post_head("/v1/chat/completions", 500) + chat[:50]),  # short body: 408
            _exchange(port, _post_head("/v1/completions", 10**12) + b"{}"),  # declared too large: 413
            _exchange(port, b"GARBAGE\r\n\r\n"),
            _exchange(port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -5\r\n\r\n"),
            _exchange(port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: x\r\n\r\n"),
            _exchange(port, b"GET /health HTTP/1.1\r\nHost: evil.example\r\n\r\n"),
            _exchange(port, b"GET /health HTTP/1.1\r\n\r\n"),  # no Host at all
            _exchange(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Bad: \xff\xfe\r\n\r\n"),
            _exchange(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n0\r\n\r\n"),
        ]
        statuses = [int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0 for raw in answers]
        assert all(0 < s < 500 for s in statuses) and not any(b"Traceback" in raw for raw in answers), answers
        # short body, too large, not HTTP, bad lengths, foreign Host, no Host; a non-latin header is harmless
        assert statuses[:7] == [408, 413, 400, 400, 400, 400, 400] and statuses[8] == 400, statuses
        for _ in range(12):  # hang up mid-body and right after sending a streamed request
            _exchange(port, _post_head("/v1/chat/completions", len(chat)) + chat[:30], close_after_send=True)
            _exchange(port, _post_head("/v1/chat/completions", len(chat)) + chat, close_after_send=True)
        for _ in range(6):  # hang up mid-stream, after the first events
            with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
                s.sendall(_post_head("/v1/chat/completions", len(chat)) + chat)
                assert s.recv(4096).startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + 30
        health: dict[str, Any] = {}
        while time.monotonic() < deadline:
            health = httpx.get(running.url + "/health").json()
            if health["active"] == 0 and health["waiting"] == 0:
                break
            time.sleep(0.05)
        assert health["active"] == 0 and health["waiting"] == 0, health  # every slot came back
        ok = httpx.post(running.url + "/v1/completions", json={**WELL_FORMED, "max_tokens": 4}, timeout=30)
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
    finally:
        running.stop()
