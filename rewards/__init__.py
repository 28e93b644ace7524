"""Rewards (installed as ``genalign.rewards``): the built-in reward implementations, a plugin of the core.

The reward protocol (registry, ``RewardSet``, ``RewardError``, validation, script loading) is the core's
:mod:`genalign.reward_api`, re-exported here for compatibility. The built-ins are declared as
``genalign.rewards`` entry points in pyproject.toml; their factories are in :mod:`genalign.rewards.builtins`.

Built-in reward models import their heavy dependencies lazily, inside their factories, and load weights
by hub id or local path (offline, an uncached id raises ``ModelNotAvailableError`` saying what to fetch).
A factory's keyword options (``reward_options: {name: {...}}`` in a config) are those of the class it
builds, documented there; model rewards also take ``device``, ``batch_size`` and ``dtype``.
"""

from genalign.reward_api import (RewardError, RewardSet, available_rewards, load_reward,  # noqa: F401
                                 load_script_function, register_reward, reward_factory, score_reward, validate_scores)

__all__ = ["RewardError", "RewardSet", "available_rewards", "load_reward", "load_script_function",
           "register_reward", "reward_factory", "score_reward", "validate_scores"]
