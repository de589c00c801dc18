"""Reading and writing weights: safetensors by default, reference ``.pth`` state dicts on request.

Our files carry the model config in the safetensors metadata (key ``minimind_config``), so one file
is enough to rebuild the model.  Reference MiniMind ``.pth`` files (fp16 or fp32, with both the
embedding and the tied ``lm_head`` key) load with ``torch.load(weights_only=True)`` — never pickle.
A ``.pth`` we export gets its config in a ``<stem>.json`` beside it (the reference ships a
``config.json``), because tensors cannot show e.g. experts per token or YaRN settings.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from minimind.config import ModelConfig
from minimind.fileio import atomic_path, atomic_write_text
from minimind.model.modeling import MiniMindForCausalLM

TIED_KEY = "lm_head.weight"
EMBED_KEY = "model.embed_tokens.weight"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: Suffixes that mark a weights *path* (anything else without a suffix may be a stage name).
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")
#: Hidden size of reference output names when none is given (``full_sft`` -> ``full_sft_768``).
DEFAULT_NAME_HIDDEN_SIZE = 768


class AssumedConfigWarning(UserWarning):
    """A bare weights file was loaded with config values that its tensors cannot confirm."""


def clean_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP / torch.compile prefixes."""
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in _WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _not_weights(path: Path, expected: str, err: BaseException) -> ValueError:
    """One-line error for a file that the weight readers cannot parse.

    The library messages (a safetensors header error, a multi-paragraph ``weights_only`` unpickling
    explanation, a bare ``KeyError: 101``) do not say which file or what was expected.
    """
    detail = (str(err).strip().splitlines() or [""])[0][:120] or type(err).__name__
    return ValueError(f"not a weights file: {path} ({expected}: {detail})")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.pth``/``.pt`` state dict (a resume checkpoint's
    ``model`` entry too), with DDP / compile prefixes stripped.

    Raises ``FileNotFoundError`` for a missing path and a one-line ``ValueError`` ("not a weights
    file: ...") for anything that is not a dict of tensors.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.is_dir():
        raise ValueError(f"not a weights file: {path} is a folder")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as e:
            raise _not_weights(path, "unreadable as safetensors", e) from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, MemoryError):
        raise  # permissions, disk: not a format problem
    except Exception as e:  # noqa: BLE001 - torch.load raises anything from KeyError to EOFError
        raise _not_weights(path, "unreadable as a PyTorch state dict", e) from None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]  # a reference resume checkpoint
    if not (isinstance(sd, dict) and sd and all(isinstance(v, torch.Tensor) for v in sd.values())):
        raise ValueError(f"not a weights file: {path} (holds a {type(sd).__name__}, "
                         "not a dict of tensors)")
    return clean_state_dict(sd)


def _config_json(cand: Path) -> ModelConfig:
    try:
        data = json.loads(cand.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not a config file: {cand} ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"not a config file: {cand} (expected a JSON object)")
    return ModelConfig.from_dict(data)


def read_config(path: str | Path) -> ModelConfig | None:
    """Config from safetensors metadata, else from ``<stem>.json``, else ``config.json`` beside
    the file; ``None`` when there is none.  Unparseable files raise a one-line ``ValueError``."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except SafetensorError as e:
            raise _not_weights(path, "unreadable as safetensors", e) from None
        if "minimind_config" in meta:
            try:
                return ModelConfig.from_dict(json.loads(meta["minimind_config"]))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: corrupt minimind_config metadata ({e})") from None
    for cand in (path.with_suffix(".json"), path.parent / "config.json"):
        if cand != path and cand.is_file():
            return _config_json(cand)
    return None


def load_weights(model: MiniMindForCausalLM, sd: dict[str, torch.Tensor]) -> None:
    """Strict load with a readable error; the duplicated tied key is accepted and checked."""
    sd = clean_state_dict(dict(sd))
    if model.config.tie_word_embeddings and TIED_KEY in sd:
        tied = sd.pop(TIED_KEY)
        if EMBED_KEY in sd and not torch.equal(tied.float(), sd[EMBED_KEY].float()):
            raise ValueError("checkpoint has tie_word_embeddings but lm_head.weight differs from "
                             "model.embed_tokens.weight")
        sd.setdefault(EMBED_KEY, tied)
    expected = {k for k in model.state_dict() if not (model.config.tie_word_embeddings and k == TIED_KEY)}
    missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"weights do not fit the model config: missing keys {_key_sample(missing)}; "
                         f"unexpected keys {_key_sample(unexpected)}")
    own = model.state_dict()
    for k, v in sd.items():
        if own[k].shape != v.shape:
            raise ValueError(f"shape mismatch for {k}: checkpoint {tuple(v.shape)} vs model "
                             f"{tuple(own[k].shape)}")
    model.load_state_dict(sd, strict=False)


def save_weights(model: MiniMindForCausalLM, path: str | Path, dtype: torch.dtype | None = None,
                 extra_metadata: dict[str, str] | None = None) -> Path:
    """Atomically write safetensors (tied head stored once, as HF does) with the config inside."""
    path = Path(path)
    sd = {}
    for k, v in model.state_dict().items():
        if model.config.tie_word_embeddings and k == TIED_KEY:
            continue
        v = v.detach().to("cpu")
        sd[k] = (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
    meta = {"minimind_config": json.dumps(model.config.to_dict()), "format": "pt"}
    meta.update(extra_metadata or {})
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=meta)
    return path


def export_reference_pth(model: MiniMindForCausalLM, path: str | Path,
                         dtype: torch.dtype = torch.float16) -> Path:
    """A reference-style ``.pth``: fp16 state dict that includes both tied keys, plus the config as
    ``<stem>.json`` beside it (``out/x.pth`` -> ``out/x.json``, found again by :func:`read_config`).

    The config file is what keeps a top-2 MoE a top-2 MoE, and YaRN settings YaRN, on reload: the
    reference format has no room for them in the state dict.  Both files are written atomically,
    the weights first.
    """
    path = Path(path)
    if path.suffix == ".json":
        raise ValueError(f"a .pth export path cannot end in .json: {path}")
    sd = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(sd, tmp)
    atomic_write_text(path.with_suffix(".json"),
                      json.dumps(model.config.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return path


#: Keys the shape of a bare state dict is read from (a dense or an MoE first layer).
_SHAPE_KEYS = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_norm.weight",
               "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight")


def _key_sample(keys: Any, n: int = 6) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "") if keys else "none"


def _check_shape_keys(sd: dict[str, Any]) -> None:
    """Refuse a state dict whose keys are not MiniMind/Qwen3 ones, saying which keys are missing and
    which the file has instead (a ``KeyError`` on one name tells nobody what the file is)."""
    missing = [k for k in _SHAPE_KEYS if k not in sd]
    dense = "model.layers.0.mlp.gate_proj.weight" in sd
    moe = "model.layers.0.mlp.experts.0.gate_proj.weight" in sd
    if not (dense or moe):
        missing.append("model.layers.0.mlp.gate_proj.weight (or mlp.experts.0.gate_proj.weight)")
    if missing:
        unexpected = [k for k in sd if not (k.startswith("model.") or k == "lm_head.weight")]
        raise ValueError(f"not a MiniMind checkpoint: missing keys {', '.join(missing)}; unexpected keys: "
                         f"{_key_sample(unexpected)}")


def infer_model_config(sd: dict[str, Any], preset_name: str = "minimind-3",
                       overrides: dict[str, Any] | None = None) -> Any:
    """Model config for a bare state dict: the shape is read from the tensors themselves
    (head_dim from q_norm, heads from q/k_proj, experts from the keys, tying from lm_head); the
    preset supplies what
    tensors cannot tell (rope theta, positions, experts per token); explicit flags win."""
    from minimind.config import PRESETS

    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose one of {sorted(PRESETS)}")
    _check_shape_keys(sd)
    emb = sd["model.embed_tokens.weight"]
    vocab, hidden = emb.shape
    layer_ids = {int(k.split(".")[2]) for k in sd if k.startswith("model.layers.")}
    head_dim = sd["model.layers.0.self_attn.q_norm.weight"].shape[0]
    experts = {k.split(".")[5] for k in sd if k.startswith("model.layers.0.mlp.experts.")}
    cfg: dict[str, Any] = dict(PRESETS[preset_name])
    cfg.update(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=max(layer_ids) + 1,
               head_dim=head_dim,
               num_attention_heads=sd["model.layers.0.self_attn.q_proj.weight"].shape[0] // head_dim,
               num_key_value_heads=sd["model.layers.0.self_attn.k_proj.weight"].shape[0] // head_dim,
               use_moe=bool(experts),
               tie_word_embeddings="lm_head.weight" not in sd or bool(
                   (sd["lm_head.weight"] == emb).all()))
    if experts:
        inter = sd["model.layers.0.mlp.experts.0.gate_proj.weight"].shape[0]
        cfg.update(num_experts=len(experts), moe_intermediate_size=inter, intermediate_size=inter)
    else:
        cfg["intermediate_size"] = sd["model.layers.0.mlp.gate_proj.weight"].shape[0]
    cfg.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return ModelConfig(**cfg)


#: Config fields that change the outputs but that no tensor shape shows.
_UNSEEN_FIELDS = ("rope_theta", "max_position_embeddings", "rope_scaling", "rms_norm_eps")
_UNSEEN_MOE_FIELDS = ("num_experts_per_tok", "norm_topk_prob")


def _warn_assumed_config(path: Path, config: ModelConfig, preset: str,
                         overrides: dict[str, Any] | None) -> None:
    """One warning naming every value a bare file's model took from the preset unverified."""
    given = {k for k, v in (overrides or {}).items() if v is not None}
    fields = _UNSEEN_FIELDS + (_UNSEEN_MOE_FIELDS if config.use_moe else ())
    assumed = [f"{k}={getattr(config, k)!r}" for k in fields if k not in given]
    if not assumed:
        return
    warnings.warn(f"{path} has no config ({path.with_suffix('.json').name} or config.json): shape read "
                  f"from the tensors, but {', '.join(assumed)} assumed from preset {preset!r}; "
                  f"write the true config to {path.with_suffix('.json')} if these are wrong",
                  AssumedConfigWarning, stacklevel=3)


def load_model(path: str | Path, config: ModelConfig | None = None,
               device: torch.device | str = "cpu", preset: str = "minimind-3",
               overrides: dict[str, Any] | None = None) -> MiniMindForCausalLM:
    """Build a model from a weights file: config given, else from the file's metadata or a
    ``<stem>.json`` / ``config.json`` beside it, else read off the tensor shapes (bare reference
    ``.pth`` files).

    This is the one loader of chat, convert, the training loop and the demo.  ``overrides`` (e.g.
    ``{"hidden_size": 512, "use_moe": True}``; ``None`` values are ignored) only apply to the
    shape-inferred case, next to ``preset``; a config stored with the weights always wins.  The
    shape-inferred case warns (:class:`AssumedConfigWarning`) with the values that were assumed.
    """
    path = Path(path)
    sd = read_state_dict(path)
    if config is None:
        config = read_config(path)
    try:  # name the file in key errors: this loader is shared by every command
        if config is None:
            config = infer_model_config(sd, preset, overrides)
            _warn_assumed_config(path, config, preset, overrides)
        model = MiniMindForCausalLM(config)
        load_weights(model, sd)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    del sd
    return model.to(device)


def resolve_weight_path(name_or_path: str | Path, save_dir: str | Path = "out", hidden_size: int = 0,
                        use_moe: int = -1) -> Path:
    """A weights path, or a reference-style stage name turned into one.

    ``full_sft`` (no file suffix) means ``<save_dir>/full_sft_<H>[_moe].safetensors``, then ``.pth``,
    with ``H = hidden_size`` (0: 768, the reference default) and ``_moe`` when ``use_moe == 1``; this
    is the reference habit (``--weight full_sft``, ``--from_weight pretrain``).  A name with a folder
    (``runs/a/full_sft``) looks in that folder instead of ``save_dir``.  When neither exists and
    exactly one ``<name>_<H>[_moe].safetensors`` (else ``.pth``) is in the folder, that one is used,
    so a 512-wide run is found without repeating its ``--hidden_size``.  The error lists the paths
    tried.  An existing file is returned as is; a missing path with a weights suffix is an error.
    """
    p = Path(name_or_path)
    if p.is_file():
        return p
    if p.suffix in WEIGHT_SUFFIXES:
        raise FileNotFoundError(f"weights file not found: {p}")
    if p.is_dir():
        raise ValueError(f"not a weights file: {p} is a folder")
    if not p.name:
        raise ValueError("empty weights name")
    folder = Path(save_dir) if str(p.parent) in ("", ".") else p.parent
    stem = f"{p.name}_{hidden_size or DEFAULT_NAME_HIDDEN_SIZE}{'_moe' if use_moe == 1 else ''}"
    tried = [folder / f"{stem}{ext}" for ext in (".safetensors", ".pth")]
    for cand in tried:
        if cand.is_file():
            return cand
    shaped = re.compile(rf"{re.escape(p.name)}_\d+(_moe)?")
    for ext in (".safetensors", ".pth"):
        found = sorted(c for c in (folder.glob(f"*{ext}") if folder.is_dir() else [])
                       if c.is_file() and shaped.fullmatch(c.name[:-len(ext)]))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise FileNotFoundError(
                f"no weights {p.name!r}: tried {', '.join(map(str, tried))}; several other sizes exist "
                f"({', '.join(c.name for c in found)}): pass the path, or --hidden_size / --use_moe")
    raise FileNotFoundError(f"no weights {p.name!r}: tried {', '.join(map(str, tried))} and "
                            f"{folder / (p.name + '_*.safetensors')}")
