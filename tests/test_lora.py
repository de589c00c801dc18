"""LoRA: reference targets and size, merge equivalence, freezing, adapter files, dropout, errors."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

from minimind.config import ModelConfig
from minimind.model import MiniMindForCausalLM, load_model, save_weights
from minimind.model.lora import (LoRAConfig, LoRALinear, apply_lora, has_lora, infer_lora_config,
                                 load_lora, lora_parameters, lora_state_dict, merge_lora,
                                 merge_lora_files, read_lora, save_lora)


def _cfg(use_moe: bool = False, **over) -> ModelConfig:
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=97, max_position_embeddings=64)
    if use_moe:
        base.update(use_moe=True, num_experts=4, num_experts_per_tok=2)
    base.update(over)
    return ModelConfig(**base)


def _base(cfg: ModelConfig, seed: int = 0) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    return MiniMindForCausalLM(cfg).eval()


def _randomise_b(model: nn.Module, seed: int = 1, std: float = 0.05) -> None:
    """B starts at zero (adapter is a no-op); give it values so the adapter really changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora.B.weight.copy_(torch.randn(m.lora.B.weight.shape, generator=g) * std)


def _ids(cfg: ModelConfig, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol_rel: float = 1e-5,
           what: str = "logits") -> None:
    atol = atol_rel * expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: max abs diff {diff:.3e}\n{m}")


# ---- 1. reference default targets ----------------------------------------------------------------
@pytest.mark.parametrize("use_moe", [False, True])
def test_reference_default_targets_minimind3(use_moe):
    with torch.device("meta"):  # the real 64M / 198M shapes, no memory
        model = MiniMindForCausalLM(ModelConfig(hidden_size=768, num_hidden_layers=8,
                                                num_attention_heads=8, num_key_value_heads=4,
                                                use_moe=use_moe))
    cfg = LoRAConfig()
    assert (cfg.rank, cfg.scale, cfg.dropout, cfg.targets) == (16, 1.0, 0.0, "square")
    names = apply_lora(model, cfg)
    expected = [f"model.layers.{i}.self_attn.{p}" for i in range(8) for p in ("q_proj", "o_proj")]
    assert names == expected
    assert sum(p.numel() for p in lora_parameters(model)) == 393_216
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 393_216
    assert not isinstance(model.lm_head, LoRALinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_all_targets_skip_lm_head_and_router_even_when_square():
    # vocab == hidden and num_experts == hidden make lm_head and the router square: still excluded
    cfg = _cfg(use_moe=True, vocab_size=64, tie_word_embeddings=False, num_experts=64,
               num_experts_per_tok=2, moe_intermediate_size=8)
    for targets in ("square", "all"):
        model = _base(cfg)
        names = apply_lora(model, LoRAConfig(rank=2, targets=targets))
        assert not any(n.endswith("lm_head") or n.endswith("mlp.gate") for n in names), names
    assert any(".experts.3.down_proj" in n for n in names)
    assert len(names) == 2 * (4 + 64 * 3)  # attention q/k/v/o + 3 projections per expert, 2 layers


def test_from_linear_shares_base_parameters():
    lin = nn.Linear(8, 8, bias=True)
    lora = LoRALinear.from_linear(lin, LoRAConfig(rank=2))
    assert lora.weight is lin.weight and lora.bias is lin.bias
    assert set(lora.state_dict()) == {"weight", "bias", "lora.A.weight", "lora.B.weight"}
    assert lora.lora.A.weight.std().item() == pytest.approx(0.02, rel=0.6)
    assert torch.count_nonzero(lora.lora.B.weight) == 0
    x = torch.randn(3, 8)
    torch.testing.assert_close(lora(x), lin(x), rtol=0, atol=0)  # B = 0: exactly the base layer


def test_lora_linear_compiles_without_graph_breaks():
    lora = LoRALinear.from_linear(nn.Linear(16, 16, bias=False), LoRAConfig(rank=4, alpha=8))
    with torch.no_grad():
        lora.lora.B.weight.normal_()
    x = torch.randn(5, 16)
    compiled = torch.compile(lora, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), lora(x), rtol=1e-6, atol=1e-6)


# ---- 2. merge equivalence -------------------------------------------------------------------------
@pytest.mark.parametrize("use_moe,targets,alpha", [(False, "square", 0.0), (True, "square", 0.0),
                                                   (False, "all", 8.0), (True, "all", 0.0),
                                                   (True, "q_proj,v_proj,down_proj", 2.0)])
def test_merged_model_equals_adapter_model(use_moe, targets, alpha):
    cfg = _cfg(use_moe)
    base = _base(cfg)
    base_keys = set(base.state_dict())
    base_logits = _logits(base, _ids(cfg))
    model = _base(cfg)
    apply_lora(model, LoRAConfig(rank=4, alpha=alpha, targets=targets))
    _randomise_b(model)
    ids = _ids(cfg)
    adapted = _logits(model, ids)
    assert (adapted - base_logits).abs().max() > 1e-3 * base_logits.abs().max()  # adapter matters
    merge_lora(model)
    assert not has_lora(model) and not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == base_keys
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _close(_logits(model, ids), adapted, what=f"merged vs adapter ({targets})")


def test_scale_is_alpha_over_rank():
    lin = nn.Linear(6, 6, bias=False)
    x = torch.randn(4, 6)
    outs = {}
    for alpha in (0.0, 2.0, 8.0):
        torch.manual_seed(0)
        lora = LoRALinear.from_linear(lin, LoRAConfig(rank=4, alpha=alpha))
        with torch.no_grad():
            lora.lora.B.weight.fill_(0.1)
        outs[alpha] = lora(x) - lin(x)
    torch.testing.assert_close(outs[2.0], 0.5 * outs[0.0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[8.0], 2.0 * outs[0.0], rtol=1e-5, atol=1e-6)


# ---- 3. freezing ----------------------------------------------------------------------------------
@pytest.mark.parametrize("use_moe", [False, True])
def test_only_lora_parameters_get_gradients(use_moe):
    cfg = _cfg(use_moe)
    model = _base(cfg).train()
    apply_lora(model, LoRAConfig(rank=4, targets="all"))
    _randomise_b(model)
    ids = _ids(cfg)
    out = model(ids)
    loss = nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    (loss + out.aux_loss).backward()
    adapter = {id(p) for p in lora_parameters(model)}
    assert len(adapter) > 0
    for name, p in model.named_parameters():
        if id(p) in adapter:
            assert ".lora." in name and p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert any(p.grad.abs().sum() > 0 for p in lora_parameters(model))


# ---- 4. adapter files -----------------------------------------------------------------------------
def test_lora_state_dict_strips_wrapper_prefixes():
    model = _base(_cfg())
    apply_lora(model, LoRAConfig(rank=2))

    class Wrapper(nn.Module):  # what DDP looks like from the outside
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.module = m

    plain = lora_state_dict(model)
    assert set(plain) == {f"model.layers.{i}.self_attn.{p}.lora.{ab}.weight"
                          for i in range(2) for p in ("q_proj", "o_proj") for ab in "AB"}
    assert set(lora_state_dict(Wrapper(model))) == set(plain)
    assert set(lora_state_dict(torch.compile(Wrapper(model), backend="eager"))) == set(plain)
    assert all(v.device.type == "cpu" and not v.requires_grad for v in plain.values())


@pytest.mark.parametrize("use_moe", [False, True])
def test_safetensors_round_trip(tmp_path, use_moe):
    cfg = _cfg(use_moe)
    lcfg = LoRAConfig(rank=4, alpha=8.0, targets="q_proj,gate_proj,down_proj")
    model = _base(cfg)
    apply_lora(model, lcfg)
    _randomise_b(model)
    ids = _ids(cfg)
    expected = _logits(model, ids)

    path = save_lora(model, tmp_path / "adapter.safetensors", lcfg)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == "pt"
    sd, read_cfg = read_lora(path)
    assert read_cfg == lcfg
    assert sd.keys() == lora_state_dict(model).keys()

    fresh = _base(cfg)
    used = load_lora(fresh, path)
    assert used == lcfg and has_lora(fresh)
    torch.testing.assert_close(_logits(fresh, ids), expected, rtol=0, atol=0)


def test_loading_onto_model_with_lora_keeps_modules_and_checks_scale(tmp_path):
    cfg = _cfg()
    lcfg = LoRAConfig(rank=4, alpha=8.0)
    model = _base(cfg)
    apply_lora(model, lcfg)
    _randomise_b(model)
    path = save_lora(model, tmp_path / "a.safetensors", lcfg)

    other = _base(cfg)
    apply_lora(other, lcfg)  # e.g. resuming a run: adapters exist, weights come from the file
    assert load_lora(other, path) == lcfg
    torch.testing.assert_close(_logits(other, _ids(cfg)), _logits(model, _ids(cfg)), rtol=0, atol=0)

    wrong_scale = _base(cfg)
    apply_lora(wrong_scale, LoRAConfig(rank=4))  # scale 1, the file was trained with scale 2
    with pytest.raises(ValueError, match="scale"):
        load_lora(wrong_scale, path)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_reference_pth_adapter_loads_and_infers_rank(tmp_path, prefix):
    cfg = _cfg()
    h, r = cfg.hidden_size, 8
    g = torch.Generator().manual_seed(3)
    ref = {}
    for i in range(cfg.num_hidden_layers):
        for proj in ("q_proj", "o_proj"):
            key = f"{prefix}model.layers.{i}.self_attn.{proj}.lora"
            ref[f"{key}.A.weight"] = (torch.randn(r, h, generator=g) * 0.02).half()
            ref[f"{key}.B.weight"] = (torch.randn(h, r, generator=g) * 0.05).half()
    path = tmp_path / "lora_medical_64.pth"
    torch.save(ref, path)

    sd, file_cfg = read_lora(path)
    assert file_cfg is None and not any(k.startswith("module.") for k in sd)
    inferred = infer_lora_config(sd)
    assert (inferred.rank, inferred.scale, inferred.targets) == (r, 1.0, "q_proj,o_proj")

    model = _base(cfg)
    used = load_lora(model, path)
    assert used == inferred
    # expected: the reference formula W + B @ A (unscaled) folded by hand into a plain model
    manual = _base(cfg)
    with torch.no_grad():
        for i, layer in enumerate(manual.model.layers):
            for proj in ("q_proj", "o_proj"):
                key = f"{prefix}model.layers.{i}.self_attn.{proj}.lora"
                lin = getattr(layer.self_attn, proj)
                lin.weight += ref[f"{key}.B.weight"].float() @ ref[f"{key}.A.weight"].float()
    ids = _ids(cfg)
    _close(_logits(model, ids), _logits(manual, ids), what="reference .pth adapter")


def test_pth_save_is_reference_style(tmp_path):
    model = _base(_cfg())
    lcfg = LoRAConfig(rank=4)
    apply_lora(model, lcfg)
    path = save_lora(model, tmp_path / "lora.pth", lcfg)
    sd = torch.load(path, weights_only=True)
    assert set(sd) == set(lora_state_dict(model))
    assert all(v.dtype == torch.float16 for v in sd.values())


def test_mismatched_adapters_raise_naming_the_key(tmp_path):
    cfg = _cfg()
    donor = _base(cfg)
    apply_lora(donor, LoRAConfig(rank=4))
    sd = lora_state_dict(donor)

    model = _base(cfg)  # wrong rank for a model that already has rank-8 adapters
    apply_lora(model, LoRAConfig(rank=8))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora\.A\.weight"):
        load_lora(model, sd)

    fresh = _base(cfg)  # wrong rank against an explicit config
    with pytest.raises(ValueError, match=r"lora\.A\.weight"):
        load_lora(fresh, sd, LoRAConfig(rank=8))
    assert not has_lora(fresh)  # checked before the model is touched

    extra = dict(sd)
    extra["model.layers.5.self_attn.q_proj.lora.A.weight"] = torch.zeros(4, cfg.hidden_size)
    extra["model.layers.5.self_attn.q_proj.lora.B.weight"] = torch.zeros(cfg.hidden_size, 4)
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"model\.layers\.5\.self_attn\.q_proj\.lora"):
        load_lora(_base(cfg), tmp_path / "extra.pth")

    partial = {k: v for k, v in sd.items() if ".layers.1." not in k}  # model has more LoRA modules
    target = _base(cfg)
    apply_lora(target, LoRAConfig(rank=4))
    with pytest.raises(ValueError, match=r"model\.layers\.1\."):
        load_lora(target, partial)


# ---- 5. merged files ------------------------------------------------------------------------------
@pytest.mark.parametrize("use_moe", [False, True])
def test_merge_lora_files(tmp_path, use_moe):
    cfg = _cfg(use_moe)
    base = _base(cfg)
    base_path = save_weights(base, tmp_path / "full_sft_64.safetensors")
    lcfg = LoRAConfig(rank=4, alpha=8.0, targets="all")
    model = _base(cfg)
    apply_lora(model, lcfg)
    _randomise_b(model)
    lora_path = save_lora(model, tmp_path / "lora.safetensors", lcfg)
    ids = _ids(cfg)
    expected = _logits(model, ids)

    out = merge_lora_files(base_path, lora_path, tmp_path / "merged.safetensors")
    merged = load_model(out).eval()
    assert set(merged.state_dict()) == set(base.state_dict())
    _close(_logits(merged, ids), expected, what="merged safetensors vs base+adapter")

    out_pth = merge_lora_files(base_path, lora_path, tmp_path / "merged.pth")
    assert not any(".lora." in k for k in torch.load(out_pth, weights_only=True))
    merged16 = load_model(out_pth, config=cfg).eval()  # fp16 weights: looser tolerance
    _close(_logits(merged16, ids), expected, rtol=1e-2, atol_rel=1e-2, what="merged fp16 .pth")


# ---- 6. dropout -----------------------------------------------------------------------------------
def test_dropout_only_in_training_mode():
    cfg = _cfg()
    with_dropout = _base(cfg)
    apply_lora(with_dropout, LoRAConfig(rank=4, dropout=0.5, targets="all"))
    _randomise_b(with_dropout, std=0.2)
    without = _base(cfg)
    apply_lora(without, LoRAConfig(rank=4, targets="all"))
    load_lora(without, lora_state_dict(with_dropout))
    ids = _ids(cfg)

    with_dropout.train()
    torch.manual_seed(0)
    train_out = _logits(with_dropout, ids)
    with_dropout.eval()
    eval_out = _logits(with_dropout, ids)
    assert (train_out - eval_out).abs().max() > 1e-3 * eval_out.abs().max()
    torch.testing.assert_close(eval_out, _logits(without.eval(), ids), rtol=0, atol=0)


# ---- 7. errors ------------------------------------------------------------------------------------
def test_apply_twice_raises():
    model = _base(_cfg())
    apply_lora(model, LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoRAConfig(rank=2))


@pytest.mark.parametrize("targets", ["qproj", "q_proj,nope", "lm_head", "gate"])
def test_targets_matching_nothing_raise(targets):
    model = _base(_cfg(use_moe=True))
    with pytest.raises(ValueError, match="match no"):
        apply_lora(model, LoRAConfig(rank=2, targets=targets))
    assert not has_lora(model) and all(p.requires_grad for p in model.parameters())


def test_square_rule_matching_nothing_raises():
    # head_dim 32 with 4 q and 4 kv heads: q/k/v 64 -> 128, o 128 -> 64, MLP 64 <-> 256
    model = _base(_cfg(head_dim=32, num_key_value_heads=4))
    with pytest.raises(ValueError, match="match no"):
        apply_lora(model, LoRAConfig(rank=2))


@pytest.mark.parametrize("bad", [dict(rank=0), dict(rank=-3), dict(dropout=1.0), dict(dropout=-0.1),
                                 dict(alpha=-1.0), dict(targets=" , ")])
def test_config_validation(bad):
    with pytest.raises(ValueError, match="invalid LoRA config"):
        LoRAConfig(**bad).validate()


def test_config_dict_round_trip():
    cfg = LoRAConfig(rank=8, alpha=16.0, dropout=0.1, targets="q_proj,v_proj")
    assert LoRAConfig.from_dict({**cfg.to_dict(), "future_field": 1}) == cfg
    assert cfg.scale == 2.0 and LoRAConfig(rank=8).scale == 1.0
    assert cfg.target_suffixes() == ["q_proj", "v_proj"]
