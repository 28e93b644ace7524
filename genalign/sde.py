"""Stochastic sampling steps with exact per-step log-probabilities.

Pure math: tensors in, tensors out; imports only torch. Every function accepts per-sample schedule
values (shape ``[B]``) or scalars, so one batch may mix denoising steps.

Conventions (rectified flow / SD3, Esser et al. 2024, arXiv 2403.03206; the papers of each step are cited
in its docstring): flow matching uses ``x_s = (1 - s) x0 + s noise`` with sigma ``s`` running from 1
(noise) to 0 (data); the model predicts the velocity ``v`` and the Euler ODE step is
``x' = x + (s' - s) v``. ``log_prob`` is the Gaussian log-density of ``prev_sample`` reduced over all
non-batch elements: ``reduction="mean"`` (default, matches published Flow-GRPO hyper-parameters) or
``"sum"`` (the true joint density).

Deterministic transitions (``std == 0``: noise level 0, or the CPS step onto ``s' = 0``) have no
density; their ``log_prob`` is reported as 0 and their ``prev_sample`` is the mean.

Cost: ``std`` is one number per sample, so the reduced log-density is
``-reduce_e((x' - mu)^2) / (2 std^2) - log std - log sqrt(2 pi)`` (constant terms times the element count
for ``"sum"``): a step makes one fused full-size pass for the squared difference plus its reduction, builds
the mean as ``c_x x + c_v v`` with ``[B]`` coefficients (two full-size kernels), and does all
``std == 0`` handling on ``[B]``-sized tensors. Nothing syncs with the host unless ``validate=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

Number = Union[float, int, torch.Tensor]
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass
class StepOutput:
    """Result of one stochastic step.

    prev_sample: ``x'`` (shape of the input sample).
    log_prob: ``[B]`` log-density of ``prev_sample`` under ``N(mean, std^2)``, reduced over elements.
    mean: ``mu`` (shape of the input sample).
    std: ``[B]`` standard deviation of the transition.
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    model_output: Optional[torch.Tensor] = None
    """The denoiser output the step was computed from (set by :func:`genalign.rollout.recompute_step`)."""


def _per_sample(value: Number, like: torch.Tensor, name: str) -> torch.Tensor:
    """Return ``value`` as a float tensor of shape ``[B]`` on ``like``'s device (float32 or wider)."""
    batch = like.shape[0]
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    t = torch.as_tensor(value, dtype=dtype, device=like.device)
    if t.ndim == 0:
        return t.expand(batch)
    if t.ndim != 1 or t.shape[0] != batch:
        raise ValueError(f"{name} must be a scalar or have shape [{batch}], got {tuple(t.shape)}")
    return t.to(dtype)


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a ``[B]`` tensor so it broadcasts against ``like`` (``[B, ...]``)."""
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1)))


def _check_pair(model_output: torch.Tensor, sample: torch.Tensor, prev_sample: Optional[torch.Tensor]):
    if sample.ndim < 2:
        raise ValueError(f"sample must have a batch dimension and at least one more, got shape {tuple(sample.shape)}")
    if model_output.shape != sample.shape:
        raise ValueError(
            f"model output shape {tuple(model_output.shape)} does not match sample shape {tuple(sample.shape)}"
        )
    if prev_sample is not None and prev_sample.shape != sample.shape:
        raise ValueError(
            f"prev_sample shape {tuple(prev_sample.shape)} does not match sample shape {tuple(sample.shape)}"
        )


def check_sigmas(sigma: torch.Tensor, sigma_next: torch.Tensor) -> None:
    """Validate a flow-matching step: ``0 <= sigma_next < sigma <= 1`` (host sync; call once per schedule)."""
    if not torch.all((sigma >= 0) & (sigma <= 1)):
        raise ValueError(f"sigma must lie in [0, 1], got {sigma.tolist()}")
    if not torch.all((sigma_next >= 0) & (sigma_next <= 1)):
        raise ValueError(f"sigma_next must lie in [0, 1], got {sigma_next.tolist()}")
    if not torch.all(sigma_next < sigma):
        raise ValueError(
            f"sigma_next must be smaller than sigma (sampling runs from noise to data), "
            f"got sigma={sigma.tolist()} sigma_next={sigma_next.tolist()}"
        )


def _check_noise_level(noise_level: Number, upper: Optional[float] = None) -> None:
    lvl = torch.as_tensor(noise_level)
    if torch.any(lvl < 0) or (upper is not None and torch.any(lvl > upper)):
        bound = f"[0, {upper}]" if upper is not None else ">= 0"
        raise ValueError(f"noise_level must be {bound}, got {lvl.tolist()}")


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _log_prob_from_sq(sq: torch.Tensor, std: torch.Tensor, numel: int, reduction: str) -> torch.Tensor:
    """Reduced Gaussian log-density from ``sq = reduce_e((x - mean)^2)`` (``[B]``) and the per-sample ``std``.

    Because ``std`` is constant over a sample's elements, the element-wise log-density
    ``-(x - mu)^2 / (2 std^2) - log std - log sqrt(2 pi)`` reduces to
    ``-sq / (2 std^2) - k (log std + log sqrt(2 pi))`` with ``k = 1`` for the mean and ``k = numel`` for the
    sum. Samples with ``std == 0`` get 0 (deterministic transition); the masking runs on ``[B]``-sized
    tensors, and the placeholder std of 1 keeps the backward pass finite there.
    """
    std = std.to(torch.promote_types(sq.dtype, std.dtype))
    deterministic = std == 0
    safe = torch.where(deterministic, 1.0, std)
    const = torch.log(safe) + LOG_SQRT_2PI
    if reduction == "sum":
        const = const * numel
    log_prob = -0.5 * sq / safe.square() - const
    return torch.where(deterministic, 0.0, log_prob)


def _sq_dist(x: torch.Tensor, mean: torch.Tensor, reduction: str) -> torch.Tensor:
    """``reduce_e((x - mean)^2)`` per sample -> ``[B]``: one fused element-wise pass and one reduction."""
    if x.dtype != mean.dtype:  # e.g. a low-precision stored sample scored against a float32 mean
        dtype = torch.promote_types(x.dtype, mean.dtype)
        x, mean = x.to(dtype), mean.to(dtype)
    sq = F.mse_loss(x, mean, reduction="none")  # (x - mean)^2 in a single kernel; differentiable in both
    dims = tuple(range(1, x.ndim))
    return sq.mean(dim=dims) if reduction == "mean" else sq.sum(dim=dims)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Log-density of ``x`` under ``N(mean, std^2)`` reduced over non-batch elements -> ``[B]``.

    ``std`` has shape ``[B]`` (or ``[B, 1, ...]``); samples with ``std == 0`` get log-prob 0 (deterministic
    transition). Exactly the element-wise density reduced over elements, computed with one full-size pass
    over ``(x - mean)^2`` and the remaining terms on ``[B]``-sized tensors (see :func:`_log_prob_from_sq`).
    """
    _check_reduction(reduction)
    std = torch.as_tensor(std, device=x.device)
    if std.ndim > 1:
        std = std.reshape(std.shape[0])
    if x.shape != mean.shape:
        x, mean = torch.broadcast_tensors(x, mean)
    numel = math.prod(x.shape[1:])
    return _log_prob_from_sq(_sq_dist(x, mean, reduction), std, numel, reduction)


def _combine(x: torch.Tensor, cx: torch.Tensor, v: torch.Tensor, cv: torch.Tensor) -> torch.Tensor:
    """``x * cx + v * cv`` with per-sample ``[B]`` coefficients: two full-size kernels, one output buffer."""
    return (x * _bcast(cx, x)).addcmul_(v, _bcast(cv, v))


def _finish(mean: torch.Tensor, std: torch.Tensor, prev_sample, generator, reduction) -> StepOutput:
    """Sample ``prev_sample = mean + std * noise`` (unless given) and score it.

    The log-prob is always computed from ``prev_sample - mean``, so scoring a stored sample later with the
    same mean reproduces the sampling-time log-prob bit for bit.
    """
    _check_reduction(reduction)
    if prev_sample is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        prev_sample = torch.addcmul(mean, noise, _bcast(std, mean).to(mean.dtype))
    numel = math.prod(mean.shape[1:])
    log_prob = _log_prob_from_sq(_sq_dist(prev_sample, mean, reduction), std, numel, reduction)
    return StepOutput(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std)


def _flow_inputs(velocity, sample, sigma, sigma_next, noise_level, prev_sample, validate, upper):
    """Shared checks and float32 (or wider) casting of a flow step's inputs -> ``(x, v, s, s', a)``."""
    _check_pair(velocity, sample, prev_sample)
    s = _per_sample(sigma, sample, "sigma")
    s_next = _per_sample(sigma_next, sample, "sigma_next")
    a = _per_sample(noise_level, sample, "noise_level")
    if validate:
        check_sigmas(s, s_next)
        _check_noise_level(noise_level, upper=upper)
    x = sample.to(s.dtype) if sample.dtype != s.dtype else sample
    v = velocity.to(s.dtype) if velocity.dtype != s.dtype else velocity
    return x, v, s, s_next, a


def flow_sde_std(sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: Number) -> torch.Tensor:
    """Per-sample diffusion coefficient ``sigma_t = a * sqrt(s / (1 - s))`` of the Flow-GRPO SDE.

    At ``s == 1``, where ``s / (1 - s)`` is infinite, the denominator uses ``s'`` (the next sigma) instead.
    """
    denom_s = torch.where(sigma >= 1, sigma_next, sigma)
    return noise_level * torch.sqrt(sigma / (1 - denom_s))


def flow_sde_step(velocity: torch.Tensor, sample: torch.Tensor, sigma: Number, sigma_next: Number, noise_level: Number,
                  prev_sample: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                  reduction: str = "mean", validate: bool = True) -> StepOutput:
    """Flow-GRPO SDE step (Liu et al. 2025, "Flow-GRPO", arXiv 2505.05470, the Euler-Maruyama step of the
    reverse SDE with the same marginals as the flow ODE).

    ``mu = x + (v + sigma_t^2 / (2 s) * (x + (1 - s) v)) * (s' - s)``, ``std = sigma_t * sqrt(s - s')``.
    ``noise_level = 0`` reduces to the Euler ODE step. If ``prev_sample`` is given it is scored, not sampled.
    ``validate=False`` skips the host-syncing range checks (callers that validated the schedule once).

    The mean is built as ``c_x x + c_v v`` with per-sample ``c_x = 1 + k dt``, ``c_v = (1 + k (1 - s)) dt``,
    ``k = sigma_t^2 / (2 s)``, ``dt = s' - s`` (the same expression expanded), so that with noise level 0
    ``c_x = 1`` and ``c_v = dt`` exactly.
    """
    x, v, s, s_next, a = _flow_inputs(velocity, sample, sigma, sigma_next, noise_level, prev_sample, validate, None)
    return _reverse_sde(x, v, s, s_next, flow_sde_std(s, s_next, a), prev_sample, generator, reduction)


def _reverse_sde(x, v, s, s_next, sigma_t, prev_sample, generator, reduction) -> StepOutput:
    """Euler-Maruyama step of ``dx = [v - sigma_t^2 / 2 * score] dt + sigma_t dW`` (time running from s to s'),
    ``score = -(x + (1 - s) v) / s``: ``mu = c_x x + c_v v`` with ``c_x = 1 + k dt``, ``c_v = (1 + k (1 - s)) dt``,
    ``k = sigma_t^2 / (2 s)``, ``dt = s' - s``; ``std = sigma_t sqrt(-dt)``."""
    dt = s_next - s  # negative
    k = sigma_t.square() / (2 * s)
    mean = _combine(x, 1 + k * dt, v, (1 + k * (1 - s)) * dt)
    return _finish(mean, sigma_t * torch.sqrt(-dt), prev_sample, generator, reduction)


def dance_sde_step(velocity: torch.Tensor, sample: torch.Tensor, sigma: Number, sigma_next: Number,
                   noise_level: Number, prev_sample: Optional[torch.Tensor] = None,
                   generator: Optional[torch.Generator] = None, reduction: str = "mean",
                   validate: bool = True) -> StepOutput:
    """Dance-SDE step (DanceGRPO, Xue et al. 2025, arXiv 2505.07818): the reverse SDE of the Flow-GRPO step with a
    CONSTANT diffusion coefficient ``sigma_t = noise_level`` (eta) instead of ``a sqrt(s / (1 - s))``:
    ``mu = x + (v + eta^2 / (2 s) (x + (1 - s) v)) (s' - s)``, ``std = eta sqrt(s - s')``.

    Hidden assumptions (docs/algorithms.md §1.6): the score ``-(x + (1 - s) v) / s`` is that of the rectified-flow
    marginal ``x_s = (1 - s) x0 + s eps`` with ``v`` its exact velocity (so ``x + (1 - s) v`` estimates ``eps``);
    the step is first order (Euler-Maruyama) and its marginals match the ODE's only as the step size goes to 0;
    ``s > s' >= 0`` (checked with the schedule). ``noise_level = 0`` is the Euler
    ODE step; unlike Flow-GRPO's coefficient it stays finite at ``s = 1``, and it injects the same noise per unit
    time at every level, so it is relatively stronger late (small s) than Flow-GRPO's.
    """
    x, v, s, s_next, eta = _flow_inputs(velocity, sample, sigma, sigma_next, noise_level, prev_sample, validate, None)
    return _reverse_sde(x, v, s, s_next, eta.to(s.dtype), prev_sample, generator, reduction)


def cps_step(velocity: torch.Tensor, sample: torch.Tensor, sigma: Number, sigma_next: Number, noise_level: Number,
             prev_sample: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
             reduction: str = "mean", validate: bool = True) -> StepOutput:
    """Coefficients-preserving sampling step (Wang & Yu 2025, "Coefficients-Preserving Sampling for
    Reinforcement Learning with Flow Matching", arXiv 2509.05952), noise level ``a`` in [0, 1].

    ``std = s' sin(a pi / 2)``, ``mu = (1 - s') x0_hat + sqrt(s'^2 - std^2) x1_hat`` with
    ``x0_hat = x - s v`` and ``x1_hat = x + (1 - s) v``. The log-prob is the exact Gaussian density
    (a surrogate ``-mean((x' - mu)^2)`` would differ from it by a per-step constant and scale).

    Computed as ``c_x x + c_v v`` with ``keep = sqrt(s'^2 - std^2) = s' cos(a pi / 2)``, ``d = keep - s' =
    -2 s' sin^2(a pi / 4)`` (no cancellation), ``c_x = 1 + d`` and ``c_v = d (1 - s) + (s' - s)``; with
    noise level 0 this is the Euler step ``x + (s' - s) v`` with exact coefficients.
    """
    x, v, s, s_next, a = _flow_inputs(velocity, sample, sigma, sigma_next, noise_level, prev_sample, validate, 1.0)
    std = s_next * torch.sin(a * (math.pi / 2))
    d = -2 * s_next * torch.sin(a * (math.pi / 4)).square()
    mean = _combine(x, 1 + d, v, d * (1 - s) + (s_next - s))
    return _finish(mean, std, prev_sample, generator, reduction)


def ddim_step(
    noise_pred: torch.Tensor,
    sample: torch.Tensor,
    alpha_bar: Number,
    alpha_bar_prev: Number,
    eta: Number,
    prev_sample: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    reduction: str = "mean",
    validate: bool = True,
) -> StepOutput:
    """DDIM eta-step for DDPM-family models (Song et al. 2020, "Denoising Diffusion Implicit Models",
    arXiv 2010.02502, eq. 12 and 16; DDPO, Black et al. 2023, arXiv 2305.13301, uses eta = 1).

    ``alpha_bar`` / ``alpha_bar_prev`` are the cumulative alphas at the current and the next (less
    noisy) timestep. ``var = (1-ab')/(1-ab) * (1 - ab/ab')``, ``std = eta sqrt(var)``,
    ``mu = sqrt(ab') x0_hat + sqrt(1 - ab' - std^2) eps_hat`` with ``x0_hat = (x - sqrt(1-ab) eps) / sqrt(ab)``,
    computed as ``c_x x + c_e eps`` with per-sample ``c_x = sqrt(ab') / sqrt(ab)`` and
    ``c_e = sqrt(1 - ab' - std^2) - c_x sqrt(1 - ab)``.
    """
    _check_pair(noise_pred, sample, prev_sample)
    ab = _per_sample(alpha_bar, sample, "alpha_bar")
    ab_prev = _per_sample(alpha_bar_prev, sample, "alpha_bar_prev")
    e = _per_sample(eta, sample, "eta")
    if validate:
        if not torch.all((ab > 0) & (ab < 1)):
            raise ValueError(f"alpha_bar must lie in (0, 1), got {ab.tolist()}")
        if not torch.all((ab_prev > ab) & (ab_prev <= 1)):
            raise ValueError(
                f"alpha_bar_prev must lie in (alpha_bar, 1], got alpha_bar={ab.tolist()} alpha_bar_prev={ab_prev.tolist()}"
            )
        _check_noise_level(eta)
    x = sample.to(ab.dtype) if sample.dtype != ab.dtype else sample
    eps = noise_pred.to(ab.dtype) if noise_pred.dtype != ab.dtype else noise_pred
    var = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
    std = e * torch.sqrt(var)
    dir_coef = torch.sqrt(torch.clamp(1 - ab_prev - std.square(), min=0))
    cx = torch.sqrt(ab_prev) / torch.sqrt(ab)
    mean = _combine(x, cx, eps, dir_coef - cx * torch.sqrt(1 - ab))
    return _finish(mean, std, prev_sample, generator, reduction)


def gaussian_kl(mean_a: torch.Tensor, mean_b: torch.Tensor, std: Number, reduction: str = "mean") -> torch.Tensor:
    """KL(N(mean_a, std^2) || N(mean_b, std^2)) per sample -> ``[B]`` (the per-step policy KL of
    Flow-GRPO, arXiv 2505.05470, for two Gaussian transitions sharing their std).

    ``= reduce_e((mean_a - mean_b)^2) / (2 std^2)``; ``std`` is a scalar or ``[B]`` (use the exact
    transition std ``sigma_t * sqrt(dt)``, not the anchor's ``sigma_t``). Entries with ``std == 0`` are 0:
    a deterministic transition carries no density, so the KL between two of them is not defined; callers
    mask such tokens out, and a finite 0 keeps them from poisoning sums and gradients. The masking runs on
    ``[B]``-sized tensors after the single full-size pass.
    """
    if mean_a.shape != mean_b.shape:
        raise ValueError(f"mean shapes differ: {tuple(mean_a.shape)} vs {tuple(mean_b.shape)}")
    _check_reduction(reduction)
    s = _per_sample(std, mean_a, "std")
    red = _sq_dist(mean_a, mean_b, reduction)
    s = s.to(torch.promote_types(red.dtype, s.dtype))
    deterministic = s == 0
    safe = torch.where(deterministic, 1.0, s)
    return torch.where(deterministic, 0.0, 0.5 * red / safe.square())


STEP_FUNCTIONS = {"sde": flow_sde_step, "cps": cps_step, "dance": dance_sde_step}


def flow_step(kind: str):
    """Return the flow-matching step function registered as ``kind`` ('sde', 'cps' or 'dance')."""
    try:
        return STEP_FUNCTIONS[kind]
    except KeyError:
        raise ValueError(f"unknown step kind {kind!r}; valid: {sorted(STEP_FUNCTIONS)}") from None
