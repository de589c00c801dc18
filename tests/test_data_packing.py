"""Best-fit packing: coverage, full rows, BOS alignment, positions, targets, masks, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minimind.data import IGNORE_INDEX, PackedDataset, ShardReader, pack_rows, write_docs

BOS = 1


def make_shards(tmp_path, lengths, kind: str = "pretrain", mask_fn=None) -> tuple[ShardReader, dict]:
    """Docs ``[BOS, u, u+1, ...]`` with globally unique ``u`` so every token identifies (doc, offset).

    Returns the reader and ``where``: token value -> (doc, offset) for the non-BOS tokens.
    """
    docs, where, nxt = [], {}, 10
    for d, n in enumerate(lengths):
        ids = [BOS] + list(range(nxt, nxt + n - 1))
        for o, t in enumerate(ids[1:], start=1):
            where[t] = (d, o)
        nxt += n - 1
        docs.append((ids, None if mask_fn is None else mask_fn(d, n)))
    write_docs(tmp_path / "shards", docs, kind=kind, vocab_size=nxt + 1, pad_id=0)
    return ShardReader(tmp_path / "shards"), where


def all_batches(ds: PackedDataset, epoch: int, bs: int = 7):
    n = ds.num_rows(epoch)
    for s in range(0, n, bs):
        yield ds.get_batch(epoch, range(s, min(n, s + bs)))


@pytest.fixture
def pretrain(tmp_path):
    rng = np.random.default_rng(3)
    lengths = np.concatenate([rng.integers(2, 60, 300), rng.integers(60, 200, 30), [1, 2, 129, 500]])
    reader, where = make_shards(tmp_path, lengths)
    return reader, where, lengths


def test_plan_tiles_every_document_exactly_once(pretrain) -> None:
    reader, _, lengths = pretrain
    plan = pack_rows(reader.lengths, 65, seed=0, epoch=0, mode="pretrain")
    row_sums = np.add.reduceat(plan.seg_len, plan.row_ptr[:-1])
    assert (row_sums == 65).all()
    real = plan.seg_doc >= 0
    for d in range(len(lengths)):
        segs = np.flatnonzero(plan.seg_doc == d)
        starts, lens = plan.seg_start[segs], plan.seg_len[segs]
        order = np.argsort(starts)
        ends = np.cumsum(lens[order])
        assert starts[order][0] == 0 and ends[-1] == lengths[d]
        assert (starts[order][1:] == ends[:-1]).all()
    # Only the very last row may hold padding, and only at its end.
    pad = np.flatnonzero(~real)
    assert len(pad) <= 1 and (len(pad) == 0 or pad[0] == len(plan.seg_doc) - 1)
    assert plan.seg_len[real].sum() == lengths.sum()


def test_batches_cover_every_token_once_with_full_rows(pretrain) -> None:
    reader, where, lengths = pretrain
    ds = PackedDataset(reader, seq_len=64, seed=1)
    seen: list[int] = []
    n_rows = ds.num_rows(0)
    for r in range(n_rows):
        tok, msk, seg, pos, _ = ds.get_rows(0, [r])
        if r < n_rows - 1:
            assert (msk == 1).all()  # pretrain: every slot is a real token, no padding
        seen.extend(tok[msk == 1].tolist())
    seen_arr = np.array(seen)
    assert (seen_arr == BOS).sum() == len(lengths)
    non_bos = np.sort(seen_arr[seen_arr != BOS])
    assert np.array_equal(non_bos, np.array(sorted(where)))  # each unique token exactly once


def test_rows_are_bos_aligned_unless_continuation(pretrain) -> None:
    reader, _, _ = pretrain
    ds = PackedDataset(reader, seq_len=64, seed=0)
    plan = ds.plan(0)
    first = plan.row_ptr[:-1]
    tok, _, _, pos, real = ds.get_rows(0, range(plan.n_rows))
    assert real[:-1].all() and real.sum() == reader.n_tokens
    fresh = plan.seg_start[first] == 0
    assert (tok[fresh, 0] == BOS).all() and (pos[fresh, 0] == 0).all()
    assert (tok[~fresh, 0] != BOS).all() and (pos[~fresh, 0] == plan.seg_start[first][~fresh]).all()
    assert fresh.mean() > 0.5


def test_positions_targets_and_doc_ids(pretrain) -> None:
    reader, where, _ = pretrain
    ds = PackedDataset(reader, seq_len=64, seed=0)
    for batch in all_batches(ds, 0):
        x, y, p, d = (batch.input_ids.numpy(), batch.targets.numpy(), batch.position_ids.numpy(),
                      batch.doc_ids.numpy())
        assert x.shape == (len(x), 64) and batch.input_ids.dtype == torch.long
        assert batch.doc_ids.dtype == torch.int32
        assert batch.num_target_tokens == int((y != IGNORE_INDEX).sum())
        for b in range(len(x)):
            for i in range(64):
                tok = int(x[b, i])
                if tok == 0:  # padding at the end of the final row
                    assert y[b, i] == IGNORE_INDEX and b == len(x) - 1
                    continue
                if tok == BOS:
                    assert p[b, i] == 0
                else:
                    assert p[b, i] == where[tok][1]  # position = offset within the document
                if i and d[b, i] == d[b, i - 1]:
                    assert p[b, i] == p[b, i - 1] + 1
                if i and d[b, i] != d[b, i - 1]:
                    assert y[b, i - 1] == IGNORE_INDEX  # no target across a boundary
                if y[b, i] != IGNORE_INDEX:
                    doc, off = where[int(y[b, i])]
                    src = (doc, 0) if tok == BOS else where[tok]
                    assert (doc, off) == (src[0], src[1] + 1)  # the true next token of that doc


def test_determinism_and_epochs(pretrain) -> None:
    reader, _, _ = pretrain
    a = PackedDataset(reader, seq_len=64, seed=5)
    b = PackedDataset(reader, seq_len=64, seed=5)
    rows = [3, 0, 7, 1]
    b.plan(1)  # cache another epoch first: must not matter
    x, y = a.get_batch(0, rows), b.get_batch(0, rows)
    for f in ("input_ids", "targets", "position_ids", "doc_ids"):
        assert torch.equal(getattr(x, f), getattr(y, f))
    assert torch.equal(a.get_batch(0, rows).input_ids, x.input_ids)
    p0, p1 = a.plan(0), a.plan(1)
    assert not np.array_equal(p0.seg_doc[:50], p1.seg_doc[:50])
    c = PackedDataset(reader, seq_len=64, seed=6)
    assert not np.array_equal(c.plan(0).seg_doc[:50], p0.seg_doc[:50])
    with pytest.raises(IndexError):
        a.get_batch(0, [a.num_rows(0)])


def test_sft_mode_masks_truncation_and_padding(tmp_path) -> None:
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(5, 100, 400), [300, 129]])

    def mask_fn(d: int, n: int) -> list[int]:  # "prompt" = first third untrained
        return [0] * (n // 3) + [1] * (n - n // 3)

    reader, where = make_shards(tmp_path, lengths, kind="sft", mask_fn=mask_fn)
    ds = PackedDataset(reader, seq_len=128, seed=0)
    assert ds.mode == "sft"
    plan = ds.plan(0)
    real = plan.seg_doc >= 0
    assert (np.add.reduceat(plan.seg_len, plan.row_ptr[:-1]) == 129).all()
    assert np.array_equal(np.sort(plan.seg_doc[real]), np.arange(len(lengths)))  # each doc once
    assert (plan.seg_start[real] == 0).all()
    assert (plan.seg_len[real] == np.minimum(lengths, 129)[plan.seg_doc[real]]).all()  # truncation
    assert plan.n_pad_tokens == plan.n_rows * 129 - np.minimum(lengths, 129).sum()
    assert plan.fill_ratio > 0.9
    for batch in all_batches(ds, 0):
        x, y, d = batch.input_ids.numpy(), batch.targets.numpy(), batch.doc_ids.numpy()
        for b in range(len(x)):
            for i in range(128):
                tok = int(x[b, i])
                if y[b, i] == IGNORE_INDEX:
                    continue
                doc, off = where[int(y[b, i])]
                assert off >= lengths[doc] // 3  # trained targets are in the mask==1 part
                assert (where[tok] == (doc, off - 1)) if tok != BOS else off == 1
        # padding (pad id 0) is never an input with a target, and has its own doc id
        pad = x == 0
        assert (y[pad] == IGNORE_INDEX).all()
        for b in range(len(x)):
            if pad[b].any():
                assert not np.isin(d[b][pad[b]], d[b][~pad[b]]).any()
    batch = ds.get_batch(0, range(ds.num_rows(0)))
    assert batch.num_real_tokens == int((batch.input_ids != 0).sum())
    assert batch.num_real_tokens < batch.input_ids.numel()
    # Every kept token with mask 1 is trained exactly once (offset 0 never is: it has no context).
    expected = sum(max(0, min(n, 129) - max(n // 3, 1)) for n in lengths)
    assert sum(b.num_target_tokens for b in all_batches(ds, 0)) == expected


def test_max_position_shifts_long_continuations(tmp_path) -> None:
    reader, _ = make_shards(tmp_path, [1000, 5, 7])
    plain = PackedDataset(reader, seq_len=64, seed=0)
    capped = PackedDataset(reader, seq_len=64, seed=0, max_position=200)
    n = plain.num_rows(0)
    a, b = plain.get_batch(0, range(n)), capped.get_batch(0, range(n))
    assert int(a.position_ids.max()) == 999 and int(b.position_ids.max()) == 199
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
    # positions keep their differences inside every segment
    same = b.doc_ids[:, 1:] == b.doc_ids[:, :-1]
    assert (b.position_ids[:, 1:] - b.position_ids[:, :-1])[same].eq(1).all()
    assert torch.equal(a.position_ids[a.position_ids < 136], b.position_ids[a.position_ids < 136])


def test_million_document_plan_builds() -> None:
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(5.0, 1.0, 1_000_000), 3, 8000).astype(np.int64)
    plan = pack_rows(lengths, 513, seed=0, epoch=0, mode="pretrain")
    assert plan.seg_len[plan.seg_doc >= 0].sum() == lengths.sum()
    assert plan.n_pad_tokens < 513


def test_row_order_is_not_a_length_curriculum() -> None:
    """Best-fit fills rows longest-first; the plan's rows must come shuffled, or consecutive
    training batches hold documents of one length (in SFT data: one task kind)."""
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(20, 40, 600), rng.integers(80, 120, 600)])
    plan = pack_rows(lengths, 256, seed=0, epoch=0, mode="sft")
    docs = plan.seg_doc >= 0
    row_of_seg = np.repeat(np.arange(plan.n_rows), np.diff(plan.row_ptr))
    mean_len = np.bincount(row_of_seg[docs], weights=plan.seg_len[docs]) / np.bincount(row_of_seg[docs])
    rank = np.argsort(np.argsort(mean_len))
    rho = np.corrcoef(np.arange(plan.n_rows), rank)[0, 1]  # Spearman: rank correlation with row index
    assert abs(rho) < 0.3, rho
    half = plan.n_rows // 2
    assert abs(mean_len[:half].mean() - mean_len[half:].mean()) < 0.2 * mean_len.mean()
