"""Policy-gradient objective: the Flow-GRPO family (docs/algorithms.md §3-§5, §9).

Group-relative advantages from the global rewards (TempFlow-GRPO: process advantages per (prompt, seed, step)),
then per trained (sample, step) token the log-prob is recomputed with THE SAME forward as the rollout
(``Policy.predict``, CFG included) and the shared :func:`genalign.losses.policy_loss` is minimised, plus the
Gaussian mean KL to the reference (LoRA adapters disabled, or a frozen copy). GRPO-Guard's RatioNorm and the
step weights (noise-aware, inverse-dt) are options of this objective. Steps are trained one at a time (one
backward per micro-batch and step: activation memory does not grow with the number of trained steps). Samples
whose loss terms are exactly 0 (masked, or zero-advantage without a KL) run no pass (``micro_batches``).

Tokens: a (sample, step) pair of a valid sample at a stochastic step. A deterministic transition (std 0) has
no density, so it has no log-ratio, KL or RatioNorm and does not count (docs/algorithms.md §1.5). The loss is
normalised by the GLOBAL token count of the optimizer step, so accumulation and the process count do not
change it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

from .. import losses, methods
from ..advantages import configured_advantages, weight_positive, zero_variance_groups
from ..methods import mix_seed
from ..rollout import Trajectory, gather_steps, recompute_step
from ..sde import gaussian_kl
from .base import EpochBatch, ObjectiveBase, register_objective


ADVANTAGE_PROPORTIONAL_SURROGATES = ("ppo_clip", "cispo", "dppo_mask")
"""Built-in surrogates whose per-token loss is the advantage times a factor (0 for a zero advantage)."""
LINEAR_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant")
"""Built-in aggregations: weighted sums of the per-token losses with global normalisers (a 0 term adds 0)."""


@dataclass
class PGUnits:
    """This process's samples: ``traj`` rows with their advantage ``adv [n]``, validity ``valid [n]`` and
    trained steps ``steps [n, k]``; ``adv_global`` / ``valid_global`` for logging."""

    traj: Trajectory
    adv: torch.Tensor
    valid: torch.Tensor
    steps: torch.Tensor
    adv_global: torch.Tensor
    valid_global: torch.Tensor


@register_objective("policy_gradient")
class PolicyGradient(ObjectiveBase):
    """Clipped policy gradient on per-step log-probs (PPO-clip / CISPO surrogates, any aggregation)."""

    def __init__(self, ctx):
        self.ctx = self.tr = ctx  # a TrainContext (the trainer's, or one built by a benchmark)
        self.cfg = ctx.cfg
        T = self.cfg.sampling.num_steps
        self.diagnostics = methods.StepDiagnostics(T, ctx.device)
        self.nonfinite = torch.zeros(T, 2, device=ctx.device)  # (policy, KL) non-finite tokens per step
        self.skip_zero_advantage = True  # leave gradient-free samples out of the passes (False: tests compare)
        self.pass_counts = torch.zeros(2, device=ctx.device)  # (samples in the epoch's steps, samples with a pass)

    # ------------------------------------------------------------------ advantages
    def advantages(self, rewards: torch.Tensor, group_ids: torch.Tensor, plan=None):
        """Group-relative advantages over the GLOBAL batch (identical on every process) and the per-sample
        validity (False for zero-variance groups when ``train.filter_zero_std_groups``). TempFlow branching
        (``plan.branch_step``): groups are (prompt, seed, step) with each branch's process advantage."""
        t = self.cfg.train
        if plan is not None and plan.branch_step is not None:
            steps = plan.branch_step
            adv = methods.branch_advantages(rewards, plan)[torch.arange(len(steps)), steps]
            adv = weight_positive(adv, t.positive_advantage_weight).clamp(-t.advantage_clip, t.advantage_clip)
            group_ids = plan.seed_ids * self.cfg.sampling.num_steps + steps
        else:  # options checked at config load
            adv = configured_advantages(t, rewards, group_ids).clamp(-t.advantage_clip, t.advantage_clip)
        valid = torch.ones_like(rewards, dtype=torch.bool)
        if t.filter_zero_std_groups:
            valid = ~zero_variance_groups(rewards, group_ids)
        return adv, valid

    def prepare(self, epoch: int, batch: EpochBatch) -> PGUnits:
        adv, valid = self.advantages(batch.rewards, batch.group_ids, batch.plan)
        local = batch.local
        pad = local < 0  # padding rows (uneven dynamic-sampling shares): no tokens
        idx = local.clamp_min(0)
        steps = batch.plan.train_steps[idx] if batch.plan is not None else \
            torch.tensor(self.tr.trainable_steps()).expand(len(local), -1)
        return PGUnits(batch.traj, torch.where(pad, 0.0, adv[idx]), valid[idx] & ~pad, steps, adv, valid)

    def units_for(self, traj: Trajectory, adv: torch.Tensor, valid: torch.Tensor, steps: torch.Tensor) -> PGUnits:
        """Units of local samples given their advantages, validity and trained steps (tests, benchmarks)."""
        return PGUnits(traj, adv, valid, steps, adv, valid)

    def stats(self, units: PGUnits) -> Dict[str, float]:
        adv, valid = units.adv_global, units.valid_global
        return {"adv/mean": adv.mean().item(), "adv/std": adv.std().item(), "adv/abs_mean": adv.abs().mean().item(),
                "groups/zero_std_frac": 1.0 - valid.float().mean().item()}

    # ------------------------------------------------------------------ optimizer steps
    def minibatches(self, units: PGUnits, epoch: int, inner: int) -> List[torch.Tensor]:
        gen = torch.Generator().manual_seed(mix_seed(self.cfg.seed, epoch, inner, self.tr.rank, 7))
        order = torch.randperm(len(units.traj), generator=gen)
        if self.cfg.train.shuffle_steps:
            k = units.steps.shape[1]
            units.steps = torch.stack([row[torch.randperm(k, generator=gen)] for row in units.steps])
        return list(torch.tensor_split(order, self.cfg.train.num_minibatches))

    def backwards(self, units: PGUnits, ids: torch.Tensor):
        """One backward per (micro-batch of ``train.batch_size`` samples, trained step); global counts first."""
        dev = self.tr.device
        steps = units.steps[ids]
        k = steps.shape[1]
        valid = units.valid[ids]
        stochastic = (units.traj.stds[ids[:, None].to(units.traj.stds.device), steps.to(units.traj.stds.device)] > 0
                      ).to(valid.device)
        counts = torch.stack([(valid[:, None] & stochastic).sum().float(), valid.sum().float()]).to(dev)
        num_tokens, num_seqs = self.tr.acc.reduce(counts, "sum").clamp_min(1).unbind()
        fns, micros = [], self.micro_batches(units, ids)
        weight = 1.0 / (k * max(len(micros), 1))  # stats summed over the step's backwards give micro-batch means
        for pos in micros:
            micro = ids[pos]
            sub = units.traj.select(micro).to(dev)
            for c in range(k):
                fns.append(self._backward_fn(sub, units.adv[micro].to(dev), units.valid[micro].to(dev),
                                             steps[pos, c].to(dev), num_tokens, num_seqs, k, weight))
        return fns

    def gradient_free(self, units: PGUnits, ids: torch.Tensor) -> torch.Tensor:
        """``[len(ids)]`` True for samples whose loss terms are exactly 0 whatever the weights: invalid ones (masked
        tokens) and, without a KL term and with a surrogate proportional to the advantage, zero-advantage ones
        (for example all-equal groups of a 0/1 reward under Dr.GRPO)."""
        t = self.cfg.train
        free = torch.zeros(len(ids), dtype=torch.bool)
        if t.aggregation not in LINEAR_AGGREGATIONS:  # a plugin's aggregation may weigh tokens by others
            return free
        free = ~units.valid[ids]
        if t.kl_beta == 0 and t.surrogate in ADVANTAGE_PROPORTIONAL_SURROGATES:
            free = free | (units.adv[ids] == 0)
        return free

    def micro_batches(self, units: PGUnits, ids: torch.Tensor) -> List[torch.Tensor]:
        """Positions in ``ids`` of the step's micro-batches (``train.batch_size`` samples each). Gradient-free
        samples (:meth:`gradient_free`) are left out, so they cost no forward or backward pass; the gradient is the
        same, since the loss is normalised by the global counts taken before. Every process runs the same number
        of micro-batches (FSDP / DeepSpeed gather weights in each forward), at least one: a short process fills
        with single gradient-free samples, and a step without any sample that trains still runs one such pass,
        so the optimizer steps (Adam moments, weight decay) as it would on the full step."""
        B = self.cfg.train.batch_size
        if not self.skip_zero_advantage:
            return [torch.arange(start, min(start + B, len(ids))) for start in range(0, len(ids), B)]
        free = self.gradient_free(units, ids)
        live, spare = (~free).nonzero().flatten(), free.nonzero().flatten()
        micros = list(live.split(B)) if len(live) else []  # (splitting an empty tensor gives one empty part)
        n = len(micros)
        if self.tr.world > 1:
            n = int(self.tr.acc.gather(torch.tensor([n], device=self.tr.device)).max())
        n = max(n, 1) if len(ids) else n
        micros = micros + [spare[i:i + 1] for i in range(n - len(micros))]
        self.pass_counts += torch.tensor([len(ids), sum(len(m) for m in micros)], device=self.pass_counts.device)
        return micros

    def _backward_fn(self, sub, adv, valid, j, num_tokens, num_seqs, k, weight):
        def run(sync: bool) -> Dict[str, torch.Tensor]:
            loss, st = self.token_loss(sub, adv, valid, j, num_tokens, num_seqs, k)
            self.tr.optim.backward(loss, sync)
            out = {key: v * weight for key, v in st.items()}
            out["loss"] = loss.detach()  # the loss terms of one optimizer step add up to its loss
            return out
        return run

    def token_loss(self, sub: Trajectory, adv, valid, j, num_tokens, num_seqs, k):
        """Loss of step ``j [B]`` of a micro-batch (global normalisers) and its statistics."""
        t, tr = self.cfg.train, self.tr
        std = gather_steps(sub.stds, j)
        tokens = valid & (std > 0)
        safe = torch.where(std > 0, std, torch.ones_like(std))  # masked tokens: any finite value (finite grads)
        with tr.autocast():
            step = recompute_step(tr.policy, sub, j)
            kl = None
            if t.kl_beta > 0:
                with torch.no_grad(), tr.reference():
                    ref = recompute_step(tr.policy, sub, j)
                if t.kl_space == "v":  # velocity space: the denoiser outputs at the same input
                    kl = (step.model_output - ref.model_output).pow(2).flatten(1).mean(1)[:, None]
                else:
                    kl = gaussian_kl(step.mean, ref.mean, self._kl_std(sub, j, safe), sub.reduction)[:, None]
        old, logp = gather_steps(sub.log_probs, j), step.log_prob
        if t.ratio_norm:
            logp = methods.ratio_norm(logp, old, step.mean, gather_steps(sub.means, j), safe, sub.reduction)
        self.nonfinite.index_add_(0, j, torch.stack(
            [~torch.isfinite(logp), ~torch.isfinite(kl[:, 0]) if kl is not None else torch.zeros_like(tokens)],
            1).float() * tokens[:, None])
        weights = None
        if t.step_weighting != "none":
            weights = gather_steps(methods.step_weight_table(t.step_weighting, sub.sigmas, tr.trainable_steps()), j)
        # per-step backward: every sample trains k steps, so seq_mean_token_mean is 'constant' with normaliser k
        agg = "constant" if t.aggregation == "seq_mean_token_mean" else t.aggregation
        options = {}
        if t.surrogate == "dppo_mask":  # DPPO: the step's Gaussian KL from the sampling policy's transition
            divergence = gaussian_kl(step.mean.detach(), gather_steps(sub.means, j), safe, sub.reduction)
            options = {"divergence": divergence[:, None], "threshold": t.dppo_threshold}
        loss, st = losses.policy_loss(
            logp[:, None], old[:, None], adv, tokens[:, None], surrogate=t.surrogate, aggregation=agg,
            eps_low=t.clip_range, eps_high=t.clip_range_high, num_tokens=num_tokens, num_seqs=num_seqs,
            normalizer=k, kl=kl, kl_coef=t.kl_beta, weights=weights, **options)
        log_r = logp.detach() - old
        clipped = losses.get_surrogate(t.surrogate)(log_r[:, None], adv[:, None], log_r[:, None], eps_low=t.clip_range,
                                                    eps_high=t.clip_range_high, **options).clipped[:, 0]
        self.diagnostics.add(j, log_r, adv, tokens, clipped)
        return loss, st

    def _kl_std(self, sub: Trajectory, j: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Std dividing the Gaussian KL: the transition std ('exact'), or for the SDE step flow_grpo's
        diffusion coefficient ``sigma_t = std / sqrt(dt)`` (``train.kl_form = flow_grpo``: exact KL times dt)."""
        if self.cfg.train.kl_form == "exact" or sub.step_kind != "sde":
            return std
        dt = gather_steps(sub.sigmas, j) - gather_steps(sub.sigmas, j + 1)
        return std / dt.sqrt()

    # ------------------------------------------------------------------ reporting
    def after_step(self) -> None:
        self.nonfinite.zero_()

    def describe_failure(self) -> str:
        table = self.tr.acc.reduce(self.nonfinite, "sum") if self.tr.world > 1 else self.nonfinite
        terms = []
        for col, name in enumerate(("policy log-prob / ratio", "KL to the reference")):
            steps = table[:, col].nonzero().flatten().tolist()
            if steps:
                terms.append(f"{name} at denoising step(s) {steps}")
        return "; ".join(terms) or "the gradient (loss and log-probs finite)"

    def epoch_stats(self) -> Dict[str, float]:
        reduce = self.tr.acc.reduce if self.tr.world > 1 else None
        out = self.diagnostics.metrics(reduce)
        self.diagnostics = methods.StepDiagnostics(self.cfg.sampling.num_steps, self.tr.device)
        counts = reduce(self.pass_counts, "sum") if reduce else self.pass_counts
        if counts[0] > 0:  # the samples of the epoch's optimizer steps that ran no pass (gradient-free)
            out["passes/skipped_frac"] = 1.0 - (counts[1] / counts[0]).item()
        self.pass_counts = torch.zeros_like(self.pass_counts)
        return out


__all__ = ["ADVANTAGE_PROPORTIONAL_SURROGATES", "LINEAR_AGGREGATIONS", "PGUnits", "PolicyGradient"]
