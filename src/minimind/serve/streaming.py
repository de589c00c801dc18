"""Incremental reply parsing for streamed chat completions, plus the SSE framing.

Why a separate streaming parser: a non-streamed reply is parsed once, whole, by
:func:`minimind.tasks.toolcalls.parse_reply`. A streamed reply must be split *as it arrives*
into ``reasoning_content`` deltas, ``content`` deltas and ``tool_calls`` deltas, and two things
must never happen: the raw ``<tool_call>...`` markup reaching a client as content (a UI would show
it, an agent would try to read it as prose), and a tag glued to ordinary text slipping through
because it arrived split over two pieces. So text that *might* begin a tag is held back until it
is clear, and a ``<tool_call>`` block is held whole until it closes; then the block is handed to
the shared parser, so a call is valid in a stream exactly when it is valid in a whole reply.

The deltas concatenate to what ``parse_reply`` returns for the whole text: reasoning loses its
surrounding newlines, content is stripped, and content segments separated by valid tool calls are
joined by one newline. Known difference: with several ``</think>`` in one reply a stream switches
to content at the first one (it cannot wait for the end), the whole-reply parser at the last.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from minimind.tasks.toolcalls import ToolCall, parse_tool_calls

__all__ = ["SSE_DONE", "ReplyDelta", "ReplyStreamParser", "sse_event"]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"

#: The OpenAI end-of-stream marker.
SSE_DONE = "data: [DONE]\n\n"


def sse_event(payload: Any) -> str:
    """One server-sent event carrying ``payload`` as compact JSON (non-ASCII kept)."""
    return "data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n\n"


@dataclass
class ReplyDelta:
    """One piece of a streamed reply: reasoning text, content text, or a complete tool call."""

    kind: Literal["reasoning", "content", "tool_call"]
    text: str = ""
    call: ToolCall | None = None


def _partial_tag(buf: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of one of ``tags``."""
    best = 0
    for tag in tags:
        for k in range(min(len(tag) - 1, len(buf)), best, -1):
            if buf.endswith(tag[:k]):
                best = k
                break
    return best


class _Trimmed:
    """Emit a channel's text with each segment's surrounding ``chars`` removed, without lookahead.

    Leading ``chars`` of a segment are dropped; trailing ones are held until more text shows they
    were inside the segment, and dropped when the segment ends. Non-empty segments are joined by
    ``sep``: this is ``sep.join(s.strip(chars) for s in segments if s.strip(chars))`` computed
    incrementally.
    """

    def __init__(self, chars: str | None, sep: str = "") -> None:
        self.chars = chars
        self.sep = sep
        self.started = False  # the current segment has emitted something
        self.any_segment = False  # an earlier segment was non-empty
        self.held = ""

    def push(self, text: str) -> str:
        if not text:
            return ""
        prefix = ""
        if not self.started:
            text = text.lstrip(self.chars)
            if not text:
                return ""
            self.started = True
            prefix = self.sep if self.any_segment else ""
        else:
            text, self.held = self.held + text, ""
        body = text.rstrip(self.chars)
        self.held = text[len(body):]
        return prefix + body

    def end_segment(self) -> None:
        if self.started:
            self.any_segment = True
        self.started = False
        self.held = ""


class ReplyStreamParser:
    """Split streamed reply text into :class:`ReplyDelta` s; see the module docstring.

    ``thinking``: the generation prompt already opened a ``<think>`` block, so the reply starts
    inside the reasoning. ``parse_tools``: tools were offered, so ``<tool_call>`` blocks are calls
    (otherwise they are ordinary content, as the whole-reply path treats them too).
    """

    def __init__(self, *, thinking: bool = False, parse_tools: bool = True) -> None:
        self.parse_tools = parse_tools
        self.state: Literal["reasoning", "content", "call"] = "reasoning" if thinking else "content"
        self.reasoning_seen = thinking  # a reasoning block was opened; a later <think> is content
        self._buf = ""  # text not yet classified
        self._call = ""  # the open <tool_call> block so far (state "call")
        self._reasoning = _Trimmed("\n")
        self._content = _Trimmed(None, "\n")
        self.calls: list[ToolCall] = []

    # ---- public --------------------------------------------------------------------------------
    def feed(self, text: str) -> list[ReplyDelta]:
        """Classify ``text`` (the next piece of the reply); returns the deltas that became final."""
        self._buf += text
        out: list[ReplyDelta] = []
        while self._step(out):
            pass
        return out

    def finish(self) -> list[ReplyDelta]:
        """The reply ended: release everything held back (an unclosed block becomes content)."""
        out: list[ReplyDelta] = []
        rest, self._buf = self._buf, ""
        if self.state == "reasoning":
            self._emit(out, "reasoning", rest)
        elif self.state == "call":
            self._emit(out, "content", self._call + rest)
            self._call = ""
        else:
            self._emit(out, "content", rest)
        self.state = "content"
        return out

    # ---- internals -----------------------------------------------------------------------------
    def _emit(self, out: list[ReplyDelta], kind: Literal["reasoning", "content"], text: str) -> None:
        channel = self._reasoning if kind == "reasoning" else self._content
        piece = channel.push(text)
        if piece:
            if out and out[-1].kind == kind:
                out[-1].text += piece
            else:
                out.append(ReplyDelta(kind, piece))

    def _content_tags(self) -> tuple[str, ...]:
        tags: tuple[str, ...] = (CALL_OPEN,) if self.parse_tools else ()
        # A reasoning block may open only before any content (the whole-reply parser would move
        # text written before it); later, "<think>" is just text.
        if not self.reasoning_seen and not self._content.started and not self._content.any_segment:
            tags += (THINK_OPEN,)
        return tags

    def _step(self, out: list[ReplyDelta]) -> bool:
        """Consume what can be decided in the buffer; True if the state changed (go again)."""
        buf = self._buf
        if self.state == "reasoning":
            i = buf.find(THINK_CLOSE)
            if i >= 0:
                self._emit(out, "reasoning", buf[:i])
                self._reasoning.end_segment()
                self._buf = buf[i + len(THINK_CLOSE):]
                self.state = "content"
                return True
            keep = _partial_tag(buf, (THINK_CLOSE,))
            self._emit(out, "reasoning", buf[:len(buf) - keep])
            self._buf = buf[len(buf) - keep:]
            return False

        if self.state == "content":
            tags = self._content_tags()
            hits = [(i, tag) for tag in tags if (i := buf.find(tag)) >= 0]
            if hits:
                i, tag = min(hits)
                if tag == THINK_OPEN and buf[:i].strip():
                    # Text before the tag: not a reasoning block; stop looking for one.
                    self._emit(out, "content", buf[:i])
                    self._buf = buf[i:]
                    self.reasoning_seen = True
                    return True
                self._emit(out, "content", buf[:i])
                self._buf = buf[i + len(tag):]
                if tag == THINK_OPEN:
                    self.state = "reasoning"
                    self.reasoning_seen = True
                else:
                    self.state = "call"
                    self._call = CALL_OPEN
                return True
            keep = _partial_tag(buf, tags)
            self._emit(out, "content", buf[:len(buf) - keep])
            self._buf = buf[len(buf) - keep:]
            return False

        # state == "call": wait for the closing tag; a second opening tag first means the first
        # block was never closed, which the whole-reply parser leaves in the content.
        close, reopen = buf.find(CALL_CLOSE), buf.find(CALL_OPEN)
        if reopen >= 0 and (close < 0 or reopen < close):
            self._emit(out, "content", self._call + buf[:reopen])
            self._call = CALL_OPEN
            self._buf = buf[reopen + len(CALL_OPEN):]
            return True
        if close >= 0:
            block = self._call + buf[:close + len(CALL_CLOSE)]
            self._buf = buf[close + len(CALL_CLOSE):]
            self._call = ""
            self.state = "content"
            _, calls, _ = parse_tool_calls(block)
            if calls:
                self._content.end_segment()
                for call in calls:
                    self.calls.append(call)
                    out.append(ReplyDelta("tool_call", call=call))
            else:  # malformed: it stays content, exactly as in a whole reply
                self._emit(out, "content", block)
            return True
        keep = _partial_tag(buf, (CALL_CLOSE, CALL_OPEN))
        self._call += buf[:len(buf) - keep]
        self._buf = buf[len(buf) - keep:]
        return False
