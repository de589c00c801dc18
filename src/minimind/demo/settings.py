"""What ``minimind demo`` runs with: its settings (every knob, with the measurement behind its
default), the context its steps share, and the step protocol (:mod:`minimind.demo.pipeline` runs them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from minimind.config import TrainConfig

__all__ = ["DemoContext", "DemoSettings", "DemoStep"]


@dataclass
class DemoSettings:
    """Every knob of ``minimind demo`` (``--set FIELD=VALUE`` changes one); the comments say what a
    default was measured against."""

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
    # Muon for the blocks' matrices in pretraining and SFT (AdamW at the *_lr rates for the rest):
    # the single change that made the model copy the prompt's numbers (docs/demo.md).
    optimizer: str = "muon"
    muon_lr: float = 0.02
    sft_epochs: int = 2
    n_sft: int = 5000  # many distinct SFT items: copying the prompt's numbers beats memorising answers
    sft_lr: float = 1e-3
    eval_tasks: int = 600  # every generated held-out task (n_eval) is evaluated
    device: str = "auto"
    # "auto" trains in bf16 where the CPU/GPU has it natively, else fp32; "float32" reproduces a
    # CPU without AVX-512 BF16 on one that has it (the time budget is set for such CPUs).
    dtype: str = "auto"
    pretrain_chars: int = 1_500_000
    # 100 held-out items per kind: one item is one point, and a GRPO drift of 2 points is 2 items
    n_eval: int = 600
    task_level: str = "easy"
    # Corpus recipe knobs (see minimind.demo.corpus.build_demo_corpus), for `--set` experiments.
    # A task-dense mix (task facts 35% of the characters, 26% computed facts) was measured and not
    # adopted: the models still did not copy operands and held-out bpb got worse (docs/demo.md).
    # Task-denser than corpus.DEFAULT_MIX (30% task facts instead of 20%, less Python documentation
    # and fewer reviews); the held-out documents still follow DEFAULT_MIX, so bpb stays comparable.
    pretrain_mix: dict[str, float] | None = field(default_factory=lambda: {
        "peoples_daily": 0.33, "reviews": 0.06, "idioms": 0.12, "cedict": 0.08, "pydoc": 0.11, "task_facts": 0.30})
    fact_pool_share: float = 0.3  # idiom/dictionary lines' share of the task facts
    # computed facts, round robin: a kind named twice gets twice the items (a tool exchange is ~250
    # characters, an arithmetic line ~25, so the tool kind still takes about half the characters)
    fact_kinds: tuple[str, ...] = ("arithmetic", "arithmetic", "unit_conversion", "date_fact", "date_fact",
                                   "date_fact", "tool_call")
    sft_kinds: tuple[str, ...] | None = None  # every available kind once (a kind named twice: twice the rows)
    generic_share: float = 0.15  # open Q&A rows: longer unchecked answers that teach the chat format
    # The generation prompt ends with an empty think block; keep it in every SFT sample so a tiny
    # model sees one consistent format (the reference drops it from 80% of samples).
    empty_think_ratio: float = 1.0
    # Thinking: this share of the SFT rows of the kinds with a step-by-step reasoning (arithmetic,
    # next-day dates; minimind.tasks.rows.task_reasoning) carry it in <think>...</think>, the others
    # keep the empty block; so the model answers both ways and open_thinking works in chat and server.
    sft_think_share: float = 0.5
    # SFT rows naming the month after each month (experiment; 0 = none)
    month_rows: int = 0
    think_max_new_tokens: int = 128  # held-out replies with thinking on: reasoning + answer
    # DPO after SFT on checkable preference pairs (chosen = the SFT answer, rejected = a wrong or
    # malformed one); see minimind.demo.preferences.
    # A 2.7M model drifts fast under DPO (its tool calls and answer endings break first): a small lr
    # and a large beta, whose sigmoid saturates after a few nats of margin, keep it near the SFT model.
    n_dpo: int = 800  # training pairs (train-split items)
    n_dpo_eval: int = 160  # held-out pairs (eval-split items)
    n_dpo_probe: int = 100  # training pairs scored like the held-out ones, to compare
    dpo_lr: float = 1e-4
    dpo_beta: float = 1.0
    # The chosen answers' NLL added to the DPO loss (RPO): without it DPO lowered well-formed answers
    # 0.88 -> 0.79 on task kinds it was not tuned on; with 0.3 they stay (0.91) at the same ranking.
    dpo_rpo_alpha: float = 0.3
    dpo_epochs: int = 1
    dpo_steps: int = 0  # 0 = as many as dpo_epochs take
    dpo_seq_len: int = 768  # a packed row holds one tool-task pair (~2 x 320 tokens) or several short ones
    dpo_batch_size: int = 2  # packed rows per step
    # GRPO after DPO (or SFT) on the single-turn task kinds, reward = the task checker (exact answer);
    # held-out accuracy before/after comes from the task evaluation, which also scores this model.
    # 120 steps of 16 prompts x 4 samples with a k3 KL term (beta 0.04), off-policy guidance, the date
    # prompts aimed at month ends and a retain term for the kinds it does not train (below). On the
    # AVX-512 BF16 kind's DPO model (0.87 greedy with thinking on) the greedy lift on the trained kinds
    # over GRPO seeds 0-6 was +3.0..+7.0 points (mean +5.1, four of seven >= 5: the misses are one
    # arithmetic problem, five of the 200 items), every untrained kind within 2 items; on the AVX2
    # path (fp32, DPO model at 0.755) +11.0..+15.5 over seeds 0-4 (docs/demo.md, fifteenth round).
    grpo_steps: int = 120
    grpo_prompts: int = 16  # prompts per step
    grpo_generations: int = 4  # samples per prompt (a GRPO group)
    # GRPO trains rank-16 LoRA adapters on every Linear of the frozen DPO model (merged when saved):
    # full-weight GRPO lifted the trained kinds as much but moved kinds it never samples (tool calls
    # -6 and -8 points on two of five seeds); adapters left every untrained kind within a point.
    # Adapters take a ~5x larger learning rate than full weights (their update starts from B = 0).
    grpo_lora_rank: int = 16  # 0 = full-weight GRPO (then grpo_lr 2e-4)
    grpo_lora_alpha: float = 32.0  # scale alpha / rank = 2
    grpo_lr: float = 1e-3
    grpo_beta: float = 0.04  # k3 KL to the starting (DPO) model; 0: no reference model is loaded
    grpo_temperature: float = 1.0  # rollout temperature (the trained log-probs are of logits / T)
    grpo_steps_per_generation: int = 1  # optimizer steps (mini-batches) per rollout batch; > 1: the clip acts
    grpo_kinds: tuple[str, ...] = ("arithmetic", "date_fact")
    # share of next-day date prompts asked about a month's last day (SFT's rows: 0.1): where the
    # start model goes wrong most (the carry into the next month), so where RL's samples pay. Without
    # guidance more month ends did not help (their groups are mostly all wrong: no signal).
    grpo_month_end_share: float = 0.6
    # share of rollout prompts that open <think> (the model reasons before it answers): the reasoning
    # is what RL can improve; the held-out sampled accuracy is measured in the mode trained most
    grpo_thinking_ratio: float = 1.0
    grpo_max_gen_len: int = 96  # reasoning (<= 9 counting steps or one date sentence) and the answer
    # PPO-ptx: gamma of an SFT loss on the demo's SFT rows (both thinking modes, every kind) added to
    # each GRPO step, so what the reward does not see (thinking-off answers, tool calls) stays put
    grpo_ptx_coef: float = 0.0
    # retain term: gamma of KL(start model || policy) on thinking-off SFT rows of the kinds GRPO does
    # not train (--ptx_loss kl): the mode and the kinds no rollout sees stay where GRPO started
    grpo_retain_coef: float = 1.0
    grpo_retain_rows: int = 4  # packed rows of the retain data per step (sft_seq_len tokens each)
    # DAPO's dynamic sampling: extra rounds of prompts until every group of the step has rewards that
    # differ (a group all right or all wrong has advantage 0: no signal)
    grpo_dynamic_sampling: int = 0
    grpo_compile_rollouts: int = 0  # 1: the rollout engine's decode step through torch.compile
    # off-policy guidance (LUFFY): a group with no right sample trains on the item's right reply (its
    # SFT reasoning and answer) in place of its last sample (15-18 % of the groups with the month
    # ends above)
    grpo_guidance: int = 1

    def validate(self) -> None:
        """Refuse settings that cannot work together, before any step runs."""
        if self.grpo_ptx_coef > 0 and self.grpo_retain_coef > 0:
            raise ValueError("grpo_ptx_coef and grpo_retain_coef are two uses of one GRPO term: set one of "
                             "them (the other to 0)")

    @classmethod
    def quick(cls, out_dir: Path) -> DemoSettings:
        """A ~1 minute version for tests and smoke runs."""
        return cls(out_dir=out_dir, vocab_size=1024, seq_len=128, sft_seq_len=256, batch_size=8, pretrain_steps=30,
                   sft_epochs=1, eval_tasks=24, pretrain_chars=120_000, n_sft=200, n_eval=40,
                   n_dpo=120, n_dpo_eval=40, n_dpo_probe=40, dpo_epochs=2, dpo_lr=5e-4,
                   grpo_steps=4, grpo_prompts=4, grpo_generations=4, grpo_max_gen_len=48,
                   think_max_new_tokens=64)


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
        base: dict[str, Any] = {
            "tokenizer_path": str(self.out / "tokenizer"), "save_dir": str(self.out),
            "checkpoint_dir": str(self.out / "checkpoints"), "preset": s.preset, "vocab_size": s.vocab_size,
            "num_hidden_layers": s.num_hidden_layers, "batch_size": s.batch_size, "max_seq_len": s.seq_len,
            "seed": s.seed, "device": s.device, "dtype": s.dtype, "log_interval": 5, "save_interval": 0,
            "optimizer": s.optimizer, "muon_lr": s.muon_lr,
            "num_workers": 1, "progress": 1, "shard_dir": str(self.out / "cache" / kw.get("stage", "run"))}
        base.update(kw)
        return TrainConfig(**base)


class DemoStep(Protocol):
    name: str

    def run(self, ctx: DemoContext) -> None: ...
