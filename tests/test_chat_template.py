"""Chat template rendering: byte-identical to the reference fixtures, plus fixture-free cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minimind.tokenizer import CHAT_TEMPLATE, MiniMindTokenizer, render_chat

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
COMPAT = SHARED / "compat"
CASES_FILE = COMPAT / "chat_template_cases.json"
REF_TOKENIZER = COMPAT / "reference_tokenizer"


def _load_cases() -> list:
    if not CASES_FILE.is_file():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"{CASES_FILE} absent"))]
    cases = json.loads(CASES_FILE.read_text(encoding="utf-8"))
    ids = [f"{i:02d}-{c['name']}-{c['add_generation_prompt']}-{c['kwargs'].get('open_thinking')}"
           for i, c in enumerate(cases)]
    return [pytest.param(c, id=i) for c, i in zip(cases, ids)]


@pytest.fixture(scope="module")
def ref_tok() -> MiniMindTokenizer:
    if not (REF_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip("reference tokenizer fixture absent")
    return MiniMindTokenizer.from_dir(REF_TOKENIZER)


def _render_case(case: dict, renderer=render_chat, **extra):
    kwargs = dict(case["kwargs"])
    tools = kwargs.pop("tools", None)
    return renderer(case["messages"], tools=tools,
                    add_generation_prompt=case["add_generation_prompt"], **kwargs, **extra)


@pytest.mark.parametrize("case", _load_cases())
def test_reference_case_text_and_ids(case: dict, ref_tok: MiniMindTokenizer) -> None:
    assert _render_case(case) == case["text"]
    assert ref_tok.encode(case["text"]) == case["ids"]
    # Through the tokenizer wrapper (template loaded from the fixture config), tokenized directly.
    assert _render_case(case, ref_tok.apply_chat_template, tokenize=True) == case["ids"]


def test_builtin_template_equals_reference_config() -> None:
    config = REF_TOKENIZER / "tokenizer_config.json"
    if not config.is_file():
        pytest.skip("reference tokenizer_config.json absent")
    assert json.loads(config.read_text(encoding="utf-8"))["chat_template"] == CHAT_TEMPLATE


# ---------------------------------------------------------------------- fixture-free cases
USER = [{"role": "user", "content": "你好"}]
TOOLS = [{"type": "function", "function": {"name": "calc", "description": "算术",
                                            "parameters": {"type": "object", "properties": {}}}}]


@pytest.mark.parametrize(
    "kwargs, suffix",
    [
        ({}, "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
        ({"open_thinking": True}, "<|im_start|>assistant\n<think>\n"),
        ({"open_thinking": False}, "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
        # Only the boolean True opens thinking (template uses `is true`).
        ({"open_thinking": "true"}, "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
    ],
)
def test_generation_prompt(kwargs: dict, suffix: str) -> None:
    out = render_chat(USER, add_generation_prompt=True, **kwargs)
    assert out == "<|im_start|>user\n你好<|im_end|>\n" + suffix
    assert render_chat(USER, **kwargs) == "<|im_start|>user\n你好<|im_end|>\n"


def test_system_and_late_system() -> None:
    msgs = [{"role": "system", "content": "S"}, *USER, {"role": "system", "content": "T"}]
    assert render_chat(msgs) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>system\nT<|im_end|>\n"
    )


def test_consecutive_tool_messages_merged_into_one_user_turn() -> None:
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"name": "calc", "arguments": {"x": 1}},
            {"type": "function", "function": {"name": "calc", "arguments": '{"x": 2}'}},
        ]},
        {"role": "tool", "content": "1", "tool_call_id": "a"},
        {"role": "tool", "content": "2", "name": "calc"},
        {"role": "assistant", "content": "done"},
    ]
    assert render_chat(msgs) == (
        "<|im_start|>user\nq<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
        '<tool_call>\n{"name": "calc", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "calc", "arguments": {"x": 2}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n1\n</tool_response>\n"
        "<tool_response>\n2\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\ndone<|im_end|>\n"
    )


def test_tool_calls_as_json_string_and_tools_as_json_string() -> None:
    calls = [{"name": "calc", "arguments": {"expression": "2+2", "备注": "中文"}}]
    as_obj = [*USER, {"role": "assistant", "content": "ok", "tool_calls": calls}]
    as_str = [*USER, {"role": "assistant", "content": "ok",
                      "tool_calls": json.dumps(calls, ensure_ascii=False)}]
    original = json.dumps(as_str, ensure_ascii=False)
    expected = render_chat(as_obj, tools=TOOLS)
    assert render_chat(as_str, tools=json.dumps(TOOLS)) == expected
    assert json.dumps(as_str, ensure_ascii=False) == original  # input not mutated
    # content present -> newline before the first call; tojson keeps CJK unescaped.
    assert ('ok\n<tool_call>\n{"name": "calc", "arguments": '
            '{"expression": "2+2", "备注": "中文"}}\n</tool_call><|im_end|>\n') in expected
    assert '"description": "算术"' in expected
    assert expected.startswith("<|im_start|>system\n# Tools\n\n")


def test_invalid_tool_calls_string_raises() -> None:
    msgs = [*USER, {"role": "assistant", "content": "", "tool_calls": "[not json"}]
    with pytest.raises(ValueError):
        render_chat(msgs)


def test_reasoning_extracted_from_content_and_kept_for_history() -> None:
    msgs = [
        *USER,
        {"role": "assistant", "content": "<think>\nA\n</think>\n\nB"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "C", "reasoning_content": "\nR\n"},
    ]
    assert render_chat(msgs) == (
        "<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nA\n</think>\n\nB<|im_end|>\n"
        "<|im_start|>user\nagain<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nR\n</think>\n\nC<|im_end|>\n"
    )


def test_custom_template_and_raise_exception() -> None:
    assert render_chat(USER, template="{{ messages[0].content }}!") == "你好!"
    with pytest.raises(Exception, match="boom"):
        render_chat(USER, template="{{ raise_exception('boom') }}")
