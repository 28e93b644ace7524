"""DRAGON training mode: on-policy generations split into D+ / D-, trained with Diffusion-DPO or -KTO on
the flow-matching denoising loss (docs/algorithms.md §6).

Split (``dragon.criterion``):

- ``instance``: per prompt group, the better half of the rewards -> D+ (label +1), the worse half -> D-
  (-1); the middle sample of an odd group and groups with equal rewards are unused (0).
- ``set``: rewards are a set reward's per-sample contributions (``frechet_set``, ``vendi``: leave-one-out).
  ``dragon.set_split: loo`` ranks them over the whole batch (top half D+); ``greedy`` builds D+ by pair
  swaps that raise the set reward of D+ (:func:`genalign.reward_api.greedy_split`).

Losses at a shared noise and timestep (per pair; per sample when unpaired), ``x0`` = the rollout's final
latents, ``x_t = (1 - s) x0 + s noise``, ``L(x) = mean_e (v_theta(x_t, t) - (noise - x0))^2`` with the
policy's forward (CFG included, the same velocity the rollout follows), ``L_ref`` the same under the
reference (LoRA adapters disabled, or the frozen copy). ``dragon.pairing``: ``paired`` ->
:func:`genalign.losses.diffusion_dpo_loss` on (D+, D-) pairs within a prompt group; ``unpaired`` ->
:func:`genalign.losses.diffusion_kto_loss` on every labelled sample. ``s`` is drawn from the rollout's
schedule ``sigmas[0..T-1]``. The loss is a mean over the optimizer step's global unit (pair or sample)
count, so accumulation does not change it.

KTO's reference point ``z`` (``dragon.kto_reference``, :func:`genalign.losses.diffusion_kto_reference`) is
computed per micro-batch from ``g = L_ref - L``: ``mean`` = ``max(0, mean g)`` (the default), ``sigmoid`` =
the average of the D+ and D- class means of ``g``, unclamped. It is not averaged across processes (the
released Diffusion-KTO code averages it): processes may run different numbers of micro-batches, so a
collective there could wait forever.
"""

from __future__ import annotations

from typing import List

import torch

from . import losses
from .choices import CRITERIA, LOSSES, PAIRINGS, SET_SPLITS  # noqa: F401 - re-exported

KTO_REFERENCES = losses.KTO_REFERENCES  # dragon.kto_reference: "mean" | "sigmoid"
DEFAULT_BETA = {"dpo": 5000.0, "kto": 1000.0}


def instance_labels(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """``[N]`` labels in {+1, -1, 0}: per group the top ``n // 2`` rewards +1, the bottom ``n // 2`` -1."""
    labels = torch.zeros(len(rewards), dtype=torch.long)
    for g in group_ids.unique():
        idx = (group_ids == g).nonzero().flatten()
        if rewards[idx].max() == rewards[idx].min():
            continue
        order = idx[rewards[idx].argsort(descending=True)]
        half = len(order) // 2
        labels[order[:half]], labels[order[len(order) - half:]] = 1, -1
    return labels


def ranked_labels(scores: torch.Tensor) -> torch.Tensor:
    """``[N]`` labels: the top half of ``scores`` over the whole batch +1, the bottom half -1."""
    return instance_labels(scores, torch.zeros(len(scores), dtype=torch.long))


def pairs_within_groups(labels: torch.Tensor, group_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``[P, 2]`` (winner, loser) indices: in each group, D+ and D- members zipped in ``scores`` order."""
    out: List[torch.Tensor] = []
    for g in group_ids.unique():
        in_g = group_ids == g
        pos, neg = ((in_g & (labels == s)).nonzero().flatten() for s in (1, -1))
        pos, neg = pos[scores[pos].argsort(descending=True)], neg[scores[neg].argsort(descending=True)]
        k = min(len(pos), len(neg))
        out.append(torch.stack([pos[:k], neg[:k]], dim=1))
    return torch.cat(out) if out else torch.zeros(0, 2, dtype=torch.long)


def denoising_losses(policy, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, sigmas: torch.Tensor,
                     cond) -> torch.Tensor:
    """Flow-matching MSE per sample ``[B]`` at ``x_t = (1 - s) x0 + s noise`` (``s = sigmas [B]``, model
    ``timesteps [B]``), target velocity ``noise - x0``."""
    s = sigmas.view(-1, *[1] * (x0.ndim - 1)).to(x0.dtype)
    v = policy.predict((1 - s) * x0 + s * noise, timesteps, cond)
    return losses.per_sample_mse(v, noise - x0)


def split_labels(trainer, rewards: torch.Tensor, group_ids: torch.Tensor, traj) -> torch.Tensor:
    """Global labels ``[N]`` for this epoch (see the module docstring)."""
    d = trainer.cfg.dragon
    if d.criterion == "instance":
        return instance_labels(rewards, group_ids)
    if d.set_split == "loo":
        return ranked_labels(rewards)
    from .config import ConfigError

    fns = [fn for _, fn, _ in trainer.reward_fn.components if hasattr(fn, "set_score")]
    if len(fns) != 1 or trainer.world > 1:
        raise ConfigError("dragon.set_split = 'greedy' needs exactly one set reward with set_score (frechet_set, "
                          f"vendi) and one process; rewards: {trainer.reward_fn.names}, processes: {trainer.world}")
    with torch.no_grad():
        final = traj.final.to(trainer.device)
        images = torch.cat([trainer.policy.decode(final[i:i + 64]) for i in range(0, len(traj), 64)])
    from .reward_api import greedy_split

    pos = greedy_split(fns[0].set_score, fns[0].encode(images), max_swaps=d.max_swaps)
    return pos.long() * 2 - 1


def _units(labels: torch.Tensor, group_ids: torch.Tensor, rewards: torch.Tensor, local: torch.Tensor, paired: bool):
    """Local training units: ``[P, 2]`` local (winner, loser) pairs, or ``[U, 1]`` local labelled samples."""
    to_local = torch.full((len(labels),), -1, dtype=torch.long)
    to_local[local] = torch.arange(len(local))
    if paired:
        units = to_local[pairs_within_groups(labels, group_ids, rewards)]
        return units[(units >= 0).all(1)]
    mine = local[labels[local] != 0]
    return to_local[mine][:, None]
