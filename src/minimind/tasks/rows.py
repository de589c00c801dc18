"""Generated tasks as training rows: reference SFT rows (with or without a short reasoning in
``<think>``), agent-RL rows and pretraining fact text.

Why apart from :mod:`minimind.tasks.generators`: the generators decide *what* an item is and how it
is graded; this module decides how an item is *written* for each stage, including the step-by-step
reasoning that thinking rows carry (:func:`task_reasoning`).
"""

from __future__ import annotations

import calendar
import copy
import datetime as dt
import json
import re
from typing import Any

from minimind.tasks.checks import _EN_MONTHS
from minimind.tasks.generators import Task, _en_date, _zh_date

__all__ = [
    "REASONING_KINDS",
    "no_steps_reasoning",
    "task_fact_text",
    "task_reasoning",
    "task_to_rl_row",
    "task_to_sft_row",
]


# --------------------------------------------------------------------------- row formats


def _as_json_strings(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Reference ``SFTDataset`` declares tools/tool_calls as *string* features."""
    out = []
    for m in msgs:
        m = dict(m)
        for k in ("tools", "tool_calls"):
            if k in m and not isinstance(m[k], str):
                m[k] = json.dumps(m[k], ensure_ascii=False)
        out.append(m)
    return out


def task_to_sft_row(task: Task, json_strings: bool = False, thinking: bool = False) -> dict[str, Any]:
    """Reference SFT row ``{"conversations": [...]}``; ``json_strings`` for the reference loader.

    ``thinking=True`` gives every assistant turn a ``reasoning_content`` (:func:`_turn_reasoning`: the
    kind's steps from :func:`task_reasoning`, else one line), which the chat template renders inside
    ``<think>…</think>``; without it the template renders the empty think block
    ``<think>\\n\\n</think>\\n\\n`` that the non-thinking generation prompt ends with.
    """
    msgs = copy.deepcopy(task.messages)
    if thinking:
        for m in msgs:
            if m["role"] == "assistant":
                m["reasoning_content"] = _turn_reasoning(task, m)
    return {"conversations": _as_json_strings(msgs) if json_strings else msgs}


_BRIEF = {  # (tool-call turn, answer after a tool result, answer without steps)
    "zh": ("调用工具 {name}。", "工具已返回结果。", "无需推理，直接回答。"),
    "en": ("Call the tool {name}.", "The tool returned the result.", "No steps needed; answer directly."),
}


def no_steps_reasoning(lang: str) -> str:
    """The one-line reasoning of a thinking reply that needs no steps (see :func:`_turn_reasoning`)."""
    return _BRIEF.get(lang, _BRIEF["en"])[2]


def _turn_reasoning(task: Task, message: dict[str, Any]) -> str:
    """What one assistant turn of a thinking row reasons: the kind's steps (:func:`task_reasoning`), or
    one line saying what the turn does.

    Why not an empty block for the kinds without steps: the open-thinking generation prompt ends with
    the tokens ``<think>`` ``\\n``, while an empty block tokenizes as ``<think>`` ``\\n\\n`` ``</think>``
    (``\\n\\n`` is one token), so no training text continues an open prompt into an empty block; a
    model that only saw reasoning after ``<think>`` ``\\n`` starts counting for any question.  One line
    such as "No steps needed" gives every kind a short, closed block after that prompt.
    """
    brief = _BRIEF.get(task.lang, _BRIEF["en"])
    if message.get("tool_calls"):
        return brief[0].format(name=", ".join(c["name"] for c in message["tool_calls"]))
    if any(m["role"] == "tool" for m in task.messages):
        return brief[1]
    return task_reasoning(task) or brief[2]


# --------------------------------------------------------------------------- short reasoning

#: Kinds whose answers get a step-by-step reasoning from :func:`task_reasoning` (others: ``None``).
REASONING_KINDS: tuple[str, ...] = ("arithmetic", "date_fact")
_ARITH_KEY_RE = re.compile(r"arithmetic:(\d+)([+\-])(\d+)$")
_NEXT_KEY_RE = re.compile(r"date:next:(\d{4}-\d{2}-\d{2})$")


def task_reasoning(task: Task) -> str | None:
    """Short step-by-step reasoning that leads to the task's answer, or ``None`` when the kind has none.

    Why these steps: a tiny model cannot look up a sum it never saw, but it can apply two local rules
    it sees in every example.  Addition and subtraction therefore move one unit at a time, each step
    an equality that stays true, until the second operand is 0 (the larger addend goes first, so the
    chain is at most 9 steps)::

        7 + 5 = 8 + 4 = 9 + 3 = 10 + 2 = 11 + 1 = 12 + 0 = 12
        9 - 4 = 8 - 3 = 7 - 2 = 6 - 1 = 5 - 0 = 5

    A next-day question states the month's length and whether the day is its last, i.e. whether the
    date carries over into the next month (or year), names the month (or year) it carries into, and
    ends with the resulting date.  Naming it puts the new month right before the date that copies it:
    with "carries into the next month" alone, a 2.7M demo model wrote the *same* month after it in
    17 of its 27 wrong held-out dates.
    Multiplication and the other date questions have no reasoning here.
    """
    if task.kind == "arithmetic":
        m = _ARITH_KEY_RE.match(task.key)
        return _counting_chain(int(m.group(1)), m.group(2), int(m.group(3))) if m else None
    if task.kind == "date_fact":
        m = _NEXT_KEY_RE.match(task.key)
        return _next_day_reasoning(dt.date.fromisoformat(m.group(1)), task.lang) if m else None
    return None


def _counting_chain(a: int, op: str, b: int) -> str:
    """``a op b`` rewritten one unit at a time until the second operand is 0 (see :func:`task_reasoning`)."""
    if op == "+" and b > a:
        parts = [f"{a} + {b}"]
        a, b = b, a
    else:
        parts = []
    step = 1 if op == "+" else -1
    while True:
        parts.append(f"{a} {op} {b}")
        if b == 0:
            break
        a, b = a + step, b - 1
    parts.append(str(a))
    return " = ".join(parts)


def _next_day_reasoning(d: dt.date, lang: str) -> str:
    """Month length, whether ``d`` is the month's last day (the carry), and the next day."""
    last = calendar.monthrange(d.year, d.month)[1]
    nxt = d + dt.timedelta(days=1)
    if lang == "zh":
        head = f"{d.year}年{d.month}月有{last}天，"
        if d.day == last:
            carry = f"进到下一年（{nxt.year}年1月）" if d.month == 12 else f"进到下个月（{nxt.month}月）"
            return f"{head}{d.day}日是月末，{carry}，所以是{_zh_date(nxt)}。"
        return f"{head}{d.day}日不是月末，日加一，所以是{_zh_date(nxt)}。"
    head = f"{_EN_MONTHS[d.month - 1]} {d.year} has {last} days; "
    if d.day == last:
        carry = f"the next year, {nxt.year}" if d.month == 12 else f"the next month, {_EN_MONTHS[nxt.month - 1]}"
        return f"{head}{d.day} is the last day, so it carries into {carry}: {_en_date(nxt)}."
    return f"{head}{d.day} is not the last day, so add one: {_en_date(nxt)}."


def task_to_rl_row(task: Task, json_strings: bool = False, reference: bool = False) -> dict[str, Any]:
    """Agent-RL/RLAIF row: prompt + empty assistant placeholder, ``gt`` list and ``kind``.

    ``reference=True`` adds the right reply, ``{"content", "reasoning_content"}`` (the reasoning of a
    thinking SFT row), for RL's ``--guidance``; single-answer tasks only (a tool task's reply depends
    on the tool's result), others get none.
    """
    row = task.prompt_row()
    replies = [m for m in task.messages[len(task.prompt_messages):] if m["role"] == "assistant"]
    if reference and len(replies) == 1 and not replies[0].get("tool_calls"):
        row["reference"] = {"content": replies[0]["content"], "reasoning_content": _turn_reasoning(task, replies[0])}
    if json_strings:
        row["conversations"] = _as_json_strings(row["conversations"])
    return row


def task_fact_text(task: Task) -> str | None:
    """The task as plain pretraining text: question then answer.

    Seeing the operands again in the answer is what teaches a small model to copy from its
    context (induction), which every task needs; the chat format is left for SFT to teach.  A tool
    task becomes the question, the call in its ``<tool_call>`` JSON, the tool's result and the final
    answer -- the exchange without the long tool-list system prompt -- so pretraining also practises
    copying arguments into JSON and a tool's result into the reply.
    """
    question = task.prompt_messages[-1]["content"]
    if task.kind != "tool_call":
        return f"{question} {task.answer}"
    calls = "\n".join(f"<tool_call>\n{json.dumps(c, ensure_ascii=False)}\n</tool_call>" for c in task.tool_calls)
    results = "\n".join(f"<tool_response>\n{m['content']}\n</tool_response>"
                         for m in task.messages if m["role"] == "tool")
    return f"{question}\n{calls}\n{results}\n{task.answer}"
