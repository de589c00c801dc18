"""``bench/reference_pretrain.py`` reads the reference trainer's log correctly.

A stand-in ``trainer/train_pretrain.py`` prints the reference's log line format at known steps; the
bench must count the steps between the second and the last line, stop a trainer that runs past
``--seconds``, and count useful tokens the way the reference's ``PretrainDataset`` pads rows.
"""

from __future__ import annotations

import itertools
import json
import sys
import textwrap
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from tests.test_bench_reference import _load

FAKE_TRAINER = textwrap.dedent("""
    import sys, time
    print("Model Params: 0.1M")
    for step in range(10, {last} + 1, 10):
        time.sleep(0.02)
        print(f"Epoch:[1/1]({{step}}/1000), loss: 6.0, logits_loss: 6.0, aux_loss: 0.0, lr: 0.0005, epoch_time: 1.0min")
    time.sleep({tail})
""")


def fake_repo(tmp_path: Path, last: int, tail: float) -> Path:
    repo = tmp_path / "minimind"
    (repo / "trainer").mkdir(parents=True)
    (repo / "model").mkdir()
    (repo / "trainer" / "train_pretrain.py").write_text(FAKE_TRAINER.format(last=last, tail=tail))
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(repo / "model" / "tokenizer.json"))
    return repo


def test_steps_between_second_and_last_line_and_a_stopped_run(tmp_path: Path) -> None:
    bench = _load("reference_pretrain")
    repo = fake_repo(tmp_path, last=80, tail=60)  # would sleep a minute after its last line
    stamps, lines = bench.stamped_steps([sys.executable, str(repo / "trainer" / "train_pretrain.py")],
                                        repo / "trainer", seconds=5)
    assert [s for _, s in stamps] == [10, 20, 30, 40, 50, 60, 70, 80]  # the params line is no step
    assert lines[0] == "Model Params: 0.1M"
    assert all(b >= a for (a, _), (b, _) in itertools.pairwise(stamps))


def test_useful_fraction_counts_bos_eos_and_truncation(tmp_path: Path) -> None:
    bench = _load("reference_pretrain")
    repo = fake_repo(tmp_path, last=10, tail=0)
    data = tmp_path / "d.jsonl"
    # 3 tokens -> 5 with BOS/EOS; 20 tokens -> truncated to L - 2 = 8, then 10: (5 + 10) / (2 * 10)
    data.write_text("\n".join(json.dumps({"text": t}) for t in ["a b a", " ".join(["b"] * 20)]) + "\n")
    assert bench.useful_fraction(data, repo / "model" / "tokenizer.json", seq_len=10) == pytest.approx(0.75)


def test_report_from_a_finished_run(tmp_path: Path, monkeypatch, capsys) -> None:
    bench = _load("reference_pretrain")
    repo = fake_repo(tmp_path, last=50, tail=0)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "a b a"}) + "\n")
    monkeypatch.setattr(sys, "argv", ["reference_pretrain.py", "--reference_repo", str(repo), "--data_path",
                                      str(data), "--seconds", "30", "--batch_size", "2", "--max_seq_len", "10",
                                      "--hidden_size", "64", "--num_hidden_layers", "2"])
    report = bench.main()
    assert report["log_lines"] == 5 and report["timed_steps"] == 30  # steps 20 -> 50
    assert report["useful_fraction"] == pytest.approx(0.5)
    assert report["positions_per_s"] == pytest.approx(report["micro_steps_per_s"] * 20, rel=1e-3)
    assert report["useful_tokens_per_s"] == pytest.approx(report["positions_per_s"] * 0.5, rel=1e-3)
    assert json.loads(capsys.readouterr().out)["timed_steps"] == 30
