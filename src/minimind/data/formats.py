"""Validation and normalisation of the reference MiniMind JSONL record formats.

The reference loaders accept whatever the JSON holds and fail (or silently train on garbage) deep
inside a DataLoader worker.  Here every record is checked up front and converted to one canonical
shape, so the chat template sees exactly what the reference would have rendered:

* ``tools`` (on the system message) and ``tool_calls`` (on assistant messages) may be JSON strings
  -- the reference ``Features`` schema forces strings -- or already-parsed objects; both become
  Python lists, so string and object records render to identical token ids.
* Keys the template does not use are dropped; ``None`` values (what HF ``datasets`` fills in for
  missing fields) are treated as absent.

Functions raise a plain :class:`ValueError` with a short reason; the reader that knows the file and
line wraps it into :class:`~minimind.data.jsonl.DataFormatError`.
"""

from __future__ import annotations

import json
from typing import Any

ROLES = ("system", "user", "assistant", "tool")

Message = dict[str, Any]


def pretrain_text(obj: dict) -> str:
    """Return the document of a pretraining record ``{"text": str}`` (non-empty)."""
    if "text" not in obj:
        raise ValueError("missing field 'text'")
    text = obj["text"]
    if not isinstance(text, str):
        raise ValueError(f"'text' must be a string, got {type(text).__name__}")
    if not text:
        raise ValueError("'text' is empty")
    return text


def _maybe_json(value: Any, what: str, where: str) -> Any:
    """Parse ``value`` if it is a JSON string (reference files store tools/tool_calls as strings)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: '{what}' is not valid JSON "
                             f"({e.msg}, column {e.colno})") from None
    return value


def _check_tool_calls(calls: Any, where: str) -> list[dict]:
    """Check a tool-call list: ``[{name, arguments}]`` or ``[{function: {name, arguments}}]``."""
    if not isinstance(calls, list):
        raise ValueError(f"{where}: 'tool_calls' must be a list, got {type(calls).__name__}")
    for j, call in enumerate(calls):
        if not isinstance(call, dict):
            raise ValueError(f"{where}: tool_calls[{j}] must be an object")
        fn = call.get("function") or call
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{where}: tool_calls[{j}] has no function name")
        args = fn.get("arguments", {})
        if not isinstance(args, (str, dict)):
            raise ValueError(f"{where}: tool_calls[{j}].arguments must be an object or a JSON string")
    return calls


def _check_tools(tools: Any, where: str) -> list[dict]:
    """``[{"type": "function", "function": {"name": ..., ...}}]`` or bare ``[{"name": ..., ...}]``.

    A tool without a name renders as a broken schema in the system prompt (the template prints
    whatever it finds), so it is refused here instead of being trained on."""
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError(f"{where}: 'tools' must be a list of objects")
    for j, tool in enumerate(tools):
        fn = tool.get("function", tool)
        if not isinstance(fn, dict):
            raise ValueError(f"{where}: tools[{j}].function must be an object, got {type(fn).__name__}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{where}: tools[{j}] has no function name")
    return tools


#: Which role may follow which (``None`` = the first message after an optional leading system one).
#: A tool result must answer an assistant tool call; an answer must follow a question or a tool
#: result.  The template renders any order, so an out-of-order record would be trained silently.
_NEXT_ROLES: dict[str | None, tuple[str, ...]] = {
    None: ("user",),
    "user": ("assistant",),
    "assistant": ("user", "tool"),
    "tool": ("tool", "assistant"),
}


def _check_role_order(messages: list[Message], field_name: str) -> None:
    """System only first; then user, assistant, user ... with tool results after tool calls."""
    prev: str | None = None
    for i, m in enumerate(messages):
        role, where = m["role"], f"{field_name}[{i}]"
        if role == "system":
            if i:
                raise ValueError(f"{where}: a system message must be the first message")
            continue
        if role not in _NEXT_ROLES[prev]:
            after = "at the start" if prev is None else f"after a {prev} message"
            raise ValueError(f"{where}: role {role!r} out of order {after} (expected "
                             f"{' or '.join(_NEXT_ROLES[prev])})")
        if role == "tool" and prev == "assistant" and "tool_calls" not in messages[i - 1]:
            raise ValueError(f"{where}: a tool result must follow an assistant message with tool_calls")
        prev = role


def chat_messages(conv: Any, field_name: str = "conversations",
                  require_assistant: bool = True) -> tuple[list[Message], list[dict] | None]:
    """Validate a list of chat messages and return ``(messages, tools)``.

    Rules (reference semantics, made explicit): roles are system/user/assistant/tool; ``content`` is
    a string, except that an assistant turn carrying ``tool_calls`` may have ``None``/missing content
    (rendered as ``""``); ``reasoning_content`` is an optional string; ``tools`` may only sit on a
    leading system message (that is the only place the reference reads it from); roles come in
    order (:data:`_NEXT_ROLES`: an optional system message first, then user and assistant turns,
    tool results only after a tool call).
    """
    if not isinstance(conv, list):
        raise ValueError(f"'{field_name}' must be a list, got {type(conv).__name__}")
    if not conv:
        raise ValueError(f"'{field_name}' is empty")
    messages: list[Message] = []
    tools: list[dict] | None = None
    for i, m in enumerate(conv):
        where = f"{field_name}[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where} must be an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        out: Message = {"role": role}

        raw_tools = m.get("tools")
        if raw_tools not in (None, "", []):
            if not (i == 0 and role == "system"):
                raise ValueError(f"{where}: 'tools' is only allowed on the first (system) message")
            tools = _check_tools(_maybe_json(raw_tools, "tools", where), where) or None

        calls = m.get("tool_calls")
        if calls not in (None, "", []):
            if role != "assistant":
                raise ValueError(f"{where}: 'tool_calls' is only allowed on assistant messages")
            calls = _check_tool_calls(_maybe_json(calls, "tool_calls", where), where)
            if calls:
                out["tool_calls"] = calls

        content = m.get("content")
        if content is None and "tool_calls" in out:
            content = ""
        if not isinstance(content, str):
            got = "missing" if content is None else type(content).__name__
            raise ValueError(f"{where}: 'content' must be a string ({role}, got {got})")
        out["content"] = content

        reasoning = m.get("reasoning_content")
        if reasoning is not None:
            if role != "assistant" or not isinstance(reasoning, str):
                raise ValueError(f"{where}: 'reasoning_content' must be a string "
                                 "on an assistant message")
            out["reasoning_content"] = reasoning
        messages.append(out)
    _check_role_order(messages, field_name)
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"'{field_name}' has no assistant turn")
    return messages, tools


def sft_conversation(obj: dict) -> tuple[list[Message], list[dict] | None]:
    """Validate an SFT record ``{"conversations": [...]}``; return ``(messages, tools)``."""
    if "conversations" not in obj:
        raise ValueError("missing field 'conversations'")
    return chat_messages(obj["conversations"])


#: The message fields that make up a rendered turn; two prompts are equal when these are.
_TURN_FIELDS = ("role", "content", "reasoning_content", "tool_calls")


def _first_difference(a: list[Message], b: list[Message]) -> int | None:
    """Index of the first message where ``a`` and ``b`` differ (a length mismatch counts), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if any(x.get(k) != y.get(k) for k in _TURN_FIELDS):
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def dpo_pair(obj: dict) -> tuple[list[Message], list[Message]]:
    """Validate a DPO record ``{"chosen": [...], "rejected": [...]}``; return both message lists.

    Each side must be a valid conversation ending in an assistant turn (the turn being compared);
    tools are not part of the reference DPO format and are rejected.  Both sides must share the
    prompt -- every message before the final assistant turn equal in role, content, reasoning and
    tool calls: DPO compares two answers *to the same prompt*, and a pair whose prompts differ
    would silently train on the difference between the prompts' log-probabilities as well.  The
    two final answers must differ (an identical pair has margin 0 and teaches nothing).
    """
    sides = []
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise ValueError(f"missing field '{key}'")
        messages, tools = chat_messages(obj[key], field_name=key)
        if tools:
            raise ValueError(f"'{key}': tools are not supported in DPO pairs")
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"'{key}' must end with an assistant turn")
        sides.append(messages)
    chosen, rejected = sides
    i = _first_difference(chosen[:-1], rejected[:-1])
    if i is not None:
        raise ValueError(f"'chosen' and 'rejected' must share the prompt: they differ at message {i}")
    if _first_difference(chosen[-1:], rejected[-1:]) is None:
        # identical answers: the DPO margin is 0 by construction, the pair only adds a constant loss
        raise ValueError("'chosen' and 'rejected' give the same answer: the pair prefers nothing")
    return chosen, rejected
