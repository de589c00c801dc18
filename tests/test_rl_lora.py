"""RL through LoRA adapters (``--lora_rank``): only the adapters train, rollouts sample the merged
policy, the saved weights are the merged model, and bad adapter flags fail before training.

Why it exists: on the demo, full-weight GRPO on two task kinds moved kinds it never saw (tool calls
-6 and -8 points on two of five seeds); adapters on a frozen policy lifted the trained kinds as much
and left the others within one point ("LoRA learns less and forgets less").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from minimind.model.lora import has_lora, merged_state_dict
from minimind.model.weights import load_model
from minimind.rl.options import GRPOOptions
from minimind.rl.rewards import REWARD_FUNCTIONS, register_reward
from minimind.rl.toy import register_toy_reward
from minimind.tokenizer import MiniMindTokenizer
from minimind.train.core import Trainer
from minimind.train.stages.rl import GRPOStage
from minimind.train.stages.rl_recipe import (
    advantages,
    build_context,
    old_log_probs,
    pick_prompts,
    rollout_and_score,
    update,
)
from tests.rl_fixtures import toy_config, toy_options, toy_workspace

pytestmark = pytest.mark.usefixtures("one_thread")

register_toy_reward()
if "test_spread_lora" not in REWARD_FUNCTIONS:  # rewards that differ, so every batch carries signal
    register_reward("test_spread_lora")(lambda prompt, completion, **_: (sum(map(ord, completion)) % 7) / 6)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return toy_workspace(tmp_path_factory.mktemp("rl_lora"))


def _context(ws: dict[str, Path], out: Path, **opts: Any) -> Any:
    tok = MiniMindTokenizer.from_dir(ws["tok"])
    stage = GRPOStage(toy_options(GRPOOptions, num_generations=4, max_gen_len=3, reward="test_spread_lora:1",
                                  steps_per_generation=2, **opts))
    cfg = toy_config(ws, out, batch_size=4, learning_rate=5e-2, max_steps=2)
    ctx, _ = build_context(Trainer(stage, cfg, tok), stage, tok)
    return ctx, stage


def _step(ctx: Any, step: int) -> None:
    scored = rollout_and_score(ctx, step, pick_prompts(ctx, step))
    old = old_log_probs(ctx, scored.batch)
    update(ctx, step, scored, old, advantages(ctx, scored, old), 5e-2)


def test_lora_rl_trains_only_the_adapters_and_rolls_out_the_merged_policy(ws: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    ctx, _ = _context(ws, tmp_path, lora_rank=4, lora_alpha=8)
    model = ctx.trainer.base_model
    assert has_lora(model)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _step(ctx, 0)
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(".lora." in k for k in changed), sorted(changed)[:5]
    assert any(k.endswith("lora.B.weight") for k in changed)  # B starts at 0: the update is live
    # the rollout engine holds a plain model refreshed with the merged weights ...
    engine_model = ctx.backend.engine.model
    assert not has_lora(engine_model)
    merged = merged_state_dict(model)
    for k, v in engine_model.state_dict().items():
        torch.testing.assert_close(v.float(), merged[k].float(), rtol=1e-6, atol=0)
    # ... so the next rollout's log-probs are the adapted policy's (ratio 1 before its update)
    scored = rollout_and_score(ctx, 1, pick_prompts(ctx, 1))
    m = scored.batch.completion_mask.bool()
    mine = old_log_probs(ctx, scored.batch).old_logp
    assert mine is not None and bool(m.any())
    torch.testing.assert_close(mine[m], scored.batch.rollout_logp[m], atol=2e-4, rtol=1e-4)


def test_lora_rl_saves_the_merged_model(ws: dict[str, Path], tmp_path: Path) -> None:
    """The exported file is a plain model (no adapter keys) whose logits are the adapted policy's."""
    ctx, stage = _context(ws, tmp_path, lora_rank=4, lora_alpha=8)
    model = ctx.trainer.base_model
    _step(ctx, 0)
    path = stage.export(model, tmp_path / "grpo.safetensors")
    plain = load_model(path).eval()
    assert not has_lora(plain) and not any(".lora." in k for k in plain.state_dict())
    ids = torch.randint(5, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        want, got = model(ids).logits, plain(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    sd, saved = model.state_dict(), plain.state_dict()
    adapted = [k.removesuffix(".lora.B.weight") + ".weight" for k in sd if k.endswith(".lora.B.weight")]
    assert adapted and any(not torch.equal(saved[k], sd[k]) for k in adapted)  # W + s B A, not W


@pytest.mark.parametrize("flags, message", [
    ({"lora_rank": -1}, "--lora_rank must be >= 0"),
    ({"lora_rank": 4, "lora_alpha": -2.0}, "alpha must be >= 0"),
])
def test_bad_lora_flags_fail_before_training(flags: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GRPOOptions(**flags).validate()


def test_lora_targets_that_match_nothing_fail_before_the_first_step(ws: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="match no eligible Linear"):
        _context(ws, tmp_path, lora_rank=4, lora_targets="not_a_module")
