"""Reinforcement learning: the objective as small documented functions, and the rewards.

:mod:`minimind.rl.objective` -- policy term + advantage + KL term + aggregation, composed by
:func:`policy_loss` from an :class:`ObjectiveConfig` (:data:`LOSS_TYPES` holds the published ones).
:mod:`minimind.rl.rewards` -- rule-based rewards, their registry and weighted combination, and a
learned :class:`RewardModel`.
:mod:`minimind.rl.rollout` -- rollouts through an inference backend, laid out for training.
:mod:`minimind.rl.data`, :mod:`minimind.rl.critic`, :mod:`minimind.rl.options` -- prompt rows, PPO's
critic, the sub-commands' options. The driver that composes them is a recipe beside the supervised
loop, :mod:`minimind.train.stages.rl_recipe` (:func:`train_rl`, imported lazily: it pulls in the
training core).
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

_RECIPE_NAMES = ("RLResult", "rl_loss", "train_rl")


def __getattr__(name: str) -> Any:
    """``minimind.rl.train_rl`` etc. without importing the training core with the package."""
    if name == "PromptDataset":
        from minimind.rl.data import PromptDataset
        return PromptDataset
    if name in _RECIPE_NAMES:
        from minimind.train.stages import rl_recipe
        return getattr(rl_recipe, name)
    raise AttributeError(f"module 'minimind.rl' has no attribute {name!r}")
