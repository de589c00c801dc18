"""Streaming JSONL reading with errors that point at ``file:line``.

Training files are often larger than RAM (the reference ``pretrain_t2t.jsonl`` is 10 GB), so lines
are read one at a time in binary mode (byte offsets then drive the progress bar of the shard
builder) and decoded individually.  A bad line deep inside a 10 GB file must be findable, hence every
error carries the file name and the 1-based line number.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

#: How many bad-line locations a skip summary lists before "...".
MAX_REPORTED_LOCATIONS = 5

#: UTF-8 byte order mark.  Windows editors (Notepad, Excel "UTF-8" export) put it at the start of
#: a file; ``json.loads`` rejects it, so it is dropped from the first line only.
UTF8_BOM = b"\xef\xbb\xbf"


class DataFormatError(ValueError):
    """A data file line that cannot be used; the message starts with ``path:line:``."""

    def __init__(self, path: str | os.PathLike, line: int, problem: str) -> None:
        self.path = str(path)
        self.line = int(line)
        self.problem = problem
        super().__init__(f"{self.path}:{self.line}: {problem}")


@dataclass
class SkipStats:
    """Counts lines dropped under ``skip_bad_lines=True`` and remembers the first few errors."""

    count: int = 0
    locations: list[str] = field(default_factory=list)

    def add(self, err: DataFormatError) -> None:
        self.count += 1
        if len(self.locations) < MAX_REPORTED_LOCATIONS:
            self.locations.append(str(err))

    def summary(self, path: str | os.PathLike) -> str:
        more = ", ..." if self.count > len(self.locations) else ""
        return (f"skipped {self.count} bad line(s) in {path}: "
                + "; ".join(self.locations) + more)

    def warn(self, path: str | os.PathLike) -> None:
        """Emit one warning for the whole file instead of one per bad line."""
        if self.count:
            warnings.warn(self.summary(path), RuntimeWarning, stacklevel=3)


def parse_jsonl_line(raw: bytes | str, path: str | os.PathLike, line_no: int) -> dict | None:
    """Decode one JSONL line into a dict; ``None`` for a blank line.

    Blank lines (e.g. a trailing empty line) are tolerated because editors and ``cat`` produce them;
    anything else that is not a JSON object raises :class:`DataFormatError`.
    """
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problem = f"invalid UTF-8 ({e.reason} at byte {e.start})"
            raise DataFormatError(path, line_no, problem) from None
    text = raw.strip()
    if not text:
        return None
    try:
        obj: Any = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(path, line_no, f"invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:  # "[[[[..." 100k deep: the decoder recurses once per level
        raise DataFormatError(path, line_no, "invalid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise DataFormatError(path, line_no, f"expected a JSON object, got {type(obj).__name__}")
    if _SURROGATE_ESCAPE.search(text):
        where = lone_surrogate_path(obj)
        if where is not None:
            raise DataFormatError(path, line_no, f"lone UTF-16 surrogate escape in {where} (text that "
                                                 "cannot be encoded as UTF-8)")
    return obj


#: ``\ud800``-``\udfff`` escapes: the only way a lone surrogate gets into decoded JSON (raw bytes
#: of one are invalid UTF-8 and fail earlier).  A valid escaped pair decodes to one character, so
#: only the rare line with such an escape is walked.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _has_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def lone_surrogate_path(obj: Any) -> str | None:
    """Where in ``obj`` a string (value or key) holds a lone surrogate, e.g. ``conversations[0].content``.

    The tokenizer cannot encode such text (it raises deep inside a worker), so it is a data error of
    the line.  Iterative, because the JSON may be nested as deep as the decoder allowed.
    """
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if _has_surrogate(value):
                return where or "the line"
        elif isinstance(value, dict):
            for k, v in value.items():
                if _has_surrogate(k):
                    return f"a key of {where or 'the object'}"
                stack.append((v, f"{where}.{k}" if where else k))
        elif isinstance(value, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(value))
    return None


def iter_jsonl_raw(path: str | os.PathLike, start_line: int = 1) -> Iterator[tuple[int, bytes, int]]:
    """Yield ``(line_no, raw_bytes, bytes_consumed)`` for each line from ``start_line`` on.

    ``bytes_consumed`` is the length of the raw line including its newline, so that callers can
    advance a progress bar by bytes without an extra ``tell()``.  A UTF-8 byte order mark at the
    start of the file is removed from line 1 (but still counted in its ``bytes_consumed``).
    """
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no < start_line:
                continue
            size = len(raw)
            if line_no == 1 and raw.startswith(UTF8_BOM):
                raw = raw[len(UTF8_BOM):]
            yield line_no, raw, size


def iter_jsonl(path: str | os.PathLike, skip_bad_lines: bool = False, start_line: int = 1,
               stats: SkipStats | None = None, warn: bool = True,
               end_line: int | None = None) -> Iterator[tuple[int, dict]]:
    """Stream ``(line_no, object)`` pairs from a JSONL file without loading it whole.

    With ``skip_bad_lines=False`` the first malformed line raises :class:`DataFormatError`.  With
    ``True`` bad lines are counted (into ``stats`` when given) and a single summary warning is
    emitted when the iteration finishes.  ``start_line`` (1-based) skips earlier lines, which lets a
    consumer resume in the middle of a file while keeping true line numbers in messages, and
    ``end_line`` (inclusive) stops before reading further, so a line past it is never parsed.
    ``warn=False`` leaves the summary to a caller that adds its own bad rows to ``stats`` (e.g.
    rows that are valid JSON but lack the fields it needs) and reports everything once.
    """
    path = Path(path)
    stats = stats if stats is not None else SkipStats()
    for line_no, raw, _ in iter_jsonl_raw(path, start_line):
        if end_line is not None and line_no > end_line:
            break
        try:
            obj = parse_jsonl_line(raw, path, line_no)
        except DataFormatError as err:
            if not skip_bad_lines:
                raise
            stats.add(err)
            continue
        if obj is not None:
            yield line_no, obj
    if warn:
        stats.warn(path)
