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
record is trained at several noise levels (a *unit* each, noised from its own seed as in
:mod:`genalign.objectives.forward`), and the epoch's units are split over its optimizer steps. An optimizer step adds

    data.anchor_coef * mean over its units of mean_e (v_theta(x_s, s) - (eps - x0))^2

(a mean over the GLOBAL unit count of the step) to the method's loss, through the same backward passes and the same
optimizer step (no second loop). The anchor is not regularised to the reference policy (``train.kl_beta`` belongs
to the method's own loss).

Noise levels (``data.anchor_levels``): ``schedule`` trains at the trained levels ``sigmas[j]`` of the sampler's
schedule (with 10 steps and ``train.timestep_fraction`` 0.99: 1.0, 0.9, ..., 0.2), as the forward-process
objectives do. ``continuous`` (default) trains where pretraining did: a record's ``k`` units (``data.anchor_units``,
default one per trained step) are stratified over the whole schedule, unit ``r`` at position ``p = (r + f) T / k``
with ``f ~ U(0, 1)`` from the unit's seed, ``s`` the schedule's sigma interpolated linearly at ``p`` (so ``s`` covers
``(0, sigma_0]``, uniform for an unshifted schedule, the schedule's density for a shifted one) and the timestep
``s * timesteps[0] / sigmas[0]`` (every flow adapter's timesteps are proportional to its sigmas). Evaluation with
more ODE steps than training, and the last steps below the last trained level that no policy-gradient step trains,
then query levels the anchor has fitted. Fewer units per record make an epoch cheaper (the anchor's units can cost
more than the method's own). ``data.anchor_shift`` moves the continuous levels towards high noise by SD3's time
shift ``shift * s / (1 + (shift - 1) * s)`` (Esser et al. 2024, arXiv 2403.03206 §5.3.2): the levels where the drawn
class is decided get more of the units, the low-noise texture levels fewer.
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
        self.continuous = ctx.cfg.data.anchor_levels == "continuous"
        self.shift = float(ctx.cfg.data.anchor_shift)

    def micro_batch(self) -> int:
        """``data.anchor_batch_size``, else ``train.batch_size``."""
        return self.cfg.data.anchor_batch_size or self.cfg.train.batch_size

    def units_per_record(self) -> int:
        """``data.anchor_units``, else one per trained step of the sampler."""
        from ..methods import nft_steps

        return self.cfg.data.anchor_units or len(nft_steps(self.cfg))

    def train_steps(self, batch) -> torch.Tensor:
        if not self.continuous:
            return super().train_steps(batch)
        return torch.arange(self.units_per_record()).expand(len(batch.local), -1)

    def levels(self, sub, js: torch.Tensor, seeds: torch.Tensor):
        if not self.continuous:
            return super().levels(sub, js, seeds)
        from ..methods import mix_seed

        k = self.units_per_record()  # unit j is the record's j-th of k (j = 0..k-1)
        T = sub.timesteps.shape[1]
        f = torch.tensor([torch.rand(1, generator=torch.Generator().manual_seed(mix_seed(int(x), 1))).item()
                          for x in seeds], device=js.device)
        p = ((js.float() + f) * T / k).clamp(max=T - 1e-4)
        lo = p.floor().long()
        r = torch.arange(len(js), device=js.device)
        s = torch.lerp(sub.sigmas[r, lo].float(), sub.sigmas[r, lo + 1].float(), p - lo)
        if self.shift != 1.0:
            s = self.shift * s / (1 + (self.shift - 1) * s)
        return s, s * (sub.timesteps[:, 0] / sub.sigmas[:, 0]).to(s.dtype)

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
