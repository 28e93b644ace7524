"""Reference-data anchor (docs/algorithms.md §13.6): the flow-matching loss on captioned reference images, added to
every optimizer step of any method.

Reward optimisation with a reverse-KL regulariser is mode-seeking: accuracy is bought with within-prompt variety and
realism (README, "Aligning without collapse"). A maximum-likelihood term on real data pulls the other way, towards
covering the reference distribution. This is the "pretraining mix" of RLHF (PPO-ptx: Ouyang et al. 2022, "Training
language models to follow instructions with human feedback", arXiv 2203.02155, §3.5) and, for text-to-image models,
the pre-training loss kept beside the reward-weighted one by Lee et al. 2023 ("Aligning Text-to-Image Models using
Human Feedback", arXiv 2302.12192).

``data.anchor_file`` holds demonstrations (jsonl records ``prompt`` and ``image``, read as ``data.train_file`` is, see
:mod:`genalign.datasets`). Each epoch ``data.anchor_per_epoch`` records are drawn from a fresh permutation; each
record is trained at every trained noise level of the sampler's schedule (a *unit*, noised from its own seed as in
:mod:`genalign.objectives.forward`), and the epoch's units are split over its optimizer steps. An optimizer step adds

    data.anchor_coef * mean over its units of mean_e (v_theta(x_s, s) - (eps - x0))^2

(a mean over the GLOBAL unit count of the step) to the method's loss, through the same backward passes and the same
optimizer step (no second loop). The anchor is not regularised to the reference policy (``train.kl_beta`` belongs
to the method's own loss).
"""

from __future__ import annotations

from typing import Dict

import torch

from ..losses import per_sample_mse
from .base import require_flow_model
from .forward import ForwardProcessObjective, ForwardUnits


class DataAnchor(ForwardProcessObjective):
    """The anchor's units and backward passes (see the module docstring); built by the trainer when
    ``data.anchor_file`` is set, with the :class:`genalign.datasets.ImageDataset` of that file."""

    seed_tag = minibatch_tag = 47
    name = "data anchor (data.anchor_file)"

    def __init__(self, ctx, dataset):
        self.ctx = self.tr = ctx
        self.cfg = ctx.cfg
        require_flow_model(ctx.policy, ctx.cfg.method, "data.anchor_file")
        self.dataset = dataset
        self.coef = float(ctx.cfg.data.anchor_coef)

    def unit_loss(self, u: ForwardUnits, ids: torch.Tensor, total):
        n = self.noised(u, ids)
        with self.tr.autocast():
            v = self.velocity(n)
        mse = per_sample_mse(v, n.target()).sum() / total
        loss = self.coef * mse
        return loss, {"loss": loss.detach(), "anchor/mse": mse.detach()}

    def stats(self, u: ForwardUnits) -> Dict[str, float]:
        return {"anchor/units": float(len(u.rows))}


__all__ = ["DataAnchor"]
