"""Configuration dataclasses: the single source of truth for the model and for training runs.

CLI flags are generated from these fields (see :mod:`minimind.cli`), so a field added here is a flag
everywhere.  Field names follow the reference MiniMind / HF Qwen3 names so that configs round-trip with
``config.json`` files of reference checkpoints and HF exports.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def default_intermediate_size(hidden_size: int) -> int:
    """Reference FFN width rule: ``ceil(H * pi / 64) * 64`` (768 -> 2432, 512 -> 1664)."""
    return int(math.ceil(hidden_size * math.pi / 64) * 64)


# YaRN settings of the reference ``inference_rope_scaling=True`` switch (factor 16 over 2048 positions).
REFERENCE_YARN = {
    "type": "yarn",
    "factor": 16.0,
    "original_max_position_embeddings": 2048,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "attention_factor": 1.0,
}


@dataclass
class ModelConfig:
    """Shape of a Qwen3-style decoder.  ``None`` fields are derived in ``__post_init__``."""

    hidden_size: int = 768
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int | None = None
    intermediate_size: int | None = None
    vocab_size: int = 6400
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    rope_scaling: dict | None = None
    inference_rope_scaling: bool = False
    tie_word_embeddings: bool = True
    dropout: float = 0.0
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    # Mixture of experts
    use_moe: bool = False
    num_experts: int = 4
    num_experts_per_tok: int = 1
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 5e-4
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.num_attention_heads <= 0:
            raise ValueError(f"invalid model config: num_attention_heads must be positive, "
                             f"got {self.num_attention_heads}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = default_intermediate_size(self.hidden_size)
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.inference_rope_scaling and self.rope_scaling is None:
            self.rope_scaling = dict(REFERENCE_YARN)
        self.validate()

    def validate(self) -> None:
        """Fail before any tensor is allocated, with a message that names the field."""
        problems = []
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "intermediate_size", "vocab_size", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % max(self.num_key_value_heads, 1):
            problems.append(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                            f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim and self.head_dim % 2:
            problems.append(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.use_moe and not 1 <= self.num_experts_per_tok <= self.num_experts:
            problems.append(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                            f"[1, num_experts={self.num_experts}]")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Accept our own dicts, reference MiniMind config dicts and HF Qwen3 config.json files.

        Unknown keys are ignored (reference configs carry e.g. ``max_seq_len``, ``flash_attn``);
        the legacy minimind2 keys that change the architecture are rejected explicitly.
        """
        if "n_routed_experts" in d or "n_shared_experts" in d:
            raise ValueError("minimind2-era MoE configs (shared experts, MoEGate) are not supported; "
                             "only the minimind-3 / Qwen3 architecture is")
        known = {f.name for f in dataclasses.fields(cls)}
        # None means "unset" in reference / HF configs (e.g. pad_token_id): keep our default.
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        if d.get("model_type") == "qwen3_moe" or ("num_experts" in d and "use_moe" not in d):
            kwargs["use_moe"] = True
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @property
    def weight_suffix(self) -> str:
        """``<H>[_moe]`` as used in reference output names (``out/pretrain_768_moe``)."""
        return f"{self.hidden_size}{'_moe' if self.use_moe else ''}"


PRESETS: dict[str, dict[str, Any]] = {
    # Reference models: 63,912,192 and 198,416,640 (A63,936,768) parameters.
    "minimind-3": dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4),
    "minimind-3-moe": dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=8,
                           num_key_value_heads=4, use_moe=True, num_experts=4, num_experts_per_tok=1),
    # The reference "H=512" code config (~30M) and a small one for CPU experiments.
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4),
    # ~4M parameters: what the CPU demo trains in a few minutes.
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=4096),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


#: Shortest ``--max_seq_len`` accepted: below it no chat turn fits (``<|im_start|>user\n...<|im_end|>``
#: plus the assistant header is about 12 tokens), and a pretraining row holds almost only BOS/EOS.
MIN_SEQ_LEN = 16

#: Largest learning rate accepted (any rate near it diverges at the first step; far above it, as with
#: 1e38, AdamW and Muon fail inside torch with a float32 overflow instead of a clear message).
MAX_RATE = 1e3


def nonfinite_fields(obj: Any) -> list[str]:
    """``--name must be a finite number`` for every float field of a dataclass that is NaN or inf.

    Comparisons with NaN are all false, so ``lr <= 0`` lets ``nan`` through; an ``inf`` rate or clip
    turns the weights into NaN at the first step.  Checked before any data is read."""
    return [f"--{f.name} must be a finite number, got {getattr(obj, f.name)}"
            for f in dataclasses.fields(obj)
            if isinstance(getattr(obj, f.name), float) and not math.isfinite(getattr(obj, f.name))]


def _not_a_folder(path: Path) -> Path | None:
    """The first existing part of ``path`` (itself or a parent) that is not a folder, else None."""
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def path_problems(cfg: "TrainConfig") -> list[str]:
    """Output folders that are files, and a ``--data_path`` that is a folder (else a traceback later)."""
    problems = []
    for name in ("save_dir", "checkpoint_dir", "shard_dir"):
        value = getattr(cfg, name)
        blocker = _not_a_folder(Path(value)) if value else None
        if blocker is not None:
            problems.append(f"--{name} {value} must be a folder, but {blocker} is a file")
    if cfg.data_path and Path(cfg.data_path).is_dir():
        problems.append(f"--data_path {cfg.data_path} is a folder; pass a JSONL file")
    return problems


@dataclass
class TrainConfig:
    """Everything a training run needs besides the stage's own loss.

    Names follow the reference trainers' flags (``--batch_size``, ``--learning_rate``,
    ``--max_seq_len``, ``--from_resume``, ``--from_weight``, ``--save_weight`` ...).
    """

    stage: str = "pretrain"
    data_path: str = "dataset/pretrain_t2t_mini.jsonl"
    tokenizer_path: str = ""  # folder with tokenizer.json (+ tokenizer_config.json); "" = bundled
    shard_dir: str = ""  # "" = data_cache/<stem>-<kind>-<tokenizer hash>
    save_dir: str = "out"
    checkpoint_dir: str = "checkpoints"
    save_weight: str = "pretrain"
    from_weight: str = "none"
    from_resume: int = 0
    epochs: int = 1
    max_steps: int = 0  # >0: stop after this many optimizer steps (overrides epochs)
    batch_size: int = 32
    max_seq_len: int = 340
    learning_rate: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0  # optimizer steps; 0 = 1% of the run
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    optimizer: str = "adamw"  # adamw | muon (Muon for the blocks' matrices, AdamW for the rest)
    muon_lr: float = 0.02  # Muon's rate, scheduled like --learning_rate
    accumulation_steps: int = 1
    grad_clip: float = 1.0
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    compile: int = 0
    attention: str = field(default="doc", metadata={"help": (
        "packed-row attention: doc (document-causal, positions restart per document) | causal (plain "
        "causal over the row, positions continue; SDPA is_causal, flash on CUDA)")})
    skip_nonfinite: int = field(default=0, metadata={"help": (
        "skip up to N optimizer steps whose loss or gradient is NaN/inf (no update); 0 = stop at the "
        "first with an error, keeping the last saved weights")})
    ddp_bf16_grads: int = field(default=0, metadata={"help": (
        "DDP: all-reduce gradients in bf16 (compression hook; halves the traffic)")})
    seed: int = 42
    num_workers: int = 0
    log_interval: int = 10
    save_interval: int = 500
    eval_interval: int = 0
    metrics_path: str = ""  # "" = <save_dir>/<save_weight>_<H>_metrics.jsonl
    skip_bad_lines: int = 0
    # SFT data augmentation (reference probabilities)
    add_system_ratio: float = 0.2
    empty_think_ratio: float = 0.2
    # Model shape (preset first, then explicit overrides)
    preset: str = "minimind-3"
    hidden_size: int = 0
    num_hidden_layers: int = 0
    use_moe: int = -1
    vocab_size: int = 0
    dropout: float = 0.0  # attention / residual dropout of a new model (the reference default is 0)
    use_wandb: int = 0  # 1 = SwanLab (the reference's tracker), 2 = Weights & Biases
    wandb_project: str = ""  # "" = the stage's default project name
    progress: int = 1

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        over: dict[str, Any] = {}
        if self.hidden_size:
            over["hidden_size"] = self.hidden_size
            over["intermediate_size"] = None
            over["head_dim"] = None
        if self.num_hidden_layers:
            over["num_hidden_layers"] = self.num_hidden_layers
        if self.use_moe >= 0:
            over["use_moe"] = bool(self.use_moe)
        if vocab_size or self.vocab_size:
            over["vocab_size"] = vocab_size or self.vocab_size
        if self.dropout:
            over["dropout"] = self.dropout
        base = dict(PRESETS[self.preset]) if self.preset in PRESETS else {}
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        base.update(over)
        return ModelConfig(**{k: v for k, v in base.items() if v is not None})

    def validate(self) -> None:
        """Every check that needs no data: run before anything is read, tokenized or allocated."""
        problems = nonfinite_fields(self)  # nan passes every "< 0" test below
        if self.max_seq_len < MIN_SEQ_LEN:
            problems.append(f"--max_seq_len must be at least {MIN_SEQ_LEN} (a row must hold BOS, some "
                            f"text and EOS, or a whole chat turn), got {self.max_seq_len}")
        problems += path_problems(self)
        for name in ("batch_size", "max_seq_len", "accumulation_steps", "epochs", "log_interval"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "grad_clip", "save_interval", "weight_decay",
                     "num_workers", "skip_nonfinite"):
            if getattr(self, name) < 0:
                problems.append(f"--{name} must not be negative, got {getattr(self, name)}")
        for name in ("learning_rate", "muon_lr"):  # above MAX_RATE torch's optimizers overflow float32
            if getattr(self, name) > MAX_RATE:
                problems.append(f"--{name} must be at most {MAX_RATE:g}, got {getattr(self, name):g}")
        if self.learning_rate <= 0:
            problems.append(f"--learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"--min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.optimizer not in ("adamw", "muon"):
            problems.append(f"--optimizer must be adamw or muon, got {self.optimizer!r}")
        if self.muon_lr <= 0:
            problems.append(f"--muon_lr must be positive, got {self.muon_lr}")
        for name, allowed in (("from_resume", (0, 1)), ("use_moe", (-1, 0, 1)), ("compile", (0, 1)),
                              ("use_wandb", (0, 1, 2)), ("skip_bad_lines", (0, 1)), ("progress", (0, 1)),
                              ("attention", ("doc", "causal")), ("ddp_bf16_grads", (0, 1))):
            if getattr(self, name) not in allowed:
                problems.append(f"--{name} must be one of {', '.join(map(str, allowed))}, "
                                f"got {getattr(self, name)}")
        for name in ("add_system_ratio", "empty_think_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"--{name} must be in [0, 1], got {getattr(self, name)}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            problems.append(f"--dtype must be auto|float32|bfloat16|float16, got {self.dtype!r}")
        if self.preset not in PRESETS:
            problems.append(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.hidden_size < 0 or self.num_hidden_layers < 0 or self.vocab_size < 0:
            problems.append("--hidden_size / --num_hidden_layers / --vocab_size must not be negative")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))
        from minimind.train.device import pick_device
        if self.device != "auto":
            pick_device(self.device)  # unknown / unavailable devices fail here, with the flag's name
        self.model_config()  # an impossible model shape fails here too
