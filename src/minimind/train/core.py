"""The core every training driver shares: a run's device, precision, model, optimizer and files, and
:meth:`Trainer.step` -- one optimizer step over a list of micro-batches.

One step (``micro_batches`` on this rank, ``W`` = the sum of every rank's batch weights)::

    set lr -> for each micro-batch i: forward under autocast,
              backward(loss_i * w_i / W * world_size)       (DDP all-reduces only on the last one)
           -> unscale (fp16) -> clip -> optimizer step -> zero grads

DDP averages gradients over ranks, so the ``world_size`` factor makes the result
``grad( sum_{all ranks, i} loss_i * w_i / W )``: every target token (or pair) counts the same, however
unevenly the tokens fall on ranks and micro-batches.

Nothing in a step reads a device value back to the host: the loss, metrics and a "this step was not
finite" flag stay on the device, and are read once per ``--log_interval`` steps and before every
save.  A non-finite loss or gradient therefore stops the run at the next check with
:class:`NonFiniteTrainingError`, before any weights file is written (the last good file stays as it
was); ``--skip_nonfinite N`` instead skips such steps (no update) at the cost of one host read per
step, and fails after N.  The epoch driver (:func:`minimind.train.loop.train`)
calls :meth:`Trainer.step` once per batch of rows; RL drivers call it several times per rollout batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from minimind.config import ModelConfig, TrainConfig
from minimind.data.batch import Batch
from minimind.model import MiniMindForCausalLM, load_model, load_weights
from minimind.train import checkpoint as ckpt
from minimind.train.device import autocast, pick_device, pick_dtype
from minimind.train.distributed import (DistInfo, all_gather_objects, all_reduce_sum, barrier,
                                        cleanup, init_distributed, local_rank_zero_first, no_sync, wrap_ddp)
from minimind.train.prefetch import BatchStream
from minimind.train.stages.base import LossOutput, StageBase, StageContext

LossFn = Callable[[nn.Module, Any], LossOutput]


class NonFiniteTrainingError(ValueError):
    """A step's loss or gradient was NaN/inf: the run stops before the weights reach a file."""


@dataclass
class StepStats:
    """What one optimizer step did.  ``loss`` and ``metrics`` are this rank's share of the global
    weighted mean (sum them over ranks to get it); ``grad_norm`` is the global norm before clipping."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    weight: float = 0.0
    tokens: int = 0
    useful_tokens: int = 0


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def weights_path(cfg: TrainConfig, mcfg: ModelConfig, name: str | None = None) -> Path:
    """``out/<name>_<H>[_moe].safetensors`` (reference naming, safetensors format)."""
    return Path(cfg.save_dir) / f"{name or cfg.save_weight}_{mcfg.weight_suffix}.safetensors"


def resolve_from_weight(cfg: TrainConfig, mcfg: ModelConfig | None) -> Path | None:
    """``--from_weight`` is a stage name (``pretrain`` -> out/pretrain_<H>.safetensors) or a path."""
    if cfg.from_weight in ("", "none"):
        return None
    from minimind.model.weights import resolve_weight_path
    if mcfg is None:
        mcfg = cfg.model_config()
    return resolve_weight_path(cfg.from_weight, cfg.save_dir, mcfg.hidden_size, int(mcfg.use_moe))


def build_model(cfg: TrainConfig, vocab_size: int) -> tuple[MiniMindForCausalLM, Path | None]:
    """New model from the preset/flags, or the model stored in ``--from_weight``.

    A stored model keeps its own shape; an explicit ``--hidden_size`` / ``--num_hidden_layers`` /
    ``--use_moe`` that contradicts it is refused rather than silently ignored."""
    mcfg = cfg.model_config(vocab_size=cfg.vocab_size or vocab_size)
    src = resolve_from_weight(cfg, mcfg)
    if src is None:
        model = MiniMindForCausalLM(mcfg)
    else:
        asked: dict[str, Any] = {}
        if cfg.hidden_size:
            asked["hidden_size"] = cfg.hidden_size
        if cfg.num_hidden_layers:
            asked["num_hidden_layers"] = cfg.num_hidden_layers
        if cfg.use_moe >= 0:
            asked["use_moe"] = bool(cfg.use_moe)
        if cfg.vocab_size:
            asked["vocab_size"] = cfg.vocab_size
        model = load_model(src, preset=cfg.preset, overrides=asked)  # flags only fill in a bare .pth
        clash = [f"--{k} {int(v)} but the weights have {int(getattr(model.config, k))}"
                 for k, v in asked.items() if getattr(model.config, k) != v]
        if clash:
            raise ValueError(f"--from_weight {src}: " + "; ".join(clash))
    if model.config.vocab_size < vocab_size:
        raise ValueError(f"model vocab_size {model.config.vocab_size} is smaller than the tokenizer's "
                         f"{vocab_size}")
    return model, src


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device,
                   extra_groups: Sequence[dict[str, Any]] = ()) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (norm gains are left alone); fused on CUDA.
    ``--optimizer muon``: Muon for the decoder blocks' matrices instead (:mod:`minimind.train.muon`),
    AdamW for the embedding, head and gains.

    Only parameters with ``requires_grad`` are optimised (LoRA freezes the base); ``extra_groups``
    are a stage's own parameter groups (e.g. a critic), appended as given."""
    from minimind.train.muon import MuonAdamW, is_hidden_matrix
    muon = cfg.optimizer == "muon"
    seen: set[int] = set()
    decay, no_decay, hidden = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if muon and is_hidden_matrix(name, p):
            hidden.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if muon:
        groups.append({"params": hidden, "weight_decay": cfg.weight_decay, "muon": True,
                       "lr_scale": cfg.muon_lr / cfg.learning_rate})
    groups = [g for g in groups if g["params"]] + list(extra_groups)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if muon:
        return MuonAdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")


class Trainer:
    """A training run's moving parts, owned once: device, precision, distributed state, the model
    (wrapped for compile/DDP), the optimizer, checkpoints.  Drivers call :meth:`prepare_data`,
    :meth:`setup_model`, then :meth:`step` as often as they like, :meth:`save` when they want."""

    def __init__(self, stage: StageBase, cfg: TrainConfig, tokenizer: Any) -> None:
        cfg.validate()
        stage.validate(cfg)
        self.stage, self.cfg, self.tokenizer = stage, cfg, tokenizer
        if cfg.use_wandb:  # fail before any data is read, not after an hour of tokenizing
            from minimind.train.metrics import check_tracker
            check_tracker("swanlab" if cfg.use_wandb == 1 else "wandb")
        device = pick_device(cfg.device)
        self.info: DistInfo = init_distributed(device.type)
        if self.info.enabled and device.type == "cuda":
            device = torch.device("cuda", self.info.local_rank)
        self.device = device
        self.dtype = pick_dtype(device, cfg.dtype)
        torch.manual_seed(cfg.seed + self.info.rank)
        self.ctx = StageContext(cfg=cfg, device=device, dtype=self.dtype, info=self.info, tokenizer=tokenizer)
        self.model: nn.Module | None = None  # wrapped (compile / DDP)
        self.base_model: MiniMindForCausalLM | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.source: Path | None = None
        self.steps_taken = 0  # Trainer.step calls of this process
        self.skipped_steps = 0  # non-finite steps skipped under --skip_nonfinite
        # on the device: how many steps were not finite, and the first of them (-1: none)
        self._bad_steps = torch.zeros((), dtype=torch.int64, device=device)
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    # ---- setup -----------------------------------------------------------------------------------
    def prepare_data(self) -> Any:
        """The stage's dataset; local rank 0 tokenizes while the node's other ranks wait, so they
        never race on the cache."""
        with local_rank_zero_first(self.info):
            return self.stage.build_dataset(self.cfg, self.tokenizer, rank=self.info.rank)

    def keep_tokenizer(self) -> None:
        """Copy the tokenizer next to the weights (they travel together); called once data and model
        are known good, so a run refused for its input writes nothing into ``save_dir``."""
        keep = Path(self.cfg.save_dir) / "tokenizer"
        if self.info.local_rank != 0 or not hasattr(self.tokenizer, "save"):
            return
        if not (keep / "tokenizer.json").exists():
            self.tokenizer.save(keep)

    def setup_model(self) -> MiniMindForCausalLM:
        """Build (or load) the model, let the stage wrap it and place its own models, create the
        optimizer.  Returns the unwrapped model."""
        model, self.source = build_model(self.cfg, self.tokenizer.vocab_size)
        model = self.stage.prepare_model(model, self.cfg).to(self.device)
        self.stage.setup(self.ctx)
        self.base_model = model
        self.optimizer = make_optimizer(model, self.cfg, self.device, self.stage.extra_param_groups(self.ctx))
        wrapped: nn.Module = torch.compile(model) if self.cfg.compile else model
        self.model = wrap_ddp(wrapped, self.info, self.device, bf16_grads=bool(self.cfg.ddp_bf16_grads))
        self.model.train()
        return model

    @property
    def model_config(self) -> ModelConfig:
        assert self.base_model is not None, "setup_model() first"
        return self.base_model.config

    # ---- the optimizer step ----------------------------------------------------------------------
    def step(self, micro_batches: Sequence[Any], lr: float, loss_fn: LossFn | None = None,
             weights: Sequence[float] | None = None) -> StepStats:
        """One optimizer step over ``micro_batches`` (see the module docstring).

        ``loss_fn(model, batch) -> LossOutput`` defaults to the stage's loss and ``weights`` to
        ``stage.batch_weight(batch)``; the loss of a micro-batch must be a mean over its weight."""
        assert self.model is not None and self.optimizer is not None, "setup_model() first"
        loss_fn = loss_fn or self.stage.compute_loss
        if weights is None:
            weights = [float(self.stage.batch_weight(b)) for b in micro_batches]
        local_w = float(sum(weights))
        # W stays on the device: the all-reduce needs no host round trip in the middle of the step
        total_w = torch.tensor(local_w, dtype=torch.float32, device=self.device)
        if self.info.enabled:  # NCCL reduces device tensors only
            total_w = all_reduce_sum(total_w, self.info)
        denom = total_w.clamp(min=1e-12)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss_sum = torch.zeros((), device=self.device)
        metrics: dict[str, torch.Tensor] = {}
        tokens = useful = 0
        for i, batch in enumerate(micro_batches):
            batch = self.on_device(batch)
            frac = weights[i] / denom
            with no_sync(self.model, i < len(micro_batches) - 1), autocast(self.device, self.dtype):
                out = loss_fn(self.model, batch)
                scaled = out.loss * (frac * self.info.world_size)
            self.scaler.scale(scaled).backward()
            loss_sum += out.loss.detach().float() * frac
            for k, v in out.metrics.items():
                v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
                metrics[k] = metrics.get(k, 0.0) + v.to(self.device) * frac
            if hasattr(batch, "input_ids"):
                tokens += int(batch.input_ids.numel())
                useful += int(self.stage.useful_tokens(batch))
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        finite = self._step_is_finite(loss_sum, grad_norm)
        if self.cfg.skip_nonfinite:
            skip = not bool(finite)  # the one host read per step that skipping costs
            metrics["skipped"] = torch.tensor(float(skip), device=self.device)
            if skip:
                return self._skip_step(grad_norm, metrics, local_w, tokens, useful)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self._record_finite(finite)
        return StepStats(loss=loss_sum, grad_norm=grad_norm, metrics=metrics, weight=local_w,
                         tokens=tokens, useful_tokens=useful)

    # ---- non-finite steps ------------------------------------------------------------------------
    def _step_is_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """Device bool: the loss and (unless fp16's scaler handles overflow itself) the global
        gradient norm are finite.  A NaN in any gradient makes the norm NaN, and under DDP the norm
        is of the all-reduced gradients, so every rank reaches the same verdict."""
        finite = torch.isfinite(loss)
        if not self.scaler.is_enabled():
            finite = finite & torch.isfinite(grad_norm.to(finite.device))
        return finite

    def _record_finite(self, finite: torch.Tensor) -> None:
        bad = ~finite
        self._first_bad = torch.where(bad & (self._first_bad < 0), self.steps_taken, self._first_bad)
        self._bad_steps = self._bad_steps + bad.long()
        self.steps_taken += 1
        if self.steps_taken % self.cfg.log_interval == 0:
            self.check_finite()

    def _skip_step(self, grad_norm: torch.Tensor, metrics: dict[str, torch.Tensor], weight: float,
                   tokens: int, useful: int) -> StepStats:
        """Drop the gradients of a non-finite step (no update, the optimizer state is untouched)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self.steps_taken += 1
        if self.skipped_steps > self.cfg.skip_nonfinite:
            raise NonFiniteTrainingError(
                f"{self.skipped_steps} optimizer steps had a NaN/inf loss or gradient, more than "
                f"--skip_nonfinite {self.cfg.skip_nonfinite}; stopped before saving (the weights on disk "
                f"are those of the last save). Lower --learning_rate or check the data.")
        zero = torch.zeros((), device=self.device)
        return StepStats(loss=zero, grad_norm=grad_norm,
                         metrics={k: (v if k == "skipped" else zero) for k, v in metrics.items()},
                         weight=weight, tokens=tokens, useful_tokens=useful)

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteTrainingError` if any step so far had a NaN/inf loss or gradient
        (one host read).  Called every ``--log_interval`` steps and before every save."""
        bad, first = (int(v) for v in torch.stack([self._bad_steps, self._first_bad]).tolist())
        if bad:
            raise NonFiniteTrainingError(
                f"the loss or gradient became NaN/inf at optimizer step {first + 1} of this process "
                f"({bad} such step(s) by step {self.steps_taken}); stopped before saving, so the weights "
                f"on disk are those of the last save. Lower --learning_rate, check the data, or pass "
                f"--skip_nonfinite N to skip such steps.")

    def check_weights_finite(self) -> None:
        """Refuse to save weights that hold a NaN/inf (one host read)."""
        assert self.base_model is not None
        flags = [torch.isfinite(p).all() for p in self.base_model.parameters() if p.is_floating_point()]
        if flags and not bool(torch.stack(flags).all()):
            raise NonFiniteTrainingError("the model's weights hold NaN/inf values; not saving them over the "
                                         "last good weights file.")

    def batch_stream(self, make: Callable[[int], list[Any]], start: int, stop: int) -> BatchStream:
        """The micro-batches ``make(step)`` of steps ``start .. stop - 1``, built ahead on a thread
        (pinned for non-blocking copies when training on CUDA); see :mod:`minimind.train.prefetch`."""
        return BatchStream(make, start, stop, pin_memory=self.device.type == "cuda")

    def on_device(self, batch: Any) -> Any:
        """``batch`` on the run's device (non-blocking: a pinned batch's copy overlaps compute), in
        the run's attention mode: ``--attention causal`` drops the document mask of packed
        :class:`Batch` rows (pair batches keep theirs: a pair's rows must not see each other)."""
        if hasattr(batch, "to"):
            batch = batch.to(self.device, non_blocking=True)
        if self.cfg.attention == "causal" and isinstance(batch, Batch):
            batch = batch.plain_causal()
        return batch

    def close(self, finished: bool) -> None:
        """End the run's distributed part: drop the DDP wrapper (it holds the process group), then
        tear the group down (with a barrier when every rank ``finished``).  The plain model stays."""
        self.model = None
        cleanup(self.info, finished=finished)

    # ---- checkpoints -----------------------------------------------------------------------------
    def save(self, weights_out: Path, resume_out: Path, *, step: int, epoch: int,
             config: dict[str, Any]) -> None:
        """Export the stage's result and write the resume file (rank 0), with every rank's RNG.
        Every rank must call it (the RNG states are gathered)."""
        assert self.base_model is not None and self.optimizer is not None
        self.check_finite()  # a NaN run never reaches a file: the last good weights stay on disk
        self.check_weights_finite()
        rngs = all_gather_objects(ckpt.rng_state(), self.info)
        if self.info.is_main:
            self.stage.export(self.base_model, weights_out)
            ckpt.save_resume(resume_out, model_state=self.base_model.state_dict(), optimizer=self.optimizer,
                             epoch=epoch, step=step, micro_step=step * self.cfg.accumulation_steps,
                             world_size=self.info.world_size, config=config,
                             extra={"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {},
                             rng_per_rank=rngs, stage_state=self.stage.state_dict())
        barrier(self.info)

    def restore(self, state: dict[str, Any]) -> None:
        """Load a resume file's model, optimizer, scaler, stage state and this rank's RNG."""
        assert self.base_model is not None and self.optimizer is not None
        load_weights(self.base_model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state.get("extra", {}):
            self.scaler.load_state_dict(state["extra"]["scaler"])
        self.stage.load_state_dict(state.get("stage", {}))
        rngs = state.get("rng_per_rank") or [state["rng"]]
        if len(rngs) == self.info.world_size:
            ckpt.set_rng_state(rngs[self.info.rank])
        else:  # another world size: no stream to continue, start a fresh one per rank
            torch.manual_seed(self.cfg.seed + self.info.rank + 1_000_003 * int(state["step"]))

    def config_record(self) -> dict[str, Any]:
        """What the resume file stores about the run, to check that a resume continues the same run."""
        return {**dataclasses.asdict(self.cfg), "stage_options": self.stage.options_dict()}
