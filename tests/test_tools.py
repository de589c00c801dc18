"""The shared tools and tool-call parser: results, refusals, argument checks, the call format."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
import time

import pytest

from minimind.tasks import (
    BUILTIN_TOOLS,
    ParsedReply,
    ToolCall,
    ToolError,
    call_tool,
    date_add,
    format_tool_call,
    get_current_time,
    lookup,
    parse_reply,
    parse_tool_calls,
    safe_calculate,
    split_reasoning,
    tool_result_text,
    tool_schemas,
    unit_converter,
)

# --------------------------------------------------------------------------- calculator

CALC_CASES = [
    ("1+2*3", 7),
    ("(1+2)*3", 9),
    ("2*3**2", 18),
    ("-2**2", -4),  # power binds tighter than unary minus
    ("(-2)**2", 4),
    ("2**3**2", 512),  # right-associative
    ("-3+-4", -7),
    ("+5--5", 10),
    ("10-4-3", 3),  # left-associative
    ("7/2", 3.5),
    ("6/3", 2.0),
    ("7//2", 3),
    ("-7//2", -4),  # floor, not truncation
    ("7%3", 1),
    ("-7%3", 2),
    ("7.5%2", 1.5),
    ("2^10", 1024),  # ^ is read as power
    ("12×(3+4)", 84),
    ("84÷4", 21.0),
    ("（1+2）*3", 9),
    ("1.5*4", 6.0),
    ("2**-2", 0.25),
    ("(988+38)*51", 52326),
    ("sqrt(16)+abs(-3)", 7.0),
    ("round(2.567, 2)", 2.57),
    ("round(2.5)+round(3.5)", 6),  # banker's rounding, as Python
    ("2*pi", 2 * math.pi),
    ("e**1", math.e),
    ("10**100", 10**100),  # the magnitude limit itself is allowed
    ("+".join(map(str, range(1, 41))), 820),  # a long left-to-right chain is not "deep nesting"
]


@pytest.mark.parametrize(("expr", "want"), CALC_CASES)
def test_calculator_values(expr: str, want: float) -> None:
    got = safe_calculate(expr)
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert type(got) is type(want)


REFUSED = [
    ("9**9**9", "exponent too large"),
    ("2**100000", "exponent too large"),
    ("10**400", "exponent too large"),
    ("10**99*10**99", "magnitude"),
    ("(10**50)**3", "magnitude"),  # refused before computing the power
    ("1" * 102, "magnitude"),  # a literal beyond the cap
    ("1e99*1e99", "magnitude"),
    ("1e999", "too large"),  # a float literal that is already infinite
    ("().__class__", "unsupported syntax"),
    ("().__class__.__bases__[0]", "unsupported syntax"),
    ("__import__('os')", "only the functions"),
    ("open('/etc/passwd')", "only the functions"),
    ("sqrt(x=4)", "only the functions"),
    ("a+1", "unknown name"),
    ("[1][0]", "unsupported syntax"),
    ("[1]*3", "unsupported syntax"),
    ("'a'*3", "only numbers"),
    ("True+1", "only numbers"),
    ("1j*1j", "only numbers"),
    ("lambda: 1", "unsupported syntax"),
    ("[x for x in (1, 2)]", "unsupported syntax"),
    ("1 if 1 else 2", "unsupported syntax"),
    ("1 < 2", "unsupported syntax"),
    ("x := 1", "not an arithmetic expression"),
    ("import os", "not an arithmetic expression"),
    ("1+" * 100 + "1", "too long"),
    ("1" + "+1" * 79, "too complex"),  # 159 numbers and operators in 159 characters
    ("-" * 120 + "1", "nested too deeply"),
    ("1/0", "division by zero"),
    ("5//0", "division by zero"),
    ("5%0", "division by zero"),
    ("0**-1", "division by zero"),
    ("(-8)**0.5", "not a real number"),
    ("sqrt(-1)", "negative"),
    ("round(1.5, 99)", "round's digits"),
    ("abs(1, 2)", "argument"),
    ("", "empty"),
]


@pytest.mark.parametrize(("expr", "message"), REFUSED)
def test_calculator_refusals(expr: str, message: str) -> None:
    start = time.monotonic()
    with pytest.raises(ToolError, match=message):
        safe_calculate(expr)
    assert time.monotonic() - start < 1.0  # refused quickly, never by hanging
    result = call_tool("calculate_math", {"expression": expr})
    assert set(result) == {"error"} and message.split()[0].lower() in result["error"].lower()


def test_tool_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        safe_calculate("1/0")


def test_calculate_math_renders_like_the_tasks() -> None:
    assert call_tool("calculate_math", {"expression": "12*(3+4)"}) == {"result": "84"}
    assert call_tool("calculate_math", {"expression": "10/4"}) == {"result": "2.5"}
    assert call_tool("calculate_math", {"expression": "1/3"}) == {"result": "0.3333"}
    assert call_tool("calculate_math", {"expression": "6/3"}) == {"result": "2"}


# --------------------------------------------------------------------------- call_tool validation


def test_call_tool_argument_validation() -> None:
    assert call_tool("lookup", {"term": "capital of France"}) == {"term": "capital of France", "result": "Paris"}
    assert "unknown tool" in call_tool("no_such_tool", {})["error"]
    assert "unknown tool" in call_tool(None, {})["error"]  # type: ignore[arg-type]
    assert "missing" in call_tool("date_add", {"date": "2024-01-01"})["error"]
    err = call_tool("calculate_math", {"expression": "1+1", "mode": "fast"})["error"]
    assert "unexpected" in err and "mode" in err
    assert "must be a string" in call_tool("calculate_math", {"expression": 12})["error"]
    assert "must be an integer" in call_tool("date_add", {"date": "2024-01-01", "days": 1.5})["error"]
    assert "must be an integer" in call_tool("date_add", {"date": "2024-01-01", "days": True})["error"]
    assert "must be a number" in call_tool("unit_converter", {"value": "ten", "from_unit": "km",
                                                               "to_unit": "miles"})["error"]
    assert "must be a number" in call_tool("unit_converter", {"value": None, "from_unit": "km",
                                                               "to_unit": "miles"})["error"]
    assert "JSON object" in call_tool("lookup", "[1, 2]")["error"]
    assert "JSON object" in call_tool("lookup", 5)["error"]  # type: ignore[arg-type]
    assert "not valid JSON" in call_tool("lookup", '{"term": ')["error"]
    assert "not valid JSON" in call_tool("lookup", "[" * 100_000)["error"]  # no RecursionError escapes


def test_call_tool_coerces_json_strings_and_numeric_strings() -> None:
    by_dict = call_tool("unit_converter", {"value": 10, "from_unit": "km", "to_unit": "miles"})
    by_text = call_tool("unit_converter", '{"value": "10", "from_unit": "km", "to_unit": "miles"}')
    assert by_dict == by_text == {"value": 10, "from_unit": "km", "to_unit": "miles", "result": 6.2137}
    assert call_tool("date_add", {"date": "2024-01-31", "days": "1"})["result"] == "2024-02-01"
    assert call_tool("date_add", {"date": "2024-01-31", "days": 2.0})["result"] == "2024-02-02"
    assert call_tool("get_current_time", "")["timezone"] == "UTC"  # empty argument text = no arguments


def test_call_tool_respects_a_restricted_registry() -> None:
    offered = {"calculate_math": BUILTIN_TOOLS["calculate_math"]}
    assert call_tool("calculate_math", {"expression": "1+1"}, registry=offered) == {"result": "2"}
    assert "unknown tool" in call_tool("lookup", {"term": "speed of light"}, registry=offered)["error"]


def test_hidden_parameters_are_not_reachable_by_the_model() -> None:
    # get_current_time's test-only ``now`` is not in the schema, so a model cannot pass it.
    assert "unexpected" in call_tool("get_current_time", {"timezone": "UTC", "now": "2020-01-01"})["error"]


# --------------------------------------------------------------------------- units

UNIT_CASES = [
    (100, "celsius", "fahrenheit", 212),
    (212, "fahrenheit", "celsius", 100),
    (-40, "celsius", "fahrenheit", -40),
    (37, "°C", "°F", 98.6),
    (0, "celsius", "kelvin", 273.15),
    (10, "km", "miles", 6.2137),  # the demo's factors, verbatim
    (10, "miles", "km", 16.0934),
    (500, "meters", "feet", 1640.42),
    (100, "feet", "meters", 30.48),
    (3, "kg", "pounds", 6.6139),
    (10, "pounds", "kg", 4.5359),
    (12, "inches", "cm", 30.48),
    (30.48, "cm", "in", 12),
    (1, "m", "cm", 100),
    (250, "g", "kg", 0.25),
    (1, "lb", "g", 453.5924),
    (2, "公里", "米", 2000),
    (1, "Miles", "Yards", 1760),
]


@pytest.mark.parametrize(("value", "src", "dst", "want"), UNIT_CASES)
def test_unit_conversions(value: float, src: str, dst: str, want: float) -> None:
    result = call_tool("unit_converter", {"value": value, "from_unit": src, "to_unit": dst})
    assert result["result"] == pytest.approx(want, abs=1e-9)
    assert result["value"] == value


def test_unit_converter_canonical_names_and_errors() -> None:
    assert unit_converter(1, "LBS", " kilograms ")["from_unit"] == "pounds"
    assert unit_converter(1, "LBS", " kilograms ")["to_unit"] == "kg"
    assert isinstance(unit_converter(100, "celsius", "fahrenheit")["result"], int)
    with pytest.raises(ToolError, match="cannot convert mass"):
        unit_converter(1, "kg", "km")
    with pytest.raises(ToolError, match="cannot convert temperature"):
        unit_converter(1, "celsius", "feet")
    with pytest.raises(ToolError, match="unknown unit 'parsec'"):
        unit_converter(1, "parsec", "km")
    with pytest.raises(ToolError, match="must be a finite number"):
        unit_converter(float("nan"), "km", "miles")
    assert "unknown unit" in call_tool("unit_converter", {"value": 1, "from_unit": "furlong", "to_unit": "m"})["error"]


# --------------------------------------------------------------------------- dates and times


@pytest.mark.parametrize(("date", "days", "want", "weekday"), [
    ("2024-01-31", 1, "2024-02-01", "Thursday"),
    ("2023-12-31", 1, "2024-01-01", "Monday"),
    ("2024-02-28", 1, "2024-02-29", "Thursday"),  # leap year
    ("2023-02-28", 1, "2023-03-01", "Wednesday"),  # not a leap year
    ("2024-02-29", 365, "2025-02-28", "Friday"),
    ("2024-03-01", -1, "2024-02-29", "Thursday"),
    ("2000-02-28", 1, "2000-02-29", "Tuesday"),  # divisible by 400: leap
    ("1900-02-28", 1, "1900-03-01", "Thursday"),  # divisible by 100 only: not leap
    ("2024-06-15", 0, "2024-06-15", "Saturday"),
])  # fmt: skip
def test_date_add(date: str, days: int, want: str, weekday: str) -> None:
    assert date_add(date, days) == {"date": date, "days": days, "result": want, "weekday": weekday}


def test_date_add_errors() -> None:
    for bad in ("2023-02-29", "2024-13-01", "24-1-1", "2024/01/01", "tomorrow"):
        assert "error" in call_tool("date_add", {"date": bad, "days": 1}), bad
    assert "outside" in call_tool("date_add", {"date": "9999-12-31", "days": 1})["error"]
    assert "outside" in call_tool("date_add", {"date": "2024-01-01", "days": 10**12})["error"]


def test_get_current_time_with_a_pinned_clock() -> None:
    now = dt.datetime(2024, 1, 1, 0, 30, tzinfo=dt.timezone.utc)
    assert get_current_time("UTC", now=now) == {
        "timezone": "UTC", "date": "2024-01-01", "time": "00:30:00", "weekday": "Monday", "utc_offset": "+00:00"}
    ny = get_current_time("America/New_York", now=now)  # EST, UTC-5: still New Year's Eve
    assert (ny["date"], ny["time"], ny["weekday"], ny["utc_offset"]) == ("2023-12-31", "19:30:00", "Sunday", "-05:00")
    cn = get_current_time("UTC+8", now=now)
    assert (cn["timezone"], cn["date"], cn["time"], cn["utc_offset"]) == ("UTC+08:00", "2024-01-01", "08:30:00", "+08:00")
    assert get_current_time("asia/shanghai", now=now)["timezone"] == "Asia/Shanghai"
    assert get_current_time("北京", now=now)["time"] == "08:30:00"
    assert get_current_time("UTC-05:30", now=now)["time"] == "19:00:00"


def test_get_current_time_reads_the_clock_consistently() -> None:
    before = dt.datetime.now(dt.timezone.utc)
    result = call_tool("get_current_time", {"timezone": "Asia/Tokyo"})
    after = dt.datetime.now(dt.timezone.utc)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", result["date"]) and re.fullmatch(r"\d{2}:\d{2}:\d{2}", result["time"])
    local = dt.datetime.fromisoformat(f"{result['date']}T{result['time']}{result['utc_offset']}")
    assert result["utc_offset"] == "+09:00"
    assert before.replace(microsecond=0) <= local <= after
    weekdays = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
    assert result["weekday"] == weekdays[local.weekday()]


@pytest.mark.parametrize("zone", ["Mars/Olympus", "../../etc/passwd", "/etc/localtime", "UTC+15", "x" * 80, "America"])
def test_get_current_time_rejects_bad_zones(zone: str) -> None:
    result = call_tool("get_current_time", {"timezone": zone})
    assert set(result) == {"error"}


# --------------------------------------------------------------------------- lookup and weather


def test_lookup_known_and_unknown() -> None:
    assert lookup("capital of China")["result"] == "Beijing"
    assert lookup("What is the capital of France?")["result"] == "Paris"
    assert lookup("中国的首都是哪里？")["result"] == "北京"
    assert "100°C" in lookup("boiling point of water")["result"]
    assert "100°C" in lookup("水的沸点是多少")["result"]
    assert call_tool("lookup", {"term": "meaning of life"}) == {"error": "no entry for 'meaning of life'"}
    assert "error" in call_tool("lookup", {"term": "   "})
    assert "error" in call_tool("lookup", {"term": "capital of " * 20})


def test_weather_keeps_the_mock_table() -> None:
    assert call_tool("get_current_weather", {"location": "Beijing"}) == {
        "city": "Beijing", "temperature": "28°C", "humidity": "65%", "condition": "sunny"}
    assert call_tool("get_current_weather", {"location": "上海"})["condition"] == "多云"
    assert call_tool("get_current_weather", {"location": "Atlantis"}) == {"error": "unknown city: Atlantis"}


# --------------------------------------------------------------------------- schemas and results

# The demo renders these three schemas into its prompts; its trained figures depend on the exact text.
DEMO_SCHEMAS_SHA256 = "84f713c39cb9787faad9906a91e4047370e3eaa8544a0563748bfcf90c60c81e"


def test_demo_schemas_are_byte_identical() -> None:
    from minimind.tasks.toolset import TOOLS

    names = ["calculate_math", "unit_converter", "get_current_weather"]
    text = json.dumps(tool_schemas(names), ensure_ascii=False)
    assert hashlib.sha256(text.encode()).hexdigest() == DEMO_SCHEMAS_SHA256
    assert json.dumps(TOOLS, ensure_ascii=False) == text


def test_tool_schemas() -> None:
    schemas = tool_schemas()
    assert [s["function"]["name"] for s in schemas] == list(BUILTIN_TOOLS)
    assert {"calculate_math", "unit_converter", "get_current_time", "date_add", "lookup",
            "get_current_weather"} <= set(BUILTIN_TOOLS)
    for s in schemas:
        assert s["type"] == "function" and set(s["function"]) == {"name", "description", "parameters"}
        params = s["function"]["parameters"]
        assert params["type"] == "object" and set(params["required"]) <= set(params["properties"])
    assert tool_schemas("lookup") == tool_schemas(["lookup"])
    with pytest.raises(ValueError, match="unknown tools"):
        tool_schemas(["lookup", "rm_rf"])
    tool_schemas(["lookup"])[0]["function"]["parameters"]["properties"].clear()  # a copy: registry unharmed
    assert tool_schemas(["lookup"])[0]["function"]["parameters"]["properties"]


def test_tool_result_text() -> None:
    assert tool_result_text({"result": "84"}) == '{"result": "84"}'
    assert tool_result_text({"city": "北京", "temperature": "28°C"}) == '{"city": "北京", "temperature": "28°C"}'
    assert "\n" not in tool_result_text(call_tool("get_current_time", {}))


# --------------------------------------------------------------------------- parsing


def test_parse_single_call() -> None:
    block = '<tool_call>\n{"name": "calculate_math", "arguments": {"expression": "1+1"}}\n</tool_call>'
    content, calls, errors = parse_tool_calls("Let me compute.\n" + block)
    assert content == "Let me compute." and errors == []
    assert calls == [ToolCall("calculate_math", {"expression": "1+1"}, block)]


def test_parse_multiple_calls_in_order() -> None:
    a = format_tool_call("get_current_weather", {"location": "北京"})
    b = format_tool_call("unit_converter", {"value": 1, "from_unit": "km", "to_unit": "miles"})
    content, calls, errors = parse_tool_calls(a + "\n" + b)
    assert content == "" and errors == []
    assert [c.name for c in calls] == ["get_current_weather", "unit_converter"]
    assert calls[0].arguments == {"location": "北京"} and calls[1].raw == b


def test_parse_arguments_as_json_string_and_openai_shape() -> None:
    text = '<tool_call>{"name": "lookup", "arguments": "{\\"term\\": \\"光速\\"}"}</tool_call>'
    assert parse_tool_calls(text)[1][0].arguments == {"term": "光速"}
    wrapped = '<tool_call>{"type": "function", "function": {"name": "lookup", "arguments": {"term": "x"}}}</tool_call>'
    assert parse_tool_calls(wrapped)[1][0].name == "lookup"
    assert parse_tool_calls('<tool_call>{"name": "get_current_time"}</tool_call>')[1][0].arguments == {}


@pytest.mark.parametrize(("text", "reason"), [
    ("<tool_call>not json</tool_call>", "not valid JSON"),
    ('<tool_call>{"name": "lookup", "arguments": {"term": "x"}</tool_call>', "not valid JSON"),
    ('<tool_call>{"arguments": {"term": "x"}}</tool_call>', "name"),
    ('<tool_call>{"name": 3, "arguments": {}}</tool_call>', "name"),
    ('<tool_call>["lookup"]</tool_call>', "not a JSON object"),
    ('<tool_call>{"name": "lookup", "arguments": "term=x"}</tool_call>', "string but not valid JSON"),
    ('<tool_call>{"name": "lookup", "arguments": [1]}</tool_call>', "not a JSON object"),
    ('<tool_call>\n{"name": "lookup", "arguments": {"term": "x"}}', "not closed"),
])  # fmt: skip
def test_parse_malformed_blocks_stay_as_content(text: str, reason: str) -> None:
    content, calls, errors = parse_tool_calls(text)
    assert calls == [] and content == text.strip()
    assert len(errors) == 1 and reason in errors[0]


def test_parse_keeps_good_calls_next_to_bad_ones() -> None:
    good = format_tool_call("lookup", {"term": "光速"})
    text = "<tool_call>{oops</tool_call>\n" + good + "\n<tool_call>{\"name\": \"lookup\""
    content, calls, errors = parse_tool_calls(text)
    assert [c.arguments for c in calls] == [{"term": "光速"}]
    assert content == '<tool_call>{oops</tool_call>\n<tool_call>{"name": "lookup"'
    assert len(errors) == 2 and "not valid JSON" in errors[0] and "not closed" in errors[1]
    # an opening tag inside another block: the outer one is unclosed, the inner one still counts
    content, calls, errors = parse_tool_calls('<tool_call>{"name": ' + good)
    assert [c.name for c in calls] == ["lookup"] and content == '<tool_call>{"name":' and "not closed" in errors[0]


def test_no_calls_leaves_text_alone() -> None:
    assert parse_tool_calls("  The answer is 4.  ") == ("The answer is 4.", [], [])


@pytest.mark.parametrize(("text", "reasoning", "content"), [
    ("<think>\nadd them\n</think>\n\nThe answer is 4.", "add them", "The answer is 4."),
    ("<think>\n\n</think>\n\nHi", "", "Hi"),
    ("add them\n</think>\n\nThe answer is 4.", "add them", "The answer is 4."),  # prompt opened the block
    ("<think>\nstill thinking about", "still thinking about", ""),  # unclosed: all reasoning
    ("The answer is 4.", None, "The answer is 4."),
    ("Use <think> tags to think.", None, "Use <think> tags to think."),  # not at the start: no block
])  # fmt: skip
def test_split_reasoning(text: str, reasoning: str | None, content: str) -> None:
    assert split_reasoning(text) == (reasoning, content)


def test_parse_reply_combines_reasoning_and_calls() -> None:
    call = format_tool_call("date_add", {"date": "2024-02-28", "days": 1})
    reply = parse_reply("<think>\nneed the next day\n</think>\n\n" + call)
    want = ToolCall("date_add", {"date": "2024-02-28", "days": 1}, call)
    assert reply == ParsedReply(content="", reasoning="need the next day", tool_calls=[want], errors=[])
    # a call inside unfinished reasoning is not a call
    unfinished = parse_reply("<think>\nmaybe " + call)
    assert unfinished.tool_calls == [] and unfinished.content == "" and call in (unfinished.reasoning or "")


def test_format_tool_call_matches_the_chat_template() -> None:
    chat = pytest.importorskip("minimind.tokenizer.chat_template")
    calls = [{"name": "get_current_weather", "arguments": {"location": "北京"}},
             {"name": "calculate_math", "arguments": '{"expression": "2*3"}'}]
    text = chat.render_chat([{"role": "user", "content": "q"},
                             {"role": "assistant", "content": "", "tool_calls": calls}])
    turn = text.split("<|im_start|>assistant\n", 1)[1].split("<|im_end|>", 1)[0]
    want = "\n".join(format_tool_call(c["name"], c["arguments"]) for c in calls)
    assert turn == "<think>\n\n</think>\n\n" + want
    assert format_tool_call("lookup", {"term": "光速"}) == (
        '<tool_call>\n{"name": "lookup", "arguments": {"term": "光速"}}\n</tool_call>')
    reply = parse_reply(turn)
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [
        ("get_current_weather", {"location": "北京"}), ("calculate_math", {"expression": "2*3"})]
