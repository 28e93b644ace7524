"""Timestep-aware strategies of the one trainer (README, "Methods"): what an epoch samples and
trains (SDE windows of Flow-GRPO-Fast and MixGRPO, arXiv 2507.21802; TempFlow-GRPO branching,
arXiv 2508.04324), step weights, GRPO-Guard RatioNorm and per-step ratio diagnostics. The trainer
calls these through small hooks; the loop itself does not change. Which plan an epoch gets is the
method's (:mod:`genalign.method_specs`); this module holds the building blocks.

Shapes: N samples of the epoch (over all processes), B a local batch, T denoising steps, k steps
trained per sample.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Dict, Optional, Tuple, Union

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


MIXGRPO_SCHEDULES = ("wrap", "roll_back", "random")


def mixgrpo_window(spec: Dict, seed: int, epoch: int) -> Tuple[int, int]:
    """``(first position, size)`` of the MixGRPO window of ``epoch`` among the ``n = num_trainable``
    trainable steps; every sample of an epoch shares it. With ``q = epoch // shift_every`` and ``s = stride``:

    - 'wrap' (default): start ``(s q) mod (n - size + 1)``, always ``size`` steps.
    - 'roll_back' (the released MixGRPO scripts, arXiv 2507.21802): start ``s (q mod L)`` over the
      ``L = (n - 1) // s + 1`` starts below n; near the end the window is cut at n, so it shrinks
      (``min(size, n - start)`` steps), then restarts at 0. ``s = 0``: frozen at the first ``size`` steps.
    - 'random': start drawn uniformly in ``[0, n - size]`` from ``(seed, q)``, ``size`` steps (no stride).
    """
    n, size, s, q = spec["num_trainable"], spec["size"], spec.get("stride", 1), epoch // spec["shift_every"]
    schedule = spec.get("schedule", "wrap")
    if schedule == "wrap":
        return (s * q) % (n - size + 1), size
    if schedule == "roll_back":
        start = s * (q % ((n - 1) // s + 1)) if s else 0
        return start, min(size, n - start)
    if schedule == "random":
        g = torch.Generator().manual_seed(mix_seed(seed, q, 23))
        return int(torch.randint(n - size + 1, (1,), generator=g)), size
    raise ValueError(f"unknown MixGRPO window schedule {schedule!r}; choose one of {MIXGRPO_SCHEDULES}")


def window_starts(spec: Dict, seed: int, epoch: int, group_ids: torch.Tensor) -> torch.Tensor:
    """``[N]`` first window position (among the trainable steps) per sample: Flow-GRPO-Fast draws it per
    group from ``(seed, epoch, group id)`` only (so never from the rank); MixGRPO's is the epoch's
    :func:`mixgrpo_window` start, the same for all samples."""
    if spec["kind"] == "mixgrpo":
        return torch.full_like(group_ids, mixgrpo_window(spec, seed, epoch)[0])
    starts = {g: int(torch.randint(spec["max_start"] + 1, (1,), generator=torch.Generator().manual_seed(
        mix_seed(seed, epoch, g, 11)))) for g in group_ids.unique().tolist()}
    return torch.tensor([starts[g] for g in group_ids.tolist()], dtype=torch.long)


def plan_epoch(cfg, epoch: int, group_ids: torch.Tensor, base_levels: torch.Tensor) -> EpochPlan:
    """The epoch's plan (identical on every process): ``cfg.method_spec().plan(...)`` (see
    :mod:`genalign.method_specs`). base_levels: ``[T]`` levels of a full-SDE rollout."""
    return cfg.method_spec().plan(cfg, epoch, group_ids, base_levels)


def trainable_tensor(cfg) -> torch.Tensor:
    """``cfg.trainable_steps()`` as a tensor; ``ConfigError`` when no step is stochastic (log-prob methods)."""
    steps = cfg.trainable_steps()
    if not steps:
        from .errors import ConfigError

        raise ConfigError("no stochastic step to train: sampling.noise_level is 0")
    return torch.tensor(steps, dtype=torch.long)


def full_plan(cfg, group_ids: torch.Tensor, base_levels: torch.Tensor) -> EpochPlan:
    """Every sample: the levels ``base_levels [T]`` (full SDE) and all trainable steps trained."""
    T, N = cfg.sampling.num_steps, len(group_ids)
    trainable = trainable_tensor(cfg)
    return EpochPlan(base_levels.expand(N, T).clone(), trainable.expand(N, len(trainable)).clone(), N * T)


def window_plan(cfg, window: Dict, epoch: int, group_ids: torch.Tensor) -> EpochPlan:
    """SDE windows (``window`` = :meth:`genalign.config.Config.window_spec`): Flow-GRPO-Fast's per group,
    MixGRPO's one per epoch; only the window's steps are stochastic and trained."""
    if not window:
        raise ValueError("window_plan needs a window spec (sampling.window)")
    T, N = cfg.sampling.num_steps, len(group_ids)
    trainable = trainable_tensor(cfg)
    window = {**window, "num_trainable": len(trainable)}
    size = mixgrpo_window(window, cfg.seed, epoch)[1] if window["kind"] == "mixgrpo" else window["size"]
    steps = trainable[window_starts(window, cfg.seed, epoch, group_ids)[:, None] + torch.arange(size)]
    return EpochPlan(_levels_at(steps, N, T, cfg.sampling.noise_level), steps, N * T)


def nft_steps(cfg) -> torch.Tensor:
    """The steps a forward-process objective (DiffusionNFT) trains on: the first
    ``max(1, int(timestep_fraction * T))`` noise levels ``sigmas[j]`` of the sampler's schedule, whatever the
    sampler's noise (ODE samples included)."""
    T = cfg.sampling.num_steps
    return torch.arange(max(1, int(cfg.train.timestep_fraction * T)))


def forward_process_plan(cfg, group_ids: torch.Tensor, base_levels: torch.Tensor) -> EpochPlan:
    """Every sample: sampled with ``base_levels [T]`` (ODE when ``sampling.noise_level`` is 0) and trained at
    each step of :func:`nft_steps`."""
    T, N = cfg.sampling.num_steps, len(group_ids)
    steps = nft_steps(cfg)
    return EpochPlan(base_levels.expand(N, T).clone(), steps.expand(N, len(steps)).clone(), N * T)


def _levels_at(steps: torch.Tensor, n: int, num_steps: int, level: float) -> torch.Tensor:
    return torch.zeros(n, num_steps).scatter_(1, steps, float(level))


def branch_plan(cfg, spec: Dict, epoch: int, group_ids: torch.Tensor) -> EpochPlan:
    """TempFlow-GRPO branching (``spec`` = :meth:`genalign.config.Config.branching_spec`). Member m of a group
    -> seed ``m // (K S)``, branching slot ``(m // K) % S``, branch ``m % K``."""
    if not spec:
        raise ValueError("branch_plan needs a branching spec (sampling.branching)")
    trainable = trainable_tensor(cfg)
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


RELEASED_NOISE_AWARE_SCALE = {"noise_aware_released": 2.25, "noise_aware_released_flux": 1.73,
                              "noise_aware_released_qwenimage": 1.53}
"""TempFlow-GRPO's released constant ``c`` per model (SD3.5-M, FLUX.1-dev, Qwen-Image training scripts)."""
RELEASED_NOISE_LEVEL = 0.7
"""Noise level fixed in the released TempFlow-GRPO SDE step (whatever the run's configuration)."""
STEP_WEIGHTINGS = ("none", "noise_aware", "inverse_dt", *RELEASED_NOISE_AWARE_SCALE)


def step_weight_table(kind: str, sigmas: torch.Tensor, trainable) -> torch.Tensor:
    """Policy-loss weight of every step ``[..., T]`` from schedule sigmas ``[..., T+1]`` (the KL is never weighted).

    'noise_aware' (TempFlow, arXiv 2508.04324): ``w_j = s_j / mean_{k in trainable} s_k`` with
    ``s_j = sigma_t(j) sqrt(dt_j)`` (the Flow-GRPO SDE std at noise level 1; the level cancels).
    'noise_aware_released[_flux | _qwenimage]' (TempFlow's released code): ``w_j = c * s_j`` with ``s_j`` the SDE
    std at its fixed noise level 0.7, ``0.7 sqrt(s / (1 - s)) sqrt(s - s')`` (``s'`` in the denominator at
    ``s = 1``), not normalised; ``c`` = 2.25 (SD3.5-M), 1.73 (FLUX) or 1.53 (Qwen-Image). On SD3's 10-step
    shift-3 schedule the 2.25 table has mean 0.999 over steps 0-8, i.e. it is 'noise_aware' to 0.1%.
    'inverse_dt' (GRPO-Guard): ``(1/dt_j) / mean_k (1/dt_k)`` (the normalisation only keeps the policy term's
    scale next to the KL).
    """
    s, s_next = sigmas[..., :-1], sigmas[..., 1:]
    dt = s - s_next
    if kind == "none":
        return torch.ones_like(dt)
    if kind in RELEASED_NOISE_AWARE_SCALE:
        return RELEASED_NOISE_AWARE_SCALE[kind] * flow_sde_std(s, s_next, RELEASED_NOISE_LEVEL) * dt.sqrt()
    if kind == "noise_aware":
        raw = flow_sde_std(s, s_next, 1.0) * dt.sqrt()
    elif kind == "inverse_dt":
        raw = 1.0 / dt
    else:
        raise ValueError(f"unknown step weighting {kind!r}; choose one of {STEP_WEIGHTINGS}")
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
