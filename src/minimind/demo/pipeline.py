"""``minimind demo``: the embedded default, end to end on data the project builds itself.

The pipeline is a list of steps sharing one :class:`DemoContext`; later stages (DPO, RL, export,
evaluation) are added by appending steps to :data:`DEFAULT_STEPS`.  Each step records its figures in
``ctx.results[step.name]`` and the report (:mod:`minimind.demo.report`) renders whatever is there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minimind.config import TrainConfig
from minimind.demo.settings import DemoContext, DemoSettings, DemoStep


class BuildCorpus:
    name = "corpus"

    def run(self, ctx: DemoContext) -> None:
        from minimind.demo.corpus import build_demo_corpus
        s = ctx.settings
        stats = build_demo_corpus(ctx.out / "data", seed=s.seed, level=s.task_level,
                                  pretrain_chars=s.pretrain_chars, n_sft=s.n_sft, n_eval=s.n_eval,
                                  mix=s.pretrain_mix, fact_pool_share=s.fact_pool_share, sft_kinds=s.sft_kinds,
                                  fact_kinds=s.fact_kinds, think_share=s.sft_think_share,
                                  generic_share=s.generic_share, month_rows=s.month_rows)
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


class PreferenceTuning:
    """DPO from the SFT model on checkable preference pairs (:mod:`minimind.demo.preferences`).

    Chosen = the answer SFT trains on, rejected = a wrong value, a wrong format, a truncated answer
    or a malformed tool call.  Held-out pairs (eval-split items) are scored before (SFT model) and
    after (DPO model): the share of pairs where ``log pi(chosen) > log pi(rejected)``, and after DPO
    the implicit reward margin against the SFT model as reference.  Runs on an existing out dir too
    (``minimind demo --steps dpo,task_eval``): the tokenizer and SFT weights are read from there.
    """

    name = "dpo"

    def run(self, ctx: DemoContext) -> None:
        from minimind.demo.preferences import build_preference_data, longest_pair, preference_eval
        from minimind.model import load_model
        from minimind.train.loop import train
        from minimind.train.metrics import read_metrics
        from minimind.train.stages import DPOOptions, DPOStage
        s = ctx.settings
        sft_weights = ctx.artifacts["sft_weights"]
        data = build_preference_data(ctx.out / "data", seed=s.seed, n_train=s.n_dpo, n_heldout=s.n_dpo_eval,
                                     level=s.task_level)
        train_path, heldout = Path(data["train"]["path"]), Path(data["heldout"]["path"])
        ctx.artifacts["dpo_train"], ctx.artifacts["dpo_heldout"] = train_path, heldout
        # rows long enough for the longest pair (tool prompts), so that no pair is ever cut
        seq_len = max(s.dpo_seq_len, -(-(longest_pair(ctx.tokenizer, [train_path, heldout]) - 1) // 64) * 64)
        cfg = ctx.train_config(stage="dpo", data_path=str(train_path), save_weight="dpo",
                               from_weight=str(sft_weights), learning_rate=s.dpo_lr, epochs=s.dpo_epochs,
                               max_steps=s.dpo_steps, warmup_steps=3, weight_decay=0.0,
                               max_seq_len=seq_len, batch_size=s.dpo_batch_size, log_interval=2, optimizer="adamw")
        evalkw = {"beta": s.dpo_beta, "seq_len": seq_len, "cache_dir": ctx.out / "cache" / "dpo_eval"}
        # the same figures on (the first n_dpo_probe of) the training pairs: what DPO fits, to compare
        probe = _head_jsonl(train_path, ctx.out / "data" / "dpo_train_probe.jsonl", s.n_dpo_probe)
        t0 = time.perf_counter()
        sft_model = load_model(sft_weights)
        before = preference_eval(sft_model, ctx.tokenizer, heldout, **evalkw)
        before_train = preference_eval(sft_model, ctx.tokenizer, probe, **evalkw)
        eval_s = time.perf_counter() - t0
        res = train(DPOStage(DPOOptions(beta=s.dpo_beta, loss_type="sigmoid", rpo_alpha=s.dpo_rpo_alpha)),
                    cfg, ctx.tokenizer)
        ctx.artifacts["dpo_weights"] = res.weights_path
        ctx.artifacts["dpo_metrics"] = res.metrics_path
        t0 = time.perf_counter()
        dpo_model = load_model(res.weights_path)
        after = preference_eval(dpo_model, ctx.tokenizer, heldout, reference=before, **evalkw)
        after_train = preference_eval(dpo_model, ctx.tokenizer, probe, reference=before_train, **evalkw)
        eval_s += time.perf_counter() - t0
        logged = [r for r in read_metrics(res.metrics_path) if "margin" in r]

        def first_last(key: str) -> list[float]:
            return [logged[0][key], logged[-1][key]] if logged else []

        ctx.results[self.name] = {
            "pairs": {k: {f: v[f] for f in ("pairs", "by_kind", "by_rejection")} for k, v in data.items()},
            "beta": s.dpo_beta, "rpo_alpha": s.dpo_rpo_alpha, "lr": s.dpo_lr, "seq_len": seq_len,
            "batch_rows": s.dpo_batch_size,
            "epochs": s.dpo_epochs, "steps": res.steps, "seconds": round(res.seconds, 1),
            "eval_seconds": round(eval_s, 1), "final_loss": res.final_loss,
            "heldout": {
                "logp_accuracy": [before["logp_accuracy"], after["logp_accuracy"]],
                "mean_logp_margin": [before["mean_logp_margin"], after["mean_logp_margin"]],
                "by_rejection": _before_after(before, after, "logp_accuracy_by_rejection"),
                "by_kind": _before_after(before, after, "logp_accuracy_by_kind"),
                "reward_accuracy": after["reward_accuracy"], "mean_reward_margin": after["mean_reward_margin"],
                "mean_reward_chosen": after["mean_reward_chosen"],
                "mean_reward_rejected": after["mean_reward_rejected"]},
            "train_pairs": {
                "n_pairs": after_train["n_pairs"],
                "logp_accuracy": [before_train["logp_accuracy"], after_train["logp_accuracy"]],
                "mean_logp_margin": [before_train["mean_logp_margin"], after_train["mean_logp_margin"]],
                "reward_accuracy": after_train["reward_accuracy"],
                "mean_reward_margin": after_train["mean_reward_margin"]},
            # training-batch figures from the metrics log (first and last logged window)
            "train_margin": first_last("margin"), "train_pref_accuracy": first_last("pref_accuracy"),
        }


class ReinforcementLearning:
    """GRPO from the DPO (else SFT) model on train-split items of ``grpo_kinds``.

    The reward is the task checker itself (1 for an exactly right answer, else 0), so the group
    advantage ``(r - mean) / std`` pushes up exactly the sampled answers that were right.  Held-out
    items of those kinds are scored before and after as GRPO sees them (8 temperature-1 samples
    each: the share right is the objective on new items, and pass@8, the share with any right
    sample, which bounds what GRPO can add to greedy accuracy); :class:`TaskEval` adds greedy
    accuracy with thinking off and on.  The rollouts think (arithmetic and next-day dates with their
    step-by-step reasoning): the steps are shared by training and held-out items, so what GRPO
    reinforces transfers, while a direct arithmetic answer is a look-up of a held-out fact that no
    training prompt asks -- measured, GRPO without thinking lowered held-out arithmetic (docs/demo.md).
    """

    name = "grpo"

    @staticmethod
    def _supervised_term(ctx: DemoContext, others: list[str]) -> dict[str, Any]:
        """The GRPO options of the optional term beside the RL loss: PPO-ptx's NLL on the SFT rows
        (``grpo_ptx_coef``), or the retain KL to the start model (``grpo_retain_coef``) on thinking-off
        rows of ``others``, the evaluated kinds GRPO does not train, written to ``data/grpo_retain.jsonl``."""
        s = ctx.settings
        if s.grpo_ptx_coef > 0:
            return {"ptx_coef": s.grpo_ptx_coef, "ptx_data": str(ctx.artifacts["sft"])}
        if s.grpo_retain_coef <= 0:
            return {}
        from minimind.tasks.generators import generate_tasks
        from minimind.tasks.rows import task_to_sft_row
        if not others:
            raise ValueError("grpo_retain_coef: every evaluated kind is trained by GRPO, nothing to retain")
        tasks = generate_tasks(200 * len(others), s.seed + 3, kinds=others, split="train", level=s.task_level)
        data = ctx.out / "data" / "grpo_retain.jsonl"
        with open(data, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(task_to_sft_row(t), ensure_ascii=False) + "\n" for t in tasks)
        return {"ptx_coef": s.grpo_retain_coef, "ptx_loss": "kl", "ptx_data": str(data),
                "ptx_rows": s.grpo_retain_rows}

    def run(self, ctx: DemoContext) -> None:
        from minimind.tasks.generators import generate_tasks
        from minimind.tasks.rows import task_to_rl_row
        from minimind.train.stages.rl import GRPOOptions, GRPOStage
        s = ctx.settings
        start = ctx.artifacts.get("dpo_weights") or ctx.artifacts["sft_weights"]
        n = s.grpo_steps * s.grpo_prompts
        tasks = generate_tasks(n, s.seed + 2, kinds=s.grpo_kinds, split="train", level=s.task_level,
                               month_end_share=s.grpo_month_end_share)
        data = ctx.out / "data" / "grpo_prompts.jsonl"
        with open(data, "w", encoding="utf-8") as f:
            rows = (task_to_rl_row(t, reference=bool(s.grpo_guidance)) for t in tasks)
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        cfg = ctx.train_config(stage="grpo", data_path=str(data), save_weight="grpo", from_weight=str(start),
                               learning_rate=s.grpo_lr, epochs=1, max_steps=s.grpo_steps, warmup_steps=0,
                               min_lr_ratio=1.0, weight_decay=0.0, batch_size=s.grpo_prompts, log_interval=1,
                               max_seq_len=s.sft_seq_len, progress=0, optimizer="adamw")
        evaluated = _read_jsonl(ctx.artifacts["eval_tasks"])
        others = sorted({row["kind"] for row in evaluated} - set(s.grpo_kinds))
        supervised = self._supervised_term(ctx, others)
        opts = GRPOOptions(loss_type="grpo", num_generations=s.grpo_generations, beta=s.grpo_beta, reward="task:1",
                           max_gen_len=s.grpo_max_gen_len, temperature=s.grpo_temperature,
                           thinking_ratio=s.grpo_thinking_ratio,
                           steps_per_generation=s.grpo_steps_per_generation, ppo_epochs=1,
                           lora_rank=s.grpo_lora_rank, lora_alpha=s.grpo_lora_alpha,
                           dynamic_sampling=s.grpo_dynamic_sampling,
                           compile_rollouts=s.grpo_compile_rollouts, guidance=s.grpo_guidance,
                           **supervised)
        heldout = [row for row in evaluated if row["kind"] in s.grpo_kinds]
        thinking = s.grpo_thinking_ratio >= 0.5
        sample = {"n": s.grpo_generations, "max_new_tokens": s.grpo_max_gen_len, "open_thinking": thinking,
                  "temperature": s.grpo_temperature}
        before = _sampled_accuracy(ctx, start, heldout, **sample)
        res = GRPOStage(opts).run(cfg, ctx.tokenizer)
        ctx.artifacts["grpo_weights"] = res.weights_path
        ctx.artifacts["grpo_metrics"] = res.metrics_path
        after = _sampled_accuracy(ctx, res.weights_path, heldout, **sample)
        untrained = [row for row in evaluated if row["kind"] in others]
        drift = _reply_drift(ctx, start, res.weights_path, untrained)
        r = res.rewards
        k = max(1, min(10, len(r) // 2))
        sec = sorted(rec["sec_per_step"] for rec in res.records)
        ctx.results[self.name] = {
            # held-out items of the GRPO kinds, sampled as in training (its temperature): what GRPO optimises
            "heldout_sampled_accuracy": [before["mean"], after["mean"]], "heldout_items": len(heldout),
            "sampled_temperature": s.grpo_temperature,
            # share of items with at least one right sample among n: the headroom RL can turn into greedy
            "heldout_pass_at_n": [before["pass_at_n"], after["pass_at_n"]],
            "heldout_sampled_per_kind": {k: [before["per_kind"][k], after["per_kind"].get(k)]
                                         for k in before["per_kind"]},
            "heldout_pass_at_n_per_kind": {k: [before["pass_at_n_per_kind"][k], after["pass_at_n_per_kind"].get(k)]
                                           for k in before["pass_at_n_per_kind"]},
            "sampled_with_thinking": thinking, "thinking_ratio": s.grpo_thinking_ratio,
            "steps": res.steps, "seconds": round(res.seconds, 1), "prompts_per_step": s.grpo_prompts,
            "generations": s.grpo_generations, "kinds": list(s.grpo_kinds), "lr": s.grpo_lr,
            "steps_per_generation": s.grpo_steps_per_generation, "ptx_coef": s.grpo_ptx_coef,
            # the retain term: its kinds and KL(start || policy) on their rows over the last steps
            "retain_coef": s.grpo_retain_coef, "retain_kinds": others if s.grpo_retain_coef > 0 else [],
            "retain_kl_last": round(sum(rec.get("ptx_kl", 0.0) for rec in res.records[-k:]) / k, 6),
            # KL(start || GRPO) per reply token on the held-out items of the other kinds, thinking off
            "untrained_reply_kl": drift,
            "lora_rank": s.grpo_lora_rank, "lora_alpha": s.grpo_lora_alpha,
            "dynamic_sampling": s.grpo_dynamic_sampling, "guidance": s.grpo_guidance,
            "month_end_share": s.grpo_month_end_share,
            "from": Path(start).name, "train_reward_first": round(sum(r[:k]) / k, 4),
            "train_reward_last": round(sum(r[-k:]) / k, 4),
            "sec_per_step_median": round(sec[len(sec) // 2], 3) if sec else None,
            # share of the steps' groups that trained on their reference reply (--guidance)
            "guided_share": round(sum(rec.get("guided", 0.0) for rec in res.records) / max(len(res.records), 1), 4)}


class TaskEval:
    """Same held-out prompts, same greedy decoding: pretrained, SFT and (when trained) DPO and GRPO
    models.

    The chat-tuned models are scored twice: with the default generation prompt (an empty, closed
    think block: thinking off) and with ``open_thinking`` (an open ``<think>`` block: the model
    writes its reasoning, closes the block and answers); the second is under ``[label]["thinking"]``.
    The GRPO model's evaluations also carry ``vs_start``: its change from the model GRPO started from
    on the kinds GRPO trained, item by item (:func:`minimind.eval.paired.paired_change`), so that the
    report can say how far the lift stands from noise.
    """

    name = "task_eval"

    def run(self, ctx: DemoContext) -> None:
        from minimind.eval.tasks import evaluate_tasks
        from minimind.tasks.checks import check_answer, check_format
        s = ctx.settings
        rows = _read_jsonl(ctx.artifacts["eval_tasks"])[: s.eval_tasks]
        out = {}
        for label in ("pretrain", "sft", "dpo", "grpo"):
            if f"{label}_weights" not in ctx.artifacts:
                continue
            engine = _engine(ctx, ctx.artifacts[f"{label}_weights"])
            out[label] = evaluate_tasks(engine, ctx.tokenizer, rows, check_answer, format_checker=check_format)
            if label != "pretrain" and s.think_max_new_tokens > 0:
                on = evaluate_tasks(engine, ctx.tokenizer, rows, check_answer, format_checker=check_format,
                                    max_new_tokens=s.think_max_new_tokens, open_thinking=True)
                on["samples"] = on["samples"][:60]
                out[label]["thinking"] = on
        _add_paired_change(out, rows, ctx.results.get("grpo", {}).get("kinds") or list(s.grpo_kinds))
        ctx.results[self.name] = out


def _add_paired_change(out: dict[str, Any], rows: list[dict], kinds: list[str]) -> None:
    """``out["grpo"][...]["vs_start"]``: the GRPO model against its start (DPO, else SFT) on the
    items of the GRPO-trained ``kinds``, thinking off and on, item by item, problems as the clusters.
    The per-item grades (``correct``) are consumed here: results.json keeps only the comparison."""
    from minimind.eval.paired import paired_change
    from minimind.eval.tasks import problem_key
    start = next((k for k in ("dpo", "sft") if k in out), None)
    if start is not None and "grpo" in out:
        idx = [i for i, r in enumerate(rows) if r.get("kind") in kinds]
        problems = [problem_key(rows[i]) for i in idx]
        for b, a in ((out[start], out["grpo"]), (out[start].get("thinking"), out["grpo"].get("thinking"))):
            if b is not None and a is not None:
                change = paired_change([b["correct"][i] for i in idx], [a["correct"][i] for i in idx], problems)
                a["vs_start"] = {"start": start, "kinds": list(kinds), **change.to_dict()}
    for res in out.values():
        for graded in (res, res.get("thinking", {})):
            graded.pop("correct", None)


DEFAULT_STEPS: list[DemoStep] = [BuildCorpus(), TrainTokenizer(), Pretrain(), SupervisedFinetune(), PreferenceTuning(),
                                 ReinforcementLearning(), TaskEval()]
STEPS_BY_NAME: dict[str, DemoStep] = {step.name: step for step in DEFAULT_STEPS}


# ---- helpers ------------------------------------------------------------------------------------
def _before_after(before: dict, after: dict, key: str) -> dict[str, list[float]]:
    return {k: [v, after.get(key, {}).get(k)] for k, v in before.get(key, {}).items()}


def _head_jsonl(src: Path, dst: Path, n: int) -> Path:
    """The first ``n`` lines of ``src`` in ``dst`` (left untouched when already so: shard caches
    are keyed on the file's size and mtime)."""
    with open(src, encoding="utf-8") as f:
        text = "".join(line for _, line in zip(range(n), f))
    if not dst.exists() or dst.read_text(encoding="utf-8") != text:
        dst.write_text(text, encoding="utf-8")
    return dst


def _restore(ctx: DemoContext) -> None:
    """Pick up what earlier runs left in the out dir (tokenizer, data files, weights, metrics), so
    that a subset of the steps can run on it; what this run's steps produce replaces it."""
    from minimind.train.core import weights_path
    tok_dir = ctx.out / "tokenizer"
    if ctx.tokenizer is None and (tok_dir / "tokenizer.json").exists():
        from minimind.tokenizer import MiniMindTokenizer
        ctx.tokenizer = MiniMindTokenizer.from_dir(tok_dir)
    for name in ("pretrain", "pretrain_heldout", "sft", "eval_tasks"):
        path = ctx.out / "data" / f"{name}.jsonl"
        if path.exists():
            ctx.artifacts.setdefault(name, path)
    cfg = ctx.train_config()
    mcfg = cfg.model_config(vocab_size=ctx.tokenizer.vocab_size if ctx.tokenizer else ctx.settings.vocab_size)
    for label, save_weight in (("pretrain", "pretrain"), ("sft", "full_sft"), ("dpo", "dpo"), ("grpo", "grpo")):
        path = weights_path(cfg, mcfg, save_weight)
        metrics = ctx.out / f"{save_weight}_{mcfg.weight_suffix}_metrics.jsonl"
        if path.exists():
            ctx.artifacts.setdefault(f"{label}_weights", path)
        if metrics.exists():
            ctx.artifacts.setdefault(f"{label}_metrics", metrics)


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


def _sampled_accuracy(ctx: DemoContext, weights: Path, rows: list[dict], n: int, max_new_tokens: int,
                      open_thinking: bool = False, temperature: float = 1.0) -> dict[str, Any]:
    """``n`` samples per held-out row at the rollouts' ``temperature``: the mean task reward (the RL
    objective on new items), overall and per kind, and pass@n (the share of rows with at least one
    right sample)."""
    from minimind.eval.tasks import prompt_of
    from minimind.infer import SamplingParams
    from minimind.tasks.checks import check_answer
    if not rows:
        return {"mean": float("nan"), "pass_at_n": float("nan"), "per_kind": {}}
    engine = _engine(ctx, weights)
    prompts = [ctx.tokenizer.apply_chat_template(msgs, tools=tools, add_generation_prompt=True, tokenize=True,
                                                 open_thinking=open_thinking)
               for msgs, tools in map(prompt_of, rows)]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=0, top_p=1.0,
                            stop_token_ids=(ctx.tokenizer.eos_id,), seed=ctx.settings.seed)
    results = engine.generate(prompts, params, n=n)
    ok = [check_answer(rows[i // n]["kind"], rows[i // n]["gt"], res.text if res.text is not None
                       else ctx.tokenizer.decode(res.token_ids)) for i, res in enumerate(results)]
    per_row = [ok[i * n:(i + 1) * n] for i in range(len(rows))]
    kinds: dict[str, list[list[bool]]] = {}
    for row, oks in zip(rows, per_row):
        kinds.setdefault(row["kind"], []).append(oks)
    return {"mean": round(sum(ok) / len(ok), 4), "pass_at_n": round(sum(map(any, per_row)) / len(rows), 4),
            "per_kind": {k: round(sum(map(sum, v)) / (n * len(v)), 4) for k, v in sorted(kinds.items())},
            "pass_at_n_per_kind": {k: round(sum(map(any, v)) / len(v), 4) for k, v in sorted(kinds.items())}}


def _reply_drift(ctx: DemoContext, start: Path, tuned: Path, rows: list[dict]) -> dict[str, float]:
    """Per kind of ``rows``: KL(start || tuned) per reply token on its items, thinking off
    (:func:`~minimind.eval.drift.reply_kl`), the drift before it flips an answer."""
    from minimind.eval.drift import reply_kl
    from minimind.model import load_model
    a, b = load_model(start).eval(), load_model(tuned).eval()
    return {k: round(reply_kl(a, b, ctx.tokenizer, [r["messages"] for r in rows if r["kind"] == k],
                              max_len=ctx.settings.sft_seq_len), 6)
            for k in sorted({r["kind"] for r in rows})}


def _engine(ctx: DemoContext, weights: Path):
    from minimind.infer import GenerationEngine
    from minimind.model import load_model
    model = load_model(weights).eval()
    return GenerationEngine(model, ctx.tokenizer)


def run_demo(settings: DemoSettings, steps: list[DemoStep] | None = None) -> DemoContext:
    """Run ``steps`` (default: all of :data:`DEFAULT_STEPS`) and write the report.

    With a subset of the steps, the out dir of an earlier run supplies the rest: its tokenizer,
    data and weights (see :func:`_restore`), and its ``results.json`` figures, so the report keeps
    the sections of the steps that did not run again.
    """
    from minimind.cpu_allocator import tune_malloc
    from minimind.demo.report import write_report
    settings.validate()
    tune_malloc()  # also when called from Python, not the CLI: the same figures, ~20 % sooner on a CPU
    ctx = DemoContext(settings)
    ctx.out.mkdir(parents=True, exist_ok=True)
    partial = steps is not None and [st.name for st in steps] != [st.name for st in DEFAULT_STEPS]
    if partial:
        _restore(ctx)
        previous = ctx.out / "results.json"
        if previous.exists():
            saved = json.loads(previous.read_text(encoding="utf-8"))
            ctx.results.update(saved.get("results", {}))
            ctx.timings.update({k: v for k, v in saved.get("timings", {}).items() if k != "total"})
    t_all = time.perf_counter()
    for step in steps or DEFAULT_STEPS:
        print(f"== demo: {step.name} ==", flush=True)
        t0 = time.perf_counter()
        step.run(ctx)
        ctx.timings[step.name] = round(time.perf_counter() - t0, 1)
    ctx.timings.pop("total", None)
    ctx.timings = {k: ctx.timings[k] for k in [*STEPS_BY_NAME, *ctx.timings] if k in ctx.timings}
    # a partial run's total is the sum of the steps' latest timings (this run's and the restored ones)
    ctx.timings["total"] = round(sum(ctx.timings.values()) if partial else time.perf_counter() - t_all, 1)
    report = write_report(ctx)
    print(f"report: {report}")
    return ctx
