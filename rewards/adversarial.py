"""Adv-GRPO (arXiv 2511.20256): a discriminator on frozen encoder tokens is the reward, trained between
generator rounds.

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
(0.7 / 0.3). The trainer runs :func:`genalign.reward_api.discriminator_round` (re-exported here) before
each generator round and checkpoints
the head and its optimizer (:meth:`AdversarialReward.state_dict`).

References: one shared set (a directory, image paths or a tensor; each step draws its positives from all
of them) or PER PROMPT, as the released Adv-GRPO code has them: a mapping ``{prompt: images}`` or a
``.json`` file of that mapping (``{prompt: [file, ...]}``, files relative to ``reference_root``, default the
file's directory; the layout the released reference-generation script writes) or a ``.jsonl`` file of
``{"prompt": ..., "images": [...]}`` lines. Then the positive paired with a generated image is a reference
of ITS prompt (drawn at random among them), so :meth:`AdversarialReward.discriminator_step` needs the
generated images' prompts (``sample(k)`` of :func:`discriminator_round` returns ``(images, prompts)``).
A prompt's references are encoded when first needed and kept. The head stays unconditional (a
prompt-free reward), as released.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from genalign.optim import OptimizerStep
from genalign.reward_api import ADVERSARIAL_RULES as RULES, TrainableReward, discriminator_round  # noqa: F401

from .distributional import build_encoder, load_references

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


PromptReferences = Dict[str, Union[str, Sequence[str], torch.Tensor]]


def prompt_references(references, root: Optional[str] = None) -> Optional[PromptReferences]:
    """Per-prompt references ``{prompt: images}`` from a mapping or a ``.json`` / ``.jsonl`` file (see the
    module docstring), or None when ``references`` is one shared set. Relative file names are joined to
    ``root`` (default: the json file's directory; a mapping's names are used as given without ``root``)."""
    if isinstance(references, str) and references.lower().endswith((".json", ".jsonl")) and not os.path.isdir(references):
        if not os.path.isfile(references):
            raise ValueError(f"per-prompt reference file {references!r} does not exist")
        with open(references, encoding="utf-8") as fh:
            if references.lower().endswith(".json"):
                mapping = json.load(fh)
                if not isinstance(mapping, dict):
                    raise ValueError(f"{references!r} must hold a JSON object {{prompt: [image file, ...]}}")
            else:
                mapping = {}
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    row = json.loads(line)
                    images = row.get("images", row.get("image")) if isinstance(row, dict) else None
                    if images is None or "prompt" not in row:
                        raise ValueError(f"{references!r} line {n}: need keys 'prompt' and 'images' (or 'image')")
                    mapping.setdefault(row["prompt"], []).extend([images] if isinstance(images, str) else images)
        root = os.path.dirname(os.path.abspath(references)) if root is None else root
    elif isinstance(references, dict):
        mapping = references
    else:
        return None
    if not mapping:
        raise ValueError("the per-prompt reference mapping is empty")
    out: PromptReferences = {}
    for prompt, images in mapping.items():
        if isinstance(images, torch.Tensor):
            out[str(prompt)] = images
            continue
        names = [images] if isinstance(images, str) else list(images)
        if not names or not all(isinstance(x, str) for x in names):
            raise ValueError(f"references of prompt {prompt!r} must be image paths, a directory or a tensor, got {images!r}")
        paths = [x if root is None or os.path.isabs(x) else os.path.join(root, x) for x in names]
        missing = [x for x in paths if not os.path.exists(x)]
        if missing:
            raise ValueError(f"reference image(s) of prompt {prompt!r} not found: {missing[:3]}")
        out[str(prompt)] = paths[0] if len(paths) == 1 and os.path.isdir(paths[0]) else paths
    return out


class AdversarialReward(TrainableReward):
    """The Adv-GRPO reward model. ``references``: real images, one shared set (see ``load_references``) or
    per prompt (see :func:`prompt_references`; ``reference_root`` resolves their relative file names);
    ``encoder``: ``"dino"`` / ``"digits"`` / an object with ``cls_and_patches``; ``encoder_options`` go to it.
    ``__call__`` -> ``[N]`` reward; :meth:`discriminator_step` trains the head on one generated batch."""

    name = "adversarial"
    batch_size = 64

    def __init__(self, references=None, encoder="dino", encoder_options: Optional[dict] = None,
                 hidden: int = 512, lr: float = 1e-4, betas: Sequence[float] = (0.5, 0.999), patch_weight: float = 0.3,
                 num_patches: int = 64, device=None, seed: int = 0, reference_root: Optional[str] = None):
        self.encoder = build_encoder(encoder, device=device, **dict(encoder_options or {}))
        if not hasattr(self.encoder, "cls_and_patches"):
            raise ValueError(f"the adversarial reward needs an encoder with CLS and patch tokens (dino, digits), "
                             f"got {type(self.encoder).__name__}")
        self.device = self.encoder.device
        self.per_prompt = prompt_references(references, reference_root)
        self._prompt_tokens: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        if self.per_prompt is None:
            self.ref_cls, self.ref_patches = self._encode_references(references, "the reference set", 2)
        else:  # the head's widths from the first prompt's references (the others are encoded when first needed)
            self.ref_cls, self.ref_patches = self._prompt_refs(next(iter(self.per_prompt)))
        torch.manual_seed(seed)
        self.head = Discriminator(self.ref_cls.shape[-1], self.ref_patches.shape[-1], hidden).to(self.device)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=lr, betas=tuple(betas))
        self.update = OptimizerStep(None, self.head, self.optimizer, max_grad_norm=0.0, distributed=False)
        self.patch_weight, self.num_patches = patch_weight, num_patches

    def _encode_references(self, references, what: str, min_count: int) -> Tuple[torch.Tensor, torch.Tensor]:
        modality, refs = load_references(references, self.encoder)
        if modality != "image" or len(refs) < min_count:
            raise ValueError(f"the adversarial reward needs at least {min_count} reference image(s) in {what}, "
                             f"got {len(refs)} {modality}(s)")
        tokens = [self.tokens(refs[i:i + 64]) for i in range(0, len(refs), 64)]
        return torch.cat([c for c, _ in tokens]), torch.cat([p for _, p in tokens])

    def _prompt_refs(self, prompt: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``(CLS [m, D], patches [m, P, D'])`` of ``prompt``'s references (encoded once)."""
        if prompt not in self._prompt_tokens:
            if prompt not in self.per_prompt:
                raise KeyError(f"no reference images for prompt {prompt!r} (the per-prompt references cover "
                               f"{len(self.per_prompt)} prompts; every training prompt needs some)")
            self._prompt_tokens[prompt] = self._encode_references(self.per_prompt[prompt], f"prompt {prompt!r}", 1)
        return self._prompt_tokens[prompt]

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

    def _reference_batch(self, n: int, generator: Optional[torch.Generator], prompts: Optional[Sequence[str]] = None):
        """``n`` random references: from the shared set, or per prompt one of ``prompts[i]``'s references."""
        if self.per_prompt is None:
            idx = torch.randint(len(self.ref_cls), (n,), generator=generator).to(self.ref_cls.device)
            return self.ref_cls[idx], self.ref_patches[idx]
        if prompts is None or len(prompts) != n:
            raise ValueError("per-prompt references need the prompt of every generated image: sample(k) of "
                             "discriminator_round must return (images, prompts)")
        draws = torch.rand(n, generator=generator).tolist()
        picked = []
        for prompt, u in zip(prompts, draws):
            cls, patches = self._prompt_refs(prompt)
            j = min(int(u * len(cls)), len(cls) - 1)
            picked.append((cls[j], patches[j]))
        return torch.stack([c for c, _ in picked]), torch.stack([p for _, p in picked])

    def _some_patches(self, patches: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        n, p = patches.shape[:2]
        keep = torch.rand(n, p, generator=generator).argsort(1)[:, :min(p, self.num_patches)].to(patches.device)
        return patches.gather(1, keep[..., None].expand(-1, -1, patches.shape[-1]))

    @torch.no_grad()
    def mean_scores(self, images: torch.Tensor, generator: Optional[torch.Generator] = None,
                    prompts: Optional[Sequence[str]] = None) -> Tuple[float, float]:
        """``(mean reward of images, mean reward of as many random references)`` (per-prompt references:
        of the images' ``prompts``)."""
        return float(self.score_tokens(*self.tokens(images)).mean()), \
            float(self.score_tokens(*self._reference_batch(len(images), generator, prompts)).mean())

    def discriminator_step(self, images: torch.Tensor, generator: Optional[torch.Generator] = None,
                           prompts: Optional[Sequence[str]] = None) -> Dict[str, float]:
        """One hinge step: a random reference batch (as large as ``images``; per-prompt references: one of
        ``prompts[i]``'s references for image i) positive, ``images`` negative."""
        gen_cls, gen_patches = self.tokens(images)
        ref_cls, ref_patches = self._reference_batch(len(images), generator, prompts)
        self.head.train()
        h_ref, hp_ref = self.head(ref_cls, self._some_patches(ref_patches, generator))
        h_gen, hp_gen = self.head(gen_cls, self._some_patches(gen_patches, generator))
        loss = _hinge(h_ref, h_gen) + self.patch_weight * _hinge(hp_ref, hp_gen)
        self.update.zero_grad()
        self.update.backward(loss)
        self.update.step(" in the Adv-GRPO discriminator step: ")
        self.head.eval()
        return {"disc/d_loss": loss.item(), "disc/h_ref": h_ref.mean().item(), "disc/h_gen": h_gen.mean().item()}

    def state_dict(self) -> dict:
        """Head weights and optimizer state (registered with accelerate: saved and resumed with the generator)."""
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])


__all__ = ["AdversarialReward", "Discriminator", "RULES", "discriminator_round", "prompt_references"]
