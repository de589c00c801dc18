"""GGUF export for llama.cpp / ollama: ``export_gguf`` writes one ``.gguf`` file (architecture
``qwen3`` for dense models, ``qwen3moe`` for MoE) plus an ollama ``Modelfile`` beside it.

Needs the ``gguf`` package (``pip install gguf==0.19.0``), imported lazily so the rest of MiniMind
works without it.

What goes into the file:

* metadata: the ``<arch>.*`` hyper-parameters llama.cpp reads for Qwen3 (context / embedding /
  feed-forward lengths, heads, ``key_length`` = ``value_length`` = ``head_dim``, RMS epsilon, RoPE
  base, YaRN keys only when our rope tables actually apply YaRN, the MoE expert counts);
* tensors under llama.cpp's names (taken from ``gguf.TENSOR_NAMES``), MoE experts stacked into
  ``[E, out, in]`` tensors (GGUF lists the dims reversed: ``[in, out, E]``); the ``output`` tensor
  is left out when embeddings are tied (llama.cpp then reuses ``token_embd``).  No Q/K permutation:
  Qwen3 uses NeoX-style RoPE in llama.cpp, the same rotate-half layout as ours.  1-D norm weights
  and the MoE router stay f32 whatever ``dtype`` is; with ``q8_0`` a matrix whose rows are not a
  multiple of 32 falls back to f16 (as llama.cpp's converter does);
* the tokenizer as ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE): tokens in id order, token
  types, merges, bos / eos (``<|im_end|>``) / pad ids, ``add_bos_token = false`` and the chat
  template.  ``tokenizer.ggml.pre`` is read off the tokenizer's own pre-tokenizer: the Qwen2 split
  regex of :func:`minimind.tokenizer.train_tokenizer` -> ``"qwen2"``, the plain GPT-2
  ``ByteLevel`` pre-tokenizer of the reference tokenizer -> ``"gpt-2"``; anything else is refused
  rather than exported with a splitting llama.cpp would not reproduce.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minimind.config import ModelConfig
from minimind.fileio import atomic_path, atomic_write_text
from minimind.model.modeling import MiniMindForCausalLM
from minimind.model.weights import TIED_KEY, load_model

__all__ = ["GGUF_DTYPES", "MODELFILE", "export_gguf", "gguf_pre_tokenizer", "gguf_tensors",
           "modelfile_text"]

#: ``dtype`` values accepted by :func:`export_gguf`.
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
#: Name of the ollama recipe written beside the ``.gguf``.
MODELFILE = "Modelfile"

# ollama Go template: system prompt, then the user / assistant turns in ChatML, then the
# assistant prompt.  System messages inside .Messages are already in .System, so they are skipped.
_OLLAMA_TEMPLATE = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}{{- if ne .Role \"system\" }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n{{ end }}{{- end }}<|im_start|>assistant\n"
)


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("GGUF export needs the 'gguf' package: pip install gguf==0.19.0") from e
    return gguf


# ------------------------------------------------------------------------------------------------
# tensors
# ------------------------------------------------------------------------------------------------


def _name(gguf: Any, kind: Any, bid: int | None = None) -> str:
    """llama.cpp's name of a weight tensor: ``blk.3.attn_q.weight``."""
    name = gguf.TENSOR_NAMES[kind]
    return (name.format(bid=bid) if bid is not None else name) + ".weight"


def gguf_tensors(model: MiniMindForCausalLM) -> dict[str, torch.Tensor]:
    """Our weights under llama.cpp's tensor names, as float32 CPU tensors (torch layout, i.e.
    ``[out, in]``; MoE experts stacked to ``[E, out, in]``).  Tied ``lm_head`` left out."""
    gguf = _gguf()
    T = gguf.MODEL_TENSOR
    cfg = model.config
    sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v.detach().to("cpu", torch.float32)
          for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise ValueError(f"model has no {key}: not a Qwen3-shaped MiniMind model")
        used.add(key)
        return sd[key]

    out[_name(gguf, T.TOKEN_EMBD)] = take("model.embed_tokens.weight")
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[_name(gguf, T.ATTN_NORM, i)] = take(p + "input_layernorm.weight")
        out[_name(gguf, T.ATTN_Q, i)] = take(p + "self_attn.q_proj.weight")
        out[_name(gguf, T.ATTN_K, i)] = take(p + "self_attn.k_proj.weight")
        out[_name(gguf, T.ATTN_V, i)] = take(p + "self_attn.v_proj.weight")
        out[_name(gguf, T.ATTN_OUT, i)] = take(p + "self_attn.o_proj.weight")
        out[_name(gguf, T.ATTN_Q_NORM, i)] = take(p + "self_attn.q_norm.weight")
        out[_name(gguf, T.ATTN_K_NORM, i)] = take(p + "self_attn.k_norm.weight")
        out[_name(gguf, T.FFN_NORM, i)] = take(p + "post_attention_layernorm.weight")
        if cfg.use_moe:
            out[_name(gguf, T.FFN_GATE_INP, i)] = take(p + "mlp.gate.weight")
            for proj, kind in (("gate_proj", T.FFN_GATE_EXP), ("up_proj", T.FFN_UP_EXP),
                               ("down_proj", T.FFN_DOWN_EXP)):
                out[_name(gguf, kind, i)] = torch.stack(
                    [take(f"{p}mlp.experts.{e}.{proj}.weight") for e in range(cfg.num_experts)])
        else:
            out[_name(gguf, T.FFN_GATE, i)] = take(p + "mlp.gate_proj.weight")
            out[_name(gguf, T.FFN_UP, i)] = take(p + "mlp.up_proj.weight")
            out[_name(gguf, T.FFN_DOWN, i)] = take(p + "mlp.down_proj.weight")
    out[_name(gguf, T.OUTPUT_NORM)] = take("model.norm.weight")
    if cfg.tie_word_embeddings:
        used.add(TIED_KEY)
    else:
        out[_name(gguf, T.OUTPUT)] = take(TIED_KEY)
    extra = sorted(k for k in set(sd) - used if not k.endswith(("inv_freq", "_cached", "cos", "sin")))
    if extra:
        raise ValueError(f"model has parameters llama.cpp's qwen3 graph cannot hold: {extra[:4]}"
                         f"{'...' if len(extra) > 4 else ''} (merge LoRA adapters first)")
    return out


def _keep_f32(gguf: Any, name: str, t: torch.Tensor) -> bool:
    """Norm weights (1-D) and the MoE router stay f32, as in llama.cpp's converter."""
    router = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_GATE_INP].rsplit(".", 1)[-1]  # ffn_gate_inp
    return t.ndim <= 1 or name.split(".")[-2] == router


def _encode(gguf: Any, name: str, t: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """(data, raw GGML type or None) for ``GGUFWriter.add_tensor``."""
    Q = gguf.GGMLQuantizationType
    data = t.numpy().astype(np.float32, copy=False)
    if dtype == "f32" or _keep_f32(gguf, name, t):
        return data, None
    if dtype == "f16":
        return data.astype(np.float16), None
    if dtype == "bf16":
        return gguf.quants.quantize(data, Q.BF16), Q.BF16
    # q8_0: blocks of 32 along the row; llama.cpp's converter falls back to f16 otherwise.
    if data.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return data.astype(np.float16), None
    return gguf.quants.quantize(data, Q.Q8_0), Q.Q8_0


# ------------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------------


def _load_tokenizer(tok: Any):
    from minimind.tokenizer import MiniMindTokenizer
    if isinstance(tok, MiniMindTokenizer):
        return tok
    if tok is None:
        raise ValueError("GGUF export needs the model's tokenizer (a MiniMindTokenizer or its folder)")
    return MiniMindTokenizer.from_dir(tok)


def gguf_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp ``tokenizer.ggml.pre`` name for a ``tokenizer.json``'s ``pre_tokenizer``."""
    from minimind.tokenizer.train import QWEN2_PATTERN
    pre = tokenizer_json.get("pre_tokenizer") or {}
    kind = pre.get("type")
    if kind == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if kind == "Sequence":
        steps = pre.get("pretokenizers") or []
        if (len(steps) == 2 and steps[0].get("type") == "Split"
                and (steps[0].get("pattern") or {}).get("Regex") == QWEN2_PATTERN
                and steps[0].get("behavior", "Isolated") == "Isolated" and not steps[0].get("invert")
                and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)):
            return "qwen2"
    raise ValueError(f"pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp equivalent "
                     f"(supported: the Qwen2 split regex + ByteLevel, or plain GPT-2 ByteLevel)")


def _vocab(tok: Any, n_vocab: int) -> tuple[dict[str, Any], list[str], list[int], list[str]]:
    """tokenizer.json, tokens and token types in id order (padded to ``n_vocab``), merges."""
    gguf = _gguf()
    data = json.loads(tok.backend.to_str())
    if (data.get("model") or {}).get("type") != "BPE":
        raise ValueError("only byte-level BPE tokenizers can be exported to GGUF")
    by_id = {i: t for t, i in tok.backend.get_vocab(with_added_tokens=True).items()}
    if by_id and max(by_id) >= n_vocab:
        raise ValueError(f"tokenizer has id {max(by_id)} but the model only {n_vocab} embeddings: "
                         f"wrong tokenizer for this model")
    added = {a["id"]: a for a in data.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:  # embedding rows beyond the tokenizer, as llama.cpp's converter pads
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.CONTROL if added[i].get("special")
                             else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.NORMAL))
    merges = []
    for m in data["model"].get("merges", []):
        if isinstance(m, str):
            merges.append(m)
        else:
            a, b = m
            if " " in a or " " in b:
                raise ValueError(f"merge {m!r} holds a space: not representable in GGUF merges")
            merges.append(f"{a} {b}")
    return data, tokens, types, merges


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------


def modelfile_text(gguf_name: str) -> str:
    """ollama ``Modelfile`` for ``./<gguf_name>``: ChatML template and the stop tokens."""
    return (f"FROM ./{gguf_name}\n\n"
            f'TEMPLATE """{_OLLAMA_TEMPLATE}"""\n\n'
            'PARAMETER stop "<|im_end|>"\n'
            'PARAMETER stop "<|im_start|>"\n')


def modelfile_for(gguf_path: str | Path) -> Path:
    """Where the ollama Modelfile of ``gguf_path`` goes: ``Modelfile`` beside it when there is none
    or it already says the same, else ``<stem>.Modelfile`` -- a second export into the same folder
    must not silently repoint the first one's Modelfile."""
    gguf_path = Path(gguf_path)
    plain = gguf_path.parent / MODELFILE
    try:
        if plain.read_text(encoding="utf-8") != modelfile_text(gguf_path.name):
            return gguf_path.parent / f"{gguf_path.stem}.{MODELFILE}"
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError):  # a folder or a binary file of that name: leave it alone
        return gguf_path.parent / f"{gguf_path.stem}.{MODELFILE}"
    return plain


def _add_hparams(w: Any, cfg: ModelConfig) -> None:
    from minimind.export.hf import _yarn_params
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_freq_base(float(cfg.rope_theta))
    if cfg.use_moe:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if not cfg.norm_topk_prob:
            warnings.warn("norm_topk_prob=False: llama.cpp's qwen3moe graph always renormalises the "
                          "top-k expert weights, so its outputs will differ from ours", stacklevel=3)
    yarn = _yarn_params(cfg)
    if yarn is not None:
        w.add_rope_scaling_type(_gguf().RopeScalingType.YARN)
        w.add_rope_scaling_factor(yarn["factor"])
        w.add_rope_scaling_orig_ctx_len(yarn["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(yarn["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(yarn["beta_slow"])


def export_gguf(model_or_path: MiniMindForCausalLM | str | Path, out_path: str | Path,
                tokenizer: Any, dtype: str = "f16", name: str | None = None) -> Path:
    """Write ``out_path`` (a ``.gguf`` file) and an ollama Modelfile beside it (:func:`modelfile_for`).

    ``model_or_path``: a model, or any weights file :func:`minimind.model.load_model` reads.
    ``tokenizer``: a :class:`~minimind.tokenizer.MiniMindTokenizer` or its folder.
    ``dtype``: ``f32`` | ``f16`` | ``bf16`` | ``q8_0`` for the weight matrices (norms stay f32).
    ``name``: ``general.name``; the file stem by default.
    Both files are written atomically (a temporary file renamed into place).
    """
    gguf = _gguf()
    dtype = dtype.lower()
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(GGUF_DTYPES)}")
    out = Path(out_path)
    if out.suffix != ".gguf":
        raise ValueError(f"GGUF output must be a .gguf file, got {out}")
    if out.is_dir():
        raise ValueError(f"export target {out} is a folder")
    model = model_or_path if isinstance(model_or_path, MiniMindForCausalLM) else load_model(model_or_path)
    cfg = model.config
    tok = _load_tokenizer(tokenizer)
    tok_json, tokens, types, merges = _vocab(tok, cfg.vocab_size)
    pre = gguf_pre_tokenizer(tok_json)
    eos = tok.token_to_id("<|im_end|>")
    tensors = gguf_tensors(model)

    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN3MOE if cfg.use_moe else gguf.MODEL_ARCH.QWEN3]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        try:
            w.add_name(name or out.stem)
            w.add_file_type(int(file_type))
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _add_hparams(w, cfg)
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre(pre)
            w.add_token_list(tokens)
            w.add_token_types(types)
            w.add_token_merges(merges)
            w.add_bos_token_id(tok.bos_id)
            w.add_eos_token_id(tok.eos_id if eos is None else eos)
            w.add_pad_token_id(tok.pad_id)
            w.add_add_bos_token(False)
            w.add_add_eos_token(False)
            w.add_chat_template(tok.chat_template)
            for tname, t in tensors.items():
                data, raw = _encode(gguf, tname, t, dtype)
                w.add_tensor(tname, data, raw_dtype=raw)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    atomic_write_text(modelfile_for(out), modelfile_text(out.name))
    return out

