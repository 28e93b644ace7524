"""Sample trajectories with per-step log-probs, and rescore stored transitions.

Every step of a rollout has its own noise level: 0 makes it a deterministic ODE (or DDIM eta = 0)
step, > 0 a stochastic one. SDE windows, branching and "last step deterministic" are all expressed
through the per-step noise levels, and the same numbers are used again when log-probs are recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import List, Optional, Sequence, Union

import torch

from . import sde
from .policy import Cond, Policy, cat_conds, index_cond

STEP_KINDS = ("sde", "cps", "dance", "ddim")


@dataclass
class Trajectory:
    """A batch of B trajectories of T steps (all tensors batch-first, float32 unless noted).

    latents: ``[B, T+1, ...]`` states ``x_0 (noise) .. x_T (final)``; ``x_{j+1}`` is step j's sample.
    log_probs: ``[B, T]`` log-density of each transition under the policy that sampled it.
    means: ``[B, T, ...]`` step means (needed by KL and GRPO-Guard's RatioNorm).
    stds: ``[B, T]`` transition standard deviations (0 for deterministic steps).
    sigmas: ``[B, T+1]`` schedule values (flow sigma; DDPM ``sqrt(1 - alpha_bar)``).
    timesteps: ``[B, T]`` model timesteps.
    noise_levels: ``[B, T]`` noise level used at each step (0 = deterministic).
    cond: conditioning (batch-first tensors).
    prompts: the B prompts.
    step_kind: 'sde', 'cps' (flow) or 'ddim' (DDPM family).
    reduction: how log-probs reduce over elements ('mean' or 'sum').
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    means: torch.Tensor
    stds: torch.Tensor
    sigmas: torch.Tensor
    timesteps: torch.Tensor
    noise_levels: torch.Tensor
    cond: Cond
    prompts: List[str]
    step_kind: str = "sde"
    reduction: str = "mean"

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]

    @property
    def final(self) -> torch.Tensor:
        """Final latents ``x_T`` ``[B, ...]``."""
        return self.latents[:, -1]

    @property
    def stochastic_steps(self) -> torch.Tensor:
        """``[B, T]`` bool: steps that were sampled with noise (the ones that can be trained)."""
        return self.stds > 0

    def _tensor_fields(self):
        return [f.name for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    def select(self, index: Union[slice, torch.Tensor, Sequence[int]]) -> "Trajectory":
        """Sub-batch of samples ``index``."""
        if isinstance(index, (list, tuple)):
            index = torch.as_tensor(index, dtype=torch.long)
        if isinstance(index, torch.Tensor):
            prompts = [self.prompts[i] for i in index.tolist()]
        else:
            prompts = self.prompts[index]
        kwargs = {name: getattr(self, name)[index] for name in self._tensor_fields()}
        return Trajectory(**kwargs, cond=index_cond(self.cond, index), prompts=prompts,
                          step_kind=self.step_kind, reduction=self.reduction)

    @staticmethod
    def cat(trajs: List["Trajectory"]) -> "Trajectory":
        """Concatenate along the batch (same step kind, reduction and number of steps)."""
        first = trajs[0]
        for i, t in enumerate(trajs):
            if (t.step_kind, t.reduction, t.num_steps) != (first.step_kind, first.reduction, first.num_steps):
                raise ValueError(f"trajectory {i} differs in step kind, reduction or number of steps")
        kwargs = {name: torch.cat([getattr(t, name) for t in trajs]) for name in first._tensor_fields()}
        return Trajectory(**kwargs, cond=cat_conds([t.cond for t in trajs]),
                          prompts=[p for t in trajs for p in t.prompts],
                          step_kind=first.step_kind, reduction=first.reduction)

    def to(self, device) -> "Trajectory":
        kwargs = {name: getattr(self, name).to(device) for name in self._tensor_fields()}
        return Trajectory(**kwargs, cond={k: v.to(device) for k, v in self.cond.items()}, prompts=self.prompts,
                          step_kind=self.step_kind, reduction=self.reduction)


def check_step_kind(policy: Policy, step_kind: str) -> None:
    if step_kind not in STEP_KINDS:
        raise ValueError(f"unknown step kind {step_kind!r}; valid: {list(STEP_KINDS)}")
    if policy.kind == "ddpm" and step_kind != "ddim":
        raise ValueError(f"a DDPM-family policy needs step kind 'ddim', got {step_kind!r}")
    if policy.kind == "flow" and step_kind == "ddim":
        raise ValueError("step kind 'ddim' is for DDPM-family policies; flow models use 'sde' or 'cps'")


def transition(
    step_kind: str,
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    noise_level: torch.Tensor,
    prev_sample: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    reduction: str = "mean",
) -> sde.StepOutput:
    """One step of kind ``step_kind`` with per-sample schedule values (no host-side validation)."""
    if step_kind == "ddim":
        return sde.ddim_step(model_output, sample, 1 - sigma**2, 1 - sigma_next**2, noise_level,
                             prev_sample=prev_sample, generator=generator, reduction=reduction, validate=False)
    step = sde.flow_step(step_kind)
    return step(model_output, sample, sigma, sigma_next, noise_level, prev_sample=prev_sample,
                generator=generator, reduction=reduction, validate=False)


def noise_schedule(num_steps: int, noise_level: float, sde_steps: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Per-step noise levels ``[T]``: ``noise_level`` on ``sde_steps`` (default: all), 0 elsewhere."""
    levels = torch.zeros(num_steps)
    if sde_steps is None:
        levels[:] = noise_level
        return levels
    for j in sde_steps:
        if not 0 <= int(j) < num_steps:
            raise ValueError(f"sde step {j} outside [0, {num_steps})")
        levels[int(j)] = noise_level
    return levels


@torch.no_grad()
def rollout(
    policy: Policy,
    cond: Cond,
    prompts: List[str],
    num_steps: int,
    noise_levels: Union[float, torch.Tensor] = 0.7,
    step_kind: str = "sde",
    generator: Optional[torch.Generator] = None,
    latents: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    schedule=None,
    start_step: int = 0,
    prefix: Optional[Trajectory] = None,
) -> Trajectory:
    """Sample ``len(prompts)`` trajectories of ``num_steps`` steps.

    noise_levels: a float (every step stochastic with that level) or ``[T]`` / ``[B, T]`` per-step levels
        (0 = ODE step). See :func:`noise_schedule`.
    latents: initial noise ``[B, ...]``; drawn from ``generator`` when None.
    schedule: optional ``(timesteps [T], sigmas [T+1])``; defaults to ``policy.schedule(num_steps)``.
    start_step, prefix: continue the stored trajectories ``prefix`` (``B`` rows, same schedule) from their
        state ``x_{start_step}``: steps ``< start_step`` (states, log-probs, means, stds, levels) are copied
        from ``prefix`` and only steps ``start_step..T-1`` call the model (TempFlow branches).
    """
    check_step_kind(policy, step_kind)
    batch = len(prompts)
    for k, v in cond.items():
        if v.shape[0] != batch:
            raise ValueError(f"conditioning {k!r} has batch {v.shape[0]}, but {batch} prompts were given")
    device = policy.device
    timesteps, sigmas = schedule if schedule is not None else policy.schedule(num_steps)
    if timesteps.shape[0] != num_steps or sigmas.shape[0] != num_steps + 1:
        raise ValueError(f"schedule has {timesteps.shape[0]} timesteps / {sigmas.shape[0]} sigmas for {num_steps} steps")
    if policy.kind == "flow":
        sde.check_sigmas(sigmas[:-1], sigmas[1:])
    levels = torch.as_tensor(noise_levels, dtype=torch.float32)
    if levels.ndim == 0:
        levels = levels.expand(num_steps)
    if levels.ndim == 1:
        if levels.shape[0] != num_steps:
            raise ValueError(f"noise_levels has {levels.shape[0]} entries for {num_steps} steps")
        levels = levels.expand(batch, num_steps)
    if levels.shape != (batch, num_steps):
        raise ValueError(f"noise_levels must be a float, [T] or [B, T]; got shape {tuple(levels.shape)}")
    if torch.any(levels < 0):
        raise ValueError("noise levels must be >= 0")
    levels = levels.to(device)

    states, log_probs, means, stds = [], [], [], []
    if start_step:
        if prefix is None or len(prefix) != batch or not 0 < start_step < num_steps:
            raise ValueError(f"start_step {start_step} needs a prefix trajectory of {batch} rows and 0 < start_step < T")
        levels = torch.cat([prefix.noise_levels[:, :start_step].to(device), levels[:, start_step:]], dim=1)
        for dst, name in ((states, "latents"), (log_probs, "log_probs"), (means, "means"), (stds, "stds")):
            dst += getattr(prefix, name)[:, :start_step].to(device).unbind(1)
        latents = prefix.latents[:, start_step]
    x = policy.initial_latents(batch, generator) if latents is None else latents.to(device, torch.float32)
    x = x.contiguous()  # a strided view (e.g. packed noise) would change the bits of the recomputed log-probs
    if x.shape[0] != batch:
        raise ValueError(f"initial latents have batch {x.shape[0]}, expected {batch}")
    states.append(x)
    ts = timesteps.to(device, torch.float32)
    sg = sigmas.to(device, torch.float32)
    for j in range(start_step, num_steps):
        t_b = ts[j].expand(batch)
        out = policy.predict(x, t_b, cond)
        step = transition(step_kind, out, x, sg[j].expand(batch), sg[j + 1].expand(batch), levels[:, j],
                          generator=generator, reduction=reduction)
        x = step.prev_sample
        states.append(x)
        log_probs.append(step.log_prob)
        means.append(step.mean)
        stds.append(step.std)
    return Trajectory(
        latents=torch.stack(states, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        means=torch.stack(means, dim=1),
        stds=torch.stack(stds, dim=1),
        sigmas=sg.expand(batch, num_steps + 1).clone(),
        timesteps=ts.expand(batch, num_steps).clone(),
        noise_levels=levels.clone(),
        cond=cond,
        prompts=list(prompts),
        step_kind=step_kind,
        reduction=reduction,
    )


def _as_index(step_indices, batch: int, device) -> torch.Tensor:
    idx = torch.as_tensor(step_indices, dtype=torch.long, device=device)
    if idx.ndim == 0:
        idx = idx.reshape(1)
    if idx.ndim == 1:
        idx = idx.expand(batch, idx.shape[0])
    if idx.ndim != 2 or idx.shape[0] != batch:
        raise ValueError(f"step_indices must be a list of steps or a [B, k] tensor; got shape {tuple(idx.shape)}")
    return idx


def recompute_step(policy: Policy, traj: Trajectory, step_index: torch.Tensor) -> sde.StepOutput:
    """Score stored transitions at per-sample steps ``step_index [B]`` with the current weights.

    Uses :meth:`Policy.predict` (the rollout's forward) and the stored next latents as the sample, so
    with unchanged weights the log-probs equal the stored ones exactly. Runs with autograd enabled.
    """
    rows = torch.arange(len(traj), device=traj.latents.device)
    j = step_index.to(traj.latents.device)
    x = traj.latents[rows, j]
    x_next = traj.latents[rows, j + 1]
    out = policy.predict(x, traj.timesteps[rows, j], traj.cond)
    step = transition(traj.step_kind, out, x, traj.sigmas[rows, j], traj.sigmas[rows, j + 1],
                      traj.noise_levels[rows, j], prev_sample=x_next, reduction=traj.reduction)
    step.model_output = out
    return step


def recompute_log_probs(policy: Policy, traj: Trajectory, step_indices) -> torch.Tensor:
    """Log-probs ``[B, k]`` of the stored transitions at ``step_indices`` (list of steps or ``[B, k]``)."""
    idx = _as_index(step_indices, len(traj), traj.latents.device)
    return torch.stack([recompute_step(policy, traj, idx[:, c]).log_prob for c in range(idx.shape[1])], dim=1)


def gather_steps(values: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
    """``values[b, step_index[b]]`` for a ``[B, T, ...]`` tensor."""
    rows = torch.arange(values.shape[0], device=values.device)
    return values[rows, step_index.to(values.device)]
