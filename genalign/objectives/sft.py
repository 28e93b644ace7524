"""Supervised fine-tuning on the flow-matching loss (docs/algorithms.md §13.3): the pretraining objective
``mean_e (v_theta(x_t, s) - (eps - x0))^2`` at the trained noise levels, on

- demonstrations from a data set (``data.train_file``: jsonl records with ``prompt`` and ``image``), or
- the epoch's own samples, optionally only the best ``sft.top_k`` of each prompt group by reward (reward-ranked
  fine-tuning / best-of-N distillation: maximum likelihood on the reward-filtered samples, Dong et al. 2023, "RAFT",
  arXiv 2304.06767). Drawn by the policy (``sft.sample_from: policy``) the selection compounds every epoch and
  narrows the distribution; drawn by the frozen base (``reference``) the fit is mass-covering towards one fixed
  target, the base's best-of-N distribution.

Optional KL ``train.kl_beta`` to the reference (velocity space by default).
"""

from __future__ import annotations

import contextlib
from typing import Dict

import torch

from ..losses import per_sample_mse
from .base import EpochBatch, register_objective
from .forward import ForwardProcessObjective, ForwardUnits


def top_k_mask(rewards: torch.Tensor, group_ids: torch.Tensor, k: int) -> torch.Tensor:
    """``[N]`` 1.0 for the ``k`` highest rewards of each group (ties: the earlier sample first), else 0.0."""
    keep = torch.zeros(len(rewards))
    for g in group_ids.unique():
        idx = (group_ids == g).nonzero().flatten()
        order = idx[torch.sort(rewards[idx], descending=True, stable=True).indices]
        keep[order[:k]] = 1.0
    return keep


@register_objective("sft")
class SFT(ForwardProcessObjective):
    """Flow-matching loss on demonstrations or on the best samples of each group (see the module docstring)."""

    name = "SFT"

    def sampling_context(self):
        """``sft.sample_from: reference``: the frozen base draws the epoch's samples."""
        return self.tr.reference() if self.cfg.sft.sample_from == "reference" else contextlib.nullcontext()

    def row_weights(self, batch: EpochBatch) -> torch.Tensor:
        k = self.cfg.sft.top_k
        if k is None or not len(batch.rewards):
            return torch.ones(len(batch.group_ids))
        return top_k_mask(batch.rewards, batch.group_ids, k)

    def prepare(self, epoch: int, batch: EpochBatch) -> ForwardUnits:
        u = super().prepare(epoch, batch)
        keep = u.weight[u.rows] > 0  # samples outside the top k are no units at all
        u.rows, u.steps, u.seeds, u.group = u.rows[keep], u.steps[keep], u.seeds[keep], u.group[keep]
        return u

    def stats(self, u: ForwardUnits) -> Dict[str, float]:
        return {"sft/kept_frac": u.weight_global.mean().item()}

    def unit_loss(self, u: ForwardUnits, ids: torch.Tensor, total):
        n = self.noised(u, ids)
        with self.tr.autocast():
            v = self.velocity(n)
        mse = per_sample_mse(v, n.target())
        loss = mse.sum() / total
        st = {"loss": loss.detach(), "sft/mse": mse.detach().sum() / total}
        with self.tr.autocast():
            return self.add_kl(loss, st, v, n, total), st


__all__ = ["SFT", "top_k_mask"]
