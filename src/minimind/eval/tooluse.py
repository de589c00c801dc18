"""Multi-round tool use: let the model call the task tools, feed it the results, grade the answer.

Why multi-round: :mod:`minimind.eval.tasks` sees one reply per prompt, so for a tool task it can
only grade the calling turn.  What a user of a tool-calling model cares about is the whole loop:
the model writes ``<tool_call>`` blocks, the tools run, their results come back as ``tool``
messages (rendered by the chat template as ``<tool_response>``), and the model answers.  Here
every episode runs that loop through the real chat template and the sandboxed task tool set
(:func:`minimind.tasks.toolset.execute_tool`, the tools the generated tasks were built with):

1. render the conversation so far (with the offered tools) and generate a reply;
2. parse it (:func:`minimind.tasks.toolcalls.parse_reply`):

   * a malformed ``<tool_call>`` block (bad JSON, no name, never closed) -> the episode ends,
     ``invalid_call``; nothing is executed;
   * no call at all -> the reply is the final answer, the episode ends, ``answered``;
   * calls -> each is executed (an unknown tool or unusable arguments gives an ``{"error": ...}``
     result, so the model still gets one response per call), the assistant turn and the results
     are appended, and the model is asked again;

3. after ``max_rounds`` replies an episode still calling tools ends with ``round_limit``.

All running episodes advance together: one round is one batched generation over the episodes
still running (:func:`engine_replier`), so an evaluation costs ``max_rounds`` engine calls, not
one per turn.  The loop itself only sees a *replier* ``(episodes) -> replies``, which lets tests
drive it with scripted replies and no model.

Metrics, each a share of episodes in ``[0, 1]`` unless said otherwise:

* ``call_valid``: the episode wrote at least one ``<tool_call>`` and every block it wrote parsed;
* ``right_tool``: the first reply called exactly the expected tools (names as a multiset);
* ``exact_args``: the first reply's calls are exactly the expected ones, arguments included
  (:func:`minimind.tasks.checks.check_tool_call`, the existing exact checker);
* ``final_correct``: the episode ended with an answer and :func:`minimind.tasks.checks.check_answer`
  accepts it (for tool tasks: every ``gt`` value reported, see ``_check_tool_final``);
* ``answered``: the episode ended with an answer (not invalid, not cut by the round limit);
* ``mean_rounds``: mean number of model replies per episode (``1 .. max_rounds``);
* ``tool_errors``: number of executed calls that returned an error (a count, not a share).

The first reply is the calling turn: an episode only continues after a reply with calls, so a
model that answers straight away has no calling turn and scores 0 on the call metrics.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minimind.data.jsonl import DataFormatError, iter_jsonl
from minimind.tasks.checks import CHECKERS, check_answer, check_tool_call
from minimind.tasks.generators import Task, generate_tasks
from minimind.tasks.toolcalls import parse_reply
from minimind.tasks.toolset import execute_tool

__all__ = [
    "METRICS",
    "Replier",
    "ToolEpisode",
    "engine_replier",
    "episode_from_row",
    "episode_from_task",
    "evaluate_tool_use",
    "generated_tool_episodes",
    "is_tool_row",
    "load_tool_episodes",
    "run_tool_episodes",
    "step_episode",
    "summarize_episodes",
]

#: The per-episode shares averaged into the metrics (plus ``mean_rounds`` and ``tool_errors``).
METRICS = ("call_valid", "right_tool", "exact_args", "final_correct", "answered")

#: ``(running episodes) -> one reply per episode``; ``None`` when the conversation no longer fits
#: the model's context (the episode then ends with ``context_full``).
Replier = Callable[[Sequence["ToolEpisode"]], list[str | None]]
Executor = Callable[[str, dict[str, Any]], dict[str, Any] | None]

_CJK = re.compile(r"[\u3400-\u9fff]")


@dataclass
class ToolEpisode:
    """One tool task being played out: the conversation so far, the gold data and the outcome.

    ``messages`` starts as the prompt (system turn with the offered tools, user turn) and grows by
    one assistant turn per reply plus one ``tool`` message per call.  ``expected_calls`` is empty
    when the source row does not say which calls are right (then ``right_tool``/``exact_args`` are
    ``None`` and left out of their means).
    """

    kind: str
    lang: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    gt: list[Any]
    expected_calls: list[dict[str, Any]] = field(default_factory=list)
    where: str = ""
    replies: list[str] = field(default_factory=list)
    tool_results: list[list[dict[str, Any] | None]] = field(default_factory=list)
    status: str = "running"  # running | answered | invalid_call | round_limit | context_full
    final: str | None = None
    made_call: bool = False
    malformed: bool = False
    right_tool: bool | None = None
    exact_args: bool | None = None
    final_correct: bool = False
    tool_errors: int = 0

    @property
    def done(self) -> bool:
        return self.status != "running"

    @property
    def rounds(self) -> int:
        """Model replies so far."""
        return len(self.replies)

    @property
    def call_valid(self) -> bool:
        return self.made_call and not self.malformed

    @property
    def answered(self) -> bool:
        return self.status == "answered"

    @property
    def expected_tool(self) -> str:
        return self.expected_calls[0]["name"] if self.expected_calls else ""

    @property
    def prompt(self) -> str:
        """The last user turn of the original prompt (for samples)."""
        users = [m for m in self.messages if m["role"] == "user"]
        return str(users[0]["content"]) if users else ""

    def outcome(self) -> dict[str, Any]:
        """Everything a sample in the JSON results shows about this episode."""
        return {"where": self.where, "kind": self.kind, "lang": self.lang, "prompt": self.prompt,
                "replies": list(self.replies), "tool_results": self.tool_results, "status": self.status,
                "rounds": self.rounds, "call_valid": self.call_valid, "right_tool": self.right_tool,
                "exact_args": self.exact_args, "final_correct": self.final_correct, "gt": self.gt}


# ---- sources of episodes -------------------------------------------------------------------------
def _lang_of(messages: Sequence[dict[str, Any]]) -> str:
    text = " ".join(str(m.get("content") or "") for m in messages if m["role"] == "user")
    return "zh" if _CJK.search(text) else "en"


def _json_list(value: Any, what: str) -> list[Any]:
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else []
    if value is None:
        return []
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise TypeError(f"{what} must be a list")
    return value


def episode_from_task(task: Task, where: str = "") -> ToolEpisode:
    """An episode for a generated :class:`~minimind.tasks.generators.Task` (its prompt messages)."""
    return ToolEpisode(kind=task.kind, lang=task.lang, messages=task.prompt_messages, tools=task.tools,
                       gt=list(task.gt), expected_calls=[dict(c) for c in task.tool_calls], where=where)


def is_tool_row(row: dict[str, Any]) -> bool:
    """A row of a tool task: expected ``tool_calls``, or a kind naming tools, or tools offered."""
    if row.get("tool_calls"):
        return True
    if "tool" in str(row.get("kind", "")):
        return True
    conv = row.get("conversations") or row.get("messages") or []
    return bool(conv and isinstance(conv[0], dict) and conv[0].get("role") == "system" and conv[0].get("tools"))


def episode_from_row(row: dict[str, Any], where: str = "") -> ToolEpisode:
    """An episode for a JSONL row: a :meth:`Task.to_dict` row (what the demo writes to
    ``eval_tasks.jsonl``) or an agent-RL row ``{"conversations": [..., {"role": "assistant",
    "content": ""}], "gt": [...], "kind": ...}``.  Tools and tool calls may be JSON strings."""
    conv = row.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise ValueError('a tool row needs a non-empty "conversations" list')
    msgs = [dict(m) for m in conv]
    if msgs[-1].get("role") == "assistant" and not msgs[-1].get("content") and not msgs[-1].get("tool_calls"):
        msgs = msgs[:-1]
    last_user = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=-1)
    if last_user < 0:
        raise ValueError('"conversations" has no user turn')
    msgs = msgs[:last_user + 1]
    tools = None
    if msgs[0].get("role") == "system" and msgs[0].get("tools"):
        tools = _json_list(msgs[0]["tools"], '"tools"')
        msgs[0]["tools"] = tools
    gt = row.get("gt")
    if not isinstance(gt, list) or not gt:
        raise ValueError('a tool row needs a non-empty "gt" list')
    calls = []
    for c in _json_list(row.get("tool_calls"), '"tool_calls"'):
        c = c.get("function", c)  # the OpenAI {"function": {...}} shape
        args = c.get("arguments") or {}
        calls.append({"name": c["name"], "arguments": json.loads(args) if isinstance(args, str) else args})
    return ToolEpisode(kind=str(row.get("kind") or "tool_call"), lang=str(row.get("lang") or _lang_of(msgs)),
                       messages=msgs, tools=tools, gt=list(gt), expected_calls=calls, where=where)


def load_tool_episodes(path: str | Path, limit: int | None = None) -> list[ToolEpisode]:
    """Episodes for the tool rows of a JSONL file (other rows are skipped), the first ``limit``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    out: list[ToolEpisode] = []
    for line_no, row in iter_jsonl(path):
        if not is_tool_row(row):
            continue
        try:
            out.append(episode_from_row(row, where=f"{path}:{line_no}"))
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise DataFormatError(path, line_no, str(e)) from None
        if limit and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"{path}: no tool-task rows (rows with tool_calls, a tool kind or offered tools)")
    return out


def generated_tool_episodes(n: int, seed: int = 0, langs: Sequence[str] = ("zh", "en"),
                            level: str = "standard") -> list[ToolEpisode]:
    """``n`` freshly generated eval-split tool tasks (items never used for SFT)."""
    tasks = generate_tasks(n, seed, kinds=["tool_call"], langs=langs, split="eval", level=level)
    return [episode_from_task(t, where=f"generated:{seed}:{i}") for i, t in enumerate(tasks)]


# ---- the loop ----------------------------------------------------------------------------------
def _names(calls: Iterable[Any]) -> list[str]:
    return sorted(c.name if hasattr(c, "name") else c["name"] for c in calls)


def step_episode(ep: ToolEpisode, reply: str | None, max_rounds: int,
                 execute: Executor = execute_tool) -> None:
    """Apply one model reply to a running episode (see the module docstring for the rules)."""
    if ep.done:
        raise ValueError("the episode is over")
    if reply is None:
        if ep.rounds == 0 and ep.expected_calls:  # never got to call: a miss, not an unknown
            ep.right_tool = ep.exact_args = False
        ep.status = "context_full"
        return
    ep.replies.append(reply)
    parsed = parse_reply(reply)
    first = ep.rounds == 1
    if first and ep.expected_calls:
        ep.right_tool = bool(parsed.tool_calls) and _names(parsed.tool_calls) == _names(ep.expected_calls)
        ep.exact_args = check_tool_call(ep.expected_calls, reply)
    elif first:
        ep.right_tool = ep.exact_args = None
    if parsed.errors:
        ep.malformed = True
        ep.status = "invalid_call"
        return
    if not parsed.tool_calls:
        ep.final = reply
        # kinds the checkers do not know (a newer tool kind in a data file) are tool tasks too
        ep.final_correct = bool(check_answer(ep.kind if ep.kind in CHECKERS else "tool_call", ep.gt, reply))
        ep.status = "answered"
        return
    ep.made_call = True
    turn: dict[str, Any] = {"role": "assistant", "content": parsed.content,
                            "tool_calls": [{"name": c.name, "arguments": c.arguments} for c in parsed.tool_calls]}
    if parsed.reasoning:
        turn["reasoning_content"] = parsed.reasoning
    ep.messages.append(turn)
    results: list[dict[str, Any] | None] = []
    for call in parsed.tool_calls:
        result = execute(call.name, call.arguments)
        results.append(result)
        if result is None or "error" in result:
            ep.tool_errors += 1
        if result is None:
            result = {"error": f"cannot run {call.name} with these arguments"}
        ep.messages.append({"role": "tool", "content": json.dumps(result, ensure_ascii=False)})
    ep.tool_results.append(results)
    if ep.rounds >= max_rounds:
        ep.status = "round_limit"


def run_tool_episodes(episodes: Sequence[ToolEpisode], replier: Replier, max_rounds: int = 3,
                      execute: Executor = execute_tool, progress: bool = False) -> list[ToolEpisode]:
    """Play every episode to its end: each round asks ``replier`` once for all running episodes."""
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    from tqdm import tqdm

    bar = tqdm(total=max_rounds, desc="tool rounds", unit="round", disable=None, leave=False) \
        if progress else None
    for _ in range(max_rounds):
        running = [ep for ep in episodes if not ep.done]
        if not running:
            break
        replies = replier(running)
        if len(replies) != len(running):
            raise ValueError(f"the replier gave {len(replies)} replies for {len(running)} episodes")
        for ep, reply in zip(running, replies):
            step_episode(ep, reply, max_rounds, execute)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return list(episodes)


def engine_replier(engine: Any, max_new_tokens: int = 256, batch_size: int = 0, temperature: float = 0.0,
                   top_p: float = 0.95, top_k: int = 0, seed: int | None = None,
                   open_thinking: bool = False) -> Replier:
    """A replier that renders each conversation with the chat template (tools in the system turn)
    and completes them with :meth:`GenerationEngine.generate`, ``batch_size`` conversations per
    call (0 = all running episodes in one call).  Greedy unless ``temperature > 0``; a reply ends
    at ``<|im_end|>``.  A conversation that leaves no room for a single new token gets ``None``."""
    from minimind.infer.sampling import SamplingParams

    tok = engine.tokenizer
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            greedy=temperature <= 0, stop_token_ids=(tok.eos_id,), seed=seed)

    def reply(episodes: Sequence[ToolEpisode]) -> list[str | None]:
        out: list[str | None] = [None] * len(episodes)
        todo: list[tuple[int, list[int]]] = []
        for i, ep in enumerate(episodes):
            ids = engine.chat_prompt_ids(ep.messages, tools=ep.tools, open_thinking=open_thinking)
            if len(ids) < engine.max_context:
                todo.append((i, ids))
        step = batch_size or max(len(todo), 1)
        for start in range(0, len(todo), step):
            chunk = todo[start:start + step]
            results = engine.generate([ids for _, ids in chunk], params)
            for (i, _), res in zip(chunk, results):
                out[i] = res.text if res.text is not None else tok.decode(res.token_ids)
        return out

    return reply


# ---- scores ------------------------------------------------------------------------------------
def _mean(values: Sequence[bool | None]) -> float | None:
    known = [float(v) for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _block(eps: Sequence[ToolEpisode]) -> dict[str, Any]:
    """``n``, the shares of :data:`METRICS` (``None`` when no episode knows its expected calls),
    ``mean_rounds = sum(rounds) / n`` and the ``tool_errors`` count."""
    out: dict[str, Any] = {"n": len(eps)}
    for name in METRICS:
        out[name] = _mean([getattr(ep, name) for ep in eps])
    out["mean_rounds"] = sum(ep.rounds for ep in eps) / max(len(eps), 1)
    out["tool_errors"] = sum(ep.tool_errors for ep in eps)
    return out


def summarize_episodes(episodes: Sequence[ToolEpisode]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Overall metrics and a breakdown: ``"<kind>/<lang>"`` rows and ``"tool=<expected tool>"``
    rows (the latter when episodes know their expected calls).  The overall metrics also count
    how each episode ended (``ended_<status>``)."""
    if not episodes:
        raise ValueError("no episodes to summarize")
    metrics = _block(episodes)
    for status in ("answered", "invalid_call", "round_limit", "context_full"):
        metrics[f"ended_{status}"] = sum(ep.status == status for ep in episodes)
    groups: dict[str, list[ToolEpisode]] = defaultdict(list)
    for ep in episodes:
        groups[f"{ep.kind}/{ep.lang}"].append(ep)
    tools: dict[str, list[ToolEpisode]] = defaultdict(list)
    for ep in episodes:
        if ep.expected_tool:
            tools[f"tool={ep.expected_tool}"].append(ep)
    subjects = {name: _block(eps) for name, eps in sorted(groups.items())}
    subjects.update({name: _block(eps) for name, eps in sorted(tools.items())})
    return metrics, subjects


def evaluate_tool_use(replier: Replier, episodes: Sequence[ToolEpisode], max_rounds: int = 3,
                      keep_samples: int = 20, execute: Executor = execute_tool,
                      progress: bool = False) -> dict[str, Any]:
    """Run the episodes (:func:`run_tool_episodes`) and score them: ``{"metrics", "subjects",
    "samples"}`` where samples are the first ``keep_samples`` episode transcripts."""
    run_tool_episodes(episodes, replier, max_rounds=max_rounds, execute=execute, progress=progress)
    metrics, subjects = summarize_episodes(episodes)
    return {"metrics": {**metrics, "max_rounds": max_rounds}, "subjects": subjects,
            "samples": [ep.outcome() for ep in episodes[:keep_samples]]}
