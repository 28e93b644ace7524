"""Shared machinery of the forward-process ("decoupled") objectives: DiffusionNFT, AWM, DGPO and SFT.

These objectives never use the sampler's log-probs. Each clean sample ``x0`` (a rollout's final latents, or a
data set's encoded images) is noised afresh at trained noise levels of the sampler's schedule,
``x_t = (1 - s) x0 + s eps``, and the velocity the policy predicts there is compared with the flow-matching target
``eps - x0``. A *unit* is one (sample, trained step) pair; its noise is drawn from its own seed, so neither the
micro-batch size, gradient accumulation nor the process count changes the loss, which is a mean over the GLOBAL
unit count of the optimizer step.

A subclass supplies :meth:`ForwardProcessObjective.row_weights` (one number per sample of the epoch: an
advantage, an optimality weight, 1) and :meth:`ForwardProcessObjective.unit_loss`; it may override
:meth:`ForwardProcessObjective.noise_key` (DGPO shares the noise within a prompt group) and
:meth:`ForwardProcessObjective.before_step` (a no-grad pass over the whole optimizer step, e.g. DGPO's group
margins).

KL to the reference (``train.kl_beta``) is measured at the same ``x_t`` in velocity space
(``train.kl_space: v``, ``mean (v - v_ref)^2``) or on the predicted clean sample (``x``,
``mean (s (v - v_ref))^2 = mean (x0_hat - x0_hat_ref)^2``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from ..methods import mix_seed
from .base import EpochBatch, ObjectiveBase, require_flow_model


@dataclass
class ForwardUnits:
    """This process's samples and their units: ``rows [U]`` (local rows of ``traj``), ``steps [U]`` (trained
    schedule index j) and ``seeds [U]``; ``weight [n]`` one number per local row and ``weight_global [N]`` per
    sample of the epoch; ``extra``: per-unit tensors an objective adds (e.g. AWM's old log-likelihoods)."""

    traj: object
    rows: torch.Tensor
    steps: torch.Tensor
    seeds: torch.Tensor
    weight: torch.Tensor
    weight_global: torch.Tensor
    group: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    extra: Dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Noised:
    """One micro-batch of units at their noise: ``sub`` (the rows' samples on the device), clean ``x0``, ``noise``,
    ``x_t``, noise levels ``s [B]`` and model ``timesteps [B]``."""

    sub: object
    x0: torch.Tensor
    noise: torch.Tensor
    x_t: torch.Tensor
    s: torch.Tensor
    timesteps: torch.Tensor

    def target(self) -> torch.Tensor:
        """The flow-matching target velocity ``noise - x0``."""
        return self.noise - self.x0

    def expand(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(-1, *[1] * (self.x0.ndim - 1)).to(self.x0.dtype)


class ForwardProcessObjective(ObjectiveBase):
    """Base of the forward-process objectives (see the module docstring)."""

    seed_tag = 23
    """Namespace of the units' noise seeds."""
    name = "forward-process objective"

    def __init__(self, ctx):
        self.ctx = self.tr = ctx
        self.cfg = ctx.cfg
        require_flow_model(ctx.policy, getattr(ctx.cfg, "method", self.name))

    # ------------------------------------------------------------------ subclass hooks
    def row_weights(self, batch: EpochBatch) -> torch.Tensor:
        """One weight per sample of the epoch ``[N]`` (global order), identical on every process."""
        return torch.ones(len(batch.group_ids))

    def noise_key(self, epoch: int, sample: int, group: int, step: int) -> Tuple[int, ...]:
        """Seed parts of the noise of global ``sample`` (of prompt ``group``) at schedule step ``step``."""
        return (epoch, sample, step)

    def before_step(self, u: ForwardUnits, ids: torch.Tensor) -> None:
        """Called once per optimizer step on every process, before its backward passes."""

    def unit_loss(self, u: ForwardUnits, ids: torch.Tensor, total) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Loss of units ``ids`` summed and divided by the GLOBAL unit count ``total``, and its statistics."""
        raise NotImplementedError

    # ------------------------------------------------------------------ protocol
    def train_steps(self, batch: EpochBatch) -> torch.Tensor:
        """``[n, k]`` trained schedule indices of the local rows (the epoch plan's, all steps of
        :func:`genalign.methods.nft_steps` for data sets)."""
        local = batch.local.clamp_min(0)
        if batch.plan is not None:
            return batch.plan.train_steps[local]
        from ..methods import nft_steps

        return nft_steps(self.cfg).expand(len(local), -1)

    def prepare(self, epoch: int, batch: EpochBatch) -> ForwardUnits:
        weight_global = self.row_weights(batch)
        local = batch.local
        keep = (local >= 0).nonzero().flatten()  # padding rows train nothing
        steps = self.train_steps(batch)
        k = steps.shape[1]
        rows = keep.repeat_interleave(k)
        js = steps[keep].flatten()
        glob = local[rows]
        groups = batch.group_ids[glob]
        seeds = torch.tensor([mix_seed(self.cfg.seed, *self.noise_key(epoch, int(i), int(g), int(j)), self.seed_tag)
                              for i, g, j in zip(glob, groups, js)], dtype=torch.long)
        return ForwardUnits(batch.traj, rows, js, seeds, weight_global[local.clamp_min(0)], weight_global, groups)

    minibatch_tag = 29
    """Namespace of the units' order per (epoch, inner epoch)."""

    def minibatches(self, u: ForwardUnits, epoch: int, inner: int, count: Optional[int] = None) -> List[torch.Tensor]:
        """This process's units in a fresh order, split into ``count`` optimizer steps (default
        ``train.num_minibatches``)."""
        gen = torch.Generator().manual_seed(mix_seed(self.cfg.seed, epoch, inner, self.tr.rank, self.minibatch_tag))
        return list(torch.tensor_split(torch.randperm(len(u.rows), generator=gen),
                                       count or self.cfg.train.num_minibatches))

    def micro_batch(self) -> int:
        """Units per backward pass (``train.batch_size``)."""
        return self.cfg.train.batch_size

    def backwards(self, u: ForwardUnits, ids: torch.Tensor):
        dev = self.tr.device
        total = self.tr.acc.reduce(torch.tensor(float(len(ids)), device=dev), "sum").clamp_min(1)
        self.before_step(u, ids)
        size = self.micro_batch()
        fns = [self._backward_fn(u, ids[s:s + size], total, 1.0) for s in range(0, len(ids), size)]
        if not fns:  # no unit on this process: a zero-weighted pass keeps the processes' collectives matched
            fns.append(self._backward_fn(u, torch.zeros(1, dtype=torch.long), total, 0.0))
        return fns

    def _backward_fn(self, u: ForwardUnits, ids: torch.Tensor, total, weight: float):
        def run(sync: bool) -> Dict[str, torch.Tensor]:
            loss, st = self.unit_loss(u, ids, total)
            self.tr.optim.backward(loss * weight if weight != 1.0 else loss, sync)
            return {k: v * weight for k, v in st.items()}
        return run

    # ------------------------------------------------------------------ shared pieces
    old = None
    """An "old" policy (DiffusionNFT, DGPO): an :class:`genalign.ema.EMA` copy of the trainable weights, or None."""

    def copy_of_weights(self):
        """A copy of the trainable weights (the start of an old policy)."""
        from ..ema import EMA

        return EMA([p for p in self.tr.policy.denoiser().parameters() if p.requires_grad], 0.0, 1)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The old policy's weights (checkpointed so that a resumed run continues exactly)."""
        return {} if self.old is None else {f"old.{i}": s for i, s in enumerate(self.old.shadow)}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        if self.old is not None:
            self.old.load_state_dict({"shadow": [state[f"old.{i}"] for i in range(len(self.old.shadow))],
                                      "num_updates": 0})

    def noised(self, u: ForwardUnits, ids: torch.Tensor) -> Noised:
        """The units ``ids`` at their noise (each unit's noise from its own seed, drawn on the CPU)."""
        dev = self.tr.device
        rows, js = u.rows[ids], u.steps[ids]
        sub = u.traj.select(rows).to(dev)
        x0 = sub.final.float()
        noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(int(s)))
                             for s in u.seeds[ids]]).to(dev)
        s, timesteps = self.levels(sub, js.to(dev), u.seeds[ids])
        sb = s.view(-1, *[1] * (x0.ndim - 1))
        return Noised(sub, x0, noise, (1 - sb) * x0 + sb * noise, s, timesteps)

    def levels(self, sub, js: torch.Tensor, seeds: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Noise levels ``s [B]`` and model timesteps ``[B]`` of units at schedule steps ``js`` of the rows ``sub``:
        the schedule's own ``sigmas[j]`` / ``timesteps[j]``."""
        r = torch.arange(len(js), device=js.device)
        return sub.sigmas[r, js].float(), sub.timesteps[r, js]

    def velocity(self, n: Noised) -> torch.Tensor:
        """The policy's velocity at ``n.x_t`` (float32, with gradient when enabled)."""
        return self.tr.policy.predict(n.x_t, n.timesteps, n.sub.cond).float()

    def reference_velocity(self, n: Noised) -> torch.Tensor:
        with torch.no_grad(), self.tr.reference():
            return self.velocity(n)

    def kl_term(self, v: torch.Tensor, n: Noised) -> Optional[torch.Tensor]:
        """Per-unit KL surrogate to the reference (``train.kl_space``) or None when ``train.kl_beta`` is 0."""
        if self.cfg.train.kl_beta <= 0:
            return None
        diff = v - self.reference_velocity(n)
        if (self.cfg.train.kl_space or "v") == "x":
            diff = n.expand(n.s) * diff
        return diff.pow(2).flatten(1).mean(1)

    def add_kl(self, loss: torch.Tensor, st: Dict[str, torch.Tensor], v: torch.Tensor, n: Noised, total):
        """``loss + train.kl_beta * sum(KL) / total`` (and the ``kl`` statistic)."""
        kl = self.kl_term(v, n)
        if kl is None:
            return loss
        st["kl"] = kl.detach().sum() / total
        return loss + self.cfg.train.kl_beta * kl.sum() / total

    def describe_failure(self) -> str:
        return f"the {self.name} loss (velocity of the policy or of the reference)"


class AdvantageWeighted(ForwardProcessObjective):
    """A forward-process objective whose per-sample weight is the clamped group advantage (AWM, DGPO)."""

    def row_weights(self, batch: EpochBatch) -> torch.Tensor:
        from ..advantages import configured_advantages

        t = self.cfg.train
        return configured_advantages(t, batch.rewards, batch.group_ids).clamp(-t.advantage_clip, t.advantage_clip)

    def stats(self, u: ForwardUnits) -> Dict[str, float]:
        return {"adv/mean": u.weight_global.mean().item(), "adv/std": u.weight_global.std().item(),
                "adv/abs_mean": u.weight_global.abs().mean().item()}


__all__ = ["AdvantageWeighted", "ForwardProcessObjective", "ForwardUnits", "Noised"]
