"""Tokenised shards from real sample files: round trip, num_proc invariance, reuse, atomicity."""

from __future__ import annotations

import json
import os
import pickle
import random
import warnings
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from minimind.data import (DataFormatError, MaskMarkers, ShardReader, assistant_mask,
                           load_or_prepare_shards, prepare_shards, read_meta, sft_conversation)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOKENIZER_DIR = SHARED / "compat" / "reference_tokenizer"
N_LINES = 300

pytestmark = pytest.mark.skipif(not (SHARED / "data" / "sft_mix.jsonl").is_file(),
                                reason="../shared data absent")


@pytest.fixture(scope="module")
def tok():
    from minimind.tokenizer import MiniMindTokenizer
    return MiniMindTokenizer.from_dir(TOKENIZER_DIR)


def head(name: str, dst: Path, n: int = N_LINES) -> Path:
    """Copy the first ``n`` lines of a shared data file into ``dst`` (never write into ../shared)."""
    with open(SHARED / "data" / name, "rb") as f:
        dst.write_bytes(b"".join(islice(f, n)))
    return dst


def file_bytes(d: Path) -> dict[str, bytes]:
    return {n: (d / n).read_bytes() for n in ("ids.bin", "mask.bin", "offsets.npy")}


def test_pretrain_round_trip(tmp_path: Path, tok) -> None:
    src = head("pretrain_mix.jsonl", tmp_path / "pt.jsonl")
    info = prepare_shards(src, tmp_path / "pt", tok, "pretrain", num_proc=1, progress=False)
    r = ShardReader(tmp_path / "pt")
    texts = [json.loads(line)["text"] for line in src.read_text(encoding="utf-8").splitlines()]
    assert info.n_docs == len(r) == len(texts) == N_LINES and not info.reused
    assert r.ids.dtype == np.uint16 and r.n_tokens == info.n_tokens == int(r.lengths.sum())
    for i, text in enumerate(texts):
        ids, mask = r.doc(i)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids[1:-1].tolist()) == text
        assert ids[1:-1].tolist() == tok.encode(text)
        assert (mask == 1).all()
    meta = read_meta(tmp_path / "pt")
    assert meta["kind"] == "pretrain" and meta["n_docs"] == N_LINES and meta["dtype"] == "uint16"
    assert meta["source"]["size"] == src.stat().st_size and meta["tokenizer"].startswith(tok.hash)


def test_sft_round_trip_and_masks(tmp_path: Path, tok) -> None:
    src = head("sft_mix.jsonl", tmp_path / "sft.jsonl")
    prepare_shards(src, tmp_path / "sft", tok, "sft", num_proc=1, progress=False,
                   add_system_ratio=0.0, empty_think_ratio=1.0, max_len=256)
    r = ShardReader(tmp_path / "sft")
    markers = MaskMarkers(tok)
    lines = src.read_text(encoding="utf-8").splitlines()
    assert len(r) == len(lines)
    n_cut = 0
    for i, line in enumerate(lines):
        messages, tools = sft_conversation(json.loads(line))
        text = tok.apply_chat_template(messages, tools=tools)
        want = tok.encode(text)
        ids, mask = r.doc(i)
        assert ids.tolist() == want[:256]
        assert mask.tolist() == assistant_mask(want[:256], markers)
        if len(want) <= 256:
            assert tok.decode(ids.tolist()) == text and mask.sum() > 0
        n_cut += len(want) > 256
    assert n_cut > 0  # the max_len cut was exercised


def test_augmentation_is_deterministic_per_line(tmp_path: Path, tok) -> None:
    src = head("sft_mix.jsonl", tmp_path / "sft.jsonl")
    a = prepare_shards(src, tmp_path / "a", tok, "sft", num_proc=1, seed=0, progress=False)
    b = prepare_shards(src, tmp_path / "b", tok, "sft", num_proc=1, seed=1, progress=False)
    assert a.n_tokens != b.n_tokens  # a different seed draws different augmentations
    texts = [tok.decode(ShardReader(tmp_path / "a").doc(i)[0].tolist()) for i in range(N_LINES)]
    with_sys = sum(t.startswith("<|im_start|>system\n") for t in texts)
    with_think = sum("<think>\n\n</think>" in t for t in texts)
    assert 0.1 * N_LINES < with_sys < 0.3 * N_LINES and 0.1 * N_LINES < with_think < 0.3 * N_LINES


@pytest.mark.parametrize("kind, name", [("pretrain", "pretrain_mix.jsonl"), ("sft", "sft_mix.jsonl")])
def test_num_proc_gives_identical_bytes(tmp_path: Path, tok, kind: str, name: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import minimind.data.shards as shards
    monkeypatch.setattr(shards, "CHUNK_LINES", 37)  # several chunks in flight per worker
    src = head(name, tmp_path / "in.jsonl")
    one = prepare_shards(src, tmp_path / "one", tok, kind, num_proc=1, seed=3, progress=False)
    two = prepare_shards(src, tmp_path / "two", tok, kind, num_proc=2, seed=3, progress=False)
    assert file_bytes(tmp_path / "one") == file_bytes(tmp_path / "two")
    assert one.n_tokens == two.n_tokens and one.n_docs == two.n_docs == N_LINES


def test_reuse_and_rebuild(tmp_path: Path, tok) -> None:
    src = head("pretrain_mix.jsonl", tmp_path / "pt.jsonl", 100)
    out = tmp_path / "shards"
    first = load_or_prepare_shards(src, out, tok, "pretrain", num_proc=1, progress=False)
    stamp = (out / "ids.bin").stat().st_mtime_ns
    again = load_or_prepare_shards(src, out, tok, "pretrain", num_proc=1, progress=False)
    assert not first.reused and again.reused and again.n_tokens == first.n_tokens
    assert (out / "ids.bin").stat().st_mtime_ns == stamp
    # SFT-only knobs do not matter for pretrain shards
    assert load_or_prepare_shards(src, out, tok, "pretrain", num_proc=1, progress=False,
                                  add_system_ratio=0.5).reused
    with open(src, "a", encoding="utf-8") as f:  # source changes: size and mtime differ
        f.write(json.dumps({"text": "one more document"}) + "\n")
    changed = load_or_prepare_shards(src, out, tok, "pretrain", num_proc=1, progress=False)
    assert not changed.reused and changed.n_docs == 101
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched only: rebuild too
    assert not load_or_prepare_shards(src, out, tok, "pretrain", num_proc=1, progress=False).reused
    assert not load_or_prepare_shards(src, out, tok, "pretrain", num_proc=1, progress=False,
                                      skip_bad_lines=True).reused
    (out / "mask.bin").write_bytes(b"")  # damaged folder: rebuilt, not trusted
    assert not load_or_prepare_shards(src, out, tok, "pretrain", num_proc=1, progress=False,
                                      skip_bad_lines=True).reused
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pt.jsonl", "shards"]  # no leftovers


@pytest.mark.parametrize("num_proc", [1, 2])
def test_failed_build_leaves_nothing(tmp_path: Path, tok, num_proc: int,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import minimind.data.shards as shards
    monkeypatch.setattr(shards, "CHUNK_LINES", 50)
    src = head("sft_mix.jsonl", tmp_path / "sft.jsonl")
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[199] = '{"conversations": [{"role": "user", "content": "x"}]\n'  # truncated JSON, line 200
    src.write_text("".join(lines), encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(DataFormatError) as ei:
        prepare_shards(src, out, tok, "sft", num_proc=num_proc, progress=False)
    assert str(ei.value).startswith(f"{src}:200:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft.jsonl"]

    # An existing good build survives a failed rebuild untouched.
    good = head("sft_mix.jsonl", tmp_path / "good.jsonl")
    prepare_shards(good, out, tok, "sft", num_proc=1, progress=False)
    before = file_bytes(out)
    with pytest.raises(DataFormatError):
        load_or_prepare_shards(src, out, tok, "sft", num_proc=num_proc, progress=False)
    assert file_bytes(out) == before and read_meta(out)["source"]["path"] == str(good.resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.jsonl", "out", "sft.jsonl"]

    # With skip_bad_lines the line is dropped, counted, and reported once.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = prepare_shards(src, out, tok, "sft", num_proc=num_proc, progress=False,
                              skip_bad_lines=True)
    assert info.skipped_lines == 1 and info.n_docs == N_LINES - 1
    assert read_meta(out)["skipped_lines"] == 1
    assert len([w for w in caught if "skipped 1 bad line" in str(w.message)]) == 1


def test_stale_temporary_folders_are_cleaned(tmp_path: Path, tok) -> None:
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".pt.tmp-{dead_pid}-abcd1234"
    live = tmp_path / f".pt.tmp-{os.getpid()}-abcd1234"  # a concurrent build of a live process
    stale.mkdir()
    live.mkdir()
    src = head("pretrain_mix.jsonl", tmp_path / "pt.jsonl", 10)
    prepare_shards(src, tmp_path / "pt", tok, "pretrain", num_proc=1, progress=False)
    assert not stale.exists() and live.exists()


def test_reader_pickles_by_path(tmp_path: Path, tok) -> None:
    src = head("pretrain_mix.jsonl", tmp_path / "pt.jsonl", 20)
    prepare_shards(src, tmp_path / "pt", tok, "pretrain", num_proc=1, progress=False)
    r = ShardReader(tmp_path / "pt")
    blob = pickle.dumps(r)
    assert len(blob) < 1000  # the memmaps are reopened, not copied
    r2 = pickle.loads(blob)
    assert np.array_equal(r2.doc(7)[0], r.doc(7)[0])


def test_line_rng_is_independent_of_layout(tok) -> None:
    from minimind.data.shards import ChunkTokenizer
    work = ChunkTokenizer(tok, "sft", "x", 0, None, 0.2, 0.2)
    other = ChunkTokenizer(tok, "sft", "y", 0, None, 0.2, 0.2)
    assert work.line_rng(5).random() == other.line_rng(5).random()
    assert work.line_rng(5).random() != work.line_rng(6).random()
    assert isinstance(work.line_rng(1), random.Random)
