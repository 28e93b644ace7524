"""The one training loop: rollout -> rewards -> advantages -> clipped surrogate -> optimizer step.

Read top to bottom: :meth:`Trainer.train` runs epochs; each epoch :meth:`Trainer.sample_epoch`
generates trajectories with the SDE step and scores them, :meth:`Trainer.compute_advantages` turns the
gathered rewards into group-relative advantages (identical on every process), and
:meth:`Trainer.train_epoch` recomputes log-probs with THE SAME forward (``Policy.predict``, CFG
included) and minimises the shared policy loss (:func:`genalign.losses.policy_loss`).

Distributed: every process runs this loop on its slice of the epoch's samples. Gradients are summed
over processes with one all-reduce per optimizer step, and the loss is normalised by the GLOBAL number
of (sample, step) tokens, so N processes compute exactly what one process would on the same batch.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Dict, List, Optional

import torch
from tqdm.auto import tqdm

from . import dragon, losses, methods
from .advantages import compute_advantages, zero_variance_groups
from .checkpoint import latest_checkpoint, resolve_resume, save_checkpoint
from .config import Config, ConfigError, to_dict
from .ema import EMA
from .lora import adapters_disabled, add_lora, forward_of, has_lora, save_lora
from .methods import EpochPlan, mix_seed as _seed
from .prompts import KRepeatSampler, read_prompts
from .rollout import Trajectory, gather_steps, recompute_step, rollout
from .sde import gaussian_kl

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN/inf; the optimizer step was skipped, so the weights are unchanged."""




class Trainer:
    """Flow-GRPO-family trainer for any :class:`genalign.policy.Policy` adapter."""

    def __init__(self, cfg: Config, resume: Optional[str] = None, accelerator=None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg = cfg
        trackers = [t for t in cfg.log_with if _tracker_available(t)]
        self.acc = accelerator or Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision,
                                              log_with=trackers or None, project_dir=cfg.output_dir)
        cfg.validate(self.acc.num_processes)
        set_seed(cfg.seed)
        self.device = torch.device(cfg.model.device) if cfg.model.device else self.acc.device
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.is_main = self.acc.is_main_process

        # data and reward first: cheap to fail early on bad input
        self.prompts = read_prompts(cfg.prompts_file)
        self.eval_prompts = read_prompts(cfg.eval_prompts_file) if cfg.eval_prompts_file else []
        if self.eval_prompts and len(self.eval_prompts) * cfg.eval.num_per_prompt < self.world:
            raise ConfigError(f"{len(self.eval_prompts)} eval prompts x eval.num_per_prompt = {cfg.eval.num_per_prompt} "
                              f"images cannot be shared by {self.world} processes (each needs at least one)")
        from genalign.rewards import RewardSet

        # every built-in reward model goes to this process's device unless its options say otherwise
        self.reward_fn = RewardSet(cfg.reward, cfg.reward_options, device=str(self.device))
        # Adv-GRPO: a reward model trained between generator rounds (checkpointed with the generator by accelerate)
        self.adversary = next((fn for _, fn, _ in self.reward_fn.components if hasattr(fn, "discriminator_step")), None)
        if self.adversary is not None:
            self.acc.register_for_checkpointing(self.adversary)

        from genalign.pipelines import load_policy

        self.policy = load_policy(cfg.model.id, device=self.device, dtype=DTYPES[cfg.model.dtype],
                                  guidance_scale=cfg.model.guidance_scale,
                                  **{k: v for k, v in (("height", cfg.model.height), ("width", cfg.model.width)) if v})
        self.denoiser = self.policy.denoiser()
        if cfg.model.decode_batch_size and hasattr(self.policy, "decode_batch_size"):
            self.policy.decode_batch_size = cfg.model.decode_batch_size
        if cfg.model.xformers and hasattr(self.policy, "enable_xformers"):
            self.policy.enable_xformers()  # no-op without xformers or off CUDA
        self._setup_trainable()
        self.sampler = KRepeatSampler(len(self.prompts), cfg.sampling.groups_per_epoch, cfg.sampling.group_size,
                                      cfg.seed, self.world, self.rank)
        self.noise_levels = self._noise_levels()
        self.epoch, self.global_step, self.samples_seen, self.model_calls = 0, 0, 0, 0
        # extra evaluation metrics: callables (eval images [N, 3, H, W], prompts) -> {name: float} (one process)
        self.eval_hooks: List = []
        self._diagnostics: Optional[methods.StepDiagnostics] = None  # per-step ratio statistics of train_epoch
        self._nonfinite: Optional[torch.Tensor] = None  # [T, 2] non-finite token counts (policy, KL) of train_epoch
        self.metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        if resume:
            self._load(resolve_resume(cfg.output_dir, resume))
        elif self.is_main:
            os.makedirs(cfg.output_dir, exist_ok=True)
            if os.path.exists(self.metrics_path):
                os.remove(self.metrics_path)
        if self.is_main:
            with open(os.path.join(cfg.output_dir, "config.json"), "w") as fh:
                json.dump(to_dict(cfg), fh, indent=1)
        if trackers:
            self.acc.init_trackers("genalign", config=_flat(to_dict(cfg)))

    # ------------------------------------------------------------------ setup
    def _setup_trainable(self) -> None:
        cfg = self.cfg
        for module in _policy_modules(self.policy):
            module.requires_grad_(False)
        self.reference = None
        if cfg.lora.enabled:
            targets = cfg.lora.target_modules or self.policy.lora_target_modules
            add_lora(self.denoiser, cfg.lora.rank, cfg.lora.alpha, targets)
        else:
            needs_reference = cfg.train.kl_beta > 0 or cfg.train.mode == "dragon"
            if needs_reference and cfg.train.reference_copy:
                import copy

                self.reference = copy.deepcopy(self.denoiser).eval()
            elif needs_reference:
                raise ConfigError("train.kl_beta > 0 or train.mode = dragon with full fine-tuning needs a reference: set "
                                  "train.reference_copy=true (keeps a frozen copy) or lora.enabled=true")
            self.denoiser.requires_grad_(True)
        self.denoiser.to(self.device)
        if cfg.train.gradient_checkpointing:
            if not hasattr(self.denoiser, "enable_gradient_checkpointing"):
                raise ConfigError(f"train.gradient_checkpointing: {type(self.denoiser).__name__} does not support it")
            self.denoiser.enable_gradient_checkpointing()
        self.params = [p for p in self.denoiser.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("no trainable parameters (check lora.target_modules)")
        for p in self.params:  # trainable weights in float32; frozen ones keep model.dtype
            p.data = p.data.float()
        t = cfg.train
        fused = {"fused": True} if self.device.type == "cuda" else {}
        opt = torch.optim.AdamW(self.params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                                eps=t.adam_eps, **fused)
        self.optimizer = self.acc.prepare(opt)
        self.ema = EMA(self.params, t.ema_decay, t.ema_every) if t.ema else None

    def _noise_levels(self) -> torch.Tensor:
        s = self.cfg.sampling
        levels = torch.full((s.num_steps,), float(s.noise_level))
        if s.last_step_deterministic:
            levels[-1] = 0.0
        return levels

    def trainable_steps(self) -> List[int]:
        """Stochastic steps that are trained: the first ``int(timestep_fraction * n)`` of them (>= 1)."""
        steps = self.cfg.trainable_steps()
        if not steps:
            raise ConfigError("no stochastic step to train: sampling.noise_level is 0")
        return steps

    def plan(self, epoch: int) -> EpochPlan:
        """Noise levels and trained steps of every sample of ``epoch`` (windows, branching; see
        :mod:`genalign.methods`), identical on every process."""
        self.trainable_steps()  # raises when nothing is stochastic
        return methods.plan_epoch(self.cfg, epoch, self.sampler.epoch(epoch)[1], self.noise_levels)

    # ------------------------------------------------------------------ the loop
    def train(self) -> Dict[str, float]:
        cfg = self.cfg
        t0 = time.time()
        if self.epoch == 0 and self.eval_prompts:
            self._log({"epoch": 0, "global_step": 0, "samples_seen": 0, **self.evaluate(save_before=True)})
        for epoch in range(self.epoch, cfg.num_epochs):
            t_start = time.time()
            adv_stats = self.train_discriminator(epoch) if self.adversary is not None else {}
            plan = self.plan(epoch)
            if cfg.train.dynamic_sampling:
                traj, rewards, parts, group_ids, local, plan, dyn_stats = self.dynamic_sample_epoch(epoch, plan)
                adv_stats.update(dyn_stats)
            else:
                traj, rewards, parts, group_ids, local = self.sample_epoch(epoch, plan)
            t_sampled = time.time()
            if cfg.train.mode == "dragon":
                stats = dragon.train_epoch(self, epoch, traj, rewards, group_ids, local)
            elif len(rewards) == 0:  # dynamic sampling found no group with reward variance: nothing to train
                stats = {}
            else:
                adv, valid = self.compute_advantages(rewards, group_ids, plan)
                stats = self.train_epoch(epoch, traj, adv[local], valid[local], plan.train_steps[local])
                stats.update({"adv/mean": adv.mean().item(), "adv/std": adv.std().item(),
                              "adv/abs_mean": adv.abs().mean().item(),
                              "groups/zero_std_frac": 1.0 - valid.float().mean().item()})
            t_trained = time.time()
            self.epoch = epoch + 1
            n_sampled = cfg.samples_per_epoch * int(adv_stats.get("dynamic/rounds", 1))
            self.samples_seen += n_sampled
            self.model_calls += plan.model_calls  # sampling forwards per image (TempFlow: T per main + T - j per branch)
            row = {"epoch": self.epoch, "global_step": self.global_step, "samples_seen": self.samples_seen,
                   "model_calls": self.model_calls,
                   **({"reward/mean": rewards.mean().item(), "reward/std": rewards.std().item()} if len(rewards) else {}),
                   **{f"reward/{k}/mean": v.mean().item() for k, v in parts.items()},
                   **stats, **adv_stats, "lr": self.optimizer.param_groups[0]["lr"],
                   "time/sample_s": t_sampled - t_start, "time/train_s": t_trained - t_sampled,
                   "samples_per_s": n_sampled / max(t_trained - t_start, 1e-9),
                   "elapsed_s": time.time() - t0}
            last = self.epoch == cfg.num_epochs
            if self.eval_prompts and (last or (cfg.eval.every and self.epoch % cfg.eval.every == 0)):
                row.update(self.evaluate())
            self._log(row)
            if last or (cfg.checkpoint.every and self.epoch % cfg.checkpoint.every == 0):
                self.save()
        return self.finish()

    def train_discriminator(self, epoch: int) -> Dict[str, float]:
        """Adv-GRPO: ``adversarial.steps`` discriminator steps, each on ``adversarial.num_samples`` fresh images
        of random training prompts (SDE at ``sampling.noise_level``; the same on every process)."""
        from genalign.rewards.adversarial import discriminator_round

        a, s = self.cfg.adversarial, self.cfg.sampling

        def sample(k: int) -> torch.Tensor:
            g = torch.Generator().manual_seed(_seed(self.cfg.seed, epoch, k, 13))
            prompts = [self.prompts[i] for i in torch.randint(len(self.prompts), (a.num_samples,), generator=g)]
            return self.sample_images(prompts, _seed(self.cfg.seed, epoch, k, 17), s.num_steps, s.noise_level), prompts

        return discriminator_round(self.adversary, sample, a.steps, a.rule, _seed(self.cfg.seed, epoch, 19))

    def sample_epoch(self, epoch: int, plan: Optional[EpochPlan] = None, draw: Optional[int] = None):
        """Roll out this process's samples of ``epoch`` (as ``plan`` says; default :meth:`plan`) and score
        them; rewards are gathered globally. ``draw`` (default ``epoch``) seeds the prompts and the noise:
        dynamic sampling's extra rounds use other draws of the same epoch.

        Returns ``(local trajectory, global rewards [N], global parts, global group ids [N], local positions)``.
        """
        cfg, s = self.cfg, self.cfg.sampling
        draw = epoch if draw is None else draw
        prompt_idx, group_ids, local = self.sampler.epoch(draw)
        prompts = [self.prompts[prompt_idx[i]] for i in local]
        mine = (plan or self.plan(epoch)).select(torch.tensor(local))
        trajs, futures, branches = [], [], None
        pool = ThreadPoolExecutor(1) if s.async_rewards else None
        self.denoiser.eval()
        if mine.branch_step is not None:  # TempFlow: all local branches at once (each main ODE runs once)
            gen = torch.Generator(self.device).manual_seed(_seed(cfg.seed, draw, self.rank))
            with self._autocast():
                branches = methods.branch_rollout(self.policy, self.policy.encode(prompts), prompts, mine,
                                                  _seed(cfg.seed, draw), s.step_kind, s.batch_size, generator=gen,
                                                  reduction=s.log_prob_reduction)
        batches = range(0, len(prompts), s.batch_size)
        for b, start in enumerate(tqdm(batches, desc=f"epoch {epoch + 1} sampling", disable=not self.is_main, leave=False)):
            batch_prompts = prompts[start:start + s.batch_size]
            gen = torch.Generator(self.device).manual_seed(_seed(cfg.seed, draw, self.rank, b))
            with self._autocast():
                if branches is not None:
                    traj = branches.select(slice(start, start + s.batch_size))
                else:
                    traj = rollout(self.policy, self.policy.encode(batch_prompts), batch_prompts, s.num_steps,
                                   mine.levels[start:start + s.batch_size], s.step_kind, generator=gen,
                                   reduction=s.log_prob_reduction)
                images = self.policy.decode(traj.final)
            trajs.append(traj)
            meta = [{"epoch": epoch, "rank": self.rank, "index": start + i} for i in range(len(batch_prompts))]
            call = (self._score, images, batch_prompts, meta, epoch, b)
            futures.append(pool.submit(*call) if pool else call[0](*call[1:]))
        results = [f.result() if pool else f for f in futures]
        if pool:
            pool.shutdown()
        rewards = torch.cat([r for r, _ in results])
        parts = {k: torch.cat([p[k] for _, p in results]) for k in results[0][1]}
        rewards_all = self.acc.gather(rewards.to(self.device)).cpu()
        parts_all = {k: self.acc.gather(v.to(self.device)).cpu() for k, v in parts.items()}
        return Trajectory.cat(trajs), rewards_all, parts_all, group_ids, torch.tensor(local)

    def dynamic_sample_epoch(self, epoch: int, plan: EpochPlan):
        """DAPO dynamic sampling: sample rounds of ``groups_per_epoch`` groups (round 0 is the plain epoch,
        round r > 0 draws new prompts and noise) until ``groups_per_epoch`` groups with reward variance exist
        or ``train.dynamic_sampling_max_rounds`` rounds ran; keep the first such groups in sampling order.

        Returns :meth:`sample_epoch`'s tuple restricted to the kept groups (global arrays re-indexed, group ids
        unique over rounds), the kept rows of the plan and ``dynamic/*`` statistics. Processes may keep
        different numbers of local samples; the loss stays normalised by global counts.
        """
        cfg = self.cfg
        need, n = cfg.sampling.groups_per_epoch, cfg.samples_per_epoch
        rounds, kept = [], 0
        while kept < need and len(rounds) < cfg.train.dynamic_sampling_max_rounds:
            r = len(rounds)
            draw = epoch if r == 0 else _seed(epoch, r, 31)
            p = plan if r == 0 else methods.plan_epoch(cfg, epoch, self.sampler.epoch(draw)[1], self.noise_levels)
            traj, rewards, parts, group_ids, local = self.sample_epoch(epoch, p, draw)
            rounds.append((traj, rewards, parts, group_ids + r * need, torch.as_tensor(local) + r * n, p))
            kept += len(set(group_ids[~zero_variance_groups(rewards, group_ids)].tolist()))
        rewards = torch.cat([r[1] for r in rounds])
        group_ids = torch.cat([r[3] for r in rounds])
        good = group_ids[~zero_variance_groups(rewards, group_ids)]
        chosen = list(dict.fromkeys(good.tolist()))[:need]  # first groups with variance, in sampling order
        keep = torch.isin(group_ids, torch.tensor(chosen, dtype=group_ids.dtype))
        new_pos = torch.cumsum(keep.long(), 0) - 1
        local_all = torch.cat([r[4] for r in rounds])
        mine = keep[local_all]
        traj = Trajectory.cat([r[0] for r in rounds]).select(mine.nonzero().flatten())
        parts = {k: torch.cat([r[2][k] for r in rounds])[keep] for k in rounds[0][2]}
        plans = [r[5] for r in rounds]
        plan = EpochPlan(torch.cat([q.levels for q in plans])[keep], torch.cat([q.train_steps for q in plans])[keep],
                         sum(q.model_calls for q in plans))
        stats = {"dynamic/rounds": float(len(rounds)), "dynamic/groups_kept": float(len(chosen)),
                 "dynamic/groups_with_variance": float(len(set(good.tolist())))}
        if len(chosen) < need and self.is_main:
            warnings.warn(f"epoch {epoch + 1}: dynamic sampling found only {len(chosen)} of {need} groups with reward "
                          f"variance in {len(rounds)} rounds (train.dynamic_sampling_max_rounds); training on those")
        return traj, rewards[keep], parts, group_ids[keep], new_pos[local_all[mine]], plan, stats

    def _score(self, images, prompts, meta, epoch, batch_index):
        from genalign.rewards import RewardError

        try:
            return self.reward_fn(images, prompts, meta)
        except RewardError as exc:
            kept = self._keep_failed_batch(images, prompts, epoch, batch_index)
            raise RewardError(f"{exc} [epoch {epoch + 1}, rank {self.rank}, batch {batch_index}; the batch's "
                              f"images and prompts are kept in {kept}; fix the reward, then {self._resume_hint()}]",
                              exc.reward, exc.indices) from exc

    def _resume_hint(self) -> str:
        """Where a failed run can continue from: the newest complete checkpoint, or that none exists."""
        path = latest_checkpoint(os.path.join(self.cfg.output_dir, "checkpoints"))
        if path is None:
            return ("no checkpoint exists yet, so the run restarts from scratch (checkpoint.every = "
                    f"{self.cfg.checkpoint.every}; set it > 0 to save during training)")
        return f"resume from {path} with --resume latest"

    def _keep_failed_batch(self, images, prompts, epoch, batch_index) -> str:
        from safetensors.torch import save_file

        out = os.path.join(self.cfg.output_dir, "failed_rewards", f"epoch{epoch + 1}-rank{self.rank}-batch{batch_index}")
        os.makedirs(out, exist_ok=True)
        save_file({"images": images.detach().float().cpu().contiguous()}, os.path.join(out, "images.safetensors"))
        with open(os.path.join(out, "prompts.json"), "w") as fh:
            json.dump(prompts, fh)
        return out

    def compute_advantages(self, rewards: torch.Tensor, group_ids: torch.Tensor, plan: Optional[EpochPlan] = None):
        """Group-relative advantages over the GLOBAL batch (identical on every process) and the
        per-sample validity mask (False for zero-variance groups when filtering is on).

        With TempFlow branching (``plan.branch_step``) groups are (prompt, seed, step) and each sample
        gets its branch step's process advantage (:func:`genalign.methods.branch_advantages`).
        """
        t = self.cfg.train
        if plan is not None and plan.branch_step is not None:
            steps = plan.branch_step
            adv = methods.branch_advantages(rewards, plan)[torch.arange(len(steps)), steps]
            adv = adv.clamp(-t.advantage_clip, t.advantage_clip)
            group_ids = plan.seed_ids * self.cfg.sampling.num_steps + steps
        else:
            extra = {"std": t.advantage_std} if t.advantage == "grpo" else {}  # options checked at config load
            if t.advantage_unbiased_std:
                extra["unbiased"] = True
            adv = compute_advantages(t.advantage, rewards, group_ids, **extra).clamp(-t.advantage_clip, t.advantage_clip)
        valid = torch.ones_like(rewards, dtype=torch.bool)
        if t.filter_zero_std_groups:
            valid = ~zero_variance_groups(rewards, group_ids)
        return adv, valid

    def train_epoch(self, epoch: int, traj: Trajectory, adv: torch.Tensor, valid: torch.Tensor,
                    train_steps: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """Optimizer steps over this epoch's local samples, each trained on its steps ``train_steps
        [n_local, k]`` (default: every trainable step); returns averaged and per-step statistics."""
        cfg, t = self.cfg, self.cfg.train
        if train_steps is None:
            train_steps = torch.tensor(self.trainable_steps()).expand(len(traj), -1)
        n_local, k = train_steps.shape
        self._diagnostics = methods.StepDiagnostics(cfg.sampling.num_steps, self.device)
        # non-finite (policy log-prob, KL) token counts per denoising step since the last optimizer step
        self._nonfinite = torch.zeros(cfg.sampling.num_steps, 2, device=self.device)
        adv, valid = adv.to(self.device), valid.to(self.device)
        sums: Dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        count, grad_norms = 0, []
        self.denoiser.train()
        for inner in range(t.num_inner_epochs):
            gen = torch.Generator().manual_seed(_seed(cfg.seed, epoch, inner, self.rank, 7))
            order = torch.randperm(n_local, generator=gen)
            if t.shuffle_steps:
                step_idx = torch.stack([row[torch.randperm(k, generator=gen)] for row in train_steps])
            else:
                step_idx = train_steps
            # equal parts; with dynamic sampling processes may hold different numbers of samples
            for mb, ids in enumerate(tqdm(torch.tensor_split(order, t.num_minibatches), desc=f"epoch {epoch + 1} training",
                                          disable=not self.is_main, leave=False)):
                self.optimizer.zero_grad(set_to_none=True)
                step_stats = self.accumulate(traj, adv, valid, ids, step_idx[ids])
                for key, v in step_stats.items():
                    sums[key] += v
                count += 1
                grad_norms.append(self._optimizer_step(epoch, step_stats.get("loss")))
        stats = {key: (v / count).item() for key, v in sums.items()}
        stats["grad_norm"] = torch.stack(grad_norms).mean().item()
        stats.update(self._diagnostics.metrics(self.acc.reduce if self.world > 1 else None))
        return stats

    def accumulate(self, traj: Trajectory, adv: torch.Tensor, valid: torch.Tensor, ids: torch.Tensor,
                   step_idx: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Accumulate the gradients of one optimizer step over samples ``ids`` (micro-batches of
        ``train.batch_size``, every step in ``step_idx [len(ids), k]``); returns mean statistics.

        The loss is normalised by the global token count of the whole optimizer step, so the
        accumulated gradient does not depend on the micro-batch size.
        """
        t = self.cfg.train
        k = step_idx.shape[1]
        ids_dev = ids.to(self.device)
        # a token is a (sample, step) pair of a valid sample at a stochastic step (std 0: no density, not trained)
        stochastic = traj.stds[ids[:, None].to(traj.stds.device), step_idx.to(traj.stds.device)] > 0
        counts = torch.stack([(valid[ids_dev, None] & stochastic.to(self.device)).sum().float(),
                              torch.tensor(float(len(ids)), device=self.device)])
        num_tokens, num_seqs = self.acc.reduce(counts, "sum").clamp_min(1).unbind()
        sums: Dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        n_micro = 0
        for start in range(0, len(ids), t.batch_size):
            micro = ids[start:start + t.batch_size]
            md = micro.to(self.device)
            st = self._micro_step(traj.select(micro).to(self.device), adv[md], valid[md],
                                  step_idx[start:start + t.batch_size], num_tokens, num_seqs, k)
            for key, v in st.items():
                sums[key] += v
            n_micro += 1
        out = {key: v / n_micro for key, v in sums.items()}
        out["loss"] = sums["loss"]
        return out

    def _micro_step(self, sub: Trajectory, adv, valid, step_idx, num_tokens, num_seqs, k) -> Dict[str, torch.Tensor]:
        """Forward + backward for every trainable step of one micro-batch (one step at a time)."""
        t = self.cfg.train
        # per-step backward: every sample trains k steps, so seq_mean_token_mean is 'constant' with normaliser k
        agg = "constant" if t.aggregation == "seq_mean_token_mean" else t.aggregation
        out_stats: Dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        for c in range(k):
            j = step_idx[:, c].to(self.device)
            std = gather_steps(sub.stds, j)
            tokens = valid & (std > 0)  # a deterministic transition carries no density: no ratio, KL or RatioNorm
            safe = torch.where(std > 0, std, torch.ones_like(std))  # masked tokens: any finite value (finite grads)
            with self._autocast():
                step = recompute_step(self.policy, sub, j)
                kl = None
                if t.kl_beta > 0:
                    with torch.no_grad(), self._reference():
                        ref_mean = recompute_step(self.policy, sub, j).mean
                    kl = gaussian_kl(step.mean, ref_mean, self._kl_std(sub, j, safe), sub.reduction)[:, None]
            old, logp = gather_steps(sub.log_probs, j), step.log_prob
            if t.ratio_norm:
                logp = methods.ratio_norm(logp, old, step.mean, gather_steps(sub.means, j), safe, sub.reduction)
            if getattr(self, "_nonfinite", None) is not None:
                self._nonfinite.index_add_(0, j, torch.stack(
                    [~torch.isfinite(logp), ~torch.isfinite(kl[:, 0]) if kl is not None else torch.zeros_like(tokens)],
                    1).float() * tokens[:, None])
            weights = None
            if t.step_weighting != "none":
                weights = gather_steps(methods.step_weight_table(t.step_weighting, sub.sigmas, self.trainable_steps()), j)
            loss, st = losses.policy_loss(
                logp[:, None], old[:, None], adv, tokens[:, None], surrogate=t.surrogate, aggregation=agg,
                eps_low=t.clip_range, eps_high=t.clip_range_high, num_tokens=num_tokens, num_seqs=num_seqs,
                normalizer=k, kl=kl, kl_coef=t.kl_beta, weights=weights)
            self.acc.backward(loss)
            self._log_step_ratios(j, logp.detach() - old, adv, tokens)
            for key, v in st.items():
                out_stats[key] += v / k
            out_stats["loss"] += loss.detach()
        return out_stats

    def _log_step_ratios(self, j, log_r, adv, valid) -> None:
        """Per-step ratio and clip statistics (the surrogate's own clip definition)."""
        if self._diagnostics is not None:
            t = self.cfg.train
            clipped = losses.get_surrogate(t.surrogate)(log_r[:, None], adv[:, None], log_r[:, None], eps_low=t.clip_range,
                                                        eps_high=t.clip_range_high).clipped[:, 0]
            self._diagnostics.add(j, log_r, adv, valid, clipped)

    def _kl_std(self, sub: Trajectory, j: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Std dividing the Gaussian KL: the transition std ('exact'), or for the SDE step flow_grpo's
        diffusion coefficient sigma_t = std / sqrt(dt) (train.kl_form = 'flow_grpo': the exact KL times dt)."""
        if self.cfg.train.kl_form == "exact" or sub.step_kind != "sde":
            return std
        dt = gather_steps(sub.sigmas, j) - gather_steps(sub.sigmas, j + 1)
        return std / dt.sqrt()

    def _optimizer_step(self, epoch: int = 0, loss: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Reduce, check, clip and apply the accumulated gradients; a NaN/inf gradient raises
        :class:`NonFiniteError` before any weight changes."""
        if self.world > 1:  # sum gradients over processes (losses are normalised by global counts)
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad = self.acc.reduce(p.grad, "sum")
        t = self.cfg.train
        if t.max_grad_norm > 0:
            norm = self.acc.clip_grad_norm_(self.params, t.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None]))
        if not torch.isfinite(torch.as_tensor(norm)):  # one host sync per optimizer step; identical on every process
            self._raise_nonfinite(epoch, norm, loss)
        self.optimizer.step()
        if getattr(self, "_nonfinite", None) is not None:
            self._nonfinite.zero_()
        self.global_step += 1
        if self.ema is not None:
            self.ema.step(self.global_step)
        return torch.as_tensor(norm, device=self.device).float()

    def _raise_nonfinite(self, epoch: int, norm, loss) -> None:
        table = getattr(self, "_nonfinite", None)
        table = self.acc.reduce(table, "sum") if table is not None and self.world > 1 else table
        terms = []
        if table is not None:
            for col, name in enumerate(("policy log-prob / ratio", "KL to the reference")):
                steps = table[:, col].nonzero().flatten().tolist()
                if steps:
                    terms.append(f"{name} at denoising step(s) {steps}")
        where = "; ".join(terms) or (f"the gradient (loss {float(loss):.4g})" if loss is not None else "the gradient")
        self.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(
            f"non-finite loss or gradient (grad norm {float(norm)}) at epoch {epoch + 1}, optimizer step "
            f"{self.global_step + 1}: {where}. The optimizer step was skipped, so the weights are unchanged; "
            f"{self._resume_hint()}. Check the rewards' scale, train.lr, train.kl_beta and the dtype "
            f"(model.dtype / mixed_precision)")

    def _reference(self):
        if self.reference is not None:
            return forward_of(self.denoiser, self.reference)
        return adapters_disabled(self.denoiser)

    def _autocast(self):
        return self.acc.autocast() if self.cfg.mixed_precision != "no" else nullcontext()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def sample_images(self, prompts: List[str], seed: int, num_steps: int, noise_level: float = 0.0) -> torch.Tensor:
        """Generate one image per prompt (ODE by default), deterministic in ``seed``; ``[N, 3, H, W]``."""
        bs = self.cfg.sampling.batch_size
        images = []
        for b, start in enumerate(range(0, len(prompts), bs)):
            chunk = prompts[start:start + bs]
            gen = torch.Generator(self.device).manual_seed(_seed(seed, b))
            with self._autocast():
                traj = rollout(self.policy, self.policy.encode(chunk), chunk, num_steps, noise_level,
                               self.cfg.sampling.step_kind, generator=gen)
                images.append(self.policy.decode(traj.final).float().cpu())
        return torch.cat(images)

    @torch.no_grad()
    def evaluate(self, save_before: bool = False) -> Dict[str, float]:
        """ODE samples of the eval prompts (this process's share), rewards gathered; ``eval/*`` means."""
        e = self.cfg.eval
        prompts = [p for p in self.eval_prompts for _ in range(e.num_per_prompt)]
        mine = prompts[self.rank::self.world]
        self.denoiser.eval()
        ctx = self.ema.swapped_in() if (self.ema is not None and e.use_ema and self.global_step) else nullcontext()
        with ctx:
            images = self.sample_images(mine, _seed(e.seed, self.rank), e.num_steps or self.cfg.sampling.num_steps)
        total, parts = self.reward_fn(images, mine, [{"eval": True} for _ in mine])
        # processes may hold different numbers of eval images (a gather needs equal sizes): reduce sums and counts
        count = self.acc.reduce(torch.tensor(float(len(mine)), device=self.device), "sum")
        out = {"eval/reward": (self.acc.reduce(total.sum().to(self.device), "sum") / count).item()}
        for k, v in parts.items():
            out[f"eval/{k}"] = (self.acc.reduce(v.sum().to(self.device), "sum") / count).item()
        for hook in self.eval_hooks if self.world == 1 else []:
            out.update(hook(images, mine))
        if save_before and self.is_main:
            from safetensors.torch import save_file

            save_file({"images": images.contiguous()}, os.path.join(self.cfg.output_dir, "before_images.safetensors"))
        self._last_eval_images = images
        return out

    # ------------------------------------------------------------------ persistence and logging
    def _log(self, row: Dict[str, float]) -> None:
        if self.is_main:
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            shown = {k: round(v, 4) for k, v in row.items() if k in ("epoch", "reward/mean", "eval/reward", "ratio_mean",
                                                                     "clip_frac", "kl", "grad_norm") or "accuracy" in k}
            tqdm.write(f"[genalign] {shown}")
        self.acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row.get("global_step", 0))

    def _trainer_state(self) -> Dict:
        return {"epoch": self.epoch, "global_step": self.global_step, "samples_seen": self.samples_seen,
                "model_calls": self.model_calls, "config": to_dict(self.cfg)}

    def save(self) -> Optional[str]:
        """Atomic checkpoint: optimizer + RNG (accelerate), trainable weights, EMA, trainer state."""
        self.acc.wait_for_everyone()
        if not self.is_main:
            self.acc.wait_for_everyone()
            return None

        def write(tmp: str) -> None:
            from safetensors.torch import save_file

            self.acc.save_state(os.path.join(tmp, "accelerate"))
            if has_lora(self.denoiser):
                save_lora(self.policy, os.path.join(tmp, "lora"), self.cfg.model.id)
            else:
                save_file({n: p.detach().cpu().contiguous() for n, p in self.denoiser.named_parameters() if p.requires_grad},
                          os.path.join(tmp, "denoiser.safetensors"))
            if self.ema is not None:
                state = self.ema.state_dict()
                save_file({str(i): s.contiguous() for i, s in enumerate(state["shadow"])}, os.path.join(tmp, "ema.safetensors"))
            with open(os.path.join(tmp, "trainer_state.json"), "w") as fh:
                json.dump({**self._trainer_state(), "ema_updates": self.ema.num_updates if self.ema else 0}, fh)

        path = save_checkpoint(os.path.join(self.cfg.output_dir, "checkpoints"), self.global_step, write,
                               self.cfg.checkpoint.keep_last)
        self.acc.wait_for_everyone()
        return path

    def _load(self, path: str) -> None:
        from safetensors.torch import load_file

        with open(os.path.join(path, "trainer_state.json")) as fh:
            state = json.load(fh)
        diff = _config_diff(state["config"], to_dict(self.cfg))
        if diff:
            raise ConfigError(f"cannot resume from {path}: the config differs in {diff} "
                              f"(only num_epochs, eval.* and checkpoint.* may change)")
        if has_lora(self.denoiser):
            from peft.utils import set_peft_model_state_dict

            set_peft_model_state_dict(self.denoiser, load_file(os.path.join(path, "lora", "adapter_model.safetensors")))
        else:
            named = dict(self.denoiser.named_parameters())
            for n, v in load_file(os.path.join(path, "denoiser.safetensors")).items():
                named[n].data.copy_(v)
        self.acc.load_state(os.path.join(path, "accelerate"))
        if self.ema is not None:
            shadow = load_file(os.path.join(path, "ema.safetensors"))
            self.ema.load_state_dict({"shadow": [shadow[str(i)] for i in range(len(shadow))],
                                      "num_updates": state.get("ema_updates", 0)})
        self.epoch, self.global_step, self.samples_seen = state["epoch"], state["global_step"], state["samples_seen"]
        self.model_calls = state.get("model_calls", 0)
        if self.is_main:
            _truncate_metrics(self.metrics_path, self.epoch)

    def finish(self) -> Dict[str, float]:
        """Export the final weights, the reward curve and a before/after grid; return the last metrics."""
        out = self.cfg.output_dir
        if self.is_main:
            if has_lora(self.denoiser):
                ctx = self.ema.swapped_in() if self.ema is not None and self.cfg.eval.use_ema else nullcontext()
                with ctx:
                    save_lora(self.policy, os.path.join(out, "final", "lora"), self.cfg.model.id)
                if self.ema is not None:
                    save_lora(self.policy, os.path.join(out, "final", "lora_raw"), self.cfg.model.id)
            else:
                from safetensors.torch import save_file

                os.makedirs(os.path.join(out, "final"), exist_ok=True)
                save_file({n: p.detach().cpu().contiguous() for n, p in self.denoiser.state_dict().items()},
                          os.path.join(out, "final", "denoiser.safetensors"))
            from .plots import plot_metrics

            plot_metrics(self.metrics_path, os.path.join(out, "reward_curve.png"))
            methods.plot_step_ratios(self.metrics_path, os.path.join(out, "step_ratios.png"))
            self._before_after_grid()
        self.acc.wait_for_everyone()
        self.acc.end_training()
        return _last_metrics(self.metrics_path) if self.is_main else {}

    def _before_after_grid(self) -> None:
        from safetensors.torch import load_file

        from .plots import save_image_grid

        before_path = os.path.join(self.cfg.output_dir, "before_images.safetensors")
        after = getattr(self, "_last_eval_images", None)
        if after is None or not os.path.isfile(before_path) or self.world > 1:
            return
        before = load_file(before_path)["images"]
        if len(before) != len(after):
            return
        # eval images are prompt-major: show the first 8 prompts x at most 8 images each (same noise per cell)
        per, cols = self.cfg.eval.num_per_prompt, min(8, self.cfg.eval.num_per_prompt)
        keep = torch.tensor([p * per + c for p in range(min(8, len(after) // per)) for c in range(cols)])
        save_image_grid([before[keep], after[keep]], os.path.join(self.cfg.output_dir, "before_after.png"),
                        columns=cols, titles=["before", "after"])


# ---------------------------------------------------------------------- helpers

def _policy_modules(policy) -> List[torch.nn.Module]:
    mods = []
    for v in vars(policy).values():
        if isinstance(v, torch.nn.Module):
            mods.append(v)
        elif hasattr(v, "components") and isinstance(getattr(v, "components"), dict):
            mods += [m for m in v.components.values() if isinstance(m, torch.nn.Module)]
    return mods


def _tracker_available(name: str) -> bool:
    import importlib.util

    module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(name, name)
    return importlib.util.find_spec(module) is not None


def _flat(d: Dict, prefix: str = "") -> Dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _config_diff(old: Dict, new: Dict) -> List[str]:
    free = ("num_epochs", "eval.", "checkpoint.", "output_dir", "log_with")
    a, b = _flat(old), _flat(new)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not k.startswith(free)]


def _truncate_metrics(path: str, epoch: int) -> None:
    """Drop metric rows written after the checkpoint we resume from (they will be recomputed)."""
    if not os.path.isfile(path):
        return
    with open(path) as fh:
        rows = [line for line in fh if line.strip() and json.loads(line).get("epoch", 0) <= epoch]
    with open(path, "w") as fh:
        fh.writelines(rows)


def _last_metrics(path: str) -> Dict[str, float]:
    merged: Dict[str, float] = {}
    if os.path.isfile(path):
        with open(path) as fh:
            for line in fh:
                merged.update(json.loads(line))
    return merged


def train(cfg: Config, resume: Optional[str] = None) -> Dict[str, float]:
    """Build a :class:`Trainer` and run it."""
    return Trainer(cfg, resume=resume).train()


__all__ = ["Trainer", "train"]
