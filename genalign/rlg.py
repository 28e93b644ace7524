"""Inference-time alignment strength (RLG, docs/algorithms.md §8).

Like classifier-free guidance, but between the base model and its fine-tuned LoRA::

    v = v_base + w * (v_tuned - v_base)

w = 0 is the base model, w = 1 the tuned one, w > 1 extrapolates along the alignment direction (roughly a
smaller KL coefficient, without retraining) and 0 < w < 1 interpolates. ``v_base`` is the same network
with its adapters disabled, so one loaded model serves both terms.
"""

from __future__ import annotations

import math

import torch

from .lora import adapters_disabled, has_lora
from .policy import Cond


class RLGPolicy:
    """A :class:`genalign.policy.Policy` whose :meth:`predict` mixes base and tuned predictions.

    ``policy`` must carry an active LoRA adapter (the tuned model). Every other attribute (``kind``,
    ``encode``, ``schedule``, ``decode``, ...) is the wrapped policy's. The end points are exact: at
    w = 0 :meth:`predict` returns the base prediction itself and at w = 1 the tuned prediction itself
    (bit for bit, one forward each), so sampling at w = 0 / 1 reproduces base / tuned images exactly.
    """

    def __init__(self, policy, weight: float):
        if not math.isfinite(float(weight)):
            raise ValueError(f"RLG weight must be a finite number, got {weight!r}")
        if not has_lora(policy.denoiser()):
            raise ValueError("RLG needs a fine-tuned LoRA loaded into the policy (v_tuned); none is loaded")
        self.policy = policy
        self.weight = float(weight)

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def predict_base(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The base model's prediction (adapters disabled)."""
        with adapters_disabled(self.policy.denoiser()):
            return self.policy.predict(latents, timesteps, cond)

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        """``v_base + w (v_tuned - v_base)``; w = 0 / 1 return ``v_base`` / ``v_tuned`` unchanged."""
        if self.weight == 0.0:
            return self.predict_base(latents, timesteps, cond)
        v_tuned = self.policy.predict(latents, timesteps, cond)
        if self.weight == 1.0:
            return v_tuned
        v_base = self.predict_base(latents, timesteps, cond)
        return v_base + self.weight * (v_tuned - v_base)
