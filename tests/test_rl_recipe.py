"""The RL recipe trains what its names promise (issue 13): log-probs of the sampled temperature,
independent samples, mini-batch updates whose ratio leaves 1 (so each loss_type's clip acts where its
paper says), a separate PPO critic, SPO's adaptive baseline shared by every rank, DAPO's sampling and
shaping, loss-type defaults, and no optimizer step without signal.

Toy task (:mod:`minimind.rl.toy`): "say <d>", reward 0.5 for a leading digit, +0.5 for the right one.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from minimind.config import ModelConfig, TrainConfig
from minimind.infer.engine import GenerationEngine
from minimind.infer.sampling import SamplingParams
from minimind.infer.scheduler import GenerationResult
from minimind.model import MiniMindForCausalLM
from minimind.rl.data import PromptDataset
from minimind.rl.objective import LOSS_TYPES, SPOBaseline, compute_advantages, policy_loss, tis_weight
from minimind.rl.options import RECIPE_DEFAULTS, GRPOOptions, PPOOptions, SPOOptions
from minimind.rl.rewards import REWARD_FUNCTIONS, register_reward
from minimind.rl.rollout import EngineBackend, agent_rollouts, single_turn_rollouts
from minimind.rl.toy import register_toy_reward
from minimind.tokenizer import MiniMindTokenizer
from minimind.train.core import Trainer
from minimind.train.stages.base import LossOutput, next_token_loss
from minimind.train.stages.rl import GRPOStage, PPOStage, SPOStage
from minimind.train.stages.rl_loss import RatioStats, micro_batch_weight
from minimind.train.stages.rl_recipe import (
    RLMicroBatch,
    Scored,
    advantages,
    build_context,
    dynamic_sampling,
    make_reward,
    old_log_probs,
    pick_prompts,
    policy_logps,
    rl_loss,
    rollout_and_score,
    update,
)
from minimind.train.stages.rl_update import _micro_batches, ptx_batch, with_ptx
from tests.rl_fixtures import toy_config, toy_options, toy_workspace

pytestmark = pytest.mark.usefixtures("one_thread")

register_toy_reward()


def _spread_reward(prompt: str, completion: str, **_: Any) -> float:
    """A reward that differs between almost any two completions, so that a test about what an update
    does never depends on a random-init model happening to earn the toy reward (a batch of equal
    rewards carries no signal and takes no optimizer step)."""
    return (sum(map(ord, completion)) % 7) / 6.0


if "test_spread" not in REWARD_FUNCTIONS:
    register_reward("test_spread")(_spread_reward)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return toy_workspace(tmp_path_factory.mktemp("rl_recipe"))


def _cfg(ws: dict[str, Path], out: Path, stage: str = "grpo", **kw: Any) -> TrainConfig:
    """:func:`toy_config` with this file's short runs: 4 prompts a step, lr 5e-2, 3 steps."""
    return toy_config(ws, out, stage, **{"batch_size": 4, "learning_rate": 5e-2, "max_steps": 3, **kw})


def _opts(cls: type = GRPOOptions, **kw: Any) -> Any:
    """:func:`toy_options` with groups of 4 and 3 new tokens."""
    return toy_options(cls, **{"num_generations": 4, "max_gen_len": 3, **kw})


def _context(ws: dict[str, Path], out: Path, stage: Any, **cfg_kw: Any) -> Any:
    tok = MiniMindTokenizer.from_dir(ws["tok"])
    cfg = _cfg(ws, out, stage=stage.name, **cfg_kw)
    ctx, _ = build_context(Trainer(stage, cfg, tok), stage, tok)
    return ctx


def _random_model(vocab: int) -> MiniMindForCausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=vocab, max_position_embeddings=128)
    return MiniMindForCausalLM(cfg).eval()


# ---- 1. temperature ---------------------------------------------------------------------------------
def test_rollout_logprobs_equal_the_trainers_old_logprobs_at_temperature(ws: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    """Samples come from softmax(z / T): the engine's log-probs and the trainer's old log-probs must be
    of that distribution, so the ratio and the TIS weight are 1 before any update (old code: T = 1)."""
    T = 0.6
    ctx = _context(ws, tmp_path, GRPOStage(_opts(temperature=T, steps_per_generation=2)))
    scored = rollout_and_score(ctx, 0, pick_prompts(ctx, 0))
    batch, m = scored.batch, scored.batch.completion_mask.bool()
    old = old_log_probs(ctx, batch).old_logp
    assert old is not None and bool(m.any())
    torch.testing.assert_close(old[m], batch.rollout_logp[m], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(tis_weight(old, batch.rollout_logp)[m], torch.ones(int(m.sum())), atol=5e-4,
                               rtol=0)
    plain = policy_logps(ctx.trainer.base_model, batch, 1.0, len(batch), ctx.trainer.device)
    assert float((plain[m] - batch.rollout_logp[m]).abs().max()) > 1e-2  # T matters: the check can fail


def test_old_logprobs_are_taken_without_dropout(ws: dict[str, Path], tmp_path: Path) -> None:
    """With dropout, train-mode old log-probs differ from pass to pass and the ratio is not 1 by noise
    alone; the recipe takes them in eval mode (and leaves the model training)."""
    ctx = _context(ws, tmp_path, GRPOStage(_opts(steps_per_generation=2)), dropout=0.5)
    scored = rollout_and_score(ctx, 0, pick_prompts(ctx, 0))
    a, b = old_log_probs(ctx, scored.batch).old_logp, old_log_probs(ctx, scored.batch).old_logp
    assert a is not None and torch.equal(a, b) and ctx.trainer.base_model.training
    noisy = policy_logps(ctx.trainer.base_model, scored.batch, 1.0, len(scored.batch), ctx.trainer.device)
    assert not torch.equal(noisy, a)  # train mode: dropout noise (so the check can fail)


# ---- 2. independent samples ---------------------------------------------------------------------------
def test_identical_prompts_in_one_batch_get_different_completions() -> None:
    engine = GenerationEngine(_random_model(300), None, num_slots=8)
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=7)
    prompt = [5, 6, 7, 8]
    batch = single_turn_rollouts(EngineBackend(engine), [prompt] * 4, params, n=1)
    rows = {tuple(batch.input_ids[i, :int(batch.sequence_lengths[i])].tolist()) for i in range(4)}
    assert len(rows) == 4, "identical prompts drew identical samples (one seed for every request)"
    again = single_turn_rollouts(EngineBackend(engine), [prompt] * 4, params, n=1)
    assert torch.equal(again.input_ids, batch.input_ids)  # ... while the seed still reproduces them


class _SeedSampler:
    """A backend that 'samples' from its request's seed: turn 1 always calls the calculator (every
    episode reaches the same context), later turns answer with a number drawn from the seed."""

    per_prompt_params = True

    def __init__(self, tok: MiniMindTokenizer, tool_reply: str) -> None:
        self.tok, self.tool_reply = tok, tool_reply

    def _result(self, text: str) -> GenerationResult:
        ids = list(self.tok.encode(text)) + [self.tok.eos_id]
        return GenerationResult(ids, text, "stop", 1, len(ids), stop=self.tok.eos_id,
                                logprobs=[-1.0] * len(ids))

    def generate(self, prompt_ids: list[list[int]], params: Any, n: int) -> list[GenerationResult]:
        per_prompt = [params] * len(prompt_ids) if isinstance(params, SamplingParams) else list(params)
        out = []
        for ids, p in zip(prompt_ids, per_prompt):
            for j in range(n):
                if self.tok.decode(ids).count("<tool_response>") == 0:
                    out.append(self._result(self.tool_reply))
                else:
                    out.append(self._result(f"answer {(p.seed * 31 + j) % 997}"))
        return out

    def refresh(self, model: torch.nn.Module) -> None:
        pass


def test_agent_episodes_that_meet_the_same_context_diverge(tmp_path: Path) -> None:
    from tests.scripted_model import CALCULATOR_TOOL, TOOL_ANSWER, TOOL_CALL, small_tokenizer
    tok = small_tokenizer(tmp_path / "tok", [TOOL_ANSWER], vocab_size=400)
    reply = tok.apply_chat_template(TOOL_CALL["messages"][:2], tools=[CALCULATOR_TOOL]).rsplit(
        "</think>\n\n", 1)[1].removesuffix(tok.eos_token + "\n")
    backend = _SeedSampler(tok, reply)
    question = TOOL_CALL["messages"][:1]
    params = SamplingParams(max_new_tokens=32, temperature=1.0, seed=11)
    batch = agent_rollouts(backend, tok, [question, question], [CALCULATOR_TOOL], params, max_turns=2, n=3)
    assert batch.tool_calls.tolist() == [1] * 6  # every episode made the same call, met the same context
    assert len(set(batch.texts)) == 6, batch.texts  # ... and continued differently
    again = agent_rollouts(backend, tok, [question, question], [CALCULATOR_TOOL], params, max_turns=2, n=3)
    assert again.texts == batch.texts


def test_a_fixed_seed_reproduces_the_run(ws: dict[str, Path], tmp_path: Path) -> None:
    tok = MiniMindTokenizer.from_dir(ws["tok"])
    opts = _opts(loss_type="dapo", steps_per_generation=2)
    a = GRPOStage(opts).run(_cfg(ws, tmp_path / "a"), tok)
    b = GRPOStage(opts).run(_cfg(ws, tmp_path / "b"), tok)
    c = GRPOStage(opts).run(_cfg(ws, tmp_path / "c", seed=1), tok)
    keys = ("reward", "loss", "ratio_std", "completion_len")
    assert [[r[k] for k in keys] for r in a.records] == [[r[k] for k in keys] for r in b.records]
    assert [r["reward"] for r in a.records] != [r["reward"] for r in c.records] or \
        [r["loss"] for r in a.records] != [r["loss"] for r in c.records]


# ---- 3. mini-batch updates -------------------------------------------------------------------------------
GROUP_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "gspo", "cispo")


def _fixed_update(ws: dict[str, Path], out: Path, loss_type: str) -> tuple[dict[str, torch.Tensor], Any]:
    """One rollout batch with fixed rewards, mu = 2 passes of 2 mini-batches; the weight change."""
    stage = GRPOStage(_opts(loss_type=loss_type, ppo_epochs=2, steps_per_generation=2, dynamic_sampling=0,
                            overlong_buffer=0, epsilon=0.05,
                            epsilon_high=0.05 if loss_type != "dapo" else 0.1))
    ctx = _context(ws, out, stage, max_steps=1)
    scored = rollout_and_score(ctx, 0, pick_prompts(ctx, 0))
    scored.rewards = torch.linspace(0, 1, len(scored.batch)).roll(3) ** 2
    scored.batch.truncated[:] = False  # a fresh model never stops in 3 tokens; DAPO would mask every row
    before = {k: v.detach().clone() for k, v in ctx.trainer.base_model.named_parameters()}
    old = old_log_probs(ctx, scored.batch)
    stats = update(ctx, 0, scored, old, advantages(ctx, scored, old), 5e-2)
    delta = {k: v.detach() - before[k] for k, v in ctx.trainer.base_model.named_parameters()}
    return delta, stats


def test_each_loss_type_gives_a_different_update_once_the_ratio_leaves_one(ws: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    deltas = {}
    for lt in GROUP_TYPES:
        delta, stats = _fixed_update(ws, tmp_path / lt, lt)
        assert stats.steps == 4 and stats.ratio["ratio_std"] > 0 and stats.ratio["approx_kl"] > 0, lt
        deltas[lt] = torch.cat([d.flatten() for d in delta.values()])
    for i, a in enumerate(GROUP_TYPES):
        for b in GROUP_TYPES[i + 1:]:
            assert not torch.allclose(deltas[a], deltas[b], atol=1e-7, rtol=1e-4), (a, b)


def test_off_policy_steps_are_logged(ws: dict[str, Path], tmp_path: Path) -> None:
    """CISPO's default (as DAPO's and GSPO's) splits the rollout batch into 4 optimizer steps: from the
    second on the ratio leaves 1 and the clip can act (old code: one step per rollout, ratio 1)."""
    res = GRPOStage(_opts(loss_type="cispo")).run(
        _cfg(ws, tmp_path, max_steps=4, learning_rate=0.1), MiniMindTokenizer.from_dir(ws["tok"]))
    assert all(r["optimizer_steps"] + r["skipped_steps"] == 4 for r in res.records)
    moved = [r for r in res.records if r["optimizer_steps"] > 1]
    assert moved and all(r["ratio_std"] > 0 and r["ratio_min"] < r["ratio_max"] and r["approx_kl"] > 0
                         for r in moved)
    assert all({"approx_kl", "clip_frac", "sec_rollout", "sec_update"} <= set(r) for r in res.records)


def test_target_kl_stops_the_remaining_updates(ws: dict[str, Path], tmp_path: Path) -> None:
    """mu = 4 passes of 2 mini-batches would be 8 steps; the first step is on-policy (approx-KL 0),
    the second is off it, and --target_kl 1e-6 stops the batch there."""
    for target, steps in ((1e-6, 2), (0.0, 8)):
        opts = _opts(beta=0.0, ppo_epochs=4, steps_per_generation=2, target_kl=target)
        ctx = _context(ws, tmp_path / str(target), GRPOStage(opts))
        scored = rollout_and_score(ctx, 0, pick_prompts(ctx, 0))
        scored.rewards = torch.linspace(0, 1, len(scored.batch)).roll(3) ** 2
        old = old_log_probs(ctx, scored.batch)
        stats = update(ctx, 0, scored, old, advantages(ctx, scored, old), 5e-2)
        assert (stats.steps, stats.early_stop) == (steps, int(target > 0))


def _grad(cfg: Any, logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor,
          mask: torch.Tensor) -> torch.Tensor:
    x = logp.clone().requires_grad_(True)
    loss, _ = policy_loss(cfg, x, old, adv, mask)
    loss.backward()
    return x.grad


def test_clipping_removes_the_gradient_where_each_paper_says() -> None:
    old = torch.zeros(2, 3)
    mask = torch.ones(2, 3)
    adv = torch.tensor([1.0, -1.0])
    # token ratios: row 0 (A > 0): in band, above 1 + eps_high, below 1 - eps; row 1 (A < 0) mirrored
    logp = torch.log(torch.tensor([[1.1, 1.5, 0.5], [0.9, 0.5, 1.5]]))
    # PPO / GRPO / DAPO: per token, a clipped token (the min takes the constant branch) has no gradient
    for name, eps_high in (("grpo", 0.2), ("dapo", 0.28)):
        g = _grad(LOSS_TYPES[name].with_(kl="none", aggregation="token_mean"), logp, old, adv, mask)
        expect = torch.tensor([[-1.1, 0.0, -0.5], [0.9, 0.0, 1.5]]) / 6  # d(-r A)/d logp = -r A / N
        assert eps_high < 0.5  # 1.5 lies outside both bands
        torch.testing.assert_close(g, expect)
    # GSPO: one decision per sequence -- a sequence inside the band keeps every token's gradient,
    # however far its token ratios stray; outside it, every token loses it
    cfg = LOSS_TYPES["gspo"].with_(eps_low=0.1, eps_high=0.1)
    inside = torch.log(torch.tensor([[1.5, 1.0, 1 / 1.5]]))  # geometric mean 1
    g = _grad(cfg, inside, torch.zeros(1, 3), torch.tensor([1.0]), torch.ones(1, 3))
    torch.testing.assert_close(g, torch.full((1, 3), -1 / 3))
    outside = torch.log(torch.tensor([[1.2, 1.2, 1.2]]))  # s = 1.2 > 1.1 with A > 0
    g = _grad(cfg, outside, torch.zeros(1, 3), torch.tensor([1.0]), torch.ones(1, 3))
    assert torch.equal(g, torch.zeros(1, 3))
    # CISPO: no token loses its gradient; the IS weight is clipped and carries no gradient of its own
    cfg = LOSS_TYPES["cispo"].with_(eps_low=0.2, eps_high=0.28)
    g = _grad(cfg, logp, old, adv, mask)
    weight = logp.exp().clamp(0.8, 1.28)
    torch.testing.assert_close(g, -weight * adv.unsqueeze(-1) / 6)
    assert bool((g != 0).all())


def test_a_batch_without_signal_costs_no_step(ws: dict[str, Path], tmp_path: Path) -> None:
    """All advantages 0 and no KL term: no forward/backward and no optimizer step (old code: an lr-0
    step that still decayed Adam's moments); with a KL term the step is taken."""
    for beta, steps in ((0.0, 0), (0.1, 2)):
        ctx = _context(ws, tmp_path / str(beta), GRPOStage(_opts(beta=beta, steps_per_generation=2)))
        calls: list[int] = []
        step = ctx.trainer.step
        ctx.trainer.step = lambda *a, calls=calls, step=step, **kw: calls.append(1) or step(*a, **kw)
        scored = rollout_and_score(ctx, 0, pick_prompts(ctx, 0))
        scored.rewards = torch.ones(len(scored.batch))
        old = old_log_probs(ctx, scored.batch)
        stats = update(ctx, 0, scored, old, advantages(ctx, scored, old), 1e-2)
        assert (stats.steps, len(calls)) == (steps, steps)
        assert stats.skipped == 2 - steps
        assert bool(ctx.trainer.optimizer.state) == bool(steps)  # Adam's moments untouched when skipped


# ---- 3b. PPO-ptx: a supervised term beside the RL loss -------------------------------------------------
def _ptx_file(root: Path) -> Path:
    """SFT conversations the toy tokenizer encodes: a fixed reply the toy reward never asks for."""
    rows = [{"conversations": [{"role": "user", "content": f"say {d}"},
                               {"role": "assistant", "content": f"digit {d} number {d}"}]} for d in range(10)]
    path = root / "ptx.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    return path


def _grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {k: v.grad.detach().clone() for k, v in model.named_parameters() if v.grad is not None}


def test_ptx_adds_gamma_times_the_sft_nll_to_the_step(ws: dict[str, Path], tmp_path: Path) -> None:
    """What the trainer accumulates, sum_i w_i L_i / sum_i w_i over the RL micro-batches plus the ptx
    rows, has the gradient of L_RL + gamma * NLL_SFT; the RL metrics keep their values and ptx_nll is
    the rows' NLL."""
    gamma = 0.5
    stage = GRPOStage(_opts(reward="test_spread:1", micro_batch_size=4, ptx_coef=gamma,
                            ptx_data=str(_ptx_file(tmp_path)), ptx_rows=3))
    ctx = _context(ws, tmp_path / "run", stage, max_steps=1)
    assert ctx.ptx is not None
    scored = rollout_and_score(ctx, 0, pick_prompts(ctx, 0))
    old = old_log_probs(ctx, scored.batch)
    mbs = _micro_batches(ctx, scored, old, advantages(ctx, scored, old), torch.arange(len(scored.batch)))
    assert len(mbs) > 1
    rl_w = [micro_batch_weight(ctx.obj, mb) for mb in mbs]
    ptx = ptx_batch(ctx, 0, 0)
    assert ptx.input_ids.shape[0] == 3 and int(ptx.num_target_tokens) > 0
    model = ctx.trainer.base_model

    def base(m: torch.nn.Module, mb: RLMicroBatch) -> LossOutput:
        return rl_loss(ctx.parts, m, mb, RatioStats())

    fn, all_mbs, w = with_ptx(base, mbs, rl_w, ptx, gamma)
    outs = [fn(model, mb) for mb in all_mbs]
    mixed = sum(o.loss * wi / sum(w) for o, wi in zip(outs, w))
    g_mixed = _grads(model, mixed)
    rl_mean = sum(base(model, mb).loss * wi / sum(rl_w) for mb, wi in zip(mbs, rl_w))
    nll = next_token_loss(model, ptx).loss
    g_direct = _grads(model, rl_mean + gamma * nll)
    g_rl = _grads(model, sum(base(model, mb).loss * wi / sum(rl_w) for mb, wi in zip(mbs, rl_w)))
    for k in g_direct:
        assert torch.allclose(g_mixed[k], g_direct[k], rtol=1e-4, atol=1e-7), k
    assert max((g_direct[k] - g_rl[k]).abs().max().item() for k in g_rl) > 1e-4  # the term acts
    ptx_metric = sum(o.metrics["ptx_nll"] * wi / sum(w) for o, wi in zip(outs, w) if "ptx_nll" in o.metrics)
    assert float(ptx_metric) == pytest.approx(float(nll.detach()), rel=1e-5)
    # gamma 0 or no rows: the step is the plain RL step
    assert with_ptx(base, mbs, rl_w, ptx, 0.0) == (base, mbs, rl_w)


def test_ptx_keeps_the_supervised_rows_learnt_during_rl(ws: dict[str, Path], tmp_path: Path) -> None:
    """Three GRPO steps with and without --ptx_coef: with it, the SFT rows' NLL falls and ends lower
    (the run logs it as ptx_nll); a bad --ptx_data fails before training starts."""
    tok = MiniMindTokenizer.from_dir(ws["tok"])
    data = _ptx_file(tmp_path)
    nll = {}
    for gamma in (0.0, 1.0):
        opts = _opts(reward="test_spread:1", ptx_coef=gamma, ptx_data=str(data) if gamma else "", ptx_rows=4)
        res = GRPOStage(opts).run(_cfg(ws, tmp_path / str(gamma)), tok)
        probe = GRPOStage(_opts(ptx_coef=1.0, ptx_data=str(data)))
        ctx = _context(ws, tmp_path / f"probe{gamma}", probe, from_weight=str(res.weights_path))
        with torch.no_grad():
            nll[gamma] = float(next_token_loss(ctx.trainer.base_model.eval(), ptx_batch(ctx, 0, 0)).loss)
        if gamma:
            logged = [r["ptx_nll"] for r in res.records if "ptx_nll" in r]
            assert len(logged) == len(res.records) and logged[-1] < logged[0]
    assert nll[1.0] < nll[0.0] - 0.5
    with pytest.raises(ValueError, match="--ptx_data"):
        GRPOOptions(ptx_coef=0.5, ptx_data=str(tmp_path / "missing.jsonl")).validate()
    with pytest.raises(ValueError, match="--ptx_coef"):
        GRPOOptions(ptx_coef=float("nan")).validate()


def _naive_kl(policy: torch.nn.Module, reference: torch.nn.Module, batch: Any) -> torch.Tensor:
    """KL(p_ref || p_theta) summed over the vocabulary, averaged over the batch's target positions,
    written out from the definition."""
    fwd = {"position_ids": batch.position_ids, "doc_ids": batch.doc_ids}
    logp = torch.log_softmax(policy(batch.input_ids, **fwd).logits.float(), -1)
    with torch.no_grad():
        logq = torch.log_softmax(reference(batch.input_ids, **fwd).logits.float(), -1)
    sel = batch.targets != -100
    return (logq.exp() * (logq - logp))[sel].sum(-1).mean()


def test_ptx_kl_adds_gamma_times_the_kl_to_the_reference(ws: dict[str, Path], tmp_path: Path) -> None:
    """--ptx_loss kl: the step's gradient is that of L_RL + gamma * KL(p_ref || p_theta) on the rows
    (logged as ptx_kl); the reference is loaded although beta is 0, and then no reference log-probs
    are computed for the rollouts (no KL term uses them). Fails before --ptx_loss existed."""
    gamma = 0.5
    stage = GRPOStage(_opts(reward="test_spread:1", micro_batch_size=4, beta=0.0, ptx_coef=gamma,
                            ptx_loss="kl", ptx_data=str(_ptx_file(tmp_path)), ptx_rows=3))
    ctx = _context(ws, tmp_path / "run", stage, max_steps=1)
    ref, model = ctx.parts.reference, ctx.trainer.base_model
    assert ref is not None and ctx.o.beta == 0
    scored = rollout_and_score(ctx, 0, pick_prompts(ctx, 0))
    old = old_log_probs(ctx, scored.batch)
    assert old.ref_logp is None
    mbs = _micro_batches(ctx, scored, old, advantages(ctx, scored, old), torch.arange(len(scored.batch)))
    rl_w = [micro_batch_weight(ctx.obj, mb) for mb in mbs]
    ptx = ptx_batch(ctx, 0, 0)

    def base(m: torch.nn.Module, mb: RLMicroBatch) -> LossOutput:
        return rl_loss(ctx.parts, m, mb, RatioStats())

    fn, all_mbs, w = with_ptx(base, mbs, rl_w, ptx, gamma, reference=ref)
    assert float(fn(model, ptx).metrics["ptx_kl"]) == pytest.approx(0.0, abs=1e-6)  # policy == reference
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy away from the reference
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    outs = [fn(model, mb) for mb in all_mbs]
    g_mixed = _grads(model, sum(o.loss * wi / sum(w) for o, wi in zip(outs, w)))

    def rl_mean() -> torch.Tensor:
        return sum(base(model, mb).loss * wi / sum(rl_w) for mb, wi in zip(mbs, rl_w))

    kl = _naive_kl(model, ref, ptx)
    g_direct = _grads(model, rl_mean() + gamma * kl)
    g_nll = _grads(model, rl_mean() + gamma * next_token_loss(model, ptx).loss)
    for k in g_direct:
        assert torch.allclose(g_mixed[k], g_direct[k], rtol=1e-4, atol=1e-7), k
    assert max((g_direct[k] - g_nll[k]).abs().max().item() for k in g_nll) > 1e-4  # not the NLL term
    logged = sum(o.metrics["ptx_kl"] * wi / sum(w) for o, wi in zip(outs, w) if "ptx_kl" in o.metrics)
    assert float(logged) == pytest.approx(float(kl.detach()), rel=1e-4) and float(kl) > 1e-3
    with pytest.raises(ValueError, match="--ptx_loss"):
        GRPOOptions(ptx_loss="mse").validate()


def test_ptx_kl_holds_the_rows_where_the_reference_has_them(ws: dict[str, Path], tmp_path: Path) -> None:
    """Six GRPO steps (beta 0) that move the policy: with --ptx_loss kl its KL from the start model on
    the rows ends far smaller than without, and the run logs ptx_kl; the NLL term instead moves the
    rows towards their replies, away from the start model."""
    tok = MiniMindTokenizer.from_dir(ws["tok"])
    data = _ptx_file(tmp_path)
    probe = GRPOStage(_opts(beta=0.0, ptx_coef=1.0, ptx_loss="kl", ptx_data=str(data), ptx_rows=8))
    start = _context(ws, tmp_path / "probe", probe)
    rows = ptx_batch(start, 0, 0)
    kl = {}
    for loss in ("none", "kl", "nll"):
        opts = _opts(reward="test_spread:1", beta=0.0, ptx_coef=0.0 if loss == "none" else 2.0,
                     ptx_loss="nll" if loss == "none" else loss, ptx_data=str(data), ptx_rows=4)
        res = GRPOStage(opts).run(_cfg(ws, tmp_path / loss, max_steps=6), tok)
        ctx = _context(ws, tmp_path / f"probe_{loss}", probe, from_weight=str(res.weights_path))
        with torch.no_grad():
            kl[loss] = float(_naive_kl(ctx.trainer.base_model.eval(), start.trainer.base_model.eval(), rows))
        if loss == "kl":
            assert all("ptx_kl" in r for r in res.records)
    assert kl["kl"] < 0.5 * kl["none"] and kl["nll"] > kl["kl"], kl


# ---- 4. PPO's critic ---------------------------------------------------------------------------------
@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_value_loss_reaches_the_policy_only_with_a_shared_critic(ws: dict[str, Path], tmp_path: Path,
                                                                critic: str) -> None:
    stage = PPOStage(_opts(PPOOptions, loss_type="ppo", num_generations=1, critic=critic))
    ctx = _context(ws, tmp_path, stage)
    scored = rollout_and_score(ctx, 0, pick_prompts(ctx, 0))
    b = scored.batch
    mask = b.completion_mask
    mb = RLMicroBatch(b.input_ids, b.position_ids, b.targets, mask, torch.zeros_like(mask), None,
                      b.rollout_logp, old_values=torch.zeros_like(mask), returns=mask.clone(), max_tokens=3)
    head = ctx.parts.critic.head if critic == "separate" else ctx.parts.value_head
    torch.nn.init.normal_(head.proj.weight)  # a trained head (a zero one passes no gradient to any trunk)
    out = rl_loss(ctx.parts, ctx.trainer.model, mb)  # advantage 0: only the value loss has a gradient
    out.loss.backward()
    policy = [p.grad for p in ctx.trainer.base_model.parameters()]
    value_params = (ctx.parts.critic or ctx.parts.value_head).parameters()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in value_params)
    reached = any(g is not None and float(g.abs().sum()) > 0 for g in policy)
    assert reached == (critic == "shared")


# ---- 5. SPO --------------------------------------------------------------------------------------------
def test_spo_forgets_by_policy_drift_and_prioritises_uncertain_prompts() -> None:
    base = SPOBaseline(rho_min=0.1, rho_max=1.0, kl_half=0.06)
    base.update("p", 1.0)
    assert base.rho("p") == 1.0  # no drift since the last visit: nothing to forget
    base.advance(0.06)
    assert base.rho("p") == pytest.approx(0.5)  # one half-life of KL
    base.advance(10.0)
    assert base.rho("p") == 0.1  # bounded below
    bounded = SPOBaseline()
    bounded.update("q", 1.0)
    assert bounded.rho("q") == 0.96
    for _ in range(30):
        bounded.update("q", 1.0)
    pr = bounded.priorities(["q", "unseen"])
    assert bounded.value("q") > 0.95 and pr[0] < 0.5 * pr[1]
    # the advantage: r - v with the pre-update values, z-scored over the batch
    adv = compute_advantages(LOSS_TYPES["spo"], torch.tensor([1.0, 0.0, 1.0, 0.0]),
                             prompt_ids=["a", "b", "c", "q"], baseline=bounded)
    assert abs(float(adv.mean())) < 1e-5 and float(adv.std(correction=0)) == pytest.approx(1.0, abs=1e-4)


def test_spo_draws_prompts_by_baseline_uncertainty() -> None:
    base = SPOBaseline()
    for p in range(50):
        for _ in range(30):
            base.update(p, 1.0)  # prompts 0..49 are solved; 50..99 unseen
    ctx = SimpleNamespace(cfg=SimpleNamespace(batch_size=10, seed=0),
                          info=SimpleNamespace(rank=0, world_size=1), parts=SimpleNamespace(baseline=base),
                          o=SimpleNamespace(spo_prioritized=1),
                          dataset=list(range(100)), steps_per_epoch=10)
    drawn = [p for step in range(40) for p in pick_prompts(ctx, step)]
    assert sum(p < 50 for p in drawn) / len(drawn) < 0.3  # in order: 0.5; weights 0.14 vs 0.55: ~0.2
    assert pick_prompts(ctx, 3) == pick_prompts(ctx, 3)


def _spo_worker(rank: int, world: int, port: int, cfg_kw: dict, out_dir: str) -> None:
    import os
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    register_toy_reward()
    stage = SPOStage(_opts(SPOOptions, loss_type="spo", num_generations=1, reward="test_spread:1"))
    stage.run(TrainConfig(**cfg_kw), MiniMindTokenizer.from_dir(cfg_kw["tokenizer_path"]))
    state = stage.baseline.state_dict()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
        {"alpha": sorted(state["alpha"].items()), "beta": sorted(state["beta"].items()),
         "clock": state["clock"]}))


@pytest.mark.slow  # two spawned ranks: ~30 s on a shared 2-core box
def test_spo_baseline_is_the_same_on_every_rank_and_saved_whole(ws: dict[str, Path], tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    from minimind.train import checkpoint as ckpt
    cfg = _cfg(ws, tmp_path, stage="spo", max_steps=2, batch_size=4)
    cfg_kw = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spo_worker, args=(2, port, cfg_kw, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1 and r0["clock"] > 0
    assert len(r0["alpha"]) > 8  # 2 steps x 2 ranks x 4 prompts: both ranks' prompts (draws may repeat)
    saved = ckpt.load_resume(tmp_path / "ckpt" / "spo_32_resume.pt")["stage"]["spo_baseline"]
    assert sorted(saved["alpha"].items()) == [tuple(x) for x in r0["alpha"]]


# ---- 6. DAPO and the loss-type defaults -------------------------------------------------------------------
def _canned_scored(tok_eos: int, rewards: list[float], offset: int = 0, cut: tuple[int, ...] = ()) -> Scored:
    results = [GenerationResult([10 + k, tok_eos], "x", "length" if k in cut else "stop", 2, 2, stop=tok_eos,
                                logprobs=[-1.0, -1.0]) for k in range(len(rewards))]
    backend = SimpleNamespace(generate=lambda prompts, params, n: results)
    batch = single_turn_rollouts(backend, [[1, 2]] * (len(rewards) // 2), SamplingParams(seed=0), n=2)
    return Scored(batch, [offset + k // 2 for k in range(len(rewards))], ["p"] * len(rewards),
                  torch.tensor(rewards), {})


@pytest.mark.parametrize("rounds, spread_groups", [(2, 3), (0, 1)])
def test_dynamic_sampling_fills_the_batch_with_groups_that_carry_signal(rounds: int,
                                                                        spread_groups: int) -> None:
    ctx = SimpleNamespace(o=SimpleNamespace(num_generations=2, dynamic_sampling=rounds),
                          cfg=SimpleNamespace(batch_size=3), tokenizer=SimpleNamespace(pad_id=0),
                          obj=LOSS_TYPES["dapo"])
    first = _canned_scored(2, [1, 1, 0, 1, 0, 0])  # groups: flat, spread, flat
    extra = iter([_canned_scored(2, [0, 1, 1, 1, 0, 0], 10), _canned_scored(2, [1, 0, 0, 0, 1, 1], 20)])
    out = dynamic_sampling(ctx, first, lambda k: next(extra))
    r = out.rewards.view(-1, 2)
    has_spread = (r[:, 0] != r[:, 1])
    assert len(out.batch) == 6 and int(has_spread.sum()) == spread_groups
    trained = out.batch.completion_mask.view(3, 2, -1).sum((1, 2)) > 0
    assert torch.equal(trained, has_spread)  # filler groups (cap reached) carry no loss
    assert out.spread_share == pytest.approx(1 / 3)


def test_dynamic_sampling_skips_groups_whose_rows_are_all_cut_off() -> None:
    ctx = SimpleNamespace(o=SimpleNamespace(num_generations=2, dynamic_sampling=1),
                          cfg=SimpleNamespace(batch_size=2), tokenizer=SimpleNamespace(pad_id=0),
                          obj=LOSS_TYPES["dapo"])
    first = _canned_scored(2, [1, 0, 0, 1], cut=(0, 1))  # group 0: spread, but both rows truncated
    out = dynamic_sampling(ctx, first, lambda k: _canned_scored(2, [1, 0, 1, 1], 10))
    assert out.prompt_ids == [1, 1, 10, 10]


def test_loss_type_defaults_apply_unless_a_flag_is_set() -> None:
    grpo = GRPOOptions()
    assert grpo.resolved().beta == 0.04 and grpo.objective().kl == "k3" and grpo.objective().beta == 0.04
    assert GRPOOptions(beta=0.0).objective().kl == "none"  # the user's flag wins
    dapo = GRPOOptions(loss_type="dapo", max_gen_len=100).resolved()
    assert (dapo.steps_per_generation, dapo.dynamic_sampling, dapo.overlong_buffer) == (4, 3, 25)
    assert GRPOOptions(loss_type="dapo", steps_per_generation=1).resolved().steps_per_generation == 1
    assert GRPOOptions(loss_type="dapo").objective().mask_truncated
    assert not GRPOOptions(loss_type="dapo", overlong_filter=0).objective().mask_truncated
    assert PPOOptions().resolved().ppo_epochs == RECIPE_DEFAULTS["ppo"].ppo_epochs == 2
    assert PPOOptions().resolved().beta == 0.02 and PPOOptions().objective().kl == "none"  # KL in the reward
    # DAPO's soft overlong punishment rides along as the `length` reward over the last 25 tokens
    dapo_toy = GRPOOptions(loss_type="dapo", max_gen_len=100, reward="toy_digit:1").resolved()
    fn = make_reward(dapo_toy, agentic=False)
    _, parts = fn(["p"] * 3, ["a", "b", "c"], [{"max_len": 100, "cache_len": 25, "completion_tokens": n,
                                                    "gt": ["1"]} for n in (50, 90, 100)])
    assert parts["length"].tolist() == pytest.approx([0.0, -0.6, -1.0])


# ---- 7. data errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("row, message", [({"conversations": 7}, "must be a list of messages"),
                                          ({"conversations": [7]}, "message 0 of 'conversations' is not"),
                                          ({"conversations": "[oops"}, "not a JSON list")])
def test_malformed_rl_rows_name_file_and_line(tmp_path: Path, row: dict, message: str) -> None:
    path = tmp_path / "rl.jsonl"
    good = {"conversations": [{"role": "user", "content": "hi"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=rf"rl.jsonl:2: .*{message}"):
        PromptDataset.from_jsonl(path)
    assert len(PromptDataset.from_jsonl(path, skip_bad_lines=True)) == 1


@pytest.mark.slow  # ~20-40 s per loss type on a shared 2-core CPU
@pytest.mark.parametrize("loss_type", ["dr_grpo", "bnpo", "gspo", "cispo", "dapo", "spo", "ppo"])
def test_the_toy_reward_rises_for_every_loss_type(ws: dict[str, Path], tmp_path: Path,
                                                  loss_type: str) -> None:
    """Each loss type with its own defaults (DAPO without overlong filtering: a fresh model never stops
    within the toy's budget) takes the toy reward from ~0.05 to well above it in 100 steps."""
    single = loss_type in ("spo", "ppo")
    stage_cls, opt_cls = {"spo": (SPOStage, SPOOptions), "ppo": (PPOStage, PPOOptions)}.get(
        loss_type, (GRPOStage, GRPOOptions))
    extra = {"overlong_filter": 0} if loss_type == "dapo" else {}
    opts = _opts(opt_cls, loss_type=loss_type, num_generations=1 if single else 8, max_gen_len=2, beta=-1.0,
                 **extra)
    res = stage_cls(opts).run(_cfg(ws, tmp_path, stage=stage_cls.name, batch_size=64 if single else 8,
                                   max_steps=100, epochs=20, learning_rate=5e-3),
                              MiniMindTokenizer.from_dir(ws["tok"]))
    first, last = sum(res.rewards[:10]) / 10, sum(res.rewards[-10:]) / 10
    assert last > first + 0.2 and last > 0.35, (first, last)
