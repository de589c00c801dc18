"""HF transformers export / import: the exported folder loads with ``AutoModelForCausalLM`` /
``AutoTokenizer`` (no remote code) and reproduces our logits, ids and chat text; import restores
the weights and config."""

from __future__ import annotations

import json

import pytest
import torch

from minimind.config import ModelConfig
from minimind.export import config_from_hf, export_hf, hf_config, import_hf
from minimind.model import MiniMindForCausalLM, export_reference_pth, load_model, read_state_dict
from minimind.tokenizer import MiniMindTokenizer, train_tokenizer
from tests.test_model_numerics import random_model

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer. 12345 67890",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "The quick brown fox jumps over the lazy dog 42 times;\n\tthen it rests.",
    "混合 mixed 文本 text 3.14159 与 numbers and    spaces",
] * 4
MIXED = "Hi 你好 world123 \n\t  二〇二四 year 2024!  trailing  "
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32.0,
        "beta_slow": 1.0, "attention_factor": 1.0}


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> MiniMindTokenizer:
    return train_tokenizer(TEXTS, tmp_path_factory.mktemp("tok"), vocab_size=300, show_progress=False)


def _cfg(vocab: int, **over) -> ModelConfig:
    base = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 96, "vocab_size": vocab, "max_position_embeddings": 128, "rope_theta": 1e4}
    base.update(over)
    return ModelConfig(**base)


def _moe_cfg(vocab: int, **over) -> ModelConfig:
    return _cfg(vocab, use_moe=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, **over)


def _cfg_without_yarn(cfg: ModelConfig) -> ModelConfig:
    return ModelConfig.from_dict({**cfg.to_dict(), "rope_scaling": None, "inference_rope_scaling": False})


def _random_model(cfg: ModelConfig, seed: int = 0) -> MiniMindForCausalLM:
    return random_model(cfg, seed)  # non-trivial weights: norms away from 1, routers far from uniform


def _max_logit_diff(ours: MiniMindForCausalLM, hf, ids: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        a = ours(ids).logits.float()
        b = hf(input_ids=ids).logits.float()
    assert a.shape == b.shape
    return (a - b).abs().max().item(), a.abs().max().item()


def _assert_logits_close(ours, hf, ids, label: str) -> float:
    diff, scale = _max_logit_diff(ours, hf, ids)
    print(f"{label}: max |logit diff| = {diff:.3e} (max |logit| {scale:.2f})")
    assert diff <= 1e-4 * scale + 1e-5, f"{label}: HF logits differ by {diff:.3e} (max |logit| {scale:.2f})"
    return diff


# ------------------------------------------------------------------------------------------------
# 1. dense and MoE load in transformers and give our logits
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe-top2"])
def test_export_loads_in_transformers_with_equal_logits(tok, tmp_path, moe):
    cfg = (_moe_cfg if moe else _cfg)(tok.vocab_size)
    model = _random_model(cfg)
    out = export_hf(model, tmp_path / "hf", tok)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp folder left behind"
    # tied head stored once, as HF does
    assert "lm_head.weight" not in read_state_dict(out / "model.safetensors")

    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(hf).__name__ == ("Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM")
    hf.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    _assert_logits_close(model, hf, ids, f"{'moe top-2' if moe else 'dense'} fp32")


def test_export_bfloat16_and_untied(tok, tmp_path):
    cfg = _cfg(tok.vocab_size, tie_word_embeddings=False)
    model = _random_model(cfg)
    out = export_hf(model, tmp_path / "hf", tok, dtype="bfloat16")
    sd = read_state_dict(out / "model.safetensors")
    assert "lm_head.weight" in sd and all(v.dtype == torch.bfloat16 for v in sd.values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert hf.dtype == torch.bfloat16
    # the bf16 HF model equals our model with the same bf16-rounded weights, run in fp32
    ref = MiniMindForCausalLM(cfg).eval()
    ref.load_state_dict({k: v.float() for k, v in sd.items()})
    ids = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    _assert_logits_close(ref, hf.float().eval(), ids, "bf16 weights, fp32 compute, untied")


# ------------------------------------------------------------------------------------------------
# 2. YaRN
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe-top2"])
def test_yarn_config_round_trip_and_long_context_logits(tok, tmp_path, moe):
    cfg = (_moe_cfg if moe else _cfg)(tok.vocab_size, rope_scaling=dict(YARN), inference_rope_scaling=True)
    d = hf_config(cfg)
    assert d["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                 "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.0}
    assert config_from_hf(d) == cfg
    model = _random_model(cfg)
    out = export_hf(model, tmp_path / "hf", tok)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    # transformers' YaRN: same ramp (low/high floor/ceil, high clamp not reached for head_dim 16),
    # and attention_factor taken from the config, so long-context logits match ours.
    ids = torch.randint(0, cfg.vocab_size, (1, 120), generator=torch.Generator().manual_seed(3))
    assert ids.shape[1] > YARN["original_max_position_embeddings"]
    _assert_logits_close(model, hf, ids, f"yarn {'moe' if moe else 'dense'} 120 positions")
    # ... and YaRN really is in play there: plain RoPE with the same weights gives other logits
    plain = MiniMindForCausalLM(_cfg_without_yarn(cfg)).eval()
    plain.load_state_dict(model.state_dict())
    assert _max_logit_diff(model, plain, ids)[0] > 1e-2
    # a folder re-saved by transformers (5.x writes rope_parameters) still reads back the same
    hf.save_pretrained(tmp_path / "resaved")
    assert config_from_hf(json.loads((tmp_path / "resaved" / "config.json").read_text())) == cfg


def test_inactive_yarn_is_not_exported(tok):
    # Reference YaRN (original 2048) on a 128-position model: our tables use plain RoPE, so
    # writing rope_scaling would make transformers apply YaRN that we do not.
    cfg = _cfg(tok.vocab_size, inference_rope_scaling=True)
    assert cfg.rope_scaling is not None and hf_config(cfg)["rope_scaling"] is None


def test_config_from_hf_defaults_and_rejections():
    base = hf_config(_cfg(300))
    # HF's default YaRN attention factor (no attention_factor key) is kept as a number
    got = config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 32}})
    assert got.rope_scaling["attention_factor"] == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)
    for bad in ({"attention_bias": True}, {"use_sliding_window": True}, {"hidden_act": "gelu"},
                {"model_type": "llama"}, {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}):
        with pytest.raises(ValueError):
            config_from_hf({**base, **bad})


# ------------------------------------------------------------------------------------------------
# 3. tokenizer and generation config
# ------------------------------------------------------------------------------------------------


def test_tokenizer_and_chat_template_agree_with_transformers(tok, tmp_path):
    out = export_hf(_random_model(_cfg(tok.vocab_size)), tmp_path / "hf", tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok(MIXED, add_special_tokens=False)["input_ids"] == tok.encode(MIXED)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    messages = [
        {"role": "system", "content": "You are a helpful assistant. 你是一个助手。"},
        {"role": "user", "content": "What is 2 + 2? 二加二等于几？"},
        {"role": "assistant", "content": "2 + 2 = 4。"},
        {"role": "user", "content": "  And 3 + 3?\n"},
    ]
    hf_text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ours = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert hf_text.encode("utf-8") == ours.encode("utf-8")
    assert hf_tok(hf_text, add_special_tokens=False)["input_ids"] == tok.encode(ours)

    gen = json.loads((out / "generation_config.json").read_text())
    im_end = tok.token_to_id("<|im_end|>")
    assert gen["eos_token_id"] == im_end and gen["bos_token_id"] == tok.token_to_id("<|im_start|>")
    assert gen["pad_token_id"] == tok.pad_id
    hf_gen = transformers.GenerationConfig.from_pretrained(out)
    assert hf_gen.eos_token_id == im_end
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == im_end


# ------------------------------------------------------------------------------------------------
# 4. import
# ------------------------------------------------------------------------------------------------


def _same_weights(a: MiniMindForCausalLM, b: MiniMindForCausalLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe-top2"])
def test_import_of_export_restores_weights_config_and_tokenizer(tok, tmp_path, moe):
    cfg = (_moe_cfg if moe else _cfg)(tok.vocab_size)
    model = _random_model(cfg)
    out = export_hf(model, tmp_path / "hf", tok)
    dest = import_hf(out, tmp_path / "imported" / "model.safetensors")
    back = load_model(dest)
    assert back.config == cfg
    _same_weights(model, back)
    assert MiniMindTokenizer.from_dir(tmp_path / "imported" / "tokenizer").hash == tok.hash
    # a folder re-saved by transformers itself (5.x: rope_parameters, num_local_experts) too
    transformers.AutoModelForCausalLM.from_pretrained(out).save_pretrained(tmp_path / "resaved")
    back2 = load_model(import_hf(tmp_path / "resaved", tmp_path / "imported2" / "m.safetensors"))
    assert back2.config == cfg
    _same_weights(model, back2)


def test_import_pytorch_model_bin_and_bf16(tok, tmp_path):
    cfg = _cfg(tok.vocab_size)
    model = _random_model(cfg)
    out = export_hf(model, tmp_path / "hf", tok, dtype="bf16")
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((out / "config.json").read_text())
    torch.save(read_state_dict(out / "model.safetensors"), folder / "pytorch_model.bin")
    dest = import_hf(folder, tmp_path / "imp" / "m.safetensors")
    sd = read_state_dict(dest)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())  # source dtype kept
    for k, v in sd.items():
        assert torch.equal(v, model.state_dict()[k].to(torch.bfloat16)), k
    assert not (tmp_path / "imp" / "tokenizer").exists()  # no tokenizer in the source folder


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe-top2"])
def test_import_reference_pth(tok, tmp_path, moe):
    cfg = (_moe_cfg if moe else _cfg)(tok.vocab_size)
    model = _random_model(cfg)
    pth = export_reference_pth(model, tmp_path / "ref" / f"full_sft_64{'_moe' if moe else ''}.pth")
    dest = import_hf(pth, tmp_path / "imp" / "full_sft.safetensors")
    back = load_model(dest)
    assert back.config == cfg  # from the <stem>.json beside the .pth: top-2 stays top-2
    for k, v in back.state_dict().items():
        assert torch.equal(v, model.state_dict()[k].half().float()), k
    assert read_state_dict(dest)["model.embed_tokens.weight"].dtype == torch.float16


# ------------------------------------------------------------------------------------------------
# 5. bad input
# ------------------------------------------------------------------------------------------------


def test_folder_without_config_is_rejected(tmp_path):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not_a_model.*config.json"):
        import_hf(folder, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_bad_arguments(tok, tmp_path):
    model = _random_model(_cfg(tok.vocab_size))
    with pytest.raises(FileNotFoundError):
        import_hf(tmp_path / "missing", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="safetensors"):
        import_hf(tmp_path, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="dtype"):
        export_hf(model, tmp_path / "hf", tok, dtype="int8")
    with pytest.raises(ValueError, match="tokenizer has"):
        export_hf(_random_model(_cfg(64)), tmp_path / "hf", tok)
    # an existing folder with other files is never replaced
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing"):
        export_hf(model, busy, tok)
    assert (busy / "notes.txt").read_text() == "keep me"
    # an earlier export is replaced atomically
    out = export_hf(model, tmp_path / "hf", tok)
    model2 = _random_model(_cfg(tok.vocab_size), seed=5)
    export_hf(model2, out, tok)
    _same_weights(load_model(out / "model.safetensors"), model2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))  == []


# ------------------------------------------------------------------------------------------------
# reference checkpoints (shared fixtures; skipped when absent)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["dense_tiny", "moe_top2_tiny", "dense_tiny_yarn"])
def test_reference_checkpoint_import_and_export(shared_dir, tmp_path, variant):
    folder = shared_dir / "compat" / variant
    if not (folder / "model.pth").is_file():
        pytest.skip(f"{folder}/model.pth absent")
    data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert data["model_type"] == "minimind"
    assert config_from_hf(data) == ModelConfig.from_dict(data)
    dest = import_hf(folder / "model.pth", tmp_path / "imp" / "model.safetensors")
    model = load_model(dest)
    assert model.config == ModelConfig.from_dict(data)
    sd = read_state_dict(folder / "model.pth")
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k].float()), k
    out = export_hf(model, tmp_path / "hf")  # no tokenizer: ids from the model config
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(4))
    _assert_logits_close(model.eval(), hf, ids, f"reference {variant}")


def test_cli_export_then_import_round_trip(tok, tmp_path):
    """`minimind export hf` -> transformers gives our logits; `minimind import` gives our weights back."""
    from minimind.cli import main
    from minimind.model import save_weights
    model = _random_model(_cfg(tok.vocab_size))
    weight = tmp_path / "full_sft_64.safetensors"
    save_weights(model, weight)
    tok.save(tmp_path / "tokenizer")
    assert main(["export", "hf", "--weight", "full_sft", "--save_dir", str(tmp_path), "--hidden_size", "64",
                 "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    _assert_logits_close(model, hf, torch.randint(0, tok.vocab_size, (2, 20)), "cli export")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back" / "m.safetensors")]) == 0
    _same_weights(model, load_model(tmp_path / "back" / "m.safetensors"))
    assert main(["import", str(tmp_path / "missing"), "--out", str(tmp_path / "x.safetensors")]) == 2


def test_cli_export_finds_the_tokenizer_beside_the_weights_and_writes_0644(tok, tmp_path, monkeypatch):
    """Like chat / serve / eval, `export hf` looks beside the weights (it only looked in
    <save_dir>/tokenizer); every exported file gets the umask's mode (safetensors wrote 0600)."""
    import os
    import stat

    from minimind.cli import main
    from minimind.model import save_weights
    monkeypatch.chdir(tmp_path)  # no out/tokenizer to fall back on
    run = tmp_path / "elsewhere"
    save_weights(_random_model(_cfg(tok.vocab_size)), run / "m.safetensors")
    tok.save(run)  # tokenizer.json beside the weights
    old_umask = os.umask(0o022)
    try:
        assert main(["export", "hf", "--weight", str(run / "m.safetensors"), "--out", str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old_umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "hf").iterdir()}
    assert "tokenizer.json" in modes and modes["model.safetensors"] == 0o644, modes
    assert set(modes.values()) == {0o644}, modes
