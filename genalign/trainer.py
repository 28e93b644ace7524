"""The one training loop: rollout -> rewards -> objective (advantages, loss) -> optimizer step.

:meth:`Trainer.train` reads top to bottom: each epoch samples trajectories with per-step log-probs and scores
them (:meth:`Trainer.sample_epoch`; DAPO refill: :meth:`Trainer.dynamic_sample_epoch`), the method's objective
(:mod:`genalign.objectives`: policy gradient for the Flow-GRPO family and Adv-GRPO, DRAGON's preference loss)
turns the GLOBAL rewards into units, and :meth:`Trainer.optimise` runs its optimizer steps through the one
:class:`genalign.optim.OptimizerStep` (accelerate's prepare / backward / no_sync / clip: DDP, FSDP and DeepSpeed
come from the accelerate config). Run files live in :class:`genalign.run.RunDir`, checkpoints in
:class:`genalign.checkpoint.Checkpointer`.

Distributed: every process runs this loop on its slice of the epoch's samples; rewards are gathered, and the
losses are normalised by GLOBAL counts, so N processes compute what one process computes on the same batch.
"""

from __future__ import annotations

import copy
import json
import os
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Dict, List, Optional

import torch
from tqdm.auto import tqdm

from . import methods
from .advantages import zero_variance_groups
from .checkpoint import Checkpointer, resolve_resume
from .config import Config, ConfigError
from .ema import EMA
from .hacking import HackingMonitor
from .lora import FULL_EMA_WEIGHTS, FULL_WEIGHTS, add_lora, has_lora, save_lora, write_base_meta
from .methods import EpochPlan, mix_seed as _seed
from .objectives import EpochBatch, TrainContext, build_objective
from .optim import NonFiniteError, OptimizerStep, build_optimizer, lr_factor, save_state_hooks
from .plugins import load_policy
from .policy import check_prompt_conditioning, encode_prompts
from .prompts import KRepeatSampler, run_prompt_records
from .reward_api import RewardError, RewardSet, TrainableReward, discriminator_round
from .rollout import Trajectory, rollout
from .run import RunDir, check_output_dir, check_trackers, clear_run, new_run_id, shown_indices
from .datasets import ImageDataset, pair_rewards
from .evaluator import Evaluator
from .sampling import image_seed, sample_images

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def objective_name(cfg: Config) -> str:
    """The objective the config's method trains with."""
    return cfg.method_spec().objective


class Trainer:
    """The trainer for any :class:`genalign.policy.Policy` adapter and any registered objective.

    resume: 'latest' or a checkpoint directory (:func:`genalign.checkpoint.resolve_resume`).
    overwrite: start a new run in an output directory that holds a previous run, deleting that run's files
        (:func:`genalign.run.clear_run`); without it (and without ``resume``) such a directory is refused.
    """

    def __init__(self, cfg: Config, resume: Optional[str] = None, accelerator=None, overwrite: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        self.cfg = cfg
        trackers = check_trackers(cfg.log_with)  # a requested tracker that is not installed is an error
        if cfg.checkpoint.every < 0 or cfg.checkpoint.every_minutes < 0:
            raise ConfigError("checkpoint.every and checkpoint.every_minutes must be >= 0 (0 disables)")
        check_output_dir(cfg.output_dir, resume, overwrite)  # before anything is loaded: cheap to fail
        # no buffer broadcast: processes may run different numbers of forwards (uneven eval shares)
        ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
        self.acc = accelerator or Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision,
                                              log_with=trackers or None, project_dir=cfg.output_dir,
                                              kwargs_handlers=[ddp])
        cfg.validate(self.acc.num_processes)
        set_seed(cfg.seed)
        self.device = torch.device(cfg.model.device) if cfg.model.device else self.acc.device
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.is_main = self.acc.is_main_process

        # data and reward first: cheap to fail early on bad input
        records, eval_records = run_prompt_records(cfg)
        self.prompts, self.prompt_metadata = [r["prompt"] for r in records], [r["metadata"] for r in records]
        # per-prompt conditioning passed to the model (negative prompt, condition images); None: nothing
        self.prompt_conditioning = [r.get("conditioning") for r in records]
        self.eval_prompts = [r["prompt"] for r in eval_records]
        if self.eval_prompts and len(self.eval_prompts) * cfg.eval.num_per_prompt < self.world:
            raise ConfigError(f"{len(self.eval_prompts)} eval prompts x eval.num_per_prompt = {cfg.eval.num_per_prompt} "
                              f"images cannot be shared by {self.world} processes (each needs at least one)")
        # every built-in reward model goes to this process's device unless its options say otherwise
        try:
            self.reward_fn = RewardSet(cfg.reward, cfg.reward_options, device=str(self.device))
        except AttributeError as exc:  # a misspelled function of a reward script: a config error
            if not str(exc).startswith("reward script"):
                raise
            raise ConfigError(f"reward: {exc}") from exc
        # Adv-GRPO: a reward model trained between generator rounds (checkpointed with the generator by accelerate)
        self.adversary = next((fn for _, fn, _ in self.reward_fn.components if isinstance(fn, TrainableReward)), None)
        if self.adversary is not None:
            self.acc.register_for_checkpointing(self.adversary)

        self.policy = load_policy(cfg.model.id, device=self.device, dtype=DTYPES[cfg.model.dtype],
                                  guidance_scale=cfg.model.guidance_scale,
                                  **cfg.model.policy_kwargs())
        self.denoiser = self.policy.denoiser()
        for key, recs in (("prompts_file", records), ("eval_prompts_file", eval_records)):
            try:  # before any sampling: the adapter takes (CFG on, condition images accepted) what the records give
                check_prompt_conditioning(self.policy, [r["prompt"] for r in recs],
                                          [r.get("conditioning") for r in recs])
            except ValueError as exc:
                raise ConfigError(f"{key} {getattr(cfg, key)!r}: {exc}") from exc
        if cfg.model.decode_batch_size and hasattr(self.policy, "decode_batch_size"):
            self.policy.decode_batch_size = cfg.model.decode_batch_size
        if cfg.model.xformers and hasattr(self.policy, "enable_xformers"):
            self.policy.enable_xformers()  # no-op without xformers or off CUDA
        if (cfg.eval.height or cfg.eval.width) and not hasattr(self.policy, "resolution"):
            raise ConfigError(f"eval.height / eval.width: the {type(self.policy).__name__} adapter samples at one fixed "
                              f"resolution (remove them)")
        self._setup_trainable()
        self.dataset = None  # data-driven methods (sft, offline diffusion_dpo): encoded once, before training
        if cfg.data.train_file:
            self.dataset = ImageDataset(cfg.data.train_file, cfg.method_spec().data_kind, self.policy,
                                        cfg.sampling.batch_size, log=print if self.is_main else None)
        if self.reward_fn.group_level and self.world > 1:
            raise ConfigError(f"reward {self.reward_fn.names} has a group-level component, which needs every prompt "
                              f"group's images in one call; groups span processes, so run it on 1 process")
        self.ctx = TrainContext(cfg, self.policy, self.acc, self.optim, self.reward_fn, self.frozen_reference)
        self.evaluator = (Evaluator(self.eval_prompts, cfg.eval.num_per_prompt, cfg.eval.seed,
                                    cfg.eval.num_steps or cfg.sampling.num_steps, cfg.sampling.batch_size,
                                    self.reward_fn, self.acc, metadata=[r["metadata"] for r in eval_records],
                                    conditioning=[r.get("conditioning") for r in eval_records])
                          if self.eval_prompts else None)
        self.objective = build_objective(objective_name(cfg), self.ctx)
        self.anchor = None  # data.anchor_file: the flow-matching loss on reference images beside the method's loss
        if cfg.data.anchor_file:
            from .objectives.anchor import DataAnchor

            try:
                self.anchor = DataAnchor(self.ctx, ImageDataset(
                    cfg.data.anchor_file, "image", self.policy, cfg.sampling.batch_size,
                    log=print if self.is_main else None, key="data.anchor_file"))
            except (ValueError, FileNotFoundError) as exc:  # a bad file, record or model: one ConfigError naming it
                raise ConfigError(str(exc)) from exc
        self.sampler = KRepeatSampler(len(self.prompts), cfg.sampling.groups_per_epoch, cfg.sampling.group_size,
                                      cfg.seed, self.world, self.rank)
        self.noise_levels = self._noise_levels()
        self.epoch, self.samples_seen, self.model_calls = 0, 0, 0
        # extra evaluation metrics: callables (eval images [N, 3, H, W], prompts) -> {name: float} (one process)
        self.eval_hooks: List = [self._judge()] if cfg.eval.judge and self.eval_prompts else []
        self.eval_hooks = [h for h in self.eval_hooks if h is not None]
        e = cfg.eval
        self.monitor = HackingMonitor(e.max_fd_rise, e.max_diversity_drop, e.on_hacking)
        self.run_dir = RunDir(cfg, self.acc, trackers)
        self.metrics_path = self.run_dir.metrics_path
        self.checkpointer = Checkpointer(self)
        self.run_id = new_run_id()  # replaced by the checkpoint's run id on resume
        resumed = self.checkpointer.load(resolve_resume(cfg.output_dir, resume)) if resume else None
        if overwrite:  # everything above succeeded: only now delete the previous run
            if self.is_main:
                clear_run(cfg.output_dir)
            self.acc.wait_for_everyone()
        self.run_dir.run_id = self.run_id
        self.run_dir.start(resumed)

    # ------------------------------------------------------------------ setup
    def _judge(self):
        """The independent realism / diversity judge (:func:`genalign.judge.build_judge`)."""
        from .judge import build_judge

        e = self.cfg.eval
        return build_judge(self.policy, e.judge_encoder, e.judge_references, e.judge_options, self.acc.device)

    def _setup_trainable(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        for module in _policy_modules(self.policy):
            module.requires_grad_(False)
        self.frozen_reference = None
        if cfg.lora.enabled:
            targets = cfg.lora.target_modules or self.policy.lora_target_modules
            add_lora(self.denoiser, cfg.lora.rank, cfg.lora.alpha, targets)
        else:
            needs_reference = cfg.method_spec().needs_reference(cfg)
            if needs_reference and t.reference_copy:
                self.frozen_reference = copy.deepcopy(self.denoiser).eval()
                if t.reference_device:  # e.g. 'cpu': the copy does not occupy accelerator memory
                    self.frozen_reference.to(t.reference_device)
            elif needs_reference:
                raise ConfigError(f"method {cfg.method} with these options (train.kl_beta = {t.kl_beta}) uses the "
                                  f"reference policy, which full fine-tuning has no copy of: set "
                                  f"train.reference_copy=true (keeps a frozen copy) or lora.enabled=true")
            self.denoiser.requires_grad_(True)
            freeze_matching(self.denoiser, t.frozen_modules)
        self.denoiser.to(self.device)
        if t.gradient_checkpointing:
            if not hasattr(self.denoiser, "enable_gradient_checkpointing"):
                raise ConfigError(f"train.gradient_checkpointing: {type(self.denoiser).__name__} does not support it")
            self.denoiser.enable_gradient_checkpointing()
        self.params = [p for p in self.denoiser.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("no trainable parameters (check lora.target_modules)")
        for p in self.params:  # trainable weights in float32; frozen ones keep model.dtype
            p.data = p.data.float()
        opt = build_optimizer(self.params, t, self.device)
        self.ema = EMA(self.params, t.ema_decay, t.ema_every) if t.ema else None
        save_state_hooks(self.acc)
        self.optim = OptimizerStep(self.acc, self.denoiser, opt, self.params, t.max_grad_norm, self.ema,
                                   describe_failure=self._failure_detail)
        self.optimizer = self.optim.optimizer

    @property
    def global_step(self) -> int:
        return self.optim.num_steps

    @global_step.setter
    def global_step(self, value: int) -> None:
        self.optim.num_steps = value

    def _noise_levels(self) -> torch.Tensor:
        s = self.cfg.sampling
        levels = torch.full((s.num_steps,), float(s.noise_level))
        if s.last_step_deterministic:
            levels[-1] = 0.0
        return levels

    def trainable_steps(self) -> List[int]:
        """Stochastic steps that are trained: the first ``int(timestep_fraction * n)`` of them (>= 1;
        :func:`genalign.methods.trainable_tensor` raises ConfigError when none)."""
        return methods.trainable_tensor(self.cfg).tolist()

    def plan(self, epoch: int) -> EpochPlan:
        """Noise levels and trained steps of every sample of ``epoch`` (windows, branching; see
        :mod:`genalign.methods`), identical on every process."""
        return methods.plan_epoch(self.cfg, epoch, self.sampler.epoch(epoch)[1], self.noise_levels)

    # ------------------------------------------------------------------ the loop
    def train(self) -> Dict[str, float]:
        cfg = self.cfg
        t0 = time.time()
        self.checkpointer.start_clock()
        if self.epoch == 0 and self.eval_prompts:
            evals = self.evaluate(save_before=True)
            self.run_dir.log({"epoch": 0, "global_step": 0, "samples_seen": 0, **evals, **self._watch(0, evals)})
        t = cfg.train
        for epoch in range(self.epoch, cfg.num_epochs):
            t_start = time.time()
            self.optim.set_lr(t.lr * lr_factor(t.lr_schedule, epoch, cfg.num_epochs, t.lr_warmup_epochs, t.lr_min_ratio))
            extra = self.train_discriminator(epoch) if self.adversary is not None else {}
            if self.dataset is not None:
                batch = self.dataset_epoch(epoch)
            else:
                plan = self.plan(epoch)
                with self.objective.sampling_context():  # the weights that sample (DiffusionNFT: the old policy)
                    if cfg.train.dynamic_sampling:
                        batch, dyn = self.dynamic_sample_epoch(epoch, plan)
                        extra.update(dyn)
                    else:
                        batch = EpochBatch(*self.sample_epoch(epoch, plan), plan=plan)
            t_sampled = time.time()
            stats = self.optimise(epoch, batch) if len(batch.group_ids) else {}
            self.objective.after_epoch(self.global_step)
            t_trained = time.time()
            if self.dataset is not None:  # data records (pairs: two images each) instead of samples
                n_sampled = len(batch.group_ids)
            else:
                n_sampled = cfg.samples_per_epoch * int(extra.get("dynamic/rounds", 1))
                self.model_calls += batch.plan.model_calls  # sampling forwards (TempFlow: T per main + T - j per branch)
            self.epoch, self.samples_seen = epoch + 1, self.samples_seen + n_sampled
            rewards = batch.rewards if self.dataset is None else torch.zeros(0)
            row = {"epoch": self.epoch, "global_step": self.global_step, "samples_seen": self.samples_seen,
                   "model_calls": self.model_calls,
                   **({"reward/mean": rewards.mean().item(), "reward/std": rewards.std().item()} if len(rewards) else {}),
                   **{f"reward/{k}/mean": v.mean().item() for k, v in batch.parts.items() if len(v)},
                   **stats, **extra, "lr": self.optimizer.param_groups[0]["lr"],
                   "time/sample_s": t_sampled - t_start, "time/train_s": t_trained - t_sampled,
                   "samples_per_s": n_sampled / max(t_trained - t_start, 1e-9), "elapsed_s": time.time() - t0}
            last = self.epoch == cfg.num_epochs
            if self.eval_prompts and (last or (cfg.eval.every and self.epoch % cfg.eval.every == 0)):
                evals = self.evaluate()
                row.update(evals)
                row.update(self._watch(self.epoch, evals))
            self.run_dir.log(row)
            stop = self.monitor.stop_requested
            if self.checkpointer.due(self.epoch, last or stop):  # the same decision on every process
                self.save()
            if stop:
                break
        return self.finish()

    def _watch(self, epoch: int, evals: Dict[str, float]) -> Dict[str, float]:
        """The reward-hacking check of one evaluation (:class:`genalign.hacking.HackingMonitor`); with
        ``eval.keep_best`` a new best unflagged evaluation writes its weights to ``<output_dir>/best``."""
        out = self.monitor.update(epoch, evals)
        if out.get("hacking/is_best") and self.cfg.eval.keep_best:
            best = os.path.join(self.cfg.output_dir, "best")
            if self.is_main:
                import shutil

                shutil.rmtree(best, ignore_errors=True)
                os.makedirs(best)
            self.acc.wait_for_everyone()
            self.save_weights(best)  # collective when sharded; the main process writes
            if self.is_main:
                with open(os.path.join(best, "best.json"), "w") as fh:
                    json.dump(self.monitor.best, fh, indent=1)
        return out

    def optimise(self, epoch: int, batch: EpochBatch) -> Dict[str, float]:
        """The objective's optimizer steps on this epoch's batch (``train.num_minibatches`` per inner epoch)."""
        obj, t, anchor = self.objective, self.cfg.train, self.anchor
        units = obj.prepare(epoch, batch)
        anchor_units = None if anchor is None else anchor.prepare(epoch, self.dataset_epoch(
            epoch, anchor.dataset, self.cfg.data.anchor_per_epoch))
        sums: Dict[str, torch.Tensor] = {}
        count, norms = 0, []
        self.denoiser.train()
        for inner in range(t.num_inner_epochs):
            parts = obj.minibatches(units, epoch, inner)
            anchor_parts = None if anchor is None else anchor.minibatches(anchor_units, epoch, inner, len(parts))
            for i, rows in enumerate(tqdm(parts, desc=f"epoch {epoch + 1} training", disable=not self.is_main,
                                          leave=False)):
                fns = obj.backwards(units, rows)
                if not fns:  # no sample in this step on any process (equal shares): nothing to step
                    continue
                if anchor is not None:  # the anchor's passes join the method's in the same optimizer step
                    fns = list(fns) + anchor.backwards(anchor_units, anchor_parts[i])
                step_sums, norm = self.optim.run(fns, where=f" at epoch {epoch + 1}, optimizer step "
                                                            f"{self.global_step + 1}: ")
                obj.after_step()
                for key, v in step_sums.items():
                    sums[key] = sums[key] + v if key in sums else v
                count, norms = count + 1, norms + [norm]
        stats = {key: (v / max(count, 1)).item() for key, v in sums.items()}
        stats["grad_norm"] = torch.stack(norms).mean().item() if norms else 0.0
        stats.update(obj.stats(units))
        if anchor is not None:
            stats.update(anchor.stats(anchor_units))
        stats.update(obj.epoch_stats())
        return stats

    def accumulate(self, units, rows: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The gradients of one optimizer step over ``rows`` of ``units`` without applying them (tests,
        benchmarks); returns the step's summed statistics."""
        return self.optim.accumulate(self.objective.backwards(units, rows))

    def _failure_detail(self) -> str:
        return (f"{self.objective.describe_failure()}. The optimizer step was skipped, so the weights are unchanged; "
                f"{self.checkpointer.resume_hint()}. Check the rewards' scale, train.lr, train.kl_beta and the dtype "
                f"(model.dtype / mixed_precision)")

    def train_discriminator(self, epoch: int) -> Dict[str, float]:
        """Adv-GRPO: ``adversarial.steps`` discriminator steps, each on ``adversarial.num_samples`` fresh images
        of random training prompts (SDE at ``sampling.noise_level``; the same on every process)."""
        a, s = self.cfg.adversarial, self.cfg.sampling

        def sample(k: int):  # the one sampling service, per-image seeds (identical on every process)
            g = torch.Generator().manual_seed(_seed(self.cfg.seed, epoch, k, 13))
            chosen = torch.randint(len(self.prompts), (a.num_samples,), generator=g).tolist()
            prompts = [self.prompts[i] for i in chosen]
            base = _seed(self.cfg.seed, epoch, k, 17)
            images = sample_images(self.policy, prompts, [image_seed(base, i) for i in range(len(prompts))],
                                   s.num_steps, s.batch_size, noise_level=s.noise_level, step_kind=s.step_kind,
                                   autocast=self.autocast, conditioning=[self.prompt_conditioning[i] for i in chosen])
            return images, prompts

        return discriminator_round(self.adversary, sample, a.steps, a.rule, _seed(self.cfg.seed, epoch, 19))

    # ------------------------------------------------------------------ sampling
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
        conditioning = [self.prompt_conditioning[prompt_idx[i]] for i in local]  # a group's rows repeat its prompt's
        mine = (plan or self.plan(epoch)).select(torch.tensor(local))
        trajs, futures, branches = [], [], None
        grouped = self.reward_fn.group_level  # group-level rewards score the whole epoch at once (whole groups)
        pool = ThreadPoolExecutor(1) if s.async_rewards and not grouped else None
        self.denoiser.eval()
        if mine.branch_step is not None:  # TempFlow: all local branches at once (each main ODE runs once)
            gen = torch.Generator(self.device).manual_seed(_seed(cfg.seed, draw, self.rank))
            with self.autocast():
                branches = methods.branch_rollout(self.policy, encode_prompts(self.policy, prompts, conditioning),
                                                  prompts, mine,
                                                  _seed(cfg.seed, draw), s.step_kind, s.batch_size, generator=gen,
                                                  reduction=s.log_prob_reduction)
        batches = range(0, len(prompts), s.batch_size)
        for b, start in enumerate(tqdm(batches, desc=f"epoch {epoch + 1} sampling", disable=not self.is_main, leave=False)):
            batch_prompts = prompts[start:start + s.batch_size]
            gen = torch.Generator(self.device).manual_seed(_seed(cfg.seed, draw, self.rank, b))
            with self.autocast():
                if branches is not None:
                    traj = branches.select(slice(start, start + s.batch_size))
                else:
                    cond = encode_prompts(self.policy, batch_prompts, conditioning[start:start + s.batch_size])
                    traj = rollout(self.policy, cond, batch_prompts, s.num_steps,
                                   mine.levels[start:start + s.batch_size], s.step_kind, generator=gen,
                                   reduction=s.log_prob_reduction)
                images = self.policy.decode(traj.final)
            trajs.append(traj)
            meta = [{**self.prompt_metadata[prompt_idx[local[start + i]]], "epoch": epoch, "rank": self.rank,
                     "index": start + i, "group": int(group_ids[local[start + i]])} for i in range(len(batch_prompts))]
            call = (self._score, images, batch_prompts, meta, epoch, b)
            futures.append(call if grouped else pool.submit(*call) if pool else call[0](*call[1:]))
        if grouped:  # one call with the epoch's samples (one process: every group is whole)
            futures = [self._score(torch.cat([c[1] for c in futures]), [p for c in futures for p in c[2]],
                                   [m for c in futures for m in c[3]], epoch, 0)]
        results = [f.result() if pool else f for f in futures]
        if pool:
            pool.shutdown()
        rewards = torch.cat([r for r, _ in results])
        parts = {k: torch.cat([p[k] for _, p in results]) for k in results[0][1]}
        rewards_all = self.acc.gather(rewards.to(self.device)).cpu()
        parts_all = {k: self.acc.gather(v.to(self.device)).cpu() for k, v in parts.items()}
        return Trajectory.cat(trajs), rewards_all, parts_all, group_ids, torch.tensor(local)

    def dataset_epoch(self, epoch: int, dataset: Optional[ImageDataset] = None,
                      count: Optional[int] = None) -> EpochBatch:
        """This epoch's records of ``dataset`` (default: ``data.train_file`` with ``data.samples_per_epoch``;
        the anchor passes its own) as an :class:`EpochBatch` (:mod:`genalign.datasets`): demonstrations each
        their own group, or preference pairs (chosen reward 1, rejected 0, the pair a group)."""
        cfg = self.cfg
        if dataset is None:
            dataset, count = self.dataset, cfg.data.samples_per_epoch
        records, m = dataset.epoch_rows(epoch, cfg.seed, self.world, self.rank, count)
        clean = dataset.batch(self.policy, records, cfg.sampling.num_steps, cfg.sampling.batch_size)
        k = dataset.per_record
        n = int(m) * self.world * k  # global rows: every process holds m records of k images
        local = torch.arange(self.rank * int(m) * k, (self.rank + 1) * int(m) * k)
        if dataset.kind == "pairs":
            rewards, group_ids = pair_rewards(n // 2)
        else:
            rewards, group_ids = torch.zeros(0), torch.arange(n)
        return EpochBatch(clean, rewards, {}, group_ids, local, plan=None)

    def dynamic_sample_epoch(self, epoch: int, plan: EpochPlan):
        """DAPO dynamic sampling: sample rounds of ``groups_per_epoch`` groups (round 0 is the plain epoch,
        round r > 0 draws new prompts and noise) until ``groups_per_epoch`` groups with reward variance exist
        or ``train.dynamic_sampling_max_rounds`` rounds ran; keep the first such groups in sampling order.

        Returns an :class:`EpochBatch` of the kept groups (global arrays re-indexed, group ids unique over
        rounds) and ``dynamic/*`` statistics. Every process keeps the same number of local rows: processes
        with fewer kept samples are padded with rows at position -1, which train nothing.
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
        rows = mine.nonzero().flatten()
        # equal shares: pad to the largest share with rows that train nothing (position -1)
        most = int(self.acc.gather(torch.tensor([len(rows)], device=self.device)).max()) if self.world > 1 else len(rows)
        spare = (~mine).nonzero().flatten()
        pad = spare[torch.arange(most - len(rows)) % max(len(spare), 1)] if most > len(rows) else spare[:0]
        traj = Trajectory.cat([r[0] for r in rounds]).select(torch.cat([rows, pad]))
        local = torch.cat([new_pos[local_all[rows]], torch.full((len(pad),), -1, dtype=torch.long)])
        plans = [r[5] for r in rounds]
        plan = EpochPlan(torch.cat([q.levels for q in plans])[keep], torch.cat([q.train_steps for q in plans])[keep],
                         sum(q.model_calls for q in plans))
        parts = {k: torch.cat([r[2][k] for r in rounds])[keep] for k in rounds[0][2]}
        stats = {"dynamic/rounds": float(len(rounds)), "dynamic/groups_kept": float(len(chosen)),
                 "dynamic/groups_with_variance": float(len(set(good.tolist())))}
        if len(chosen) < need and self.is_main:
            warnings.warn(f"epoch {epoch + 1}: dynamic sampling found only {len(chosen)} of {need} groups with reward "
                          f"variance in {len(rounds)} rounds (train.dynamic_sampling_max_rounds); training on those")
        return EpochBatch(traj, rewards[keep], parts, group_ids[keep], local, plan), stats

    def _score(self, images, prompts, meta, epoch, batch_index):
        try:
            return self.reward_fn(images, prompts, meta)
        except RewardError as exc:
            kept = self._keep_failed_batch(images, prompts, epoch, batch_index)
            raise RewardError(f"{exc} [epoch {epoch + 1}, rank {self.rank}, batch {batch_index}; the batch's "
                              f"images and prompts are kept in {kept}; fix the reward, then "
                              f"{self.checkpointer.resume_hint()}]", exc.reward, exc.indices) from exc

    def _keep_failed_batch(self, images, prompts, epoch, batch_index) -> str:
        import json

        from safetensors.torch import save_file

        out = os.path.join(self.cfg.output_dir, "failed_rewards", f"epoch{epoch + 1}-rank{self.rank}-batch{batch_index}")
        os.makedirs(out, exist_ok=True)
        save_file({"images": images.detach().float().cpu().contiguous()}, os.path.join(out, "images.safetensors"))
        with open(os.path.join(out, "prompts.json"), "w") as fh:
            json.dump(prompts, fh)
        return out

    # ------------------------------------------------------------------ forward contexts
    def reference(self):
        """Context in which the denoiser computes the reference policy (adapters disabled or the frozen copy)."""
        return self.ctx.reference()

    def autocast(self):
        return self.ctx.autocast()

    def compute_advantages(self, rewards: torch.Tensor, group_ids: torch.Tensor, plan: Optional[EpochPlan] = None):
        """The policy-gradient objective's advantages and validity (see
        :meth:`genalign.objectives.policy_gradient.PolicyGradient.advantages`)."""
        return self.objective.advantages(rewards, group_ids, plan)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, save_before: bool = False) -> Dict[str, float]:
        """ODE samples of the eval prompts through the shared :class:`genalign.evaluator.Evaluator`: image i is
        seeded ``eval.seed + i`` and drawn by process ``i % world``, so ``eval/*`` is the same for any process
        count and ``genalign eval --config <run>`` reproduces it on the same weights."""
        e = self.cfg.eval
        self.denoiser.eval()
        ctx = self.ema.swapped_in() if (e.use_ema and self.ema_used) else nullcontext()
        size = self.policy.resolution(e.height, e.width) if (e.height or e.width) else nullcontext()
        with ctx, size:
            result = self.evaluator.score(self.policy, autocast=self.autocast)
        out, images, mine = Evaluator.metrics(result.scores), result.images, result.prompts
        for hook in self.eval_hooks if self.world == 1 else []:
            out.update(hook(images, mine))
        shown = self._shown_eval_images(images, result.indices)
        if save_before:
            self.run_dir.save_before_images(shown)
        self.run_dir.log_images("eval/images", shown, self.global_step)
        self._last_eval_images = shown
        return out

    @property
    def ema_used(self) -> bool:
        """An EMA is kept and was updated at least once (else it equals the initial weights)."""
        return self.ema is not None and self.ema.num_updates > 0

    def _shown_eval_images(self, images: torch.Tensor, indices: List[int]) -> torch.Tensor:
        """The eval images of the grids and trackers (:func:`genalign.run.shown_indices`) in global order, on
        every process: each process writes its own into zeros and the buffers are summed (exact, uneven shares)."""
        wanted = shown_indices(self.evaluator.num_images, self.cfg.eval.num_per_prompt)
        where = {g: k for k, g in enumerate(wanted)}
        buf = torch.zeros(len(wanted), *images.shape[1:], dtype=torch.float32)
        for j, g in enumerate(indices):
            if g in where:
                buf[where[g]] = images[j].float().cpu()
        if self.world > 1:
            buf = self.acc.reduce(buf.to(self.acc.device), "sum").cpu()
        return buf

    # ------------------------------------------------------------------ persistence
    def counters(self) -> Dict:
        from .config import to_dict

        return {"epoch": self.epoch, "global_step": self.global_step, "samples_seen": self.samples_seen,
                "model_calls": self.model_calls, "hacking": self.monitor.state_dict(), "config": to_dict(self.cfg)}

    def save_weights(self, directory: str) -> None:
        """The trainable weights into ``directory``: ``lora/`` (adapters) or ``denoiser.safetensors``. Call on
        every process: sharded weights (FSDP) are gathered collectively; the main process writes."""
        from safetensors.torch import save_file

        with self._full_params():
            if not self.is_main:
                return
            if has_lora(self.denoiser):
                save_lora(self.policy, os.path.join(directory, "lora"), self.cfg.model.id)
            else:
                save_file({n: p.detach().cpu().contiguous() for n, p in self.denoiser.named_parameters()
                           if p.requires_grad}, os.path.join(directory, "denoiser.safetensors"))
                write_base_meta(os.path.join(directory, "denoiser.json"), self.denoiser, self.cfg.model.id)

    def _full_params(self):
        """Context with the full (unsharded) parameters in the denoiser: FSDP's ``summon_full_params``."""
        if self.optim.kind != "FSDP":
            return nullcontext()
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.summon_full_params(self.optim.wrapped, writeback=False, rank0_only=True)

    def load_weights(self, directory: str) -> None:
        """Inverse of :meth:`save_weights`."""
        from safetensors.torch import load_file

        if has_lora(self.denoiser):
            from peft.utils import set_peft_model_state_dict

            set_peft_model_state_dict(self.denoiser, load_file(os.path.join(directory, "lora", "adapter_model.safetensors")))
        else:
            named = dict(self.denoiser.named_parameters())
            for n, v in load_file(os.path.join(directory, "denoiser.safetensors")).items():
                named[n].data.copy_(v)

    def save(self) -> Optional[str]:
        """Atomic checkpoint of every stateful part (:class:`genalign.checkpoint.Checkpointer`)."""
        return self.checkpointer.save()

    def finish(self) -> Dict[str, float]:
        """Export the final weights, the reward curve and a before/after grid; return the last metrics."""
        out = self.cfg.output_dir
        with self._full_params():  # collective under FSDP; the main process writes
            self._export_final(out)
        if self.is_main:
            from .plots import plot_metrics

            plot_metrics(self.metrics_path, os.path.join(out, "reward_curve.png"))
            methods.plot_step_ratios(self.metrics_path, os.path.join(out, "step_ratios.png"))
            self.run_dir.before_after_grid(getattr(self, "_last_eval_images", None), self.cfg.eval.num_per_prompt,
                                           self.global_step)
        self.acc.wait_for_everyone()
        self.acc.end_training()
        return self.run_dir.last_metrics() if self.is_main else {}

    def _export_final(self, out: str) -> None:
        """``final/lora`` (or ``final/denoiser.safetensors`` with ``denoiser.json``, the base model's id): the trained
        weights; ``final/lora_ema`` (or ``final/denoiser_ema.safetensors``): the EMA weights, only when the EMA was updated at least once.
        Training-time evaluation used the EMA weights exactly when ``eval.use_ema`` and ``final/lora_ema`` exists
        (README, "Run directories, checkpoints and EMA")."""
        if not self.is_main:
            return
        import shutil

        final = os.path.join(out, "final")
        shutil.rmtree(final, ignore_errors=True)  # a resumed run re-exports everything
        os.makedirs(final)
        if has_lora(self.denoiser):
            save_lora(self.policy, os.path.join(final, "lora"), self.cfg.model.id)
            if self.ema_used:
                with self.ema.swapped_in():
                    save_lora(self.policy, os.path.join(final, "lora_ema"), self.cfg.model.id)
        else:
            from safetensors.torch import save_file

            def write(name):
                save_file({n: p.detach().cpu().contiguous() for n, p in self.denoiser.state_dict().items()},
                          os.path.join(final, name))

            write(FULL_WEIGHTS)
            write_base_meta(os.path.join(final, "denoiser.json"), self.denoiser, self.cfg.model.id)
            if self.ema_used:
                with self.ema.swapped_in():
                    write(FULL_EMA_WEIGHTS)


# ---------------------------------------------------------------------- helpers

def freeze_matching(module: torch.nn.Module, patterns: List[str]) -> None:
    """Freeze the parameters of ``module`` whose names contain a match of one of ``patterns``
    (``train.frozen_modules``); a pattern matching no parameter raises ConfigError naming it."""
    if not patterns:
        return
    names = [n for n, _ in module.named_parameters()]
    unused = [p for p in patterns if not any(re.search(p, n) for n in names)]
    if unused:
        raise ConfigError(f"train.frozen_modules: {unused} match no parameter of {type(module).__name__} "
                          f"(parameter names look like {names[:3]} ... {names[-2:]})")
    for n, p in module.named_parameters():
        if any(re.search(pat, n) for pat in patterns):
            p.requires_grad_(False)


def _policy_modules(policy) -> List[torch.nn.Module]:
    mods = []
    for v in vars(policy).values():
        if isinstance(v, torch.nn.Module):
            mods.append(v)
        elif hasattr(v, "components") and isinstance(getattr(v, "components"), dict):
            mods += [m for m in v.components.values() if isinstance(m, torch.nn.Module)]
    return mods


def train(cfg: Config, resume: Optional[str] = None, overwrite: bool = False) -> Dict[str, float]:
    """Build a :class:`Trainer` and run it."""
    return Trainer(cfg, resume=resume, overwrite=overwrite).train()


__all__ = ["NonFiniteError", "Trainer", "objective_name", "train"]
