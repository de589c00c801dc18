"""Incremental detokenisation for streamed generation.

Byte-level BPE tokens are byte sequences, so a single CJK character or emoji is often split over
two or three tokens. Decoding token by token would print U+FFFD replacement characters for the
partial bytes; :class:`StreamDecoder` instead holds tokens back until their text is complete.
"""

from __future__ import annotations

from typing import Iterable, Protocol

__all__ = ["StreamDecoder"]

REPLACEMENT_CHAR = "\ufffd"


class _Decodes(Protocol):
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str: ...


class StreamDecoder:
    """Turn a stream of token ids into a stream of finished text pieces.

    ``put(id)`` returns the text that became final with that token ("" while it is buffering);
    ``flush()`` returns whatever is still held (e.g. at EOS). The concatenation of all returned
    pieces equals ``tokenizer.decode(all_ids)``: pieces are only cut where the pending bytes end on
    a complete character, and byte-level decoding is concatenative across such cuts.

    ``max_pending`` bounds the buffer: a UTF-8 character needs at most 4 bytes, so if that many
    tokens still end in U+FFFD the bytes are genuinely invalid (a model emitting byte garbage) and
    are released as they are rather than stalling the stream; only in that degenerate case may the
    number of U+FFFD characters differ from a one-shot decode.
    """

    def __init__(
        self, tokenizer: _Decodes, skip_special_tokens: bool = False, max_pending: int = 8
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.max_pending = max(1, max_pending)
        self._pending: list[int] = []

    def put(self, token_id: int) -> str:
        """Add one token id; return newly finalised text (possibly "")."""
        self._pending.append(int(token_id))
        text = self.tokenizer.decode(self._pending, skip_special_tokens=self.skip_special_tokens)
        if text.endswith(REPLACEMENT_CHAR) and len(self._pending) < self.max_pending:
            return ""
        self._pending.clear()
        return text

    def put_many(self, token_ids: Iterable[int]) -> str:
        """Feed several ids; return the concatenated finalised text."""
        return "".join(self.put(t) for t in token_ids)

    def flush(self) -> str:
        """Return the buffered remainder (with U+FFFD for truly incomplete bytes) and reset."""
        if not self._pending:
            return ""
        text = self.tokenizer.decode(self._pending, skip_special_tokens=self.skip_special_tokens)
        self._pending.clear()
        return text

    def reset(self) -> None:
        """Drop anything buffered (start a new stream)."""
        self._pending.clear()

    @property
    def pending(self) -> int:
        """Number of token ids currently held back."""
        return len(self._pending)
