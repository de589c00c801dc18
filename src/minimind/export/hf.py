"""Hugging Face transformers layout: ``export_hf`` writes a folder that
``AutoModelForCausalLM.from_pretrained`` loads as ``Qwen3ForCausalLM`` / ``Qwen3MoeForCausalLM``
(no ``trust_remote_code``), and ``import_hf`` turns such a folder (or a reference ``.pth``) back
into one of our safetensors files.

Why this is a plain copy: our parameter names equal HF Qwen3's, the MoE experts included.  The
per-expert names (``mlp.experts.<e>.gate_proj.weight``) are the layout of the published Qwen3-MoE
checkpoints; transformers >= 5 fuses them into ``gate_up_proj`` / ``down_proj`` while loading, and
:func:`read_hf_folder` un-fuses such tensors when a folder was saved that way.

Folder written by :func:`export_hf` (all of it built in a temporary sibling folder that is renamed
into place at the end, so a killed export never leaves a half-written model)::

    config.json               hf_config(): HF Qwen3 keys, rope_scaling only when YaRN is active
    generation_config.json    bos <|im_start|>, eos <|im_end|>, pad <|endoftext|> ids
    model.safetensors         tied lm_head stored once; our config also in the metadata
    tokenizer.json            the project's tokenizer save (ids identical to MiniMindTokenizer)
    tokenizer_config.json     incl. the chat template

RoPE / YaRN: both implementations agree on plain RoPE.  For YaRN, ``attention_factor`` is always
written explicitly (HF would otherwise scale cos/sin by ``0.1 ln(factor) + 1``; MiniMind uses 1.0),
and YaRN is only written when it is active in our tables (``max_position_embeddings >
original_max_position_embeddings``): below that our model uses plain RoPE while HF would apply it.
The one remaining difference is the upper end of the YaRN ramp (ours is clamped to ``head_dim/2 -
1``, HF's to ``head_dim - 1``); it only matters when ``ceil(inv_dim(beta_slow)) > head_dim/2 - 1``,
which the reference settings never reach, and :func:`hf_config` warns when it does.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from minimind.config import ModelConfig
from minimind.fileio import atomic_path
from minimind.model.modeling import MiniMindForCausalLM
from minimind.model.weights import (
    EMBED_KEY,
    TIED_KEY,
    clean_state_dict,
    infer_model_config,
    load_model,
    load_weights,
    read_config,
    read_state_dict,
    save_weights,
)

__all__ = [
    "DTYPES",
    "config_from_hf",
    "export_hf",
    "hf_config",
    "hf_state_dict",
    "import_hf",
    "read_hf_folder",
]

#: ``--dtype`` names accepted by :func:`export_hf` -> torch dtype; the first three are canonical.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "half": torch.float16,
}
_CANONICAL = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
WEIGHTS_FILE = "model.safetensors"
#: Tokenizer files that :func:`import_hf` copies next to the imported weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")
#: Names an existing output folder may hold for :func:`export_hf` to replace it (an earlier export,
#: or a folder written by ``save_pretrained``); anything else makes the export refuse.
_REPLACEABLE = re.compile(
    r"(config\.json|generation_config\.json|model\.safetensors|model\.safetensors\.index\.json|"
    r"model-\d{5}-of-\d{5}\.safetensors|pytorch_model\.bin|tokenizer\.json|tokenizer_config\.json|"
    r"chat_template\.jinja|special_tokens_map\.json|README\.md|\.gitattributes)")

_MODEL_TYPES = ("qwen3", "qwen3_moe", "minimind")


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------


def _yarn_params(cfg: ModelConfig) -> dict[str, Any] | None:
    """HF ``rope_scaling`` for the YaRN our rope tables actually apply, else ``None``."""
    rs = cfg.rope_scaling
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type", "yarn"))
    if kind != "yarn":
        raise ValueError(f"rope_scaling type {kind!r} has no MiniMind implementation (only yarn)")
    # Same defaults as minimind.model.layers.rope_inv_freq.
    orig = int(rs.get("original_max_position_embeddings", 2048))
    out = {"rope_type": "yarn", "factor": float(rs.get("factor", 16.0)),
           "original_max_position_embeddings": orig,
           "beta_fast": float(rs.get("beta_fast", 32.0)), "beta_slow": float(rs.get("beta_slow", 1.0)),
           "attention_factor": float(rs.get("attention_factor", 1.0))}
    if cfg.max_position_embeddings <= orig:
        return None  # our tables only apply YaRN beyond the original context; HF would always
    d = int(cfg.head_dim)
    high = math.ceil(d * math.log(orig / (out["beta_slow"] * 2 * math.pi)) / (2 * math.log(cfg.rope_theta)))
    if high > d // 2 - 1:
        warnings.warn(f"YaRN ramp end {high} exceeds head_dim/2 - 1 = {d // 2 - 1}: MiniMind clamps it "
                      f"there, transformers clamps at head_dim - 1, so long-context logits of the HF "
                      f"export will differ slightly from ours", stacklevel=3)
    return out


def hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """``config.json`` content for ``Qwen3ForCausalLM`` (dense) / ``Qwen3MoeForCausalLM`` (MoE).

    Written in the layout of the published Qwen3 checkpoints (``rope_theta`` + ``rope_scaling``),
    which transformers 4.x reads directly and 5.x converts into ``rope_parameters`` on load.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    moe = bool(cfg.use_moe)
    d: dict[str, Any] = {
        "architectures": ["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"],
        "model_type": "qwen3_moe" if moe else "qwen3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": float(cfg.rope_theta),
        "rope_scaling": _yarn_params(cfg),
        "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": _CANONICAL[DTYPES[dtype]],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_hidden_layers,
        "initializer_range": cfg.initializer_range,
        "use_cache": True,
    }
    if moe:
        d.update({
            "num_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.num_experts_per_tok,
            "moe_intermediate_size": cfg.moe_intermediate_size,
            "norm_topk_prob": bool(cfg.norm_topk_prob),
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "router_aux_loss_coef": cfg.router_aux_loss_coef,
            "output_router_logits": False,
        })
    return d


def _scaling_from_hf(p: dict[str, Any], max_positions: int, minimind: bool) -> dict[str, Any] | None:
    """Our ``rope_scaling`` dict from an HF ``rope_scaling`` / ``rope_parameters`` dict."""
    kind = p.get("rope_type") or p.get("type") or "default"
    if kind == "default":
        return None
    if kind != "yarn":
        raise ValueError(f"unsupported RoPE scaling {kind!r}: MiniMind implements only YaRN")
    if minimind:  # a reference config: its own keys and defaults, passed through as they are
        return {k: v for k, v in p.items() if k not in ("rope_theta", "rope_type")} | {"type": "yarn"}
    factor = float(p.get("factor") or 1.0)
    orig = p.get("original_max_position_embeddings")
    if orig is None:  # HF's fallback for this key
        orig = max_positions
    attention_factor = p.get("attention_factor")
    if attention_factor is None:  # HF's default: 0.1 ln(factor) + 1, optionally mscale-adjusted
        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    return {"type": "yarn", "factor": factor, "original_max_position_embeddings": int(orig),
            "beta_fast": float(p.get("beta_fast") or 32.0), "beta_slow": float(p.get("beta_slow") or 1.0),
            "attention_factor": float(attention_factor)}


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    """:class:`ModelConfig` of an HF Qwen3 / Qwen3-MoE (or reference MiniMind) ``config.json``.

    The inverse of :func:`hf_config`; reads both ``rope_theta`` + ``rope_scaling`` (transformers
    4.x, published checkpoints) and ``rope_parameters`` (transformers 5.x ``save_pretrained``).
    Architectures MiniMind cannot represent (biases, sliding windows, dense layers inside a MoE
    stack, another activation or RoPE scaling) are rejected with a ``ValueError``.
    """
    if not isinstance(d, dict):
        raise ValueError(  # noqa: TRY004 - a bad config file, reported like the others
            f"not a model config: expected a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type")
    if model_type is not None and model_type not in _MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}: expected one of {', '.join(_MODEL_TYPES)}")
    problems = []
    if d.get("attention_bias"):
        problems.append("attention_bias=true (MiniMind projections have no bias)")
    if d.get("use_sliding_window"):
        problems.append("use_sliding_window=true")
    if d.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={d['hidden_act']!r} (MiniMind uses silu)")
    if model_type == "qwen3_moe":
        if d.get("decoder_sparse_step", 1) != 1 or d.get("mlp_only_layers"):
            problems.append("dense layers inside the MoE stack (decoder_sparse_step / mlp_only_layers)")
        if d.get("shared_expert_intermediate_size"):
            problems.append("shared experts")
    if problems:
        raise ValueError("config cannot be represented by MiniMind: " + "; ".join(problems))

    kw = {k: v for k, v in d.items() if k not in ("rope_parameters", "rope_scaling")}
    if "num_experts" not in kw and "num_local_experts" in kw:  # transformers 5 save_pretrained
        kw["num_experts"] = kw["num_local_experts"]
    minimind = model_type == "minimind"
    max_positions = int(d.get("max_position_embeddings") or ModelConfig.max_position_embeddings)
    scaling = None
    for key in ("rope_scaling", "rope_parameters"):  # transformers 5 writes the latter
        p = d.get(key)
        if not isinstance(p, dict):
            continue
        if "rope_theta" in p:
            kw["rope_theta"] = p["rope_theta"]
        s = _scaling_from_hf(p, max_positions, minimind)
        scaling = s if s is not None else scaling
    kw["rope_scaling"] = scaling
    if not minimind or "inference_rope_scaling" not in d:
        kw["inference_rope_scaling"] = scaling is not None
    return ModelConfig.from_dict(kw)


# ------------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------------


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in _CANONICAL:
            raise ValueError(f"unsupported dtype {name}; use float32, bfloat16 or float16")
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _expected_keys(cfg: ModelConfig) -> set[str]:
    with torch.device("meta"):
        ref = MiniMindForCausalLM(cfg)
    return set(ref.state_dict())


def hf_state_dict(model: MiniMindForCausalLM, dtype: str | torch.dtype = "float32") -> dict[str, torch.Tensor]:
    """CPU tensors under HF names (= ours), cast to ``dtype``, tied ``lm_head`` left out."""
    dt = _dtype(dtype)
    cfg = model.config
    sd = clean_state_dict(model.state_dict())
    extra = sorted(set(sd) - _expected_keys(cfg))
    if extra:
        raise ValueError(f"model has parameters a Qwen3 checkpoint cannot hold: {extra[:4]}"
                         f"{'...' if len(extra) > 4 else ''} (merge LoRA adapters first)")
    out = {}
    for k, v in sd.items():
        if cfg.tie_word_embeddings and k == TIED_KEY:
            continue
        v = v.detach().to("cpu")
        out[k] = (v.to(dt) if v.is_floating_point() else v).contiguous()
    return out


def _unfuse_experts(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5 fused experts -> per-expert tensors; rotary buffers dropped."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.endswith("rotary_emb.inv_freq"):
            continue
        if k.endswith(".mlp.experts.gate_up_proj"):  # [E, 2I, H] = cat([gate_e], [up_e]) on dim 1
            p, inter = k[: -len("gate_up_proj")], v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{p}{e}.gate_proj.weight"] = v[e, :inter].contiguous()
                out[f"{p}{e}.up_proj.weight"] = v[e, inter:].contiguous()
        elif k.endswith(".mlp.experts.down_proj"):  # [E, H, I]
            p = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{p}{e}.down_proj.weight"] = v[e].contiguous()
        else:
            out[k] = v
    return out


def _weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"not a weights index: {index} ({e})") from None
            return [folder / name for name in sorted(set(weight_map.values()))]
    for name in (WEIGHTS_FILE, "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    raise ValueError(f"no weights in {folder}: expected {WEIGHTS_FILE}, pytorch_model.bin or a "
                     f"sharded index")


def read_hf_folder(folder: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and state dict (our names) of an HF Qwen3 / Qwen3-MoE / MiniMind model folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise ValueError(f"{folder} has no {CONFIG_FILE}: not a Hugging Face model folder")
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not a config file: {cfg_path} ({e})") from None
    cfg = config_from_hf(data)
    sd: dict[str, torch.Tensor] = {}
    for f in _weight_files(folder):
        sd.update(read_state_dict(f))  # .bin goes through torch.load(weights_only=True)
    return cfg, _unfuse_experts(clean_state_dict(sd))


# ------------------------------------------------------------------------------------------------
# export / import
# ------------------------------------------------------------------------------------------------


def _load_tokenizer(tok: Any):
    from minimind.tokenizer import MiniMindTokenizer
    if tok is None or isinstance(tok, MiniMindTokenizer):
        return tok
    return MiniMindTokenizer.from_dir(tok)


def _check_replaceable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"export target {out} exists and is not a folder")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not _REPLACEABLE.fullmatch(p.name))
        if foreign:
            raise ValueError(f"refusing to replace {out}: it holds files that are not part of an HF "
                             f"export ({', '.join(foreign[:5])}{'...' if len(foreign) > 5 else ''}); "
                             f"choose an empty or new folder")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export_hf(model_or_path: MiniMindForCausalLM | str | Path, out_dir: str | Path,
              tokenizer_dir_or_tokenizer: Any = None, dtype: str = "float32") -> Path:
    """Write an HF transformers folder (see the module docstring) and return its path.

    ``model_or_path``: a model, or any weights file :func:`minimind.model.load_model` reads.
    ``tokenizer_dir_or_tokenizer``: a :class:`~minimind.tokenizer.MiniMindTokenizer` or its folder;
    its bos / eos (``<|im_end|>``) / pad ids go into config.json and generation_config.json.
    ``None`` writes no tokenizer (the ids then come from the model config).
    ``dtype``: float32 | bfloat16 | float16 (also fp32 / bf16 / fp16).
    An existing ``out_dir`` is replaced only if it holds nothing but export files.
    """
    dt = _dtype(dtype)
    dtype_name = _CANONICAL[dt]
    model = model_or_path if isinstance(model_or_path, MiniMindForCausalLM) else load_model(model_or_path)
    cfg = model.config
    tok = _load_tokenizer(tokenizer_dir_or_tokenizer)
    out = Path(out_dir)
    _check_replaceable(out)

    config = hf_config(cfg, dtype_name)
    ids = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
           "pad_token_id": cfg.pad_token_id}
    if tok is not None:
        if tok.vocab_size > cfg.vocab_size:
            raise ValueError(f"tokenizer has {tok.vocab_size} ids but the model only "
                             f"{cfg.vocab_size} embeddings: wrong tokenizer for this model")
        eos = tok.token_to_id("<|im_end|>")
        ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id if eos is None else eos,
               "pad_token_id": tok.pad_id}
    config.update(ids)
    sd = hf_state_dict(model, dt)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    old: Path | None = None
    try:
        with atomic_path(tmp / WEIGHTS_FILE) as t:  # the umask's mode: save_file alone makes it 0600
            save_file(sd, str(t), metadata={"format": "pt", "minimind_config": json.dumps(cfg.to_dict())})
        _write_json(tmp / CONFIG_FILE, config)
        _write_json(tmp / GENERATION_CONFIG_FILE, {**ids, "_from_model_config": False})
        if tok is not None:
            tok.save(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out.exists():
            old = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.old"
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.rename(old, out)  # put the previous export back
            old = None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


def _main_dtype(sd: dict[str, torch.Tensor]) -> torch.dtype | None:
    counts = Counter(v.dtype for v in sd.values() if v.is_floating_point())
    return counts.most_common(1)[0][0] if counts else None


def _copy_tokenizer(src_dir: Path, dest: Path) -> Path | None:
    """Copy the tokenizer files of ``src_dir`` into ``dest`` (never over a different tokenizer)."""
    if not (src_dir / "tokenizer.json").is_file() or src_dir.resolve() == dest.resolve():
        return None
    existing = dest / "tokenizer.json"
    if existing.is_file() and existing.read_bytes() != (src_dir / "tokenizer.json").read_bytes():
        warnings.warn(f"{dest} already holds a different tokenizer: not overwritten; the tokenizer "
                      f"of the imported model stays in {src_dir}", stacklevel=3)
        return None
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            with atomic_path(dest / name) as t:
                shutil.copyfile(src_dir / name, t)
    return dest


def import_hf(src: str | Path, out_path: str | Path, dtype: str | None = None) -> Path:
    """Our safetensors file (config in the metadata) from an HF model folder or a weights file.

    ``src``: a folder with ``config.json`` and ``model.safetensors`` / ``pytorch_model.bin`` (or
    their sharded indexes) of Qwen3, Qwen3-MoE or reference MiniMind; or a reference ``.pth`` /
    ``.safetensors`` file (config from its ``<stem>.json`` / ``config.json``, else read off the
    tensor shapes with an :class:`~minimind.model.weights.AssumedConfigWarning`).
    Tensors keep the source dtype unless ``dtype`` is given.  Tokenizer files found in the folder
    (or beside the file) are copied into ``<out_path's folder>/tokenizer``.
    """
    src, out = Path(src), Path(out_path)
    if out.suffix != ".safetensors":
        raise ValueError(f"import output must be a .safetensors file, got {out}")
    if src.is_dir():
        cfg, sd = read_hf_folder(src)
        tok_dir = src
    elif src.is_file():
        sd = read_state_dict(src)
        cfg = read_config(src)
        if cfg is None:
            from minimind.model.weights import _warn_assumed_config
            cfg = infer_model_config(sd)
            _warn_assumed_config(src, cfg, "minimind-3", None)
        tok_dir = src.parent
    else:
        raise FileNotFoundError(f"nothing to import at {src}")
    if EMBED_KEY not in sd:
        raise ValueError(f"{src}: weights have no {EMBED_KEY}: not a Qwen3 / MiniMind checkpoint")
    model = MiniMindForCausalLM(cfg)
    load_weights(model, sd)  # strict: missing / unexpected / misshapen tensors fail here
    save_dtype = _dtype(dtype) if dtype is not None else _main_dtype(sd)
    del sd
    save_weights(model, out, dtype=save_dtype)
    _copy_tokenizer(tok_dir, out.parent / "tokenizer")
    return out
