"""The MiniMind chat template and a renderer that matches HF ``apply_chat_template`` byte-for-byte.

Why a local renderer: training data preparation, the RL rollouts and the server all need to turn
messages into the exact prompt text the reference model was trained on. Going through
``transformers`` for that would make the core pipeline depend on it, so we reproduce its Jinja
environment (sandboxed, ``trim_blocks``/``lstrip_blocks``, ``loopcontrols``, a ``tojson`` filter
that keeps non-ASCII characters and uses Python's default separators, and ``raise_exception``).
The fixture cases in ``shared/compat/chat_template_cases.json`` pin the result.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["CHAT_TEMPLATE", "render_chat", "normalize_messages", "compile_template"]

# The reference template, reproduced verbatim: it is compatibility data (the token layout every
# MiniMind checkpoint was trained on), not code of ours. Raw string so Jinja sees the ``\n``
# escapes itself, exactly as when the template is read from tokenizer_config.json.
CHAT_TEMPLATE: str = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if true %}
            {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if open_thinking is defined and open_thinking is true %}
        {{- '<think>\n' }}
    {%- else %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""


class TemplateError(jinja2.TemplateError):
    """Raised by templates through the ``raise_exception`` global (same name HF uses)."""


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's built-in tojson HTML-escapes and sorts keys; HF replaces it with plain json.dumps so
    # tool schemas appear in the prompt exactly as given (CJK kept, default ", " / ": ").
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    # Offered by HF to templates that stamp the current date; harmless for ours.
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """Compile (and cache) a chat template; compiling costs far more than rendering."""
    return _environment().from_string(template)


def _maybe_json(value: Any) -> Any:
    """Decode a JSON-encoded list/object, leaving anything else untouched."""
    if isinstance(value, str):
        stripped = value.strip()
        if stripped[:1] in ("[", "{"):
            try:
                return json.loads(stripped)
            except json.JSONDecodeError:
                return value
    return value


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Shallow-copy messages, decoding ``tool_calls`` stored as a JSON string.

    Reference SFT data keeps ``tool_calls`` as a string (its Arrow schema is all strings); the
    template would iterate that string character by character, so it is decoded here. A single
    call object is wrapped in a list. ``arguments`` are left alone: the template itself inserts a
    string verbatim and serialises anything else.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        msg = dict(message)
        calls = msg.get("tool_calls")
        if isinstance(calls, str):
            decoded = _maybe_json(calls)
            if isinstance(decoded, str):
                # Empty or undecodable: treat "" / garbage as no calls rather than rendering junk.
                if decoded.strip():
                    raise ValueError(f"tool_calls is not valid JSON: {decoded[:80]!r}")
                decoded = None
            calls = decoded
            if isinstance(calls, dict):
                calls = [calls]
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | str | None = None,
    add_generation_prompt: bool = False,
    template: str | None = None,
    **kwargs: Any,
) -> str:
    """Render ``messages`` to prompt text, as HF ``apply_chat_template(tokenize=False)`` would.

    ``tools`` may also be a JSON string (as stored in reference SFT rows). Extra keyword arguments
    (e.g. ``open_thinking=True``) become template variables. ``template`` defaults to
    :data:`CHAT_TEMPLATE`.
    """
    if isinstance(tools, str):
        tools = _maybe_json(tools) if tools.strip() else None
        if isinstance(tools, str):
            raise ValueError(f"tools is not valid JSON: {tools[:80]!r}")
    compiled = compile_template(template if template is not None else CHAT_TEMPLATE)
    return compiled.render(
        messages=normalize_messages(messages),
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )
