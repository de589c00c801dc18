"""The epoch driver: rows of a stage's dataset -> :meth:`Trainer.step`, with schedule, logging,
checkpoints and resume.  Pretraining, SFT, LoRA, DPO and distillation all run here.

Data order is a pure function of (seed, epoch, step), so a resumed run sees exactly the batches the
interrupted run would have seen; with the RNG (one state per rank) and optimizer states restored,
losses are bit-identical on CPU.  A resume that could not continue the same run (another batch
size, schedule, data or model) is refused with the reason, instead of silently jumping.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minimind.config import TrainConfig
from minimind.train import checkpoint as ckpt
from minimind.train.core import Trainer, weights_path
from minimind.train.device import peak_flops
from minimind.train.distributed import all_reduce_sum
from minimind.train.metrics import MetricsWriter, read_metrics, training_flops_per_token
from minimind.train.schedule import lr_at
from minimind.train.stages.base import StageBase

#: Settings that fix the data order, the schedule or the model: a resume must not change them.
RESUME_KEYS = ("data_path", "max_seq_len", "epochs", "max_steps", "learning_rate", "min_lr_ratio",
               "warmup_steps", "weight_decay", "beta1", "beta2", "accumulation_steps", "grad_clip", "seed",
               "add_system_ratio", "empty_think_ratio", "preset", "hidden_size", "num_hidden_layers",
               "use_moe", "vocab_size", "stage_options")


@dataclass
class TrainResult:
    weights_path: Path
    resume_path: Path
    metrics_path: Path
    steps: int
    final_loss: float
    losses: list[float] = field(default_factory=list)
    tokens_per_s: float = 0.0
    useful_tokens_per_s: float = 0.0
    seconds: float = 0.0
    interrupted: bool = False


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the state was saved and ``resume_path`` continues it."""

    def __init__(self, step: int, resume_path: Path) -> None:
        super().__init__(f"interrupted at step {step}; saved {resume_path}")
        self.step, self.resume_path = step, resume_path


def check_resumable(saved: dict[str, Any], saved_world: int, cfg: dict[str, Any], world: int,
                    path: Path) -> None:
    """Refuse a resume whose settings would not continue the saved run exactly."""
    problems = [f"{k}: saved {saved.get(k)!r}, now {cfg.get(k)!r}" for k in RESUME_KEYS
                if k in saved and saved.get(k) != cfg.get(k)]
    if saved.get("batch_size", 0) * saved_world != cfg["batch_size"] * world:
        problems.append(f"global batch (batch_size x processes): saved {saved.get('batch_size')} x "
                        f"{saved_world}, now {cfg['batch_size']} x {world}")
    if problems:
        raise ValueError(f"cannot resume {path} exactly -- " + "; ".join(problems) +
                         ". Use the original settings, or start a new run (--from_resume 0, or another "
                         "--save_weight).")


def resume_if_asked(trainer: Trainer, cfg: TrainConfig, resume_path: Path, total_steps: int) -> int:
    """With ``--from_resume 1`` and a resume file: check it belongs to this run, restore everything
    (model, optimizer, RNG per rank, data cursor, stage state) and return its step; else 0."""
    if not (cfg.from_resume and resume_path.exists()):
        return 0
    state = ckpt.load_resume(resume_path)
    info = trainer.info
    check_resumable(state["config"], int(state["world_size"]), trainer.config_record(), info.world_size,
                    resume_path)
    trainer.restore(state)
    step = int(state["step"])
    if info.is_main:
        print(f"resumed from {resume_path} at step {step}/{total_steps}")
    return step


def open_metrics(trainer: Trainer, metrics_path: Path, record: dict[str, Any], step: int) -> MetricsWriter:
    """The run's metrics file (+ optional tracker): cut back to ``step`` on resume, fresh otherwise."""
    cfg, info = trainer.cfg, trainer.info
    metrics = MetricsWriter(metrics_path, enabled=info.is_main,
                            tracker={1: "swanlab", 2: "wandb"}.get(cfg.use_wandb, ""),
                            run_name=f"{cfg.save_weight}-{trainer.model_config.weight_suffix}", config=record,
                            project=cfg.wandb_project or "MiniMind")
    if info.is_main:
        if step:
            metrics.truncate_after(step)
        else:
            metrics.start_fresh()
    return metrics


def train(stage: StageBase, cfg: TrainConfig, tokenizer: Any,
          on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Run ``stage`` with ``cfg``.  ``on_step(step, record)`` is called after each logged step."""
    trainer = Trainer(stage, cfg, tokenizer)
    info = trainer.info
    finished = False  # every rank got to the end: meet at a barrier before the group goes
    try:
        dataset = trainer.prepare_data()  # data errors surface before the model is built
        model = trainer.setup_model()
        mcfg = model.config
        out_path = weights_path(cfg, mcfg)
        resume_path = Path(cfg.checkpoint_dir) / f"{cfg.save_weight}_{mcfg.weight_suffix}_resume.pt"
        metrics_path = Path(cfg.metrics_path or Path(cfg.save_dir) /
                            f"{cfg.save_weight}_{mcfg.weight_suffix}_metrics.jsonl")

        per_step_rows = cfg.batch_size * cfg.accumulation_steps * info.world_size
        steps_per_epoch = [dataset.num_rows(e) // per_step_rows for e in range(cfg.epochs)]
        if min(steps_per_epoch) == 0:
            raise ValueError(f"{cfg.data_path}: too little data for one optimizer step: it packs into "
                             f"{dataset.num_rows(0)} row(s) of --max_seq_len {cfg.max_seq_len} tokens, one "
                             f"step takes {per_step_rows} (--batch_size x --accumulation_steps x "
                             f"processes); add data or lower --batch_size")
        total_steps = sum(steps_per_epoch)
        if cfg.max_steps > 0:
            total_steps = min(total_steps, cfg.max_steps)
        warmup = cfg.warmup_steps or max(1, total_steps // 100)

        record = trainer.config_record()
        step = resume_if_asked(trainer, cfg, resume_path, total_steps)
        trainer.keep_tokenizer()  # input, model and resume file accepted: now write beside the weights
        if step:
            if step >= total_steps:
                if info.is_main:
                    print(f"the run already finished ({step}/{total_steps} steps): nothing to do; "
                          f"weights in {out_path}")
                done = read_metrics(metrics_path) if metrics_path.exists() else []
                losses = [r["loss"] for r in done if "loss" in r]
                finished = True
                return TrainResult(out_path, resume_path, metrics_path, step,
                                   losses[-1] if losses else math.nan, losses)
        elif info.is_main:
            if cfg.from_resume:
                print(f"--from_resume 1: no checkpoint at {resume_path}, starting from scratch")
            print(f"{model.describe()}  device={trainer.device} dtype={str(trainer.dtype).split('.')[-1]}"
                  f"{'  from ' + str(trainer.source) if trainer.source else ''}")
        result = _run_steps(trainer, dataset, steps_per_epoch, total_steps, warmup, step, out_path,
                            resume_path, metrics_path, record, on_step)
        finished = True
        return result
    finally:
        trainer.close(finished)


def _run_steps(trainer: Trainer, dataset: Any, steps_per_epoch: list[int], total_steps: int, warmup: int,
               step: int, out_path: Path, resume_path: Path, metrics_path: Path, record: dict[str, Any],
               on_step: Callable[[int, dict[str, float]], None] | None) -> TrainResult:
    cfg, info = trainer.cfg, trainer.info
    metrics = open_metrics(trainer, metrics_path, record, step)

    flops_tok = training_flops_per_token(trainer.base_model, cfg.max_seq_len)
    peak = peak_flops(trainer.device, trainer.dtype) * info.world_size

    def epoch_of(s: int) -> int:
        acc = 0
        for e, n in enumerate(steps_per_epoch):
            acc += n
            if s < acc:
                return e
        return len(steps_per_epoch) - 1

    def save() -> None:
        trainer.save(out_path, resume_path, step=step, epoch=epoch_of(step), config=record)

    def step_batches(s: int) -> list[Any]:
        """This rank's micro-batches of step ``s`` (a pure function of the step: prefetchable)."""
        epoch, in_epoch = epoch_of(s), s - sum(steps_per_epoch[:epoch_of(s)])
        firsts = [((in_epoch * cfg.accumulation_steps + micro) * info.world_size + info.rank) * cfg.batch_size
                  for micro in range(cfg.accumulation_steps)]
        return [dataset.get_batch(epoch, range(f, f + cfg.batch_size)) for f in firsts]

    stream = trainer.batch_stream(step_batches, step, total_steps)
    progress = _progress(total_steps, step, info.is_main and cfg.progress)
    losses: list[float] = []
    window: dict[str, torch.Tensor] = {}
    window_tokens = window_useful = window_steps = 0
    window_t0 = run_t0 = time.perf_counter()
    run_tokens = run_useful = 0
    last_record: dict[str, float] = {}
    try:
        while step < total_steps:
            epoch = epoch_of(step)
            lr = lr_at(step, total_steps, cfg.learning_rate, warmup, cfg.min_lr_ratio)
            stats = trainer.step(stream.next(), lr)
            step += 1
            window_steps += 1
            for k, v in {"loss": stats.loss, **stats.metrics}.items():
                window[k] = window.get(k, 0.0) + v
            window_tokens += stats.tokens
            window_useful += stats.useful_tokens
            progress.update(1)

            if step % cfg.log_interval == 0 or step == total_steps:
                # one all-reduce for every windowed value: sum over ranks = global weighted mean
                keys = sorted(window)
                summed = all_reduce_sum(torch.stack([window[k].float() for k in keys]), info)
                means = {k: float(v) / window_steps for k, v in zip(keys, summed.tolist())}
                dt = max(time.perf_counter() - window_t0, 1e-9)
                tok_s = window_tokens * info.world_size / dt
                useful_s = window_useful * info.world_size / dt
                rec = {"step": step, "epoch": epoch, "loss": round(means.pop("loss"), 6), "lr": lr,
                       "grad_norm": round(float(stats.grad_norm), 4), "tok_per_s": round(tok_s, 1),
                       "useful_tok_per_s": round(useful_s, 1), "mfu": round(flops_tok * tok_s / peak, 5),
                       "data_wait": round(stream.take_wait() / window_steps, 6)}  # s per step
                rec.update({k: round(v, 6) for k, v in means.items()})
                metrics.log(rec)
                losses.append(rec["loss"])
                last_record = rec
                run_tokens += window_tokens
                run_useful += window_useful
                progress.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
                if info.is_main and not cfg.progress:  # no bar (logs, CI): one line per log interval
                    print(f"step {step}/{total_steps}  loss {rec['loss']:.4f}  lr {lr:.2e}  {tok_s:.0f} tok/s",
                          flush=True)
                window = {}
                window_tokens = window_useful = window_steps = 0
                window_t0 = time.perf_counter()
            if (cfg.save_interval > 0 and step % cfg.save_interval == 0) or step == total_steps:
                save()
            if on_step is not None and last_record.get("step") == step:
                on_step(step, last_record)
    except KeyboardInterrupt:
        progress.close()
        if info.enabled:  # the other ranks got the signal too: no collective can be trusted now
            raise
        trainer.optimizer.zero_grad(set_to_none=True)
        save()  # the state after the last completed step, exactly as a periodic save writes it
        print(f"\ninterrupted at step {step}/{total_steps}; saved {resume_path}. Continue with the same "
              f"command plus --from_resume 1", file=sys.stderr)
        raise TrainingInterrupted(step, resume_path) from None
    finally:
        stream.close()
        progress.close()
    seconds = time.perf_counter() - run_t0
    return TrainResult(weights_path=out_path, resume_path=resume_path, metrics_path=metrics_path,
                       steps=step, final_loss=last_record.get("loss", math.nan), losses=losses,
                       tokens_per_s=run_tokens * info.world_size / max(seconds, 1e-9),
                       useful_tokens_per_s=run_useful * info.world_size / max(seconds, 1e-9),
                       seconds=seconds)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="step")
