"""Bits per byte: a tokenizer-independent measure of how well a model predicts held-out text.

``bpb = sum_i -log2 p(y_i | x_<=i) / sum_i bytes(y_i)`` over every predicted token ``y_i``, where
``bytes(y)`` is the UTF-8 length of the token's text (special tokens count 0 bytes and are not
scored).  The unigram baseline replaces the model with token frequencies from the training data.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-to-unicode table used by ByteLevel BPE."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def token_byte_lengths(tokenizer: Any) -> np.ndarray:
    """UTF-8 byte length of every token id (0 for special tokens)."""
    dec = _byte_decoder()
    special = set(tokenizer.all_special_ids)
    out = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for i in range(tokenizer.vocab_size):
        if i in special:
            continue
        tok = tokenizer.id_to_token(i) or ""
        out[i] = len(tok) if all(c in dec for c in tok) else len(tok.encode("utf-8"))
    return out


def _scored(batch: Any, byte_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    valid = batch.targets != -100
    safe = batch.targets.clamp(min=0)
    nbytes = byte_len[safe] * valid
    return valid & (nbytes > 0), nbytes


@torch.no_grad()
def evaluate_bpb(model: nn.Module, dataset: Any, tokenizer: Any, batch_size: int = 8,
                 max_rows: int | None = None, device: torch.device | str = "cpu") -> dict[str, float]:
    """Bits per byte and mean token loss of ``model`` on every row of ``dataset`` (epoch 0)."""
    was_training = model.training
    model.eval()
    byte_len = torch.from_numpy(token_byte_lengths(tokenizer)).to(device)
    n_rows = dataset.num_rows(0) if max_rows is None else min(max_rows, dataset.num_rows(0))
    nats = total_bytes = tokens = 0.0
    for start in range(0, n_rows, batch_size):
        batch = dataset.get_batch(0, range(start, min(start + batch_size, n_rows))).to(device)
        logits = model(batch.input_ids, position_ids=batch.position_ids, doc_ids=batch.doc_ids).logits
        scored, nbytes = _scored(batch, byte_len)
        loss = F.cross_entropy(logits.float().transpose(1, 2), batch.targets.clamp(min=0), reduction="none")
        nats += float((loss * scored).sum())
        total_bytes += float((nbytes * scored).sum())
        tokens += float(scored.sum())
    model.train(was_training)
    return {"bpb": nats / math.log(2) / max(total_bytes, 1.0), "loss": nats / max(tokens, 1.0),
            "tokens": tokens, "bytes": total_bytes}


def unigram_bpb(train_ids: np.ndarray, dataset: Any, tokenizer: Any, max_rows: int | None = None,
                batch_size: int = 64) -> float:
    """bpb of a unigram model (add-one smoothed token frequencies of ``train_ids``) on ``dataset``."""
    counts = np.bincount(train_ids.astype(np.int64), minlength=tokenizer.vocab_size).astype(np.float64) + 1.0
    logp = torch.from_numpy(np.log2(counts / counts.sum()))
    byte_len = torch.from_numpy(token_byte_lengths(tokenizer))
    n_rows = dataset.num_rows(0) if max_rows is None else min(max_rows, dataset.num_rows(0))
    bits = total_bytes = 0.0
    for start in range(0, n_rows, batch_size):
        batch = dataset.get_batch(0, range(start, min(start + batch_size, n_rows)))
        scored, nbytes = _scored(batch, byte_len)
        bits += float((-logp[batch.targets.clamp(min=0)] * scored).sum())
        total_bytes += float((nbytes * scored).sum())
    return bits / max(total_bytes, 1.0)
