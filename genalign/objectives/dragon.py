"""DRAGON preference objective (docs/algorithms.md §6): on-policy samples split into D+ / D- (per prompt
group, or by a set reward), trained with Diffusion-DPO on (D+, D-) pairs or Diffusion-KTO on labelled samples,
on the flow-matching loss at a shared noise and step against the reference (LoRA adapters disabled, or the
frozen copy). Labels, pairs and the denoising loss live in :mod:`genalign.dragon`.

Units are this process's pairs (``[P, 2]`` local rows) or labelled samples (``[U, 1]``); the loss of an
optimizer step is a mean over its GLOBAL unit count, so accumulation does not change it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

from .. import losses
from ..dragon import DEFAULT_BETA, _units, denoising_losses, split_labels
from ..methods import mix_seed
from .base import EpochBatch, ObjectiveBase, register_objective, require_flow_model


@dataclass
class DragonUnits:
    traj: object
    units: torch.Tensor
    labels: torch.Tensor
    local: torch.Tensor


@register_objective("dragon")
class Dragon(ObjectiveBase):
    """Diffusion-DPO / Diffusion-KTO on the D+ / D- split of each epoch."""

    def __init__(self, ctx):
        self.ctx = self.tr = ctx  # a TrainContext
        self.cfg = ctx.cfg
        require_flow_model(ctx.policy, getattr(ctx.cfg, "method", "dragon"))

    def prepare(self, epoch: int, batch: EpochBatch) -> DragonUnits:
        labels = split_labels(self.tr, batch.rewards, batch.group_ids, batch.traj)
        units = _units(labels, batch.group_ids, batch.rewards, batch.local, self.cfg.dragon.pairing == "paired")
        return DragonUnits(batch.traj, units, labels, batch.local)

    def stats(self, u: DragonUnits) -> Dict[str, float]:
        return {"dragon/units": float(len(u.units)), "dragon/pos_frac": (u.labels == 1).float().mean().item()}

    def minibatches(self, u: DragonUnits, epoch: int, inner: int) -> List[torch.Tensor]:
        gen = torch.Generator().manual_seed(mix_seed(self.cfg.seed, epoch, inner, 11))
        order = torch.randperm(len(u.units), generator=gen)
        self._epoch, self._inner = epoch, inner
        return list(torch.tensor_split(order, self.cfg.train.num_minibatches))

    def backwards(self, u: DragonUnits, rows: torch.Tensor):
        t, dev = self.cfg.train, self.tr.device
        total = self.tr.acc.reduce(torch.tensor(float(len(rows)), device=dev), "sum").clamp_min(1)
        fns = []
        for start in range(0, len(rows), t.batch_size):
            ids = rows[start:start + t.batch_size]
            seeds = [mix_seed(self.cfg.seed, self._epoch, self._inner, self.tr.rank, int(i)) for i in ids]
            fns.append(self._backward_fn(u, u.units[ids], total, seeds, 1.0))
        if not fns:  # no unit on this process: a zero-weighted pass keeps the processes' collectives matched
            fns.append(self._backward_fn(u, torch.zeros(1, 1 if self.cfg.dragon.pairing != "paired" else 2,
                                                        dtype=torch.long), total, [0], 0.0))
        return fns

    def _backward_fn(self, u: DragonUnits, micro, total, seeds, weight: float):
        def run(sync: bool) -> Dict[str, torch.Tensor]:
            loss, st = self.unit_loss(u, micro, total, seeds)
            self.tr.optim.backward(loss * weight if weight != 1.0 else loss, sync)
            return {k: v * weight for k, v in st.items()}
        return run

    def unit_loss(self, u: DragonUnits, micro: torch.Tensor, total, seeds):
        """Loss of a micro-batch of units over the global unit count. Each unit draws its noise and step from its
        own seed (``seeds``, one per unit: an int for all), so the micro-batch size does not change the loss;
        pair members share noise and step."""
        d, dev, tr = self.cfg.dragon, self.tr.device, self.tr
        beta = d.beta if d.beta is not None else DEFAULT_BETA[d.loss]
        rows = micro.T.flatten()  # winners then losers (paired) or the samples
        sub = u.traj.select(rows).to(dev)
        seeds = [seeds] * len(micro) if isinstance(seeds, int) else seeds
        noise, steps = [], []
        for seed in seeds:
            gen = torch.Generator(dev).manual_seed(seed)
            noise.append(torch.randn(sub.final.shape[1:], generator=gen, device=dev))
            steps.append(torch.randint(sub.num_steps, (1,), generator=gen, device=dev))
        noise = torch.stack(noise).repeat(micro.shape[1], *[1] * (sub.final.ndim - 1))
        j = torch.cat(steps).repeat(micro.shape[1])
        r = torch.arange(len(rows), device=dev)
        args = (sub.final, noise, sub.timesteps[r, j], sub.sigmas[r, j], sub.cond)
        with tr.autocast():
            with torch.no_grad(), tr.reference():
                ref = denoising_losses(tr.policy, *args)
            model = denoising_losses(tr.policy, *args)
        if d.loss == "dpo":  # units are (winner, loser) pairs
            p = len(micro)
            per_unit = losses.diffusion_dpo_loss(model[:p], model[p:], ref[:p], ref[p:], beta)
            margin = (model[:p] - model[p:]) - (ref[:p] - ref[p:])
            extra = {"dragon/implicit_acc": (margin < 0).float().sum().detach() / total}
        else:
            desirable = u.labels[u.local[rows.cpu()]] == 1
            per_unit, z = losses.diffusion_kto_loss(model, ref, desirable.to(dev), beta, reference=d.kto_reference,
                                                    return_reference=True)
            extra = {"dragon/kto_z": z.detach() * len(micro) / total}  # unit-weighted, like the loss
        loss = per_unit.sum() / total
        return loss, {"loss": loss.detach(), "dragon/model_mse": model.detach().sum() / total / micro.shape[1], **extra}

    def describe_failure(self) -> str:
        return "the DRAGON preference loss (flow-matching MSE of the policy or the reference)"


__all__ = ["Dragon", "DragonUnits"]
