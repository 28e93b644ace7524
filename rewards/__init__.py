"""Rewards (installed as ``genalign.rewards``): protocol, registry, script loading, built-ins.

Built-in reward models import their heavy dependencies lazily, inside their factories.
"""

from .base import (RewardError, RewardSet, available_rewards, load_reward, load_script_function,
                   register_reward, validate_scores)


@register_reward("digit_correct")
def _digit_correct(model_dir: str = "digits", device=None):
    """Probability, under the shipped digit classifier, of the digit the prompt asks for."""
    from .digits import DigitCorrectReward

    return DigitCorrectReward(model_dir=model_dir, device=device)


__all__ = ["RewardError", "RewardSet", "available_rewards", "load_reward", "load_script_function",
           "register_reward", "validate_scores"]
