"""Setup shared by the RL driver tests (test_rl_recipe, test_rl_trainer, test_rl_remote_driver).

The toy task's workspace, a tiny policy's training configuration (2 layers, width 32, CPU, fp32),
the toy options, and the agent stage's two tool-call tasks: one definition each, so that a test file
states only what it changes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from minimind.config import TrainConfig
from minimind.rl.options import AgentOptions, GRPOOptions
from minimind.rl.toy import write_toy_task
from minimind.tokenizer import MiniMindTokenizer


def toy_workspace(root: Path) -> dict[str, Path]:
    """The toy task (:func:`minimind.rl.toy.write_toy_task`) under ``root``: its folder, tokenizer
    folder and prompt file."""
    write_toy_task(root)
    return {"root": root, "tok": root / "tok", "data": root / "toy.jsonl"}


def toy_config(ws: dict[str, Path], out: Path, stage: str = "grpo", **kw: Any) -> TrainConfig:
    """A tiny policy trained from scratch on ``ws["data"]``, writing under ``out``; ``kw`` overrides."""
    base: dict[str, Any] = {
        "stage": stage, "save_weight": stage, "data_path": str(ws["data"]), "tokenizer_path": str(ws["tok"]),
        "save_dir": str(out / "out"), "checkpoint_dir": str(out / "ckpt"), "from_weight": "none",
        "preset": "tiny", "hidden_size": 32, "num_hidden_layers": 2, "max_seq_len": 64, "device": "cpu",
        "dtype": "float32", "seed": 0, "batch_size": 8, "learning_rate": 1e-2, "warmup_steps": 0,
        "min_lr_ratio": 1.0, "weight_decay": 0.0, "max_steps": 50, "log_interval": 1, "save_interval": 0,
        "progress": 0}
    base.update(kw)
    return TrainConfig(**base)


def toy_options(cls: type = GRPOOptions, **kw: Any) -> Any:
    """Options of ``cls`` for the toy task: groups of 8, 2 new tokens, the toy reward, no KL, no
    thinking; ``kw`` overrides."""
    base: dict[str, Any] = {"num_generations": 8, "beta": 0.0, "reward": "toy_digit:1", "max_gen_len": 2,
                            "temperature": 1.0, "thinking_ratio": 0.0}
    base.update(kw)
    return cls(**base)


def agent_task(root: Path) -> tuple[Path, MiniMindTokenizer]:
    """Two tool-call tasks of the generator as an agent prompt file under ``root``, and a small
    tokenizer for them (the test is skipped when the generator draws no tool tasks)."""
    from minimind.tasks import generate_tasks, task_to_rl_row
    from tests.scripted_model import small_tokenizer
    tasks = [t for t in generate_tasks(60, 3, split="train") if t.kind == "tool_call"][:2]
    if len(tasks) < 2:
        pytest.skip("the generator drew no tool tasks")
    data = root / "agent.jsonl"
    data.write_text("".join(json.dumps(task_to_rl_row(t) | {"tool_calls": t.tool_calls}) + "\n"
                            for t in tasks))
    return data, small_tokenizer(root / "tok", [], vocab_size=300)


def agent_options(**kw: Any) -> AgentOptions:
    """Agent options for :func:`agent_task`: groups of 2, two turns, the task and tool-format rewards."""
    base: dict[str, Any] = {"num_generations": 2, "max_gen_len": 4, "max_turns": 2, "max_total_len": 2048,
                            "reward": "task:1,tool_format:0.1", "thinking_ratio": 0.5}
    base.update(kw)
    return AgentOptions(**base)
