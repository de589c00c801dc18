"""Tests for the reasoning that thinking rows carry (:func:`minimind.tasks.rows.task_reasoning`) and for
thinking in rows, prompts, evaluation and rewards: the reasoning must be true step by step and end at
the answer, since SFT teaches it and RL rewards what follows it."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import re

import pytest

from minimind.tasks import (
    check_answer,
    generate_tasks,
    task_reward,
    task_to_sft_row,
)
from minimind.tasks.rows import task_reasoning
from tests.test_tasks import _EchoTokenizer

# --------------------------------------------------------------------------- reasoning for thinking


def test_arithmetic_reasoning_is_a_chain_of_true_unit_steps() -> None:
    """Every expression of the chain equals the answer, each step moves both operands by one (after an
    optional swap that puts the larger addend first), the chain ends at ``x op 0 = answer``."""
    tasks = generate_tasks(300, seed=5, kinds=["arithmetic"], level="easy")
    seen_long = False
    for t in tasks:
        parts = task_reasoning(t).split(" = ")
        assert parts[-1] == t.gt[0], t.key
        exprs = [tuple(int(x) for x in re.split(r" [+-] ", p)) for p in parts[:-1]]
        op = "+" if "+" in parts[0] else "-"
        values = [a + b if op == "+" else a - b for a, b in exprs]
        assert all(v == int(t.gt[0]) for v in values), parts
        assert exprs[-1][1] == 0
        chain = exprs[1:] if op == "+" and exprs[0][1] > exprs[0][0] else exprs
        if chain is not exprs:
            assert chain[0] == exprs[0][::-1]
        step = 1 if op == "+" else -1
        assert all(b == (a0 + step, b0 - 1) for (a0, b0), b in itertools.pairwise(chain)), parts
        assert len(chain) <= 10
        seen_long |= len(chain) >= 5
    assert seen_long


def test_next_day_reasoning_names_the_carry_and_the_date() -> None:
    """The reasoning states the month's real length, says "last day" exactly at month ends and then
    names the month (or year) it carries into, and its last date is the answer (the checker accepts
    it as a reply on its own).  Unnamed ("carries into the next month"), a small model copied the
    current month into the date: 17 of 27 wrong held-out dates of one demo run."""
    import calendar
    tasks = generate_tasks(400, seed=6, kinds=["date_fact"], level="easy")
    carries = 0
    for t in tasks:
        text = task_reasoning(t)
        d = dt.date.fromisoformat(t.key.rsplit(":", 1)[1])
        last = calendar.monthrange(d.year, d.month)[1]
        assert (f"有{last}天" if t.lang == "zh" else f"has {last} days") in text
        is_last = (f"{d.day}日是月末" in text) if t.lang == "zh" else ("is the last day" in text)
        assert is_last == (d.day == last), text
        if is_last:
            nxt = d + dt.timedelta(days=1)
            named = {("zh", True): f"进到下一年（{nxt.year}年1月）", ("zh", False): f"进到下个月（{nxt.month}月）",
                     ("en", True): f"into the next year, {nxt.year}:",
                     ("en", False): f"into the next month, {nxt.strftime('%B')}:"}
            assert named[t.lang, d.month == 12] in text, text
        carries += is_last
        assert check_answer("date_fact", t.gt, text), text
    assert carries > 0
    standard = generate_tasks(60, seed=6, kinds=["date_fact"], level="standard")
    assert any(task_reasoning(t) is None for t in standard)  # weekday / month-length questions have none


def test_sft_row_with_thinking_renders_the_reasoning_in_the_think_block() -> None:
    """With thinking every assistant turn renders ``<think>\\nREASONING\\n</think>\\n\\nANSWER``: the
    kind's steps, or one line for kinds without steps and tool turns; without thinking the empty block
    of the non-thinking generation prompt. Either prompt is a prefix of the matching training text."""
    from minimind.tasks.rows import no_steps_reasoning
    from minimind.tokenizer.chat_template import render_chat
    arith = generate_tasks(1, seed=1, kinds=["arithmetic"], level="easy")[0]
    unit = generate_tasks(1, seed=1, kinds=["unit_conversion"], level="easy")[0]
    tool = generate_tasks(1, seed=1, kinds=["tool_call"], level="easy")[0]
    for t, reasoning in ((arith, task_reasoning(arith)), (unit, no_steps_reasoning(unit.lang))):
        on = render_chat(task_to_sft_row(t, thinking=True)["conversations"])
        off = render_chat(task_to_sft_row(t)["conversations"])
        prompt_on = render_chat(t.prompt_messages, add_generation_prompt=True, open_thinking=True)
        prompt_off = render_chat(t.prompt_messages, add_generation_prompt=True)
        assert on == prompt_on + reasoning + "\n</think>\n\n" + t.answer + "<|im_end|>\n"
        assert off == prompt_off + t.answer + "<|im_end|>\n"
    assert task_reasoning(unit) is None
    turns = [m for m in task_to_sft_row(tool, thinking=True)["conversations"] if m["role"] == "assistant"]
    assert tool.tool_calls[0]["name"] in turns[0]["reasoning_content"] and turns[1]["reasoning_content"]


def test_open_thinking_prompt_tokens_continue_only_into_a_non_empty_block(tmp_path) -> None:
    """Why kinds without steps get one line of reasoning: with a tokenizer that merges ``\\n\\n`` (as
    the demo's does), the open prompt ends ``<think>`` ``\\n`` while an empty block is ``<think>``
    ``\\n\\n`` ``</think>``, so an empty-block text never extends the prompt's tokens; a thinking row
    of every kind does."""
    from minimind.tokenizer import train_tokenizer
    from minimind.tokenizer.chat_template import render_chat
    tasks = generate_tasks(60, seed=4, kinds=["arithmetic", "unit_conversion", "date_fact"], level="easy")
    texts = [render_chat(task_to_sft_row(t, thinking=i % 2 == 0)["conversations"]) for i, t in enumerate(tasks)]
    tok = train_tokenizer(texts * 3 + ["\n\n".join(["para"] * 50)] * 200, tmp_path / "tok", vocab_size=400,
                          show_progress=False)
    assert len(tok.encode("\n\n")) == 1  # the merge that makes the difference
    for t in tasks[:9]:
        prompt = tok.encode(render_chat(t.prompt_messages, add_generation_prompt=True, open_thinking=True))
        on = tok.encode(render_chat(task_to_sft_row(t, thinking=True)["conversations"]))
        empty = tok.encode(render_chat(task_to_sft_row(t)["conversations"]))
        assert on[:len(prompt)] == prompt, t.kind
        assert empty[:len(prompt)] != prompt, t.kind


def test_evaluate_tasks_with_open_thinking_grades_the_answer_after_the_think_block() -> None:
    """Prompts are rendered with ``open_thinking``; a reply that reasons and closes the block is graded
    on its answer, one that never closes it is wrong (a chat client shows only reasoning), and
    ``think_closed`` / ``reasoning_per_kind`` count both."""
    from types import SimpleNamespace

    from minimind.eval.tasks import evaluate_tasks

    tasks = generate_tasks(12, seed=3, kinds=["arithmetic", "unit_conversion"], level="easy")
    by_q = {t.prompt_messages[-1]["content"]: t for t in tasks}
    rendered_with: list[bool] = []

    class Tok(_EchoTokenizer):
        def apply_chat_template(self, msgs, tools=None, add_generation_prompt=True, tokenize=True,
                                open_thinking=False):
            rendered_with.append(open_thinking)
            return json.dumps(msgs, ensure_ascii=False)

    class Engine:
        def generate(self, prompts, params):
            out = []
            for p in prompts:
                t = by_q[json.loads(p)[-1]["content"]]
                if t.kind == "arithmetic":  # reasons, closes the block, answers
                    text = f"{task_reasoning(t)}\n</think>\n\n{t.answer}"
                else:  # the right answer, but inside a block that is never closed
                    text = f"{t.answer}"
                out.append(SimpleNamespace(text=text, token_ids=[]))
            return out

    res = evaluate_tasks(Engine(), Tok(), [t.to_dict() for t in tasks], check_answer, open_thinking=True)
    assert rendered_with and all(rendered_with)
    assert res["open_thinking"] is True
    assert res["per_kind"] == {"arithmetic": 1.0, "unit_conversion": 0.0}
    assert res["think_closed"] == pytest.approx(0.5)
    assert res["reasoning_per_kind"] == {"arithmetic": 1.0, "unit_conversion": 1.0}
    assert res["correct"] == [int(t.kind == "arithmetic") for t in tasks]  # row by row, in order
    off = evaluate_tasks(Engine(), Tok(), [t.to_dict() for t in tasks], check_answer)
    assert off["open_thinking"] is False and "think_closed" not in off and off["accuracy"] == 1.0
    assert rendered_with.count(False) == len(tasks)


def test_task_reward_with_thinking_on_pays_only_for_a_closed_think_block() -> None:
    """A prompt that opens ``<think>`` pays the right answer only after ``</think>``; the same text
    without the open block (thinking off) is graded as before."""
    t = generate_tasks(1, seed=2, kinds=["arithmetic"], level="easy")[0]
    opened = "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\n"
    closed = "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    reasoning = task_reasoning(t)
    assert task_reward(opened, f"{reasoning}\n</think>\n\n{t.answer}", **t.to_dict()) == 1.0
    assert task_reward(opened, f"{reasoning}\n{t.answer}", **t.to_dict()) == 0.0  # never closed
    assert task_reward(closed, t.answer, **t.to_dict()) == 1.0
    wrong = f"{t.answer.rsplit('=', 1)[0]}= {int(t.gt[0]) + 1}"
    assert task_reward(opened, f"{reasoning}\n</think>\n\n{wrong}", **t.to_dict()) == 0.0
