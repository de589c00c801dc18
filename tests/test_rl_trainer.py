"""The RL driver (`minimind grpo|spo|ppo|agent`): learning on a toy task, the policy_loss path, the
SPO baseline in the resume state, and configuration errors before any training starts.

Toy task: the prompt says "say <d>"; the reward is 0.5 when the reply starts with a digit and 0.5 more
when it is the digit asked for.  A fresh 2-layer model almost never starts with a digit (~3% of its
vocabulary), so a rising mean reward is the objective working, not luck.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from minimind.cli import build_parser, build_stage, main
from minimind.rl.rewards import REWARD_FUNCTIONS, register_reward
from minimind.rl.toy import register_toy_reward, toy_digit_reward
from minimind.tokenizer import MiniMindTokenizer
from minimind.train import checkpoint as ckpt
from minimind.train.loop import TrainingInterrupted
from minimind.train.plots import plot_metrics
from minimind.train.stages.rl import GRPOStage, PPOOptions, PPOStage, SPOOptions, SPOStage
from tests.rl_fixtures import agent_options, agent_task, toy_config, toy_options, toy_workspace

pytestmark = pytest.mark.usefixtures("one_thread")

register_toy_reward()

if "toy_one" not in REWARD_FUNCTIONS:
    register_reward("toy_one")(lambda prompt, completion, **_: 1.0)  # a dense target for the critic


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return toy_workspace(tmp_path_factory.mktemp("rl_trainer"))


def _tok(ws: dict[str, Path]) -> MiniMindTokenizer:
    return MiniMindTokenizer.from_dir(ws["tok"])


def test_grpo_raises_the_toy_reward(ws: dict[str, Path], tmp_path: Path) -> None:
    stage = GRPOStage(toy_options(loss_type="grpo"))
    # 80 steps: the first ones are mostly all-zero groups, which no longer move the weights (lr 0)
    res = stage.run(toy_config(ws, tmp_path, max_steps=80, epochs=2), _tok(ws))
    assert res.steps == 80 and len(res.rewards) == 80
    k = 10
    first, last = sum(res.rewards[:k]) / k, sum(res.rewards[-k:]) / k
    png = plot_metrics([res.metrics_path], tmp_path / "grpo_toy_reward.png", keys=("reward", "entropy"),
                       title="GRPO on the toy digit task")
    print(f"reward curve: {png}  first {k} steps {first:.3f} -> last {k} steps {last:.3f}")
    assert last > first + 0.2, res.rewards
    # the loss went through policy_loss: its statistics are logged, and without beta no KL
    rec = res.records[-1]
    for key in ("clip_frac", "kl", "entropy", "approx_kl", "policy_loss", "adv_mean", "adv_std", "reward_std",
                "reward/toy_digit/mean", "reward/toy_digit/std", "completion_len", "truncated_rate",
                "rollout_tok_per_s", "sec_per_step", "grad_norm"):
        assert key in rec, key
    assert all(r["kl"] == 0.0 for r in res.records)
    assert stage.reference is None  # beta 0 loads no reference model
    assert res.weights_path.exists() and res.metrics_path.exists()


def test_beta_loads_a_reference_and_logs_kl(ws: dict[str, Path], tmp_path: Path) -> None:
    tok = _tok(ws)
    first = GRPOStage(toy_options(loss_type="grpo")).run(toy_config(ws, tmp_path / "a", max_steps=2), tok)
    stage = GRPOStage(toy_options(loss_type="dapo", beta=0.1, ppo_epochs=2, micro_batch_size=16,
                                  overlong_filter=0))  # a fresh model never stops in 2 tokens
    res = stage.run(toy_config(ws, tmp_path / "b", max_steps=3, from_weight=str(first.weights_path)), tok)
    assert stage.reference is not None
    assert all("kl_ref" in r and r["kl"] >= 0.0 for r in res.records)
    assert any(r["kl"] > 0 for r in res.records[1:])  # the policy moved away from the reference


def test_steps_without_advantage_leave_the_weights_alone(ws: dict[str, Path], tmp_path: Path) -> None:
    """Once every completion gets the same reward, each advantage is 0 and the gradient is zero: such
    steps must not move the weights along Adam's momentum from the steps before (they run at lr 0)."""
    calls = {"n": 0}

    def digit_then_flat(prompt: str, completion: str, *, gt: list[Any], **_: Any) -> float:
        calls["n"] += 1  # 3 steps x 64 completions of the toy reward, then a constant
        return toy_digit_reward(prompt, completion, gt=gt) if calls["n"] <= 3 * 64 else 1.0

    REWARD_FUNCTIONS.pop("digit_then_flat", None)
    register_reward("digit_then_flat")(digit_then_flat)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    stage = GRPOStage(toy_options(loss_type="grpo", reward="digit_then_flat:1"))
    cfg = toy_config(ws, tmp_path, max_steps=5, save_interval=3)
    res = stage.run(cfg, _tok(ws), on_step=lambda step, rec: snapshots.setdefault(step, load_file(
        Path(cfg.save_dir) / "grpo_32.safetensors")) if step == 3 else None)
    assert [r["skipped"] for r in res.records] == [0, 0, 0, 1, 1]
    assert any(r["grad_norm"] > 0 for r in res.records[:3])
    after = load_file(res.weights_path)
    assert all(torch.equal(snapshots[3][k], after[k]) for k in after)


def test_bf16_engine_copy_with_tis(ws: dict[str, Path], tmp_path: Path) -> None:
    """bf16: the engine samples from its own bf16 copy (refreshed after each step), and TIS reweights
    by the trainer's vs the engine's probabilities of the sampled tokens."""
    stage = GRPOStage(toy_options(loss_type="grpo", tis_cap=2.0))
    res = stage.run(toy_config(ws, tmp_path, max_steps=3, dtype="bfloat16"), _tok(ws))
    assert all(0.0 < r["tis_mean"] <= 2.0 for r in res.records)


@pytest.mark.parametrize("loss_type", ["dr_grpo", "bnpo", "gspo", "cispo"])
def test_every_group_objective_runs(ws: dict[str, Path], tmp_path: Path, loss_type: str) -> None:
    res = GRPOStage(toy_options(loss_type=loss_type, num_generations=4)).run(
        toy_config(ws, tmp_path, max_steps=2, batch_size=4), _tok(ws))
    assert res.steps == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in res.records)


@pytest.mark.parametrize("critic, key, weight", [("separate", "critic", "head.proj.weight"),
                                                 ("shared", "value_head", "proj.weight")])
def test_ppo_trains_a_critic_and_resumes_it(ws: dict[str, Path], tmp_path: Path, critic: str, key: str,
                                            weight: str) -> None:
    tok = _tok(ws)
    opts = toy_options(PPOOptions, loss_type="ppo", num_generations=1, beta=0.0, ppo_epochs=2,
                       reward="toy_digit:1,toy_one:1", critic=critic)
    stage = PPOStage(opts)
    res = stage.run(toy_config(ws, tmp_path, stage="ppo", max_steps=3), tok)
    assert {"value_loss", "value_mean", "clip_frac", "ratio_std", "approx_kl"} <= set(res.records[-1])
    head = stage.state_dict()[key]
    assert float(head[weight].abs().sum()) > 0  # the critic learned something
    state = ckpt.load_resume(res.resume_path)
    torch.testing.assert_close(state["stage"][key][weight], head[weight])
    assert res.records[-1]["optimizer_steps"] == 2  # mu = 2 passes, the second off-policy


def test_spo_baseline_round_trips_through_resume(ws: dict[str, Path], tmp_path: Path) -> None:
    tok = _tok(ws)
    cfg = toy_config(ws, tmp_path, stage="spo", max_steps=4, save_interval=1)
    stage = SPOStage(toy_options(SPOOptions, loss_type="spo", num_generations=1))

    def stop_after_3(step: int, rec: dict[str, Any]) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        stage.run(cfg, tok, on_step=stop_after_3)
    assert 8 < len(stage.baseline) <= 24  # 3 steps x 8 distinct prompts (prioritised draws may repeat)
    resume = tmp_path / "ckpt" / "spo_32_resume.pt"
    state = ckpt.load_resume(resume)
    assert state["step"] == 3 and state["stage"]["spo_baseline"]["alpha"] == stage.baseline.alpha
    fresh = SPOStage(toy_options(SPOOptions, loss_type="spo", num_generations=1))
    fresh.load_state_dict(state["stage"])
    assert fresh.baseline.alpha == stage.baseline.alpha and fresh.baseline.beta == stage.baseline.beta
    # the resumed run continues at step 4 from the saved baseline and extends it
    resumed = SPOStage(toy_options(SPOOptions, loss_type="spo", num_generations=1))
    out = resumed.run(dataclasses.replace(cfg, from_resume=1), tok)
    assert out.steps == 4 and [r["step"] for r in out.records] == [4]
    assert len(resumed.baseline) >= len(stage.baseline)


def _args(*argv: str) -> Any:
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("argv, message", [
    (["grpo", "--loss_type", "nope"], "--loss_type must be one of"),
    (["grpo", "--num_generations", "1"], "--num_generations must be >= 2"),
    (["grpo", "--steps_per_generation", "0"], "--steps_per_generation must be >= 1"),
    (["grpo", "--steps_per_generation", "99"], "--steps_per_generation 99 exceeds"),
    (["ppo", "--critic", "twin"], "--critic must be separate or shared"),
    (["grpo", "--reward", "nosuch:1"], "unknown reward 'nosuch'"),
    (["grpo", "--loss_type", "ppo"], "use `minimind ppo`"),
    (["ppo", "--loss_type", "grpo"], "`minimind ppo` trains --loss_type ppo"),
    (["spo", "--loss_type", "grpo"], "`minimind spo` trains --loss_type spo"),
    (["grpo", "--temperature", "0"], "--temperature must be > 0"),
])
def test_bad_configs_fail_before_training(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        build_stage(argv[0], _args(*argv, "--from_weight", "none") if "--from_weight" not in argv
                    else _args(*argv))


def test_missing_reference_weights_fail_fast(tmp_path: Path) -> None:
    with pytest.raises((ValueError, FileNotFoundError)):
        build_stage("grpo", _args("grpo", "--beta", "0.1", "--ref_weight", "full_sft", "--save_dir",
                                  str(tmp_path)))


def test_cli_runs_grpo_and_help_lists_the_flags(ws: dict[str, Path], tmp_path: Path, capsys) -> None:
    for name in ("grpo", "spo", "ppo", "agent"):
        with pytest.raises(SystemExit):
            main([name, "--help"])
        assert "--num_generations" in capsys.readouterr().out
    rc = main(["grpo", "--data_path", str(ws["data"]), "--tokenizer_path", str(ws["tok"]), "--save_dir",
               str(tmp_path / "out"), "--checkpoint_dir", str(tmp_path / "ckpt"), "--from_weight", "none",
               "--hidden_size", "32", "--num_hidden_layers", "2", "--preset", "tiny", "--device", "cpu",
               "--dtype", "float32", "--max_steps", "1", "--batch_size", "2", "--num_generations", "2",
               "--max_gen_len", "2", "--reward", "toy_digit:1", "--thinking_ratio", "0", "--progress", "0"])
    assert rc == 0 and "saved" in capsys.readouterr().out
    rc = main(["grpo", "--data_path", str(ws["data"]), "--tokenizer_path", str(ws["tok"]), "--from_weight",
               "none", "--reward", "task:1"])
    assert rc == 2 and "needs the column(s) ['kind']" in capsys.readouterr().err


def test_agent_runs_tool_episodes(tmp_path: Path) -> None:
    """Two tool-call tasks of the generator through the agent stage: rollouts, rewards, one step."""
    from minimind.train.stages.rl import AgentStage
    data, tok = agent_task(tmp_path)
    stage = AgentStage(agent_options())
    cfg = toy_config({"data": data, "tok": tmp_path / "tok"}, tmp_path, stage="agent", batch_size=2,
                     max_steps=1, max_seq_len=1900, vocab_size=tok.vocab_size)
    res = stage.run(cfg, tok)
    assert res.steps == 1 and {"turns", "tool_calls", "reward/task/mean"} <= set(res.records[0])
