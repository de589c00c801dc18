"""Reading and writing weights: safetensors by default, reference ``.pth`` state dicts on request.

Our files carry the model config in the safetensors metadata (key ``minimind_config``), so one file
is enough to rebuild the model.  Reference MiniMind ``.pth`` files (fp16 or fp32, with both the
embedding and the tied ``lm_head`` key) load with ``torch.load(weights_only=True)`` — never pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minimind.config import ModelConfig
from minimind.fileio import atomic_path
from minimind.model.modeling import MiniMindForCausalLM

TIED_KEY = "lm_head.weight"
EMBED_KEY = "model.embed_tokens.weight"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


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


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]  # a reference resume checkpoint
    return clean_state_dict(sd)


def read_config(path: str | Path) -> ModelConfig | None:
    """Config from safetensors metadata, else from ``config.json`` next to the file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "minimind_config" in meta:
            return ModelConfig.from_dict(json.loads(meta["minimind_config"]))
    for cand in (path.with_suffix(".json"), path.parent / "config.json"):
        if cand.exists():
            return ModelConfig.from_dict(json.loads(cand.read_text()))
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
        raise ValueError(f"weights do not fit the model config: missing {missing[:8]}"
                         f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{'...' if len(unexpected) > 8 else ''}")
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
    """A reference-style ``.pth``: fp16 state dict that includes both tied keys."""
    sd = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(sd, tmp)
    return Path(path)


def infer_model_config(sd: dict[str, Any], preset_name: str = "minimind-3",
                       overrides: dict[str, Any] | None = None) -> Any:
    """Model config for a bare state dict: the shape is read from the tensors themselves
    (head_dim from q_norm, heads from q/k_proj, experts from the keys, tying from lm_head); the
    preset supplies what
    tensors cannot tell (rope theta, positions, experts per token); explicit flags win."""
    from minimind.config import PRESETS

    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose one of {sorted(PRESETS)}")
    emb = sd.get("model.embed_tokens.weight")
    if emb is None:
        raise ValueError("weights have no model.embed_tokens.weight: not a MiniMind checkpoint")
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


def load_model(path: str | Path, config: ModelConfig | None = None,
               device: torch.device | str = "cpu", preset: str = "minimind-3") -> MiniMindForCausalLM:
    """Build a model from a weights file: config given, else from the file's metadata or a
    ``config.json`` beside it, else read off the tensor shapes (reference ``.pth`` files)."""
    sd = read_state_dict(path)
    config = config or read_config(path) or infer_model_config(sd, preset)
    model = MiniMindForCausalLM(config)
    load_weights(model, sd)
    return model.to(device)
