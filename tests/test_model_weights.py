"""Weight files: safetensors round trip, reference-style .pth export, strict loading, atomic writes."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import minimind.model.weights as weights_mod
from minimind.config import ModelConfig
from minimind.model import (MiniMindForCausalLM, export_reference_pth, load_model, load_weights, read_config,
                            read_state_dict, save_weights)


def _cfg(**over) -> ModelConfig:
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, vocab_size=53, max_position_embeddings=32)
    base.update(over)
    return ModelConfig(**base)


def _model(cfg: ModelConfig, seed: int = 0) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norms are ones after init: make them distinguishable
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _keys(path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("use_moe", [False, True])
def test_safetensors_round_trip_is_bit_exact(tmp_path, use_moe):
    cfg = _cfg(use_moe=use_moe, num_experts=3, num_experts_per_tok=2, moe_intermediate_size=16)
    model = _model(cfg)
    path = save_weights(model, tmp_path / "model.safetensors")
    assert path.is_file()
    assert "lm_head.weight" not in _keys(path)  # tied head stored once, as HF does
    assert "model.embed_tokens.weight" in _keys(path)

    assert read_config(path).to_dict() == cfg.to_dict()  # config travels in the metadata
    loaded = load_model(path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    ids = torch.randint(0, cfg.vocab_size, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded.eval()(ids).logits)


def test_untied_model_stores_its_head(tmp_path):
    model = _model(_cfg(tie_word_embeddings=False))
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    path = save_weights(model, tmp_path / "untied.safetensors")
    assert "lm_head.weight" in _keys(path)
    loaded = load_model(path)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)


def test_save_in_reduced_dtype_and_extra_metadata(tmp_path):
    model = _model(_cfg())
    path = save_weights(model, tmp_path / "bf16.safetensors", dtype=torch.bfloat16,
                        extra_metadata={"stage": "pretrain"})
    sd = read_state_dict(path)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["stage"] == "pretrain"
    loaded = load_model(path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.bfloat16().float()), k


def test_read_config_falls_back_to_sidecar_json(tmp_path):
    cfg = _cfg()
    model = _model(cfg)
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()
                                 if k != "lm_head.weight"}, str(tmp_path / "w.safetensors"))
    assert read_config(tmp_path / "w.safetensors") is None
    cfg.save(tmp_path / "config.json")
    assert read_config(tmp_path / "w.safetensors").to_dict() == cfg.to_dict()


def test_reference_pth_export(tmp_path):
    cfg = _cfg()
    model = _model(cfg)
    path = export_reference_pth(model, tmp_path / "pretrain_32.pth")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= sd.keys()
    assert set(sd) == set(model.state_dict())
    assert all(v.dtype == torch.float16 for v in sd.values())
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    fresh = MiniMindForCausalLM(cfg)
    load_weights(fresh, read_state_dict(path))
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v.half().float()), k
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    # with a sidecar config.json the .pth alone rebuilds the model
    cfg.save(tmp_path / "config.json")
    assert load_model(path).num_parameters() == model.num_parameters()


def test_wrapper_prefixes_are_stripped(tmp_path):
    cfg = _cfg()
    model = _model(cfg)
    wrapped = {"module._orig_mod." + k: v for k, v in model.state_dict().items()}
    torch.save(wrapped, tmp_path / "ddp.pth")
    fresh = MiniMindForCausalLM(cfg)
    load_weights(fresh, read_state_dict(tmp_path / "ddp.pth"))
    assert torch.equal(fresh.model.norm.weight, model.model.norm.weight)


def test_wrong_shape_names_the_key():
    cfg = _cfg()
    sd = dict(_model(cfg).state_dict())
    key = "model.layers.1.self_attn.k_proj.weight"
    sd[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1])
    target = MiniMindForCausalLM(cfg)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_weights(target, sd)
    for k, v in target.state_dict().items():  # rejected before anything was copied
        assert torch.equal(v, before[k]), k


def test_missing_and_unexpected_keys_are_reported():
    cfg = _cfg()
    sd = dict(_model(cfg).state_dict())
    del sd["model.norm.weight"]
    sd["model.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as exc:
        load_weights(MiniMindForCausalLM(cfg), sd)
    assert "model.norm.weight" in str(exc.value) and "model.extra.weight" in str(exc.value)


def test_tied_checkpoint_with_different_head_is_rejected():
    cfg = _cfg()
    sd = dict(_model(cfg).state_dict())
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1.0
    with pytest.raises(ValueError, match="lm_head"):
        load_weights(MiniMindForCausalLM(cfg), sd)


def test_head_only_tied_checkpoint_loads():
    """A tied checkpoint that kept only ``lm_head.weight`` still fills the shared embedding."""
    cfg = _cfg()
    model = _model(cfg)
    sd = dict(model.state_dict())
    del sd["model.embed_tokens.weight"]
    fresh = MiniMindForCausalLM(cfg)
    load_weights(fresh, sd)
    assert torch.equal(fresh.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_atomic_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    first = _model(_cfg(), seed=1)
    save_weights(first, path)
    original = path.read_bytes()

    calls = []

    def broken_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        with open(filename, "wb") as f:  # a partial write, then the crash
            f.write(b"\x00" * 100)
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    monkeypatch.setattr(weights_mod, "save_file", broken_save_file)  # the name weights.py imported
    with pytest.raises(RuntimeError, match="disk full"):
        save_weights(_model(_cfg(), seed=2), path)
    assert calls, "save_weights did not go through safetensors.torch.save_file"
    assert calls[0] != str(path), "wrote straight to the destination"
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    # and the surviving file is still the first model
    assert torch.equal(load_model(path).model.norm.weight, first.model.norm.weight)


def test_atomic_pth_export_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ref.pth"
    export_reference_pth(_model(_cfg(), seed=1), path)
    original = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("killed")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="killed"):
        export_reference_pth(_model(_cfg(), seed=2), path)
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.json", "ref.pth"]  # no partial file


def test_missing_file_and_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "nope.safetensors")
    safetensors.torch.save_file({"x": torch.zeros(1)}, str(tmp_path / "bare.safetensors"))
    # no config in metadata or beside it, and the tensors are not a MiniMind state dict either
    with pytest.raises(ValueError, match="not a MiniMind checkpoint"):
        load_model(tmp_path / "bare.safetensors")


def test_cli_convert_round_trip(tmp_path):
    """safetensors -> reference .pth (fp16, both tied keys) -> safetensors keeps the model."""
    from minimind.cli import main
    from minimind.config import ModelConfig
    from minimind.model import MiniMindForCausalLM, load_model, save_weights
    torch.manual_seed(0)
    model = MiniMindForCausalLM(ModelConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, vocab_size=300,
                                            max_position_embeddings=64))
    src = save_weights(model, tmp_path / "a.safetensors")
    assert main(["convert", "--weight", str(src), "--out", str(tmp_path / "b.pth")]) == 0
    sd = torch.load(tmp_path / "b.pth", weights_only=True)
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(sd)
    assert all(v.dtype == torch.float16 for v in sd.values())
    # a bare .pth carries no config: the shape is read off the tensors
    assert main(["convert", "--weight", str(tmp_path / "b.pth"), "--out", str(tmp_path / "c.safetensors")]) == 0
    back = load_model(tmp_path / "c.safetensors")
    assert back.config.hidden_size == 64 and back.config.num_key_value_heads == 2
    ids = torch.randint(0, 300, (1, 12))
    assert torch.allclose(back(ids).logits, model(ids).logits, atol=2e-2)
