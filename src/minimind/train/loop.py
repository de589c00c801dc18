"""The one training loop.  Every stage (pretrain, SFT, and later LoRA, DPO, distillation) runs here.

Order of one optimizer step (``accumulation_steps`` micro-batches):
  set lr -> for each micro-batch: forward under autocast, ``loss_i * w_i / sum(w)``, backward
  (DDP all-reduce only on the last micro-batch) -> unscale (fp16) -> clip -> step -> zero grads.

Data order is a pure function of (seed, epoch, step), so a resumed run sees exactly the batches the
interrupted run would have seen; with the RNG and optimizer states restored, losses are bit-identical
on CPU.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from minimind.config import ModelConfig, TrainConfig
from minimind.model import MiniMindForCausalLM, load_weights, read_config, read_state_dict, save_weights
from minimind.train import checkpoint as ckpt
from minimind.train.device import autocast, peak_flops, pick_device, pick_dtype
from minimind.train.distributed import (DistInfo, all_reduce_mean, barrier, cleanup, init_distributed,
                                        no_sync, wrap_ddp)
from minimind.train.metrics import MetricsWriter, model_flops_per_token
from minimind.train.schedule import lr_at
from minimind.train.stages.base import Stage


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


def weights_path(cfg: TrainConfig, mcfg: ModelConfig, name: str | None = None) -> Path:
    """``out/<name>_<H>[_moe].safetensors`` (reference naming, safetensors format)."""
    return Path(cfg.save_dir) / f"{name or cfg.save_weight}_{mcfg.weight_suffix}.safetensors"


def resolve_from_weight(cfg: TrainConfig, mcfg: ModelConfig | None) -> Path | None:
    """``--from_weight`` is a stage name (``pretrain`` -> out/pretrain_<H>.safetensors) or a path."""
    if cfg.from_weight in ("", "none"):
        return None
    p = Path(cfg.from_weight)
    if p.suffix in (".safetensors", ".pth", ".pt") or p.exists():
        if not p.exists():
            raise FileNotFoundError(f"--from_weight file not found: {p}")
        return p
    if mcfg is None:
        raise ValueError("cannot resolve --from_weight by name without a model shape")
    for ext in (".safetensors", ".pth"):
        cand = Path(cfg.save_dir) / f"{cfg.from_weight}_{mcfg.weight_suffix}{ext}"
        if cand.exists():
            return cand
    raise FileNotFoundError(f"--from_weight {cfg.from_weight!r}: no {cfg.from_weight}_"
                            f"{mcfg.weight_suffix}.safetensors/.pth in {cfg.save_dir}")


def build_model(cfg: TrainConfig, vocab_size: int) -> tuple[MiniMindForCausalLM, Path | None]:
    """New model from the preset/flags, or the model stored in ``--from_weight``."""
    mcfg = cfg.model_config(vocab_size=cfg.vocab_size or vocab_size)
    src = resolve_from_weight(cfg, mcfg)
    if src is not None:
        stored = read_config(src)
        if stored is not None:
            mcfg = stored
        model = MiniMindForCausalLM(mcfg)
        load_weights(model, read_state_dict(src))
    else:
        model = MiniMindForCausalLM(mcfg)
    if mcfg.vocab_size < vocab_size:
        raise ValueError(f"model vocab_size {mcfg.vocab_size} is smaller than the tokenizer's "
                         f"{vocab_size}")
    return model, src


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains are left alone); fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def train(stage: Stage, cfg: TrainConfig, tokenizer: Any,
          on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Run ``stage`` with ``cfg``.  ``on_step(step, record)`` is called after each logged step."""
    cfg.validate()
    device = pick_device(cfg.device)
    info: DistInfo = init_distributed(device.type)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    dtype = pick_dtype(device, cfg.dtype)
    torch.manual_seed(cfg.seed + info.rank)

    dataset = stage.build_dataset(cfg, tokenizer, rank=info.rank)  # data errors surface first
    model, src = build_model(cfg, tokenizer.vocab_size)
    model = stage.prepare_model(model, cfg).to(device)
    mcfg = _unwrap(model).config
    out_path = weights_path(cfg, mcfg)
    resume_path = Path(cfg.checkpoint_dir) / f"{cfg.save_weight}_{mcfg.weight_suffix}_resume.pt"
    metrics_path = Path(cfg.metrics_path or Path(cfg.save_dir) / f"{cfg.save_weight}_{mcfg.weight_suffix}_metrics.jsonl")

    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    per_step_rows = cfg.batch_size * cfg.accumulation_steps * info.world_size
    steps_per_epoch = [dataset.num_rows(e) // per_step_rows for e in range(cfg.epochs)]
    if min(steps_per_epoch) == 0:
        raise ValueError(f"dataset too small: {dataset.num_rows(0)} rows of {cfg.max_seq_len} tokens "
                         f"for one step of {per_step_rows} rows (batch x accumulation x world)")
    total_steps = sum(steps_per_epoch)
    if cfg.max_steps > 0:
        total_steps = min(total_steps, cfg.max_steps)
    warmup = cfg.warmup_steps or max(1, total_steps // 100)

    step = 0
    if cfg.from_resume and resume_path.exists():
        state = ckpt.load_resume(resume_path)
        load_weights(_unwrap(model), state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        if state["world_size"] != info.world_size:
            step = step * state["world_size"] // info.world_size
        ckpt.set_rng_state(state["rng"])
        if "scaler" in state["extra"]:
            scaler.load_state_dict(state["extra"]["scaler"])
        if info.is_main:
            print(f"resumed from {resume_path} at step {step}/{total_steps}")
    elif info.is_main:
        print(f"{_unwrap(model).describe()}  device={device} dtype={str(dtype).split('.')[-1]}"
              f"{'  from ' + str(src) if src else ''}")

    metrics = MetricsWriter(metrics_path, enabled=info.is_main,
                            tracker="swanlab" if cfg.use_wandb == 1 else ("wandb" if cfg.use_wandb == 2 else ""),
                            run_name=f"{cfg.save_weight}-{mcfg.weight_suffix}", config=dataclasses.asdict(cfg))
    if info.is_main:
        if step:
            metrics.truncate_after(step)
        elif metrics_path.exists():
            metrics_path.unlink()

    base_model = _unwrap(model)
    if cfg.compile:
        model = torch.compile(model)
    model = wrap_ddp(model, info, device)
    model.train()

    n_matmul = base_model.num_parameters(active=True)
    if not base_model.config.tie_word_embeddings:
        n_matmul -= base_model.model.embed_tokens.weight.numel()
    flops_tok = model_flops_per_token(n_matmul, mcfg.num_hidden_layers, mcfg.hidden_size, cfg.max_seq_len)
    peak = peak_flops(device, dtype) * info.world_size

    progress = _progress(total_steps, step, info.is_main and cfg.progress)
    losses: list[float] = []
    window_loss = torch.zeros((), device=device)
    window_tokens = window_useful = window_steps = 0
    window_t0 = run_t0 = time.perf_counter()
    run_tokens = run_useful = 0
    last_record: dict[str, float] = {}

    def save() -> None:
        if info.is_main:
            save_weights(base_model, out_path)
            ckpt.save_resume(resume_path, model_state=base_model.state_dict(), optimizer=optimizer,
                             epoch=epoch_of(step), step=step, micro_step=step * cfg.accumulation_steps,
                             world_size=info.world_size, config=dataclasses.asdict(cfg),
                             extra={"scaler": scaler.state_dict()} if scaler.is_enabled() else {})
        barrier(info)

    def epoch_of(s: int) -> int:
        acc = 0
        for e, n in enumerate(steps_per_epoch):
            acc += n
            if s < acc:
                return e
        return len(steps_per_epoch) - 1

    try:
        while step < total_steps:
            epoch = epoch_of(step)
            step_in_epoch = step - sum(steps_per_epoch[:epoch])
            lr = lr_at(step, total_steps, cfg.learning_rate, warmup, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = []
            for micro in range(cfg.accumulation_steps):
                first = ((step_in_epoch * cfg.accumulation_steps + micro) * info.world_size + info.rank) * cfg.batch_size
                batches.append(dataset.get_batch(epoch, range(first, first + cfg.batch_size)))
            weights = [float(stage.batch_weight(b)) for b in batches]
            total_w = max(sum(weights), 1e-9)
            step_metrics: dict[str, torch.Tensor] = {}
            for micro, batch in enumerate(batches):
                batch = batch.to(device)
                with no_sync(model, micro < len(batches) - 1), autocast(device, dtype):
                    out = stage.compute_loss(model, batch)
                    scaled = out.loss * (weights[micro] / total_w)
                scaler.scale(scaled).backward()
                window_loss += scaled.detach()
                for k, v in out.metrics.items():
                    step_metrics[k] = step_metrics.get(k, 0.0) + v.detach().float() * (weights[micro] / total_w)
                n_tok = int(batch.input_ids.numel())
                window_tokens += n_tok
                window_useful += stage.useful_tokens(batch)
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) \
                if cfg.grad_clip > 0 else torch.zeros(())
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_steps += 1
            progress.update(1)

            if step % cfg.log_interval == 0 or step == total_steps:
                loss_val = float(all_reduce_mean(window_loss.detach().float(), info)) / window_steps
                dt = max(time.perf_counter() - window_t0, 1e-9)
                tok_s = window_tokens * info.world_size / dt
                useful_s = window_useful * info.world_size / dt
                record = {"step": step, "epoch": epoch, "loss": round(loss_val, 6), "lr": lr,
                          "grad_norm": round(float(grad_norm), 4), "tok_per_s": round(tok_s, 1),
                          "useful_tok_per_s": round(useful_s, 1),
                          "mfu": round(flops_tok * tok_s / peak, 5)}
                record.update({k: round(float(v), 6) for k, v in step_metrics.items()})
                metrics.log(record)
                losses.append(loss_val)
                last_record = record
                run_tokens += window_tokens
                run_useful += window_useful
                progress.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
                window_loss.zero_()
                window_tokens = window_useful = window_steps = 0
                window_t0 = time.perf_counter()
            if (cfg.save_interval > 0 and step % cfg.save_interval == 0) or step == total_steps:
                save()
            if on_step is not None and last_record.get("step") == step:
                on_step(step, last_record)
    finally:
        progress.close()
        cleanup(info)
    seconds = time.perf_counter() - run_t0
    return TrainResult(weights_path=out_path, resume_path=resume_path, metrics_path=metrics_path,
                       steps=step, final_loss=last_record.get("loss", math.nan), losses=losses,
                       tokens_per_s=run_tokens * info.world_size / max(seconds, 1e-9),
                       useful_tokens_per_s=run_useful * info.world_size / max(seconds, 1e-9),
                       seconds=seconds)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="step")
