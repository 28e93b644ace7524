"""Compatibility module: the reward protocol now lives in the core, :mod:`genalign.reward_api`.

``genalign.rewards.base`` and ``genalign.rewards`` keep re-exporting its names.
"""

from genalign.reward_api import (RewardError, RewardFn, RewardSet, available_rewards, load_reward,  # noqa: F401
                                 load_script_function, register_reward, reward_factory, score_reward, validate_scores)

__all__ = ["RewardError", "RewardFn", "RewardSet", "available_rewards", "load_reward", "load_script_function",
           "register_reward", "reward_factory", "score_reward", "validate_scores"]
