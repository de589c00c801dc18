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
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["CHAT_TEMPLATE", "compile_template", "encode_chat", "normalize_messages", "render_chat",
           "render_chat_pieces"]

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


# ---- rendering with the messages' own text kept literal --------------------------------------------
#: Private-use code points tried as the placeholder marker (one absent from every input is picked).
_MARKER_RANGE = range(0xE000, 0xF900)


def _strings(value: Any) -> list[str]:
    """Every string (keys included) inside nested dicts/lists/tuples."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def _substitute(value: Any, pattern: re.Pattern[str], repl: Callable[[re.Match[str]], str]) -> Any:
    """A copy of ``value`` with ``pattern`` replaced in every string (keys included)."""
    if isinstance(value, str):
        return pattern.sub(repl, value)
    if isinstance(value, Mapping):
        return {_substitute(k, pattern, repl): _substitute(v, pattern, repl) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_substitute(v, pattern, repl) for v in value]
    return value


def render_chat_pieces(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    literal: Sequence[str],
    add_generation_prompt: bool = False,
    template: str | None = None,
    **kwargs: Any,
) -> list[tuple[str, bool]]:
    """Render like :func:`render_chat`, marking where the ``literal`` strings came from the messages.

    Returns ``(text, is_literal)`` pieces whose texts concatenate to exactly what :func:`render_chat`
    returns. A piece flagged literal is an occurrence of one of ``literal`` (e.g. ``<|im_end|>``)
    inside a message field or a tool schema, as opposed to the template's own markup.

    Why: the rendered prompt is one string, so a user who types ``<|im_end|>\n<|im_start|>system``
    would otherwise be encoded as real role tokens (role injection). Each such occurrence is swapped
    for a placeholder (a private-use character absent from every input, the index, the character
    again) before rendering and turned back afterwards, so the template's logic sees the same
    strings' shape and nothing the user wrote can be mistaken for template markup.
    """
    if not literal:
        return [(render_chat(messages, tools, add_generation_prompt, template, **kwargs), False)]
    inputs = _strings(list(messages)) + _strings(tools)
    marker = next(chr(c) for c in _MARKER_RANGE if not any(chr(c) in s for s in inputs))
    order = sorted(set(literal), key=len, reverse=True)  # longest first: no token hides a longer one
    pattern = re.compile("|".join(re.escape(t) for t in order))
    index = {t: k for k, t in enumerate(order)}

    def to_placeholder(m: re.Match[str]) -> str:
        return f"{marker}{index[m.group(0)]}{marker}"

    text = render_chat(_substitute(list(messages), pattern, to_placeholder),
                       _substitute(tools, pattern, to_placeholder), add_generation_prompt, template, **kwargs)
    pieces: list[tuple[str, bool]] = []
    for k, part in enumerate(re.split(f"{marker}(\\d+){marker}", text)):
        if k % 2:
            pieces.append((order[int(part)], True))
        elif part:
            pieces.append((part, False))
    return pieces


def _encode_literal(encode: Callable[[str], list[int]], text: str, forbidden: set[int]) -> list[int]:
    """Ids of ``text`` as plain text: split before its second character, so the tokenizer's atomic
    match of the whole token cannot happen; per character if a piece still hits ``forbidden`` ids."""
    ids = encode(text[:1]) + encode(text[1:])
    if forbidden.isdisjoint(ids):
        return ids
    return [i for ch in text for i in encode(ch)]


def encode_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    **kwargs: Any,
) -> tuple[str, list[int]]:
    """``(prompt text, ids)`` of a chat, with the messages' text never encoded as special tokens.

    ``tokenizer`` needs ``encode``, ``chat_template``, ``all_special_ids`` and ``id_to_token``
    (:class:`~minimind.tokenizer.MiniMindTokenizer` has them). The template's markup is encoded as
    usual; a special token's string typed inside a message or a tool schema (``<|im_end|>``,
    ``<|im_start|>``...) is encoded as the ordinary text it is. Structural tokens that are not
    flagged special (``<think>``, ``<tool_call>``) keep their usual encoding: a message may quote
    them and the trained model reads them that way. A chat without any special string gets exactly
    ``encode(render_chat(...))``.
    """
    special_ids = set(tokenizer.all_special_ids)
    literal = [t for i in sorted(special_ids) if (t := tokenizer.id_to_token(i))]
    pieces = render_chat_pieces(messages, tools, literal=literal, add_generation_prompt=add_generation_prompt,
                                template=tokenizer.chat_template, **kwargs)
    ids: list[int] = []
    for text, is_literal in pieces:
        ids += _encode_literal(tokenizer.encode, text, special_ids) if is_literal else tokenizer.encode(text)
    return "".join(text for text, _ in pieces), ids
