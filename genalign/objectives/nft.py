"""DiffusionNFT (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process",
arXiv 2509.16117; docs/algorithms.md §11): policy optimisation on the forward (noising) process.

Samples are drawn by the "old" policy (any sampler; the method's default is the deterministic ODE) and scored;
group advantages ``A`` become optimality weights ``r = clip(A / c / 2 + 1/2, 0, 1)`` (``c = train.advantage_clip``).
Each sample is noised afresh at the trained noise levels, ``x_t = (1 - t) x0 + t eps``, and the trained velocity
``v`` defines two implicit policies around the old one ``v_old``:

    v+ = beta v + (1 - beta) v_old          v- = (1 + beta) v_old - beta v

The loss pulls v+ towards the flow-matching target on good samples and v- on bad ones:
``c / beta * [r ||x0(v+) - x0||^2 / w+ + (1 - r) ||x0(v-) - x0||^2 / w-]`` with ``x0(v) = x_t - t v`` and the
adaptive weights ``w`` = the stop-gradient mean absolute x0 error of each sample (``nft.adaptive_weight``; off:
the plain velocity MSE). Minimising it moves ``v`` along ``r``-weighted directions, so the policy improves
without likelihoods, CFG or a particular sampler. Optional ``train.kl_beta * ||v - v_ref||^2`` (velocity space).

After each epoch the old policy follows: ``old = d old + (1 - d) theta`` with
``d = min(nft.old_decay_rate * (steps - nft.old_decay_delay), nft.old_decay_max)``.

Units are (sample, trained step) pairs; each draws its noise from its own seed (epoch, global sample index,
step), so neither accumulation nor the process count changes the loss, which is a mean over the GLOBAL unit
count of the optimizer step.
"""

from __future__ import annotations

from typing import Dict

import torch

from ..advantages import configured_advantages
from .base import EpochBatch, register_objective
from .forward import ForwardProcessObjective, ForwardUnits


def optimality(adv: torch.Tensor, clip: float, mode: str = "linear", rewards=None) -> torch.Tensor:
    """Optimality weights in [0, 1]: 'linear' ``clip(A / clip / 2 + 0.5, 0, 1)``, 'binary' ``(sign(A) + 1) / 2``
    (``A``: advantages), 'reward' ``clip(R / (2 mean R), 0, 1)`` (``R``: rewards in [0, 1], e.g. a probability or
    an accuracy; the batch mean of r is 1/2 so the implicit policies' fixed point is the r-weighted old policy,
    docs/algorithms.md §11.1)."""
    if mode == "binary":
        return (torch.sign(adv) + 1) / 2
    if mode == "reward":
        if rewards is None or bool((rewards < 0).any()) or bool((rewards > 1).any()):
            raise ValueError("nft.optimality = 'reward' needs rewards in [0, 1] (a probability or an accuracy)")
        return (rewards / (2 * rewards.mean().clamp_min(1e-12))).clamp(0, 1)
    return (adv.clamp(-clip, clip) / clip / 2 + 0.5).clamp(0, 1)


def nft_loss(v: torch.Tensor, v_old: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
             r: torch.Tensor, beta: float, clip: float, adaptive: bool = True) -> torch.Tensor:
    """Per-sample DiffusionNFT loss ``[B]`` (see the module docstring). ``v``, ``v_old``, ``x_t``, ``x0``:
    ``[B, ...]``; ``t``, ``r``: ``[B]``."""
    tt = t.view(-1, *[1] * (x0.ndim - 1)).to(v.dtype)
    v_old = v_old.detach()
    pos = beta * v + (1 - beta) * v_old
    neg = (1 + beta) * v_old - beta * v
    dims = tuple(range(1, x0.ndim))

    def err(vel: torch.Tensor) -> torch.Tensor:
        if not adaptive:  # plain flow-matching MSE against the target velocity (x_t - x0) / t
            return (tt * vel - (x_t - x0)).pow(2).mean(dims) / tt.flatten().pow(2)
        x0_hat = x_t - tt * vel
        w = (x0_hat.detach().double() - x0.double()).abs().mean(dims).clamp_min(1e-5).to(vel.dtype)
        return (x0_hat - x0).pow(2).mean(dims) / w

    return clip * (r * err(pos) + (1 - r) * err(neg)) / beta


@register_objective("nft")
class DiffusionNFT(ForwardProcessObjective):
    """DiffusionNFT on the trainer's samples (see the module docstring)."""

    name = "DiffusionNFT"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.old = self.copy_of_weights()  # the old (sampling) policy
        self.decay = 0.0

    # ------------------------------------------------------------------ protocol
    def sampling_context(self):
        return self.old.swapped_in()

    def row_weights(self, batch: EpochBatch) -> torch.Tensor:
        """The optimality weight r of every sample."""
        adv = configured_advantages(self.cfg.train, batch.rewards, batch.group_ids)
        return optimality(adv, self.cfg.train.advantage_clip, self.cfg.nft.optimality, batch.rewards)

    def stats(self, u: ForwardUnits) -> Dict[str, float]:
        return {"nft/r_mean": u.weight_global.mean().item(), "nft/r_std": u.weight_global.std().item(),
                "nft/old_decay": self.decay}

    def unit_loss(self, u: ForwardUnits, ids: torch.Tensor, total):
        """Loss of units ``ids`` over the global unit count, and its statistics."""
        tr, t = self.tr, self.cfg.train
        n = self.noised(u, ids)
        with tr.autocast():
            with torch.no_grad(), self.old.swapped_in():
                v_old = self.velocity(n)
            v = self.velocity(n)
        per = nft_loss(v, v_old, n.x_t, n.x0, n.s, u.weight[u.rows[ids]].to(tr.device), self.cfg.nft.beta,
                       t.advantage_clip, self.cfg.nft.adaptive_weight)
        loss = per.sum() / total
        st = {"loss": loss.detach(), "nft/old_deviation": (v - v_old).detach().pow(2).mean() * len(ids) / total}
        with tr.autocast():
            return self.add_kl(loss, st, v, n, total), st

    def after_epoch(self, global_step: int) -> None:
        n = self.cfg.nft
        self.decay = min(max(global_step - n.old_decay_delay, 0) * n.old_decay_rate, n.old_decay_max)
        self.old.blend(self.decay)


__all__ = ["DiffusionNFT", "nft_loss", "optimality"]
