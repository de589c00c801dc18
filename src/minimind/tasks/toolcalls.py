"""Parsing assistant replies into reasoning, content and tool calls, and writing tool calls back.

Why here and not in the server: the server (turning a completion into an OpenAI ``tool_calls``
response), the evaluation suite (grading a call) and agentic RL (executing calls mid-rollout)
must agree on what counts as a call, and on what text a call is written as, or a model would be
scored on a format it was not trained to produce.

The format is the one the MiniMind chat template renders: a reasoning block
``<think>...</think>`` first, then content, then zero or more
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ParsedReply",
    "ToolCall",
    "format_tool_call",
    "parse_reply",
    "parse_tool_calls",
    "split_reasoning",
]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ToolCall:
    """One parsed call; ``raw`` is the whole ``<tool_call>...</tool_call>`` block it came from."""

    name: str
    arguments: dict[str, Any]
    raw: str


@dataclass
class ParsedReply:
    """A reply split into its parts; ``errors`` explains every block that was not a valid call."""

    content: str
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def split_reasoning(text: str) -> tuple[str | None, str]:
    """``(reasoning, content)``: the reasoning block is taken out of the reply.

    * ``<think>r</think>c`` -> ``("r", "c")``; the reasoning loses its surrounding newlines and the
      content its leading newlines, as the chat template does when it re-renders a turn.
    * ``r</think>c`` (the generation prompt already opened the block) -> ``("r", "c")``.
    * ``<think>r`` never closed (still thinking, or cut off by the token limit) -> ``("r", "")``.
    * no tags -> ``(None, text)``.

    With several ``</think>`` the content starts after the last one, as in the template. Text
    before an opening ``<think>`` is unusual but kept, at the front of the content, so nothing
    the model wrote outside the reasoning is dropped.
    """
    if THINK_CLOSE not in text:
        stripped = text.lstrip()
        if stripped.startswith(THINK_OPEN):
            return stripped[len(THINK_OPEN):].strip("\n"), ""
        return None, text
    head, _, tail = text.rpartition(THINK_CLOSE)
    before, opened, inside = head.partition(THINK_OPEN)
    reasoning = inside if opened else head
    content = tail.lstrip("\n")
    if opened and before.strip():
        content = before.strip() + "\n" + content
    return reasoning.strip("\n"), content


def _parse_call_body(body: str) -> tuple[str, dict[str, Any]] | str:
    """``(name, arguments)`` of a block body, or the reason it is not a valid call."""
    try:
        obj = json.loads(body.strip())
    except (ValueError, RecursionError) as exc:
        return f"not valid JSON ({exc})" if isinstance(exc, ValueError) else "not valid JSON"
    if isinstance(obj, dict) and isinstance(obj.get("function"), dict):  # OpenAI shape
        obj = obj["function"]
    if not isinstance(obj, dict):
        return "not a JSON object"
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return "missing or non-string 'name'"
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except (ValueError, RecursionError):
            return f"'arguments' of {name!r} is a string but not valid JSON"
    if not isinstance(args, dict):
        return f"'arguments' of {name!r} is not a JSON object"
    return name, args


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall], list[str]]:
    """``(content, calls, errors)`` for a reply (without its reasoning block).

    Each ``<tool_call>`` block whose body is a JSON object with a string ``name`` and object
    ``arguments`` (or a JSON string holding one; missing means ``{}``; the OpenAI
    ``{"function": {...}}`` wrapper is accepted) becomes a :class:`ToolCall`, in order, and is
    removed from the content. A malformed block (bad JSON, no name, no closing tag, an opening
    tag inside another block) stays in the content and adds an error, so a caller can show or
    penalise it rather than silently lose it. The content is stripped of surrounding whitespace.
    """
    calls: list[ToolCall] = []
    errors: list[str] = []
    kept: list[str] = []
    pos = 0  # start of the text not yet copied to ``kept``
    search = 0
    while True:
        start = text.find(CALL_OPEN, search)
        if start < 0:
            break
        body_start = start + len(CALL_OPEN)
        end = text.find(CALL_CLOSE, body_start)
        reopened = text.find(CALL_OPEN, body_start)
        if end < 0 or 0 <= reopened < end:
            errors.append(f"tool call at character {start}: {CALL_OPEN} is not closed")
            search = body_start
            continue
        block_end = end + len(CALL_CLOSE)
        parsed = _parse_call_body(text[body_start:end])
        if isinstance(parsed, str):
            errors.append(f"tool call at character {start}: {parsed}")
        else:
            kept.append(text[pos:start])
            calls.append(ToolCall(parsed[0], parsed[1], text[start:block_end]))
            pos = block_end
        search = block_end
    kept.append(text[pos:])
    if not calls:
        return text.strip(), calls, errors
    content = "\n".join(part.strip() for part in kept if part.strip())
    return content, calls, errors


def parse_reply(text: str) -> ParsedReply:
    """Reasoning, content and tool calls of a generated reply (calls inside the reasoning do not count)."""
    reasoning, rest = split_reasoning(text)
    content, calls, errors = parse_tool_calls(rest)
    return ParsedReply(content=content, reasoning=reasoning, tool_calls=calls, errors=errors)


def format_tool_call(name: str, arguments: dict[str, Any] | str) -> str:
    """A call exactly as the chat template renders it (and as the SFT data therefore shows it).

    Object arguments are dumped with Python's default separators and non-ASCII kept (the
    template's ``tojson``); string arguments are inserted verbatim, as the template does.
    """
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return CALL_OPEN + '\n{"name": "' + name + '", "arguments": ' + args + "}\n" + CALL_CLOSE
