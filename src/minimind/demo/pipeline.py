"""``minimind demo``: the embedded default, end to end on data the project builds itself.

The pipeline is a list of steps sharing one :class:`DemoContext`; later stages (DPO, RL, export,
evaluation) are added by appending steps to :data:`DEFAULT_STEPS`.  Each step records its figures in
``ctx.results[step.name]`` and the report (:mod:`minimind.demo.report`) renders whatever is there.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from minimind.config import TrainConfig


@dataclass
class DemoSettings:
    out_dir: Path = Path("out/demo")
    seed: int = 0
    vocab_size: int = 4096
    preset: str = "tiny"
    num_hidden_layers: int = 2  # two layers learn more per CPU-minute than the preset's four
    seq_len: int = 256
    sft_seq_len: int = 640
    batch_size: int = 8
    pretrain_steps: int = 700
    pretrain_lr: float = 3e-3
    sft_epochs: int = 2
    n_sft: int = 5000  # many distinct SFT items: copying the prompt's numbers beats memorising answers
    sft_lr: float = 1e-3
    eval_tasks: int = 160
    device: str = "auto"
    pretrain_chars: int = 1_500_000
    n_eval: int = 300
    task_level: str = "easy"
    # The generation prompt ends with an empty think block; keep it in every SFT sample so a tiny
    # model sees one consistent format (the reference drops it from 80% of samples).
    empty_think_ratio: float = 1.0

    @classmethod
    def quick(cls, out_dir: Path) -> "DemoSettings":
        """A ~1 minute version for tests and smoke runs."""
        return cls(out_dir=out_dir, vocab_size=1024, seq_len=128, sft_seq_len=256, batch_size=8, pretrain_steps=30,
                   sft_epochs=1, eval_tasks=24, pretrain_chars=120_000, n_sft=200, n_eval=40)


@dataclass
class DemoContext:
    settings: DemoSettings
    results: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, Path] = field(default_factory=dict)
    tokenizer: Any = None

    @property
    def out(self) -> Path:
        return self.settings.out_dir

    def train_config(self, **kw: Any) -> TrainConfig:
        s = self.settings
        base = dict(tokenizer_path=str(self.out / "tokenizer"), save_dir=str(self.out),
                    checkpoint_dir=str(self.out / "checkpoints"), preset=s.preset, vocab_size=s.vocab_size,
                    num_hidden_layers=s.num_hidden_layers,
                    batch_size=s.batch_size, max_seq_len=s.seq_len, seed=s.seed, device=s.device,
                    log_interval=5, save_interval=0, num_workers=1, progress=1,
                    shard_dir=str(self.out / "cache" / kw.get("stage", "run")))
        base.update(kw)
        return TrainConfig(**base)


class DemoStep(Protocol):
    name: str

    def run(self, ctx: DemoContext) -> None: ...


class BuildCorpus:
    name = "corpus"

    def run(self, ctx: DemoContext) -> None:
        from minimind.demo.corpus import build_demo_corpus
        s = ctx.settings
        stats = build_demo_corpus(ctx.out / "data", seed=s.seed, level=s.task_level,
                                  pretrain_chars=s.pretrain_chars, n_sft=s.n_sft, n_eval=s.n_eval)
        ctx.results[self.name] = stats
        for name in ("pretrain", "pretrain_heldout", "sft", "eval_tasks"):
            ctx.artifacts[name] = ctx.out / "data" / f"{name}.jsonl"


class TrainTokenizer:
    name = "tokenizer"

    def run(self, ctx: DemoContext) -> None:
        from minimind.tokenizer import iter_texts_from_jsonl, train_tokenizer

        def texts():
            yield from iter_texts_from_jsonl(ctx.artifacts["pretrain"])
            yield from iter_texts_from_jsonl(ctx.artifacts["sft"])

        ctx.tokenizer = train_tokenizer(texts(), ctx.out / "tokenizer", vocab_size=ctx.settings.vocab_size,
                                        show_progress=False)
        ctx.results[self.name] = {"vocab_size": ctx.tokenizer.vocab_size}


class Pretrain:
    name = "pretrain"

    def run(self, ctx: DemoContext) -> None:
        from minimind.train.loop import train
        from minimind.train.stages import PRETRAIN
        s = ctx.settings
        cfg = ctx.train_config(stage="pretrain", data_path=str(ctx.artifacts["pretrain"]),
                               save_weight="pretrain", learning_rate=s.pretrain_lr, epochs=50,
                               max_steps=s.pretrain_steps, warmup_steps=max(s.pretrain_steps // 20, 1),
                               weight_decay=0.1)
        heldout = _heldout_dataset(ctx, cfg)
        before = _bpb_of_fresh_model(ctx, cfg, heldout)
        res = train(PRETRAIN, cfg, ctx.tokenizer)
        ctx.artifacts["pretrain_weights"] = res.weights_path
        ctx.artifacts["pretrain_metrics"] = res.metrics_path
        after = _bpb_of(ctx, res.weights_path, heldout)
        ctx.results[self.name] = {
            "steps": res.steps, "seconds": round(res.seconds, 1), "final_loss": res.final_loss,
            "tokens_per_s": round(res.tokens_per_s, 1), "useful_tokens_per_s": round(res.useful_tokens_per_s, 1),
            "heldout_bpb_before": before, "heldout_bpb_after": after,
            "unigram_bpb": _unigram(ctx, cfg, heldout)}


class SupervisedFinetune:
    name = "sft"

    def run(self, ctx: DemoContext) -> None:
        from minimind.train.loop import train
        from minimind.train.stages import SFT
        s = ctx.settings
        cfg = ctx.train_config(stage="sft", data_path=str(ctx.artifacts["sft"]), save_weight="full_sft",
                               from_weight=str(ctx.artifacts["pretrain_weights"]), learning_rate=s.sft_lr,
                               epochs=s.sft_epochs, warmup_steps=5, weight_decay=0.0,
                               empty_think_ratio=s.empty_think_ratio,
                               max_seq_len=s.sft_seq_len, batch_size=max(s.batch_size * s.seq_len // s.sft_seq_len, 1))
        res = train(SFT, cfg, ctx.tokenizer)
        ctx.artifacts["sft_weights"] = res.weights_path
        ctx.artifacts["sft_metrics"] = res.metrics_path
        ctx.results[self.name] = {"steps": res.steps, "seconds": round(res.seconds, 1),
                                  "final_loss": res.final_loss,
                                  "useful_tokens_per_s": round(res.useful_tokens_per_s, 1)}


class TaskEval:
    """Same held-out prompts, same greedy decoding, pretrained vs SFT model."""

    name = "task_eval"

    def run(self, ctx: DemoContext) -> None:
        from minimind.demo.checks import check_answer, check_format
        from minimind.eval.tasks import evaluate_tasks
        rows = _read_jsonl(ctx.artifacts["eval_tasks"])[: ctx.settings.eval_tasks]
        out = {}
        for label in ("pretrain", "sft"):
            engine = _engine(ctx, ctx.artifacts[f"{label}_weights"])
            out[label] = evaluate_tasks(engine, ctx.tokenizer, rows, check_answer, format_checker=check_format)
        ctx.results[self.name] = out


DEFAULT_STEPS: list[DemoStep] = [BuildCorpus(), TrainTokenizer(), Pretrain(), SupervisedFinetune(), TaskEval()]


# ---- helpers ------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]


def _heldout_dataset(ctx: DemoContext, cfg: TrainConfig):
    from minimind.data import PackedDataset, ShardReader, load_or_prepare_shards
    out = ctx.out / "cache" / "heldout"
    load_or_prepare_shards(ctx.artifacts["pretrain_heldout"], out, ctx.tokenizer, kind="pretrain",
                           num_proc=1, progress=False)
    return PackedDataset(ShardReader(out), seq_len=cfg.max_seq_len, seed=0, mode="pretrain")


def _bpb_of_fresh_model(ctx: DemoContext, cfg: TrainConfig, heldout) -> float:
    from minimind.eval.bpb import evaluate_bpb
    from minimind.model import MiniMindForCausalLM
    torch.manual_seed(cfg.seed)
    model = MiniMindForCausalLM(cfg.model_config(vocab_size=ctx.tokenizer.vocab_size))
    return round(evaluate_bpb(model, heldout, ctx.tokenizer)["bpb"], 4)


def _bpb_of(ctx: DemoContext, weights: Path, heldout) -> float:
    from minimind.eval.bpb import evaluate_bpb
    from minimind.model import load_model
    return round(evaluate_bpb(load_model(weights), heldout, ctx.tokenizer)["bpb"], 4)


def _unigram(ctx: DemoContext, cfg: TrainConfig, heldout) -> float:
    from minimind.data import ShardReader
    from minimind.eval.bpb import unigram_bpb
    from minimind.train.stages.base import shard_dir_for
    train_dir = shard_dir_for(cfg, "pretrain", ctx.tokenizer.hash, cfg.data_path)
    ids = np.asarray(ShardReader(train_dir).ids)
    return round(unigram_bpb(ids, heldout, ctx.tokenizer), 4)


def _engine(ctx: DemoContext, weights: Path):
    from minimind.infer import GenerationEngine
    from minimind.model import load_model
    model = load_model(weights).eval()
    return GenerationEngine(model, ctx.tokenizer)


def run_demo(settings: DemoSettings, steps: list[DemoStep] | None = None) -> DemoContext:
    from minimind.demo.report import write_report
    ctx = DemoContext(settings)
    ctx.out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    for step in steps or DEFAULT_STEPS:
        print(f"== demo: {step.name} ==", flush=True)
        t0 = time.perf_counter()
        step.run(ctx)
        ctx.timings[step.name] = round(time.perf_counter() - t0, 1)
    ctx.timings["total"] = round(time.perf_counter() - t_all, 1)
    report = write_report(ctx)
    print(f"report: {report}")
    return ctx


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out_dir", default="out/demo")
    p.add_argument("--quick", action="store_true", help="a ~1 minute smoke version")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain_steps", type=int, default=0, help="override the pretraining length")
    p.add_argument("--sft_epochs", type=int, default=0)


def demo_main(args: argparse.Namespace) -> int:
    out = Path(args.out_dir)
    s = DemoSettings.quick(out) if args.quick else DemoSettings(out_dir=out)
    s.device, s.seed = args.device, args.seed
    if args.pretrain_steps:
        s.pretrain_steps = args.pretrain_steps
    if args.sft_epochs:
        s.sft_epochs = args.sft_epochs
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    run_demo(s)
    return 0
