"""LoRA (low-rank adaptation) written from scratch: adapters, freezing, adapter files and merging.

A LoRA'd Linear keeps its frozen weight ``W [out, in]`` and learns a low-rank update through two small
matrices ``A [r, in]`` and ``B [out, r]``::

    y = x W^T + b + scale * B(A(dropout(x)))        scale = alpha / r
    merged:  W' = W + scale * B @ A                  (so y = x W'^T + b when dropout is off)

``A ~ N(0, 0.02)`` and ``B = 0``, so a freshly applied adapter leaves the model's outputs unchanged and
training starts exactly from the base model.

Relation to the reference MiniMind implementation
-------------------------------------------------
* The reference adds ``B(A(x))`` unscaled, has no dropout and targets every ``nn.Linear`` whose
  ``in_features == out_features``; with ``rank=16`` that is ``q_proj`` and ``o_proj`` for H=768 / 8
  heads, i.e. ``2 * (768*16 + 16*768) * 8 = 393,216`` trainable parameters on the 8-layer model.
  Our defaults (``rank=16, alpha=0 -> scale 1, dropout=0, targets="square"``) reproduce exactly that.
* We add optional ``alpha / rank`` scaling, LoRA dropout and explicit target lists ("all" or module-name
  suffixes such as ``"q_proj,v_proj"``).
* The reference monkey-patches ``module.forward``, which forces ``torch.compile`` off. Here a LoRA'd
  layer is a real module class (:class:`LoRALinear`, an ``nn.Linear`` subclass), so compilation, DDP and
  weight tying are unaffected: the base ``weight`` Parameter is the very same object as before.
* Adapter keys are the reference ones (``<module>.lora.A.weight`` / ``<module>.lora.B.weight``), so
  reference ``.pth`` adapters load and ``.pth`` adapters we write load in the reference code. Our default
  file format is safetensors with the :class:`LoRAConfig` in its metadata.
* Loading is strict (every key must fit, shapes must agree), where the reference matches keys by
  substring and silently skips what does not fit.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from minimind.fileio import atomic_path
from minimind.model.moe import MoEFeedForward
from minimind.model.weights import (clean_state_dict, export_reference_pth, load_model,
                                    save_weights)

A_SUFFIX = ".lora.A.weight"
B_SUFFIX = ".lora.B.weight"
METADATA_KEY = "minimind_lora"
_RULES = ("square", "all")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# ---- configuration ------------------------------------------------------------------------------
@dataclass
class LoRAConfig:
    """Adapter hyper-parameters; the defaults reproduce the reference adapter.

    * ``rank``: r, the inner dimension of ``B @ A``.
    * ``alpha``: the update is scaled by ``alpha / rank``; ``0`` means "alpha = rank", i.e. scale 1,
      which is what the reference does (it adds ``B(A(x))`` unscaled).
    * ``dropout``: dropout on the adapter's input only (the base path is untouched).
    * ``targets``: ``"square"`` (reference rule: every Linear with ``in_features == out_features``),
      ``"all"`` (every Linear of the decoder layers: attention, MLP, experts), or a comma list of
      module-name suffixes such as ``"q_proj,v_proj"``. ``lm_head`` and the MoE router ``gate`` are
      never targets.
    """

    rank: int = 16
    alpha: float = 0.0
    dropout: float = 0.0
    targets: str = "square"

    @property
    def scale(self) -> float:
        """``alpha / rank`` with alpha 0 read as alpha = rank (scale 1, the reference behaviour)."""
        return (self.alpha or self.rank) / self.rank

    def target_suffixes(self) -> list[str]:
        """The explicit suffix list, or ``[]`` for the "square" / "all" rules."""
        if self.targets.strip() in _RULES:
            return []
        return [t.strip() for t in self.targets.split(",") if t.strip()]

    def validate(self) -> None:
        """Reject impossible values early. Targets that match no module are caught by
        :func:`apply_lora`, because only the model knows its module names."""
        problems = []
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            problems.append(f"rank must be a positive integer, got {self.rank!r}")
        if not math.isfinite(self.alpha) or self.alpha < 0:
            problems.append(f"alpha must be >= 0 (0 means alpha = rank), got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.targets, str) or not self.targets.strip().strip(","):
            problems.append(f"targets must be 'square', 'all' or a comma list of module-name "
                            f"suffixes, got {self.targets!r}")
        if problems:
            raise ValueError("invalid LoRA config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoRAConfig":
        """Unknown keys are ignored so that files written by later versions still load."""
        known = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        cfg.validate()
        return cfg


# ---- modules ------------------------------------------------------------------------------------
class LoRAAdapter(nn.Module):
    """``scale * B(A(dropout(x)))``: the trainable low-rank branch of a :class:`LoRALinear`.

    Living in its own child module named ``lora`` is what gives the reference state-dict keys
    ``<module>.lora.A.weight`` and ``<module>.lora.B.weight``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float = 1.0,
                 dropout: float = 0.0, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.rank = rank
        self.scale = float(scale)
        self.A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.B = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # A random and B zero: the product B @ A starts at 0, so applying LoRA changes nothing yet,
        # while A's randomness breaks the symmetry that would keep B's gradient rank-deficient.
        nn.init.normal_(self.A.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.B.weight)

    def delta_weight(self) -> torch.Tensor:
        """``scale * B @ A`` in at least float32, so merging into bf16/fp16 weights rounds once."""
        dt = torch.promote_types(self.B.weight.dtype, torch.float32)
        return self.scale * (self.B.weight.to(dt) @ self.A.weight.to(dt))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.B(self.A(self.dropout(x)))
        return out if self.scale == 1.0 else out * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` plus a low-rank trainable branch: ``y = x W^T + b + scale * B(A(dropout(x)))``.

    The base parameter keeps its name ``weight`` (so base checkpoints load unchanged) and the adapter
    lives in the child ``lora`` (``lora.A``: ``Linear(in, r)`` ~ N(0, 0.02); ``lora.B``:
    ``Linear(r, out)`` = 0). Being a plain module subclass rather than a patched ``forward`` keeps it
    ``torch.compile`` friendly.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rank: int = 16,
                 scale: float = 1.0, dropout: float = 0.0, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.lora = LoRAAdapter(in_features, out_features, rank, scale, dropout,
                                device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: LoRAConfig) -> "LoRALinear":
        """Wrap an existing Linear. The *same* ``weight`` / ``bias`` Parameter objects are reused, so
        weight tying, optimizer state and device placement of the base weights are unaffected; the
        adapter is created on the base weight's device and dtype."""
        # Build the shell on the meta device (no allocation), then adopt the existing parameters.
        new = cls(linear.in_features, linear.out_features, bias=False, rank=cfg.rank,
                  scale=cfg.scale, dropout=cfg.dropout, device="meta", dtype=linear.weight.dtype)
        new.weight = linear.weight
        new.bias = linear.bias
        new.lora = LoRAAdapter(linear.in_features, linear.out_features, cfg.rank, cfg.scale,
                               cfg.dropout, device=linear.weight.device, dtype=linear.weight.dtype)
        new.train(linear.training)
        return new

    def merged_weight(self) -> torch.Tensor:
        """``W + scale * B @ A`` (computed in at least float32, returned in the weight's dtype)."""
        delta = self.lora.delta_weight()
        return (self.weight.to(delta.dtype) + delta).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora(x)


# ---- applying -----------------------------------------------------------------------------------
def _candidates(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear that may carry LoRA: not ``lm_head`` (nor any Linear tied to an embedding) and
    not the MoE router, whose few outputs only decide routing."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    routers = {id(m.gate) for m in model.modules() if isinstance(m, MoEFeedForward)}
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, LoRALinear):
            continue
        if name.rsplit(".", 1)[-1] == "lm_head" or id(module.weight) in tied or id(module) in routers:
            continue
        out[name] = module
    return out


def _matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _select_targets(model: nn.Module, cfg: LoRAConfig) -> dict[str, nn.Linear]:
    """Module name -> Linear chosen by ``cfg.targets``; ValueError when a target matches nothing."""
    cands = _candidates(model)
    rule = cfg.targets.strip()
    if rule == "square":
        chosen = {n: m for n, m in cands.items() if m.in_features == m.out_features}
    elif rule == "all":
        chosen = dict(cands)
    else:
        suffixes = cfg.target_suffixes()
        unmatched = [s for s in suffixes if not any(_matches(n, s) for n in cands)]
        if unmatched:
            known = sorted({n.rsplit(".", 1)[-1] for n in cands})
            raise ValueError(f"LoRA targets {unmatched} match no eligible Linear of the model "
                             f"(eligible suffixes: {known}; lm_head and the MoE router are never "
                             f"targets)")
        chosen = {n: m for n, m in cands.items() if any(_matches(n, s) for s in suffixes)}
    if not chosen:
        raise ValueError(f"LoRA targets {cfg.targets!r} match no Linear of the model")
    return chosen


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(model: nn.Module, cfg: LoRAConfig | None = None) -> list[str]:
    """Replace the target Linears by :class:`LoRALinear` in place and freeze everything else.

    After this, exactly the adapter parameters have ``requires_grad=True``, so an optimizer over
    ``lora_parameters(model)`` (or over all parameters that require grad) trains only the adapters.
    Works on dense and MoE models, bare or wrapped (DDP ``module.``, ``torch.compile``).
    Returns the replaced module names. Raises ValueError if the model already has LoRA (applying
    twice would nest adapters) or if the targets match nothing.
    """
    cfg = cfg or LoRAConfig()
    cfg.validate()
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters; apply_lora must be called once "
                         "(use load_lora to load adapter weights, merge_lora to fold them in)")
    targets = _select_targets(model, cfg)
    for name, linear in targets.items():
        _set_submodule(model, name, LoRALinear.from_linear(linear, cfg))
    adapter_params = {id(p) for p in lora_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapter_params)
    return list(targets)


# ---- inspection ---------------------------------------------------------------------------------
def _lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Clean (wrapper-prefix-free) module name -> LoRALinear."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            out[_clean_name(name)] = module
    return out


def _clean_name(name: str) -> str:
    """Strip DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) wrapper prefixes."""
    while name.startswith(_WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (A and B of every LoRALinear), e.g. for the optimizer or grad clipping."""
    return [p for m in _lora_modules(model).values() for p in m.lora.parameters()]


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, detached on CPU, with reference key names and no DDP / compile
    prefixes: ``<module>.lora.A.weight`` and ``<module>.lora.B.weight``."""
    sd = {}
    for name, module in _lora_modules(model).items():
        sd[name + A_SUFFIX] = module.lora.A.weight.detach().to("cpu")
        sd[name + B_SUFFIX] = module.lora.B.weight.detach().to("cpu")
    return sd


# ---- files --------------------------------------------------------------------------------------
def save_lora(model: nn.Module, path: str | Path, cfg: LoRAConfig) -> Path:
    """Write the adapter atomically: safetensors with the config in the metadata, or for a ``.pth``
    path a reference-style fp16 ``torch.save`` of the same keys (the config is then lost: readers
    infer rank and targets and assume scale 1)."""
    path = Path(path)
    sd = lora_state_dict(model)
    if not sd:
        raise ValueError("the model has no LoRA adapters to save")
    with atomic_path(path) as tmp:
        if path.suffix == ".pth":
            torch.save({k: v.to(torch.float16) for k, v in sd.items()}, tmp)
        else:
            meta = {METADATA_KEY: json.dumps(cfg.to_dict()), "format": "pt"}
            save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=meta)
    return path


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], LoRAConfig | None]:
    """Adapter tensors and config: safetensors (config from metadata, if present) or a reference
    ``.pth`` read with ``torch.load(weights_only=True)`` (never pickle; config None)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        cfg = LoRAConfig.from_dict(json.loads(meta[METADATA_KEY])) if METADATA_KEY in meta else None
        return clean_state_dict(load_file(str(path))), cfg
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} is not a LoRA state dict (expected a dict of tensors)")
    return clean_state_dict(sd), None


def infer_lora_config(sd: Mapping[str, torch.Tensor]) -> LoRAConfig:
    """Config for a bare adapter (reference ``.pth``): rank from A's shape, targets = the distinct
    module-name suffixes present, scale 1 and no dropout (the reference semantics)."""
    a_keys = [k for k in sd if k.endswith(A_SUFFIX)]
    if not a_keys:
        raise ValueError(f"no '*{A_SUFFIX}' keys: not a LoRA adapter (first keys: {list(sd)[:4]})")
    rank = int(sd[a_keys[0]].shape[0])
    for k in a_keys:
        if sd[k].dim() != 2 or sd[k].shape[0] != rank:
            raise ValueError(f"inconsistent LoRA rank: {k} has shape {tuple(sd[k].shape)}, "
                             f"expected rank {rank} from {a_keys[0]}")
    suffixes = list(dict.fromkeys(k[: -len(A_SUFFIX)].rsplit(".", 1)[-1] for k in a_keys))
    return LoRAConfig(rank=rank, alpha=0.0, dropout=0.0, targets=",".join(suffixes))


def _expected_shapes(modules: Mapping[str, nn.Linear], rank: int) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, m in modules.items():
        shapes[name + A_SUFFIX] = (rank, m.in_features)
        shapes[name + B_SUFFIX] = (m.out_features, rank)
    return shapes


def _check_adapter(sd: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Strict in both directions: a key the model lacks, a wrong shape, or a LoRA module of the model
    the adapter does not cover all raise ValueError naming the key."""
    for k, v in sd.items():
        if k not in expected:
            raise ValueError(f"adapter key {k!r} matches no LoRA module of the model")
        if tuple(v.shape) != expected[k]:
            raise ValueError(f"adapter key {k!r} has shape {tuple(v.shape)}, the model expects "
                             f"{expected[k]} (different rank or model size?)")
    missing = sorted(expected.keys() - sd.keys())
    if missing:
        raise ValueError(f"adapter lacks {len(missing)} key(s) for LoRA modules of the model, e.g. "
                         f"{missing[:4]}")


def load_lora(model: nn.Module, path_or_state: str | Path | Mapping[str, torch.Tensor],
              cfg: LoRAConfig | None = None) -> LoRAConfig:
    """Load an adapter (file or state dict) onto a model; returns the config used.

    Config: ``cfg`` if given, else the file's, else (model already LoRA'd) the model's rank/scale,
    else inferred from the tensors (reference semantics, scale 1). If the model has no LoRA yet it is
    applied with that config (which also freezes the base). Everything is checked before the model is
    touched: every adapter key must match a LoRA module, shapes must agree, every LoRA module must be
    covered, and an existing adapter's scale must equal the config's (ValueError otherwise).
    """
    if isinstance(path_or_state, (str, Path)):
        sd, file_cfg = read_lora(path_or_state)
    else:
        sd, file_cfg = clean_state_dict(dict(path_or_state)), None
    inferred = infer_lora_config(sd)
    existing = _lora_modules(model)
    if existing:
        first = next(iter(existing.values())).lora
        model_cfg = LoRAConfig(rank=first.rank, alpha=first.scale * first.rank,
                               dropout=getattr(first.dropout, "p", 0.0), targets=inferred.targets)
        used = cfg or file_cfg or model_cfg
        used.validate()
        if used.rank != first.rank:
            raise ValueError(f"the model's LoRA has rank {first.rank} but the adapter's config says "
                             f"rank {used.rank}")
        for name, m in existing.items():
            if not math.isclose(m.lora.scale, used.scale, rel_tol=1e-6):
                raise ValueError(f"LoRA module {name!r} has scale {m.lora.scale:g} but the adapter's "
                                 f"config has scale {used.scale:g}")
        _check_adapter(sd, _expected_shapes(existing, first.rank))
        params = _adapter_params(existing)
    else:
        used = cfg or file_cfg or inferred
        used.validate()
        _check_adapter(sd, _expected_shapes(_select_targets(model, used), used.rank))
        apply_lora(model, used)
        params = _adapter_params(_lora_modules(model))
    with torch.no_grad():
        for k, v in sd.items():
            params[k].copy_(v)
    return used


def _adapter_params(modules: Mapping[str, LoRALinear]) -> dict[str, nn.Parameter]:
    out = {}
    for name, m in modules.items():
        out[name + A_SUFFIX] = m.lora.A.weight
        out[name + B_SUFFIX] = m.lora.B.weight
    return out


# ---- merging ------------------------------------------------------------------------------------
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place: ``W <- W + scale * B @ A``, then swap each
    LoRALinear back to a plain ``nn.Linear`` holding the (same, updated) weight Parameter, so
    ``save_weights`` writes a plain model whose keys equal the base model's. Parameters keep the
    ``requires_grad`` flags apply_lora gave them (base frozen). Returns ``model``."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoRALinear):
            continue
        with torch.no_grad():
            module.weight.copy_(module.merged_weight())
        plain = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        plain.weight = module.weight
        plain.bias = module.bias
        plain.train(module.training)
        _set_submodule(model, name, plain)
    return model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the model ``merge_lora`` would make, without touching ``model``: each
    LoRA'd weight is ``W + scale * B @ A`` and the adapter keys are gone, so it loads into a plain
    model of the same config (an inference copy refreshed while the adapters train)."""
    merged = {name + ".weight": m.merged_weight().detach() for name, m in model.named_modules()
              if isinstance(m, LoRALinear)}
    return {k: merged.get(k, v) for k, v in model.state_dict().items() if ".lora." not in k}


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` with its adapters folded in (``model`` itself when it has none)."""
    return merge_lora(copy.deepcopy(model)) if has_lora(model) else model


def merge_lora_files(base_weight: str | Path, lora_path: str | Path, out_path: str | Path) -> Path:
    """Base weights + adapter file -> merged full weights: safetensors via ``save_weights`` (config in
    the metadata), or for a ``.pth`` out path a reference-style fp16 file via ``export_reference_pth``."""
    model = load_model(base_weight)
    load_lora(model, lora_path)
    merge_lora(model)
    out_path = Path(out_path)
    if out_path.suffix == ".pth":
        return export_reference_pth(model, out_path)
    return save_weights(model, out_path)
