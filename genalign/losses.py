"""Policy-gradient surrogates, loss aggregation, KL estimators and preference losses.

Pure math: tensors in, tensors out; imports only torch (and ``sde.gaussian_kl``). Shared by the
diffusion trainer and the LLM pipeline (docs/algorithms.md §9).

Conventions
-----------
* A "token" is one unit that carries a log-probability: an LLM response token, or ONE DENOISING STEP
  of a diffusion/flow rollout. Per-token tensors are ``[B, T]`` (``T`` = response length or number of
  trained steps); ``mask`` is ``[B, T]`` (bool or 0/1), ``None`` meaning every token is valid.
* ``logp`` is the current policy's log-prob (carries the gradient); ``old_logp`` (rollout policy) and
  ``ref_logp`` (reference policy) are treated as constants.
* Advantages are ``[B]`` (one per sequence, broadcast over tokens) or ``[B, T]`` (per token/step).
* Loss functions return the quantity to MINIMISE.
* Surrogate (how a token's loss is formed) and aggregation (how token losses become a scalar) are
  separate choices, each picked by name from a registry with one call signature.
* Aggregation divides by counts that may be GLOBAL (whole optimizer batch across gradient-accumulation
  micro-batches and ranks): pass ``num_tokens`` / ``num_seqs`` and the micro-batch losses SUM to the
  full-batch loss. Without them the local counts are used.
* Statistics are returned as detached tensors (no ``.item()``: no host sync inside the loss).
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .registry import Registry
from .sde import gaussian_kl  # noqa: F401  (re-export: closed-form Gaussian KL for diffusion steps)

Tensor = torch.Tensor
Number = Union[float, int, Tensor]


# ----------------------------------------------------------------------------------------------------
# small helpers


def _mask_like(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """``mask`` as a bool tensor of ``x``'s shape (all True when ``None``)."""
    if mask is None:
        return torch.ones_like(x, dtype=torch.bool)
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {tuple(x.shape)}")
    return mask.bool()


def masked_sum(x: Tensor, mask: Optional[Tensor], dim=None) -> Tensor:
    """Sum of ``x`` over valid entries (invalid entries may hold NaN/inf; they are ignored)."""
    m = _mask_like(x, mask)
    x = torch.where(m, x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim=dim)


def masked_mean(x: Tensor, mask: Optional[Tensor], dim=None) -> Tensor:
    """Mean of ``x`` over valid entries; 0 where there is none."""
    m = _mask_like(x, mask)
    count = m.sum() if dim is None else m.sum(dim=dim)
    return masked_sum(x, m, dim) / count.clamp_min(1)


def masked_std(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Population standard deviation of ``x`` over valid entries (scalar)."""
    m = _mask_like(x, mask)
    mean = masked_mean(x, m)
    return masked_mean((x - mean) ** 2, m).sqrt()


def _f32(x: Tensor) -> Tensor:
    """Upcast half / bfloat16 to float32: ratios near 1 and clip ranges like 1e-4 need the precision."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _per_token(values: Tensor, like: Tensor, name: str) -> Tensor:
    """Broadcast ``[B]`` (per sequence) or ``[B, T]`` values to ``like`` (``[B, T]``)."""
    if values.ndim == 1 and values.shape[0] == like.shape[0]:
        return values.unsqueeze(1).expand_as(like)
    if values.shape == like.shape:
        return values
    raise ValueError(f"{name} must have shape [B] or [B, T] = {tuple(like.shape)}, got {tuple(values.shape)}")


# ----------------------------------------------------------------------------------------------------
# ratios


RATIO_LEVELS = ("token", "sequence", "sequence_token")


def log_ratio(logp: Tensor, old_logp: Tensor, mask: Optional[Tensor] = None, level: str = "token") -> Tensor:
    """Log importance ratio ``log pi/pi_old`` per token -> ``[B, T]`` (0 at invalid tokens).

    ``level``:
      * ``"token"``: ``logp - old_logp`` (PPO/GRPO).
      * ``"sequence"`` (GSPO): every token of a sequence gets ``s_b = mean_t(logp - old_logp)`` over the
        valid tokens, i.e. ratio ``exp(s_b)`` (length-normalised sequence ratio).
      * ``"sequence_token"`` (GSPO-token): value equal to ``"sequence"``, but the gradient flows per token
        as ``grad logp_t``: ``logp - sg(logp) + sg(s_b)``.
    """
    if logp.shape != old_logp.shape or logp.ndim != 2:
        raise ValueError(f"logp and old_logp must both be [B, T], got {tuple(logp.shape)} and {tuple(old_logp.shape)}")
    m = _mask_like(logp, mask)
    token = torch.where(m, logp - old_logp.detach(), torch.zeros_like(logp))
    if level == "token":
        return token
    seq = masked_mean(token, m, dim=1).unsqueeze(1)  # [B, 1]
    if level == "sequence":
        out = seq.expand_as(token)
    elif level == "sequence_token":
        safe_logp = torch.where(m, logp, torch.zeros_like(logp))
        out = safe_logp - safe_logp.detach() + seq.detach()
    else:
        raise ValueError(f"unknown ratio level {level!r}; valid: {list(RATIO_LEVELS)}")
    return torch.where(m, out, torch.zeros_like(out))


# ----------------------------------------------------------------------------------------------------
# surrogates


class SurrogateOutput(NamedTuple):
    """Per-token loss ``[B, T]`` and a bool ``[B, T]`` marking tokens whose ratio was clipped (no gradient)."""

    loss: Tensor
    clipped: Tensor


def ppo_clip(
    ratio: Tensor,
    advantages: Tensor,
    eps_low: Number = 0.2,
    eps_high: Optional[Number] = None,
    dual_clip: Optional[float] = None,
    return_clipped: bool = False,
):
    """PPO clipped surrogate per token: ``max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))``.

    ratio: ``[B, T]``; advantages ``[B]`` or ``[B, T]``; ``eps_low`` / ``eps_high`` scalars or per-token
    ``[B, T]`` tensors (``eps_high=None`` -> ``eps_low``; ``eps_high > eps_low`` is DAPO clip-higher).
    ``dual_clip=c`` (> 1; 3 or 10 typical) bounds the loss of negative-advantage tokens by ``-A c``
    (dual-clip PPO). Returns the loss ``[B, T]``, or ``SurrogateOutput(loss, clipped)`` when
    ``return_clipped``; a token counts as clipped when the clipped branch is active with zero gradient.
    """
    ratio = _f32(ratio)
    adv = _per_token(advantages, ratio, "advantages").detach()
    eps_high = eps_low if eps_high is None else eps_high
    low = 1 - torch.as_tensor(eps_low, dtype=ratio.dtype, device=ratio.device)
    high = 1 + torch.as_tensor(eps_high, dtype=ratio.dtype, device=ratio.device)
    clipped_ratio = torch.minimum(torch.maximum(ratio, low), high)
    loss = torch.maximum(-adv * ratio, -adv * clipped_ratio)
    clipped = ((adv > 0) & (ratio > high)) | ((adv < 0) & (ratio < low))
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        dual = (adv < 0) & (ratio > dual_clip)
        loss = torch.where(dual, -adv * dual_clip, loss)
        clipped = clipped | dual
    return SurrogateOutput(loss, clipped) if return_clipped else loss


def cispo(
    ratio: Tensor,
    advantages: Tensor,
    logp: Tensor,
    eps_low: Optional[Number] = None,
    eps_high: Number = 0.2,
    return_clipped: bool = False,
):
    """CISPO (MiniMax-M1): ``-sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * logp`` per token.

    The importance weight is clipped and detached, so EVERY token keeps the gradient ``A w grad logp``
    (no token is dropped, unlike PPO). ``eps_low=None`` means no lower bound (the paper's default).
    ratio, logp: ``[B, T]``; advantages ``[B]`` or ``[B, T]``. ``clipped`` marks tokens whose weight was
    clipped (they still get a gradient).
    """
    adv = _per_token(advantages, ratio, "advantages").detach()
    r = ratio.detach()
    high = 1 + torch.as_tensor(eps_high, dtype=r.dtype, device=r.device)
    weight = torch.minimum(r, high)
    clipped = r > high
    if eps_low is not None:
        low = 1 - torch.as_tensor(eps_low, dtype=r.dtype, device=r.device)
        weight = torch.maximum(weight, low)
        clipped = clipped | (r < low)
    loss = -adv * weight * logp
    return SurrogateOutput(loss, clipped) if return_clipped else loss


# HAPO (Heterogeneous Adaptive Policy Optimization, arXiv 2509.16591) -------------------------------
#
# Both HAPO pieces are driven by a per-token normalised entropy score ``h`` in [-1, 1]: ``h > 0`` for
# high-entropy ("forking") tokens, ``h <= 0`` for low-entropy ones; ``h = 0`` is neutral.
# ``entropy_score`` builds ``h`` from raw entropies: ``z = (log H - pivot) / rms(log H - pivot)``, then
# positive z are divided by ``max z`` and negative z by ``|min z|``. SIGN BUG in the released code
# (``compute_entropy_h``): it computes ``scale_neg = 1 / min z``, a NEGATIVE number, and multiplies the
# negative z by it, so NEGATIVE scores become POSITIVE: almost every token looks high-entropy, the
# low-entropy branches of adaptive clipping / redistribution never fire and low-entropy tokens get the
# high-entropy treatment. We keep the sign (divide by ``|min z|``), which is what the paper describes.


def entropy_score(entropy: Tensor, mask: Optional[Tensor] = None, pivot: float = 0.5, eps: float = 1e-8) -> Tensor:
    """Normalised entropy score ``h`` in [-1, 1] per token -> ``[B, T]`` (0 at invalid tokens).

    entropy: ``[B, T]`` per-token entropies of the policy. Over the valid tokens of the batch:
    ``z = (log H - q) / sqrt(mean((log H - q)^2))`` with ``q`` the ``pivot``-quantile (0.5 = median) of
    ``log H``; then ``h = z / max(z)`` for ``z > 0`` and ``h = z / |min(z)|`` for ``z <= 0`` (sign kept;
    see the note on the released code's sign bug above). Computed without gradient.
    """
    with torch.no_grad():
        m = _mask_like(entropy, mask)
        logh = torch.log(entropy.float().clamp_min(eps))
        valid = logh[m]
        if valid.numel() == 0:
            return torch.zeros_like(entropy)
        k = int(round(pivot * (valid.numel() - 1))) + 1  # nearest-rank quantile (no size limit, unlike quantile)
        q = valid.kthvalue(k).values
        z = (logh - q) / ((valid - q) ** 2).mean().clamp_min(eps).sqrt()
        zv = z[m]
        pos_scale = 1.0 / zv.max().clamp_min(eps)
        neg_scale = 1.0 / zv.min().clamp_max(-eps).abs()  # released code: 1 / min(z) < 0 (the sign bug)
        h = torch.where(z > 0, z * pos_scale, z * neg_scale).clamp(-1, 1)
        return torch.where(m, h, torch.zeros_like(h)).to(entropy.dtype)


def hapo_clip_bounds(entropy_score: Tensor, eps_low: float = 0.2, eps_high: float = 0.28, alpha: float = 1.0):
    """HAPO asymmetric adaptive clipping -> per-token ``(eps_low, eps_high)``, each ``[B, T]``.

    Low-entropy tokens (``h <= 0``) widen the LOWER range: ``eps_low (1 - alpha h)`` (probability may
    drop further: noisy confident tokens); high-entropy tokens (``h > 0``) widen the UPPER range:
    ``eps_high (1 + alpha h)`` (room to explore). The other bound stays at its base value. With ``h = 0``
    this is exactly the DAPO (clip-higher) range.
    """
    h = entropy_score.detach()
    base_low = torch.full_like(h, float(eps_low))
    base_high = torch.full_like(h, float(eps_high))
    low = torch.where(h <= 0, base_low * (1 - alpha * h), base_low)
    high = torch.where(h > 0, base_high * (1 + alpha * h), base_high)
    return low, high


def hapo_redistribute(advantages: Tensor, entropy_score: Tensor, ratio: Tensor, eps_low: Number = 0.2,
                      eps_high: Number = 0.28, beta: float = 1.0) -> Tensor:
    """HAPO differential advantage redistribution -> ``[B, T]``.

    ``A_h = A (1 + beta h)``. A token whose ratio lies in the neutral zone
    ``(1 - eps_low/2, 1 + eps_high/2)`` (not yet pushed far) gets ``A_h`` only if it has low entropy; a
    token outside that zone gets ``A_h`` only if it has high entropy (``h > 0``). Everything else keeps
    ``A``. With ``h = 0`` the advantages are unchanged. ``eps_*`` may be per-token tensors.
    """
    h = entropy_score.detach()
    adv = _per_token(advantages, h, "advantages")
    r = ratio.detach()
    scaled = adv * (1 + beta * h)
    neutral = (r > 1 - torch.as_tensor(eps_low) / 2) & (r < 1 + torch.as_tensor(eps_high) / 2)
    use_scaled = torch.where(h > 0, ~neutral, neutral)
    return torch.where(use_scaled, scaled, adv)


def hapo_surrogate(ratio: Tensor, advantages: Tensor, entropy_score: Tensor, eps_low: float = 0.2, eps_high: float = 0.28,
                   dual_clip: Optional[float] = None, clip_alpha: float = 1.0, adv_beta: float = 1.0,
                   return_clipped: bool = False):
    """HAPO loss per token: adaptive bounds + redistributed advantages fed to :func:`ppo_clip`.

    ``entropy_score`` ``[B, T]`` in [-1, 1] (see :func:`entropy_score`); all zeros gives DAPO exactly.
    """
    low, high = hapo_clip_bounds(entropy_score, eps_low, eps_high, clip_alpha)
    adv = hapo_redistribute(advantages, entropy_score, ratio, low, high, adv_beta)
    return ppo_clip(ratio, adv, low, high, dual_clip, return_clipped)


# registry: fn(log_ratio, advantages, logp, *, eps_low, eps_high, dual_clip, **options) -> SurrogateOutput
SURROGATES = Registry("surrogate")


def register_surrogate(name: str):
    """Decorator registering ``fn(log_ratio, advantages, logp, *, eps_low, eps_high, dual_clip, **options)
    -> SurrogateOutput``. A taken name raises ``ValueError``."""
    return SURROGATES.register(name)


def get_surrogate(name_or_fn) -> Callable[..., SurrogateOutput]:
    """Registered surrogate by name (or the callable itself); unknown names list the valid ones."""
    return SURROGATES.get(name_or_fn)


@register_surrogate("ppo_clip")
def _ppo_clip_surrogate(log_r, advantages, logp, *, eps_low, eps_high=None, dual_clip=None):
    return ppo_clip(torch.exp(log_r), advantages, eps_low, eps_high, dual_clip, return_clipped=True)


@register_surrogate("cispo")
def _cispo_surrogate(log_r, advantages, logp, *, eps_low=None, eps_high=None, dual_clip=None, cispo_eps_low=None):
    # CISPO has no lower bound by default; its upper range defaults to the shared eps_high / eps_low.
    high = eps_low if eps_high is None else eps_high
    return cispo(torch.exp(log_r), advantages, logp, cispo_eps_low, high, return_clipped=True)


@register_surrogate("hapo")
def _hapo_surrogate(log_r, advantages, logp, *, eps_low, eps_high=None, dual_clip=None, entropy_score,
                    clip_alpha=1.0, adv_beta=1.0):
    high = eps_low if eps_high is None else eps_high
    return hapo_surrogate(torch.exp(log_r), advantages, entropy_score, eps_low, high, dual_clip, clip_alpha,
                          adv_beta, return_clipped=True)


@register_surrogate("dppo_mask")
def _dppo_mask_surrogate(log_r, advantages, logp, *, eps_low=None, eps_high=None, dual_clip=None, divergence,
                         threshold):
    """DPPO's divergence trust region instead of ratio clipping: ``-A r`` per token, with no gradient where the
    divergence of the current from the sampling policy (``divergence [B, T]``, e.g. the per-step Gaussian KL)
    exceeds ``threshold`` AND the ratio has already moved the way the advantage pushes it (``A > 0, r > 1`` or
    ``A < 0, r < 1``); tokens moving back toward the sampling policy always keep their gradient."""
    ratio = torch.exp(_f32(log_r))
    adv = _per_token(advantages, ratio, "advantages").detach()
    div = _per_token(divergence, ratio, "divergence").detach()
    masked = (div > threshold) & (((adv > 0) & (ratio > 1)) | ((adv < 0) & (ratio < 1)))
    loss = torch.where(masked, (-adv * ratio).detach(), -adv * ratio)
    return SurrogateOutput(loss, masked)


# ----------------------------------------------------------------------------------------------------
# aggregation

# registry: fn(per_token_loss [B, T], mask bool [B, T], num_tokens, num_seqs, normalizer) -> scalar
AGGREGATIONS = Registry("aggregation")


def register_aggregation(name: str):
    """Decorator registering ``fn(per_token_loss, mask, num_tokens, num_seqs, normalizer) -> scalar``
    (``mask`` is a bool tensor; counts are already resolved). A taken name raises ``ValueError``."""
    return AGGREGATIONS.register(name)


def get_aggregation(name_or_fn) -> Callable[..., Tensor]:
    """Registered aggregation by name (or the callable itself); unknown names list the valid ones."""
    return AGGREGATIONS.get(name_or_fn)


@register_aggregation("token_mean")
def _token_mean(loss, mask, num_tokens, num_seqs, normalizer):
    return masked_sum(loss, mask) / num_tokens


@register_aggregation("seq_mean_token_mean")
def _seq_mean_token_mean(loss, mask, num_tokens, num_seqs, normalizer):
    per_seq = masked_sum(loss, mask, dim=1) / mask.sum(dim=1).clamp_min(1)
    return per_seq.sum() / num_seqs


@register_aggregation("seq_mean_token_sum")
def _seq_mean_token_sum(loss, mask, num_tokens, num_seqs, normalizer):
    return masked_sum(loss, mask) / num_seqs


@register_aggregation("constant")
def _constant(loss, mask, num_tokens, num_seqs, normalizer):
    return masked_sum(loss, mask) / (num_seqs * normalizer)


def aggregate(
    per_token_loss: Tensor,
    mask: Optional[Tensor] = None,
    mode: str = "token_mean",
    num_tokens: Optional[Number] = None,
    num_seqs: Optional[Number] = None,
    normalizer: Optional[Number] = None,
) -> Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar.

    Modes (``mask`` ``[B, T]``; counts default to this micro-batch's own):
      * ``"token_mean"`` (DAPO): ``sum_{b,t} m l / num_tokens`` (``num_tokens`` = valid tokens);
      * ``"seq_mean_token_mean"`` (GRPO): ``sum_b (sum_t m l / n_b) / num_seqs``;
      * ``"seq_mean_token_sum"``: ``sum_{b,t} m l / num_seqs``;
      * ``"constant"`` (Dr.GRPO): ``sum_{b,t} m l / (num_seqs * normalizer)``; ``normalizer`` defaults
        to ``T`` (max length / number of steps).
    Pass GLOBAL ``num_tokens`` / ``num_seqs`` (over all gradient-accumulation micro-batches and ranks)
    so that the sum of micro-batch losses equals the full-batch loss.
    """
    if per_token_loss.ndim != 2:
        raise ValueError(f"per_token_loss must be [B, T], got {tuple(per_token_loss.shape)}")
    fn = get_aggregation(mode)
    m = _mask_like(per_token_loss, mask)
    num_tokens = m.sum().clamp_min(1) if num_tokens is None else num_tokens
    num_seqs = per_token_loss.shape[0] if num_seqs is None else num_seqs
    normalizer = per_token_loss.shape[1] if normalizer is None else normalizer
    return fn(per_token_loss, m, num_tokens, num_seqs, normalizer)


# ----------------------------------------------------------------------------------------------------
# KL


KL_KINDS = ("k1", "k2", "k3")


def kl_divergence(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from log-probs of tokens sampled from ``pi`` (any shape).

    With ``d = ref_logp - logp``: ``k1 = -d`` (unbiased, high variance, may be negative);
    ``k2 = d^2 / 2``; ``k3 = exp(d) - d - 1`` (unbiased, >= 0; the usual GRPO choice). ``ref_logp`` is
    treated as a constant. For diffusion steps the exact Gaussian KL is :func:`gaussian_kl` (re-exported
    from ``sde``): pass it as ``kl=`` to :func:`policy_loss`.
    """
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} shapes differ")
    d = ref_logp.detach() - logp
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d**2
    if kind == "k3":
        return torch.exp(d) - d - 1
    raise ValueError(f"unknown KL kind {kind!r}; valid: {list(KL_KINDS)}")


# ----------------------------------------------------------------------------------------------------
# the policy loss


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Optional[Tensor] = None,
    *,
    surrogate: Union[str, Callable] = "ppo_clip",
    ratio_level: str = "token",
    aggregation: Union[str, Callable] = "token_mean",
    eps_low: Number = 0.2,
    eps_high: Optional[Number] = None,
    dual_clip: Optional[float] = None,
    num_tokens: Optional[Number] = None,
    num_seqs: Optional[Number] = None,
    normalizer: Optional[Number] = None,
    weights: Optional[Tensor] = None,
    ref_logp: Optional[Tensor] = None,
    kl_kind: Optional[str] = None,
    kl_coef: float = 0.0,
    kl: Optional[Tensor] = None,
    **surrogate_options,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Clipped policy-gradient loss + optional KL penalty -> ``(loss scalar, stats)``.

    THE loss of both trainers: LLM tokens (``logp`` ``[B, T]`` response tokens) and diffusion steps
    (``logp`` ``[B, k]`` for the k trained denoising steps).

    logp, old_logp: ``[B, T]``; advantages ``[B]`` or ``[B, T]``; mask ``[B, T]`` or None.
    surrogate: name in :data:`SURROGATES` (``"ppo_clip"``, ``"cispo"``, ``"hapo"``) or a callable with
      the registry signature; extra keyword ``surrogate_options`` go to it (HAPO: ``entropy_score``
      ``[B, T]``, ``clip_alpha``, ``adv_beta``; CISPO: ``cispo_eps_low``). CISPO clips its weight at
      ``1 + (eps_high or eps_low)`` and has no lower bound unless ``cispo_eps_low`` is given.
    ratio_level: ``"token"``, ``"sequence"`` (GSPO) or ``"sequence_token"`` (GSPO-token).
    aggregation: name in :data:`AGGREGATIONS`; ``num_tokens``/``num_seqs``/``normalizer`` as in
      :func:`aggregate` (pass GLOBAL counts under gradient accumulation).
    weights: optional ``[B]`` or ``[B, T]`` multipliers of the per-token POLICY loss (TempFlow
      noise-aware step weights, GRPO-Guard ``1/dt``); the KL term is not weighted.
    KL: ``kl`` (precomputed per-token KL, ``[B]`` or ``[B, T]``, e.g. ``gaussian_kl`` per step) or
      ``kl_kind`` + ``ref_logp`` (:func:`kl_divergence`). Added as ``kl_coef * aggregate(kl)`` with the
      same aggregation. ``kl_coef > 0`` without a KL source raises.

    stats (detached tensors, local to this micro-batch, masked means over valid tokens): ``pg_loss``,
    ``kl_loss``, ``ratio_mean``, ``ratio_std``, ``clip_frac``, ``clip_frac_pos`` / ``clip_frac_neg``
    (fraction of positive- / negative-advantage tokens clipped), ``approx_kl`` (k3 estimate of
    ``KL(pi_old || pi)`` from the token ratios), ``kl`` (mean per-token KL to the reference, 0 if none).
    """
    if logp.ndim != 2:
        raise ValueError(f"logp must be [B, T] (a denoising step is a token), got {tuple(logp.shape)}")
    m = _mask_like(logp, mask)
    logp, old_logp = _f32(logp), _f32(old_logp)
    zero = torch.zeros_like(logp)
    logp = torch.where(m, logp, zero)  # padding may hold garbage (NaN/inf): keep it out of values and grads
    old_logp = torch.where(m, old_logp.detach(), zero)
    log_r = log_ratio(logp, old_logp, m, ratio_level)
    adv = _per_token(advantages, logp, "advantages").detach()
    out = get_surrogate(surrogate)(log_r, adv, logp, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
                                   **surrogate_options)
    per_token = out.loss
    if weights is not None:
        per_token = per_token * _per_token(weights, logp, "weights").detach()
    agg = dict(mode=aggregation, num_tokens=num_tokens, num_seqs=num_seqs, normalizer=normalizer)
    pg = aggregate(per_token, m, **agg)

    if kl is None and kl_kind is not None:
        if ref_logp is None:
            raise ValueError(f"kl_kind={kl_kind!r} needs ref_logp")
        kl = kl_divergence(logp, torch.where(m, ref_logp.detach(), zero), kl_kind)
    if kl is not None:
        kl = _per_token(kl, logp, "kl")
        kl_term = aggregate(kl, m, **agg)
    elif kl_coef:
        raise ValueError("kl_coef > 0 needs either kl= (precomputed) or kl_kind= with ref_logp=")
    else:
        kl_term = torch.zeros((), dtype=pg.dtype, device=pg.device)
    loss = pg + kl_coef * kl_term if kl_coef else pg

    with torch.no_grad():
        token_log_r = torch.where(m, logp - old_logp, torch.zeros_like(logp))
        ratio = torch.exp(log_r)
        clipped = out.clipped.float()
        stats = {
            "pg_loss": pg.detach(),
            "kl_loss": kl_term.detach(),
            "ratio_mean": masked_mean(ratio, m),
            "ratio_std": masked_std(ratio, m),
            "clip_frac": masked_mean(clipped, m),
            "clip_frac_pos": masked_mean(clipped, m & (adv > 0)),
            "clip_frac_neg": masked_mean(clipped, m & (adv < 0)),
            "approx_kl": masked_mean(torch.exp(token_log_r) - 1 - token_log_r, m),
            "kl": masked_mean(kl, m) if kl is not None else torch.zeros_like(pg),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def per_sample_mse(a: Tensor, b: Tensor) -> Tensor:
    """``mean over elements of (a - b)^2`` per sample ``[B]`` in float32: the flow-matching / denoising loss of each
    sample when ``a`` is a prediction and ``b`` its target."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


# ----------------------------------------------------------------------------------------------------
# preference losses (docs/algorithms.md §9.8, §9.9 and §6)
#
# All return PER-PAIR (or per-sample) losses ``[B]``; take ``.mean()`` (or aggregate) yourself.
# "logps" are summed log-probs of a response, "logratios" are ``logp - ref_logp``. For diffusion, a
# response's per-step log-ratios play the role of its tokens.


def _seq_sum(per_token: Tensor, mask: Optional[Tensor]) -> Tensor:
    """``[B, T]`` -> ``[B]`` sum over valid tokens; ``[B]`` inputs pass through (already summed)."""
    return per_token if per_token.ndim == 1 else masked_sum(per_token, mask, dim=1)


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float = 0.1, label_smoothing: float = 0.0) -> Tensor:
    """DPO: ``-log sigmoid(beta * (d_w - d_l))`` with ``d = logp - ref_logp`` (summed) -> ``[B]``.

    ``label_smoothing = e`` gives the conservative DPO ``-(1 - e) log s(x) - e log s(-x)``.
    """
    logits = beta * ((policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps))
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def simpo_loss(chosen_logps_sum: Tensor, rejected_logps_sum: Tensor, chosen_len: Tensor, rejected_len: Tensor,
               beta: float = 2.0, gamma: float = 0.5) -> Tensor:
    """SimPO (no reference): ``-log sigmoid(beta * (lp_w / |y_w| - lp_l / |y_l|) - gamma)`` -> ``[B]``.

    ``gamma`` is the target reward margin (TRL's ``gamma_beta_ratio`` is ``gamma / beta``).
    """
    margin = chosen_logps_sum / chosen_len - rejected_logps_sum / rejected_len
    return -F.logsigmoid(beta * margin - gamma)


def sequential_kl(logits: Tensor, ref_logits: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """TDPO's sequential KL ``sum_t KL(pi_ref(.|x, y<t) || pi(.|x, y<t))`` -> ``[B]``.

    logits, ref_logits: ``[B, T, V]`` at the response positions; mask ``[B, T]``. Gradient flows into
    ``logits`` only.
    """
    ref_logp = torch.log_softmax(ref_logits.detach().float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - torch.log_softmax(logits.float(), dim=-1))).sum(-1)
    return masked_sum(kl, mask, dim=1)


def tdpo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_seq_kl: Tensor,
    rejected_seq_kl: Tensor,
    alpha: float = 0.5,
    beta: float = 0.1,
    version: int = 2,
    chosen_mask: Optional[Tensor] = None,
    rejected_mask: Optional[Tensor] = None,
) -> Tensor:
    """Token-level DPO (TDPO, Zeng et al. 2024) -> ``[B]``.

    logratios: ``[B, T]`` per token (summed with the masks) or ``[B]`` already summed; seq_kl ``[B]``
    from :func:`sequential_kl` (diffusion: summed per-step Gaussian KL). With ``u = d_w - d_l``:
    TDPO1 ``-log s(beta (u - (KL_l - KL_w)))``; TDPO2 ``-log s(beta (u - alpha (KL_l - sg(KL_w))))``.
    """
    u = _seq_sum(chosen_logratios, chosen_mask) - _seq_sum(rejected_logratios, rejected_mask)
    if version == 1:
        delta = rejected_seq_kl - chosen_seq_kl
    elif version == 2:
        delta = alpha * (rejected_seq_kl - chosen_seq_kl.detach())
    else:
        raise ValueError(f"tdpo version must be 1 or 2, got {version!r}")
    return -F.logsigmoid(beta * (u - delta))


def tgdpo_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, chosen_token_rewards: Tensor,
               rejected_token_rewards: Tensor, alpha: float = 1.0, beta: float = 0.1,
               chosen_mask: Optional[Tensor] = None, rejected_mask: Optional[Tensor] = None) -> Tensor:
    """TGDPO (token-level reward guidance, Zhu et al. 2025) -> ``[B]``.

    Per-token DPO weights ``beta (1 + alpha beta r_t)`` on the chosen response and
    ``beta (1 - alpha beta r_t)`` on the rejected one, where ``r_t`` (``[B, T]``, treated as constant) is
    the guidance token reward, e.g. a DPO model's per-token log-ratio. loss
    ``-log s(sum_t w^w_t d^w_t - sum_t w^l_t d^l_t)``; ``alpha = 0`` is DPO.
    """
    w_w = beta * (1 + alpha * beta * chosen_token_rewards.detach())
    w_l = beta * (1 - alpha * beta * rejected_token_rewards.detach())
    chosen = masked_sum(w_w * chosen_logratios, chosen_mask, dim=1)
    return -F.logsigmoid(chosen - masked_sum(w_l * rejected_logratios, rejected_mask, dim=1))


def treg_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, chosen_token_rewards: Tensor,
              rejected_token_rewards: Tensor, beta: float = 0.1, alpha: float = 1.0,
              chosen_mask: Optional[Tensor] = None, rejected_mask: Optional[Tensor] = None) -> Tensor:
    """T-REG: DPO + token-reward-weighted likelihood regulariser -> ``[B]``.

    ``DPO(sum d_w, sum d_l) + alpha * reg`` with
    ``reg = -beta (mean_t r^w_t d^w_t + mean_t r^l_t d^l_t)``: each token's implicit reward
    ``beta d_t`` is pushed in the direction of its (signed, constant) token reward ``r_t`` (e.g.
    self-generated by contrastive prompting; positive = good token). Means run over valid tokens.
    This is our simplified form of the paper's regulariser (it does not re-weight per sequence).
    """
    d_w, d_l = masked_sum(chosen_logratios, chosen_mask, 1), masked_sum(rejected_logratios, rejected_mask, 1)
    dpo = -F.logsigmoid(beta * (d_w - d_l))
    reg_w = masked_mean(chosen_token_rewards.detach() * chosen_logratios, chosen_mask, dim=1)
    reg_l = masked_mean(rejected_token_rewards.detach() * rejected_logratios, rejected_mask, dim=1)
    return dpo - alpha * beta * (reg_w + reg_l)


def diffusion_dpo_loss(
    model_losses_w: Tensor, model_losses_l: Tensor, ref_losses_w: Tensor, ref_losses_l: Tensor, beta: float = 5000.0
) -> Tensor:
    """Diffusion-DPO -> ``[B]``: ``-log sigmoid(-(beta/2) ((L_w - L_l) - (Lref_w - Lref_l)))``.

    ``L`` are per-sample denoising (flow-matching) MSEs at a shared noise and step, lower = likelier;
    ``w`` = preferred, ``l`` = rejected. Reference losses are constants.
    """
    inside = (model_losses_w - model_losses_l) - (ref_losses_w - ref_losses_l).detach()
    return -F.logsigmoid(-0.5 * beta * inside)


# KTO -----------------------------------------------------------------------------------------------


def _all_reduce_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` over the processes of ``torch.distributed`` when it is initialised; ``x`` otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x / dist.get_world_size()
    return x


def _identity(x: Tensor) -> Tensor:
    return x


class KTOOutput(NamedTuple):
    """:func:`kto_loss` result.

    ``losses`` ``[B]``: per-example weighted losses (take ``.mean()``); ``kl``: the reference point ``z0``
    (scalar, detached, already averaged over processes and clamped at 0); ``rewards`` ``[B]``: the implicit
    rewards ``beta * (logp - ref_logp)`` (detached), for logging chosen / rejected rewards.
    """

    losses: Tensor
    kl: Tensor
    rewards: Tensor


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    policy_kl_logps: Tensor,
    ref_kl_logps: Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    mask: Optional[Tensor] = None,
    kl_mask: Optional[Tensor] = None,
    reduce: Optional[Callable[[Tensor], Tensor]] = None,
) -> KTOOutput:
    """KTO (Ethayarajh et al. 2024, arXiv 2402.01306) on token log-probs -> :class:`KTOOutput`.

    policy_logps, ref_logps: ``[B]`` summed log-probs of each example's completion, or ``[B, T]`` per token
      (summed over ``mask``); ``desirable``: bool ``[B]`` (True = desirable / "chosen", False = undesirable).
    policy_kl_logps, ref_kl_logps: ``[B']`` (or ``[B', T']`` with ``kl_mask``) log-probs of MISMATCHED
      completions, each prompt paired with another example's completion (e.g. the batch's completions
      shifted by one), under the policy and the reference.
    Reference point ``z0 = max(0, reduce(mean_{B'}(policy_kl - ref_kl)))``, detached: the local mean is
    averaged over processes BEFORE the clamp. ``reduce=None`` all-reduces a mean over ``torch.distributed``
    when it is initialised (every process must then call this function equally often), else keeps the local
    mean; pass e.g. ``lambda x: accelerator.gather(x).mean()`` or ``lambda x: x`` (local only).
    With ``r = logp - ref_logp`` (``ref_logp`` treated as constant):
    ``loss = desirable_weight * (1 - sigmoid(beta (r - z0)))`` for desirable examples and
    ``undesirable_weight * (1 - sigmoid(beta (z0 - r)))`` for undesirable ones. TRL's ``KTOTrainer``
    (``loss_type="kto"``) minimises ``losses.mean()`` over the batch.
    """
    logps = _f32(_seq_sum(policy_logps, mask))
    ref = _f32(_seq_sum(ref_logps, mask)).detach()
    kl_logps = _f32(_seq_sum(policy_kl_logps, kl_mask)).detach()
    ref_kl = _f32(_seq_sum(ref_kl_logps, kl_mask)).detach()
    desirable = torch.as_tensor(desirable, device=logps.device).bool()
    if logps.ndim != 1 or ref.shape != logps.shape or desirable.shape != logps.shape:
        raise ValueError(f"policy_logps {tuple(logps.shape)}, ref_logps {tuple(ref.shape)} and desirable "
                         f"{tuple(desirable.shape)} must all be [B] (after summing tokens)")
    if kl_logps.shape != ref_kl.shape or kl_logps.numel() == 0:
        raise ValueError(f"policy_kl_logps {tuple(kl_logps.shape)} and ref_kl_logps {tuple(ref_kl.shape)} must be "
                         "the same non-empty shape")
    z0 = (reduce or _all_reduce_mean)((kl_logps - ref_kl).mean()).clamp_min(0).detach()
    r = logps - ref
    value = torch.where(desirable, torch.sigmoid(beta * (r - z0)), torch.sigmoid(beta * (z0 - r)))
    w_d, w_u = value.new_tensor(float(desirable_weight)), value.new_tensor(float(undesirable_weight))
    weight = torch.where(desirable, w_d, w_u)
    return KTOOutput(weight * (1 - value), z0, (beta * r).detach())


KTO_REFERENCES = ("mean", "sigmoid")


def diffusion_kto_reference(
    g: Tensor, desirable_mask: Tensor, form: str = "mean", reduce: Optional[Callable[[Tensor], Tensor]] = None
) -> Tensor:
    """Reference point ``z`` of :func:`diffusion_kto_loss` from the implicit rewards ``g`` ``[B]`` (detached scalar).

    ``form``:
      * ``"mean"``: ``z = max(0, reduce(mean_B g))``: the batch-mean KL estimate of KTO clamped at 0; what the
        released Diffusion-KTO code computes by default (``--bce_offset none``).
      * ``"sigmoid"``: ``z = (reduce(mean_{D+} g) + reduce(mean_{D-} g)) / 2``, NOT clamped: the average of the
        desirable and the undesirable class means (the released code's ``--bce_offset sigmoid`` option; despite the
        name, no sigmoid is applied to ``z``). An empty class contributes 0.
    ``reduce`` (``None``: this batch only) averages each local mean over processes; no collective is issued
    without it.
    """
    g = g.detach()
    red = reduce or _identity
    if form == "mean":
        return red(g.mean()).clamp_min(0)
    if form == "sigmoid":
        d = torch.as_tensor(desirable_mask, device=g.device).bool()
        pos = torch.where(d, g, torch.zeros_like(g)).sum() / d.sum().clamp_min(1)
        neg = torch.where(d, torch.zeros_like(g), g).sum() / (~d).sum().clamp_min(1)
        return (red(pos) + red(neg)) / 2
    raise ValueError(f"unknown diffusion-KTO reference form {form!r}; valid: {list(KTO_REFERENCES)}")


def diffusion_kto_loss(
    model_losses: Tensor,
    ref_losses: Tensor,
    desirable_mask: Tensor,
    beta: float = 1000.0,
    reference: str = "mean",
    reduce: Optional[Callable[[Tensor], Tensor]] = None,
    return_reference: bool = False,
):
    """Diffusion-KTO (Li et al. 2024, arXiv 2404.04465) -> ``[B]`` (or ``([B], z)`` with ``return_reference``).

    ``g = L_ref - L`` (per-sample implicit reward: denoising MSEs, lower = likelier), ``z`` the reference
    point of :func:`diffusion_kto_reference` (``reference``: ``"mean"`` = ``max(0, mean_batch g)``, the
    default; ``"sigmoid"`` = mean of the D+ and D- class means of ``g``, unclamped), detached;
    ``loss = 1 - sigmoid(s beta (g - z))`` with ``s = +1`` for desirable (D+) and ``-1`` otherwise.
    """
    g = ref_losses.detach() - model_losses
    z = diffusion_kto_reference(g, desirable_mask, reference, reduce)
    sign = torch.where(desirable_mask.bool(), 1.0, -1.0).to(g.dtype)
    loss = 1 - torch.sigmoid(sign * beta * (g - z))
    return (loss, z) if return_reference else loss
