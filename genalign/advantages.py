"""Advantage estimators: a registry with one call signature (docs/algorithms.md §9.2, §4.2).

Every estimator is ``fn(rewards, group_ids, mask=None, **options) -> advantages``:

* ``rewards``: ``[B]`` (one scalar per sample), ``[B, K]`` (K reward components, GDPO) or ``[B, T]``
  (per-step process rewards, TempFlow-GRPO);
* ``group_ids``: integer ``[B]``; samples sharing an id form a group (same prompt; for TempFlow the
  same prompt AND seed). Ids need not be contiguous;
* ``mask``: optional ``[B, T]`` validity of tokens / denoising steps (a denoising step is a token);
* returns ``[B]`` (sequence-level, broadcast over tokens by the loss) or ``[B, T]`` (token-level).

Group statistics are computed with ``index_add`` over dense group indices (no Python loop over
groups). Standard deviations are population ones (``ddof = 0``, as numpy in Flow-GRPO) unless an
estimator is given ``unbiased=True``.
Under data parallelism, call the estimator on the all-gathered rewards and group ids.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch

from .registry import Registry

Tensor = torch.Tensor
AdvantageFn = Callable[..., Tensor]

ADVANTAGES = Registry("advantage estimator")


def register_advantage(name: str):
    """Decorator registering an estimator ``fn(rewards, group_ids, mask=None, **options)`` under ``name``.

    Registering a taken name raises ``ValueError``.
    """
    return ADVANTAGES.register(name)


def get_advantage(name_or_callable: Union[str, AdvantageFn]) -> AdvantageFn:
    """Registered estimator by name, or the callable itself; unknown names list the valid ones."""
    return ADVANTAGES.get(name_or_callable)


def compute_advantages(
    name: Union[str, AdvantageFn], rewards: Tensor, group_ids: Tensor, mask: Optional[Tensor] = None, **options
) -> Tensor:
    """Run the estimator ``name`` (see module docstring for shapes)."""
    return get_advantage(name)(rewards, group_ids, mask, **options)


def configured_advantages(train_cfg, rewards: Tensor, group_ids: Tensor) -> Tensor:
    """The estimator ``train.advantage`` with its config options (``train.advantage_std`` for 'grpo',
    ``train.advantage_unbiased_std``) and positive advantages scaled by ``train.positive_advantage_weight``,
    unclipped: what every objective of the trainer computes from rewards."""
    options = {"std": train_cfg.advantage_std} if train_cfg.advantage == "grpo" else {}
    if train_cfg.advantage_unbiased_std:
        options["unbiased"] = True
    adv = compute_advantages(train_cfg.advantage, rewards, group_ids, **options)
    return weight_positive(adv, train_cfg.positive_advantage_weight)


def weight_positive(advantages: Tensor, weight: float) -> Tensor:
    """Positive advantages times ``weight`` in [0, 1], the others unchanged (W-REINFORCE, arXiv 2506.01347)."""
    if not 0 <= weight <= 1:
        raise ValueError(f"positive_advantage_weight must be in [0, 1], got {weight}")
    if weight == 1:
        return advantages
    return torch.where(advantages > 0, advantages * weight, advantages)


# ----------------------------------------------------------------------------------------------------
# group statistics


class GroupStats(NamedTuple):
    """Per-group statistics gathered back to every sample (same shape as the values)."""

    mean: Tensor
    std: Tensor
    count: Tensor


def _dense_ids(group_ids: Tensor, batch: int) -> tuple:
    group_ids = torch.as_tensor(group_ids)
    if group_ids.shape != (batch,):
        raise ValueError(f"group_ids must have shape [{batch}], got {tuple(group_ids.shape)}")
    if group_ids.is_floating_point():
        raise ValueError("group_ids must be integers")
    uniq, dense = torch.unique(group_ids, return_inverse=True)
    return dense, uniq.numel()


def _per_group(values: Tensor, group_ids: Tensor, valid: Optional[Tensor], unbiased: bool):
    """Per-GROUP (mean, std, count), each ``[G, ...]``, and the dense group index ``[B]`` of every sample."""
    values = torch.as_tensor(values)
    dense, n_groups = _dense_ids(group_ids, values.shape[0])
    dense = dense.to(values.device)
    ok = ~torch.isnan(values)
    if valid is not None:
        if valid.shape != values.shape:
            raise ValueError(f"valid mask shape {tuple(valid.shape)} does not match values {tuple(values.shape)}")
        ok = ok & valid.bool()
    v = torch.where(ok, values, torch.zeros_like(values))
    shape = (n_groups,) + tuple(values.shape[1:])
    count = values.new_zeros(shape).index_add_(0, dense, ok.to(values.dtype))
    mean = values.new_zeros(shape).index_add_(0, dense, v) / count.clamp_min(1)
    dev = torch.where(ok, v - mean[dense], torch.zeros_like(v))
    sq = values.new_zeros(shape).index_add_(0, dense, dev**2)
    std = (sq / (count - (1 if unbiased else 0)).clamp_min(1)).sqrt()
    return mean, std, count, dense


def group_stats(
    values: Tensor, group_ids: Tensor, valid: Optional[Tensor] = None, unbiased: bool = False
) -> GroupStats:
    """Mean, standard deviation and count of ``values`` within each group, per sample.

    values: ``[B]`` or ``[B, C]``; with ``[B, C]`` every column gets its own statistics (C = reward
    components or denoising steps). valid: optional bool mask of ``values``' shape; NaN entries are
    invalid too. Invalid entries do not enter the statistics. Returns :class:`GroupStats` whose
    tensors have ``values``' shape (groups with no valid entry get mean 0, std 0, count 0).
    """
    mean, std, count, dense = _per_group(values, group_ids, valid, unbiased)
    return GroupStats(mean[dense], std[dense], count[dense])


def zero_variance_groups(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Dynamic-sampling filter (DAPO) -> bool ``[B]``: True for samples of groups whose rewards are all
    equal (they carry no GRPO signal). ``[B, K]`` rewards: True when every column is constant."""
    rewards = torch.as_tensor(rewards)
    dense, n_groups = _dense_ids(group_ids, rewards.shape[0])
    dense = dense.to(rewards.device)
    shape = (n_groups,) + tuple(rewards.shape[1:])
    idx = dense.view(-1, *([1] * (rewards.ndim - 1))).expand_as(rewards)
    hi = rewards.new_full(shape, -math.inf).scatter_reduce(0, idx, rewards, "amax")
    lo = rewards.new_full(shape, math.inf).scatter_reduce(0, idx, rewards, "amin")
    const = hi == lo
    if rewards.ndim > 1:
        const = const.flatten(1).all(dim=1)
    return const[dense]


def dapo_overlong_penalty(lengths: Tensor, max_len: int, cache_len: int) -> Tensor:
    """DAPO soft overlong punishment (added to the reward) -> ``[B]``.

    0 for ``L <= max_len - cache_len``; ``((max_len - cache_len) - L) / cache_len`` (linear from 0 to -1)
    inside the cache window; -1 beyond ``max_len``.
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    lengths = torch.as_tensor(lengths, dtype=torch.float32)
    soft = ((max_len - cache_len) - lengths) / cache_len
    return soft.clamp(min=-1.0, max=0.0)


# ----------------------------------------------------------------------------------------------------
# estimators


def _check_rewards(rewards: Tensor, ndim: int, name: str) -> Tensor:
    rewards = torch.as_tensor(rewards)
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if rewards.ndim != ndim:
        expected = "[B]" if ndim == 1 else "[B, K]" if name == "gdpo" else "[B, T]"
        raise ValueError(f"{name} expects rewards of shape {expected}, got {tuple(rewards.shape)}")
    return rewards


def _batch_std(x: Tensor, unbiased: bool) -> Tensor:
    return x.std(unbiased=unbiased) if x.numel() > 1 else torch.zeros((), dtype=x.dtype, device=x.device)


@register_advantage("grpo")
def grpo(
    rewards: Tensor,
    group_ids: Tensor,
    mask: Optional[Tensor] = None,
    *,
    std: str = "group",
    eps: float = 1e-4,
    clip: Optional[float] = None,
    unbiased: bool = False,
) -> Tensor:
    """GRPO: ``A = (R - mean_g) / (scale + eps)`` -> ``[B]`` (``mask`` is unused: sequence-level).

    ``std``: ``"group"`` (scale = group std), ``"batch"`` (std of all rewards in the batch: Flow-GRPO's
    ``global_std``) or ``"none"`` (scale 1, eps not added: Dr.GRPO). ``clip``: clamp to ``[-clip, clip]``
    (Flow-GRPO uses 5).
    """
    rewards = _check_rewards(rewards, 1, "grpo")
    stats = group_stats(rewards, group_ids, unbiased=unbiased)
    centred = rewards - stats.mean
    if std == "group":
        adv = centred / (stats.std + eps)
    elif std == "batch":
        adv = centred / (_batch_std(rewards, unbiased) + eps)
    elif std == "none":
        adv = centred
    else:
        raise ValueError(f"grpo: std must be one of ['group', 'batch', 'none'], got {std!r}")
    return adv.clamp(-clip, clip) if clip is not None else adv


@register_advantage("dr_grpo")
def dr_grpo(
    rewards: Tensor, group_ids: Tensor, mask: Optional[Tensor] = None, *, clip: Optional[float] = None
) -> Tensor:
    """Dr.GRPO: ``A = R - mean_g`` (no std scaling) -> ``[B]``."""
    return grpo(rewards, group_ids, mask, std="none", clip=clip)


@register_advantage("gdpo")
def gdpo(
    rewards: Tensor,
    group_ids: Tensor,
    mask: Optional[Tensor] = None,
    *,
    weights: Optional[Sequence[float]] = None,
    eps: float = 1e-4,
    unbiased: bool = False,
) -> Tensor:
    """GDPO (decoupled multi-reward normalisation) -> ``[B]``.

    rewards ``[B, K]``: each column is z-scored within its group, ``z_k = (R_k - mean_g) / (std_g + eps)``;
    ``s = sum_k w_k z_k`` (``weights`` default 1); finally ``A = (s - mean_batch(s)) / (std_batch(s) + eps)``.
    """
    rewards = _check_rewards(rewards, 2, "gdpo")
    stats = group_stats(rewards, group_ids, unbiased=unbiased)
    z = (rewards - stats.mean) / (stats.std + eps)
    w = torch.ones(rewards.shape[1]) if weights is None else torch.as_tensor(weights)
    if w.shape != (rewards.shape[1],):
        raise ValueError(f"gdpo: weights must have {rewards.shape[1]} entries (one per reward), got {tuple(w.shape)}")
    s = z @ w.to(z)
    return (s - s.mean()) / (_batch_std(s, unbiased) + eps)


def beta_moments(p: Tensor) -> tuple:
    """BNPO's Beta parameters from the batch of success probabilities ``p`` (1-D, in [0, 1]).

    Method of moments on mean ``mu`` and (population) variance ``v``: ``k = mu (1 - mu) / v - 1``,
    ``a = mu k``, ``b = (1 - mu) k``; returned as ``alpha = max(1 + a/3, 1)``, ``beta = max(1 + b/3, 1)``.
    A batch with zero variance (or a single value) gives ``alpha = beta = 1`` (uniform density).
    """
    mu = p.mean()
    var = p.var(unbiased=False) if p.numel() > 1 else torch.zeros_like(mu)
    k = torch.where(var > 0, mu * (1 - mu) / var.clamp_min(1e-12) - 1, torch.zeros_like(mu))
    alpha = torch.clamp(1 + mu * k / 3, min=1.0)
    beta = torch.clamp(1 + (1 - mu) * k / 3, min=1.0)
    return alpha, beta


def beta_pdf(p: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """Beta density at ``p`` in [0, 1] (``alpha, beta >= 1``; ``0 * log 0 = 0`` at the ends)."""
    log_norm = torch.lgamma(alpha) + torch.lgamma(beta) - torch.lgamma(alpha + beta)
    return torch.exp(torch.xlogy(alpha - 1, p) + torch.xlogy(beta - 1, 1 - p) - log_norm)


@register_advantage("bnpo")
def bnpo(
    rewards: Tensor, group_ids: Tensor, mask: Optional[Tensor] = None, *, eps: float = 1e-4
) -> Tensor:
    """BNPO (Beta-normalised policy optimisation) -> ``[B]``; rewards in [0, 1] (e.g. binary).

    ``p_g`` is the GROUP MEAN reward (the empirical success probability of the prompt).
    ``A = (R - p_g) / max(BetaPdf(p_g; alpha, beta), eps)`` with ``alpha, beta`` from
    :func:`beta_moments` over the batch of group means, each group counted once (not once per member).
    A group whose rewards are all equal gets ``A = 0``. Not TRL's ``loss_type="bnpo"`` (an aggregation).
    """
    rewards = _check_rewards(rewards, 1, "bnpo")
    if torch.any((rewards < 0) | (rewards > 1)):
        raise ValueError("bnpo expects rewards in [0, 1]")
    p_groups, _, _, dense = _per_group(rewards, group_ids, None, False)
    alpha, beta = beta_moments(p_groups)
    p = p_groups[dense]
    return (rewards - p) / beta_pdf(p, alpha, beta).clamp_min(eps)


@register_advantage("hapo")
def hapo(
    rewards: Tensor,
    group_ids: Tensor,
    mask: Optional[Tensor] = None,
    *,
    eps: float = 1e-6,
    scale: bool = True,
    unbiased: bool = False,
) -> Tensor:
    """HAPO token-level group average -> ``[B, T]`` (0 at invalid tokens).

    Every valid token of sample b carries ``R_b``; the mean and std of the group are taken over ALL valid
    tokens of the group (a long response weighs more, matching a token-mean loss):
    ``A_bt = (R_b - mean_tok_g) / (std_tok_g + eps)`` (``scale=False``: no division). ``mask`` required.
    (The released code falls back to GRPO advantages for a whole group when any ``|A| >= 5``; we do not.)
    """
    rewards = _check_rewards(rewards, 1, "hapo")
    if mask is None:
        raise ValueError("hapo needs mask [B, T]: its statistics run over the valid tokens of each group")
    m = mask.bool()
    B, T = m.shape
    tok = rewards.unsqueeze(1).expand(B, T).reshape(-1)
    stats = group_stats(tok, torch.as_tensor(group_ids).repeat_interleave(T), valid=m.reshape(-1), unbiased=unbiased)
    adv = tok - stats.mean
    if scale:
        adv = adv / (stats.std + eps)
    return torch.where(m, adv.view(B, T), torch.zeros_like(adv.view(B, T)))


@register_advantage("process")
def process(
    rewards: Tensor, group_ids: Tensor, mask: Optional[Tensor] = None, *, eps: float = 1e-4, unbiased: bool = False
) -> Tensor:
    """TempFlow-GRPO process advantages -> ``[B, T]`` (0 where no branch).

    rewards ``[B, T]``: ``R[b, j]`` is the reward of sample b's branch at step j; steps without a branch are
    NaN or masked out. Within each (group, step), over the group members with a value:
    ``A = (R - mean) / (std + eps)``. Group ids identify the branches of one prompt AND seed.
    """
    rewards = _check_rewards(rewards, 2, "process")
    stats = group_stats(rewards, group_ids, valid=mask, unbiased=unbiased)
    valid = ~torch.isnan(rewards) if mask is None else ~torch.isnan(rewards) & mask.bool()
    adv = (rewards - stats.mean) / (stats.std + eps)
    return torch.where(valid, adv, torch.zeros_like(adv))
