"""The one training loop: loss falls, only assistant tokens train, accumulation == big batch, bf16 / compile /
MoE run through it, a killed run resumes bit-identically, bad settings fail before any data is read."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import random
import re
import shutil
from pathlib import Path

import pytest
import torch

from minimind.cli import build_parser, build_stage, build_train_config, main
from minimind.config import TrainConfig
from minimind.data import IGNORE_INDEX
from minimind.train.loop import TrainingInterrupted, train
from minimind.train.schedule import lr_at
from minimind.train.stages import PRETRAIN, SFT
from minimind.train.stages.lm import SFTStage
from tests.weights_check import assert_same_weights

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
    # warmup then cosine decay, exactly the schedule function's values at every step
    for r in records:
        assert r["lr"] == lr_at(r["step"] - 1, 40, 3e-3, 2, 0.1), r
    lrs = [r["lr"] for r in records]
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[5]


class _Killed(RuntimeError):
    pass


def _multi_sft(path: Path, n: int = 80, seed: int = 1) -> Path:
    """Conversations of 1-3 turns whose user and assistant texts vary in length (so rows and
    micro-batches hold uneven numbers of assistant tokens)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            conv = []
            for _ in range(rng.randint(1, 3)):
                conv.append({"role": "user", "content": " ".join(rng.choice(WORDS[:9])
                                                                 for _ in range(rng.randint(1, 8)))})
                conv.append({"role": "assistant", "content": " ".join(rng.choice(WORDS[9:])
                                                                      for _ in range(rng.randint(1, 12)))})
            f.write(json.dumps({"conversations": conv}, ensure_ascii=False) + "\n")
    return path


FULL_STEPS = 8


@pytest.fixture(scope="module")
def full_run(workspace):
    """One uninterrupted 8-step pretraining run (periodic save at step 4); tests copy its folder."""
    out = workspace["root"] / "full"
    res = train(PRETRAIN, _cfg(workspace, out, max_steps=FULL_STEPS, save_interval=4), _tok(workspace))
    assert res.steps == FULL_STEPS and len(res.losses) == FULL_STEPS
    return {"out": out, "res": res}


def _copy_run(full_run, dest: Path) -> Path:
    shutil.copytree(full_run["out"], dest)
    return dest


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resume_is_bit_identical(workspace, full_run, tmp_path):
    full = full_run["res"]

    def kill_at_5(step, record):
        if step == 5:
            raise _Killed()

    cfg_b = _cfg(workspace, tmp_path / "b", max_steps=FULL_STEPS, save_interval=4)
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
    with pytest.raises(ValueError, match=r"pre\.jsonl: too little data for one optimizer step.*--batch_size"):
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
    batch = Batch(ids, torch.full_like(ids, -100), torch.arange(8).expand(2, 8),
                  torch.zeros(2, 8, dtype=torch.int32), 0)
    out = next_token_loss(model, batch)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---- SFT: only assistant tokens are trained ----------------------------------------------------------
START, END = "<|im_start|>assistant\n", "<|im_end|>\n"


def _expected_trained(tok, rows) -> torch.Tensor:
    """[B, T] bool: which targets should be trained, derived from *text* rather than from the loss mask.

    Token ``j`` of a segment is trained iff the decoded text before it has an ``<|im_start|>assistant\\n``
    with no complete ``<|im_end|>\\n`` after it (assistant body plus both end-marker tokens); the
    target at input position ``i`` is token ``i + 1`` when both lie in the same segment."""
    tokens, seg = rows.tokens, rows.seg
    B, L = tokens.shape
    in_span = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        j0 = 0
        while j0 < L:
            j1 = j0
            while j1 < L and seg[b, j1] == seg[b, j0]:
                j1 += 1
            ids = tokens[b, j0:j1].tolist()
            for j in range(len(ids)):
                before = tok.decode(ids[:j], skip_special_tokens=False)
                open_at = before.rfind(START)
                in_span[b, j0 + j] = open_at >= 0 and before.find(END, open_at + len(START)) < 0
            j0 = j1
    same_seg = torch.from_numpy(seg[:, 1:] == seg[:, :-1])
    return same_seg & in_span[:, 1:]


def _sft_dataset(workspace, tmp_path, **kw):
    data = _multi_sft(tmp_path / "multi.jsonl")
    cfg = _cfg(workspace, tmp_path, stage="sft", data_path=str(data), save_weight="full_sft",
               shard_dir=str(tmp_path / "sft_shards"), **kw)
    return cfg, SFT.build_dataset(cfg, _tok(workspace))


def test_sft_targets_are_ignore_index_exactly_outside_assistant_spans(workspace, tmp_path):
    tok = _tok(workspace)
    # system prompts on every sample and multi-turn chats: system, user and later user turns must all
    # be masked; 128 tokens so that some conversations are cut mid-answer too.
    cfg, ds = _sft_dataset(workspace, tmp_path, max_seq_len=128, add_system_ratio=1.0, empty_think_ratio=0.5)
    rows_idx = list(range(min(ds.num_rows(0), 8)))
    rows = ds.get_rows(0, rows_idx)
    batch = ds.get_batch(0, rows_idx)
    want = _expected_trained(tok, rows)
    got = batch.targets != IGNORE_INDEX
    assert torch.equal(got, want), (got ^ want).nonzero()[:10]
    # trained targets are the next token itself; the batch counts them
    nxt = torch.from_numpy(rows.tokens[:, 1:])
    assert torch.equal(batch.targets[got], nxt[got])
    assert batch.num_target_tokens == int(want.sum())
    # the sample exercises what the mask must exclude: system turns and second user turns
    texts = [tok.decode(r.tolist(), skip_special_tokens=False) for r in rows.tokens]
    assert any("<|im_start|>system" in t for t in texts)
    assert any(t.count("<|im_start|>user") >= 2 for t in texts)
    assert 0 < int(want.sum()) < int(batch.num_real_tokens) // 2


def test_sft_non_assistant_positions_get_no_gradient(workspace, tmp_path):
    from minimind.model import MiniMindForCausalLM
    tok = _tok(workspace)
    cfg, ds = _sft_dataset(workspace, tmp_path, max_seq_len=64, add_system_ratio=0.5, empty_think_ratio=0.5)
    # four rows that hold assistant tokens (a 64-token row may hold only a cut-off prompt)
    rows_idx = [r for r in range(ds.num_rows(0)) if ds.get_batch(0, [r]).num_target_tokens > 0][:4]
    batch = ds.get_batch(0, rows_idx)
    want = _expected_trained(tok, ds.get_rows(0, rows_idx))
    torch.manual_seed(0)
    model = MiniMindForCausalLM(cfg.model_config(vocab_size=tok.vocab_size))
    kept = {}

    def keep_logits(_module, _inputs, out):
        out.retain_grad()
        kept["logits"] = out

    handle = model.lm_head.register_forward_hook(keep_logits)
    try:
        out = SFT.compute_loss(model, batch)
    finally:
        handle.remove()
    out.loss.backward()
    grad = kept["logits"].grad  # d loss / d logits, [B, T, V]
    has_grad = grad.abs().sum(-1) > 0
    assert torch.equal(has_grad, want), (has_grad ^ want).nonzero()[:10]
    # and the loss is the mean CE over exactly those positions (nothing else, nothing less)
    logits = kept["logits"].detach()
    nxt = torch.from_numpy(ds.get_rows(0, rows_idx).tokens[:, 1:])
    manual = torch.nn.functional.cross_entropy(logits[want], nxt[want])
    assert out.loss.item() == pytest.approx(manual.item(), rel=1e-5)
    assert out.weight == int(want.sum())


# ---- gradient accumulation == one big batch ----------------------------------------------------------
def _final_model(res) -> dict[str, torch.Tensor]:
    return _state(res.resume_path)["model"]


def _assert_same_run(a, b, rtol=1e-5):
    assert len(a.losses) == len(b.losses)
    for x, y in zip(a.losses, b.losses):
        assert x == pytest.approx(y, rel=rtol, abs=1e-6), (a.losses, b.losses)
    assert_same_weights(_final_model(a), _final_model(b), rtol)


def test_accumulation_equals_big_batch_pretrain(workspace, tmp_path):
    big = train(PRETRAIN, _cfg(workspace, tmp_path / "big", batch_size=4, accumulation_steps=1, max_steps=5),
                _tok(workspace))
    acc = train(PRETRAIN, _cfg(workspace, tmp_path / "acc", batch_size=2, accumulation_steps=2, max_steps=5),
                _tok(workspace))
    _assert_same_run(big, acc)


class _UnweightedSFT(SFTStage):
    """Averages micro-batch means (every micro-batch counts the same): the bug weighting prevents."""

    def batch_weight(self, batch) -> float:
        return 1.0


def test_accumulation_equals_big_batch_sft_uneven_tokens(workspace, tmp_path):
    kw = dict(max_seq_len=64, add_system_ratio=0.0, empty_think_ratio=1.0, max_steps=5)
    cfg_big, ds = _sft_dataset(workspace, tmp_path, batch_size=4, accumulation_steps=1, **kw)
    # the two micro-batches of most steps hold different numbers of assistant tokens
    counts = [(ds.get_batch(0, range(4 * s, 4 * s + 2)).num_target_tokens,
               ds.get_batch(0, range(4 * s + 2, 4 * s + 4)).num_target_tokens) for s in range(5)]
    assert sum(n1 != n2 for n1, n2 in counts) >= 3, counts
    cfg_acc = dataclasses.replace(cfg_big, batch_size=2, accumulation_steps=2, save_dir=str(tmp_path / "acc"),
                                  checkpoint_dir=str(tmp_path / "acc"))
    big = train(SFT, cfg_big, _tok(workspace))
    acc = train(SFT, cfg_acc, _tok(workspace))
    _assert_same_run(big, acc)
    # control: without token weighting the same comparison fails, so the check above has teeth
    cfg_bad = dataclasses.replace(cfg_acc, save_dir=str(tmp_path / "bad"),
                                  checkpoint_dir=str(tmp_path / "bad"))
    bad = train(_UnweightedSFT(), cfg_bad, _tok(workspace))
    with pytest.raises(AssertionError):
        _assert_same_run(big, bad)


# ---- precision, compile, MoE through the loop --------------------------------------------------------
def test_bf16_autocast_through_loop(workspace, full_run, tmp_path, capsys):
    from minimind.model import read_state_dict
    res = train(PRETRAIN, _cfg(workspace, tmp_path, dtype="bfloat16", max_steps=8), _tok(workspace))
    assert "dtype=bfloat16" in capsys.readouterr().out
    assert all(math.isfinite(x) for x in res.losses)
    assert sum(res.losses[-3:]) / 3 < sum(res.losses[:3]) / 3 - 0.3, res.losses
    # step 1 sees the same weights and batch as the fp32 run: close, but not equal (autocast ran)
    fp32_first = full_run["res"].losses[0]
    assert res.losses[0] != fp32_first
    assert res.losses[0] == pytest.approx(fp32_first, rel=1e-2)
    # master weights, exported weights and optimizer state stay fp32
    assert {v.dtype for v in read_state_dict(res.weights_path).values()} == {torch.float32}
    state = _state(res.resume_path)
    assert {v.dtype for v in state["model"].values()} == {torch.float32}
    opt = [t for s in state["optimizer"]["state"].values() for k, t in s.items() if k != "step"]
    assert opt and {t.dtype for t in opt} == {torch.float32}


def _compile_unavailable() -> str | None:
    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return "torch.compile on CPU needs a C++ compiler (none on PATH)"
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(3))
    except Exception as e:  # noqa: BLE001 -- any backend failure means "not usable here"
        return f"torch.compile unavailable: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return None


@pytest.mark.slow
def test_compile_through_loop_matches_eager(workspace, full_run, tmp_path):
    reason = _compile_unavailable()
    if reason:
        pytest.skip(reason)
    from minimind.model import load_model
    res = train(PRETRAIN, _cfg(workspace, tmp_path, compile=1, max_steps=FULL_STEPS, save_interval=4),
                _tok(workspace))
    eager = full_run["res"].losses
    assert len(res.losses) == len(eager)
    for c, e in zip(res.losses, eager):
        assert c == pytest.approx(e, rel=1e-3), (res.losses, eager)
    # the saved weights are the plain model's (no _orig_mod. prefixes) and reload
    model = load_model(res.weights_path)
    assert model.config.hidden_size == 64


def test_moe_through_loop(workspace, tmp_path):
    from minimind.model import load_model, read_state_dict
    res = train(PRETRAIN, _cfg(workspace, tmp_path, use_moe=1, max_steps=8, warmup_steps=0), _tok(workspace))
    assert sum(res.losses[-3:]) / 3 < sum(res.losses[:3]) / 3 - 0.3, res.losses
    assert res.weights_path.name == "pretrain_64_moe.safetensors"
    assert res.resume_path.name == "pretrain_64_moe_resume.pt"
    records = [json.loads(x) for x in res.metrics_path.read_text().splitlines()]
    assert len(records) == 8
    assert all("aux_loss" in r and r["aux_loss"] > 0 for r in records)
    # warmup_steps 0 = 1% of the run, at least one step
    assert [r["lr"] for r in records] == [lr_at(r["step"] - 1, 8, 3e-3, 1, 0.1) for r in records]
    model = load_model(res.weights_path)
    assert model.config.use_moe and model.config.num_experts == 4
    saved = read_state_dict(res.weights_path)
    assert any("expert" in k for k in saved)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in saved.items())


# ---- resume behaviours -------------------------------------------------------------------------------
@pytest.mark.parametrize("change,name", [({"batch_size": 2}, "batch_size"), ({"max_steps": 10}, "max_steps")])
def test_resume_refuses_changed_settings(workspace, full_run, tmp_path, change, name):
    out = _copy_run(full_run, tmp_path / "run")
    res = full_run["res"]
    ckpt = out / "ckpt" / res.resume_path.name
    metrics = out / "out" / res.metrics_path.name
    weights = out / "out" / res.weights_path.name
    before = {p: _digest(p) for p in (ckpt, metrics, weights)}
    cfg = _cfg(workspace, out, **{"max_steps": FULL_STEPS, "save_interval": 4, "from_resume": 1, **change})
    with pytest.raises(ValueError, match=name):
        train(PRETRAIN, cfg, _tok(workspace))
    assert {p: _digest(p) for p in before} == before


def test_from_resume_without_checkpoint_starts_from_scratch(workspace, full_run, tmp_path, capsys):
    res = train(PRETRAIN, _cfg(workspace, tmp_path, max_steps=3, from_resume=1), _tok(workspace))
    assert "starting from scratch" in capsys.readouterr().out
    assert res.steps == 3 and len(res.losses) == 3
    assert res.losses[0] == full_run["res"].losses[0]  # a fresh model, not anything loaded
    assert _state(res.resume_path)["step"] == 3


def test_resuming_a_finished_run_returns_last_loss(workspace, full_run, tmp_path, capsys):
    out = _copy_run(full_run, tmp_path / "run")
    full = full_run["res"]
    ckpt = out / "ckpt" / full.resume_path.name
    metrics = out / "out" / full.metrics_path.name
    before = (_digest(ckpt), _digest(metrics))
    calls = []
    res = train(PRETRAIN, _cfg(workspace, out, max_steps=FULL_STEPS, save_interval=4, from_resume=1),
                _tok(workspace), on_step=lambda s, r: calls.append(s))
    assert "already finished" in capsys.readouterr().out
    assert res.steps == FULL_STEPS
    assert not math.isnan(res.final_loss) and res.final_loss == full.losses[-1]
    assert res.losses == full.losses
    assert calls == []  # no step ran
    assert (_digest(ckpt), _digest(metrics)) == before


def test_keyboard_interrupt_saves_and_resumes_exactly(workspace, full_run, tmp_path, capsys):
    full = full_run["res"]
    cfg = _cfg(workspace, tmp_path, max_steps=FULL_STEPS, save_interval=4)

    def ctrl_c_at_3(step, record):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as info:
        train(PRETRAIN, cfg, _tok(workspace), on_step=ctrl_c_at_3)
    assert info.value.step == 3
    assert "--from_resume 1" in capsys.readouterr().err
    state = _state(info.value.resume_path)
    assert state["step"] == 3 and state["micro_step"] == 3
    cfg.from_resume = 1
    resumed = train(PRETRAIN, cfg, _tok(workspace))
    assert resumed.losses == full.losses[3:]
    a, b = _final_model(full), _final_model(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in resumed.metrics_path.read_text().splitlines()]
    assert steps == list(range(1, FULL_STEPS + 1))


def test_a_fresh_run_replaces_old_metrics_only_once_it_logs(workspace, full_run, tmp_path, monkeypatch):
    """A fresh run over an earlier run's folder keeps the earlier metrics file until its own first
    record: a run that dies before logging leaves the old curve whole (the old code deleted it when
    the run started), and one that logs replaces it rather than appending to it."""
    out = _copy_run(full_run, tmp_path / "run")
    metrics = full_run["res"].metrics_path
    mine = out / metrics.relative_to(full_run["out"])
    before = mine.read_text()

    from minimind.train.core import Trainer
    real_step, calls = Trainer.step, []

    def die_at_2(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # a crash inside step 2, before the first log at step 4
            raise _Killed()
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "step", die_at_2)
    with pytest.raises(_Killed):
        train(PRETRAIN, _cfg(workspace, out, max_steps=FULL_STEPS, log_interval=4), _tok(workspace))
    monkeypatch.undo()
    assert len(calls) == 2 and mine.read_text() == before
    res = train(PRETRAIN, _cfg(workspace, out, max_steps=2), _tok(workspace))
    assert res.metrics_path == mine
    assert [json.loads(x)["step"] for x in mine.read_text().splitlines()] == [1, 2]


def test_from_weight_refuses_contradicting_shape(workspace, full_run, tmp_path):
    weights = full_run["res"].weights_path
    for flag, value in (("hidden_size", 128), ("num_hidden_layers", 3), ("use_moe", 1)):
        cfg = _cfg(workspace, tmp_path, from_weight=str(weights), max_steps=2, **{flag: value})
        with pytest.raises(ValueError, match=flag):
            train(PRETRAIN, cfg, _tok(workspace))
    assert not list((tmp_path / "out").glob("*.safetensors"))


# ---- CLI: validation before any data is read ---------------------------------------------------------
def _cli_base(workspace, tmp_path) -> list[str]:
    return ["pretrain", "--data_path", str(tmp_path / "missing.jsonl"),
            "--tokenizer_path", str(workspace["tok"]),
            "--save_dir", str(tmp_path / "out"), "--checkpoint_dir", str(tmp_path / "ckpt"),
            "--shard_dir", str(tmp_path / "sh"), "--progress", "0"]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("flag,value", [("device", "tpu"), ("log_interval", "0"), ("from_resume", "7"),
                                        ("use_moe", "5"), ("warmup_steps", "-1"), ("grad_clip", "-1"),
                                        ("preset", "nope")])
def test_cli_rejects_bad_flag_before_reading_data(workspace, tmp_path, capsys, flag, value):
    code = main(_cli_base(workspace, tmp_path) + [f"--{flag}", value])
    assert code == 2
    line = _one_line_error(capsys)
    assert f"--{flag}" in line and "missing.jsonl" not in line, line
    # nothing was read or written: no shard cache, no copied tokenizer, no checkpoint folder
    for d in ("sh", "out", "ckpt"):
        assert not (tmp_path / d).exists()


@pytest.mark.parametrize("value,package", [(None, "swanlab"), ("2", "wandb")])
def test_cli_use_wandb_without_tracker_fails_fast(workspace, tmp_path, capsys, value, package):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    code = main(_cli_base(workspace, tmp_path) + ["--use_wandb"] + ([value] if value else []))
    assert code == 2
    line = _one_line_error(capsys)
    assert f"pip install {package}" in line, line
    assert not (tmp_path / "sh").exists() and not (tmp_path / "out").exists()


def test_cli_yaml_config_is_coerced_and_bad_values_name_file_and_key(workspace, tmp_path, capsys):
    yaml = pytest.importorskip("yaml")
    good = tmp_path / "run.yaml"
    good.write_text("learning_rate: 5e-4\nbatch_size: 3\n", encoding="utf-8")
    assert isinstance(yaml.safe_load(good.read_text())["learning_rate"], str)  # YAML 1.1: a string
    _, cfg = build_stage("pretrain", build_parser().parse_args(["pretrain", "--config", str(good)]))
    assert type(cfg.learning_rate) is float and cfg.learning_rate == 5e-4
    assert type(cfg.batch_size) is int and cfg.batch_size == 3

    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 5e-4\nbatch_size: abc\n", encoding="utf-8")
    with pytest.raises(ValueError) as err:
        build_stage("pretrain", build_parser().parse_args(["pretrain", "--config", str(bad)]))
    assert str(bad) in str(err.value) and "batch_size" in str(err.value)
    code = main(_cli_base(workspace, tmp_path) + ["--config", str(bad)])
    assert code == 2
    line = _one_line_error(capsys)
    assert str(bad) in line and "batch_size" in line and "abc" in line
    assert not (tmp_path / "sh").exists()


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv) + ["--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_cli_help_shows_stage_defaults_and_options(capsys):
    sft = _help(capsys, "sft")
    assert "--learning_rate LEARNING_RATE (default 1e-05)" in sft
    assert "--save_weight SAVE_WEIGHT (default 'full_sft')" in sft
    pre = _help(capsys, "pretrain")
    assert "--learning_rate LEARNING_RATE (default 0.0005)" in pre
    assert "--save_weight SAVE_WEIGHT (default 'pretrain')" in pre
    assert "--beta BETA" not in pre and "--loss_type" not in pre
    dpo = _help(capsys, "dpo")
    assert re.search(r"--beta BETA [^-]*\(default 0\.15\)", dpo), dpo
    assert re.search(r"--loss_type LOSS_TYPE [^-]*\(default 'sigmoid'\)", dpo), dpo


def test_progress_0_prints_a_line_per_log_interval(workspace, tmp_path, capsys):
    """Without the bar (--progress 0: logs, CI) training used to print nothing until the end."""
    train(PRETRAIN, _cfg(workspace, tmp_path, max_steps=4, log_interval=2, progress=0), _tok(workspace))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    assert [ln.split()[1] for ln in lines] == ["2/4", "4/4"] and all(" loss " in ln for ln in lines)


# ---- non-finite steps never reach a weights file ---------------------------------------------------
def _nan_at(monkeypatch, bad_calls: set[int]) -> None:
    """Make the pretraining loss NaN on the given (1-based) loss calls -- a runtime blow-up that no
    up-front flag check can catch."""
    import minimind.train.stages.lm as lm
    real = lm.next_token_loss
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        out = real(model, batch)
        if calls["n"] in bad_calls:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(lm, "next_token_loss", poisoned)


def test_nan_loss_stops_before_a_save_and_keeps_the_previous_weights(workspace, full_run, tmp_path,
                                                                     monkeypatch):
    """The NaN at step 3 is not read back at once (sync-free step, log every 5): the save at step 4
    refuses, with a clear error, and the files of the earlier run stay byte-identical.  Before the
    guard this run saved NaN weights over them."""
    from minimind.train.core import NonFiniteTrainingError
    run = _copy_run(full_run, tmp_path / "run")
    weights = run / "out" / "pretrain_64.safetensors"
    resume = run / "ckpt" / "pretrain_64_resume.pt"
    before = (_digest(weights), _digest(resume))
    _nan_at(monkeypatch, {3})
    cfg = _cfg(workspace, run, max_steps=FULL_STEPS, save_interval=4, log_interval=5)
    with pytest.raises(NonFiniteTrainingError, match="NaN/inf at optimizer step 3"):
        train(PRETRAIN, cfg, _tok(workspace))
    assert (_digest(weights), _digest(resume)) == before


def test_cli_nan_loss_is_a_clear_error_exit_2(workspace, full_run, tmp_path, monkeypatch, capsys):
    run = _copy_run(full_run, tmp_path / "run")
    weights = run / "out" / "pretrain_64.safetensors"
    before = _digest(weights)
    _nan_at(monkeypatch, {2})
    code = main(["pretrain", "--data_path", str(workspace["pre"]), "--tokenizer_path", str(workspace["tok"]),
                 "--save_dir", str(run / "out"), "--checkpoint_dir", str(run / "ckpt"),
                 "--shard_dir", str(run / "shards"), "--preset", "tiny", "--hidden_size", "64",
                 "--num_hidden_layers", "2", "--vocab_size", "400", "--batch_size", "4", "--max_seq_len", "64",
                 "--max_steps", "4", "--log_interval", "1", "--progress", "0", "--device", "cpu",
                 "--dtype", "float32"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error:" in err and "NaN/inf" in err and "--skip_nonfinite" in err and "Traceback" not in err
    assert _digest(weights) == before


def test_skip_nonfinite_skips_the_step_and_fails_past_the_budget(workspace, tmp_path, monkeypatch):
    """--skip_nonfinite 1: one NaN step is skipped (no update: the weights after it equal those before)
    and counted; a second one fails the run."""
    from minimind.train.core import NonFiniteTrainingError
    _nan_at(monkeypatch, {3})
    snapshots: list[dict[str, torch.Tensor]] = []
    import minimind.train.core as core
    real_step = core.Trainer.step

    def recording_step(self, *args, **kwargs):
        stats = real_step(self, *args, **kwargs)
        snapshots.append({k: v.clone() for k, v in self.base_model.state_dict().items()})
        return stats

    monkeypatch.setattr(core.Trainer, "step", recording_step)
    res = train(PRETRAIN, _cfg(workspace, tmp_path / "a", max_steps=6, skip_nonfinite=1), _tok(workspace))
    records = [json.loads(x) for x in res.metrics_path.read_text().splitlines()]
    assert [r["skipped"] for r in records] == [0, 0, 1, 0, 0, 0]
    assert all(torch.equal(snapshots[2][k], snapshots[1][k]) for k in snapshots[1])  # step 3: no update
    assert not all(torch.equal(snapshots[3][k], snapshots[2][k]) for k in snapshots[2])
    assert all(math.isfinite(r["loss"]) for r in records)

    _nan_at(monkeypatch, {2, 4})
    with pytest.raises(NonFiniteTrainingError, match="more than --skip_nonfinite 1"):
        train(PRETRAIN, _cfg(workspace, tmp_path / "b", max_steps=6, skip_nonfinite=1), _tok(workspace))
