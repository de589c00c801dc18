"""Task accuracy: generate answers to prompts whose answers can be checked, and score them.

Rows look like reference agent-RL rows: ``{"conversations": [..., {"role": "assistant",
"content": ""}], "gt": [...], "kind": "..."}``; the final empty assistant turn is what the model
writes.  ``checker(kind, gt, text) -> bool`` decides correctness (see :mod:`minimind.tasks.checks`).

Tool tasks are graded three ways, because a tiny model can get the call right and still garble the
answer (or the reverse): ``per_kind["tool_call"]`` (the first turn's calls, executed, give the
expected values), ``tool_call_exact`` (name and arguments exactly the expected ones) and
``tool_final_accuracy`` (multi-round: the model's own calls are executed by the sandboxed task tool
set, the result is appended as a ``tool`` turn and the model's final answer is graded).  Kinds that
need memorised facts (idioms, dictionary) are summarised apart from the ones answerable from the
prompt alone, so a small model's knowledge gap does not hide what it learnt to compute or copy.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from minimind.infer import GenerationEngine, SamplingParams

#: Kinds whose answers need memorised facts; every other kind is answerable from the prompt.
KNOWLEDGE_KINDS: frozenset[str] = frozenset({"idiom_meaning", "dictionary"})


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


def problem_key(row: dict[str, Any]) -> str:
    """The problem an item asks (its task key; else its prompt): items of one key are one problem in
    other words."""
    return row.get("key") or json.dumps(prompt_of(row)[0], ensure_ascii=False)


def evaluate_tasks(engine: GenerationEngine, tokenizer: Any, rows: Sequence[dict[str, Any]],
                   checker: Callable[[str, Any, str], bool], max_new_tokens: int = 96,
                   batch_size: int = 16,
                   format_checker: Callable[[str, str], bool] | None = None,
                   open_thinking: bool = False) -> dict[str, Any]:
    """Greedy-decode every row (chat template, generation prompt) and report accuracy overall and
    per ``kind``; with ``format_checker(kind, text)`` also the share of well-formed answers.
    ``correct`` lists each row's grade (1/0) in order, for item-by-item comparisons of two models
    (:func:`minimind.eval.paired.paired_change`).

    Every model gets the same rendered prompts, so comparing a pretrained and an SFT model
    isolates what SFT taught, not prompt engineering.  ``open_thinking`` renders the generation
    prompt with an open ``<think>`` block (the model reasons, closes the block, then answers) instead
    of the closed empty one; the reply is graded on what follows ``</think>``, and ``think_closed``
    is the share of replies that closed the block (an unclosed one has no answer: a reader of the
    reply sees only reasoning), ``reasoning_per_kind`` the share with a non-empty reasoning.
    """
    params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True, temperature=0.0,
                            stop_token_ids=(tokenizer.eos_id,))
    thinking = {"open_thinking": True} if open_thinking else {}  # templates without the flag render as before
    per_kind: dict[str, list[bool]] = defaultdict(list)
    keys: dict[str, set[str]] = defaultdict(set)  # distinct problems per kind (the task key)
    tool_turns: list[tuple[dict[str, Any], str]] = []
    fmt_kind: dict[str, list[bool]] = defaultdict(list)
    closed: list[bool] = []
    reasoned: dict[str, list[bool]] = defaultdict(list)
    samples = []
    correct: list[int] = []  # per row, in order: what a paired before/after comparison needs
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = []
        for row in chunk:
            msgs, tools = prompt_of(row)
            prompts.append(tokenizer.apply_chat_template(msgs, tools=tools, add_generation_prompt=True,
                                                         tokenize=True, **thinking))
        results = engine.generate(prompts, params)
        for row, res in zip(chunk, results):
            text = res.text if res.text is not None else tokenizer.decode(res.token_ids)
            if open_thinking:
                closed.append("</think>" in text)
                head = text.split("</think>", 1)[0] if "</think>" in text else text
                reasoned[row.get("kind", "")].append(bool(head.replace("<think>", "").strip()))
            if row.get("kind") == "tool_call" and row.get("tool_calls"):
                tool_turns.append((row, text))
            # with thinking on, a reply that never closes its think block has no answer outside it
            ok = bool(checker(row.get("kind", ""), row.get("gt"), text)) and (not open_thinking or "</think>" in text)
            per_kind[row.get("kind", "")].append(ok)
            keys[row.get("kind", "")].add(problem_key(row))
            correct.append(int(ok))
            if format_checker is not None:
                fmt_kind[row.get("kind", "")].append(bool(format_checker(row.get("kind", ""), text)))
            if len(samples) < 400:
                samples.append({"kind": row.get("kind", ""), "prompt": prompt_of(row)[0][-1]["content"],
                                "output": text, "correct": ok})
    acc = {k: sum(v) / len(v) for k, v in sorted(per_kind.items())}
    total = sum(len(v) for v in per_kind.values())
    out = {"accuracy": sum(sum(v) for v in per_kind.values()) / max(total, 1), "per_kind": acc,
           "n": total, "n_per_kind": {k: len(v) for k, v in sorted(per_kind.items())},
           # a kind with few possible problems repeats them in other words (single-digit arithmetic:
           # 100 held-out items, 24 problems): its accuracy moves in steps of one problem, not one item
           "distinct_per_kind": {k: len(v) for k, v in sorted(keys.items())}, "samples": samples, "correct": correct,
           "open_thinking": open_thinking}
    if open_thinking:
        out["think_closed"] = sum(closed) / max(len(closed), 1)
        out["reasoning_per_kind"] = {k: sum(v) / len(v) for k, v in sorted(reasoned.items())}
    for group, keep in (("non_knowledge", lambda k: k not in KNOWLEDGE_KINDS),
                        ("knowledge", lambda k: k in KNOWLEDGE_KINDS)):
        oks = [ok for k, v in per_kind.items() if keep(k) for ok in v]
        if oks:
            out[f"accuracy_{group}"] = sum(oks) / len(oks)
    if tool_turns:
        out.update(_tool_rounds(engine, tokenizer, tool_turns, params, batch_size, open_thinking))
    if format_checker is not None:
        out["format_rate"] = sum(sum(v) for v in fmt_kind.values()) / max(total, 1)
        out["format_per_kind"] = {k: sum(v) / len(v) for k, v in sorted(fmt_kind.items())}
    return out


def _tool_rounds(engine: GenerationEngine, tokenizer: Any, turns: Sequence[tuple[dict[str, Any], str]],
                 params: SamplingParams, batch_size: int, open_thinking: bool = False) -> dict[str, Any]:
    """Tool-call exactness of the first turns, then a second round on the model's own calls.

    Each first turn's parsed calls are executed by :func:`minimind.tasks.toolset.execute_tool` (pure
    functions over fixed tables: nothing leaves the process); a turn without a parsable call, or one
    whose call fails, has no second round and counts as a wrong final answer.  The final answer is
    graded against the row's ``gt`` like the gold final turn.
    """
    from minimind.tasks.checks import check_answer, check_tool_call
    from minimind.tasks.toolset import execute_tool, parse_tool_calls
    exact = [bool(check_tool_call(row["tool_calls"], text)) for row, text in turns]
    followups: list[tuple[dict[str, Any], list[int]]] = []
    for row, text in turns:
        calls = parse_tool_calls(text.rsplit("</think>", 1)[-1])
        results = [execute_tool(c["name"], c["arguments"]) for c in calls]
        if not calls or any(r is None for r in results):
            continue
        msgs, tools = prompt_of(row)
        msgs = msgs + [{"role": "assistant", "content": "", "tool_calls": calls}]
        msgs += [{"role": "tool", "content": json.dumps(r, ensure_ascii=False)} for r in results]
        followups.append((row, tokenizer.apply_chat_template(msgs, tools=tools, add_generation_prompt=True,
                                                             tokenize=True,
                                                             **({"open_thinking": True} if open_thinking else {}))))
    final_ok: list[bool] = []
    final_samples = []
    for start in range(0, len(followups), batch_size):
        chunk = followups[start:start + batch_size]
        for (row, _), res in zip(chunk, engine.generate([p for _, p in chunk], params)):
            text = res.text if res.text is not None else tokenizer.decode(res.token_ids)
            ok = "<tool_call>" not in text and bool(check_answer("tool_call", row.get("gt"), text))
            final_ok.append(ok)
            if len(final_samples) < 20:
                final_samples.append({"prompt": prompt_of(row)[0][-1]["content"], "final": text, "correct": ok})
    n = len(turns)
    return {"tool_call_exact": sum(exact) / n, "tool_final_accuracy": sum(final_ok) / n,
            "tool_rounds_executed": len(followups) / n, "tool_final_samples": final_samples}
