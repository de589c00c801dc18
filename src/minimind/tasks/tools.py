"""The built-in tools: one sandboxed implementation shared by the server, evaluation and RL.

Why one module: a model trained on tool results from one world and scored (or rewarded, or
served) in another learns the wrong thing. The OpenAI-compatible server's web UI, the evaluation
suite, agentic RL and the CPU demo therefore all run the tools defined here, and get the same
result for the same arguments.

Why so defensive: the arguments come from model output. Nothing here evaluates code (the
calculator walks a whitelisted Python AST), every input size and every intermediate number is
bounded, and :func:`call_tool` turns any bad call (unknown tool, non-object or ill-typed
arguments, a refused expression) into an ``{"error": ...}`` result the model can read, instead
of an exception that would stop a rollout or a server request.

The first three tools keep the names, schemas and mock results of the reference MiniMind agent
tools (``calculate_math``, ``unit_converter``, ``get_current_weather``), so demo SFT data and
reference agent-RL rows describe the same world. Their schemas are byte-identical to the ones
the demo renders into its prompts, which is why ``unit_converter``'s description lists only the
demo's units although the converter understands more.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from minimind.tasks.calculator import (
    MAX_EXPONENT,
    MAX_EXPRESSION_CHARS,
    MAX_MAGNITUDE,
    ToolError,
    calculate_math,
    format_number,
    safe_calculate,
)

__all__ = [
    "BUILTIN_TOOLS",
    "DIRECT_UNIT_FACTORS",
    "MAX_EXPONENT",
    "MAX_EXPRESSION_CHARS",
    "MAX_MAGNITUDE",
    "WEATHER",
    "Tool",
    "ToolError",
    "calculate_math",
    "call_tool",
    "date_add",
    "format_number",
    "get_current_time",
    "get_current_weather",
    "lookup",
    "safe_calculate",
    "tool_result_text",
    "tool_schemas",
    "unit_converter",
]


@dataclass(frozen=True)
class Tool:
    """A callable tool and the JSON schema of its arguments (what the model is shown)."""

    name: str
    description: str
    parameters: dict[str, Any]
    function: Callable[..., dict[str, Any]]

    def schema(self) -> dict[str, Any]:
        """The OpenAI function schema (a deep copy, so callers may edit it freely)."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": copy.deepcopy(self.parameters),
            },
        }


# --------------------------------------------------------------------------- units

# The demo's (and reference mock's) direct factors, kept verbatim so their results stay exactly
# the same (e.g. 500 m -> 1640.42 ft, where the exact 1/0.3048 would round to 1640.4199).
DIRECT_UNIT_FACTORS: dict[tuple[str, str], float] = {
    ("km", "miles"): 0.621371,
    ("miles", "km"): 1.60934,
    ("kg", "pounds"): 2.20462,
    ("pounds", "kg"): 0.453592,
    ("meters", "feet"): 3.28084,
    ("feet", "meters"): 0.3048,
}
# Every other pair goes through the SI base unit with exact definitions.
_LENGTH_IN_METERS = {"meters": 1.0, "km": 1000.0, "cm": 0.01, "mm": 0.001, "miles": 1609.344,
                     "feet": 0.3048, "inches": 0.0254, "yards": 0.9144}
_MASS_IN_KG = {"kg": 1.0, "g": 0.001, "mg": 1e-6, "pounds": 0.45359237, "ounces": 0.028349523125, "jin": 0.5}
_TO_CELSIUS: dict[str, Callable[[float], float]] = {
    "celsius": lambda v: v,
    "fahrenheit": lambda v: (v - 32) * 5 / 9,
    "kelvin": lambda v: v - 273.15,
}
_FROM_CELSIUS: dict[str, Callable[[float], float]] = {
    "celsius": lambda v: v,
    "fahrenheit": lambda v: v * 9 / 5 + 32,
    "kelvin": lambda v: v + 273.15,
}
_UNIT_ALIASES: dict[str, tuple[str, ...]] = {
    "meters": ("m", "meter", "metre", "metres", "米"),
    "km": ("kilometer", "kilometers", "kilometre", "kilometres", "千米", "公里"),
    "cm": ("centimeter", "centimeters", "centimetre", "centimetres", "厘米"),
    "mm": ("millimeter", "millimeters", "millimetre", "millimetres", "毫米"),
    "miles": ("mile", "mi", "英里"),
    "feet": ("foot", "ft", "英尺"),
    "inches": ("inch", "in", "英寸"),
    "yards": ("yard", "yd", "码"),
    "kg": ("kilogram", "kilograms", "kilo", "kilos", "千克", "公斤"),
    "g": ("gram", "grams", "gramme", "grammes", "克"),
    "mg": ("milligram", "milligrams", "毫克"),
    "pounds": ("pound", "lb", "lbs", "磅"),
    "ounces": ("ounce", "oz", "盎司"),
    "jin": ("斤",),
    "celsius": ("c", "°c", "℃", "degc", "degrees celsius", "degree celsius", "摄氏度"),
    "fahrenheit": ("f", "°f", "℉", "degf", "degrees fahrenheit", "degree fahrenheit", "华氏度"),
    "kelvin": ("k", "degrees kelvin", "开尔文", "开"),
}
_UNITS: dict[str, str] = {alias: unit for unit, aliases in _UNIT_ALIASES.items() for alias in (unit, *aliases)}


def _dimension(unit: str) -> str:
    if unit in _LENGTH_IN_METERS:
        return "length"
    if unit in _MASS_IN_KG:
        return "mass"
    return "temperature"


def _canonical_unit(unit: Any) -> str:
    if not isinstance(unit, str):
        raise ToolError("units must be strings")
    key = " ".join(unit.strip().casefold().split())
    if key not in _UNITS:
        raise ToolError(f"unknown unit {unit!r}; known units: {', '.join(_UNIT_ALIASES)}")
    return _UNITS[key]


def _number(value: Any, what: str) -> int | float:
    """A finite int/float (numeric strings accepted, booleans not)."""
    if isinstance(value, str):
        try:
            value = int(value) if re.fullmatch(r"\s*[+-]?\d{1,30}\s*", value) else float(value)
        except ValueError:
            raise ToolError(f"{what} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ToolError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        raise ToolError(f"{what} must be a finite number of magnitude at most {MAX_MAGNITUDE:.0e}")
    return value


def unit_converter(value: float, from_unit: str, to_unit: str) -> dict[str, Any]:
    """Convert length, mass or temperature; the result is rounded to 4 decimals like the demo's.

    Returns ``{"value", "from_unit", "to_unit", "result"}`` with ``value`` echoed as given and the
    units in canonical spelling (``"lb"`` -> ``"pounds"``).
    """
    number = _number(value, "value")
    src, dst = _canonical_unit(from_unit), _canonical_unit(to_unit)
    if _dimension(src) != _dimension(dst):
        raise ToolError(f"cannot convert {_dimension(src)} ({src}) to {_dimension(dst)} ({dst})")
    if (src, dst) in DIRECT_UNIT_FACTORS:
        result = number * DIRECT_UNIT_FACTORS[(src, dst)]
    elif src in _LENGTH_IN_METERS:
        result = number * _LENGTH_IN_METERS[src] / _LENGTH_IN_METERS[dst]
    elif src in _MASS_IN_KG:
        result = number * _MASS_IN_KG[src] / _MASS_IN_KG[dst]
    else:
        result = _FROM_CELSIUS[dst](_TO_CELSIUS[src](number))
    if not math.isfinite(result):
        raise ToolError("the result is too large")
    shown = format_number(result)
    return {
        "value": value,
        "from_unit": src,
        "to_unit": dst,
        "result": int(shown) if shown.lstrip("-").isdigit() else float(shown),
    }


# --------------------------------------------------------------------------- weather (mock)

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


def get_current_weather(location: str) -> dict[str, Any]:
    """The mock weather of a known city, in the language the city was named in.

    An unknown city is an error (the reference answers 22°C/晴 for any city): a made-up location
    must never look like a correct call.
    """
    city = str(location).strip()
    row, lang = _WEATHER_BY_NAME.get(city, _WEATHER_BY_NAME.get(city.casefold(), (None, "zh")))
    if row is None:
        raise ToolError(f"unknown city: {city}")
    return {"city": city, "temperature": row[2], "humidity": "65%", "condition": row[3] if lang == "zh" else row[4]}


# --------------------------------------------------------------------------- dates and times

_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_OFFSET_RE = re.compile(r"(?:utc|gmt)?\s*([+-])\s*(\d{1,2})(?::?(\d{2}))?", re.IGNORECASE)
_ZONE_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_+\-]*(?:/[A-Za-z0-9_+\-]+){0,2}")
# Cities a model is likely to name instead of a zone (the weather table's cities).
_CITY_ZONES: dict[str, str] = {
    **{name: "Asia/Shanghai" for row in WEATHER[:10] for name in (row[0], row[1].casefold())},
    "china": "Asia/Shanghai", "中国": "Asia/Shanghai",
    "东京": "Asia/Tokyo", "tokyo": "Asia/Tokyo", "纽约": "America/New_York", "new york": "America/New_York",
    "伦敦": "Europe/London", "london": "Europe/London", "巴黎": "Europe/Paris", "paris": "Europe/Paris",
    "悉尼": "Australia/Sydney", "sydney": "Australia/Sydney",
}  # fmt: skip


@lru_cache(maxsize=1)
def _zone_names() -> dict[str, str]:
    """Case-insensitive index of the installed IANA zones (``asia/shanghai`` -> ``Asia/Shanghai``)."""
    return {name.casefold(): name for name in available_timezones()}


def _resolve_zone(timezone: str) -> tuple[str, dt.tzinfo]:
    text = timezone.strip()
    if len(text) > 64:
        raise ToolError("time zone name too long")
    if text.casefold() in ("", "utc", "gmt", "z"):
        return "UTC", dt.timezone.utc
    m = _OFFSET_RE.fullmatch(text)
    if m:
        hours, minutes = int(m.group(2)), int(m.group(3) or 0)
        if hours > 14 or minutes >= 60 or hours * 60 + minutes > 14 * 60:
            raise ToolError(f"UTC offset out of range: {timezone!r}")
        sign = 1 if m.group(1) == "+" else -1
        label = f"UTC{m.group(1)}{hours:02d}:{minutes:02d}"
        return label, dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes), label)
    name = _CITY_ZONES.get(text.casefold(), _CITY_ZONES.get(text, text))
    if _ZONE_NAME_RE.fullmatch(name):
        name = _zone_names().get(name.casefold(), name)
        try:
            return name, ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            pass
    raise ToolError(f"unknown time zone {timezone!r}; use an IANA name like 'Asia/Shanghai' or 'UTC+8'")


def _utc_offset(moment: dt.datetime) -> str:
    offset = moment.utcoffset() or dt.timedelta(0)
    sign = "-" if offset < dt.timedelta(0) else "+"
    minutes = abs(int(offset.total_seconds())) // 60
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def get_current_time(timezone: str = "UTC", *, now: dt.datetime | None = None) -> dict[str, Any]:
    """The current date, time and weekday in an IANA zone or a fixed offset such as ``UTC+8``.

    ``now`` (an aware datetime) pins the clock for tests; the model cannot pass it because it is
    not in the tool's schema.
    """
    if not isinstance(timezone, str):
        raise ToolError("timezone must be a string")
    label, zone = _resolve_zone(timezone)
    moment = (now or dt.datetime.now(dt.timezone.utc)).astimezone(zone)
    return {
        "timezone": label,
        "date": moment.date().isoformat(),
        "time": moment.strftime("%H:%M:%S"),
        "weekday": _WEEKDAYS[moment.weekday()],
        "utc_offset": _utc_offset(moment),
    }


_ISO_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
MAX_DAYS = 3_660_000  # about 10,000 years: the whole range of dates Python represents


def date_add(date: str, days: int) -> dict[str, Any]:
    """``date`` (``YYYY-MM-DD``) plus ``days`` (may be negative): the resulting date and weekday."""
    if not isinstance(date, str) or not _ISO_DATE_RE.fullmatch(date.strip()):
        raise ToolError(f"date must look like YYYY-MM-DD, got {date!r}")
    if isinstance(days, bool) or not isinstance(days, int):
        raise ToolError(f"days must be an integer, got {days!r}")
    try:
        start = dt.date.fromisoformat(date.strip())
    except ValueError as exc:
        raise ToolError(f"not a valid date: {date!r}") from exc
    if abs(days) > MAX_DAYS:
        raise ToolError("the result is outside the years 1 to 9999")
    try:
        result = start + dt.timedelta(days=days)
    except OverflowError as exc:
        raise ToolError("the result is outside the years 1 to 9999") from exc
    return {"date": start.isoformat(), "days": days, "result": result.isoformat(),
            "weekday": _WEEKDAYS[result.weekday()]}


# --------------------------------------------------------------------------- local lookup

# (English keys, English answer, Chinese keys, Chinese answer). Keys are normalised by _fact_key,
# so "What is the capital of China?" and "中国的首都是哪里？" both find the first entry.
_FACTS: tuple[tuple[tuple[str, ...], str, tuple[str, ...], str], ...] = (
    (("capital of China",), "Beijing", ("中国首都",), "北京"),
    (("capital of France",), "Paris", ("法国首都",), "巴黎"),
    (("capital of Japan",), "Tokyo", ("日本首都",), "东京"),
    (("capital of the United Kingdom", "capital of the UK", "capital of England"), "London",
     ("英国首都",), "伦敦"),
    (("capital of the United States", "capital of the USA", "capital of the US", "capital of America"),
     "Washington, D.C.", ("美国首都",), "华盛顿"),
    (("capital of Australia",), "Canberra", ("澳大利亚首都", "澳洲首都"), "堪培拉"),
    (("boiling point of water",), "100°C (212°F) at sea-level pressure", ("水沸点",), "标准大气压下为100°C"),
    (("freezing point of water", "melting point of ice"), "0°C (32°F) at sea-level pressure",
     ("水冰点", "水凝固点", "冰熔点"), "标准大气压下为0°C"),
    (("speed of light",), "299,792,458 m/s in vacuum", ("光速",), "真空中每秒299,792,458米"),
    (("highest mountain", "highest mountain in the world", "tallest mountain"), "Mount Everest, 8,849 m",
     ("世界最高峰", "最高山峰"), "珠穆朗玛峰，海拔8,849米"),
    (("longest river in China",), "the Yangtze River, about 6,300 km", ("中国最长河流", "中国最长河"),
     "长江，全长约6,300千米"),
    (("largest ocean",), "the Pacific Ocean", ("最大海洋", "世界最大海洋"), "太平洋"),
    (("days in a leap year",), "366", ("闰年天数", "闰年有多少天"), "366天"),
    (("chemical formula of water",), "H2O", ("水化学式",), "H2O"),
    (("number of continents",), "7", ("大洲数量", "世界上有几个大洲"), "7个"),
)
_FACT_PREFIXES = ("what is", "what's", "whats", "tell me", "the", "a", "an")
_FACT_STRIP_RE = re.compile(r"[\s?？!！.。,，:：'\"“”‘’的]")
_ZH_SUFFIXES = ("是什么", "是多少", "是哪里", "在哪里", "是谁", "是")


def _fact_key(term: str) -> str:
    """Normalise a lookup term: case, spacing, punctuation, question words and 的 do not matter."""
    words = term.casefold().split()
    changed = True
    while changed and words:
        changed = False
        for prefix in _FACT_PREFIXES:
            n = len(prefix.split())
            if words[:n] == prefix.split() and len(words) > n:
                words, changed = words[n:], True
    key = _FACT_STRIP_RE.sub("", " ".join(words))
    key = key.removeprefix("请问")
    for suffix in _ZH_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            key = key[: -len(suffix)]
            break
    return key


_FACT_INDEX: dict[str, str] = {
    _fact_key(k): answer
    for en_keys, en_answer, zh_keys, zh_answer in _FACTS
    for keys, answer in ((en_keys, en_answer), (zh_keys, zh_answer))
    for k in keys
}


def lookup(term: str) -> dict[str, Any]:
    """A fact from a small built-in table (capitals, physical constants, ...), in the term's language.

    Deterministic and offline on purpose: an evaluation or RL reward must not depend on a
    network service, and the table is small enough to know exactly what is answerable.
    """
    if not isinstance(term, str) or not term.strip():
        raise ToolError("term must be a non-empty string")
    if len(term) > 100:
        raise ToolError("term too long (at most 100 characters)")
    answer = _FACT_INDEX.get(_fact_key(term))
    if answer is None:
        raise ToolError(f"no entry for {term.strip()!r}")
    return {"term": term.strip(), "result": answer}


# --------------------------------------------------------------------------- registry


def _params(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required}


BUILTIN_TOOLS: dict[str, Tool] = {
    t.name: t
    for t in (
        # The first three schemas are the demo's, byte for byte (its prompts and trained models
        # depend on them): descriptions stay short and parameters carry no descriptions.
        Tool("calculate_math", "Evaluate an arithmetic expression",
             _params({"expression": {"type": "string"}}, ["expression"]), calculate_math),
        Tool("unit_converter",
             "Convert a value between units (km, miles, kg, pounds, meters, feet, celsius, fahrenheit)",
             _params({"value": {"type": "number"}, "from_unit": {"type": "string"}, "to_unit": {"type": "string"}},
                     ["value", "from_unit", "to_unit"]),
             unit_converter),
        Tool("get_current_weather", "Get the current weather of a city",
             _params({"location": {"type": "string"}}, ["location"]), get_current_weather),
        Tool("get_current_time", "Get the current date, time and weekday in a time zone",
             _params({"timezone": {"type": "string", "description": "IANA name or offset, e.g. Asia/Shanghai, UTC+8"}},
                     []),
             get_current_time),
        Tool("date_add", "Add a number of days to a date and get the weekday",
             _params({"date": {"type": "string", "description": "YYYY-MM-DD"}, "days": {"type": "integer"}},
                     ["date", "days"]),
             date_add),
        Tool("lookup", "Look up a fact (capitals, science facts) in a small local reference",
             _params({"term": {"type": "string"}}, ["term"]), lookup),
    )
}  # fmt: skip


def tool_schemas(names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """OpenAI function schemas of the named built-in tools (all of them for ``None``), in order."""
    if names is None:
        chosen = list(BUILTIN_TOOLS)
    else:
        chosen = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in chosen if n not in BUILTIN_TOOLS]
        if unknown:
            raise ValueError(f"unknown tools {unknown}; known: {list(BUILTIN_TOOLS)}")
    return [BUILTIN_TOOLS[n].schema() for n in chosen]


def _coerce(value: Any, schema: Mapping[str, Any], arg: str) -> Any:
    """Check one argument against its JSON-schema type; numeric strings pass for numbers."""
    kind = schema.get("type")
    if kind == "string":
        if not isinstance(value, str):
            raise ToolError(f"argument {arg!r} must be a string, got {json.dumps(value, ensure_ascii=False)}")
        return value
    if kind == "number":
        return _number(value, f"argument {arg!r}")
    if kind == "integer":
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,18}\s*", value):
            return int(value)
        if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_MAGNITUDE:
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ToolError(f"argument {arg!r} must be an integer, got {json.dumps(value, ensure_ascii=False)}")
        return value
    if kind == "boolean" and not isinstance(value, bool):
        raise ToolError(f"argument {arg!r} must be true or false")
    return value


def call_tool(name: Any, arguments: Mapping[str, Any] | str | None, *,
              registry: Mapping[str, Tool] | None = None) -> dict[str, Any]:
    """Run a tool call coming from a model; any problem becomes an ``{"error": ...}`` result.

    ``arguments`` may be a mapping or its JSON text (an empty string means no arguments).
    Unknown tools, non-object arguments, missing, unexpected or ill-typed arguments and refused
    values are reported, never raised, so one bad call cannot end a rollout or a request.
    ``registry`` restricts the call to the tools actually offered (default: all built-ins).
    """
    tools = BUILTIN_TOOLS if registry is None else registry
    if not isinstance(name, str) or name not in tools:
        return {"error": f"unknown tool {name!r}; available: {', '.join(tools)}"}
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        if not arguments.strip():
            arguments = {}
        else:
            try:
                arguments = json.loads(arguments)
            except (ValueError, RecursionError):
                return {"error": "arguments are not valid JSON"}
    if not isinstance(arguments, Mapping):
        return {"error": "arguments must be a JSON object"}
    tool = tools[name]
    properties: Mapping[str, Any] = tool.parameters.get("properties", {})
    unexpected = [k for k in arguments if k not in properties]
    if unexpected:
        return {"error": f"unexpected argument(s) for {name}: {', '.join(map(str, unexpected))}"}
    missing = [k for k in tool.parameters.get("required", []) if k not in arguments]
    if missing:
        return {"error": f"missing argument(s) for {name}: {', '.join(missing)}"}
    try:
        kwargs = {k: _coerce(v, properties[k], k) for k, v in arguments.items()}
        return tool.function(**kwargs)
    except ToolError as exc:
        return {"error": str(exc)}
    except (ArithmeticError, ValueError, TypeError, RecursionError, MemoryError) as exc:
        return {"error": f"{name} failed: {type(exc).__name__}"}


def tool_result_text(result: Mapping[str, Any]) -> str:
    """A tool result as the ``tool`` message content: one line of JSON, non-ASCII kept.

    Python's default separators are kept on purpose: they are what the demo's SFT data (and the
    reference agent data) put in tool messages, so trained models see the same text here.
    """
    return json.dumps(dict(result), ensure_ascii=False)
