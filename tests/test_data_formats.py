"""JSONL reading and record validation: file:line errors, skip counts, format equivalences."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest

from minimind.data import (DataFormatError, SkipStats, dpo_pair, iter_jsonl, prepare_shards,
                           pretrain_text, sft_conversation, tokenize_conversation)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOKENIZER_DIR = SHARED / "compat" / "reference_tokenizer"
needs_shared = pytest.mark.skipif(not TOKENIZER_DIR.is_dir(), reason="../shared fixtures absent")

TOOLS = [{"type": "function", "function": {"name": "calc", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string"}}}}}]
CALLS = [{"name": "calc", "arguments": {"expression": "2+2"}}]


def _conv(tools_str: bool, calls_str: bool) -> dict:
    return {"conversations": [
        {"role": "system", "content": "SYS", "tools": json.dumps(TOOLS) if tools_str else TOOLS},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": None,
         "tool_calls": json.dumps(CALLS) if calls_str else CALLS},
        {"role": "tool", "content": '{"result": 4}'},
        {"role": "assistant", "content": "4", "reasoning_content": "easy"},
    ]}


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok():
    if not TOKENIZER_DIR.is_dir():
        pytest.skip("../shared fixtures absent")
    from minimind.tokenizer import MiniMindTokenizer
    return MiniMindTokenizer.from_dir(TOKENIZER_DIR)


# ------------------------------------------------------------------------------------ iter_jsonl
def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    f = _write(tmp_path / "d.jsonl",
               ['{"text": "a"}', '{"text": "b"}', '{"text": oops}', '{"text": "d"}'])
    seen = []
    with pytest.raises(DataFormatError) as ei:
        for line_no, obj in iter_jsonl(f):
            seen.append(line_no)
    assert seen == [1, 2]
    assert ei.value.line == 3
    assert str(ei.value).startswith(f"{f}:3:")
    assert "invalid JSON" in str(ei.value)


def test_skip_bad_lines_counts_and_warns_once(tmp_path: Path) -> None:
    lines = ['{"text": "a"}', "not json", '{"text": "c"}', "[1, 2]", "", '{"text": "f"}', "{"]
    f = _write(tmp_path / "d.jsonl", lines)
    stats = SkipStats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = list(iter_jsonl(f, skip_bad_lines=True, stats=stats))
    assert [n for n, _ in got] == [1, 3, 6]  # blank line 5 is not an error, just ignored
    assert [o["text"] for _, o in got] == ["a", "c", "f"]
    assert stats.count == 3
    assert [w for w in caught if "skipped 3 bad line(s)" in str(w.message)] and len(caught) == 1
    assert f"{f}:2:" in str(caught[0].message) and f"{f}:4:" in str(caught[0].message)


def test_start_line_keeps_true_line_numbers(tmp_path: Path) -> None:
    f = _write(tmp_path / "d.jsonl", [json.dumps({"text": str(i)}) for i in range(1, 6)])
    assert [(n, o["text"]) for n, o in iter_jsonl(f, start_line=4)] == [(4, "4"), (5, "5")]


def test_invalid_utf8_is_a_format_error(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataFormatError, match=r":2: invalid UTF-8"):
        list(iter_jsonl(f))


# ------------------------------------------------------------------------------------ records
def test_pretrain_text_rules() -> None:
    assert pretrain_text({"text": "hi"}) == "hi"
    for bad, why in [({}, "missing field 'text'"), ({"text": ""}, "empty"), ({"text": 3}, "string")]:
        with pytest.raises(ValueError, match=why):
            pretrain_text(bad)


@pytest.mark.parametrize("obj, why", [
    ({}, "missing field 'conversations'"),
    ({"conversations": []}, "is empty"),
    ({"conversations": "hi"}, "must be a list"),
    ({"conversations": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
    ({"conversations": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
     "'content' must be a string"),
    ({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
     "'content' must be a string"),
    ({"conversations": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    ({"conversations": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "", "tool_calls": "[{bad"}]},
     "'tool_calls' is not valid JSON"),
    ({"conversations": [{"role": "system", "content": "s", "tools": "{nope"},
                        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "'tools' is not valid JSON"),
    ({"conversations": [{"role": "user", "content": "q", "tools": TOOLS},
                        {"role": "assistant", "content": "a"}]}, "only allowed on the first"),
    ({"conversations": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a", "tool_calls": [{"arguments": {}}]}]},
     "no function name"),
    ({"conversations": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a", "reasoning_content": 1}]},
     "reasoning_content"),
])
def test_sft_conversation_rejects(obj: dict, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        sft_conversation(obj)


def test_sft_conversation_normalises() -> None:
    messages, tools = sft_conversation(_conv(tools_str=True, calls_str=True))
    assert tools == TOOLS
    assert all("tools" not in m for m in messages)
    assert messages[2] == {"role": "assistant", "content": "", "tool_calls": CALLS}
    assert messages[4]["reasoning_content"] == "easy"
    same = sft_conversation(_conv(tools_str=False, calls_str=False))
    assert same == (messages, tools)


def test_dpo_pair() -> None:
    prompt = [{"role": "user", "content": "q"}]
    chosen, rejected = dpo_pair({"chosen": prompt + [{"role": "assistant", "content": "good"}],
                                 "rejected": prompt + [{"role": "assistant", "content": "bad"}]})
    assert chosen[-1]["content"] == "good" and rejected[-1]["content"] == "bad"
    with pytest.raises(ValueError, match="missing field 'rejected'"):
        dpo_pair({"chosen": prompt + [{"role": "assistant", "content": "a"}]})
    with pytest.raises(ValueError, match="'rejected' must end with an assistant turn"):
        dpo_pair({"chosen": prompt + [{"role": "assistant", "content": "a"}],
                  "rejected": prompt + [{"role": "assistant", "content": "a"},
                                        {"role": "user", "content": "b"}]})
    with pytest.raises(ValueError, match="same answer"):
        dpo_pair({"chosen": prompt + [{"role": "assistant", "content": "a"}],
                  "rejected": prompt + [{"role": "assistant", "content": "a"}]})


@pytest.mark.parametrize("roles, why", [
    (["assistant", "user", "assistant"], "'assistant' out of order at the start"),
    (["user", "system", "assistant"], "system message must be the first"),
    (["user", "assistant", "assistant"], "'assistant' out of order after a assistant"),
    (["user", "user", "assistant"], "'user' out of order after a user"),
    (["user", "tool", "assistant"], "'tool' out of order after a user"),
    (["user", "assistant", "tool", "assistant"], "must follow an assistant message with tool_calls"),
])
def test_roles_out_of_order_are_refused(roles, why) -> None:
    conv = [{"role": r, "content": "x"} for r in roles]
    with pytest.raises(ValueError, match=why):
        sft_conversation({"conversations": conv})


@pytest.mark.parametrize("tools, why", [
    ([{"function": 5}], r"tools\[0\].function must be an object"),
    ([{"type": "function", "function": {"description": "no name"}}], r"tools\[0\] has no function name"),
    ([{"name": ""}], "has no function name"),
])
def test_tools_without_a_named_function_are_refused(tools, why) -> None:
    conv = [{"role": "system", "content": "s", "tools": tools}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"}]
    with pytest.raises(ValueError, match=why):
        sft_conversation({"conversations": conv})


# ------------------------------------------------------------------------------ with tokenizer
@needs_shared
@pytest.mark.parametrize("bad_line, why", [
    ('{"conversations": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
     "unknown role 'robot'"),
    ('{"conversations": []}', "'conversations' is empty"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "missing field 'conversations'"),
    ('{"conversations": [{"role": "user", "content": "x"}, '
     '{"role": "assistant", "content": "", "tool_calls": "[{\\"name\\": "}]}',
     "'tool_calls' is not valid JSON"),
    ('{"conversations": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]',
     "invalid JSON"),
])
def test_prepare_sft_errors_name_the_line(tmp_path: Path, tok, bad_line: str, why: str) -> None:
    good = json.dumps({"conversations": [{"role": "user", "content": "q"},
                                         {"role": "assistant", "content": "a"}]})
    f = _write(tmp_path / "sft.jsonl", [good, good, bad_line, good])
    with pytest.raises(DataFormatError) as ei:
        prepare_shards(f, tmp_path / "out", tok, "sft", num_proc=1, progress=False)
    assert str(ei.value).startswith(f"{f}:3:")
    assert why in str(ei.value)
    assert not (tmp_path / "out").exists()


@needs_shared
def test_string_and_object_tools_render_identically(tok) -> None:
    results = set()
    for tools_str in (False, True):
        for calls_str in (False, True):
            messages, tools = sft_conversation(_conv(tools_str, calls_str))
            ids, mask = tokenize_conversation(tok, messages, tools, random.Random(0),
                                              add_system_ratio=0.0, empty_think_ratio=1.0)
            results.add((tuple(ids), tuple(mask)))
    assert len(results) == 1
    ids = list(next(iter(results))[0])
    text = tok.decode(ids)
    assert '<tool_call>\n{"name": "calc", "arguments": {"expression": "2+2"}}\n</tool_call>' in text
    assert '"name": "calc"' in text.split("<|im_end|>")[0]  # tool schema in the system header


@needs_shared
def test_reference_fixture_tool_case_matches(tok) -> None:
    """String-encoded tools/tool_calls (reference file shape) reproduce the reference ids exactly."""
    cases = json.loads((SHARED / "compat" / "chat_template_cases.json").read_text(encoding="utf-8"))
    case = next(c for c in cases if c["name"] == "tools_and_calls" and not c["add_generation_prompt"]
                and not c["kwargs"].get("open_thinking"))
    conv = [dict(m) for m in case["messages"]]
    conv[0]["tools"] = json.dumps(case["kwargs"]["tools"], ensure_ascii=False)
    for m in conv:
        if "tool_calls" in m:
            m["tool_calls"] = json.dumps(m["tool_calls"], ensure_ascii=False)
    messages, tools = sft_conversation({"conversations": conv})
    ids, _ = tokenize_conversation(tok, messages, tools, random.Random(0),
                                   add_system_ratio=0.0, empty_think_ratio=1.0)
    assert ids == case["ids"]
