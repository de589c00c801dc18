"""The tool set of the generated tool tasks: three tools, their schemas and lenient call semantics.

Why a thin layer over :mod:`minimind.tasks.tools`: tool-use SFT data, tool-call evaluation and
tool-use RL must run the *same* tools, so the calculator, the unit converter, the weather table
and the call parser live once, in :mod:`minimind.tasks.tools` and :mod:`minimind.tasks.toolcalls`.
What stays here is what the generated tasks (and the demo's data and trained figures) are pinned
to: the three offered tools (``calculate_math``, ``unit_converter``, ``get_current_weather``, as
in the reference MiniMind agent tools) with schemas that render byte-identically into their
prompts, the unit pairs the generator draws from, and :func:`execute_tool`'s contract of ``None``
for an unusable call (the reference's), which the checkers and rewards rely on.

Its ``parse_tool_calls`` returns plain ``{"name", "arguments"}`` dicts (the rows' ``tool_calls``
shape), unlike :func:`minimind.tasks.toolcalls.parse_tool_calls`; that is why the package root
does not re-export it.
"""

from __future__ import annotations

import json
from typing import Any

from minimind.tasks.toolcalls import parse_tool_calls as _parse_calls
from minimind.tasks.tools import (
    DIRECT_UNIT_FACTORS,
    WEATHER,
    ToolError,
    calculate_math,
    format_number,
    get_current_weather,
    safe_calculate,
    tool_schemas,
    unit_converter,
)

__all__ = [
    "TOOLS",
    "TOOL_NAMES",
    "UNIT_FACTORS",
    "UNIT_PAIRS",
    "WEATHER",
    "execute_tool",
    "format_number",
    "parse_tool_calls",
    "safe_calculate",
    "tool_result_value",
    "tool_schema",
]

TOOL_NAMES: tuple[str, ...] = ("calculate_math", "unit_converter", "get_current_weather")
# Rendered into every demo tool prompt; the shared registry keeps these three schemas unchanged
# (short descriptions, because the tiny demo model trains on short sequences).
TOOLS: list[dict[str, Any]] = tool_schemas(TOOL_NAMES)

# The unit pairs the demo's tasks are drawn from, in the order its seeded generator expects:
# the reference mock's multiplicative pairs, then the two temperature directions (converted as
# affine maps; the reference multiplies Celsius by 1.8 and forgets the +32).
UNIT_FACTORS: dict[tuple[str, str], float] = dict(DIRECT_UNIT_FACTORS)
UNIT_PAIRS: tuple[tuple[str, str], ...] = tuple(UNIT_FACTORS) + (("celsius", "fahrenheit"), ("fahrenheit", "celsius"))


def tool_schema(name: str) -> dict[str, Any]:
    """The OpenAI-style schema of one tool (KeyError for an unknown name)."""
    for t in TOOLS:
        if t["function"]["name"] == name:
            return t
    raise KeyError(name)


def execute_tool(name: str, arguments: dict[str, Any] | str) -> dict[str, Any] | None:
    """Run one of the demo's tools; ``None`` for an unknown tool or unusable arguments.

    Results come from :mod:`minimind.tasks.tools`, so rollouts, SFT data and the server agree.
    Argument checking is the demo's own, more lenient than
    :func:`minimind.tasks.tools.call_tool` (its graders were calibrated on it): extra arguments
    are ignored, ``expression`` is stringified and ``city`` is accepted for ``location``. An
    unknown city is a result (``{"error": ...}``), not ``None``.
    """
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    try:
        if name == "calculate_math":
            return calculate_math(str(arguments["expression"]))
        if name == "unit_converter":
            return unit_converter(arguments["value"], str(arguments["from_unit"]), str(arguments["to_unit"]))
        if name == "get_current_weather":
            city = str(arguments.get("location") or arguments.get("city") or "")
            try:
                return get_current_weather(city)
            except ToolError as exc:
                return {"error": str(exc)}
    except (KeyError, TypeError, ValueError):  # ToolError is a ValueError
        return None
    return None


def tool_result_value(name: str, result: dict[str, Any] | None) -> str | None:
    """The one value a task's ``gt`` holds for a call of ``name``: what the answer must report.

    calculate_math -> the result, unit_converter -> the converted number, weather -> the
    temperature. ``None`` for failed calls.
    """
    if not result or "error" in result:
        return None
    if name == "calculate_math":
        return str(result["result"])
    if name == "unit_converter":
        return format_number(result["result"])
    if name == "get_current_weather":
        return str(result["temperature"])
    return None


def parse_tool_calls(text: str) -> list[dict[str, Any]]:
    """Every well-formed ``<tool_call>{json}</tool_call>`` in ``text`` as ``{"name", "arguments"}``.

    The shared parser (:func:`minimind.tasks.toolcalls.parse_tool_calls`) decides what a call is
    (flat or OpenAI ``{"function": {...}}`` shape, ``arguments`` possibly a JSON string);
    malformed blocks simply do not count as calls here.
    """
    return [{"name": call.name, "arguments": call.arguments} for call in _parse_calls(text)[1]]
