"""DPO preference pairs: JSONL -> tokenised shards -> pair-packed batches.

Rendering.  Each side of a pair is rendered exactly as SFT renders a conversation (same chat
template call, no tools) but *without* the SFT augmentations: no random system prompt, and empty
``<think>`` blocks are kept as the template emits them.  The reference draws the empty-think
stripping independently for chosen and rejected, so the two sides of a pair could render different
prompts; here both sides always render the same prompt bytes, and that is checked on the token ids.

Loss mask.  Only the *final* assistant turn is trained: its body through ``<|im_end|>\\n`` (the SFT
span rule of :mod:`minimind.data.sft`).  Earlier assistant turns belong to the shared prompt; their
log-probabilities are identical for both sides and would cancel in the DPO log-ratio anyway, so
masking them only removes noise from logged rewards.

Shards.  A normal shard folder (:mod:`minimind.data.store`, meta ``kind = "dpo"``) whose documents
alternate: document ``2i`` is the chosen side of pair ``i``, ``2i + 1`` its rejected side.  Each side
is cut to ``max_len`` tokens like the reference; a pair whose prompt alone fills ``max_len`` keeps
no response token on some side (it still loads, but teaches nothing on that side) and is counted in
the meta as ``no_response_pairs``; ``truncated_pairs`` counts pairs with any side cut.

Batches.  :class:`DPODataset` packs *pairs*, not sides, into rows of ``seq_len + 1`` tokens with the
SFT best-fit packer, so both sides of a pair always sit in the same row (hence in the same
micro-batch, which the DPO loss needs).  Each pair is laid out as two attention segments, chosen then
rejected, with positions restarting at 0; :class:`PairBatch` carries ``seq_index`` to sum token
log-probabilities per side (:func:`minimind.train.losses.sequence_logps`).
"""

from __future__ import annotations

import os
import random
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from .formats import Message, dpo_pair
from .jsonl import SkipStats
from .packing import PAD_DOC, PackPlan, pack_rows, shifted_targets
from .sft import MaskMarkers, assistant_mask, render_sft_text
from .shards import (ShardInfo, _Chunk, _load_tokenizer, _source_fingerprint, _tokenized_chunks,
                     _usable_cpus, check_usable, checked_chunks, render_lines, reuse_or_build,
                     tokenizer_key)
from .store import SHARD_VERSION, ShardReader, ShardWriter, ids_dtype

__all__ = ["PairTokens", "tokenize_pair", "prepare_dpo_shards", "load_or_prepare_dpo_shards",
           "PairBatch", "DPODataset", "fit_pair_lengths"]

#: Bumped whenever rendering/masking of DPO shards changes, so that old caches are rebuilt.
DPO_LAYOUT = 1


# ------------------------------------------------------------------------------ tokenisation
class PairTokens(NamedTuple):
    """One tokenised pair: ids and 0/1 loss masks per side, shared prompt length, cut flags."""

    chosen_ids: list[int]
    chosen_mask: list[int]
    rejected_ids: list[int]
    rejected_mask: list[int]
    prompt_len: int  # tokens before the final assistant body (same on both sides, before any cut)
    truncated: bool  # some side was cut to max_len
    no_response: bool  # some side kept no response token after the cut


def render_dpo_text(tokenizer: Any, messages: list[Message]) -> str:
    """The SFT rendering of one side, augmentation off (see module docstring)."""
    # With add_system_ratio=0 and empty_think_ratio=1 the rng draws cannot change the text.
    return render_sft_text(tokenizer, messages, None, random.Random(0), add_system_ratio=0.0,
                           empty_think_ratio=1.0)


def final_body_start(ids: Sequence[int], markers: MaskMarkers) -> int:
    """Index of the first token of the final assistant body (just after the last start marker)."""
    start, n = markers.start, len(markers.start)
    for i in range(len(ids) - n, -1, -1):
        if ids[i] == start[0] and list(ids[i:i + n]) == start:
            return i + n
    raise ValueError("rendered conversation has no assistant turn marker")


def _label_side(ids: list[int], body: int, markers: MaskMarkers,
                max_len: int | None) -> tuple[list[int], list[int]]:
    """Cut to ``max_len`` and mask the final assistant span only (SFT span rule from ``body`` on)."""
    if max_len is not None:
        ids = ids[:max_len]
    mask = assistant_mask(ids, markers)
    mask[:body] = [0] * min(body, len(mask))
    return ids, mask


def label_pair(chosen_ids: list[int], rejected_ids: list[int], markers: MaskMarkers,
               max_len: int | None = None) -> PairTokens:
    """Masks and cut of an already-encoded pair; ValueError if the prompts' ids differ."""
    bc, br = final_body_start(chosen_ids, markers), final_body_start(rejected_ids, markers)
    if bc != br or chosen_ids[:bc] != rejected_ids[:br]:
        raise ValueError("'chosen' and 'rejected' render different prompt tokens")
    c_ids, c_mask = _label_side(chosen_ids, bc, markers, max_len)
    r_ids, r_mask = _label_side(rejected_ids, br, markers, max_len)
    truncated = max_len is not None and max(len(chosen_ids), len(rejected_ids)) > max_len
    no_response = not (any(c_mask) and any(r_mask))
    return PairTokens(c_ids, c_mask, r_ids, r_mask, bc, truncated, no_response)


def tokenize_pair(tokenizer: Any, chosen: list[Message], rejected: list[Message],
                  max_len: int | None = None, markers: MaskMarkers | None = None) -> PairTokens:
    """Render, tokenise and label one pair (the output of :func:`~minimind.data.formats.dpo_pair`).

    Raises ValueError if the two sides do not share the identical prompt token prefix (everything
    before the final assistant body).  Pass precomputed ``markers`` when calling in a loop.
    """
    markers = markers or MaskMarkers(tokenizer)
    ids = tokenizer.encode_batch([render_dpo_text(tokenizer, chosen),
                                  render_dpo_text(tokenizer, rejected)])
    return label_pair(list(ids[0]), list(ids[1]), markers, max_len)


# ------------------------------------------------------------------------------ shard workers
@dataclass
class _PairChunk(_Chunk):
    """A tokenised chunk of pairs (documents alternate chosen/rejected) plus cut statistics."""

    truncated: int = 0
    no_response: int = 0


class PairChunkTokenizer:
    """Turns ``(line_no, raw_line)`` lists into concatenated pair documents; one per process."""

    def __init__(self, tokenizer: Any, src: str, max_len: int | None) -> None:
        self.tok, self.src, self.max_len = tokenizer, src, max_len
        self.dtype = ids_dtype(tokenizer.vocab_size)
        self.markers = MaskMarkers(tokenizer)

    def _texts(self, obj: dict) -> tuple[str, str]:
        chosen, rejected = dpo_pair(obj)
        try:
            return render_dpo_text(self.tok, chosen), render_dpo_text(self.tok, rejected)
        except Exception as e:  # template errors on odd-but-valid JSON shapes are data errors
            raise ValueError(f"cannot render conversation: {type(e).__name__}: {e}") from None

    def __call__(self, lines: list[tuple[int, bytes]]) -> _PairChunk:
        pairs, line_nos, errors = render_lines(lines, self.src, lambda obj, _line_no: self._texts(obj))
        texts = [text for pair in pairs for text in pair]
        encoded = self.tok.encode_batch(texts) if texts else []
        ids_parts: list[list[int]] = []
        mask_parts: list[list[int]] = []
        truncated = no_response = 0
        for k, line_no in enumerate(line_nos):
            try:
                pair = label_pair(list(encoded[2 * k]), list(encoded[2 * k + 1]), self.markers,
                                  self.max_len)
            except ValueError as e:
                errors.append((line_no, str(e)))
                continue
            ids_parts += [pair.chosen_ids, pair.rejected_ids]
            mask_parts += [pair.chosen_mask, pair.rejected_mask]
            truncated += pair.truncated
            no_response += pair.no_response
        errors.sort()
        lengths = np.array([len(d) for d in ids_parts], dtype=np.int64)
        ids = np.array([t for d in ids_parts for t in d], dtype=self.dtype)
        mask = np.array([m for d in mask_parts for m in d], dtype=np.uint8)
        return _PairChunk(ids, lengths, mask, errors, truncated=truncated, no_response=no_response)


# ------------------------------------------------------------------------------ build / cache
def _dpo_settings(skip_bad_lines: bool, max_len: int | None) -> dict:
    """The build settings that change the shard content."""
    return {"skip_bad_lines": bool(skip_bad_lines), "max_len": max_len, "layout": DPO_LAYOUT}


def prepare_dpo_shards(data_path: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: Any,
                       max_len: int | None, num_proc: int = 0, skip_bad_lines: bool = False,
                       progress: bool = True) -> ShardInfo:
    """Tokenise a DPO JSONL file into ``out_dir`` (replaced atomically); see module docstring.

    ``tokenizer`` is a :class:`~minimind.tokenizer.MiniMindTokenizer` or its folder; ``num_proc=0``
    uses every CPU.  Lines are validated with :func:`~minimind.data.formats.dpo_pair`; a bad line
    raises :class:`DataFormatError` (``file:line: problem``, nothing left behind) unless
    ``skip_bad_lines``, which counts it into the meta and warns once.  ``n_docs`` of the result is
    twice the number of pairs.
    """
    from tqdm.auto import tqdm

    data_path, out_dir = Path(data_path), Path(out_dir)
    if max_len is not None and max_len < 1:
        raise ValueError("max_len must be positive")
    tok = _load_tokenizer(tokenizer)
    num_proc = num_proc or _usable_cpus()
    source = _source_fingerprint(data_path)
    stats = SkipStats()
    n_pairs = truncated = no_response = 0
    bar = tqdm(total=source["size"], unit="B", unit_scale=True, disable=not progress,
               desc=f"tokenizing {data_path.name}")
    chunks = _tokenized_chunks(data_path, tok, (str(data_path), max_len), num_proc,
                               worker_cls=PairChunkTokenizer)
    with ShardWriter(out_dir, ids_dtype(tok.vocab_size)) as writer, bar, closing(chunks):
        for chunk in checked_chunks(chunks, data_path, skip_bad_lines, stats):
            writer.append(chunk.ids, chunk.lengths, chunk.mask)
            n_pairs += len(chunk.lengths) // 2
            truncated += chunk.truncated
            no_response += chunk.no_response
            bar.update(chunk.n_bytes)
        check_usable(data_path, n_pairs, stats)
        meta = writer.commit({
            "kind": "dpo", "source": source, "tokenizer": tokenizer_key(tok),
            "vocab_size": tok.vocab_size, "settings": _dpo_settings(skip_bad_lines, max_len),
            "n_pairs": n_pairs, "truncated_pairs": truncated, "no_response_pairs": no_response,
            "skipped_lines": stats.count, "skipped_examples": stats.locations,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
        })
    stats.warn(data_path)
    return ShardInfo(out_dir, "dpo", meta["n_docs"], meta["n_tokens"], stats.count, reused=False,
                     meta=meta)


def load_or_prepare_dpo_shards(data_path: str | os.PathLike, out_dir: str | os.PathLike,
                               tokenizer: Any, max_len: int | None, num_proc: int = 0,
                               skip_bad_lines: bool = False, progress: bool = True) -> ShardInfo:
    """Reuse ``out_dir`` if built from the same source (path/size/mtime), tokenizer and settings,
    else rebuild it with :func:`prepare_dpo_shards` (same arguments)."""
    tok = _load_tokenizer(tokenizer)
    want = {"version": SHARD_VERSION, "kind": "dpo",
            "source": _source_fingerprint(Path(data_path)), "tokenizer": tokenizer_key(tok),
            "settings": _dpo_settings(skip_bad_lines, max_len)}
    return reuse_or_build(out_dir, "dpo", want, lambda: prepare_dpo_shards(
        data_path, out_dir, tok, max_len, num_proc=num_proc, skip_bad_lines=skip_bad_lines,
        progress=progress))


# ------------------------------------------------------------------------------ pair batches
@dataclass
class PairBatch:
    """``B`` packed rows of ``T`` tokens holding whole preference pairs.

    ``input_ids``, ``targets``, ``position_ids``, ``doc_ids`` mean what they mean in
    :class:`minimind.data.Batch` (targets only on the final assistant response, never across a
    segment; each side is its own segment, padding too).  ``seq_index`` [B, T] long: the sequence
    of each position within the batch, ``2p`` = chosen and ``2p + 1`` = rejected side of the
    batch's pair ``p``, ``-1`` for padding.  ``pair_ids`` [P] long: global pair numbers (document
    ``2 * pair_id`` of the shards is the chosen side), e.g. to cache reference log-probabilities.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor
    doc_ids: torch.Tensor
    seq_index: torch.Tensor
    pair_ids: torch.Tensor
    num_pairs: int
    num_target_tokens: int
    num_real_tokens: int

    @property
    def num_seqs(self) -> int:
        """``2 * num_pairs``: the ``n_seq`` to pass to ``sequence_logps``."""
        return 2 * self.num_pairs

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PairBatch":
        """A copy with every tensor on ``device``."""
        move = (lambda t: t.to(device, non_blocking=non_blocking))
        return PairBatch(move(self.input_ids), move(self.targets), move(self.position_ids),
                         move(self.doc_ids), move(self.seq_index), move(self.pair_ids),
                         self.num_pairs, self.num_target_tokens, self.num_real_tokens)

    def pin_memory(self) -> "PairBatch":
        """Page-locked host copy, so that ``to(cuda, non_blocking=True)`` overlaps with compute."""
        return PairBatch(self.input_ids.pin_memory(), self.targets.pin_memory(),
                         self.position_ids.pin_memory(), self.doc_ids.pin_memory(),
                         self.seq_index.pin_memory(), self.pair_ids.pin_memory(),
                         self.num_pairs, self.num_target_tokens, self.num_real_tokens)


def fit_pair_lengths(chosen: np.ndarray, rejected: np.ndarray,
                     row_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Side lengths after fitting each pair into one row of ``row_len`` tokens.

    Pairs that fit are untouched.  Otherwise a side no longer than half the row keeps its length
    and the other side gets the rest; if both are longer, each gets half the row.  Sides are cut at
    the end, like the reference's ``max_length`` truncation.
    """
    c, r = np.asarray(chosen, np.int64), np.asarray(rejected, np.int64)
    half = row_len // 2
    over = c + r > row_len
    c_fit = np.where(c <= half, c, np.where(r <= row_len - half, row_len - r, half))
    r_fit = row_len - c_fit
    return np.where(over, c_fit, c), np.where(over, r_fit, r)


def keeps_response(shards: ShardReader, side_lens: np.ndarray) -> np.ndarray:
    """``[n_pairs, 2]`` bool: does side ``s`` of pair ``p`` keep a trained token in its first
    ``side_lens[p, s]`` tokens?  Vectorised: the first masked-in token of each document is found
    by one ``searchsorted`` over the positions of all masked-in tokens."""
    starts = np.asarray(shards.offsets[:-1], np.int64)
    trained = np.flatnonzero(np.asarray(shards.mask))
    k = np.searchsorted(trained, starts)
    if not len(trained):
        return np.zeros((len(starts) // 2, 2), bool)
    first = np.where(k < len(trained), trained[np.minimum(k, len(trained) - 1)], np.iinfo(np.int64).max)
    limit = starts + np.asarray(side_lens, np.int64).reshape(-1)
    return (first < limit).reshape(-1, 2)


class DPODataset:
    """Deterministic :class:`PairBatch` es of packed pairs from a ``kind = "dpo"`` shard folder.

    ``get_batch(epoch, rows)`` depends only on ``(seed, epoch, rows)`` (the plan is
    :func:`~minimind.data.packing.pack_rows` in ``"sft"`` mode over pair lengths, cached for the
    latest epoch), so an exact resume needs only ``(epoch, next row)``.  ``drop_cut_pairs`` leaves
    out the pairs whose response ``seq_len`` cuts away entirely on a side (training does that;
    evaluations that want every pair's log-probs keep them).
    """

    def __init__(self, shards: ShardReader, seq_len: int, seed: int, pool_size: int = 1000,
                 pad_id: int | None = None, drop_cut_pairs: bool = False) -> None:
        if shards.kind != "dpo":
            raise ValueError(f"DPODataset needs 'dpo' shards, got kind {shards.kind!r}")
        if len(shards) % 2:
            raise ValueError(f"{shards.out_dir}: odd number of documents in a DPO shard folder")
        if seq_len < 2:
            raise ValueError("seq_len must be at least 2")
        self.shards = shards
        self.seq_len = int(seq_len)
        self.row_len = self.seq_len + 1
        self.seed = int(seed)
        self.pool_size = pool_size
        self.pad_id = int(pad_id if pad_id is not None else shards.meta.get("pad_id", 0))
        lengths = np.asarray(shards.lengths, np.int64)
        self.side_lens = np.stack(fit_pair_lengths(lengths[0::2], lengths[1::2], self.row_len), 1)
        #: pair numbers that are packed into rows: all, or with ``drop_cut_pairs`` those that keep
        #: at least one response token on both sides after the fit.  A pair cut before a response
        #: has margin 0 on every step: loss log 2, zero gradient, yet it counts in the mean.
        keep = (keeps_response(shards, self.side_lens).all(1) if drop_cut_pairs
                else np.ones(len(self.side_lens), bool))
        self.kept = np.flatnonzero(keep)
        self._plan_epoch: int | None = None
        self._plan: PackPlan | None = None

    @property
    def num_pairs(self) -> int:
        """Pairs in the shards (``pair_ids`` of batches index these)."""
        return len(self.side_lens)

    @property
    def num_dropped_pairs(self) -> int:
        """Pairs left out (``drop_cut_pairs``) because ``seq_len`` cuts a side's whole response."""
        return len(self.side_lens) - len(self.kept)

    @property
    def num_cut_pairs(self) -> int:
        """Pairs shortened to fit one row (``seq_len`` below the longest pair's length)."""
        lengths = np.asarray(self.shards.lengths, np.int64)
        return int((self.side_lens.sum(1) < lengths[0::2] + lengths[1::2]).sum())

    def plan(self, epoch: int) -> PackPlan:
        """The packing plan of ``epoch`` (segments are whole pairs; cached for the current epoch)."""
        if self._plan_epoch != epoch or self._plan is None:
            self._plan = pack_rows(self.side_lens[self.kept].sum(1), self.row_len, self.seed, epoch, "sft",
                                   self.pool_size)
            self._plan_epoch = epoch
        return self._plan

    def num_rows(self, epoch: int) -> int:
        return self.plan(epoch).n_rows

    def get_batch(self, epoch: int, row_indices: Sequence[int]) -> PairBatch:
        """Batch of the given plan rows; targets as in ``PackedDataset.get_batch``: for position
        ``i``, ``tok[i + 1]`` if ``i + 1`` is in the same segment and masked in, else ignored."""
        plan = self.plan(epoch)
        B, L = len(row_indices), self.row_len
        tok = np.full((B, L), self.pad_id, np.int64)
        msk = np.zeros((B, L), np.uint8)
        seg = np.zeros((B, L), np.int32)
        pos = np.zeros((B, L), np.int64)
        seq = np.full((B, L), -1, np.int64)
        pair_ids: list[int] = []
        for b, r in enumerate(row_indices):
            r = int(r)
            if not 0 <= r < plan.n_rows:
                raise IndexError(f"row {r} out of range for epoch {epoch} ({plan.n_rows} rows)")
            o, j = 0, 0
            for s in range(int(plan.row_ptr[r]), int(plan.row_ptr[r + 1])):
                p, ln = int(plan.seg_doc[s]), int(plan.seg_len[s])
                if p == PAD_DOC:
                    seg[b, o:o + ln], pos[b, o:o + ln] = j, np.arange(ln)
                    o, j = o + ln, j + 1
                    continue
                p = int(self.kept[p])  # plan segment -> pair number in the shards
                for side in (0, 1):
                    n = int(self.side_lens[p, side])
                    ids, mask = self.shards.doc(2 * p + side)
                    sl = slice(o, o + n)
                    tok[b, sl], msk[b, sl] = ids[:n], mask[:n]
                    seg[b, sl], pos[b, sl], seq[b, sl] = j, np.arange(n), 2 * len(pair_ids) + side
                    o, j = o + n, j + 1
                pair_ids.append(p)
        targets, trained = shifted_targets(tok, msk, seg)
        as_t = (lambda a: torch.from_numpy(np.ascontiguousarray(a)))
        return PairBatch(
            input_ids=as_t(tok[:, :-1]), targets=as_t(targets), position_ids=as_t(pos[:, :-1]),
            doc_ids=as_t(seg[:, :-1]), seq_index=as_t(seq[:, :-1]),
            pair_ids=torch.tensor(pair_ids, dtype=torch.long), num_pairs=len(pair_ids),
            num_target_tokens=int(trained.sum()), num_real_tokens=int((seq[:, :-1] >= 0).sum()),
        )
