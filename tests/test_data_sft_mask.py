"""SFT loss-mask spans and augmentation against hand-written expectations."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from minimind.data import (SYSTEM_PROMPTS, MaskMarkers, assistant_mask, sft_conversation,
                           tokenize_conversation)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOKENIZER_DIR = SHARED / "compat" / "reference_tokenizer"

pytestmark = pytest.mark.skipif(not TOKENIZER_DIR.is_dir(), reason="../shared fixtures absent")

NO_AUG = {"add_system_ratio": 0.0, "empty_think_ratio": 1.0}
END = "<|im_end|>\n"


@pytest.fixture(scope="module")
def tok():
    from minimind.tokenizer import MiniMindTokenizer
    return MiniMindTokenizer.from_dir(TOKENIZER_DIR)


def masked_spans(tok, ids: list[int], mask: list[int]) -> list[str]:
    """Decoded text of each maximal run of mask == 1."""
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    return spans


def unmasked_text(tok, ids: list[int], mask: list[int]) -> str:
    return tok.decode([i for i, m in zip(ids, mask) if not m])


def run(tok, conv: list[dict], **kw):
    messages, tools = sft_conversation({"conversations": conv})
    ids, mask = tokenize_conversation(tok, messages, tools, random.Random(0), **{**NO_AUG, **kw})
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    return ids, mask


def test_multi_turn_masks_exactly_assistant_bodies(tok) -> None:
    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "你好吗？"},
            {"role": "assistant", "content": "我很好。\n谢谢"}]
    ids, mask = run(tok, conv)
    assert masked_spans(tok, ids, mask) == [
        "<think>\n\n</think>\n\nHello!" + END,
        "<think>\n\n</think>\n\n我很好。\n谢谢" + END,
    ]
    assert unmasked_text(tok, ids, mask) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n<|im_start|>user\n你好吗？<|im_end|>\n<|im_start|>assistant\n")


def test_reasoning_content_is_trained(tok) -> None:
    conv = [{"role": "user", "content": "2+3?"},
            {"role": "assistant", "content": "5", "reasoning_content": "add them\n"},
            {"role": "user", "content": "and 2+4?"},
            {"role": "assistant", "content": "<think>\nagain\n</think>\n\n6"}]
    ids, mask = run(tok, conv)
    assert masked_spans(tok, ids, mask) == ["<think>\nadd them\n</think>\n\n5" + END,
                                            "<think>\nagain\n</think>\n\n6" + END]


def test_tools_calls_and_results(tok) -> None:
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {}}}]
    conv = [{"role": "system", "content": "SYS", "tools": json.dumps(tools)},
            {"role": "user", "content": "time?"},
            {"role": "assistant", "content": "",
             "tool_calls": json.dumps([{"name": "get_time", "arguments": {}}])},
            {"role": "tool", "content": '{"time": "12:00"}'},
            {"role": "tool", "content": '{"tz": "UTC"}'},
            {"role": "assistant", "content": "It is 12:00 UTC."}]
    ids, mask = run(tok, conv)
    call = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    assert masked_spans(tok, ids, mask) == ["<think>\n\n</think>\n\n" + call + END,
                                            "<think>\n\n</think>\n\nIt is 12:00 UTC." + END]
    rest = unmasked_text(tok, ids, mask)
    assert rest.startswith("<|im_start|>system\nSYS\n\n# Tools")
    assert rest.endswith("<|im_start|>user\n<tool_response>\n{\"time\": \"12:00\"}\n</tool_response>"
                         "\n<tool_response>\n{\"tz\": \"UTC\"}\n</tool_response><|im_end|>\n"
                         "<|im_start|>assistant\n")


def test_no_augmentation_is_the_template_exactly(tok) -> None:
    """With ratios 0/1 the ids are the reference fixture ids for every non-generation case."""
    cases = json.loads((SHARED / "compat" / "chat_template_cases.json").read_text(encoding="utf-8"))
    checked = 0
    for case in cases:
        has_answer = any(m["role"] == "assistant" for m in case["messages"])
        if case["add_generation_prompt"] or not has_answer:
            continue
        conv = [dict(m) for m in case["messages"]]
        tools = case["kwargs"].get("tools")
        if tools and conv[0]["role"] == "system":
            conv[0]["tools"] = tools
            ids, mask = run(tok, conv)
        else:  # tools without a system turn cannot be written in the file format; call directly
            ids, mask = tokenize_conversation(tok, conv, tools, random.Random(0), **NO_AUG)
        assert ids == case["ids"], case["name"]
        assert tok.decode(ids) == case["text"]
        checked += 1
    assert checked == 5


def test_augmentation_system_prompt_and_think_removal(tok) -> None:
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    messages, tools = sft_conversation({"conversations": conv})
    ids, mask = tokenize_conversation(tok, messages, tools, random.Random(1),
                                      add_system_ratio=1.0, empty_think_ratio=0.0)
    text = tok.decode(ids)
    assert "<think>" not in text
    prompt = text.split("<|im_start|>system\n", 1)[1].split("<|im_end|>")[0]
    assert prompt in SYSTEM_PROMPTS
    assert masked_spans(tok, ids, mask) == ["hello" + END]
    # Tools present: never inject a system prompt (reference returns the conversation unchanged).
    tool_conv = [{"role": "system", "content": "S", "tools": [{"type": "function",
                                                               "function": {"name": "f"}}]}] + conv
    messages, tools = sft_conversation({"conversations": tool_conv})
    ids, _ = tokenize_conversation(tok, messages, tools, random.Random(1), add_system_ratio=1.0)
    assert not any(p in tok.decode(ids) for p in SYSTEM_PROMPTS)


def test_augmentation_rates(tok) -> None:
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    messages, tools = sft_conversation({"conversations": conv})
    n, with_system, with_think = 2000, 0, 0
    for i in range(n):
        ids, _ = tokenize_conversation(tok, messages, tools, random.Random(i))
        text = tok.decode(ids)
        with_system += text.startswith("<|im_start|>system\n")
        with_think += "<think>\n\n</think>\n\n" in text
    assert abs(with_system / n - 0.2) < 0.035
    assert abs(with_think / n - 0.2) < 0.035


def test_system_prompts_are_the_reference_list() -> None:
    assert len(SYSTEM_PROMPTS) == 10 and len(set(SYSTEM_PROMPTS)) == 10
    assert "You are minimind, a small but useful language model." in SYSTEM_PROMPTS
    assert "你是minimind，一个小巧但有用的语言模型。" in SYSTEM_PROMPTS


def test_truncation(tok) -> None:
    conv = [{"role": "user", "content": "Tell me a story."},
            {"role": "assistant", "content": "Once upon a time there was a tiny model."},
            {"role": "user", "content": "More"},
            {"role": "assistant", "content": "It learned."}]
    full_ids, full_mask = run(tok, conv)
    markers = MaskMarkers(tok)
    assert assistant_mask(full_ids, markers) == full_mask
    text = tok.decode(full_ids)
    # index of the first assistant's <|im_end|>: count tokens of the text before it
    first_end = len(tok.encode(text[:text.index("tiny model.") + len("tiny model.")]))
    assert full_ids[first_end] == tok.eos_id
    for cut in (first_end - 3, first_end + 1, len(full_ids) - 1, 5):
        ids, mask = run(tok, conv, max_len=cut)
        assert ids == full_ids[:cut] and mask == full_mask[:cut]
    ids, mask = run(tok, conv, max_len=first_end - 3)
    spans = masked_spans(tok, ids, mask)  # cut inside the first answer: trained up to the cut
    assert len(spans) == 1 and "<|im_end|>" not in spans[0] and spans[0].startswith("<think>")
    ids, mask = run(tok, conv, max_len=5)  # only part of the user turn: nothing trained
    assert sum(mask) == 0


def test_mask_scan_edge_cases() -> None:
    class Fake:
        """Tokenizer stub: markers [7, 8] (start) and [9, 3] (end)."""

        def encode(self, text: str) -> list[int]:
            return {"<|im_start|>assistant\n": [7, 8], "<|im_end|>\n": [9, 3]}[text]

    m = MaskMarkers(Fake())  # type: ignore[arg-type]
    assert assistant_mask([], m) == []
    assert assistant_mask([7, 5, 9, 3, 7], m) == [0, 0, 0, 0, 0]  # 7 alone is not a start
    assert assistant_mask([7, 8, 5, 9, 4, 9, 3, 6], m) == [0, 0, 1, 1, 1, 1, 1, 0]
    assert assistant_mask([7, 8, 7, 8, 5], m) == [0, 0, 1, 1, 1]  # no end: to the end
    assert assistant_mask([1, 7, 8, 9, 3, 7, 8, 2, 9, 3, 0], m) == [0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0]
