"""Tests for the demo corpus builder: sizes, cleanliness, determinism and train/eval disjointness.

The corpus is built once per session at a small size (a few seconds) and twice for the
determinism check. The task generators, checkers and sources it draws on are tested in
``tests/test_tasks.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from minimind.tasks import Task, available_kinds, check_tool_call, generate_tasks, split_of
from minimind.tasks.toolset import parse_tool_calls

SMALL = {"pretrain_chars": 120_000, "n_sft": 240, "n_eval": 60, "progress": False}
FILES = ("pretrain.jsonl", "pretrain_heldout.jsonl", "sft.jsonl", "eval_tasks.jsonl", "corpus_stats.json")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _norm(text: str) -> str:
    return re.sub(r"[\W_]+", "", text).casefold()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from minimind.demo.corpus import build_demo_corpus

    out = tmp_path_factory.mktemp("demo_a")
    return out, build_demo_corpus(out, seed=0, **SMALL)


# --------------------------------------------------------------------------- corpus


def test_build_is_deterministic(corpus: tuple[Path, dict], tmp_path: Path) -> None:
    from minimind.demo.corpus import build_demo_corpus

    out_a, _ = corpus
    build_demo_corpus(tmp_path, seed=0, **SMALL)
    for name in FILES:
        assert (out_a / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_other_seed_gives_other_data(corpus: tuple[Path, dict], tmp_path: Path) -> None:
    from minimind.demo.corpus import build_demo_corpus

    out_a, _ = corpus
    build_demo_corpus(tmp_path, seed=1, **SMALL)
    assert (out_a / "sft.jsonl").read_bytes() != (tmp_path / "sft.jsonl").read_bytes()


def test_stats_and_sizes(corpus: tuple[Path, dict]) -> None:
    out, stats = corpus
    pretrain = _read_jsonl(out / "pretrain.jsonl")
    assert stats["pretrain"]["docs"] == len(pretrain)
    assert stats["pretrain"]["chars"] == sum(len(r["text"]) for r in pretrain)
    # within 10% of the requested size (sources big enough at this scale)
    assert abs(stats["pretrain"]["chars"] - SMALL["pretrain_chars"]) < 0.1 * SMALL["pretrain_chars"]
    assert stats["sft"]["rows"] == SMALL["n_sft"] == len(_read_jsonl(out / "sft.jsonl"))
    assert stats["eval"]["rows"] == SMALL["n_eval"] == len(_read_jsonl(out / "eval_tasks.jsonl"))
    for name, src in stats["sources"].items():
        assert src["licence"], name
        assert src["bytes"] >= src["chars"] > 0, name
    assert json.loads((out / "corpus_stats.json").read_text(encoding="utf-8"))["pretrain"] == stats["pretrain"]


def test_pretrain_rows_are_clean_text(corpus: tuple[Path, dict]) -> None:
    out, _ = corpus
    rows = _read_jsonl(out / "pretrain.jsonl")
    assert all(set(r) == {"text"} and r["text"].strip() for r in rows)
    assert all(len(r["text"]) <= 1500 for r in rows)
    tagged = re.compile(r"[\u4e00-\u9fff]/(?:n|v|w|nr|ns|m|t)\b")
    assert not any(tagged.search(r["text"]) for r in rows), "POS tags leaked into the corpus"
    # The pretraining text carries task facts as plain question + answer lines, not chat turns.
    assert any(re.search(r"\d+ ?[+×-] ?\d+\D+\d+ [+×-] \d+ = \d+$", line)
               for r in rows for line in r["text"].split("\n"))
    assert not any("<|im_start|>" in r["text"] for r in rows)
    assert not any("<|im_start|>" in r["text"] for r in rows)


def test_heldout_disjoint_from_training(corpus: tuple[Path, dict]) -> None:
    out, stats = corpus
    train = {_norm(r["text"]) for r in _read_jsonl(out / "pretrain.jsonl")}
    held = [_norm(r["text"]) for r in _read_jsonl(out / "pretrain_heldout.jsonl")]
    assert len(held) >= 100
    assert len(set(held)) == len(held)
    assert not (set(held) & train)
    assert stats["heldout"]["docs"] == len(held)


_ROLES = {"system", "user", "assistant", "tool"}


def _assert_valid_conversation(conv: list[dict]) -> None:
    assert conv and all(m["role"] in _ROLES for m in conv)
    assert all(m["role"] != "system" for m in conv[1:]), "system only first"
    body = conv[1:] if conv[0]["role"] == "system" else conv
    if conv[0]["role"] == "system" and "tools" in conv[0]:
        tools = conv[0]["tools"]
        tools = json.loads(tools) if isinstance(tools, str) else tools
        assert tools and all(t["type"] == "function" and t["function"]["name"] for t in tools)
    assert body[0]["role"] == "user" and body[-1]["role"] == "assistant"
    expect = "user"
    for m in body:
        if expect == "user":
            assert m["role"] == "user", conv
            assert isinstance(m["content"], str) and m["content"].strip()
            expect = "assistant"
        elif expect == "assistant":
            assert m["role"] == "assistant", conv
            calls = m.get("tool_calls")
            if calls:
                calls = json.loads(calls) if isinstance(calls, str) else calls
                assert all(isinstance(c["name"], str) and isinstance(c["arguments"], dict) for c in calls)
                expect = "tool"
            else:
                assert isinstance(m["content"], str) and m["content"].strip()
                expect = "user"
        else:  # one tool message per call, then the assistant continues
            assert m["role"] == "tool" and m["content"].strip()
            json.loads(m["content"])
            expect = "assistant"
    assert expect == "user", "conversation must end with a plain assistant answer"


def test_sft_rows_are_reference_format(corpus: tuple[Path, dict]) -> None:
    out, stats = corpus
    rows = _read_jsonl(out / "sft.jsonl")
    for row in rows:
        assert set(row) == {"conversations"}
        _assert_valid_conversation(row["conversations"])
    kinds = stats["sft"]["by_kind"]
    assert kinds.get("open_qa", 0) > 0
    assert set(available_kinds()) <= set(kinds)


def test_eval_tasks_disjoint_from_sft(corpus: tuple[Path, dict]) -> None:
    out, _ = corpus
    sft = _read_jsonl(out / "sft.jsonl")
    sft_users = {m["content"] for r in sft for m in r["conversations"] if m["role"] == "user"}
    sft_answers = {m["content"] for r in sft for m in r["conversations"] if m["role"] == "assistant"}
    evals = [Task.from_dict(r) for r in _read_jsonl(out / "eval_tasks.jsonl")]
    assert {t.kind for t in evals} == set(available_kinds())
    for t in evals:
        assert split_of(t.key) == "eval"
        assert t.prompt_messages[-1]["content"] not in sft_users
        assert t.answer not in sft_answers
    # Structural guarantee behind it: train-split generation never yields an eval key.
    train_keys = {t.key for t in generate_tasks(600, seed=0, split="train")}
    assert not train_keys & {t.key for t in evals}


def test_eval_rows_roundtrip_and_rl_shape(corpus: tuple[Path, dict]) -> None:
    out, _ = corpus
    for row in _read_jsonl(out / "eval_tasks.jsonl"):
        task = Task.from_dict(row)
        assert task.to_dict() == row
        assert row["conversations"][-1] == {"role": "assistant", "content": ""}
        assert row["conversations"][:-1] == task.prompt_messages
        assert isinstance(row["gt"], list) and row["gt"]
        assert task.check(task.answer)


def test_sft_rows_render_with_the_chat_template(corpus: tuple[Path, dict]) -> None:
    """Every SFT row renders; a rendered tool-call turn is exactly what the checks accept."""
    chat = pytest.importorskip("minimind.tokenizer.chat_template")
    out, _ = corpus
    n_tool = 0
    for row in _read_jsonl(out / "sft.jsonl"):
        conv = row["conversations"]
        tools = conv[0].get("tools") if conv[0]["role"] == "system" else None
        text = chat.render_chat(conv, tools=tools)
        assert text.count("<|im_start|>assistant\n") == sum(m["role"] == "assistant" for m in conv)
        if tools:
            n_tool += 1
            turn = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
            calls = conv[2]["tool_calls"]
            assert check_tool_call(calls, turn) and parse_tool_calls(turn) == calls
            assert "<tool_response>\n" + conv[3]["content"] + "\n</tool_response>" in text
    assert n_tool > 0


def test_heldout_documents_do_not_depend_on_the_training_mix(corpus: tuple[Path, dict], tmp_path: Path) -> None:
    """Recipes with another source mix are scored on the very same held-out documents, so their
    bits per byte compare; the SFT kind list weights kinds by repetition."""
    from minimind.demo.corpus import DEFAULT_MIX, build_demo_corpus

    out_a, stats_a = corpus
    mix = dict(DEFAULT_MIX, pydoc=0.05, task_facts=0.32)
    kinds = ("arithmetic", "tool_call", "tool_call")
    stats = build_demo_corpus(tmp_path, seed=0, **{**SMALL, "n_sft": 120}, mix=mix, sft_kinds=kinds,
                              generic_share=0.0, fact_pool_share=0.25)
    assert (tmp_path / "pretrain_heldout.jsonl").read_bytes() == (out_a / "pretrain_heldout.jsonl").read_bytes()
    assert (tmp_path / "pretrain.jsonl").read_bytes() != (out_a / "pretrain.jsonl").read_bytes()
    assert stats["sft"]["by_kind"] == {"arithmetic": 40, "tool_call": 80}
    assert stats["sources"]["task_facts"]["chars"] > stats_a["sources"]["task_facts"]["chars"]


def test_think_share_puts_reasoning_into_that_share_of_rows(corpus: tuple[Path, dict], tmp_path: Path) -> None:
    """``think_share`` of the SFT rows carry a reasoning in every assistant turn (the counting chain or
    the date's carry for arithmetic / next-day rows, one line for the others), the answers stay the
    same, and the draws leave every other file byte-identical."""
    from minimind.demo.corpus import build_demo_corpus
    from minimind.tasks.rows import no_steps_reasoning

    out_a, _ = corpus
    stats = build_demo_corpus(tmp_path, seed=0, think_share=0.5, **SMALL)
    rows = _read_jsonl(tmp_path / "sft.jsonl")
    plain = _read_jsonl(out_a / "sft.jsonl")
    assert len(rows) == len(plain)
    reasoned = steps = 0
    for row, base in zip(rows, plain):
        turns = [m for m in row["conversations"] if m["role"] == "assistant"]
        if turns[-1].get("reasoning_content"):
            reasoned += 1
            assert all(m.get("reasoning_content") for m in turns)
            stripped = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in row["conversations"]]
            assert stripped == base["conversations"]
            answer, reasoning = turns[-1]["content"], turns[-1]["reasoning_content"]
            if re.fullmatch(r"\d+ [+-] \d+ = \d+", answer):  # arithmetic: the chain ends at the answer
                assert reasoning.endswith(" = " + answer.rsplit(" ", 1)[1])
                steps += 1
            elif reasoning not in (no_steps_reasoning("zh"), no_steps_reasoning("en")):
                steps += "月末" in reasoning or "last day" in reasoning or "工具" in reasoning or "tool" in reasoning
        else:
            assert row == base
    assert stats["sft"]["with_reasoning"] == reasoned
    assert 0.4 * len(rows) < reasoned < 0.6 * len(rows) and steps > 0.1 * reasoned
    for name in ("pretrain.jsonl", "pretrain_heldout.jsonl", "eval_tasks.jsonl"):
        assert (out_a / name).read_bytes() == (tmp_path / name).read_bytes(), name
