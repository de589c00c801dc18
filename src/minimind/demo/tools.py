"""Mock tools for the demo's tool-calling tasks: schemas, a deterministic environment, parsing.

Why: tool-use SFT data, tool-call evaluation and (later) tool-use RL all need the *same* tool
definitions and the *same* results, or the model would be trained on one world and scored in
another. The names and argument shapes follow the reference MiniMind agent tools
(``calculate_math(expression)``, ``unit_converter(value, from_unit, to_unit)``,
``get_current_weather(location)``) and its mock weather table, so rows are interchangeable with
reference agent-RL data. Unlike the reference, the calculator never calls ``eval``: it walks a
Python AST that admits only numbers and arithmetic operators.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from typing import Any

__all__ = [
    "TOOLS",
    "TOOL_NAMES",
    "WEATHER",
    "UNIT_FACTORS",
    "UNIT_PAIRS",
    "safe_calculate",
    "execute_tool",
    "parse_tool_calls",
    "format_number",
    "tool_result_value",
    "tool_schema",
]


def _fn(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


# Descriptions are kept short on purpose: the schemas are rendered into every tool prompt and
# the tiny demo model trains on short sequences.
TOOLS: list[dict[str, Any]] = [
    _fn("calculate_math", "Evaluate an arithmetic expression", {"expression": {"type": "string"}}, ["expression"]),
    _fn(
        "unit_converter",
        "Convert a value between units (km, miles, kg, pounds, meters, feet, celsius, fahrenheit)",
        {"value": {"type": "number"}, "from_unit": {"type": "string"}, "to_unit": {"type": "string"}},
        ["value", "from_unit", "to_unit"],
    ),
    _fn("get_current_weather", "Get the current weather of a city", {"location": {"type": "string"}}, ["location"]),
]
TOOL_NAMES: tuple[str, ...] = tuple(t["function"]["name"] for t in TOOLS)


def tool_schema(name: str) -> dict[str, Any]:
    """The OpenAI-style schema of one tool (KeyError for an unknown name)."""
    for t in TOOLS:
        if t["function"]["name"] == name:
            return t
    raise KeyError(name)


# Multiplicative factors as in the reference mock; temperatures are handled as affine maps
# (the reference multiplies Celsius by 1.8 and forgets the +32, which would teach wrong facts).
UNIT_FACTORS: dict[tuple[str, str], float] = {
    ("km", "miles"): 0.621371,
    ("miles", "km"): 1.60934,
    ("kg", "pounds"): 2.20462,
    ("pounds", "kg"): 0.453592,
    ("meters", "feet"): 3.28084,
    ("feet", "meters"): 0.3048,
}
_TEMPERATURE = {
    ("celsius", "fahrenheit"): lambda v: v * 9 / 5 + 32,
    ("fahrenheit", "celsius"): lambda v: (v - 32) * 5 / 9,
}
UNIT_PAIRS: tuple[tuple[str, str], ...] = tuple(UNIT_FACTORS) + tuple(_TEMPERATURE)

# The reference mock weather table (same cities, temperatures and conditions), with English
# names and conditions added so English prompts get English results.
# Columns: zh name, en name, temperature, zh condition, en condition.
WEATHER: tuple[tuple[str, str, str, str, str], ...] = (
    ("北京", "Beijing", "28°C", "晴", "sunny"),
    ("上海", "Shanghai", "15°C", "多云", "cloudy"),
    ("广州", "Guangzhou", "32°C", "闷热", "hot and humid"),
    ("深圳", "Shenzhen", "30°C", "晴", "sunny"),
    ("杭州", "Hangzhou", "22°C", "阴", "overcast"),
    ("成都", "Chengdu", "18°C", "小雨", "light rain"),
    ("武汉", "Wuhan", "25°C", "多云", "cloudy"),
    ("南京", "Nanjing", "20°C", "晴", "sunny"),
    ("西安", "Xi'an", "16°C", "大风", "windy"),
    ("重庆", "Chongqing", "26°C", "阴", "overcast"),
    ("东京", "Tokyo", "12°C", "晴", "sunny"),
    ("纽约", "New York", "8°C", "多云", "cloudy"),
    ("伦敦", "London", "5°C", "小雨", "light rain"),
    ("巴黎", "Paris", "10°C", "阴", "overcast"),
    ("悉尼", "Sydney", "25°C", "晴朗", "clear"),
)
_WEATHER_BY_NAME = {row[0]: (row, "zh") for row in WEATHER} | {row[1].casefold(): (row, "en") for row in WEATHER}


def format_number(value: float) -> str:
    """Render a number the way the tasks write answers: integers without ``.0``, else ≤4 decimals."""
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    rounded = round(float(value), 4)
    if rounded == int(rounded):
        return str(int(rounded))
    return f"{rounded:.4f}".rstrip("0").rstrip(".")


_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def safe_calculate(expression: str) -> float | int:
    """Evaluate ``+ - * / // % **`` and parentheses over numbers; anything else raises ValueError.

    Why not ``eval``: the expression comes from model output; a whitelist AST walk cannot run
    code, and exponents/sizes are bounded so a rollout cannot hang the trainer.
    """
    text = (
        expression.replace("×", "*").replace("÷", "/").replace("−", "-").replace("^", "**")
        .replace("（", "(").replace("）", ")")
    )  # fmt: skip
    if len(text) > 200:
        raise ValueError("expression too long")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from exc

    def ev(node: ast.AST) -> float | int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
                raise ValueError("exponent too large")
            return _BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        raise ValueError(f"unsupported syntax in {expression!r}")

    try:
        return ev(tree)
    except (ZeroDivisionError, OverflowError) as exc:
        raise ValueError(str(exc)) from exc


def execute_tool(name: str, arguments: dict[str, Any] | str) -> dict[str, Any] | None:
    """Run a mock tool; ``None`` for an unknown tool or invalid arguments (like the reference).

    Results are pure functions of the arguments, so rollouts and SFT data agree exactly.
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
            return {"result": format_number(safe_calculate(str(arguments["expression"])))}
        if name == "unit_converter":
            value = float(arguments["value"])
            pair = (str(arguments["from_unit"]).strip().lower(), str(arguments["to_unit"]).strip().lower())
            if pair in _TEMPERATURE:
                result = _TEMPERATURE[pair](value)
            else:
                result = value * UNIT_FACTORS.get(pair, 1.0)
            shown = format_number(result)  # rounded to 4 decimals, as in the reference
            return {
                "value": arguments["value"],
                "from_unit": pair[0],
                "to_unit": pair[1],
                "result": int(shown) if shown.lstrip("-").isdigit() else float(shown),
            }
        if name == "get_current_weather":
            city = str(arguments.get("location") or arguments.get("city") or "").strip()
            row, lang = _WEATHER_BY_NAME.get(city, _WEATHER_BY_NAME.get(city.casefold(), (None, "zh")))
            if row is None:
                # The reference answers 22°C/晴 for any unknown city; an explicit error instead
                # keeps a made-up location from ever looking like a correct call.
                return {"error": f"unknown city: {city}"}
            return {
                "city": city,
                "temperature": row[2],
                "humidity": "65%",
                "condition": row[3] if lang == "zh" else row[4],
            }
    except (KeyError, TypeError, ValueError):
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


_TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


def parse_tool_calls(text: str) -> list[dict[str, Any]]:
    """Every well-formed ``<tool_call>{json}</tool_call>`` in ``text`` as ``{"name", "arguments"}``.

    Accepts the flat shape and the OpenAI ``{"function": {...}}`` shape, and ``arguments`` given
    as a JSON string; malformed blocks are skipped (they simply do not count as calls).
    """
    calls = []
    for block in _TOOL_CALL_RE.findall(text):
        try:
            obj = json.loads(block.strip())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("function"), dict):
            obj = obj["function"]
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        args = obj.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                continue
        if not isinstance(args, dict):
            continue
        calls.append({"name": obj["name"], "arguments": args})
    return calls
