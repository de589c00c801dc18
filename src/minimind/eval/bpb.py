"""Bits per byte: a tokenizer-independent measure of how well a model predicts held-out text.

Two entry points share one definition.  :func:`evaluate_bpb` scores the packed shard datasets of
the training pipeline (the demo's held-out check); there

``bpb = sum_i -log2 p(y_i | x_<=i) / sum_i bytes(y_i)``

over every predicted token ``y_i``, where ``bytes(y)`` is the UTF-8 length of the token's text
(special tokens count 0 bytes and are not scored).  The unigram baseline replaces the model with
token frequencies from the training data.

:func:`evaluate_bpb_jsonl` (``minimind eval bpb``) streams any pretrain-format JSONL file
(``{"text": ...}`` rows).  Each document is ``<|im_start|>`` + its tokens, as pretraining sees it;
every text token is scored (the BOS only serves as context, the EOS is not predicted, so the score
measures the text alone) and

``bpb = (sum of token NLL in nats) / (ln 2 * sum of UTF-8 bytes of the documents)``,
``perplexity = exp(sum of token NLL / number of scored tokens)``.

Byte-level BPE is lossless, so the scored tokens spell exactly the document's bytes and the
denominator does not depend on the tokenizer: models with different vocabularies compare fairly
(perplexity does not, it is per token).  A document longer than the context is scored with a
sliding window (:func:`window_slices`): every token exactly once, with up to ``window - 1`` tokens
of context, consecutive windows advancing by ``stride`` tokens.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minimind.data.formats import pretrain_text
from minimind.data.jsonl import DataFormatError, iter_jsonl
from minimind.tokenizer.byte_level import byte_decoder


def token_byte_lengths(tokenizer: Any) -> np.ndarray:
    """UTF-8 byte length of every token id (0 for special tokens)."""
    dec = byte_decoder()
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


# ---- any pretrain-format JSONL: minimind eval bpb -------------------------------------------------
#: Positions per chunk of the vocabulary projection is ``LOGIT_BUDGET // vocab``: scoring never holds
#: more than ~64M logits at once, whatever the batch, the context or the vocabulary.
LOGIT_BUDGET = 1 << 26


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def final_hidden(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                 doc_ids: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                 attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Final (normed) hidden states ``[B, T, H]``; the decoder runs with ``logits_to_keep=1`` so
    no position is projected onto the vocabulary that the caller does not ask for.  ``attn_mask``
    (bool ``[B, 1, T, T]``, True = attend) or ``doc_ids`` replace the plain causal mask."""
    with _autocast(input_ids.device, dtype):
        out = model(input_ids, position_ids=position_ids, attn_mask=attn_mask, doc_ids=doc_ids,
                    logits_to_keep=1)
    return out.hidden_states


@torch.no_grad()
def gather_logprobs(model: nn.Module, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``log_softmax(lm_head(hidden))`` at token ids ``index`` (``[N, K]``) for ``hidden [N, H]``:
    float32 ``[N, K]``.

    The projection runs in float32 even when the decoder ran under bf16/fp16 autocast: half-precision
    logits keep ~3 significant digits, which would move a bits-per-byte figure in its third decimal.
    It runs in chunks of ``LOGIT_BUDGET // vocab`` rows.
    """
    weight = model.lm_head.weight
    step = max(1, LOGIT_BUDGET // weight.shape[0])
    out = torch.empty(index.shape, dtype=torch.float32, device=hidden.device)
    for i in range(0, hidden.shape[0], step):
        logits = F.linear(hidden[i:i + step].float(), weight.float())
        out[i:i + step] = torch.log_softmax(logits, dim=-1).gather(1, index[i:i + step])
    return out


@torch.no_grad()
def target_logprobs(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor,
                    position_ids: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """``log p(targets[b, t] | input_ids[b, :t+1])`` as float32 ``[B, T]``; 0 where ``targets == -100``.

    One decoder pass, then the vocabulary projection and a float32 log-softmax only at the wanted
    positions.  Shared by bits-per-byte and multiple-choice scoring.
    """
    hidden = final_hidden(model, input_ids, position_ids, doc_ids, dtype)
    want = targets != -100
    result = torch.zeros(targets.shape, dtype=torch.float32, device=input_ids.device)
    result[want] = gather_logprobs(model, hidden[want], targets[want][:, None])[:, 0]
    return result


def iter_pretrain_texts(path: str | Path, max_docs: int | None = None) -> Iterator[tuple[int, str]]:
    """``(line, text)`` of a pretrain JSONL file, streamed; a row without a non-empty ``text``
    string is a :class:`DataFormatError` at ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if max_docs is not None and max_docs <= 0:
        return
    n = 0
    for line_no, row in iter_jsonl(path):
        try:
            text = pretrain_text(row)
        except ValueError as e:
            raise DataFormatError(path, line_no, str(e)) from None
        yield line_no, text
        n += 1
        if max_docs is not None and n >= max_docs:
            return


def window_slices(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """How a sequence of ``n_tokens`` ids (position 0 = BOS, never a target) is scored.

    Returns ``(begin, end, skip)`` slices: the model reads ``ids[begin:end-1]`` and predicts
    ``ids[begin+1:end]``, of which the first ``skip`` are already scored by an earlier slice.  The
    first slice is the first ``window`` ids; each next one ends ``stride`` ids later (or at the end)
    and starts ``window`` ids before its end.  So every target ``j >= 1`` is scored exactly once,
    with ``j - begin`` tokens of context: at most ``window - 1`` and, after the first slice, at
    least ``window - stride``.  A sequence that fits is one slice, the plain score.
    """
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    if not 1 <= stride <= window - 1:
        raise ValueError(f"stride must be between 1 and window - 1 = {window - 1}, got {stride}")
    if n_tokens <= window:
        return [(0, n_tokens, 0)]
    out = [(0, window, 0)]
    nxt = window
    while nxt < n_tokens:
        end = min(nxt + stride, n_tokens)
        begin = end - window
        out.append((begin, end, nxt - begin - 1))
        nxt = end
    return out


def _score_pieces(model: nn.Module, pieces: list[tuple[list[int], int]], pad_id: int,
                  batch_size: int, dtype: torch.dtype | None) -> tuple[float, int]:
    """Sum of target NLL (nats) and number of scored targets over ``(ids, skip)`` pieces."""
    device = next(model.parameters()).device
    pieces = sorted(pieces, key=lambda p: len(p[0]))  # similar lengths share a batch: less padding
    nats, count = 0.0, 0
    for start in range(0, len(pieces), batch_size):
        chunk = pieces[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk) - 1
        inp = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        tgt = torch.full((len(chunk), width), -100, dtype=torch.long)
        for r, (ids, skip) in enumerate(chunk):
            n = len(ids) - 1
            inp[r, :n] = torch.tensor(ids[:-1])
            tgt[r, skip:n] = torch.tensor(ids[1 + skip:])
        # Right padding with plain causal attention: real positions never see the pads after them.
        tgt = tgt.to(device)
        lp = target_logprobs(model, inp.to(device), tgt, dtype=dtype)
        nats -= float(lp.sum())
        count += int((tgt != -100).sum())
    return nats, count


@torch.no_grad()
def bpb_of_texts(model: nn.Module, tokenizer: Any, texts: Iterable[str], batch_size: int = 8,
                 window: int | None = None, stride: int | None = None, dtype: torch.dtype | None = None,
                 progress: bool = False) -> dict[str, float]:
    """Bits per byte and perplexity of ``model`` on ``texts`` (see the module docstring).

    ``window`` (tokens per slice, BOS included; default ``max_position_embeddings``) and ``stride``
    (default ``window // 2``) set the sliding window for documents longer than ``window``.
    Documents are tokenized and scored in groups, so memory does not grow with the input.
    """
    from tqdm import tqdm

    max_pos = int(model.config.max_position_embeddings)
    window = int(window or max_pos)
    if window - 1 > max_pos:
        raise ValueError(f"window {window} needs {window - 1} positions but the model has "
                         f"{max_pos} (max_position_embeddings)")
    stride = int(stride or max(1, window // 2))
    window_slices(window + 1, window, stride)  # validates window / stride before any work
    bos = tokenizer.bos_id
    pad = tokenizer.pad_id
    was_training = model.training
    model.eval()
    nats, tokens, n_bytes, docs, split = 0.0, 0, 0, 0, 0
    pending: list[tuple[list[int], int]] = []
    group: list[str] = []

    def flush_group() -> None:
        nonlocal n_bytes, docs, split
        for text, ids in zip(group, tokenizer.encode_batch(group)):
            seq = [bos, *ids]
            slices = window_slices(len(seq), window, stride)
            split += len(slices) > 1
            pending.extend((seq[b:e], skip) for b, e, skip in slices)
            n_bytes += len(text.encode("utf-8"))
            docs += 1
        group.clear()

    def flush_pending() -> None:
        nonlocal nats, tokens
        s, c = _score_pieces(model, pending, pad, batch_size, dtype)
        nats += s
        tokens += c
        pending.clear()

    try:
        for text in tqdm(texts, desc="bpb", unit="doc", disable=None, leave=False) if progress else texts:
            group.append(text)
            if len(group) >= 64:
                flush_group()
            if len(pending) >= 8 * batch_size:
                flush_pending()
        if group:
            flush_group()
        if pending:
            flush_pending()
    finally:
        model.train(was_training)
    if docs == 0:
        raise ValueError("no documents to score")
    return {"bpb": nats / (math.log(2) * max(n_bytes, 1)), "perplexity": math.exp(nats / max(tokens, 1)),
            "loss": nats / max(tokens, 1), "bits_per_token": nats / math.log(2) / max(tokens, 1),
            "bytes_per_token": n_bytes / max(tokens, 1), "nats": nats, "tokens": tokens, "bytes": n_bytes,
            "docs": docs, "docs_windowed": split, "window": window, "stride": stride}


def evaluate_bpb_jsonl(model: nn.Module, tokenizer: Any, path: str | Path, batch_size: int = 8,
                       max_docs: int | None = None, window: int | None = None, stride: int | None = None,
                       dtype: torch.dtype | None = None, progress: bool = False) -> dict[str, float]:
    """:func:`bpb_of_texts` over the first ``max_docs`` documents (all by default) of a pretrain
    JSONL file, read one line at a time."""
    texts = (text for _, text in iter_pretrain_texts(path, max_docs))
    return bpb_of_texts(model, tokenizer, texts, batch_size=batch_size, window=window, stride=stride,
                        dtype=dtype, progress=progress)
