"""Reinforcement learning: the objective as small documented functions, and the rewards.

:mod:`minimind.rl.objective` -- policy term + advantage + KL term + aggregation, composed by
:func:`policy_loss` from an :class:`ObjectiveConfig` (:data:`LOSS_TYPES` holds the published ones).
:mod:`minimind.rl.rewards` -- rule-based rewards, their registry and weighted combination, and a
learned :class:`RewardModel`.
:mod:`minimind.rl.trainer` -- the one RL driver (:func:`train_rl`) behind ``minimind grpo|spo|ppo|agent``
(imported lazily: it pulls in the training core).
"""

from typing import Any

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
from minimind.rl.rewards import (
    REWARD_FUNCTIONS,
    CombinedReward,
    RewardFunction,
    RewardModel,
    format_reward,
    get_reward,
    length_penalty,
    math_reward,
    register_reward,
    tool_format_reward,
)

__all__ = [
    "LOSS_TYPES",
    "REWARD_FUNCTIONS",
    "CombinedReward",
    "ObjectiveConfig",
    "PromptDataset",
    "RLResult",
    "RewardFunction",
    "RewardModel",
    "SPOBaseline",
    "aggregate",
    "batch_normalized_advantages",
    "cispo",
    "compute_advantages",
    "format_reward",
    "gae",
    "get_reward",
    "group_advantages",
    "gspo",
    "kl_penalty",
    "length_penalty",
    "mask_truncated",
    "math_reward",
    "policy_loss",
    "ppo_clip",
    "register_reward",
    "reinforce",
    "rl_loss",
    "tis_weight",
    "tool_format_reward",
    "train_rl",
]

_TRAINER_NAMES = ("PromptDataset", "RLResult", "rl_loss", "train_rl")


def __getattr__(name: str) -> Any:
    """``minimind.rl.train_rl`` etc. without importing the training core with the package."""
    if name in _TRAINER_NAMES:
        from minimind.rl import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module 'minimind.rl' has no attribute {name!r}")
