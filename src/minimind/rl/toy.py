"""A toy RL task that checks an RL setup in seconds: the prompt says "say <d>" (d in 0..3).

The reward is 0.5 for a reply that starts with a digit and 0.5 more when it is the digit asked for.
A fresh small model almost never starts with a digit, so a rising mean reward is the objective
working, not luck.  Used by ``bench/rl_toy.py`` (the README's reward curve) and the RL tests.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from minimind.rl.rewards import REWARD_FUNCTIONS, register_reward

TOY_REWARD = "toy_digit"


def toy_digit_reward(prompt: str, completion: str, *, gt: list[Any], **_: Any) -> float:
    """0.5 for a reply starting with a digit, +0.5 when it is the digit the prompt asks for."""
    first = (completion or "").lstrip()[:1]
    return 0.5 * first.isdigit() + 0.5 * (first == str(gt[0]))


def register_toy_reward() -> str:
    """Make ``--reward toy_digit:1`` available (idempotent); returns the reward's name."""
    if TOY_REWARD not in REWARD_FUNCTIONS:
        register_reward(TOY_REWARD)(toy_digit_reward)
    return TOY_REWARD


def write_toy_task(root: Path, n_prompts: int = 400, seed: int = 0) -> tuple[Path, Path]:
    """A 300-token tokenizer and ``n_prompts`` RL rows under ``root``; returns (tokenizer dir, data file)."""
    from minimind.tokenizer import train_tokenizer
    root = Path(root)
    texts = [f"say {d} digit {d} number {d}" for d in range(10)] * 20 + ["hello world filler text"] * 10
    train_tokenizer(texts, root / "tok", vocab_size=300, show_progress=False)
    rng = random.Random(seed)
    rows = []
    for _ in range(n_prompts):
        d = rng.randint(0, 3)
        conv = [{"role": "user", "content": f"say {d}"}, {"role": "assistant", "content": ""}]
        rows.append(json.dumps({"conversations": conv, "gt": [str(d)]}) + "\n")
    data = root / "toy.jsonl"
    data.write_text("".join(rows), encoding="utf-8")
    return root / "tok", data
