"""Off-policy guidance (``--guidance 1``): a group with no sample that earns what the row's reference
reply earns trains on that reply in place of its last sample; other groups stay as sampled."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from minimind.rl.data import PromptDataset, PromptRow
from minimind.rl.objective import LOSS_TYPES
from minimind.rl.options import GRPOOptions
from minimind.rl.rewards import REWARD_FUNCTIONS, register_reward
from minimind.rl.rollout import given_completions, thinking_prompt
from minimind.tasks import generate_tasks, task_to_rl_row
from minimind.tokenizer import MiniMindTokenizer
from minimind.train.core import Trainer
from minimind.train.stages.rl import GRPOStage
from minimind.train.stages.rl_guidance import reference_completion
from minimind.train.stages.rl_recipe import (
    build_context,
    pick_prompts,
    policy_logps,
    rl_step,
    rollout_and_score,
)
from minimind.train.stages.rl_rollout import dynamic_sampling
from tests.rl_fixtures import toy_config, toy_options, toy_workspace
from tests.test_rl_recipe import _canned_scored

pytestmark = pytest.mark.usefixtures("one_thread")


def _exact_digit(prompt: str, completion: str, *, gt: list[Any], **_: Any) -> float:
    """1 for a reply that is exactly the digit asked for: a fresh model never writes it."""
    return float(completion.strip() == str(gt[0]))


if "test_exact_digit" not in REWARD_FUNCTIONS:
    register_reward("test_exact_digit")(_exact_digit)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The toy task, its rows given their right reply as ``reference``."""
    ws = toy_workspace(tmp_path_factory.mktemp("rl_guidance"))
    rows = [json.loads(line) for line in ws["data"].read_text().splitlines()]
    guided = ws["root"] / "guided.jsonl"
    guided.write_text("".join(json.dumps(r | {"reference": r["gt"][0]}) + "\n" for r in rows))
    return ws | {"data": guided}


def _context(ws: dict[str, Path], out: Path, guidance: int, **cfg_kw: Any) -> Any:
    tok = MiniMindTokenizer.from_dir(ws["tok"])
    stage = GRPOStage(toy_options(num_generations=4, max_gen_len=3, reward="test_exact_digit:1", guidance=guidance))
    cfg = toy_config(ws, out, batch_size=4, learning_rate=5e-2, max_steps=3, **cfg_kw)
    ctx, _ = build_context(Trainer(stage, cfg, tok), stage, tok)
    return ctx


def test_the_reference_continues_the_prompt_with_or_without_its_reasoning(ws: dict[str, Path]) -> None:
    """After an open ``<think>`` the reference brings its reasoning and closes the block; after a closed
    block only the reply; both end with the stop token, which the reply text leaves out."""
    tok = MiniMindTokenizer.from_dir(ws["tok"])
    row = PromptRow([{"role": "user", "content": "say 3"}], None,
                    {"reference": {"content": "3", "reasoning_content": "digit 3"}})
    rng = random.Random(0)
    for opened, text in ((True, "digit 3\n</think>\n\n3"), (False, "3")):
        prompt_ids, _ = thinking_prompt(row.messages, tok, opened, 0.0, rng)
        found = reference_completion(tok, row, tok.decode(prompt_ids))
        assert found is not None and reference_completion(tok, row, tok.decode(prompt_ids), prompt_ids) == found
        ids, reply = found
        assert reply == text and tok.decode(ids) == text + tok.eos_token and ids[-1] == tok.eos_id
        # the prompt and the reference tokenize as the whole conversation does
        full = tok.apply_chat_template([*row.messages, {"role": "assistant", "content": "3",
                                        **({"reasoning_content": "digit 3"} if opened else {})}], tokenize=False)
        assert prompt_ids + ids == tok.encode(full[:full.rindex(tok.eos_token) + len(tok.eos_token)])
    cut = tok.decode(thinking_prompt(row.messages, tok, True, 0.0, rng)[0][3:])  # a left-truncated prompt
    assert reference_completion(tok, row, cut) is None


def test_groups_without_a_right_sample_get_the_reference_in_their_last_row(ws: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    """A fresh model never writes the bare digit: every group gets its reference, in its last row, with
    the reward the reference earns; the other rows are the samples drawn without guidance."""
    plain = _context(ws, tmp_path / "plain", 0)
    guided = _context(ws, tmp_path / "guided", 1)
    idx = pick_prompts(plain, 0)
    a, b = rollout_and_score(plain, 0, idx), rollout_and_score(guided, 0, idx)
    g = 4
    assert float(a.rewards.max()) == 0.0 and a.references is None  # nothing right: no signal without guidance
    assert b.references is not None and b.references.tolist() == [k % g == g - 1 for k in range(len(b.batch))]
    tok = guided.tokenizer
    for i, p in enumerate(idx):
        gt = guided.dataset.rows[p].columns["gt"][0]
        last = i * g + g - 1
        assert b.batch.texts[last] == gt and float(b.rewards[last]) == 1.0
        ids = b.batch.input_ids[last][b.batch.completion_mask[last].bool().roll(1)]
        assert tok.decode(ids.tolist()) == gt + tok.eos_token
        for k in range(i * g, last):  # the samples: as drawn without guidance
            assert b.batch.texts[k] == a.batch.texts[k] and float(b.rewards[k]) == 0.0
            n = int(a.batch.sequence_lengths[k])
            assert torch.equal(b.batch.input_ids[k, :n], a.batch.input_ids[k, :n])


def test_guidance_teaches_a_reply_that_sampling_never_finds(ws: dict[str, Path], tmp_path: Path) -> None:
    """Without guidance every group is all wrong: advantage 0, no step, the policy does not move. With
    it the references' log-likelihood rises within three steps (old code: no --guidance)."""
    def reference_logp(ctx: Any) -> float:
        """Mean token log-prob of the first 16 rows' references under the policy."""
        tok, rows = ctx.tokenizer, ctx.dataset.rows[:16]
        prompts = [thinking_prompt(r.messages, tok, False, 0.0, random.Random(0))[0] for r in rows]
        refs = [reference_completion(tok, r, tok.decode(p)) for r, p in zip(rows, prompts)]
        batch = given_completions(prompts, [ids for ids, _ in refs], [t for _, t in refs], range(16), tok.pad_id)
        logp = policy_logps(ctx.trainer.base_model, batch, 1.0, len(batch), ctx.trainer.device)
        return float(logp.sum() / batch.completion_mask.sum())

    results = {}
    for guidance in (0, 1):
        ctx = _context(ws, tmp_path / str(guidance), guidance)
        before = reference_logp(ctx)
        records = [rl_step(ctx, s) for s in range(3)]
        results[guidance] = (before, reference_logp(ctx), sum(r["optimizer_steps"] for r in records))
        if guidance:  # every group guided; the logged reward is the policy's samples' alone
            assert (records[0]["guided"], records[0]["reward"]) == (1.0, 0.0)
    (b0, a0, steps0), (b1, a1, steps1) = results[0], results[1]
    assert steps0 == 0 and a0 == pytest.approx(b0, abs=1e-6)
    assert steps1 == 3 and a1 > b1 + 1.0, (b1, a1)


def test_guidance_settings_and_data_are_checked_before_training(ws: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--guidance and --tis_cap"):
        GRPOOptions(guidance=1, tis_cap=2.0).validate()
    with pytest.raises(ValueError, match="needs group advantages"):
        GRPOOptions(guidance=1, loss_type="spo", num_generations=2).validate()
    bad = tmp_path / "bad.jsonl"
    good = {"conversations": [{"role": "user", "content": "say 1"}], "gt": ["1"]}
    bad.write_text(json.dumps(good) + "\n" + json.dumps(good | {"reference": {"text": "1"}}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: 'reference' must be"):
        PromptDataset.from_jsonl(bad)
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps(good) + "\n")
    tok = MiniMindTokenizer.from_dir(ws["tok"])
    stage = GRPOStage(toy_options(guidance=1, reward="test_exact_digit:1"))
    with pytest.raises(ValueError, match="no row of .* has a 'reference'"):
        stage.build_dataset(toy_config(ws, tmp_path, data_path=str(plain)), tok)


def test_task_rows_carry_their_thinking_reply_as_reference() -> None:
    tasks = generate_tasks(12, 0, kinds=["arithmetic", "tool_call"], level="easy")
    for t in tasks:
        ref = task_to_rl_row(t, reference=True).get("reference")
        if t.kind == "tool_call":
            assert ref is None  # the reply depends on the tool's result
        else:
            assert ref["content"] == t.answer and ref["reasoning_content"].endswith(t.gt[0])
        assert "reference" not in task_to_rl_row(t)


def test_dynamic_sampling_keeps_track_of_which_rows_are_references() -> None:
    """A guided group has rewards that differ, so DAPO keeps it; its reference row stays marked (the
    logged reward leaves it out) wherever the merged batch puts it."""
    ctx = SimpleNamespace(o=SimpleNamespace(num_generations=2, dynamic_sampling=1),
                          cfg=SimpleNamespace(batch_size=2), tokenizer=SimpleNamespace(pad_id=0),
                          obj=LOSS_TYPES["dapo"])
    first = _canned_scored(2, [0, 0, 0, 1])  # group 0 flat; group 1 guided (its last row a reference)
    first.references = torch.tensor([False, False, False, True])
    out = dynamic_sampling(ctx, first, lambda k: _canned_scored(2, [1, 0, 1, 1], 10))
    assert out.prompt_ids == [1, 1, 10, 10]
    assert out.references is not None and out.references.tolist() == [False, True, False, False]
    assert out.sampled.tolist() == [True, False, True, True]
