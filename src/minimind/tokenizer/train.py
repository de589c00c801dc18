"""Train a MiniMind-layout byte-level BPE tokenizer from text.

The released checkpoints use the reference tokenizer files; this trainer exists so a fresh
vocabulary (another language mix, another size) can be built with the *same* id layout: the 36
added tokens at ids 0..35 with the reference ``special`` flags, then the 256 byte symbols, then
merges. Differences from the reference trainer, on purpose:

* the pre-tokenizer splits with the Qwen2 regex before byte-level mapping (the reference uses the
  GPT-2 regex built into ``ByteLevel``). Qwen2's pattern keeps digits single and handles CJK and
  newlines better, and it is a pattern llama.cpp knows by name, so GGUF export can declare the
  pre-tokenizer as ``"qwen2"`` and get identical splitting in other runtimes.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from minimind.data.jsonl import DataFormatError, SkipStats, iter_jsonl
from minimind.tokenizer.special_tokens import ADDED_TOKENS
from minimind.tokenizer.tokenizer import MiniMindTokenizer

__all__ = ["QWEN2_PATTERN", "train_tokenizer", "iter_texts_from_jsonl", "build_untrained_tokenizer"]

#: Qwen2's pre-tokenization regex (contractions, letter runs with one optional leading
#: non-letter, single digits, punctuation runs, newline runs, whitespace).
QWEN2_PATTERN: str = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)


def build_untrained_tokenizer() -> Tokenizer:
    """An empty BPE tokenizer with MiniMind's pipeline (no normalizer, no post-processor)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _fix_added_token_flags(tok: Tokenizer) -> Tokenizer:
    """Rewrite the added-token table so ids 0..35 carry the reference ``special`` flags.

    ``BpeTrainer`` registers every token in ``special_tokens`` as special; ids 21-35 (<think>,
    <tool_call>, buffers) must be plain added tokens so that ``skip_special_tokens`` keeps them.
    Editing the serialised form is the only way the ``tokenizers`` API allows changing a flag.
    """
    data = json.loads(tok.to_str())
    by_id = {entry["id"]: entry for entry in data["added_tokens"]}
    for idx, (content, special) in enumerate(ADDED_TOKENS):
        entry = by_id.get(idx)
        if entry is None or entry["content"] != content:
            found = None if entry is None else entry["content"]
            raise RuntimeError(f"trained tokenizer has {found!r} at id {idx}, expected {content!r}")
        entry.update(special=special, normalized=False, lstrip=False, rstrip=False,
                     single_word=False)
    if len(by_id) != len(ADDED_TOKENS):
        raise RuntimeError(f"expected {len(ADDED_TOKENS)} added tokens, found {len(by_id)}")
    return Tokenizer.from_str(json.dumps(data, ensure_ascii=False))


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = 6400,
    show_progress: bool = True,
) -> MiniMindTokenizer:
    """Train byte-level BPE on ``texts``, save it to ``out_dir`` and return it.

    ``vocab_size`` counts the 36 added tokens and the 256 byte symbols, so it must exceed 292; a
    corpus too small to supply enough merges yields a smaller vocabulary (check ``vocab_size``).
    An empty corpus raises ``ValueError`` before anything is saved: BPE would otherwise
    "succeed" with the 292 reserved tokens and no merges, a useless tokenizer.
    """
    n_reserved = len(ADDED_TOKENS) + 256
    if vocab_size <= n_reserved:
        raise ValueError(f"vocab_size must exceed {n_reserved} (added tokens + byte alphabet)")
    tok = build_untrained_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        show_progress=show_progress,
        special_tokens=[content for content, _ in ADDED_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    seen = [0]

    def counted(items: Iterable[str]) -> Iterator[str]:
        for text in items:
            if text:
                seen[0] += 1
            yield text

    tok.train_from_iterator(counted(texts), trainer=trainer)
    if not seen[0]:
        raise ValueError("no training text: the corpus is empty (or every line was bad), "
                         "so there is nothing to learn merges from")
    tokenizer = MiniMindTokenizer(_fix_added_token_flags(tok))
    tokenizer.save(out_dir)
    return tokenizer


def _row_text(row: object) -> str | None:
    """Training text of one JSONL row, or ``None`` if the row has no usable shape."""
    if not isinstance(row, dict):
        return None
    text = row.get("text")
    if isinstance(text, str):
        return text
    conversations = row.get("conversations")
    if isinstance(conversations, list):
        parts = [
            m["content"]
            for m in conversations
            if isinstance(m, dict) and isinstance(m.get("content"), str) and m["content"]
        ]
        return "\n".join(parts)
    return None


def iter_texts_from_jsonl(path: str | Path, max_lines: int | None = None, *,
                          skip_bad_lines: bool = True) -> Iterator[str]:
    """Yield tokenizer-training text from a pretrain (``{"text"}``) or SFT (``{"conversations"}``)
    JSONL file, reading at most ``max_lines`` lines.

    Conversation rows contribute their non-empty message contents joined by newlines.  Reading
    goes through :func:`minimind.data.jsonl.iter_jsonl`, so the rules are those of the data
    loaders: a UTF-8 BOM is accepted, invalid UTF-8 / JSON and rows without a ``text`` or
    ``conversations`` field are :class:`DataFormatError` at ``file:line``.  With
    ``skip_bad_lines`` such lines are dropped and listed (first few ``file:line`` locations) in one
    warning at the end; without it the first one raises.

    The default stays ``True`` (this reader always tolerated a few bad rows in a tokenizer corpus);
    callers that mirror a ``--skip_bad_lines`` flag pass it explicitly.  A file that yields no text
    at all raises ``ValueError``: training on nothing would silently produce a merge-less tokenizer.
    """
    path = Path(path)
    stats = SkipStats()
    rows = iter_jsonl(path, skip_bad_lines=skip_bad_lines, stats=stats, warn=False,
                      end_line=max_lines)
    n_texts = 0
    try:
        for line_no, row in rows:
            text = _row_text(row)
            if text is None:
                err = DataFormatError(path, line_no, 'expected a "text" string or a "conversations" list')
                if not skip_bad_lines:
                    raise err
                stats.add(err)
                continue
            if text:
                n_texts += 1
                yield text
    finally:
        rows.close()
    if stats.count:
        more = ", ..." if stats.count > len(stats.locations) else ""
        warnings.warn(f"skipped {stats.count} malformed line(s) in {path}: "
                      + "; ".join(stats.locations) + more, RuntimeWarning, stacklevel=2)
    if not n_texts:
        what = f"all {stats.count} non-blank line(s) were bad" if stats.count else "it has no text"
        raise ValueError(f"no tokenizer training text in {path}: {what}")
