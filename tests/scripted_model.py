"""A tiny MiniMind model overfitted to reproduce a handful of scripted chat replies.

Why: server, web UI and tool-calling tests need a *real* model behind the real engine whose greedy
output is known in advance (a plain answer, a ``<think>`` answer, a ``<tool_call>`` and the answer
after the tool result, an answer with HTML in it). A random model cannot give that, and a released
checkpoint is far too large for unit tests, so we train one in a few seconds on CPU.

Usage (cache it per session; training takes ~5 s on one CPU core)::

    tok = small_tokenizer(tmp_dir)
    model = train_scripted_model(tok, SCRIPTS)

A conversation is a list of messages, or a dict ``{"messages": [...], "tools": [...] | None}``. Every
assistant message is a training target: the model learns to produce its rendered text (reasoning,
content and tool calls exactly as the chat template lays them out) followed by ``<|im_end|>``,
after the prompt the chat template gives for the messages before it. Thinking is switched on in
that prompt (``open_thinking=True``) when the assistant message carries ``reasoning_content`` or a
``</think>`` in its content, so a client asks for the thinking script with thinking enabled.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from minimind.config import ModelConfig
from minimind.model import MiniMindForCausalLM
from minimind.tasks.tools import call_tool, tool_result_text, tool_schemas
from minimind.tokenizer import MiniMindTokenizer, train_tokenizer

__all__ = [
    "CALCULATOR_RESULT",
    "CALCULATOR_TOOL",
    "HTML",
    "PLAIN",
    "SCRIPTS",
    "THINKING",
    "TOOL_ANSWER",
    "TOOL_CALL",
    "Example",
    "greedy_reply",
    "scripted_examples",
    "small_tokenizer",
    "train_scripted_model",
]

#: The built-in calculator's schema in OpenAI ``tools`` form (what ``GET /api/tools`` lists). Clients
#: must send exactly ``[CALCULATOR_TOOL]`` for the tool script to be reproduced, since the schema is
#: part of the prompt the model was trained on.
CALCULATOR_TOOL: dict[str, Any] = tool_schemas(["calculate_math"])[0]
#: The tool message content after the call: the built-in calculator's real result text.
CALCULATOR_RESULT: str = tool_result_text(call_tool("calculate_math", {"expression": "12*7"}))

#: Plain question -> plain answer.
PLAIN: list[dict[str, Any]] = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! I am MiniMind, a tiny model."},
]
#: Reasoning reply: ask with thinking on (``open_thinking``); the model writes the reasoning, then
#: ``</think>`` and the answer.
THINKING: list[dict[str, Any]] = [
    {"role": "user", "content": "Why is the sky blue?"},
    {"role": "assistant", "reasoning_content": "Sunlight scatters off air; blue scatters most.",
     "content": "Because of Rayleigh scattering."},
]
#: The tool-call turn: the prompt is the user question with ``tools=[CALCULATOR_TOOL]``.
TOOL_CALL: dict[str, Any] = {
    "tools": [CALCULATOR_TOOL],
    "messages": [
        {"role": "user", "content": "What is 12*7?"},
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": "call_0", "type": "function",
            "function": {"name": "calculate_math", "arguments": {"expression": "12*7"}},
        }]},
    ],
}
#: After the tool result (:data:`CALCULATOR_RESULT`) the model answers with the number.
TOOL_ANSWER: dict[str, Any] = {
    "tools": [CALCULATOR_TOOL],
    "messages": TOOL_CALL["messages"] + [
        {"role": "tool", "tool_call_id": "call_0", "content": CALCULATOR_RESULT},
        {"role": "assistant", "content": "12*7 = 84."},
    ],
}
#: An answer carrying an HTML injection attempt, for UI escaping tests.
HTML: list[dict[str, Any]] = [
    {"role": "user", "content": "Show me some html"},
    {"role": "assistant", "content": "Here: <img src=x onerror=alert(1)>"},
]
#: All scripts (TOOL_ANSWER also trains the tool-call turn it contains).
SCRIPTS: list[Any] = [PLAIN, THINKING, TOOL_ANSWER, HTML]


class Example:
    """One training target: prompt ids, the reply ids (ending in eos) and the reply text."""

    def __init__(self, prompt_ids: list[int], reply_ids: list[int], reply_text: str,
                 open_thinking: bool) -> None:
        self.prompt_ids = prompt_ids
        self.reply_ids = reply_ids
        self.reply_text = reply_text
        self.open_thinking = open_thinking

    def __repr__(self) -> str:
        return f"Example(reply={self.reply_text!r}, open_thinking={self.open_thinking})"


def _split(conversation: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    if isinstance(conversation, Mapping):
        return list(conversation["messages"]), conversation.get("tools")
    return list(conversation), None


def _thinks(message: Mapping[str, Any]) -> bool:
    content = message.get("content")
    return bool(message.get("reasoning_content")) or (isinstance(content, str) and "</think>" in content)


def scripted_examples(tokenizer: MiniMindTokenizer, conversations: Sequence[Any]) -> list[Example]:
    """Turn conversations into (prompt, reply) token pairs, one per assistant message.

    The reply is the text the full render adds after the generation prompt, up to and including
    ``<|im_end|>``; a prompt that is not a prefix of the full render is a template mismatch and
    raises, because the model would then be trained on a layout no client can reproduce.
    """
    examples: list[Example] = []
    eos = tokenizer.eos_token
    for conversation in conversations:
        messages, tools = _split(conversation)
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            thinking = _thinks(message)
            prompt = tokenizer.apply_chat_template(messages[:i], tools=tools, add_generation_prompt=True,
                                                   open_thinking=thinking)
            full = tokenizer.apply_chat_template(messages[:i + 1], tools=tools)
            assert isinstance(prompt, str) and isinstance(full, str)
            if not full.startswith(prompt):
                raise ValueError(f"generation prompt is not a prefix of the rendered turn:\n"
                                 f"{prompt!r}\nvs\n{full!r}")
            reply = full[len(prompt):]
            end = reply.find(eos)
            if end < 0:
                raise ValueError(f"rendered assistant turn has no {eos}: {reply!r}")
            reply_text = reply[:end]
            prompt_ids = tokenizer.encode(prompt)
            reply_ids = tokenizer.encode(reply_text) + [tokenizer.eos_id]
            examples.append(Example(prompt_ids, reply_ids, reply_text, thinking))
    return examples


def _corpus(conversations: Sequence[Any]) -> list[str]:
    """Texts a test tokenizer should compress well: every rendered conversation and its pieces."""
    from minimind.tokenizer.chat_template import render_chat

    texts: list[str] = []
    for conversation in conversations:
        messages, tools = _split(conversation)
        texts.append(render_chat(messages, tools=tools))
        for m in messages:
            for key in ("content", "reasoning_content"):
                if isinstance(m.get(key), str) and m[key]:
                    texts.append(m[key])
            for call in m.get("tool_calls") or []:
                texts.append(json.dumps(call["function"], ensure_ascii=False))
        if tools:
            texts.append(json.dumps(tools, ensure_ascii=False))
    return texts


def small_tokenizer(tmp_dir: str | Path, conversations: Sequence[Any] = SCRIPTS,
                    extra_texts: Sequence[str] = (), vocab_size: int = 1000) -> MiniMindTokenizer:
    """Train (and save into ``tmp_dir``) a small BPE tokenizer that knows the scripted strings.

    Repeating the scripted texts gives BPE enough pair counts to merge them into few tokens, which
    keeps prompts (the tool schema in particular) short and training fast.
    """
    texts = _corpus(conversations) * 20 + list(extra_texts) + [
        f"plain English filler sentence number {i}, with digits {i * 7} and words." for i in range(50)]
    tok = train_tokenizer(texts, Path(tmp_dir), vocab_size=vocab_size, show_progress=False)
    for special in ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
                    "<tool_response>", "</tool_response>"):
        if tok.token_to_id(special) is None:  # the chat template relies on these being atomic
            raise AssertionError(f"trained tokenizer lacks {special}")
    return tok


@torch.no_grad()
def greedy_reply(model: MiniMindForCausalLM, prompt_ids: Sequence[int], eos_id: int,
                 max_new_tokens: int = 128) -> list[int]:
    """Greedy decode with full forwards (no cache): slow but independent of the engine under test."""
    ids = list(prompt_ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1]
        nxt = int(logits.argmax())
        out.append(nxt)
        ids.append(nxt)
        if nxt == eos_id:
            break
    return out


def _pack(examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One packed row holding every example: ``(ids, labels, position_ids, doc_ids)``, each ``[1, T]``.

    Examples whose prompt continues the previous example's prompt + reply (the later turns of one
    conversation) share a document, so a multi-turn script costs its length once instead of once
    per turn; the document-causal mask keeps the documents apart. Labels (next token; -100 where
    nothing is learned) cover only the replies.
    """
    docs: list[tuple[list[int], list[int]]] = []  # (ids, labels) per document
    for e in examples:
        if docs and e.prompt_ids[:len(docs[-1][0])] == docs[-1][0]:
            ids, labels = docs[-1]
        else:
            ids, labels = [], []
            docs.append((ids, labels))
        extra = e.prompt_ids[len(ids):]
        labels += [-100] * len(extra)
        ids += extra
        labels[-1] = e.reply_ids[0]  # the last prompt position predicts the first reply token
        labels += e.reply_ids[1:] + [-100]
        ids += e.reply_ids
    flat_ids = [i for d, _ in docs for i in d]
    flat_labels = [x for _, lab in docs for x in lab]
    positions = [p for d, _ in docs for p in range(len(d))]
    doc_ids = [k for k, (d, _) in enumerate(docs) for _ in d]

    def row(values: list[int]) -> torch.Tensor:
        return torch.tensor([values], dtype=torch.long)

    return row(flat_ids), row(flat_labels), row(positions), row(doc_ids)


def train_scripted_model(tokenizer: MiniMindTokenizer, conversations: Sequence[Any] = SCRIPTS,
                         steps: int = 600, seed: int = 0, hidden_size: int = 96, num_layers: int = 2,
                         max_position_embeddings: int = 1024, lr: float = 3e-3,
                         target_loss: float = 2e-2, min_margin: float = 3.0) -> MiniMindForCausalLM:
    """Overfit a tiny model until greedy decoding reproduces every scripted reply exactly.

    Training stops early once the mean reply loss is under ``target_loss``, every reply token is
    the argmax after its prefix and wins by at least ``min_margin`` logits (checked every 25
    steps); it raises ``AssertionError`` naming the first mismatching reply if ``steps`` are not
    enough. The margin is what lets batched, cached decoding in the engine (different summation
    order, padding) pick the same tokens as the full forwards used here.
    """
    conversations = copy.deepcopy(list(conversations))
    examples = scripted_examples(tokenizer, conversations)
    if not examples:
        raise ValueError("no assistant messages to learn")
    # One intra-op thread: the tensors are tiny, and on a shared 2-core CI box several threads
    # spin against other processes (measured 4 s single-threaded vs 23 s with 2 threads under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(tokenizer, examples, steps, seed, hidden_size, num_layers, max_position_embeddings,
                      lr, target_loss, min_margin)
    finally:
        torch.set_num_threads(threads)


def _train(tokenizer: MiniMindTokenizer, examples: list[Example], steps: int, seed: int, hidden_size: int,
           num_layers: int, max_position_embeddings: int, lr: float, target_loss: float,
           min_margin: float) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=tokenizer.vocab_size,
                      max_position_embeddings=max_position_embeddings)
    model = MiniMindForCausalLM(cfg)
    ids, labels, positions, doc_ids = _pack(examples)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()

    def mismatch() -> str | None:
        # Teacher-forced argmax at every reply position equal to the reply token is exactly
        # "greedy decoding reproduces the reply", at the cost of one forward instead of ~100.
        with torch.no_grad():
            logits = model(ids, position_ids=positions, doc_ids=doc_ids).logits[0]
        top2 = logits.topk(2, dim=-1)
        where = labels[0] >= 0
        wrong = where & (top2.indices[:, 0] != labels[0])
        if bool(wrong.any()):
            at = int(wrong.nonzero()[0])
            return (f"at packed position {at} expected {tokenizer.decode([int(labels[0, at])])!r}, "
                    f"argmax gave {tokenizer.decode([int(top2.indices[at, 0])])!r} "
                    f"(context {tokenizer.decode(ids[0, max(0, at - 12):at + 1].tolist())!r})")
        margin = float((top2.values[:, 0] - top2.values[:, 1])[where].min())
        if margin < min_margin:
            return f"smallest logit margin {margin:.2f} < {min_margin}"
        return None

    loss_value = float("inf")
    for step in range(1, steps + 1):
        logits = model(ids, position_ids=positions, doc_ids=doc_ids).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = float(loss.detach())
        if step % 25 == 0 and loss_value < target_loss and mismatch() is None:
            break
    model.eval()
    problem = mismatch()
    if problem is not None:
        raise AssertionError(f"scripted model did not learn its replies (loss {loss_value:.4g}): {problem}")
    return model
