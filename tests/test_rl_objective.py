"""The RL objective pieces, each against its formula computed here on a tiny hand-built batch."""

from __future__ import annotations

import math

import pytest
import torch

from minimind.rl.objective import (
    LOSS_TYPES,
    ObjectiveConfig,
    SPOBaseline,
    aggregate,
    batch_normalized_advantages,
    cispo,
    compute_advantages,
    gae,
    group_advantages,
    gspo,
    kl_penalty,
    mask_truncated,
    policy_loss,
    ppo_clip,
    reinforce,
    tis_weight,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _close(a: torch.Tensor, b: torch.Tensor | list, tol: float = 1e-5) -> bool:
    return torch.allclose(a.double(), torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=tol)


# ---- policy terms --------------------------------------------------------------------------------
def test_ppo_clip_symmetric_and_clip_fraction():
    ratios = [1.5, 0.5, 1.1, 0.7, 1.5, 0.9]
    advs = [1.0, 1.0, -2.0, -2.0, -1.0, 0.5]
    old = torch.zeros(1, 6)
    logp = torch.log(torch.tensor([ratios]))
    adv = torch.tensor([advs])
    loss, stats = ppo_clip(logp, old, adv, 0.2, 0.2)
    expected, clipped = [], 0
    for r, a in zip(ratios, advs):
        c = min(max(r, 0.8), 1.2)
        expected.append(-min(r * a, c * a))
        clipped += c * a < r * a
    assert _close(loss, [expected])
    # r=1.5,A=1 (clipped at 1.2); r=0.7,A=-2 (clipped at 0.8): 2 of 6 tokens.
    assert clipped == 2 and stats["clip_frac"] == pytest.approx(2 / 6)


def test_ppo_clip_higher_lets_positive_advantages_grow_further():
    logp = torch.log(torch.tensor([[1.25, 1.25, 0.75]]))
    adv = torch.tensor([[1.0, -1.0, -1.0]])
    loss, _ = ppo_clip(logp, torch.zeros(1, 3), adv, eps_low=0.2, eps_high=0.28)
    # A>0, r=1.25 < 1.28: not clipped under clip-higher (it would be at 1.2); A<0 low side at 0.8.
    assert _close(loss, [[-1.25, 1.25, 0.8]])
    sym, _ = ppo_clip(logp, torch.zeros(1, 3), adv, 0.2, 0.2)
    assert _close(sym[:, 0], [-1.2])


def test_ppo_dual_clip_caps_negative_advantage_loss():
    logp = torch.log(torch.tensor([[5.0, 2.0, 5.0]]))
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    loss, stats = ppo_clip(logp, torch.zeros(1, 3), adv, 0.2, 0.2, delta=3.0)
    # A<0: max(min(rA, clip(r)A), 3A): r=5 -> max(-5, -3) = -3 -> loss 3; r=2 -> -2 -> loss 2.
    # A>0 untouched: min(5, 1.2) = 1.2 -> loss -1.2.
    assert _close(loss, [[3.0, 2.0, -1.2]])
    assert stats["dual_clip_frac"] == pytest.approx(1 / 3)
    # the capped token has no gradient
    lp = logp.clone().requires_grad_(True)
    ppo_clip(lp, torch.zeros(1, 3), adv, 0.2, 0.2, delta=3.0)[0].sum().backward()
    assert lp.grad[0, 0] == 0 and lp.grad[0, 1] != 0


def test_ppo_stats_respect_mask():
    logp = torch.log(torch.tensor([[1.5, 1.5, 1.0]]))
    _, stats = ppo_clip(logp, torch.zeros(1, 3), torch.tensor([1.0]), mask=torch.tensor([[1, 0, 1]]))
    assert stats["clip_frac"] == pytest.approx(0.5)


def test_gspo_sequence_ratio_and_gradient():
    torch.manual_seed(0)
    old = torch.randn(2, 4) * 0.1 - 1.0
    logp = (old + torch.randn(2, 4) * 1e-4).requires_grad_(True)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -0.5])
    loss, _ = gspo(logp, old, adv, mask, eps_low=1.0, eps_high=1.0)  # wide clip: no clipping
    s = []
    for i in range(2):
        n = int(mask[i].sum())
        s.append(math.exp(sum((logp[i, t] - old[i, t]).item() for t in range(n)) / n))
    # every token of sequence i carries the same value -s_i * A_i
    for i in range(2):
        for t in range(int(mask[i].sum())):
            assert loss[i, t].item() == pytest.approx(-s[i] * adv[i].item(), rel=1e-6)
    aggregate(loss, mask, "seq_mean").backward()
    # d/dlogp_t of (1/B) sum_i (1/|y_i|) sum_t -s_i,t A_i = -s_i A_i / (|y_i| B)
    want = torch.zeros(2, 4, dtype=torch.float64)
    for i in range(2):
        n = int(mask[i].sum())
        want[i, :n] = -s[i] * adv[i].item() / (n * 2)
    assert _close(logp.grad, want, 1e-6)


def test_gspo_clips_the_whole_sequence():
    old = torch.zeros(1, 3)
    logp = torch.tensor([[0.3, 0.3, 0.3]], requires_grad=True)  # s = e^0.3 > 1 + 4e-4
    loss, stats = gspo(logp, old, torch.tensor([1.0]), torch.ones(1, 3))
    assert _close(loss, [[-(1 + 4e-4)] * 3])
    assert stats["clip_frac"] == 1.0
    loss.sum().backward()
    assert torch.all(logp.grad == 0)


def test_cispo_weight_is_clipped_and_gradient_flows_through_logp():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[2.0, 1.1, 0.5]])).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    loss, stats = cispo(logp, old, adv, eps_low=0.2, eps_high=0.28)
    w = [1.28, 1.1, 0.8]  # clip(r, 0.8, 1.28)
    assert _close(loss, [[-w[t] * adv[0, t].item() * logp[0, t].item() for t in range(3)]])
    assert stats["clip_frac"] == pytest.approx(2 / 3)
    loss.sum().backward()
    # d/dlogp (-sg[w] A logp) = -w A, also for the clipped tokens (PPO would give 0 there)
    assert _close(logp.grad, [[-1.28, -1.1, 0.8]])


def test_reinforce():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
    loss, _ = reinforce(logp, torch.tensor([2.0, -1.0]))
    assert _close(loss, [[2.0, 4.0], [-0.5, -0.1]])
    loss.sum().backward()
    assert _close(logp.grad, [[-2.0, -2.0], [1.0, 1.0]])


# ---- advantages ----------------------------------------------------------------------------------
def test_group_advantages_z_score_and_dr_grpo():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.0])
    adv = group_advantages(r, 4)
    for g in range(2):
        xs = r[4 * g:4 * g + 4].tolist()
        mu = sum(xs) / 4
        sd = math.sqrt(sum((x - mu) ** 2 for x in xs) / 4)
        assert _close(adv[4 * g:4 * g + 4], [(x - mu) / (sd + 1e-6) for x in xs])
    mean_only = group_advantages(r, 4, scale=False)
    assert _close(mean_only, [0.5, -0.5, -0.5, 0.5, 0.375, 0.375, -0.125, -0.625])
    assert _close(group_advantages(torch.ones(4), 2), [0.0] * 4)  # equal rewards: no signal, no NaN
    with pytest.raises(ValueError):
        group_advantages(torch.ones(5), 2)


def test_batch_normalized_advantages():
    r = torch.tensor([3.0, 1.0, 0.0, 0.0])
    mu, sd = 1.0, math.sqrt((4 + 0 + 1 + 1) / 4)
    assert _close(batch_normalized_advantages(r, 1e-6), [(x - mu) / (sd + 1e-6) for x in r.tolist()])


def _gae_loop(rewards, values, mask, gamma, lam):
    """Plain per-sequence GAE over the masked positions only."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    for i in range(B):
        steps = [t for t in range(T) if mask[i][t]]
        nxt_a, nxt_v = 0.0, 0.0
        for t in reversed(steps):
            delta = rewards[i][t] + gamma * nxt_v - values[i][t]
            nxt_a = delta + gamma * lam * nxt_a
            nxt_v = values[i][t]
            adv[i][t] = nxt_a
    return adv


def test_gae_matches_a_plain_loop_on_uneven_masks():
    torch.manual_seed(1)
    rewards, values = torch.randn(4, 7), torch.randn(4, 7)
    mask = torch.tensor([
        [0, 0, 1, 1, 1, 1, 1],  # prompt prefix, completion to the end
        [0, 1, 1, 1, 0, 0, 0],  # padding after
        [1, 1, 0, 0, 1, 1, 0],  # a hole (tool output) inside the completion
        [0, 0, 0, 0, 0, 0, 0],  # nothing
    ], dtype=torch.float32)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    want = _gae_loop(rewards.tolist(), values.tolist(), mask.tolist(), 0.9, 0.8)
    assert _close(adv, want)
    assert _close(ret, (torch.tensor(want) + values) * mask)
    assert torch.all(adv[mask == 0] == 0)


def test_spo_baseline_uses_pre_update_value_and_updates():
    base = SPOBaseline(discount=0.5, prior_mean=0.5, prior_weight=2.0)
    adv = base.advantages(["a", "a", "b"], torch.tensor([1.0, 1.0, 0.0]))
    assert _close(adv, [0.5, 0.5, -0.5])  # all against the prior, none against its own reward
    # a: alpha = 0.5 * (0.5 * 1 + 1) + 1 = 1.75; beta = 0.5 * (0.5 * 1 + 0) + 0 = 0.25 -> 0.875
    assert base.value("a") == pytest.approx(0.875)
    # b: alpha = 0.5 * 1 + 0 = 0.5, beta = 0.5 * 1 + 1 = 1.5 -> 0.25
    assert base.value("b") == pytest.approx(0.25)
    adv2 = base.advantages(["a"], torch.tensor([0.0]))
    assert _close(adv2, [-0.875])
    restored = SPOBaseline()
    restored.load_state_dict(base.state_dict())
    assert restored.value("a") == base.value("a") and len(restored) == 2
    assert restored.advantages(["b"], torch.tensor([1.0])).item() == pytest.approx(0.75)


# ---- KL ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_estimators_expectations_equal_exact_kl(seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    exact = float((p * (p.log() - q.log())).sum())
    logp, ref = p.log(), q.log()  # every outcome x, weighted by p(x) below
    for kind in ("k1", "k3"):
        est = kl_penalty(logp, ref, kind)
        assert float((p * est).sum()) == pytest.approx(exact, rel=1e-9, abs=1e-12)
    k2 = kl_penalty(logp, ref, "k2")
    assert torch.all(k2 >= 0)
    l_ = ref - logp
    assert _close(k2, 0.5 * l_ ** 2) and torch.all(kl_penalty(logp, ref, "k3") >= 0)
    assert torch.all(kl_penalty(logp, ref, "none") == 0)


# ---- aggregation, masks, TIS ---------------------------------------------------------------------
def test_aggregation_modes_on_uneven_masks():
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0], [5.0, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert aggregate(loss, mask, "token_mean").item() == pytest.approx((1 + 2 + 3 + 10) / 4)
    assert aggregate(loss, mask, "seq_mean").item() == pytest.approx((6 / 3 + 10 / 1) / 2)
    assert aggregate(loss, mask, "constant").item() == pytest.approx(16 / (3 * 4))
    assert aggregate(loss, mask, "constant", max_tokens=8).item() == pytest.approx(16 / (3 * 8))
    with pytest.raises(ValueError):
        aggregate(loss, mask, "sum")


def test_mask_truncated_drops_cut_off_rows():
    mask = torch.ones(3, 2)
    out = mask_truncated(mask, torch.tensor([False, True, False]))
    assert _close(out, [[1, 1], [0, 0], [1, 1]])


def test_tis_weight_is_capped_and_detached():
    train = torch.log(torch.tensor([[0.5, 0.9, 0.1]])).requires_grad_(True)
    rollout = torch.log(torch.tensor([[0.5, 0.3, 0.4]]))
    w = tis_weight(train, rollout, cap=2.0)
    assert _close(w, [[1.0, 2.0, 0.25]])  # 0.9 / 0.3 = 3 capped at 2
    assert not w.requires_grad


# ---- composition ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(LOSS_TYPES))
def test_policy_loss_every_loss_type(name):
    cfg = LOSS_TYPES[name]
    torch.manual_seed(3)
    B, T = 4, 5
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.float32)
    old = -torch.rand(B, T) - 0.1
    # a small policy step, inside every clip range (GSPO's is 4e-4), so no token is clipped
    logp = (old + 1e-5 * torch.randn(B, T)).requires_grad_(True)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    kwargs = {"group_size": 2, "prompt_ids": ["p", "p", "q", "q"], "baseline": SPOBaseline(),
              "values": torch.randn(B, T), "mask": mask}
    adv = compute_advantages(cfg, rewards, **kwargs)
    assert adv.shape == ((B, T) if cfg.advantage == "gae" else (B,))
    loss, stats = policy_loss(cfg, logp, old.clone(), adv, mask, ref_logp=old - 0.1, rollout_logp=old - 0.02,
                              max_tokens=T, truncated=torch.tensor([False, False, True, False]))
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(math.isfinite(v) for v in stats.values())
    loss.backward()
    eff = mask_truncated(mask, torch.tensor([False, False, True, False])) if cfg.mask_truncated else mask
    assert torch.all(logp.grad[eff == 0] == 0)
    assert torch.all(logp.grad[eff == 1] != 0)


def test_policy_loss_is_the_sum_of_its_parts():
    """GRPO = aggregate(seq_mean, ppo_clip + beta * k3), and TIS multiplies the policy term only."""
    cfg = LOSS_TYPES["grpo"].with_(tis_cap=2.0)
    torch.manual_seed(4)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    old = -torch.rand(2, 3)
    logp = old + 0.3 * torch.randn(2, 3)
    ref, rollout = old - 0.2, old + 0.5
    adv = torch.tensor([0.7, -0.7])
    loss, stats = policy_loss(cfg, logp, old, adv, mask, ref_logp=ref, rollout_logp=rollout)
    pg, _ = ppo_clip(logp, old, adv, 0.2, 0.2)
    w = torch.clamp(torch.exp(old - rollout), max=2.0)
    l_ = ref - logp
    per_token = pg * w + 0.04 * (torch.exp(l_) - 1 - l_)
    want = sum((per_token[i] * mask[i]).sum() / mask[i].sum() for i in range(2)) / 2
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert "kl" in stats and "tis_mean" in stats
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(cfg, logp, old, adv, mask)


def test_on_policy_ppo_gradient_equals_reinforce():
    """With old_logp = None (ratio 1) the PPO term's gradient is REINFORCE's: -A grad logp."""
    logp = torch.tensor([[-1.0, -0.5]], requires_grad=True)
    loss, _ = policy_loss(ObjectiveConfig(), logp, None, torch.tensor([2.0]), torch.ones(1, 2))
    loss.backward()
    assert _close(logp.grad, [[-1.0, -1.0]])  # -A / n_tokens under token_mean


def test_compute_advantages_dispatch():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert torch.equal(compute_advantages(LOSS_TYPES["grpo"], r, group_size=2), group_advantages(r, 2))
    assert torch.equal(compute_advantages(LOSS_TYPES["dr_grpo"], r, group_size=2),
                       group_advantages(r, 2, scale=False))
    assert torch.equal(compute_advantages(LOSS_TYPES["bnpo"], r), batch_normalized_advantages(r))
    with pytest.raises(ValueError, match="group_size"):
        compute_advantages(LOSS_TYPES["grpo"], r)
    with pytest.raises(ValueError, match="SPOBaseline"):
        compute_advantages(LOSS_TYPES["spo"], r)
    # GAE from sequence rewards: the reward sits on each sequence's last masked token
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.float32)
    values = torch.randn(4, 4)
    token_r = torch.zeros(4, 4)
    token_r[0, 2], token_r[1, 3], token_r[3, 0] = 1.0, 0.0, 0.0
    got = compute_advantages(LOSS_TYPES["ppo"], r, values=values, mask=mask, gamma=0.9, lam=0.8)
    assert _close(got, gae(token_r, values, mask, 0.9, 0.8)[0])
