"""Timestep-aware strategies of the one trainer (ALGORITHMS.md 2.1, 3, 4): what an epoch samples and
trains (SDE windows, TempFlow branching), step weights, GRPO-Guard RatioNorm and per-step ratio
diagnostics. The trainer calls these through small hooks; the loop itself does not change.

Shapes: N samples of the epoch (over all processes), B a local batch, T denoising steps, k steps
trained per sample.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Dict, Optional, Union

import torch

from .advantages import compute_advantages
from .policy import index_cond
from .rollout import Trajectory, rollout
from .sde import flow_sde_std


def mix_seed(*parts: int) -> int:
    """Deterministic seed from integer parts (identical on every process)."""
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p)) % (2**62)
    return h


@dataclass
class EpochPlan:
    """What each sample of an epoch samples and trains (rows follow the sampler's global order).

    levels: ``[N, T]`` noise level of every step (0 = ODE step).
    train_steps: ``[N, k]`` the steps each sample is trained on.
    model_calls: sampling forward passes (per image) of the rows, main trajectories counted once.
    branch_step: ``[N]`` TempFlow branching step j (None without branching).
    seed_ids: ``[N]`` id of the (prompt group, seed) main ODE trajectory (None without branching).
    """

    levels: torch.Tensor
    train_steps: torch.Tensor
    model_calls: int
    branch_step: Optional[torch.Tensor] = None
    seed_ids: Optional[torch.Tensor] = None

    def select(self, index: Union[slice, torch.Tensor, list]) -> "EpochPlan":
        """Rows ``index`` (``model_calls`` stays the whole plan's)."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return EpochPlan(**{k: v[index] if isinstance(v, torch.Tensor) else v for k, v in kw.items()})


def member_index(group_ids: torch.Tensor) -> torch.Tensor:
    """``[N]`` position of each sample among the samples of its group (in global order)."""
    order = torch.argsort(group_ids, stable=True)
    counts = torch.bincount(group_ids)
    starts = torch.cumsum(counts, 0) - counts
    member = torch.empty_like(group_ids)
    member[order] = torch.arange(len(group_ids)) - starts[group_ids[order]]
    return member


def window_starts(spec: Dict, seed: int, epoch: int, group_ids: torch.Tensor) -> torch.Tensor:
    """``[N]`` first window step per sample: Flow-GRPO-Fast draws it per group from
    ``(seed, epoch, group id)`` only (so never from the rank); MixGRPO slides one step every
    ``shift_every`` epochs, wrapping so the window stays within the trainable steps."""
    if spec["kind"] == "mixgrpo":
        positions = spec["num_trainable"] - spec["size"] + 1
        return torch.full_like(group_ids, (epoch // spec["shift_every"]) % positions)
    starts = {g: int(torch.randint(spec["max_start"] + 1, (1,), generator=torch.Generator().manual_seed(
        mix_seed(seed, epoch, g, 11)))) for g in group_ids.unique().tolist()}
    return torch.tensor([starts[g] for g in group_ids.tolist()], dtype=torch.long)


def plan_epoch(cfg, epoch: int, group_ids: torch.Tensor, base_levels: torch.Tensor) -> EpochPlan:
    """The epoch's plan from the config's window / branching strategy (identical on every process).

    base_levels: ``[T]`` levels of a full-SDE rollout (used when neither strategy is on).
    """
    s, T, N = cfg.sampling, cfg.sampling.num_steps, len(group_ids)
    trainable = torch.tensor(cfg.trainable_steps(), dtype=torch.long)
    window, branching = cfg.window_spec(), cfg.branching_spec()
    if window:
        window["num_trainable"] = len(trainable)
        steps = trainable[window_starts(window, cfg.seed, epoch, group_ids)[:, None] + torch.arange(window["size"])]
        return EpochPlan(_levels_at(steps, N, T, s.noise_level), steps, N * T)
    if branching:
        return _branch_plan(cfg, branching, epoch, group_ids, trainable)
    return EpochPlan(base_levels.expand(N, T).clone(), trainable.expand(N, len(trainable)), N * T)


def _levels_at(steps: torch.Tensor, n: int, num_steps: int, level: float) -> torch.Tensor:
    return torch.zeros(n, num_steps).scatter_(1, steps, float(level))


def _branch_plan(cfg, spec: Dict, epoch: int, group_ids: torch.Tensor, trainable: torch.Tensor) -> EpochPlan:
    """Member m of a group -> seed ``m // (K S)``, branching slot ``(m // K) % S``, branch ``m % K``."""
    K, S, T = spec["branches"], spec["num_steps"], cfg.sampling.num_steps
    member = member_index(group_ids)
    seed_ids = group_ids * spec["seeds"] + member // (K * S)
    slot = (member // K) % S
    if isinstance(spec["steps"], int):  # a random subset of S trainable steps per (prompt, seed)
        table = {sid: torch.sort(trainable[torch.randperm(len(trainable), generator=torch.Generator().manual_seed(
            mix_seed(cfg.seed, epoch, sid, 13)))[:S]]).values for sid in seed_ids.unique().tolist()}
        j = torch.stack([table[sid][c] for sid, c in zip(seed_ids.tolist(), slot.tolist())])
    else:
        j = (trainable if spec["steps"] == "all" else torch.tensor(spec["steps"]))[slot]
    calls = int(seed_ids.unique().numel() * T + (T - j).sum())
    return EpochPlan(_levels_at(j[:, None], len(j), T, cfg.sampling.noise_level), j[:, None], calls, j, seed_ids)


@torch.no_grad()
def branch_rollout(policy, cond, prompts, plan: EpochPlan, main_seed: int, step_kind: str, batch_size: int,
                   generator: Optional[torch.Generator] = None, reduction: str = "mean") -> Trajectory:
    """TempFlow-GRPO branches for the ``B`` rows of ``plan``: one ODE main trajectory per seed id (initial
    noise from ``(main_seed, seed id)``), then per branching step j one SDE step from the stored x_j and
    ODE to the end, in model batches of at most ``batch_size``. Model calls: ``T`` per seed id plus
    ``T - j`` per branch (``plan.model_calls`` when the rows hold whole seeds). The returned ``[B]``
    trajectories hold the main's states up to x_j, so training recomputes step j as usual."""
    T = plan.levels.shape[1]
    uniq, inv = torch.unique(plan.seed_ids, return_inverse=True)
    first = torch.zeros(len(uniq), dtype=torch.long).scatter_(0, inv.flip(0), torch.arange(len(inv)).flip(0))
    x0 = torch.cat([policy.initial_latents(1, torch.Generator(policy.device).manual_seed(mix_seed(main_seed, sid)))
                    for sid in uniq.tolist()])
    main = _chunked(first, batch_size, lambda r, c: rollout(policy, index_cond(cond, r), [prompts[i] for i in r.tolist()],
                                                            T, 0.0, step_kind, latents=x0[c], reduction=reduction))
    parts, order = [], []
    for j in plan.branch_step.unique().tolist():
        rows = (plan.branch_step == j).nonzero()[:, 0]

        def branch(r, c, j=j, pre=main.select(inv[rows])):
            start = {"start_step": j, "prefix": pre.select(c)} if j else {"latents": pre.latents[c, 0]}
            return rollout(policy, index_cond(cond, r), [prompts[i] for i in r.tolist()], T, plan.levels[r], step_kind,
                           generator=generator, reduction=reduction, **start)

        parts.append(_chunked(rows, batch_size, branch))
        order.append(rows)
    return Trajectory.cat(parts).select(torch.argsort(torch.cat(order)))


def _chunked(rows: torch.Tensor, batch_size: int, fn) -> Trajectory:
    """``fn(rows chunk, positions chunk)`` over chunks of at most ``batch_size`` rows, concatenated."""
    pos = torch.arange(len(rows))
    return Trajectory.cat([fn(rows[c], pos[c]) for c in torch.split(pos, batch_size)])


def branch_advantages(rewards: torch.Tensor, plan: EpochPlan, eps: float = 1e-4) -> torch.Tensor:
    """Process advantages ``[N, T]``: each branch's reward at its step j, normalised within the K
    branches of the same (prompt, seed, step) (:func:`genalign.advantages.process`); 0 elsewhere."""
    n, T = plan.levels.shape
    per_step = torch.full((n, T), float("nan"))
    per_step[torch.arange(n), plan.branch_step] = rewards.float().cpu()
    return compute_advantages("process", per_step, plan.seed_ids, eps=eps)


def step_weight_table(kind: str, sigmas: torch.Tensor, trainable) -> torch.Tensor:
    """Policy-loss weight of every step ``[..., T]`` from schedule sigmas ``[..., T+1]``.

    'noise_aware' (TempFlow): ``w_j = s_j / mean_{k in trainable} s_k`` with ``s_j = sigma_t(j) sqrt(dt_j)``
    (the Flow-GRPO SDE std at noise level 1; the level cancels). 'inverse_dt' (GRPO-Guard):
    ``(1/dt_j) / mean_k (1/dt_k)`` (the normalisation only keeps the policy term's scale next to the KL).
    """
    s, s_next = sigmas[..., :-1], sigmas[..., 1:]
    dt = s - s_next
    if kind == "none":
        return torch.ones_like(dt)
    raw = flow_sde_std(s, s_next, 1.0) * dt.sqrt() if kind == "noise_aware" else 1.0 / dt
    return raw / raw[..., list(trainable)].mean(-1, keepdim=True)


def ratio_norm(logp: torch.Tensor, old_logp: torch.Tensor, mean: torch.Tensor, old_mean: torch.Tensor,
               std: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """GRPO-Guard RatioNorm -> ``old_logp + log r_hat`` ``[B]`` (feed it to the loss as the new log-prob).

    With ``x' = mu_old + std eps`` and ``dmu = mu - mu_old`` the Gaussian log-ratio is
    ``reduce_e(eps dmu) / std - reduce_e(dmu^2) / (2 std^2)``: left-shifted and step-dependent. Adding
    ``bias = reduce_e(dmu^2) / (2 std^2)`` and multiplying by ``std`` gives ``log r_hat = reduce_e(eps dmu)``
    (zero mean). ``reduce_e`` is the trajectory's log-prob reduction: 'mean' (the paper's form) or 'sum'
    (then ``log r_hat`` is a sum over elements, as the log-probs are). Shapes: ``logp [B]``,
    ``mean [B, ...]``, ``std [B]``.
    """
    dims = tuple(range(1, mean.ndim))
    sq = (mean.float() - old_mean.float()) ** 2
    bias = (sq.mean(dims) if reduction == "mean" else sq.sum(dims)) / (2 * std**2)
    return old_logp + (logp - old_logp + bias) * std


class StepDiagnostics:
    """Per-step ratio statistics over trained (sample, step) tokens, summed in a ``[T, 7]`` table."""

    NAMES = ("tokens", "ratio_m1", "ratio_m1_sq", "pos", "clip_pos", "neg", "clip_neg")  # sums of r - 1 (precision)

    def __init__(self, num_steps: int, device):
        self.sums = torch.zeros(num_steps, len(self.NAMES), device=device, dtype=torch.float64)

    def add(self, step, log_r, adv, valid, clipped) -> None:
        """All ``[B]``: trained step, log-ratio, advantage, validity, clipped flag."""
        v, d, c = valid.double(), torch.expm1(log_r.detach().double()), clipped.double()
        pos, neg = (adv > 0).double() * v, (adv < 0).double() * v
        self.sums.index_add_(0, step, torch.stack([v, d * v, d * d * v, pos, c * pos, neg, c * neg], 1))

    def metrics(self, reduce=None) -> Dict[str, float]:
        """``steps/{j}/ratio_mean | ratio_std | clip_frac_pos | clip_frac_neg | tokens`` for trained j;
        ``reduce`` sums the table over processes."""
        sums = reduce(self.sums, "sum") if reduce else self.sums
        out = {}
        for j, (n, d, d2, pos, cpos, neg, cneg) in enumerate(sums.tolist()):
            if n:
                out.update({f"steps/{j}/tokens": n, f"steps/{j}/ratio_mean": 1 + d / n,
                            f"steps/{j}/ratio_std": max(d2 / n - (d / n) ** 2, 0.0) ** 0.5,
                            f"steps/{j}/clip_frac_pos": cpos / max(pos, 1), f"steps/{j}/clip_frac_neg": cneg / max(neg, 1)})
        return out


def plot_step_ratios(metrics_path: str, out_path: str) -> Optional[str]:
    """Plot ``steps/{j}/*`` of metrics.jsonl vs epoch (one line per step); None when nothing was logged."""
    with open(metrics_path) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    steps = sorted({int(k.split("/")[1]) for r in rows for k in r if k.startswith("steps/")})
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ("ratio_mean", "ratio_std", "clip_frac_pos", "clip_frac_neg")
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2))
    for ax, name in zip(axes, names):
        for j in steps:
            pts = [(r["epoch"], r[f"steps/{j}/{name}"]) for r in rows if f"steps/{j}/{name}" in r]
            ax.plot(*zip(*pts), label=f"step {j}", lw=1)
        ax.set_title(name)
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path
