"""Post-training stages on the one loop: LoRA, DPO and distillation learn what they should, and
``minimind data prepare`` builds exactly the cache a training run then reuses."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from minimind.config import TrainConfig
from minimind.model import load_model
from minimind.train.loop import train
from minimind.train.stages import (PRETRAIN, SFT, DistillOptions, DistillStage, DPOOptions, DPOStage,
                                   LoRAOptions, LoRAStage)
from tests.test_train_loop import _corpus, _sft

COLORS = ["red", "blue", "green", "black", "white", "pink"]


def _dpo_pairs(path: Path, n: int, seed: int) -> Path:
    """A toy preference: the chosen answer repeats the colour asked about, the rejected one names
    another colour.  Learnable by copying, invisible to a model that only learned the format."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            c = rng.choice(COLORS)
            wrong = rng.choice([x for x in COLORS if x != c])
            user = {"role": "user", "content": f"say {c}"}
            f.write(json.dumps({"chosen": [user, {"role": "assistant", "content": f"{c} {c}"}],
                                "rejected": [user, {"role": "assistant", "content": f"{wrong} {wrong}"}]})
                    + "\n")
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict:
    """A tokenizer, a pretrained and an SFT model (tiny, CPU, fp32), shared by the tests."""
    from minimind.tokenizer import MiniMindTokenizer, iter_texts_from_jsonl, train_tokenizer
    root = tmp_path_factory.mktemp("post")
    pre = _corpus(root / "pre.jsonl")
    with open(pre, "a", encoding="utf-8") as f:  # the colour words, so they are single tokens
        for _ in range(50):
            f.write(json.dumps({"text": " ".join(random.Random(_).choices(COLORS, k=20)) + " say"}) + "\n")
    sft = _sft(root / "sft.jsonl", n=200)
    train_tokenizer(iter_texts_from_jsonl(pre), root / "tok", vocab_size=400, show_progress=False)
    tok = MiniMindTokenizer.from_dir(root / "tok")
    base = dict(tokenizer_path=str(root / "tok"), save_dir=str(root / "out"), checkpoint_dir=str(root / "ck"),
                preset="tiny", hidden_size=64, num_hidden_layers=2, vocab_size=400, batch_size=4,
                max_seq_len=64, learning_rate=3e-3, warmup_steps=2, log_interval=1, save_interval=0,
                progress=0, num_workers=1, device="cpu", dtype="float32", seed=7)
    pre_res = train(PRETRAIN, TrainConfig(stage="pretrain", data_path=str(pre), max_steps=30,
                                          shard_dir=str(root / "sh_pre"), **base), tok)
    sft_res = train(SFT, TrainConfig(stage="sft", data_path=str(sft), save_weight="full_sft",
                                     from_weight=str(pre_res.weights_path), max_steps=30,
                                     shard_dir=str(root / "sh_sft"), add_system_ratio=0.0,
                                     empty_think_ratio=1.0, **base), tok)
    return {"root": root, "tok": tok, "sft_data": sft, "base": base, "pre_w": pre_res.weights_path,
            "sft_w": sft_res.weights_path}


def _cfg(ws: dict, tmp: Path, **kw) -> TrainConfig:
    base = {**ws["base"], "save_dir": str(tmp / "out"), "checkpoint_dir": str(tmp / "ck")}
    base.update(kw)
    return TrainConfig(**base)


# ---- LoRA ----------------------------------------------------------------------------------------
def test_lora_trains_adapters_only_and_lowers_loss(ws, tmp_path):
    cfg = _cfg(ws, tmp_path, stage="lora", data_path=str(ws["sft_data"]), save_weight="lora_test",
               from_weight=str(ws["pre_w"]), max_steps=25, shard_dir=str(tmp_path / "sh"),
               add_system_ratio=0.0, empty_think_ratio=1.0, learning_rate=1e-2)
    stage = LoRAStage(LoRAOptions(lora_rank=4, lora_targets="all"))
    res = train(stage, cfg, ws["tok"])
    assert sum(res.losses[-3:]) / 3 < sum(res.losses[:3]) / 3 - 0.3, res.losses
    # the export holds adapters only, with the reference key format and the config in its metadata
    with safe_open(str(res.weights_path), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert keys and all(k.endswith((".lora.A.weight", ".lora.B.weight")) for k in keys)
    assert json.loads(meta["minimind_lora"])["rank"] == 4
    # the base weights in the resume file are the untouched pretrained ones
    state = torch.load(res.resume_path, weights_only=True)["model"]
    base = load_model(ws["pre_w"]).state_dict()
    for k, v in base.items():
        assert torch.equal(state[k], v), k
    # base + adapter, loaded the way chat does, scores the SFT data better than the base alone
    from minimind.model.lora import load_lora
    tuned = load_model(ws["pre_w"])
    load_lora(tuned, res.weights_path)
    assert _sft_loss(tuned, ws, tmp_path) < _sft_loss(load_model(ws["pre_w"]), ws, tmp_path) - 0.3
    # `minimind lora merge` writes one plain weights file with the same logits as base + adapter
    from minimind.cli import main
    merged_path = tmp_path / "merged.safetensors"
    assert main(["lora", "merge", "--weight", str(ws["pre_w"]), "--lora_weight", str(res.weights_path),
                 "--out", str(merged_path)]) == 0
    merged = load_model(merged_path).eval()
    assert set(merged.state_dict()) == set(base)
    ids = torch.randint(0, 400, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = tuned.eval()(ids).logits, merged(ids).logits
    diff = float((want - got).abs().max())
    assert diff <= 1e-5 * float(want.abs().max()) + 1e-5, diff
    assert float((want - load_model(ws["pre_w"])(ids).logits).abs().max()) > 100 * diff  # the adapter matters


def _sft_loss(model, ws, tmp_path) -> float:
    from minimind.train.stages.base import next_token_loss
    cfg = _cfg(ws, tmp_path, stage="sft", data_path=str(ws["sft_data"]), shard_dir=str(tmp_path / "sh_eval"),
               add_system_ratio=0.0, empty_think_ratio=1.0)
    ds = SFT.build_dataset(cfg, ws["tok"])
    with torch.no_grad():
        return float(next_token_loss(model.eval(), ds.get_batch(0, range(16))).loss)


# ---- DPO -----------------------------------------------------------------------------------------
def test_dpo_raises_preference_accuracy(ws, tmp_path):
    train_pairs = _dpo_pairs(tmp_path / "dpo.jsonl", 120, seed=1)
    held_out = _dpo_pairs(tmp_path / "dpo_eval.jsonl", 40, seed=2)
    stage = DPOStage(DPOOptions(beta=0.5, loss_type="sigmoid"))
    cfg = _cfg(ws, tmp_path, stage="dpo", data_path=str(train_pairs), save_weight="dpo",
               from_weight=str(ws["sft_w"]), max_steps=40, epochs=10, learning_rate=1e-3,
               shard_dir=str(tmp_path / "sh_dpo"), batch_size=4)
    before = _pref_accuracy(load_model(ws["sft_w"]), held_out, ws, tmp_path)
    res = train(stage, cfg, ws["tok"])
    after = _pref_accuracy(load_model(res.weights_path), held_out, ws, tmp_path)
    # measured 0.625 -> 0.825 (a random or untrained preference would stay near the start)
    assert after >= 0.75 and after >= before + 0.15, (before, after)
    rec = [json.loads(x) for x in res.metrics_path.read_text().splitlines()]
    assert {"reward_chosen", "reward_rejected", "margin", "pref_accuracy"} <= set(rec[0])
    assert rec[0]["margin"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the first step
    assert sum(r["margin"] for r in rec[-10:]) / 10 > 0.1  # measured ~0.3


def _pref_accuracy(model, pairs: Path, ws, tmp_path) -> float:
    """Share of pairs whose chosen response has the higher log-probability under ``model``."""
    from minimind.data import ShardReader
    from minimind.data.dpo import DPODataset, load_or_prepare_dpo_shards
    info = load_or_prepare_dpo_shards(pairs, tmp_path / "sh_eval_dpo", ws["tok"], max_len=65, num_proc=1,
                                      progress=False)
    ds = DPODataset(ShardReader(info.out_dir), seq_len=64, seed=0)
    wins = total = 0
    with torch.no_grad():
        for r in range(ds.num_rows(0)):
            batch = ds.get_batch(0, [r])
            logps, _ = DPOStage.response_logps(model.eval(), batch)
            wins += int((logps[0::2] > logps[1::2]).sum())
            total += batch.num_pairs
    assert total == 40
    return wins / total


def test_dpo_reference_cache_equals_on_the_fly(ws, tmp_path):
    """Cached reference log-probs are keyed by pair, not by batch position: over two epochs (other
    batch compositions) they equal freshly computed ones."""
    from minimind.train.stages.base import StageContext
    from minimind.train.distributed import DistInfo
    pairs = _dpo_pairs(tmp_path / "dpo.jsonl", 30, seed=3)
    cfg = _cfg(ws, tmp_path, stage="dpo", data_path=str(pairs), from_weight=str(ws["sft_w"]),
               shard_dir=str(tmp_path / "sh"), batch_size=2)
    ctx = StageContext(cfg=cfg, device=torch.device("cpu"), dtype=torch.float32, info=DistInfo(),
                       tokenizer=ws["tok"])
    cached, fresh = DPOStage(DPOOptions(ref_cache=1)), DPOStage(DPOOptions(ref_cache=0))
    ds = cached.build_dataset(cfg, ws["tok"])
    for s in (cached, fresh):
        s.setup(ctx)
    for epoch in (0, 1):
        for r in range(0, ds.num_rows(epoch) - 1, 2):
            batch = ds.get_batch(epoch, [r, r + 1])
            torch.testing.assert_close(cached.reference_logps(batch), fresh.reference_logps(batch),
                                       rtol=1e-6, atol=1e-5)
    assert len(cached._ref_cache) == ds.num_pairs == 30


def test_dpo_rejects_pairs_without_a_shared_prompt(ws, tmp_path):
    from minimind.cli import main
    bad = tmp_path / "bad.jsonl"
    ok = {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
          "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "y"}]}
    diff = {"chosen": ok["chosen"], "rejected": [{"role": "user", "content": "b"}, ok["rejected"][1]]}
    bad.write_text(json.dumps(ok) + "\n" + json.dumps(diff) + "\n")
    code = main(["dpo", "--data_path", str(bad), "--tokenizer_path", str(ws["root"] / "tok"),
                 "--from_weight", str(ws["sft_w"]), "--save_dir", str(tmp_path / "o"),
                 "--shard_dir", str(tmp_path / "sh"), "--progress", "0", "--num_workers", "1"])
    assert code == 2


# ---- distillation --------------------------------------------------------------------------------
def test_distillation_moves_student_toward_teacher(ws, tmp_path):
    """A fresh, smaller MoE student trained on the SFT teacher's outputs: the KL to the teacher
    falls.  alpha=0 so only the teacher signal trains it."""
    cfg = _cfg(ws, tmp_path, stage="distill", data_path=str(ws["sft_data"]), save_weight="full_dist",
               from_weight="none", hidden_size=32, use_moe=1, max_steps=30, learning_rate=1e-2,
               shard_dir=str(tmp_path / "sh"), add_system_ratio=0.0, empty_think_ratio=1.0)
    stage = DistillStage(DistillOptions(from_teacher_weight=str(ws["sft_w"]), alpha=0.0, temperature=2.0))
    res = train(stage, cfg, ws["tok"])
    kl = [json.loads(x)["kl"] for x in res.metrics_path.read_text().splitlines()]
    assert sum(kl[-3:]) / 3 < 0.5 * sum(kl[:3]) / 3, kl
    student = load_model(res.weights_path)
    assert student.config.use_moe and student.config.hidden_size == 32


def test_distillation_refuses_another_tokenizer(ws, tmp_path):
    from minimind.tokenizer import iter_texts_from_jsonl, train_tokenizer
    from minimind.model import save_weights
    teacher_dir = tmp_path / "teacher"
    save_weights(load_model(ws["sft_w"]), teacher_dir / "teacher.safetensors")
    train_tokenizer(iter_texts_from_jsonl(ws["sft_data"]), teacher_dir / "tokenizer", vocab_size=300,
                    show_progress=False)
    cfg = _cfg(ws, tmp_path, stage="distill", data_path=str(ws["sft_data"]), from_weight="none",
               max_steps=2, shard_dir=str(tmp_path / "sh"))
    stage = DistillStage(DistillOptions(from_teacher_weight=str(teacher_dir / "teacher.safetensors")))
    with pytest.raises(ValueError, match="tokenizer"):
        train(stage, cfg, ws["tok"])


# ---- data prepare -> training reuse ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_data_prepare_output_is_what_training_reads(ws, tmp_path, kind, monkeypatch, capsys):
    from minimind.cli import main
    monkeypatch.chdir(tmp_path)  # default cache folder data_cache/ under the working directory
    data = ws["sft_data"] if kind == "sft" else _dpo_pairs(tmp_path / "p.jsonl", 40, seed=5)
    flags = ["--data_path", str(data), "--tokenizer_path", str(ws["root"] / "tok"), "--max_seq_len", "64",
             "--progress", "0", "--num_workers", "1"]
    assert main(["data", "prepare", "--kind", kind, *flags]) == 0
    built = [p for p in (tmp_path / "data_cache").iterdir()]
    assert len(built) == 1
    stamp = (built[0] / "meta.json").stat().st_mtime_ns
    capsys.readouterr()
    train_flags = [*flags, "--preset", "tiny", "--hidden_size", "64", "--num_hidden_layers", "2",
                   "--vocab_size", "400", "--batch_size", "2", "--max_steps", "1", "--device", "cpu",
                   "--dtype", "float32", "--save_dir", str(tmp_path / "out"), "--checkpoint_dir",
                   str(tmp_path / "ck"), "--from_weight", str(ws["sft_w"] if kind == "dpo" else "none")]
    assert main([kind, *train_flags]) == 0
    assert [p for p in (tmp_path / "data_cache").iterdir()] == built  # no second cache folder
    assert (built[0] / "meta.json").stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_rpo_adds_the_chosen_answers_per_token_nll(ws, tmp_path):
    """``--rpo_alpha a``: loss = DPO loss + a * (mean NLL over the chosen answers' tokens), checked
    against a direct computation from the logits."""
    from minimind.train.distributed import DistInfo
    from minimind.train.stages.base import StageContext
    pairs = _dpo_pairs(tmp_path / "dpo.jsonl", 12, seed=4)
    cfg = _cfg(ws, tmp_path, stage="dpo", data_path=str(pairs), from_weight=str(ws["sft_w"]),
               shard_dir=str(tmp_path / "sh"), batch_size=2)
    ctx = StageContext(cfg=cfg, device=torch.device("cpu"), dtype=torch.float32, info=DistInfo(),
                       tokenizer=ws["tok"])
    plain, rpo = DPOStage(DPOOptions(beta=0.5)), DPOStage(DPOOptions(beta=0.5, rpo_alpha=0.7))
    for s in (plain, rpo):
        s.setup(ctx)
    ds = plain.build_dataset(cfg, ws["tok"])
    batch = ds.get_batch(0, [0, 1])
    policy = load_model(ws["pre_w"]).eval()  # differs from the reference, so the DPO term is not trivial
    with torch.no_grad():
        a, b = plain.compute_loss(policy, batch), rpo.compute_loss(policy, batch)
        logp = torch.log_softmax(policy(batch.input_ids, position_ids=batch.position_ids,
                                        doc_ids=batch.doc_ids).logits.double(), -1)
    chosen = (batch.targets != -100) & (batch.seq_index >= 0) & (batch.seq_index % 2 == 0)
    picked = logp.gather(-1, batch.targets.clamp(min=0)[..., None])[..., 0]
    nll = float(-picked[chosen].sum() / chosen.sum())
    assert float(b.loss) == pytest.approx(float(a.loss) + 0.7 * nll, rel=1e-5)
    assert float(b.metrics["nll_chosen"]) == pytest.approx(nll, rel=1e-5)
    assert nll > 0.1
