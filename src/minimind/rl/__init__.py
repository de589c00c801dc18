"""Reinforcement learning: the objective as small documented functions, and the rewards.

:mod:`minimind.rl.objective` -- policy term + advantage + KL term + aggregation, composed by
:func:`policy_loss` from an :class:`ObjectiveConfig` (:data:`LOSS_TYPES` holds the published ones).
:mod:`minimind.rl.rewards` -- rule-based rewards, their registry and weighted combination, and a
learned :class:`RewardModel`.
"""

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
    "tis_weight",
    "tool_format_reward",
]
