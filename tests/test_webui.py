"""The web UI of ``minimind serve``, driven in real headless Chromium.

The page is served by the real app (:func:`minimind.serve.app.create_app`) over the real engine
service, with a tiny model overfitted to scripted replies (:mod:`tests.scripted_model`), so every
check sees exactly what a user would: streamed text, the reasoning block, a tool round through
``/api/tools/call`` and an HTML-looking reply that must stay text.

Chromium is the Debian build at ``/usr/bin/chromium`` driven through Playwright's Python API;
nothing is ever downloaded, and the module is skipped when either is missing.

``MINIMIND_SCREENSHOTS=docs/img pytest tests/test_webui.py -k screenshots`` also saves the README
screenshots (``webui_chat.png``, ``webui_tools.png``) into that folder.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MODEL_NAME = "minimind-webui-test"
WAIT_MS = 20_000  # generous per-step limit for a loaded CI machine; waits end as soon as they can

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python package) is not installed")
pytest.importorskip("uvicorn", reason="uvicorn is not installed")
pytest.importorskip("fastapi", reason="fastapi is not installed")
if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} is missing (install Debian's chromium; browsers are never downloaded)",
                allow_module_level=True)

from minimind.tasks.tools import call_tool, tool_result_text, tool_schemas

# ---- the scripted conversations --------------------------------------------------------------------
# The tool turn must use the schema the page sends (the server's own calculator, from /api/tools)
# and the result text the server's tool returns, because both are part of the prompt of the next turn.
CALC = next(t for t in tool_schemas() if t["function"]["name"] == "calculate_math")
CALC_RESULT = tool_result_text(call_tool("calculate_math", {"expression": "12*7"}))

HELLO_Q, HELLO_A = "Hi there", "Hello! I am MiniMind, a tiny model."
SKY_Q, SKY_REASONING, SKY_A = ("Why is the sky blue?", "Sunlight scatters off air; blue scatters most.",
                               "Because of Rayleigh scattering.")
TOOL_Q, TOOL_A = "What is 12*7?", "12*7 = 84."
HTML_Q, HTML_A = "Show me some html", "Here: <img src=x onerror=alert(1)>"

CONVERSATIONS: list[Any] = [
    # Two rounds: the second answer is only reproduced if the page sends the whole history.
    [{"role": "user", "content": HELLO_Q}, {"role": "assistant", "content": HELLO_A},
     {"role": "user", "content": SKY_Q},
     {"role": "assistant", "reasoning_content": SKY_REASONING, "content": SKY_A}],
    {"tools": [CALC], "messages": [
        {"role": "user", "content": TOOL_Q},
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": "call_0", "type": "function",
            "function": {"name": "calculate_math", "arguments": {"expression": "12*7"}}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": CALC_RESULT},
        {"role": "assistant", "content": TOOL_A},
    ]},
    [{"role": "user", "content": HTML_Q}, {"role": "assistant", "content": HTML_A}],
]


# ---- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The real engine service over a tiny model that has learnt the scripted replies."""
    from minimind.infer.engine import GenerationEngine
    from minimind.infer.service import EngineService
    from tests.scripted_model import small_tokenizer, train_scripted_model

    tok = small_tokenizer(tmp_path_factory.mktemp("webui_tok"), CONVERSATIONS)
    model = train_scripted_model(tok, CONVERSATIONS)
    svc = EngineService(GenerationEngine(model, tok))
    try:
        yield svc
    finally:
        svc.close()


@contextmanager
def _serve(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a background thread at a free 127.0.0.1 port; yields its URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # bound here and handed over, so no other process can take the port
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def server_url(service: Any) -> Iterator[str]:
    """The real app (``create_app``) serving the page and the API."""
    from minimind.serve.app import create_app

    with _serve(create_app(service, MODEL_NAME)) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api.expect.set_options(timeout=WAIT_MS)  # assertions retry until true or this long
    with sync_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        except Exception as exc:  # noqa: BLE001 - e.g. missing shared libraries
            pytest.skip(f"cannot start {CHROMIUM}: {exc}")
        try:
            yield b
        finally:
            b.close()


class Watch:
    """Dialogs and page errors seen during a test (an XSS payload would fire a dialog)."""

    def __init__(self) -> None:
        self.dialogs: list[str] = []
        self.errors: list[str] = []


# Any alert/confirm/prompt also flips a marker the test reads back, in case a dialog were swallowed.
_XSS_TRAP = """
window.__xss = false;
for (const name of ["alert", "confirm", "prompt"]) {
  const original = window[name];
  window[name] = function (...args) { window.__xss = true; return original.apply(window, args); };
}
window.__csp = [];
document.addEventListener("securitypolicyviolation",
                          (e) => window.__csp.push(`${e.violatedDirective} ${e.blockedURI}`));
"""


def _open(browser: Any, url: str, locale: str = "en-US", viewport: dict[str, int] | None = None,
          watch: Watch | None = None, csp: bool = False) -> Any:
    # csp=False (bypass): the page's Content-Security-Policy would also stop injected handlers; the
    # escaping must hold on its own, so the chat tests run without that safety net.
    context = browser.new_context(locale=locale, viewport=viewport or {"width": 1100, "height": 800},
                                  bypass_csp=not csp, service_workers="block")
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.add_init_script(_XSS_TRAP)
    if watch is not None:
        page.on("dialog", lambda d: (watch.dialogs.append(d.message), d.dismiss()))
        page.on("pageerror", lambda e: watch.errors.append(str(e)))
    page.goto(url)
    sync_api.expect(page.locator("#model-name")).to_have_text(MODEL_NAME)
    return page


@pytest.fixture
def watch() -> Watch:
    return Watch()


@pytest.fixture
def page(browser: Any, server_url: str, watch: Watch) -> Iterator[Any]:
    """A fresh browser context (empty localStorage) on the page, in English, sampling greedily."""
    pg = _open(browser, server_url, watch=watch)
    _greedy(pg)
    try:
        yield pg
    finally:
        pg.context.close()
    assert watch.errors == [], f"JavaScript errors on the page: {watch.errors}"


def _greedy(page: Any, open_settings: bool = True) -> None:
    if open_settings:
        page.click("#settings-toggle")
    # greedy, so the scripted replies come back exactly
    page.locator("#temperature").evaluate(
        "e => { e.value = '0'; e.dispatchEvent(new Event('input', {bubbles: true})); }")
    page.fill("#max-tokens", "96")
    page.dispatch_event("#max-tokens", "change")


def _send(page: Any, text: str) -> None:
    page.fill("#input", text)
    page.click("#send")


def _wait_idle(page: Any) -> None:
    """Until the page has finished the exchange (the send button is back)."""
    sync_api.expect(page.locator("#send")).to_be_visible()
    sync_api.expect(page.locator("body")).not_to_have_class("busy")


# ---- tests ------------------------------------------------------------------------------------------
def test_streams_a_reply_and_keeps_the_history(page: Any) -> None:
    expect = sync_api.expect
    requests: list[dict[str, Any]] = []
    page.on("request", lambda r: requests.append(r.post_data_json)
            if r.url.endswith("/v1/chat/completions") else None)
    # Count the text updates of the reply: a streamed reply grows in several steps.
    page.evaluate("""() => {
      window.__updates = 0;
      new MutationObserver((records) => {
        for (const r of records) {
          const box = (r.target.nodeType === 3 ? r.target.parentNode : r.target);
          if (box && box.closest && box.closest(".msg.assistant .content")) window.__updates++;
        }
      }).observe(document.getElementById("messages"), {subtree: true, childList: true, characterData: true});
    }""")
    _send(page, HELLO_Q)
    expect(page.locator(".msg.user .content")).to_have_text(HELLO_Q)
    answer = page.locator(".msg.assistant .content").first
    expect(answer).to_have_text(HELLO_A)
    _wait_idle(page)
    assert page.evaluate("window.__updates") >= 3, "the reply was not rendered as it streamed"
    assert requests[0]["stream"] is True
    assert requests[0]["temperature"] == 0
    assert requests[0]["chat_template_kwargs"] == {"open_thinking": False}
    assert "tools" not in requests[0]

    # Second round with thinking on: the full history goes out and the reasoning is shown.
    page.check("#thinking-toggle")
    _send(page, SKY_Q)
    details = page.locator(".msg.assistant").nth(1).locator("details.reasoning")
    expect(details.locator(".reasoning-text")).to_have_text(SKY_REASONING)
    expect(page.locator(".msg.assistant").nth(1).locator(".content")).to_have_text(SKY_A)
    _wait_idle(page)
    assert [m["role"] for m in requests[1]["messages"]] == ["user", "assistant", "user"]
    assert requests[1]["messages"][1]["content"] == HELLO_A
    assert requests[1]["chat_template_kwargs"] == {"open_thinking": True}
    # The reasoning block is a real <details>: open after streaming, collapsible by its summary.
    assert details.evaluate("d => d.open") is True
    details.locator("summary").click()
    assert details.evaluate("d => d.open") is False
    expect(details.locator(".reasoning-text")).to_be_hidden()

    # The conversation survives a reload (localStorage); "new chat" clears it.
    page.reload()
    expect(page.locator(".msg")).to_have_count(4)
    expect(page.locator(".msg.assistant .content").first).to_have_text(HELLO_A)
    expect(page.locator("details.reasoning .reasoning-text")).to_have_text(SKY_REASONING)
    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()


def test_tool_round_runs_the_calculator(page: Any) -> None:
    expect = sync_api.expect
    bodies: list[dict[str, Any]] = []
    page.on("request", lambda r: bodies.append(r.post_data_json)
            if r.url.endswith("/v1/chat/completions") else None)
    box = page.locator("#tool-calculate_math")
    expect(box).to_be_visible()
    for name in ("unit_converter", "get_current_time", "date_add", "lookup", "get_current_weather"):
        expect(page.locator(f"#tool-{name}")).not_to_be_checked()
    box.check()
    _send(page, TOOL_Q)

    call = page.locator(".tool-call")
    expect(call).to_have_count(1)
    expect(call.locator(".tool-name")).to_have_text("calculate_math")
    expect(call.locator(".tool-args")).to_contain_text('"expression": "12*7"')
    result = page.locator(".tool-result")
    expect(result).to_have_count(1)
    expect(result).not_to_have_class("pending")
    expect(result.locator(".tool-output")).to_contain_text("84")
    expect(page.locator(".msg.assistant").last.locator(".content")).to_have_text(TOOL_A)
    _wait_idle(page)

    assert len(bodies) == 2
    assert [t["function"]["name"] for t in bodies[0]["tools"]] == ["calculate_math"]
    assert bodies[0]["tools"] == [CALC]
    second = bodies[1]["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "tool"]
    (tool_call,) = second[1]["tool_calls"]
    assert tool_call["function"]["name"] == "calculate_math"
    assert second[2] == {"role": "tool", "tool_call_id": tool_call["id"], "content": CALC_RESULT}


def _sse(*events: dict[str, Any]) -> str:
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _call(index: int, name: str, arguments: str) -> dict[str, Any]:
    return {"index": index, "id": f"call_{index}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def test_only_ticked_tools_run_and_failures_stay_marked(page: Any) -> None:
    """The model may name any tool: an unticked one never reaches the server (its result is an error),
    and a failed result is still marked failed after a reload. The replies are scripted by routing
    the chat request, so the model cannot get in the way."""
    expect = sync_api.expect
    ran: list[dict[str, Any]] = []
    page.on("request", lambda r: ran.append(r.post_data_json) if r.url.endswith("/api/tools/call") else None)
    replies = [
        _sse(_chunk({"role": "assistant", "content": ""}),
             _chunk({"tool_calls": [_call(0, "get_current_time", "{}")]}),
             _chunk({"tool_calls": [_call(1, "calculate_math", '{"expression": "1+1"}')]}),
             _chunk({"tool_calls": [_call(2, "calculate_math", "{oops")]}),
             _chunk({}, "tool_calls")),
        _sse(_chunk({"role": "assistant", "content": "done"}), _chunk({}, "stop")),
    ]
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=replies.pop(0)))
    page.locator("#tool-calculate_math").check()
    expect(page.locator("#tool-get_current_time")).not_to_be_checked()
    _send(page, "use the tools")
    expect(page.locator(".msg.assistant").last.locator(".content")).to_have_text("done")
    _wait_idle(page)
    results = page.locator(".tool-result")
    expect(results).to_have_count(3)
    expect(results.nth(0)).to_have_class(re.compile(r"\berror\b"))
    expect(results.nth(0).locator(".tool-output")).to_contain_text("not enabled")
    expect(results.nth(1)).not_to_have_class(re.compile(r"\berror\b"))
    expect(results.nth(1).locator(".tool-output")).to_contain_text("2")
    expect(results.nth(2)).to_have_class(re.compile(r"\berror\b"))
    assert ran == [{"name": "calculate_math", "arguments": {"expression": "1+1"}}]
    page.reload()
    expect(page.locator(".tool-result")).to_have_count(3)
    expect(page.locator(".tool-result.error")).to_have_count(2)
    expect(page.locator(".tool-result").nth(1)).not_to_have_class(re.compile(r"\berror\b"))


def test_html_in_a_reply_is_shown_as_text(page: Any, watch: Watch) -> None:
    expect = sync_api.expect
    _send(page, HTML_Q)
    answer = page.locator(".msg.assistant .content").first
    expect(answer).to_have_text(HTML_A)
    _wait_idle(page)
    assert page.locator("#messages img").count() == 0
    assert page.evaluate("window.__xss") is False
    # A user message that looks like markup is text too.
    payload = '<img src=y onerror="window.__xss=true"><script>window.__xss=true</script>'
    _send(page, payload)
    expect(page.locator(".msg.user .content").last).to_have_text(payload)
    _wait_idle(page)
    page.reload()  # the stored history is rendered again: still text
    expect(answer).to_have_text(HTML_A)
    assert page.locator("#messages img, #messages script").count() == 0
    assert page.evaluate("window.__xss") is False
    assert watch.dialogs == []


def test_language_switch(browser: Any, server_url: str) -> None:
    """Also runs with the page's Content-Security-Policy enforced: the page must work under it."""
    expect = sync_api.expect
    pg = _open(browser, server_url, locale="en-US", csp=True)
    try:
        expect(pg.locator("#send")).to_have_text("Send")
        expect(pg.locator("label[for=thinking-toggle]")).to_contain_text("Thinking")
        pg.select_option("#lang", "zh")
        expect(pg.locator("#send")).to_have_text("发送")
        expect(pg.locator("label[for=thinking-toggle]")).to_contain_text("思考")
        expect(pg.locator("#new-chat")).to_have_text("新对话")
        assert pg.locator("#input").get_attribute("placeholder") == "给 MiniMind 发消息…"
        assert pg.evaluate("document.documentElement.lang") == "zh-CN"
        pg.reload()  # the choice is remembered
        expect(pg.locator("#send")).to_have_text("发送")
        expect(pg.locator("#tool-calculate_math")).to_be_attached()  # the tools loaded under the CSP
        assert pg.evaluate("window.__csp") == []
    finally:
        pg.context.close()
    # Without a stored choice the language follows the browser's.
    pg = _open(browser, server_url, locale="zh-CN")
    try:
        expect(pg.locator("#settings-toggle")).to_have_text("设置")
    finally:
        pg.context.close()


def test_api_key_from_settings(browser: Any, service: Any) -> None:
    """A server with a key: the page says so, and works once the key is entered in the settings."""
    from minimind.serve.app import create_app

    expect = sync_api.expect
    with _serve(create_app(service, MODEL_NAME, api_key="s3cret-key")) as url:
        context = browser.new_context(locale="en-US", bypass_csp=True)
        try:
            pg = context.new_page()
            pg.goto(url)
            expect(pg.locator("#status")).to_contain_text("API key")
            expect(pg.locator("#model-name")).to_have_class("model-name offline")
            pg.click("#settings-toggle")
            pg.fill("#api-key", "s3cret-key")
            pg.press("#api-key", "Enter")
            expect(pg.locator("#model-name")).to_have_text(MODEL_NAME)
            expect(pg.locator("#status")).to_be_hidden()
            expect(pg.locator("#tool-calculate_math")).to_be_attached()
            _greedy(pg, open_settings=False)
            headers: list[str | None] = []
            pg.on("request", lambda r: headers.append(r.headers.get("authorization"))
                  if r.url.endswith("/v1/chat/completions") else None)
            _send(pg, HELLO_Q)
            expect(pg.locator(".msg.assistant .content")).to_have_text(HELLO_A)
            _wait_idle(pg)
            assert headers == ["Bearer s3cret-key"]
        finally:
            context.close()


@pytest.mark.skipif(not os.environ.get("MINIMIND_SCREENSHOTS"),
                    reason="set MINIMIND_SCREENSHOTS=<folder> to save the README screenshots")
def test_screenshots(browser: Any, server_url: str) -> None:
    """Save ``webui_chat.png`` (two rounds, reasoning shown) and ``webui_tools.png`` (a tool round)."""
    expect = sync_api.expect
    out = Path(os.environ["MINIMIND_SCREENSHOTS"])
    out.mkdir(parents=True, exist_ok=True)
    size = {"width": 1180, "height": 760}

    pg = _open(browser, server_url, viewport=size)
    try:
        _greedy(pg)
        pg.click("#settings-toggle")  # hide the settings for the chat picture
        _send(pg, HELLO_Q)
        expect(pg.locator(".msg.assistant .content").first).to_have_text(HELLO_A)
        _wait_idle(pg)
        pg.check("#thinking-toggle")
        _send(pg, SKY_Q)
        expect(pg.locator(".msg.assistant").nth(1).locator(".content")).to_have_text(SKY_A)
        _wait_idle(pg)
        pg.locator("#input").blur()
        pg.screenshot(path=str(out / "webui_chat.png"))
    finally:
        pg.context.close()

    pg = _open(browser, server_url, viewport=size)
    try:
        _greedy(pg)  # the settings stay open: they show the tool switches
        pg.check("#tool-calculate_math")
        _send(pg, TOOL_Q)
        expect(pg.locator(".msg.assistant").last.locator(".content")).to_have_text(TOOL_A)
        _wait_idle(pg)
        pg.locator("#input").blur()
        pg.screenshot(path=str(out / "webui_tools.png"))
    finally:
        pg.context.close()
