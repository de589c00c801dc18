"""The byte-level BPE alphabet: every byte is shown as one printable character.

A token's *text* cannot show a piece of a multi-byte character; its *bytes* can. Bits-per-byte needs
each token's byte length and the server's log-probs report each token's bytes, so both read them
back through this table (printable Latin-1 bytes stand for themselves, the other bytes are shifted to
U+0100 and up, in byte order — the GPT-2 ByteLevel convention the tokenizer uses).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """Printable character -> the byte it stands for."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shown = {b: chr(b) for b in keep}
    shift = 0
    for b in range(256):
        if b not in shown:
            shown[b] = chr(256 + shift)
            shift += 1
    return {c: b for b, c in shown.items()}


def token_bytes(tokenizer: Any, token_id: int) -> list[int]:
    """The raw bytes of one token; an added token such as ``<|im_end|>`` gives its UTF-8 bytes."""
    piece = tokenizer.id_to_token(token_id) or ""
    table = byte_decoder()
    if all(c in table for c in piece):
        return [table[c] for c in piece]
    return list(piece.encode("utf-8"))
