"""GGUF export: every tensor and every llama.cpp metadata key read back with gguf.GGUFReader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from minimind.config import ModelConfig
from minimind.export.gguf import export_gguf, gguf_pre_tokenizer, gguf_tensors
from minimind.model.modeling import MiniMindForCausalLM
from minimind.model.weights import save_weights
from minimind.tokenizer import train_tokenizer

TEXTS = ["the cat sat on the mat", "hello world 123", "Qwen3 runs in llama.cpp 2025!",
         "一只猫坐在垫子上", "def f(x):\n    return x * 2\n"] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(TEXTS, tmp_path_factory.mktemp("tok"), vocab_size=300, show_progress=False)


def _model(tok, moe: bool, **kw) -> MiniMindForCausalLM:
    torch.manual_seed(0)
    kw = {"max_position_embeddings": 128, **kw}
    cfg = ModelConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=tok.vocab_size, use_moe=moe, num_experts=4, num_experts_per_tok=2, **kw)
    m = MiniMindForCausalLM(cfg)
    with torch.no_grad():  # norms away from 1.0 so that a mixed-up norm tensor shows
        for n, p in m.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


def _field(reader, key):
    f = reader.get_field(key)
    assert f is not None, f"missing metadata key {key}"
    return f.contents()


def _expected_names(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """llama.cpp tensor names -> GGUF shapes (reversed torch dims), written out by hand."""
    H, hd, V = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    inter, E = cfg.intermediate_size, cfg.num_experts
    out = {"token_embd.weight": (H, V), "output_norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = (H, V)
    for i in range(cfg.num_hidden_layers):
        b = f"blk.{i}."
        out.update({b + "attn_norm.weight": (H,), b + "attn_q.weight": (H, q), b + "attn_k.weight": (H, kv),
                    b + "attn_v.weight": (H, kv), b + "attn_output.weight": (q, H),
                    b + "attn_q_norm.weight": (hd,), b + "attn_k_norm.weight": (hd,),
                    b + "ffn_norm.weight": (H,)})
        if cfg.use_moe:
            mi = cfg.moe_intermediate_size
            out.update({b + "ffn_gate_inp.weight": (H, E), b + "ffn_gate_exps.weight": (H, mi, E),
                        b + "ffn_up_exps.weight": (H, mi, E), b + "ffn_down_exps.weight": (mi, H, E)})
        else:
            out.update({b + "ffn_gate.weight": (H, inter), b + "ffn_up.weight": (H, inter),
                        b + "ffn_down.weight": (inter, H)})
    return out


def _our_tensor(model: MiniMindForCausalLM, name: str) -> torch.Tensor:
    """Independent mapping of a llama.cpp name back to our parameters."""
    sd = model.state_dict()
    parts = name.split(".")
    if name == "token_embd.weight":
        return sd["model.embed_tokens.weight"]
    if name == "output.weight":
        return sd["lm_head.weight"]
    if name == "output_norm.weight":
        return sd["model.norm.weight"]
    i, kind = int(parts[1]), parts[2]
    p = f"model.layers.{i}."
    simple = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
              "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "ffn_gate_inp": "mlp.gate"}
    if kind in simple:
        return sd[p + simple[kind] + ".weight"]
    proj = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}[kind]
    return torch.stack([sd[f"{p}mlp.experts.{e}.{proj}.weight"] for e in range(model.config.num_experts)])


def _read_values(t) -> np.ndarray:
    """Tensor data as float32 in torch order."""
    qt = gguf.GGMLQuantizationType(int(t.tensor_type))
    if qt == gguf.GGMLQuantizationType.F32:
        data = np.asarray(t.data, dtype=np.float32)
    elif qt == gguf.GGMLQuantizationType.F16:
        data = np.asarray(t.data, dtype=np.float16).astype(np.float32)
    else:
        data = gguf.quants.dequantize(np.asarray(t.data), qt)
    return data.reshape(tuple(int(d) for d in reversed(t.shape)))


def _check_export(model, tok, path, dtype):
    reader = gguf.GGUFReader(path)
    cfg = model.config
    arch = "qwen3moe" if cfg.use_moe else "qwen3"
    # ---- architecture metadata
    assert _field(reader, "general.architecture") == arch
    assert _field(reader, "general.name") == path.stem
    expect = {"context_length": cfg.max_position_embeddings, "embedding_length": cfg.hidden_size,
              "block_count": cfg.num_hidden_layers, "feed_forward_length": cfg.intermediate_size,
              "attention.head_count": cfg.num_attention_heads,
              "attention.head_count_kv": cfg.num_key_value_heads,
              "attention.key_length": cfg.head_dim, "attention.value_length": cfg.head_dim,
              "rope.dimension_count": cfg.head_dim}
    if cfg.use_moe:
        expect.update({"expert_count": cfg.num_experts, "expert_used_count": cfg.num_experts_per_tok,
                       "expert_feed_forward_length": cfg.moe_intermediate_size})
    for k, v in expect.items():
        assert _field(reader, f"{arch}.{k}") == v, k
    assert _field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
    assert _field(reader, f"{arch}.rope.freq_base") == pytest.approx(cfg.rope_theta)
    # ---- tokenizer metadata
    tj = json.loads(tok.backend.to_str())
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "qwen2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert tokens == [tok.id_to_token(i) for i in range(tok.vocab_size)]
    types = _field(reader, "tokenizer.ggml.token_type")
    added = {a["id"]: a["special"] for a in tj["added_tokens"]}
    assert types == [(3 if added[i] else 4) if i in added else 1 for i in range(tok.vocab_size)]
    assert types[tok.token_to_id("<|im_end|>")] == 3 and types[tok.token_to_id("<think>")] == 4
    merges = _field(reader, "tokenizer.ggml.merges")
    ref = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    assert len(merges) == len(ref) > 0 and merges[:20] == ref[:20] and merges == ref
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.token_to_id("<|im_end|>")
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tok.bos_id
    assert _field(reader, "tokenizer.ggml.padding_token_id") == tok.pad_id
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    assert _field(reader, "tokenizer.chat_template") == tok.chat_template
    # ---- tensors
    names = _expected_names(cfg)
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(names)
    for name, t in got.items():
        assert tuple(int(d) for d in t.shape) == names[name], name
        ours = _our_tensor(model, name).detach().float()
        qt = gguf.GGMLQuantizationType(int(t.tensor_type))
        values = torch.from_numpy(np.array(_read_values(t), dtype=np.float32))
        if ours.ndim == 1 or name.endswith("ffn_gate_inp.weight") or dtype == "f32":
            assert qt == gguf.GGMLQuantizationType.F32, name
            assert torch.equal(values, ours), name
        elif dtype == "f16":
            assert qt == gguf.GGMLQuantizationType.F16, name
            assert torch.equal(values, ours.half().float()), name
        elif dtype == "bf16":
            assert qt == gguf.GGMLQuantizationType.BF16, name
            assert torch.equal(values, ours.bfloat16().float()), name
        else:
            assert qt == gguf.GGMLQuantizationType.Q8_0, name
            # Q8_0: per 32-block scale d = max|x|/127 stored as f16 -> error <= d/2 + 127 d 2^-11
            blocks = ours.reshape(-1, 32)
            tol = (blocks.abs().amax(1, keepdim=True) / 127 * 0.6 + 1e-7).expand_as(blocks)
            assert ((values.reshape(-1, 32) - blocks).abs() <= tol).all(), name
    return reader


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_export_roundtrip(tok, tmp_path, moe, dtype):
    model = _model(tok, moe)
    out = export_gguf(model, tmp_path / "mini.gguf", tok, dtype=dtype)
    assert out == tmp_path / "mini.gguf"
    reader = _check_export(model, tok, out, dtype)
    ft = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}[dtype]
    assert _field(reader, "general.file_type") == ft


def test_export_q8_0_and_from_file(tok, tmp_path):
    model = _model(tok, True)
    weights = tmp_path / "m.safetensors"
    save_weights(model, weights)
    tok_dir = tmp_path / "tok"
    tok.save(tok_dir)
    out = export_gguf(weights, tmp_path / "q.gguf", tok_dir, dtype="q8_0")
    _check_export(model, tok, out, "q8_0")


def test_untied_output_and_yarn(tok, tmp_path):
    model = _model(tok, False, tie_word_embeddings=False, max_position_embeddings=4096,
                   rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                                 "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.0})
    sd = model.state_dict()
    assert not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    out = export_gguf(model, tmp_path / "y.gguf", tok, dtype="f32")
    reader = _check_export(model, tok, out, "f32")
    assert _field(reader, "qwen3.rope.scaling.type") == "yarn"
    assert _field(reader, "qwen3.rope.scaling.factor") == pytest.approx(4.0)
    assert _field(reader, "qwen3.rope.scaling.original_context_length") == 1024
    # no YaRN keys when the tables do not apply it
    plain = gguf.GGUFReader(export_gguf(_model(tok, False), tmp_path / "p.gguf", tok, dtype="f32"))
    assert plain.get_field("qwen3.rope.scaling.type") is None


def test_modelfile(tok, tmp_path):
    out = export_gguf(_model(tok, False), tmp_path / "chat.gguf", tok)
    text = (tmp_path / "Modelfile").read_text()
    assert text.startswith("FROM ./chat.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert "<|im_start|>system\n{{ .System }}<|im_end|>\n" in template
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n" in template
    assert template.endswith("<|im_start|>assistant\n")
    assert out.is_file() and not list(tmp_path.glob("*.tmp*"))


def test_pre_tokenizer_names_and_errors(tok, tmp_path):
    assert gguf_pre_tokenizer(json.loads(tok.backend.to_str())) == "qwen2"
    reference = {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                   "use_regex": True}}
    assert gguf_pre_tokenizer(reference) == "gpt-2"
    with pytest.raises(ValueError, match="no llama.cpp equivalent"):
        gguf_pre_tokenizer({"pre_tokenizer": {"type": "Whitespace"}})
    model = _model(tok, False)
    with pytest.raises(ValueError, match="dtype"):
        export_gguf(model, tmp_path / "a.gguf", tok, dtype="q4_k")
    with pytest.raises(ValueError, match=r"\.gguf"):
        export_gguf(model, tmp_path / "a.bin", tok)
    small = MiniMindForCausalLM(ModelConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                            num_key_value_heads=2, vocab_size=100))
    with pytest.raises(ValueError, match="wrong tokenizer"):
        export_gguf(small, tmp_path / "b.gguf", tok)
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "b.gguf").exists()


def test_gguf_tensors_covers_every_parameter(tok):
    model = _model(tok, True)
    names = set(gguf_tensors(model))
    assert names == set(_expected_names(model.config))


def test_gpt2_pre_tokenizer_and_padded_vocab(tok, tmp_path):
    """A reference-style tokenizer (plain ByteLevel) exports as "gpt-2"; embedding rows beyond the
    tokenizer get [PAD<i>] tokens of type UNUSED, as llama.cpp's converter writes them."""
    from minimind.tokenizer import MiniMindTokenizer
    data = json.loads(tok.backend.to_str())
    data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                             "use_regex": True}
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    ref = MiniMindTokenizer.from_dir(tmp_path / "ref")
    n = tok.vocab_size
    model = MiniMindForCausalLM(ModelConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                            num_key_value_heads=2, vocab_size=n + 4))
    reader = gguf.GGUFReader(export_gguf(model, tmp_path / "r.gguf", ref, dtype="f32"))
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert tokens[:n] == [tok.id_to_token(i) for i in range(n)]
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 4)]
    assert _field(reader, "tokenizer.ggml.token_type")[n:] == [int(gguf.TokenType.UNUSED)] * 4
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert tuple(int(d) for d in emb.shape) == (64, n + 4)


def test_cli_export_gguf(tok, tmp_path):
    """`minimind export gguf` on a stage name writes the same file the function does, plus the
    Modelfile; a missing tokenizer is a one-line error."""
    from minimind.cli import main
    from minimind.model import save_weights
    model = _model(tok, moe=False)
    save_weights(model, tmp_path / "full_sft_64.safetensors")
    tok.save(tmp_path / "tokenizer")
    out = tmp_path / "gguf" / "m.gguf"
    assert main(["export", "gguf", "--weight", "full_sft", "--save_dir", str(tmp_path), "--hidden_size", "64",
                 "--out", str(out), "--dtype", "f32"]) == 0
    _check_export(model, tok, out, "f32")
    assert (out.parent / "Modelfile").read_text().startswith("FROM ./m.gguf")
    assert main(["export", "gguf", "--weight", str(tmp_path / "full_sft_64.safetensors"), "--out",
                 str(tmp_path / "x.gguf"), "--tokenizer_path", str(tmp_path / "nowhere")]) == 2
    # a second export into the same folder keeps the first Modelfile and names its own after the gguf
    first = (out.parent / "Modelfile").read_text()
    assert main(["export", "gguf", "--weight", "full_sft", "--save_dir", str(tmp_path), "--hidden_size", "64",
                 "--out", str(out.parent / "q.gguf"), "--dtype", "q8_0"]) == 0
    assert (out.parent / "Modelfile").read_text() == first
    assert (out.parent / "q.Modelfile").read_text().startswith("FROM ./q.gguf")
    assert main(["export", "gguf", "--weight", "full_sft", "--save_dir", str(tmp_path), "--hidden_size", "64",
                 "--out", str(out), "--dtype", "f32"]) == 0  # re-export of the first: same Modelfile
    assert (out.parent / "Modelfile").read_text() == first and not (out.parent / "m.Modelfile").exists()
