"""Grading of generated answers and tool calls from ``(kind, gt, text)`` alone; the same checks as rewards.

Why a separate module: RL reward functions and evaluation loaders need the checks without the
generators (or their data sources), and the checks must stay stable as long as rows written to
JSONL by earlier runs are still being scored.

Checkers return ``bool``: :func:`check_answer` (is the reply correct for its kind and ``gt``),
:func:`check_tool_call` (are the calls exactly the expected ones) and :func:`check_format` (is
the reply shaped like an answer of its kind, right or wrong).

Reward contract
---------------
Every reward here is a plain function ``reward(prompt: str, completion: str, **fields) -> float``:

* ``prompt`` is the rendered prompt the completion continues (unused by these rule-based rewards,
  but part of the signature so that a model-graded reward can share it);
* ``completion`` is the generated assistant text, possibly with a ``<think>`` block and
  ``<tool_call>`` blocks;
* ``fields`` are the task row's own columns, passed by keyword: ``kind`` and ``gt`` (every row),
  ``expected_calls`` (or the ``tool_calls`` column of a :meth:`~minimind.tasks.generators.Task.to_dict`
  row) for :func:`tool_call_reward`. Columns a reward does not need are ignored, so a whole row can be
  splatted in: ``task_reward(prompt, completion, **row)``;
* the value is ``1.0`` for a correct completion and ``0.0`` otherwise (never negative, never
  in between), so an RL stage combines rewards as a weighted sum
  ``sum(w[name] * REWARDS[name](prompt, completion, **row) for name in w)`` and chooses the scale
  and any penalty through the weights alone.

:data:`REWARDS` names the generic rewards (``"task"``, ``"tool_call"``, ``"format"``);
:func:`reward_fn` gives the correctness reward bound to one task kind.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from typing import Any

from minimind.tasks.toolset import TOOLS, execute_tool, parse_tool_calls, tool_result_value

__all__ = [
    "CHECKERS",
    "REWARDS",
    "RewardFn",
    "check_answer",
    "check_format",
    "check_tool_call",
    "extract_numbers",
    "format_reward",
    "reward_fn",
    "task_reward",
    "tool_call_reward",
]

# Spelled out rather than taken from ``calendar.month_name``, which follows the process locale.
_EN_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
_EN_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_ZH_WEEKDAYS = ("星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日")

_NUM_RE = re.compile(r"-?\d+(?:\.\d+)?")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def extract_numbers(text: str) -> list[float]:
    """All numbers in ``text`` in order (thousands separators removed)."""
    return [float(x) for x in _NUM_RE.findall(_THOUSANDS_RE.sub("", text))]


def _final_text(text: str) -> str:
    """Drop a reasoning block and any tool-call blocks: grade only what follows them."""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    if "</tool_call>" in text:
        text = text.rsplit("</tool_call>", 1)[1]
    return text.strip()


def _num_equal(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def _check_last_number(gt: list[Any], text: str) -> bool:
    nums = extract_numbers(text)
    return bool(nums) and _num_equal(nums[-1], float(gt[0]))


_ZH_DATE_RE = re.compile(r"(\d{4})\s*年\s*(\d{1,2})\s*月\s*(\d{1,2})\s*[日号]")
_EN_DATE_RE = re.compile(r"\b(" + "|".join(_EN_MONTHS) + r")\s+(\d{1,2}),?\s+(\d{4})\b", re.IGNORECASE)
_ISO_DATE_RE = re.compile(r"\b(\d{4})-(\d{1,2})-(\d{1,2})\b")
_ZH_WD_RE = re.compile(r"(?:星期|礼拜|周)([一二三四五六日天])")
_EN_WD_RE = re.compile(r"\b(" + "|".join(_EN_WEEKDAYS) + r")\b", re.IGNORECASE)
_ZH_WD_INDEX = {c: i for i, c in enumerate("一二三四五六日")} | {"天": 6}


def _last_date(text: str) -> dt.date | None:
    found: list[tuple[int, dt.date]] = []
    months = {m.lower(): i + 1 for i, m in enumerate(_EN_MONTHS)}
    for rx, order in ((_ZH_DATE_RE, "ymd"), (_ISO_DATE_RE, "ymd"), (_EN_DATE_RE, "mdy")):
        for m in rx.finditer(text):
            try:
                if order == "ymd":
                    d = dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
                else:
                    d = dt.date(int(m.group(3)), months[m.group(1).lower()], int(m.group(2)))
            except ValueError:
                continue
            found.append((m.start(), d))
    return max(found)[1] if found else None


def _last_weekday(text: str) -> int | None:
    found = [(m.start(), _ZH_WD_INDEX[m.group(1)]) for m in _ZH_WD_RE.finditer(text)]
    found += [
        (m.start(), [w.lower() for w in _EN_WEEKDAYS].index(m.group(1).lower())) for m in _EN_WD_RE.finditer(text)
    ]
    return max(found)[1] if found else None


def _check_date_fact(gt: list[Any], text: str) -> bool:
    want = str(gt[0])
    if _ISO_DATE_RE.fullmatch(want):
        return _last_date(text) == dt.date.fromisoformat(want)
    if want in _ZH_WEEKDAYS or want in _EN_WEEKDAYS:
        idx = _ZH_WEEKDAYS.index(want) if want in _ZH_WEEKDAYS else _EN_WEEKDAYS.index(want)
        return _last_weekday(text) == idx
    return _check_last_number(gt, text)


def _norm_zh(text: str) -> str:
    return re.sub(r"[\W_]+", "", text).casefold()


def _check_idiom(gt: list[Any], text: str) -> bool:
    norm = _norm_zh(text)
    return any(_norm_zh(str(k)) and _norm_zh(str(k)) in norm for k in gt)


def _check_gloss(gt: list[Any], text: str) -> bool:
    low = text.casefold()
    return any(re.search(r"(?<![a-z])" + re.escape(str(g).casefold()) + r"(?![a-z])", low) for g in gt)


_NUM_WITH_UNIT_RE = re.compile(r"(-?\d+(?:\.\d+)?)\s*(°C|°F|%)?")


def _check_tool_task(gt: list[Any], text: str) -> bool:
    """Grade either turn of a tool task.

    A reply that ends in tool call(s) (the first assistant turn, what single-turn evaluation
    sees) is verified by *executing* the calls in the mock environment: it is correct when
    there is one call per gt value and the calls' results are exactly the gt values. Otherwise
    the reply is the final answer after the tool result and is graded by
    :func:`_check_tool_final`.
    """
    calls = parse_tool_calls(text)
    if calls and not text.rsplit("</tool_call>", 1)[1].strip():
        if len(calls) != len(gt):
            return False
        got = [tool_result_value(c["name"], execute_tool(c["name"], c["arguments"])) for c in calls]
        return all(v is not None for v in got) and sorted(map(str, gt)) == sorted(map(str, got))
    return _check_tool_final(gt, text.rsplit("</tool_call>", 1)[-1])


def _check_tool_final(gt: list[Any], text: str) -> bool:
    """Grade the final answer of a tool task; every gt value must be verified.

    Stricter than the reference agent reward (substring or *any* equal number), which accepts
    ``28°C`` for ``8°C`` and an echoed operand for a calculator result: a bare number must be the
    answer's last number, a number with a unit (``"8°C"``) must appear with that unit, and any
    other value must occur as a case-insensitive substring.
    """
    low = text.casefold()
    for g in gt:
        m = _NUM_WITH_UNIT_RE.fullmatch(str(g).strip())
        if m and m.group(2):
            found = re.findall(r"(-?\d+(?:\.\d+)?)\s*" + re.escape(m.group(2)), text)
            if not any(_num_equal(float(x), float(m.group(1))) for x in found):
                return False
        elif m:
            if not _check_last_number([m.group(1)], text):
                return False
        elif str(g).casefold() not in low:
            return False
    return bool(gt)


CHECKERS: dict[str, Callable[[list[Any], str], bool]] = {
    "arithmetic": _check_last_number,
    "unit_conversion": _check_last_number,
    "date_fact": _check_date_fact,
    "idiom_meaning": _check_idiom,
    "dictionary": _check_gloss,
    "tool_call": _check_tool_task,
}


def check_answer(kind: Any, gt: list[Any] | None, text: str) -> bool:
    """Is ``text`` (a generated assistant reply) correct for a task of ``kind`` with ``gt``?

    ``kind`` may also be a task object with ``kind``/``gt`` attributes (then ``gt`` may be
    ``None``). Reasoning blocks and tool-call blocks are ignored, except for ``tool_call``: there
    a reply ending in tool calls is graded by executing them (see :func:`_check_tool_task`), any
    other reply as the final answer. :func:`check_tool_call` instead compares a call with the
    expected call exactly.
    """
    if not isinstance(kind, str):  # a Task (duck-typed to keep this module generator-free)
        kind, gt = kind.kind, kind.gt if gt is None else gt
    if kind not in CHECKERS:
        raise ValueError(f"unknown task kind {kind!r}")
    if not gt:
        return False
    text = text or ""
    if kind == "tool_call":  # needs the tool-call blocks; only drop a reasoning block
        return CHECKERS[kind](list(gt), text.rsplit("</think>", 1)[-1].strip())
    return CHECKERS[kind](list(gt), _final_text(text))


def _value_equal(got: Any, want: Any) -> bool:
    if isinstance(want, dict):
        return isinstance(got, dict) and set(got) == set(want) and all(_value_equal(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(_value_equal, got, want))
    try:  # numbers compare numerically, also when one side is a numeric string
        if not isinstance(got, bool) and not isinstance(want, bool):
            return _num_equal(float(got), float(want))
    except (TypeError, ValueError):
        pass
    if isinstance(got, str) and isinstance(want, str):
        norm = lambda s: re.sub(r"\s+", "", s.replace("×", "*").replace("÷", "/")).casefold()
        return norm(got) == norm(want)
    return got == want


def check_tool_call(expected: list[dict[str, Any]] | dict[str, Any], text: str) -> bool:
    """Does ``text`` contain exactly the expected ``<tool_call>`` blocks (any order)?

    Names must match exactly; arguments must have the same keys, with numbers compared
    numerically and strings compared ignoring case and whitespace.
    """
    want = [expected] if isinstance(expected, dict) else list(expected)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    got = parse_tool_calls(text)
    if not want or len(got) != len(want):
        return False
    remaining = list(got)
    for w in want:
        for g in remaining:
            if g["name"] == w["name"] and _value_equal(g["arguments"], w.get("arguments", {})):
                remaining.remove(g)
                break
        else:
            return False
    return True


# --------------------------------------------------------------------------- answer format
# Whether a reply has the *shape* of an answer to its kind, right or wrong.  SFT teaches the
# format first and the content later; reporting both shows what a short run has learned.
_FORMATS: dict[str, re.Pattern[str]] = {
    "arithmetic": re.compile(r"^\s*-?\d+\s*[+\-×*]\s*-?\d+\s*=\s*-?\d+\s*$"),
    "unit_conversion": re.compile(r"^\s*-?\d+\s*\S+\s*=\s*-?\d+\s*\S+\s*$"),
    "date_fact": re.compile(
        r"^\s*(?:\d{4}年\d{1,2}月\d{1,2}日(?:的后一天是\d{4}年\d{1,2}月\d{1,2}日|是星期[一二三四五六日])。"
        r"|\d{4}年\d{1,2}月有\d{1,2}天。"
        r"|The day after \w+ \d{1,2}, \d{4} is \w+ \d{1,2}, \d{4}\."
        r"|\w+ \d{1,2}, \d{4} is a \w+day\.|\w+ \d{4} has \d{1,2} days\.)\s*$"),
    "idiom_meaning": re.compile(r"^\s*「[^」]+」\s*[（(][^）)]+[）)]\s*[：:]\s*\S"),
    "dictionary": re.compile(r"^\s*\S+\s*\([^)]+\)\s*:\s*\S"),
}


def check_format(kind: str, text: str) -> bool:
    """True when ``text`` is shaped like an answer of ``kind`` (a parsable tool call with a known
    tool and all required arguments for ``tool_call``)."""
    body = _final_text(text)
    if kind == "tool_call":
        required = {t["function"]["name"]: set(t["function"]["parameters"].get("required", []))
                    for t in TOOLS}
        calls = parse_tool_calls(text)
        return bool(calls) and all(
            c.get("name") in required and isinstance(c.get("arguments"), dict)
            and required[c["name"]] <= set(c["arguments"]) for c in calls)
    pattern = _FORMATS.get(kind)
    return bool(pattern and pattern.match(body))


# --------------------------------------------------------------------------- rewards
# The checkers above as RL rewards (contract in the module docstring). Thin on purpose: a reward
# must grade exactly like evaluation does, or RL would optimise something the eval never measures.

#: ``(prompt, completion, **fields) -> float``, 1.0 correct and 0.0 wrong.
RewardFn = Callable[..., float]


def task_reward(prompt: str, completion: str, *, kind: str, gt: list[Any] | None, **fields: Any) -> float:
    """1.0 when ``completion`` answers a task of ``kind`` correctly (:func:`check_answer`), else 0.0.

    For ``tool_call`` tasks both turns earn it: a turn that ends in tool calls whose executed
    results are the ``gt`` values, and a final answer that reports them.  When ``prompt`` ends with
    an open think block (thinking on), the completion must close it: an answer left inside the
    reasoning is not shown as the reply by a chat client or server, so it earns nothing.
    """
    if prompt.rstrip("\n").endswith("<think>") and "</think>" not in completion:
        return 0.0
    return 1.0 if check_answer(kind, gt, completion) else 0.0


def tool_call_reward(
    prompt: str,
    completion: str,
    *,
    expected_calls: list[dict[str, Any]] | dict[str, Any] | None = None,
    **fields: Any,
) -> float:
    """1.0 when ``completion`` makes exactly the expected tool calls (:func:`check_tool_call`), else 0.0.

    ``expected_calls`` defaults to the row's ``tool_calls`` column, so a
    :meth:`~minimind.tasks.generators.Task.to_dict` row can be splatted in. Malformed call blocks
    do not count as calls, and a task that expects none (``[]``) scores 0.0 whatever is written:
    this reward only pays for calling tools right. A row with neither field is a caller's error.
    """
    if expected_calls is None:
        expected_calls = fields.get("tool_calls")
    if expected_calls is None:
        raise ValueError("tool_call_reward needs expected_calls (or the row's tool_calls column)")
    return 1.0 if check_tool_call(expected_calls, completion) else 0.0


def format_reward(prompt: str, completion: str, *, kind: str, **fields: Any) -> float:
    """1.0 when ``completion`` has the shape of an answer of ``kind`` (:func:`check_format`), else 0.0.

    Right or wrong does not matter here, which makes it a dense early signal to weight low next to
    :func:`task_reward`.
    """
    return 1.0 if check_format(kind, completion) else 0.0


REWARDS: dict[str, RewardFn] = {
    "task": task_reward,
    "tool_call": tool_call_reward,
    "format": format_reward,
}


def reward_fn(kind: str) -> RewardFn:
    """The correctness reward of one task kind: ``reward(prompt, completion, *, gt, **fields) -> float``.

    The kind is bound, so rows of that kind need only ``gt``; a row whose own ``kind`` disagrees
    raises rather than being graded by the wrong checker.
    """
    if kind not in CHECKERS:
        raise ValueError(f"unknown task kind {kind!r}; known: {list(CHECKERS)}")

    def reward(prompt: str, completion: str, *, gt: list[Any] | None, **fields: Any) -> float:
        row_kind = fields.pop("kind", kind)
        if row_kind != kind:
            raise ValueError(f"a {row_kind!r} row given to the {kind!r} reward")
        return task_reward(prompt, completion, kind=kind, gt=gt, **fields)

    reward.__name__ = reward.__qualname__ = f"{kind}_reward"
    return reward
