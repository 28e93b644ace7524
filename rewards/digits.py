"""Digit-classifier reward for the embedded digits model.

``DigitClassifier`` is a small CNN trained on scikit-learn's 8x8 digits
(``genalign.pipelines.digits_pretrain.pretrain``).
Its native input is ``[N, 1, 8, 8]`` in ``[-1, 1]``; :meth:`DigitClassifier.prepare` converts reward
inputs (``[N, 3, H, W]`` in ``[0, 1]``: channel mean, area-resize to 8x8 when needed, rescale).

The reward ``digit_correct`` is the classifier's probability of the digit the prompt asks for
(``genalign.pipelines.digits.prompt_digit``), in ``[0, 1]``.
"""

from __future__ import annotations

import functools
import json
import os
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

CLASSIFIER_CONFIG = "classifier.json"
CLASSIFIER_WEIGHTS = "classifier.safetensors"


class DigitClassifier(nn.Module):
    """conv32-conv64-pool-conv64-pool -> 256 -> ``feature_dim`` (penultimate) -> 10 logits."""

    def __init__(self, channels: Sequence[int] = (32, 64, 64), feature_dim: int = 128, size: int = 8):
        super().__init__()
        c1, c2, c3 = channels
        self.channels, self.feature_dim, self.size = tuple(channels), feature_dim, size
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(c3 * (size // 4) ** 2, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, 10)

    def config(self) -> dict:
        return {"channels": list(self.channels), "feature_dim": self.feature_dim, "size": self.size}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, 10]`` for native inputs ``[N, 1, 8, 8]`` in ``[-1, 1]``."""
        return self.head(self.body(x))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Reward images ``[N, C, H, W]`` in ``[0, 1]`` -> native input ``[N, 1, 8, 8]`` in ``[-1, 1]``."""
        if images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        x = images.float().mean(dim=1, keepdim=True)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="area")
        return x * 2 - 1

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, 10]`` for reward images ``[N, C, H, W]`` in ``[0, 1]``."""
        return self(self.prepare(images))

    @classmethod
    def from_pretrained(cls, path_or_name: Optional[str] = "digits", device=None) -> "DigitClassifier":
        """Load ``classifier.{json,safetensors}`` from an asset directory (``"digits"``: the installed one)."""
        from safetensors.torch import load_file

        from genalign.pipelines.digits import resolve_digits_dir

        path = resolve_digits_dir(path_or_name, required=(CLASSIFIER_CONFIG, CLASSIFIER_WEIGHTS))
        with open(os.path.join(path, CLASSIFIER_CONFIG)) as f:
            cfg = json.load(f)
        model = cls(**{k: cfg[k] for k in ("channels", "feature_dim", "size")})
        model.load_state_dict(load_file(os.path.join(path, CLASSIFIER_WEIGHTS)))
        return model.to(device or "cpu").eval().requires_grad_(False)

    def save_pretrained(self, path: str, extra: Optional[dict] = None) -> None:
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  os.path.join(path, CLASSIFIER_WEIGHTS))
        with open(os.path.join(path, CLASSIFIER_CONFIG), "w") as f:
            json.dump({**self.config(), **(extra or {})}, f, indent=1)


class DigitCorrectReward:
    """Reward = classifier probability of the prompted digit. ``model_dir``: ``"digits"`` or a path."""

    name = "digit_correct"

    SCORES = ("probability", "log_probability", "accuracy")

    def __init__(self, model_dir: str = "digits", device=None, score: str = "probability"):
        if score not in self.SCORES:
            raise ValueError(f"digit_correct option score must be one of {self.SCORES}, got {score!r}")
        self.classifier = DigitClassifier.from_pretrained(model_dir, device=device)
        self.score = score

    @property
    def device(self) -> torch.device:
        return next(self.classifier.parameters()).device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: List[str], metadata=None) -> torch.Tensor:
        """``images [N, 3, H, W]`` in ``[0, 1]`` -> ``{"score": [N], "probability": [N] of each prompt's digit,
        "accuracy": [N] 1.0 where the classifier's argmax is the prompted digit}``. The score (the reward) is the
        option ``score``: the probability (default), its log (clamped at log 1e-4) or the accuracy."""
        from genalign.pipelines.digits import prompt_digit

        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        target = torch.tensor([prompt_digit(p) for p in prompts], device=self.device)
        probs = self.classifier.classify(images.to(self.device)).softmax(-1)
        p = probs.gather(1, target[:, None])[:, 0]
        acc = (probs.argmax(-1) == target).float()
        score = {"probability": p, "log_probability": p.clamp_min(1e-4).log(), "accuracy": acc}[self.score]
        return {"score": score, "probability": p, "accuracy": acc}

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[N, feature_dim]`` (for Frechet distances)."""
        return self.classifier.body(self.classifier.prepare(images.to(self.device)))


@functools.lru_cache(maxsize=4)
def _default_reward(model_dir: str) -> DigitCorrectReward:
    return DigitCorrectReward(model_dir)


def digit_correct(images: torch.Tensor, prompts: List[str], metadata=None, model_dir: str = "digits") -> torch.Tensor:
    """Functional form of :class:`DigitCorrectReward` (the classifier is loaded once and cached)."""
    return _default_reward(model_dir)(images=images, prompts=prompts, metadata=metadata)
