"""Task accuracy: generate answers to prompts whose answers can be checked, and score them.

Rows look like reference agent-RL rows: ``{"conversations": [..., {"role": "assistant",
"content": ""}], "gt": [...], "kind": "..."}``; the final empty assistant turn is what the model
writes.  ``checker(kind, gt, text) -> bool`` decides correctness (see :mod:`minimind.tasks.checks`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from minimind.infer import GenerationEngine, SamplingParams


def prompt_of(row: dict[str, Any]) -> tuple[list[dict], list | None]:
    """Messages up to the answer the model must write, and the tools offered in the system turn."""
    conv = [dict(m) for m in row["conversations"]]
    if conv and conv[-1]["role"] == "assistant" and not conv[-1].get("content"):
        conv = conv[:-1]
    tools = None
    if conv and conv[0]["role"] == "system" and conv[0].get("tools"):
        tools = conv[0]["tools"]
        tools = json.loads(tools) if isinstance(tools, str) else tools
    return conv, tools


def evaluate_tasks(engine: GenerationEngine, tokenizer: Any, rows: Sequence[dict[str, Any]],
                   checker: Callable[[str, Any, str], bool], max_new_tokens: int = 96,
                   batch_size: int = 16,
                   format_checker: Callable[[str, str], bool] | None = None) -> dict[str, Any]:
    """Greedy-decode every row (chat template, generation prompt) and report accuracy overall and
    per ``kind``; with ``format_checker(kind, text)`` also the share of well-formed answers.

    Every model gets the same rendered prompts, so comparing a pretrained and an SFT model
    isolates what SFT taught, not prompt engineering.
    """
    params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True, temperature=0.0,
                            stop_token_ids=(tokenizer.eos_id,))
    per_kind: dict[str, list[bool]] = defaultdict(list)
    fmt_kind: dict[str, list[bool]] = defaultdict(list)
    samples = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = []
        for row in chunk:
            msgs, tools = prompt_of(row)
            prompts.append(tokenizer.apply_chat_template(msgs, tools=tools, add_generation_prompt=True,
                                                         tokenize=True))
        results = engine.generate(prompts, params)
        for row, res in zip(chunk, results):
            text = res.text if res.text is not None else tokenizer.decode(res.token_ids)
            ok = bool(checker(row.get("kind", ""), row.get("gt"), text))
            per_kind[row.get("kind", "")].append(ok)
            if format_checker is not None:
                fmt_kind[row.get("kind", "")].append(bool(format_checker(row.get("kind", ""), text)))
            if len(samples) < 400:
                samples.append({"kind": row.get("kind", ""), "prompt": prompt_of(row)[0][-1]["content"],
                                "output": text, "correct": ok})
    acc = {k: sum(v) / len(v) for k, v in sorted(per_kind.items())}
    total = sum(len(v) for v in per_kind.values())
    out = {"accuracy": sum(sum(v) for v in per_kind.values()) / max(total, 1), "per_kind": acc,
           "n": total, "samples": samples}
    if format_checker is not None:
        out["format_rate"] = sum(sum(v) for v in fmt_kind.values()) / max(total, 1)
        out["format_per_kind"] = {k: sum(v) / len(v) for k, v in sorted(fmt_kind.items())}
    return out
