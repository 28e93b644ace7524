"""AWM, Advantage Weighted Matching (Xue et al. 2025, "Advantage Weighted Matching: Aligning RL with Pretraining in
Diffusion Models", arXiv 2509.25050; docs/algorithms.md §13.1).

The policy-gradient estimator of DDPO / Flow-GRPO is a denoising-score-matching loss on *noisy* data; AWM replaces it
by the pretraining flow-matching loss on the clean samples, weighted by their advantages. Each sample ``x0`` of the
epoch is noised afresh at the trained noise levels, and its matching log-likelihood surrogate is

    log p(x0 | s) ~ -w(s) mean_e (v_theta(x_t, s) - (eps - x0))^2,     w = 1 | s | s^2 (``awm.weighting``)

optimised with the PPO clipped surrogate ``max(-A r, -A clip(r, 1 - eps, 1 + eps))``, ``r = exp(logp - logp_old)``
(``train.clip_range`` / ``clip_range_high``; advantages clamped to ``train.advantage_clip``). ``logp_old`` is the
sampling policy's value at the same ``x_t``: computed once per epoch before the first optimizer step when the epoch
takes more than one optimizer step; with one step it equals the current value, so the ratio is exactly 1.
Optional KL ``train.kl_beta`` in velocity (default) or latent space. No likelihoods of the sampler: any sampler
(ODE by default), CFG-free training is the caller's choice (``model.guidance_scale``).
"""

from __future__ import annotations

import torch

from .. import losses
from .base import EpochBatch, register_objective
from .forward import AdvantageWeighted, ForwardUnits, Noised


def matching_log_likelihood(v: torch.Tensor, n: Noised, weighting: str = "uniform") -> torch.Tensor:
    """``-w(s) mean_e (v - (noise - x0))^2`` per unit ``[B]`` (AWM's log-likelihood surrogate)."""
    mse = losses.per_sample_mse(v, n.target())
    w = {"uniform": torch.ones_like(n.s), "t": n.s, "t2": n.s ** 2}[weighting]
    return -w * mse


@register_objective("awm")
class AWM(AdvantageWeighted):
    """Advantage Weighted Matching (see the module docstring)."""

    name = "AWM"


    def prepare(self, epoch: int, batch: EpochBatch) -> ForwardUnits:
        u = super().prepare(epoch, batch)
        t = self.cfg.train
        if t.num_minibatches * t.num_inner_epochs > 1:  # later steps need the sampling policy's values
            old = []
            with torch.no_grad(), self.tr.autocast():
                for s in range(0, len(u.rows), t.batch_size):
                    n = self.noised(u, torch.arange(s, min(s + t.batch_size, len(u.rows))))
                    old.append(matching_log_likelihood(self.velocity(n), n, self.cfg.awm.weighting).cpu())
            u.extra["old"] = torch.cat(old) if old else torch.zeros(0)
        return u


    def unit_loss(self, u: ForwardUnits, ids: torch.Tensor, total):
        tr, t = self.tr, self.cfg.train
        n = self.noised(u, ids)
        with tr.autocast():
            v = self.velocity(n)
        logp = matching_log_likelihood(v, n, self.cfg.awm.weighting)
        old = u.extra["old"][ids].to(tr.device) if "old" in u.extra else logp.detach()
        adv = u.weight[u.rows[ids]].to(tr.device)
        out = losses.ppo_clip(torch.exp(logp - old)[:, None], adv, t.clip_range, t.clip_range_high,
                              return_clipped=True)
        loss = out.loss.sum() / total
        ratio = torch.exp(logp.detach() - old)
        st = {"loss": loss.detach(), "ratio_mean": ratio.sum() / total,
              "clip_frac": out.clipped.float().sum() / total, "awm/neg_log_likelihood": -logp.detach().sum() / total}
        with tr.autocast():
            return self.add_kl(loss, st, v, n, total), st


__all__ = ["AWM", "matching_log_likelihood"]
