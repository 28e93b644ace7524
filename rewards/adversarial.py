"""Adv-GRPO: a discriminator on frozen encoder tokens is the reward, trained between generator rounds
(ALGORITHMS.md section 6).

Encoder: DINOv2 (``encoder="dino"``, CLS + patch tokens) or the stand-in ``"digits"`` (the digit
classifier's penultimate features as "CLS", its last 4x4 conv map as 16 "patch tokens"); see
:mod:`genalign.rewards.distributional`. Head: ``Linear(D, 512) -> GELU -> Linear(512, 1)`` applied to
the CLS token and to every patch token (one shared head when their widths agree, as for DINO; the
stand-in's widths differ, 128 vs 64, so it gets a second head of the same shape for patches).

Token normalisation: tokens are L2-normalised, for training AND scoring alike (the anchor trains on raw
tokens but scores normalised ones; we pick one). Unit tokens keep the head's input scale fixed, so the
generator cannot move the reward by inflating feature norms, and lr 1e-4 behaves alike for any encoder.

Training (hinge; references positive, generations negative)::

    cls   = 0.5 * (mean relu(1 - h(c_ref)) + mean relu(1 + h(c_gen)))
    patch = the same over up to ``num_patches`` (64) random patch tokens per image
    L_D   = cls + patch_weight * patch          (patch_weight 0.3; Adam lr 1e-4, betas (0.5, 0.999))

Reward: ``(1 - patch_weight) * h(cls) + patch_weight * mean_j h(patch_j)`` over all patches
(0.7 / 0.3). The trainer runs :func:`discriminator_round` before each generator round and checkpoints
the head and its optimizer (:meth:`AdversarialReward.state_dict`).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .distributional import References, build_encoder, load_references

RULES = ("fixed", "while_behind")


def _head(dim: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))


class Discriminator(nn.Module):
    """``h`` on CLS tokens ``[N, D]`` and patch tokens ``[N, P, D']`` -> ``([N], [N, P])``."""

    def __init__(self, cls_dim: int, patch_dim: int, hidden: int = 512):
        super().__init__()
        self.cls_head = _head(cls_dim, hidden)
        self.patch_head = None if patch_dim == cls_dim else _head(patch_dim, hidden)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.cls_head(cls)[:, 0], (self.patch_head or self.cls_head)(patches)[..., 0]


def _hinge(h_ref: torch.Tensor, h_gen: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - h_ref).mean() + F.relu(1 + h_gen).mean())


class AdversarialReward:
    """The Adv-GRPO reward model. ``references``: real images (see ``load_references``); ``encoder``:
    ``"dino"`` / ``"digits"`` / an object with ``cls_and_patches``; ``encoder_options`` go to it.
    ``__call__`` -> ``[N]`` reward; :meth:`discriminator_step` trains the head on one generated batch."""

    name = "adversarial"
    batch_size = 64

    def __init__(self, references: References = None, encoder="dino", encoder_options: Optional[dict] = None,
                 hidden: int = 512, lr: float = 1e-4, betas: Sequence[float] = (0.5, 0.999), patch_weight: float = 0.3,
                 num_patches: int = 64, device=None, seed: int = 0):
        self.encoder = build_encoder(encoder, device=device, **dict(encoder_options or {}))
        if not hasattr(self.encoder, "cls_and_patches"):
            raise ValueError(f"the adversarial reward needs an encoder with CLS and patch tokens (dino, digits), "
                             f"got {type(self.encoder).__name__}")
        _, refs = load_references(references, self.encoder)
        if len(refs) < 2:
            raise ValueError(f"the adversarial reward needs at least 2 reference images, got {len(refs)}")
        self.device = self.encoder.device
        tokens = [self.tokens(refs[i:i + 64]) for i in range(0, len(refs), 64)]
        self.ref_cls, self.ref_patches = torch.cat([c for c, _ in tokens]), torch.cat([p for _, p in tokens])
        torch.manual_seed(seed)
        self.head = Discriminator(self.ref_cls.shape[-1], self.ref_patches.shape[-1], hidden).to(self.device)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=lr, betas=tuple(betas))
        self.patch_weight, self.num_patches = patch_weight, num_patches

    def tokens(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised ``(CLS [N, D], patches [N, P, D'])`` of images ``[N, 3, H, W]`` in [0, 1] (no grad)."""
        with torch.no_grad():
            cls, patches = self.encoder.cls_and_patches(images)
        return F.normalize(cls.float(), dim=-1), F.normalize(patches.float(), dim=-1)

    def score_tokens(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        h_cls, h_patch = self.head(cls, patches)
        return (1 - self.patch_weight) * h_cls + self.patch_weight * h_patch.mean(1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts=None, metadata=None) -> torch.Tensor:
        """Reward ``[N]``: ``0.7 h(cls) + 0.3 mean_j h(patch_j)``."""
        return self.score_tokens(*self.tokens(images)).float().cpu()

    def _reference_batch(self, n: int, generator: Optional[torch.Generator]):
        idx = torch.randint(len(self.ref_cls), (n,), generator=generator).to(self.ref_cls.device)
        return self.ref_cls[idx], self.ref_patches[idx]

    def _some_patches(self, patches: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        n, p = patches.shape[:2]
        keep = torch.rand(n, p, generator=generator).argsort(1)[:, :min(p, self.num_patches)].to(patches.device)
        return patches.gather(1, keep[..., None].expand(-1, -1, patches.shape[-1]))

    @torch.no_grad()
    def mean_scores(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> Tuple[float, float]:
        """``(mean reward of images, mean reward of as many random references)``."""
        return float(self.score_tokens(*self.tokens(images)).mean()), \
            float(self.score_tokens(*self._reference_batch(len(images), generator)).mean())

    def discriminator_step(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> Dict[str, float]:
        """One hinge step: a random reference batch (as large as ``images``) positive, ``images`` negative."""
        gen_cls, gen_patches = self.tokens(images)
        ref_cls, ref_patches = self._reference_batch(len(images), generator)
        self.head.train()
        h_ref, hp_ref = self.head(ref_cls, self._some_patches(ref_patches, generator))
        h_gen, hp_gen = self.head(gen_cls, self._some_patches(gen_patches, generator))
        loss = _hinge(h_ref, h_gen) + self.patch_weight * _hinge(hp_ref, hp_gen)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.head.eval()
        return {"disc/d_loss": loss.item(), "disc/h_ref": h_ref.mean().item(), "disc/h_gen": h_gen.mean().item()}

    def state_dict(self) -> dict:
        """Head weights and optimizer state (registered with accelerate: saved and resumed with the generator)."""
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])


def discriminator_round(adversary: AdversarialReward, sample: Callable[[int], torch.Tensor], steps: int,
                        rule: str = "fixed", seed: int = 0) -> Dict[str, float]:
    """Train the discriminator between generator rounds; ``sample(k)`` -> fresh generated images for step k.

    ``rule="fixed"``: ``steps`` steps. ``"while_behind"``: at most ``steps``, each only while the generated
    images still outscore the references (mean reward), the PickScore variant's rule.
    """
    if rule not in RULES:
        raise ValueError(f"adversarial rule must be one of {RULES}, got {rule!r}")
    gen = torch.Generator().manual_seed(seed)
    stats: Dict[str, float] = {}
    done = 0
    for k in range(steps):
        images = sample(k)
        if rule == "while_behind":
            r_gen, r_ref = adversary.mean_scores(images, gen)
            if r_ref > r_gen:
                break
        stats = adversary.discriminator_step(images, gen)
        done += 1
    return {**stats, "disc/d_steps": float(done)}


__all__ = ["AdversarialReward", "Discriminator", "RULES", "discriminator_round"]
