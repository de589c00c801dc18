"""Muon + AdamW optimizer: the orthogonalisation, the AdamW half against torch's, the parameter split,
that it trains, and that its state round-trips for an exact resume."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from minimind.config import ModelConfig, TrainConfig
from minimind.model import MiniMindForCausalLM
from minimind.train.core import make_optimizer
from minimind.train.muon import MuonAdamW, newton_schulz


@pytest.mark.parametrize("shape", [(48, 160), (160, 48), (64, 64)])
def test_newton_schulz_approximates_the_polar_factor(shape) -> None:
    g = torch.Generator().manual_seed(0)
    # singular values spread over 1.5 decades (five iterations do not lift values far below that)
    k = min(shape)
    u = torch.linalg.qr(torch.randn(shape[0], k, generator=g)).Q
    v = torch.linalg.qr(torch.randn(shape[1], k, generator=g)).Q
    m = u @ torch.diag(torch.logspace(-1, 0.5, k)) @ v.T
    o = newton_schulz(m)
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.5 and s.max() < 1.3, s  # the quintic's fixed band, not exactly 1
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    polar = u @ vh
    cos = (o * polar).sum() / (o.norm() * polar.norm())
    assert cos > 0.9, cos


def test_adamw_groups_match_torch_adamw() -> None:
    torch.manual_seed(0)
    a = nn.Linear(8, 5)
    b = copy.deepcopy(a)
    ours = MuonAdamW([{"params": [a.weight], "weight_decay": 0.1}, {"params": [a.bias], "weight_decay": 0.0}],
                     lr=3e-3, betas=(0.9, 0.95))
    ref = torch.optim.AdamW([{"params": [b.weight], "weight_decay": 0.1}, {"params": [b.bias], "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95))
    for i in range(4):
        x = torch.randn(16, 8)
        for mod, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            (mod(x) ** 2).mean().backward()
            opt.step()
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a.bias, b.bias, rtol=1e-5, atol=1e-7)


def _tiny_model() -> MiniMindForCausalLM:
    torch.manual_seed(0)
    return MiniMindForCausalLM(ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           num_key_value_heads=1, intermediate_size=64, vocab_size=40))


def test_make_optimizer_splits_matrices_from_the_rest() -> None:
    model = _tiny_model()
    cfg = TrainConfig(optimizer="muon", learning_rate=1e-3, muon_lr=0.02)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]]
    other = [names[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"]]
    assert muon and all(".layers." in n and n.endswith("proj.weight") for n in muon)
    assert "model.embed_tokens.weight" in other and not any("norm" in n for n in muon)
    assert next(g for g in opt.param_groups if g["muon"])["lr_scale"] == pytest.approx(20.0)
    assert isinstance(make_optimizer(model, TrainConfig(), torch.device("cpu")), torch.optim.AdamW)


def _lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1]).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def test_muon_trains_a_small_lm_and_resumes_exactly() -> None:
    model = _tiny_model()
    opt = make_optimizer(model, TrainConfig(optimizer="muon", learning_rate=3e-3, muon_lr=0.02, weight_decay=0.0),
                         torch.device("cpu"))
    for g in opt.param_groups:
        g["lr"] = 3e-3 * g.get("lr_scale", 1.0)
    data = torch.arange(8 * 17).reshape(8, 17) % 13 + 1  # a periodic sequence: learnable
    losses = []
    for step in range(60):
        if step == 30:  # checkpoint: a copy resumed from the state dicts must continue identically
            twin = _tiny_model()
            twin.load_state_dict(model.state_dict())
            twin_opt = make_optimizer(twin, TrainConfig(optimizer="muon", learning_rate=3e-3, weight_decay=0.0),
                                      torch.device("cpu"))
            twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if read from disk
        opt.zero_grad()
        loss = _lm_loss(model, data)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step >= 30:
            twin_opt.zero_grad()
            _lm_loss(twin, data).backward()
            twin_opt.step()
    assert losses[-1] < 0.2 * losses[0], losses[::10]
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_config_rejects_unknown_optimizer() -> None:
    with pytest.raises(ValueError, match="--optimizer"):
        TrainConfig(optimizer="sgd").validate()
