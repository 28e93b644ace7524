"""Reward-hacking diagnostics: watch the independent judge beside the reward during training.

A reward that rises while realism falls (the independent Frechet distance grows) or while the samples of a prompt
become alike (within-prompt diversity drops) is being hacked: the model found what the reward cannot see. The
:class:`HackingMonitor` compares every evaluation with the FIRST one of the run (the base model, epoch 0):

* ``hacking/fd_rise``: ``fd / fd_base - 1`` of ``eval/fd_independent``;
* ``hacking/diversity_drop``: ``1 - div / div_base`` of ``eval/diversity_ratio`` (or ``eval/diversity`` when the
  judge has no real per-prompt reference);
* ``hacking/flag``: 1 when the evaluation reward is above the base's AND the rise or the drop passes its threshold
  (``eval.max_fd_rise``, ``eval.max_diversity_drop``; a threshold of 0 or less switches that check off).

``eval.on_hacking`` says what a flag does: ``warn`` (a warning naming the metric, its value and the threshold),
``stop`` (the warning, then training ends after this epoch, exporting the best weights as usual), ``ignore``.
``eval.keep_best``: the weights of the evaluation with the highest ``eval/reward`` among the UNFLAGGED ones are
kept in ``<output_dir>/best`` (``best/lora`` or ``best/denoiser.safetensors`` and ``best/best.json`` with the
epoch and its metrics), so a run that degrades late still leaves a usable checkpoint.

Only metrics are read: the monitor works with any judge that logs ``eval/fd_independent`` and a diversity key
(the digits adapter's pixel-PCA judge; :class:`genalign.judge.EncoderJudge` for real models).
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional

FD_KEY = "eval/fd_independent"
DIVERSITY_KEYS = ("eval/diversity_ratio", "eval/diversity")
REWARD_KEY = "eval/reward"
ACTIONS = ("warn", "stop", "ignore")


class RewardHackingWarning(UserWarning):
    """The reward rose while the independent judge saw realism or diversity degrade past a threshold."""


class HackingMonitor:
    """Compare each evaluation's judge metrics with the first evaluation's (see the module docstring).

    max_fd_rise: relative rise of ``eval/fd_independent`` over the base that flags hacking (0.10 = +10%).
    max_diversity_drop: relative drop of the diversity metric below the base that flags hacking (0.10 = -10%).
    action: ``warn`` | ``stop`` | ``ignore``.
    """

    def __init__(self, max_fd_rise: float = 0.10, max_diversity_drop: float = 0.10, action: str = "warn"):
        if action not in ACTIONS:
            raise ValueError(f"eval.on_hacking must be one of {ACTIONS}, got {action!r}")
        self.max_fd_rise, self.max_diversity_drop, self.action = max_fd_rise, max_diversity_drop, action
        self.base: Optional[Dict[str, float]] = None
        self.best: Optional[Dict[str, float]] = None  # {"epoch", "reward", ...metrics} of the best unflagged eval
        self.stop_requested = False
        self.flagged = False  # the last evaluation was flagged (a streak of flagged evaluations warns once)

    @staticmethod
    def _diversity_key(metrics: Dict[str, float]) -> Optional[str]:
        return next((k for k in DIVERSITY_KEYS if k in metrics), None)

    def update(self, epoch: int, metrics: Dict[str, float]) -> Dict[str, float]:
        """Record one evaluation's ``metrics`` (``eval/*``); returns the ``hacking/*`` values to log (empty when
        the judge logged nothing to compare). The first evaluation becomes the base."""
        if REWARD_KEY not in metrics:
            return {}
        if self.base is None:
            self.base = {k: float(v) for k, v in metrics.items() if k.startswith("eval/")}
        out: Dict[str, float] = {}
        reasons: List[str] = []
        if FD_KEY in metrics and self.base.get(FD_KEY, 0) > 0:
            rise = metrics[FD_KEY] / self.base[FD_KEY] - 1
            out["hacking/fd_rise"] = rise
            if self.max_fd_rise > 0 and rise > self.max_fd_rise:
                reasons.append(f"{FD_KEY} {metrics[FD_KEY]:.4g} is {rise:+.1%} over the base's "
                               f"{self.base[FD_KEY]:.4g} (eval.max_fd_rise = {self.max_fd_rise:+.0%})")
        key = self._diversity_key(metrics)
        if key is not None and self.base.get(key, 0) > 0:
            drop = 1 - metrics[key] / self.base[key]
            out["hacking/diversity_drop"] = drop
            if self.max_diversity_drop > 0 and drop > self.max_diversity_drop:
                reasons.append(f"{key} {metrics[key]:.4g} is {drop:.1%} below the base's {self.base[key]:.4g} "
                               f"(eval.max_diversity_drop = {self.max_diversity_drop:.0%})")
        reward_up = metrics[REWARD_KEY] > self.base[REWARD_KEY]
        flagged = bool(reasons) and reward_up
        if out:
            out["hacking/flag"] = float(flagged)
        if flagged and self.action != "ignore" and (self.action == "stop" or not self.flagged):
            what = "; ".join(reasons)
            tail = " Training stops (eval.on_hacking = stop)." if self.action == "stop" else \
                (" (eval.on_hacking = warn: the following flagged evaluations are logged as hacking/flag without a new "
                 "warning until one passes; 'stop' ends the run, 'ignore' silences this.)")
            warnings.warn(f"possible reward hacking at epoch {epoch}: eval/reward rose {self.base[REWARD_KEY]:.4g} "
                          f"-> {metrics[REWARD_KEY]:.4g} while {what}.{tail}", RewardHackingWarning, stacklevel=2)
            self.stop_requested = self.action == "stop"
        self.flagged = flagged
        out["hacking/is_best"] = float(self._is_new_best(epoch, metrics, flagged))
        return out

    def _is_new_best(self, epoch: int, metrics: Dict[str, float], flagged: bool) -> bool:
        reward = float(metrics[REWARD_KEY])
        if flagged or math.isnan(reward) or (self.best is not None and reward <= self.best["reward"]):
            return False
        self.best = {"epoch": epoch, "reward": reward, **{k: float(v) for k, v in metrics.items()
                                                         if k.startswith("eval/")}}
        return True

    def state_dict(self) -> dict:
        return {"base": self.base, "best": self.best, "flagged": self.flagged}

    def load_state_dict(self, state: Optional[dict]) -> None:
        state = state or {}
        self.base, self.best, self.flagged = state.get("base"), state.get("best"), bool(state.get("flagged", False))


__all__ = ["HackingMonitor", "RewardHackingWarning", "ACTIONS", "FD_KEY", "DIVERSITY_KEYS"]
