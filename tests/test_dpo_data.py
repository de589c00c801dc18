"""DPO data: pair rendering and masks, shards (errors, cache), pair-packed batches."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from minimind.data import IGNORE_INDEX, DataFormatError, MaskMarkers, ShardReader, dpo_pair, read_meta
from minimind.data.dpo import (DPODataset, PairBatch, fit_pair_lengths, load_or_prepare_dpo_shards,
                               prepare_dpo_shards, tokenize_pair)

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "to", "park", "red", "blue", "ball", "我们",
         "喜欢", "学习", "模型", "数据", "训练", "yes", "no"]
EMPTY_THINK = "<think>\n\n</think>\n\n"


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _pairs(n: int = 60, seed: int = 0) -> list[dict]:
    """Single- and multi-turn pairs; some with a system turn, reasoning or a long prompt."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = []
        if i % 5 == 0:
            prompt.append({"role": "system", "content": "You are " + _sentence(rng, 1, 3)})
        prompt.append({"role": "user", "content": _sentence(rng, 2, 30)})
        if i % 3 == 0:  # multi-turn: an earlier assistant answer is part of the prompt
            prompt += [{"role": "assistant", "content": _sentence(rng, 1, 10)},
                       {"role": "user", "content": _sentence(rng, 1, 10)}]
        good = {"role": "assistant", "content": _sentence(rng, 1, 25)}
        bad = {"role": "assistant", "content": _sentence(rng, 1, 25)}
        if i % 4 == 1:
            good["reasoning_content"] = _sentence(rng, 1, 6)
        out.append({"chosen": prompt + [good], "rejected": prompt + [bad]})
    return out


def _write(path: Path, records: list, extra_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    for at, line in sorted((extra_lines or {}).items()):
        lines.insert(at - 1, line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict:
    from minimind.tokenizer import train_tokenizer
    root = tmp_path_factory.mktemp("dpo")
    records = _pairs()
    rng = random.Random(1)
    texts = [_sentence(rng, 5, 40) for _ in range(300)]
    tok = train_tokenizer(iter(texts), root / "tok", vocab_size=400, show_progress=False)
    data = _write(root / "dpo.jsonl", records)
    return {"root": root, "tok": tok, "records": records, "data": data}


def _expected_body(msg: dict) -> str:
    """What the template renders for a final assistant turn, plus the end marker."""
    think = msg.get("reasoning_content", "")
    return f"<think>\n{think}\n</think>\n\n{msg['content']}<|im_end|>\n"


# ------------------------------------------------------------------------------ tokenize_pair
def test_masks_cover_exactly_the_final_response(ws) -> None:
    tok, markers = ws["tok"], MaskMarkers(ws["tok"])
    for rec in ws["records"]:
        chosen, rejected = dpo_pair(rec)
        pair = tokenize_pair(tok, chosen, rejected, markers=markers)
        assert not pair.truncated and not pair.no_response
        for ids, mask, msgs in ((pair.chosen_ids, pair.chosen_mask, chosen),
                                (pair.rejected_ids, pair.rejected_mask, rejected)):
            m = np.asarray(mask)
            on = np.flatnonzero(m)
            assert on[0] == pair.prompt_len and on[-1] == len(ids) - 1 and len(on) == on[-1] - on[0] + 1
            assert tok.decode([ids[i] for i in on]) == _expected_body(msgs[-1])
            # whole text = SFT rendering without augmentation (empty think blocks kept)
            assert tok.decode(ids) == tok.apply_chat_template(msgs)
        # identical prompt prefix = template of the shared messages + the assistant header
        prompt = pair.chosen_ids[:pair.prompt_len]
        assert prompt == pair.rejected_ids[:pair.prompt_len]
        assert tok.decode(prompt) == tok.apply_chat_template(chosen[:-1]) + "<|im_start|>assistant\n"
    # multi-turn: the earlier assistant turn is not trained (SFT would train it)
    multi = [r for r in ws["records"] if sum(m["role"] == "assistant" for m in r["chosen"]) > 1]
    assert multi
    assert EMPTY_THINK in tok.apply_chat_template(multi[0]["chosen"])


def test_cut_to_max_len(ws) -> None:
    tok = ws["tok"]
    chosen, rejected = dpo_pair(ws["records"][3])
    full = tokenize_pair(tok, chosen, rejected)
    cut = full.prompt_len + 2
    pair = tokenize_pair(tok, chosen, rejected, max_len=cut)
    assert pair.truncated and not pair.no_response
    assert pair.chosen_ids == full.chosen_ids[:cut] and pair.chosen_mask == full.chosen_mask[:cut]
    assert sum(pair.chosen_mask) == 2 and sum(pair.rejected_mask) == 2
    short = tokenize_pair(tok, chosen, rejected, max_len=full.prompt_len)
    assert short.truncated and short.no_response and sum(short.chosen_mask) == 0


def test_prompt_tokens_must_match(ws) -> None:
    # formats rejects differing prompts; tokenize_pair re-checks on the rendered ids
    tok = ws["tok"]
    c = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "yes"}]
    r = [{"role": "user", "content": "the dog"}, {"role": "assistant", "content": "no"}]
    with pytest.raises(ValueError, match="different prompt tokens"):
        tokenize_pair(tok, c, r)


def test_dpo_pair_shared_prompt_rule() -> None:
    u = {"role": "user", "content": "q"}
    a = {"role": "assistant", "content": "a"}
    ok = dpo_pair({"chosen": [u, a, u, a], "rejected": [u, a, u, {"role": "assistant", "content": "b"}]})
    assert ok[1][-1]["content"] == "b"
    cases = [
        ([{"role": "system", "content": "s"}, u, a], [u, a], 0),
        ([u, a, u, a], [u, {"role": "assistant", "content": "x"}, u, a], 1),
        ([u, {"role": "assistant", "content": "a", "reasoning_content": "r"}, u, a], [u, a, u, a], 1),
        ([u, a, u, a], [u, a], 1),  # rejected's prompt ends where chosen's continues
    ]
    for chosen, rejected, i in cases:
        with pytest.raises(ValueError, match=f"must share the prompt: they differ at message {i}$"):
            dpo_pair({"chosen": chosen, "rejected": rejected})


# ------------------------------------------------------------------------------ shards
def test_shards_alternate_sides_and_match_tokenize_pair(ws) -> None:
    out = ws["root"] / "sh_layout"
    info = prepare_dpo_shards(ws["data"], out, ws["tok"], max_len=64, num_proc=1, progress=False)
    r = ShardReader(out)
    n = len(ws["records"])
    assert info.kind == r.kind == "dpo" and info.n_docs == len(r) == 2 * n and not info.reused
    assert info.meta["n_pairs"] == n and info.meta["settings"]["max_len"] == 64
    markers = MaskMarkers(ws["tok"])
    n_cut = n_empty = 0
    for i, rec in enumerate(ws["records"]):
        pair = tokenize_pair(ws["tok"], *dpo_pair(rec), max_len=64, markers=markers)
        for side, (ids, mask) in enumerate(((pair.chosen_ids, pair.chosen_mask),
                                            (pair.rejected_ids, pair.rejected_mask))):
            got_ids, got_mask = r.doc(2 * i + side)
            assert got_ids.tolist() == ids and got_mask.tolist() == mask
        n_cut += pair.truncated
        n_empty += pair.no_response
    assert n_cut > 0  # some pairs are longer than 64 tokens
    assert info.meta["truncated_pairs"] == n_cut and info.meta["no_response_pairs"] == n_empty


def test_num_proc_invariance(ws) -> None:
    a, b = ws["root"] / "np1", ws["root"] / "np2"
    prepare_dpo_shards(ws["data"], a, ws["tok"], max_len=None, num_proc=1, progress=False)
    prepare_dpo_shards(ws["data"], b, ws["tok"], max_len=None, num_proc=2, progress=False)
    for name in ("ids.bin", "mask.bin", "offsets.npy"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert read_meta(a)["truncated_pairs"] == 0


def test_bad_lines_report_file_and_line(ws, tmp_path: Path) -> None:
    good = ws["records"][:4]
    not_shared = {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
                  "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}
    cases = {
        3: ('{"chosen": [', "invalid JSON"),
        4: (json.dumps(not_shared), "must share the prompt: they differ at message 0"),
        2: (json.dumps({"chosen": good[0]["chosen"]}), "missing field 'rejected'"),
    }
    for line_no, (line, why) in cases.items():
        src = _write(tmp_path / f"bad{line_no}.jsonl", good, {line_no: line})
        out = tmp_path / f"out{line_no}"
        with pytest.raises(DataFormatError) as e:
            prepare_dpo_shards(src, out, ws["tok"], max_len=64, num_proc=1, progress=False)
        assert str(e.value).startswith(f"{src}:{line_no}: ") and why in str(e.value)
        assert not out.exists()
    # invalid UTF-8 is a bad line too, and skip_bad_lines keeps the rest
    src = tmp_path / "utf8.jsonl"
    src.write_bytes(_write(tmp_path / "tmp.jsonl", good).read_bytes() + b'{"chosen": "\xff"}\n')
    with pytest.warns(RuntimeWarning, match="skipped 1 bad line"):
        info = prepare_dpo_shards(src, tmp_path / "skip", ws["tok"], max_len=64, num_proc=1,
                                  skip_bad_lines=True, progress=False)
    assert info.skipped_lines == 1 and info.n_docs == 8
    assert f"{src}:5: invalid UTF-8" in info.meta["skipped_examples"][0]


def test_cache_reuse_and_rebuild(ws, tmp_path: Path) -> None:
    src = _write(tmp_path / "d.jsonl", ws["records"][:10])
    out = tmp_path / "cache"
    first = load_or_prepare_dpo_shards(src, out, ws["tok"], max_len=64, num_proc=1, progress=False)
    again = load_or_prepare_dpo_shards(src, out, ws["tok"], max_len=64, num_proc=1, progress=False)
    assert not first.reused and again.reused and again.n_docs == first.n_docs == 20
    assert again.meta["n_pairs"] == 10
    other = load_or_prepare_dpo_shards(src, out, ws["tok"], max_len=32, num_proc=1, progress=False)
    assert not other.reused and read_meta(out)["settings"]["max_len"] == 32
    assert load_or_prepare_dpo_shards(src, out, ws["tok"], max_len=32, num_proc=1,
                                      progress=False).reused
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # source changed
    assert not load_or_prepare_dpo_shards(src, out, ws["tok"], max_len=32, num_proc=1,
                                          progress=False).reused


# ------------------------------------------------------------------------------ batches
@pytest.fixture(scope="module")
def shards(ws) -> ShardReader:
    out = ws["root"] / "sh_batches"
    prepare_dpo_shards(ws["data"], out, ws["tok"], max_len=None, num_proc=1, progress=False)
    return ShardReader(out)


def _sequences(batch: PairBatch) -> dict[int, dict]:
    """Per global (pair, side): its row, inputs, targets and positions, recovered via seq_index."""
    out = {}
    for s in range(batch.num_seqs):
        rows, cols = torch.nonzero(batch.seq_index == s, as_tuple=True)
        assert len(rows) and (rows == rows[0]).all()  # a sequence never spans rows
        assert (cols == torch.arange(int(cols[0]), int(cols[0]) + len(cols))).all()  # contiguous
        b = int(rows[0])
        key = (int(batch.pair_ids[s // 2]), s % 2)
        out[key] = {"row": b, "inputs": batch.input_ids[b, cols], "targets": batch.targets[b, cols],
                    "pos": batch.position_ids[b, cols], "seg": batch.doc_ids[b, cols]}
    return out


def _check_epoch(ds: DPODataset, shards: ShardReader, epoch: int, batch_rows: int = 3) -> int:
    seen: list[int] = []
    n_rows = ds.num_rows(epoch)
    for r0 in range(0, n_rows, batch_rows):
        batch = ds.get_batch(epoch, range(r0, min(r0 + batch_rows, n_rows)))
        assert batch.input_ids.shape == batch.seq_index.shape == (batch.shape[0], ds.seq_len)
        assert batch.num_target_tokens == int((batch.targets != IGNORE_INDEX).sum())
        assert batch.num_real_tokens == int((batch.seq_index >= 0).sum())
        assert ((batch.seq_index < 0) <= (batch.targets == IGNORE_INDEX)).all()  # padding untrained
        seqs = _sequences(batch)
        for (p, side), sq in seqs.items():
            assert seqs[(p, 1 - side)]["row"] == sq["row"]  # both sides in the same row
            n = int(ds.side_lens[p, side])
            ids, mask = shards.doc(2 * p + side)
            ids, mask = ids[:n].astype(np.int64), mask[:n]
            k = len(sq["inputs"])  # n, or n - 1 when the side ends the row
            assert k in (n, n - 1) and sq["inputs"].tolist() == ids[:k].tolist()
            assert sq["pos"].tolist() == list(range(k)) and len(set(sq["seg"].tolist())) == 1
            want = np.where(mask[1:] == 1, ids[1:], IGNORE_INDEX)[:k]
            got = sq["targets"].numpy()
            assert got[:len(want)].tolist() == want.tolist() and (got[len(want):] == IGNORE_INDEX).all()
            if n == len(shards.doc(2 * p + side)[0]):  # uncut side: every masked token is a target
                assert (got != IGNORE_INDEX).sum() == mask[1:].sum() > 0
        assert seqs[(int(batch.pair_ids[0]), 0)]["seg"][0] != seqs[(int(batch.pair_ids[0]), 1)]["seg"][0]
        seen += batch.pair_ids.tolist()
    assert sorted(seen) == list(range(ds.num_pairs))  # every pair exactly once per epoch
    return n_rows


def test_batches_hold_whole_pairs(shards) -> None:
    longest = int((shards.lengths[0::2] + shards.lengths[1::2]).max())
    ds = DPODataset(shards, seq_len=longest + 40, seed=5)
    assert ds.num_cut_pairs == 0
    n_rows = _check_epoch(ds, shards, epoch=0)
    assert ds.plan(0).fill_ratio > 0.85, ds.plan(0).fill_ratio
    assert n_rows < ds.num_pairs


def test_batches_with_cut_pairs(shards) -> None:
    ds = DPODataset(shards, seq_len=128, seed=1)
    assert 0 < ds.num_cut_pairs < ds.num_pairs
    assert (ds.side_lens.sum(1) <= 129).all()
    _check_epoch(ds, shards, epoch=2, batch_rows=4)


def test_fit_pair_lengths() -> None:
    c, r = fit_pair_lengths(np.array([3, 3, 30, 30, 8]), np.array([4, 30, 3, 30, 9]), row_len=20)
    assert c.tolist() == [3, 3, 17, 10, 8] and r.tolist() == [4, 17, 3, 10, 9]


def test_determinism(shards) -> None:
    a = DPODataset(shards, seq_len=128, seed=3)
    b = DPODataset(shards, seq_len=128, seed=3)
    rows = [2, 0, 1]
    x, y = a.get_batch(1, rows), b.get_batch(1, rows)
    b.get_batch(0, [0])  # another epoch in between does not matter
    z = b.get_batch(1, rows)
    for f in ("input_ids", "targets", "position_ids", "doc_ids", "seq_index", "pair_ids"):
        assert torch.equal(getattr(x, f), getattr(y, f)) and torch.equal(getattr(x, f), getattr(z, f))
    assert not torch.equal(a.get_batch(0, [0]).input_ids, a.get_batch(1, [0]).input_ids)
    moved = x.to("cpu")
    assert torch.equal(moved.seq_index, x.seq_index) and moved.num_pairs == x.num_pairs


def test_sequence_logps_on_a_pair_batch(shards) -> None:
    """The loss helper sums exactly each side's response tokens out of a packed batch."""
    from minimind.train.losses import sequence_logps
    ds = DPODataset(shards, seq_len=96, seed=0)
    batch = ds.get_batch(0, [0, 1])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*batch.shape, shards.meta["vocab_size"], generator=g)
    got = sequence_logps(logits, batch.targets, batch.seq_index, batch.num_seqs)
    logp = torch.log_softmax(logits.double(), -1)
    for s in range(batch.num_seqs):
        sel = (batch.seq_index == s) & (batch.targets != IGNORE_INDEX)
        want = logp[sel].gather(-1, batch.targets[sel][:, None]).sum()
        torch.testing.assert_close(got[s].double(), want, rtol=1e-5, atol=1e-4)


def test_dataset_rejects_other_kinds(ws, tmp_path: Path) -> None:
    from minimind.data import write_docs
    write_docs(tmp_path / "sft", [([1, 2, 3], [0, 1, 1])], kind="sft", vocab_size=400)
    with pytest.raises(ValueError, match="'dpo' shards"):
        DPODataset(ShardReader(tmp_path / "sft"), seq_len=16, seed=0)
