"""RL prompt data: rows of ``{"conversations": [..., user], "gt", "kind", ...}``, validated on load.

The reference ``rlaif.jsonl`` / ``agent_rl.jsonl`` shape and :func:`minimind.tasks.task_to_rl_row`:
the messages before the reply (an empty assistant placeholder at the end is dropped), the tools
offered, and the row's other columns that rewards read (and ``reference``, a right reply that
``--guidance`` puts into groups that miss it). A malformed row is reported as
``file:line: what is wrong`` (or skipped with ``--skip_bad_lines 1``), never as a traceback.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minimind.data.formats import chat_messages
from minimind.data.jsonl import iter_jsonl_raw, parse_jsonl_line

__all__ = ["REWARD_COLUMNS", "PromptDataset", "PromptRow", "reference_message"]

#: The columns each registered rule reward reads from a row (checked when the data is loaded).
REWARD_COLUMNS: dict[str, tuple[str, ...]] = {"task": ("kind", "gt"), "math": ("gt",),
                                              "task_format": ("kind",), "tool_call": ("tool_calls",)}


@dataclass
class PromptRow:
    """One RL prompt: the messages before the reply, the tools offered, and the row's other columns
    (``gt``, ``kind``, ``tool_calls`` ...) that rewards read."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    columns: dict[str, Any]


def _conversation(obj: Any) -> list[Any]:
    """The row's ``conversations`` as a list of message objects (JSON strings are decoded)."""
    # bad rows raise ValueError (not TypeError): the loader reports every ValueError as file:line
    if not isinstance(obj, dict) or "conversations" not in obj:
        raise ValueError("expected an object with 'conversations'")
    conv = obj["conversations"]
    if isinstance(conv, str):
        try:
            conv = json.loads(conv)
        except json.JSONDecodeError:
            raise ValueError("'conversations' is a string but not a JSON list of messages") from None
    if not isinstance(conv, list):
        kind = type(conv).__name__
        raise ValueError(f"'conversations' must be a list of messages, got {kind}")  # noqa: TRY004
    conv = [json.loads(m) if isinstance(m, str) else m for m in conv]
    bad = [k for k, m in enumerate(conv) if not isinstance(m, dict)]
    if bad:
        raise ValueError(f"message {bad[0]} of 'conversations' is not an object "
                         f"(got {type(conv[bad[0]]).__name__})")
    return conv


def reference_message(ref: Any) -> dict[str, Any]:
    """A row's ``reference`` column -- a right reply, read by ``--guidance`` -- as an assistant message.

    Either the reply as a string, or ``{"content": ..., "reasoning_content": ...}`` (the reasoning
    optional): a thinking rollout is guided with the reasoning, a non-thinking one without it.
    """
    if isinstance(ref, str):
        ref = {"content": ref}
    if not isinstance(ref, dict) or not isinstance(ref.get("content"), str) \
            or not isinstance(ref.get("reasoning_content", ""), str):
        raise ValueError("'reference' must be the reply as a string or an object with a string 'content' "  # noqa: TRY004
                         "(and optionally a string 'reasoning_content')")
    message = {"role": "assistant", "content": ref["content"]}
    if ref.get("reasoning_content"):
        message["reasoning_content"] = ref["reasoning_content"]
    return message


class PromptDataset:
    """The RL prompts of a run (see the module docstring)."""

    def __init__(self, rows: list[PromptRow]) -> None:
        if not rows:
            raise ValueError("no RL prompts")
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def num_rows(self, epoch: int) -> int:
        return len(self.rows)

    @staticmethod
    def parse(obj: Any) -> PromptRow:
        """One JSON row as a :class:`PromptRow`; ``ValueError`` says what is wrong with it."""
        conv = _conversation(obj)
        try:
            messages, tools = chat_messages(conv, require_assistant=False)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed message in 'conversations' ({type(e).__name__}: {e})") from None
        while messages and messages[-1]["role"] == "assistant" and not str(messages[-1]["content"]).strip() \
                and "tool_calls" not in messages[-1]:
            messages.pop()  # the empty placeholder of the reply to generate
        if not messages or messages[-1]["role"] not in ("user", "tool"):
            raise ValueError("the prompt must end with a user (or tool) turn, optionally followed by an "
                             "empty assistant placeholder")
        columns = {k: v for k, v in obj.items() if k != "conversations"}
        if "reference" in columns:
            reference_message(columns["reference"])  # a malformed one is reported at its line
        return PromptRow(messages, tools, columns)

    @classmethod
    def from_jsonl(cls, path: str | Path, skip_bad_lines: bool = False,
                   rewards: Sequence[str] = ()) -> PromptDataset:
        """Read and validate every row; rows lacking a column a named reward reads are refused."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"RL data not found: {path}")
        rows: list[PromptRow] = []
        skipped = 0
        for n, raw, _ in iter_jsonl_raw(path):
            try:
                obj = parse_jsonl_line(raw, path, n)  # bad UTF-8, depth, lone surrogates: file:line
                if obj is None:
                    continue
                row = cls.parse(obj)
                for name in rewards:
                    missing = [c for c in REWARD_COLUMNS.get(name, ()) if c not in row.columns]
                    if missing:
                        raise ValueError(f"reward {name!r} needs the column(s) {missing}; choose "
                                         f"--reward to fit the data (e.g. format:1, or a reward model)")
            except ValueError as e:  # DataFormatError is a ValueError
                if not skip_bad_lines:
                    raise ValueError(f"{path}:{n}: {getattr(e, 'problem', e)}") from None
                skipped += 1
                continue
            rows.append(row)
        if skipped:
            print(f"warning: skipped {skipped} bad lines of {path}", file=sys.stderr)
        if not rows:
            raise ValueError(f"{path}: no RL prompts: " + (f"all {skipped} non-blank line(s) were skipped as "
                             "bad (--skip_bad_lines 1)" if skipped else "the file holds no data"))
        return cls(rows)

    def order(self, seed: int, epoch: int) -> list[int]:
        """The epoch's prompt order: a fixed shuffle of (seed, epoch)."""
        idx = list(range(len(self.rows)))
        random.Random(seed * 1_000_003 + epoch).shuffle(idx)
        return idx
