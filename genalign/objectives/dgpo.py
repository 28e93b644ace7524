"""DGPO, Direct Group Preference Optimization (Luo et al. 2025, "Reinforcing Diffusion Models by Direct Group
Preference Optimization", arXiv 2510.08425; docs/algorithms.md §13.2).

A DPO over whole prompt groups instead of pairs. At a trained noise level ``s`` shared by the group, with one noise
``eps`` shared by the group (``noise_key``), each member i has the flow-matching losses ``L_i`` (policy) and
``L_ref,i`` (reference: LoRA adapters disabled, or the frozen copy) at ``x_t = (1 - s) x0_i + s eps``, and the
group's preference margin is

    m_g = (beta / G) sum_{i in g} A_i (L_i - L_ref,i)        (A: group advantages, G: group size)

The loss of the group is ``-(G / beta) log sigmoid(-m_g)``: members with positive advantages are pulled below the
reference's loss, negative ones pushed above it, each in proportion to |A_i| and to how much the group as a whole
still disagrees with the preference (``sigmoid(m_g)``). Its gradient per member is ``sigmoid(m_g) A_i grad L_i``;
the trainer back-propagates exactly that (``sigmoid(m_g)`` from a no-grad pass over the optimizer step, summed over
processes), so a group's members may sit in different micro-batches and processes. An optimizer step holds whole
(group, step) sets. Optional KL ``train.kl_beta`` (velocity space by default).

Trust region (``dgpo.clip``, on by default as released): an "old" policy, an EMA of the trained weights
(``old = d old + (1 - d) theta`` after every optimizer step, ``d = min(old_decay_rate * steps, old_decay_max)``),
gives each unit a likelihood ratio ``exp(L_old - L)``; a unit whose ratio has already moved past
``1 + train.clip_range_high`` (A > 0) or ``1 - train.clip_range`` (A < 0) contributes no gradient. After
``dgpo.sample_with_old_after`` optimizer steps the old policy draws the samples. ``dgpo.reference: old`` measures
the margins against that old policy instead of the frozen base (a moving reference).
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

from ..losses import per_sample_mse
from ..methods import mix_seed
from .base import register_objective
from .forward import AdvantageWeighted, ForwardUnits


def group_margins(adv: torch.Tensor, loss: torch.Tensor, ref_loss: torch.Tensor, keys: torch.Tensor,
                  num_keys: int, beta: float, group_size: int) -> torch.Tensor:
    """``[num_keys]`` partial margins ``beta / G sum_i A_i (L_i - L_ref,i)`` of the units' (group, step) ``keys``."""
    out = torch.zeros(num_keys, dtype=torch.float64, device=loss.device)
    return out.index_add_(0, keys, (adv * (loss - ref_loss)).double() * beta / group_size)


def dgpo_group_loss(margins: torch.Tensor, beta: float, group_size: int) -> torch.Tensor:
    """``(G / beta) softplus(m)`` = ``-(G / beta) log sigmoid(-m)`` per group."""
    return F.softplus(margins) * group_size / beta


@register_objective("dgpo")
class DGPO(AdvantageWeighted):
    """Direct Group Preference Optimization (see the module docstring)."""

    name = "DGPO"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.old = self.copy_of_weights() if self.cfg.dgpo.clip else None  # the old policy
        self.steps = 0  # optimizer steps taken (the old policy's decay and the sampling switch)

    def sampling_context(self):
        after = self.cfg.dgpo.sample_with_old_after
        if self.old is not None and after is not None and self.steps > after:
            return self.old.swapped_in()
        return contextlib.nullcontext()

    def after_step(self) -> None:
        self.steps += 1
        if self.old is not None:
            d = self.cfg.dgpo
            self.old.blend(min(d.old_decay_rate * self.steps, d.old_decay_max))

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"steps": torch.tensor(self.steps), **super().state_dict()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.steps = int(state["steps"])
        super().load_state_dict(state)

    def old_loss(self, n):
        """The old policy's matching loss per unit (None without ``dgpo.clip``). Computed before the policy's
        forward: swapping the old weights in writes the live parameters."""
        if self.old is None:
            return None
        with torch.no_grad(), self.old.swapped_in(), self.tr.autocast():
            return per_sample_mse(self.velocity(n), n.target())

    def trust_region(self, mse: torch.Tensor, old, adv: torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: units past the trust region (no gradient; ``dgpo.clip``), from the old loss ``old``."""
        if old is None:
            return torch.zeros_like(adv, dtype=torch.bool)
        t = self.cfg.train
        ratio = torch.exp(old - mse.detach())
        high = t.clip_range if t.clip_range_high is None else t.clip_range_high
        return torch.where(adv > 0, ratio > 1 + high, ratio < 1 - t.clip_range)


    def noise_key(self, epoch: int, sample: int, group: int, step: int) -> Tuple[int, ...]:
        return (epoch, -1, group, step)  # one noise per (group, step): members compared at the same x_t noise

    def _keys(self, u: ForwardUnits) -> torch.Tensor:
        return u.group * self.cfg.sampling.num_steps + u.steps

    @property
    def num_keys(self) -> int:
        return self.cfg.sampling.groups_per_epoch * self.cfg.sampling.num_steps

    def minibatches(self, u: ForwardUnits, epoch: int, inner: int) -> List[torch.Tensor]:
        """Whole (group, step) sets per optimizer step: the keys are split identically on every process."""
        gen = torch.Generator().manual_seed(mix_seed(self.cfg.seed, epoch, inner, 31))
        order = torch.randperm(self.num_keys, generator=gen)
        rank_of_key = torch.empty(self.num_keys, dtype=torch.long)
        for i, part in enumerate(torch.tensor_split(order, self.cfg.train.num_minibatches)):
            rank_of_key[part] = i
        keys = self._keys(u)
        return [(rank_of_key[keys] == i).nonzero().flatten() for i in range(self.cfg.train.num_minibatches)]

    def before_step(self, u: ForwardUnits, ids: torch.Tensor) -> None:
        """The margins of this step's (group, step) sets from a no-grad pass, summed over processes."""
        t, tr = self.cfg.train, self.tr
        margins = torch.zeros(self.num_keys, dtype=torch.float64, device=tr.device)
        with torch.no_grad(), tr.autocast():
            for s in range(0, len(ids), t.batch_size):
                sub = ids[s:s + t.batch_size]
                n = self.noised(u, sub)
                loss = per_sample_mse(self.velocity(n), n.target())
                ref = self.old_loss(n) if self.cfg.dgpo.reference == "old" else \
                    per_sample_mse(self.reference_velocity(n), n.target())
                margins += group_margins(u.weight[u.rows[sub]].to(tr.device), loss, ref, self._keys(u)[sub].to(tr.device),
                                         self.num_keys, self.cfg.dgpo.beta, self.cfg.sampling.group_size)
        self.margins = tr.acc.reduce(margins, "sum") if tr.world > 1 else margins
        present = torch.zeros(self.num_keys, device=tr.device)
        present[self._keys(u)[ids].to(tr.device)] = 1
        present = tr.acc.reduce(present, "sum") if tr.world > 1 else present
        self._step_group_loss = dgpo_group_loss(self.margins[present > 0], self.cfg.dgpo.beta,
                                                self.cfg.sampling.group_size).float()

    def unit_loss(self, u: ForwardUnits, ids: torch.Tensor, total):
        tr = self.tr
        n = self.noised(u, ids)
        old = self.old_loss(n)
        with tr.autocast():
            v = self.velocity(n)
        mse = per_sample_mse(v, n.target())
        weight = torch.sigmoid(self.margins[self._keys(u)[ids].to(tr.device)]).float()
        adv = u.weight[u.rows[ids]].to(tr.device)
        clipped = self.trust_region(mse, old, adv)
        # gradient sigmoid(m_g) A_i grad L_i: that of the group loss (G / beta) softplus(m_g), per unit
        loss = (weight * adv * torch.where(clipped, mse.detach(), mse)).sum() / total
        share = len(ids) / total
        st = {"loss": self._step_group_loss.mean() * share, "dgpo/surrogate": loss.detach(),
              "dgpo/sigmoid_margin": weight.sum() / total, "dgpo/mse": mse.detach().sum() / total,
              "clip_frac": clipped.float().sum() / total}
        with tr.autocast():
            return self.add_kl(loss, st, v, n, total), st



__all__ = ["DGPO", "dgpo_group_loss", "group_margins"]
