"""SFT conversation -> (token ids, loss mask), exactly as the reference labels it.

Loss mask rule (reference ``generate_labels``): scan the ids; wherever the token sequence of
``"<|im_start|>assistant\\n"`` starts at ``i``, mark every token from ``i + len(start)`` up to and
including the end marker ``"<|im_end|>\\n"`` (both of its tokens), then continue scanning after the
end marker.  If the end marker never comes (truncated) the span runs to the end.  So the model learns
the assistant body -- the ``<think>...</think>`` block, the answer, tool-call markup -- and the
``<|im_end|>`` that stops generation, but never system, user or tool-result turns.

The markers are found by tokenising the marker strings with the tokenizer in use, not by hard-coded
ids, so a retrained tokenizer works unchanged.

Augmentation (reference ``pre_processing_chat`` / ``post_processing_chat``):

* no system message and no tools -> with probability ``add_system_ratio`` prepend a random
  :data:`SYSTEM_PROMPTS` entry (teaches the model to accept a system turn);
* if the rendered text contains an empty think block ``<think>\\n\\n</think>\\n\\n``, remove all
  occurrences with probability ``1 - empty_think_ratio`` (so ``empty_think_ratio`` of samples keep
  the block that the non-thinking generation prompt emits).
"""

from __future__ import annotations

import random
from typing import Any, Protocol, Sequence

#: Reference system prompts used for random system-message injection.
SYSTEM_PROMPTS: tuple[str, ...] = (
    "你是一个知识丰富的AI，尽力为用户提供准确的信息。",
    "你是minimind，一个小巧但有用的语言模型。",
    "你是一个专业的AI助手，请提供有价值的回答。",
    "你是minimind，请尽力帮助用户解决问题。",
    "你是一个可靠的AI，请给出准确的回答。",
    "You are a helpful AI assistant.",
    "You are minimind, a lightweight intelligent assistant.",
    "You are a friendly chatbot. Please answer the user's questions carefully.",
    "You are a knowledgeable AI. Try your best to provide accurate information.",
    "You are minimind, a small but useful language model.",
)

ASSISTANT_START = "<|im_start|>assistant\n"
TURN_END = "<|im_end|>\n"
EMPTY_THINK = "<think>\n\n</think>\n\n"


class ChatTokenizer(Protocol):
    """The part of :class:`minimind.tokenizer.MiniMindTokenizer` this module relies on."""

    def encode(self, text: str) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict], tools: Any = None,
                            add_generation_prompt: bool = False, tokenize: bool = False,
                            **kwargs: Any) -> Any: ...


def augment_messages(messages: list[dict], tools: list | None, rng: random.Random,
                     add_system_ratio: float) -> list[dict]:
    """Maybe prepend a random system prompt (only when there is neither a system turn nor tools)."""
    if tools or not messages or messages[0]["role"] == "system":
        return messages
    if rng.random() < add_system_ratio:
        return [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] + list(messages)
    return messages


def strip_empty_think(text: str, rng: random.Random, empty_think_ratio: float) -> str:
    """Remove all empty think blocks with probability ``1 - empty_think_ratio``."""
    if EMPTY_THINK in text and rng.random() >= empty_think_ratio:
        return text.replace(EMPTY_THINK, "")
    return text


def render_sft_text(tokenizer: ChatTokenizer, messages: list[dict], tools: list | None,
                    rng: random.Random, add_system_ratio: float = 0.2,
                    empty_think_ratio: float = 0.2) -> str:
    """Augment, render with the chat template, post-process: the exact training text."""
    messages = augment_messages(messages, tools, rng, add_system_ratio)
    text = tokenizer.apply_chat_template(messages, tools=tools or None,
                                         add_generation_prompt=False, tokenize=False)
    return strip_empty_think(text, rng, empty_think_ratio)


class MaskMarkers:
    """Token sequences of the span markers for one tokenizer (computed once, reused per document)."""

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self.start = list(tokenizer.encode(ASSISTANT_START))
        self.end = list(tokenizer.encode(TURN_END))
        if not self.start or not self.end:
            raise ValueError("tokenizer encodes the chat markers to empty sequences")


def assistant_mask(ids: Sequence[int], markers: MaskMarkers) -> list[int]:
    """0/1 loss mask: 1 on assistant bodies through ``<|im_end|>\\n`` (see module docstring).

    Only positions holding the first marker token are examined, so the scan costs O(len(ids)) with a
    tiny constant (the first start token, ``<|im_start|>``, is rare).
    """
    ids = list(ids)
    n = len(ids)
    mask = [0] * n
    start, end = markers.start, markers.end
    ls, le = len(start), len(end)
    s0, e0 = start[0], end[0]
    i = 0
    while i < n:
        try:
            i = ids.index(s0, i)
        except ValueError:
            break
        if ids[i:i + ls] != start:
            i += 1
            continue
        j = body = i + ls
        stop = n  # no end marker: the span runs to the end (truncated conversation)
        while j < n:
            try:
                j = ids.index(e0, j)
            except ValueError:
                break
            if ids[j:j + le] == end:
                stop = j + le
                break
            j += 1
        mask[body:stop] = [1] * (stop - body)
        i = stop
    return mask


def tokenize_conversation(tokenizer: ChatTokenizer, messages: list[dict], tools: list | None,
                          rng: random.Random, add_system_ratio: float = 0.2,
                          empty_think_ratio: float = 0.2, max_len: int | None = None,
                          markers: MaskMarkers | None = None) -> tuple[list[int], list[int]]:
    """Render, tokenize and label one conversation; return ``(ids, loss_mask)`` of equal length.

    ``messages``/``tools`` are the normalised output of :func:`~minimind.data.formats.sft_conversation`.
    ``rng`` drives both augmentations (pass ``add_system_ratio=0, empty_think_ratio=1`` for the plain
    template rendering).  Like the reference, ids are cut to ``max_len`` first and the cut ids are
    labelled (an assistant turn cut before its end marker is trained up to the cut).
    Pass precomputed ``markers`` when calling in a loop.
    """
    text = render_sft_text(tokenizer, messages, tools, rng, add_system_ratio, empty_think_ratio)
    ids = list(tokenizer.encode(text))
    if max_len is not None:
        ids = ids[:max_len]
    mask = assistant_mask(ids, markers or MaskMarkers(tokenizer))
    return ids, mask
