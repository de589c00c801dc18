"""The one training loop: loss falls, a killed run resumes bit-identically, configs fail early."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from minimind.cli import build_parser, build_train_config
from minimind.config import TrainConfig
from minimind.train.loop import train
from minimind.train.stages import PRETRAIN, SFT

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "to", "park", "red", "blue", "ball", "我们", "喜欢",
         "学习", "模型", "数据", "训练"]


def _corpus(path: Path, n_docs: int = 300, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_docs):
            # A learnable pattern: a sentence template with a counting suffix.
            k = rng.randint(1, 9)
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
            text += f". count: {' '.join(str(i) for i in range(k, k + 6))}"
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


def _sft(path: Path, n: int = 120, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            conv = [{"role": "user", "content": f"{a}+{b}=?"}, {"role": "assistant", "content": f"{a + b}"}]
            f.write(json.dumps({"conversations": conv}) + "\n")
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    from minimind.tokenizer import iter_texts_from_jsonl, train_tokenizer
    root = tmp_path_factory.mktemp("train")
    pre = _corpus(root / "pre.jsonl")
    sft = _sft(root / "sft.jsonl")
    tok_dir = root / "tok"
    train_tokenizer(iter_texts_from_jsonl(pre), tok_dir, vocab_size=400, show_progress=False)
    return {"root": root, "pre": pre, "sft": sft, "tok": tok_dir}


def _cfg(ws: dict[str, Path], out: Path, **kw) -> TrainConfig:
    base = dict(stage="pretrain", data_path=str(ws["pre"]), tokenizer_path=str(ws["tok"]),
                save_dir=str(out / "out"), checkpoint_dir=str(out / "ckpt"), shard_dir=str(out / "shards"),
                preset="tiny", hidden_size=64, num_hidden_layers=2, vocab_size=400, batch_size=4,
                max_seq_len=64, learning_rate=3e-3, warmup_steps=2, log_interval=1, save_interval=0,
                progress=0, num_workers=1, device="cpu", dtype="float32", seed=7)
    base.update(kw)
    return TrainConfig(**base)


def _tok(ws):
    from minimind.tokenizer import MiniMindTokenizer
    return MiniMindTokenizer.from_dir(ws["tok"])


def test_pretrain_loss_falls(workspace, tmp_path):
    res = train(PRETRAIN, _cfg(workspace, tmp_path, max_steps=40), _tok(workspace))
    assert res.steps == 40
    first, last = sum(res.losses[:3]) / 3, sum(res.losses[-3:]) / 3
    assert last < first - 1.0, (first, last)
    assert res.weights_path.exists() and res.weights_path.suffix == ".safetensors"
    records = [json.loads(x) for x in res.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    assert {"loss", "lr", "grad_norm", "tok_per_s", "mfu"} <= set(records[0])
    # warmup then cosine decay
    lrs = [r["lr"] for r in records]
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[5]


class _Killed(RuntimeError):
    pass


def test_resume_is_bit_identical(workspace, tmp_path):
    full = train(PRETRAIN, _cfg(workspace, tmp_path / "a", max_steps=8, save_interval=4), _tok(workspace))

    def kill_at_5(step, record):
        if step == 5:
            raise _Killed()

    cfg_b = _cfg(workspace, tmp_path / "b", max_steps=8, save_interval=4)
    with pytest.raises(_Killed):
        train(PRETRAIN, cfg_b, _tok(workspace), on_step=kill_at_5)
    cfg_b.from_resume = 1
    resumed = train(PRETRAIN, cfg_b, _tok(workspace))
    # The resumed run redoes steps 5..8 from the step-4 checkpoint: same batches, same numbers.
    assert resumed.losses == full.losses[4:]
    a = torch.load(full.resume_path, weights_only=True)["model"]
    b = torch.load(resumed.resume_path, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(x)["step"] for x in resumed.metrics_path.read_text().splitlines()]
    assert lines == list(range(1, 9))  # the metrics file continues without duplicates


def test_sft_trains_only_assistant_tokens_and_loss_falls(workspace, tmp_path):
    pre = train(PRETRAIN, _cfg(workspace, tmp_path, max_steps=5), _tok(workspace))
    cfg = _cfg(workspace, tmp_path, stage="sft", data_path=str(workspace["sft"]), save_weight="full_sft",
               from_weight=str(pre.weights_path), shard_dir=str(tmp_path / "sft_shards"), max_steps=30,
               add_system_ratio=0.0, empty_think_ratio=1.0)
    res = train(SFT, cfg, _tok(workspace))
    assert sum(res.losses[-3:]) / 3 < sum(res.losses[:3]) / 3 - 0.5
    assert res.weights_path.name == "full_sft_64.safetensors"


def test_bad_config_fails_before_training(workspace, tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        train(PRETRAIN, _cfg(workspace, tmp_path, batch_size=0), _tok(workspace))
    with pytest.raises(ValueError, match="dataset too small"):
        train(PRETRAIN, _cfg(workspace, tmp_path, batch_size=100_000), _tok(workspace))
    with pytest.raises(FileNotFoundError):
        train(PRETRAIN, _cfg(workspace, tmp_path, from_weight=str(tmp_path / "missing.safetensors")),
              _tok(workspace))
    assert not (tmp_path / "out" / "pretrain_64.safetensors").exists()


def test_cli_flags_map_to_config(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('learning_rate = 0.01\nbatch_size = 3\n')
    args = build_parser().parse_args(["pretrain", "--config", str(toml), "--batch_size", "5",
                                      "--max_seq_len", "128", "--from_resume", "1"])
    cfg = build_train_config(args, {**PRETRAIN.defaults, "stage": "pretrain"})
    assert cfg.batch_size == 5            # flag beats config file
    assert cfg.learning_rate == 0.01      # config file beats stage default
    assert cfg.max_seq_len == 128 and cfg.from_resume == 1
    assert cfg.save_weight == "pretrain"  # stage default
    sft_args = build_parser().parse_args(["sft"])
    sft_cfg = build_train_config(sft_args, {**SFT.defaults, "stage": "sft"})
    assert sft_cfg.learning_rate == 1e-5 and sft_cfg.save_weight == "full_sft"


def test_cli_reports_malformed_line_without_traceback(workspace, tmp_path, capsys):
    from minimind.cli import main
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n', encoding="utf-8")
    code = main(["pretrain", "--data_path", str(bad), "--tokenizer_path", str(workspace["tok"]),
                 "--save_dir", str(tmp_path / "out"), "--shard_dir", str(tmp_path / "sh"), "--progress", "0",
                 "--num_workers", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{bad}:3" in err and "Traceback" not in err
    assert not (tmp_path / "sh").exists()  # nothing half-written


def test_batch_without_targets_gives_zero_loss_not_nan():
    from minimind.config import ModelConfig
    from minimind.data import Batch
    from minimind.model import MiniMindForCausalLM
    from minimind.train.stages.base import next_token_loss
    model = MiniMindForCausalLM(ModelConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                            num_key_value_heads=2, vocab_size=50, max_position_embeddings=32))
    ids = torch.randint(0, 50, (2, 8))
    batch = Batch(ids, torch.full_like(ids, -100), torch.arange(8).expand(2, 8), torch.zeros(2, 8, dtype=torch.int32), 0)
    out = next_token_loss(model, batch)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
