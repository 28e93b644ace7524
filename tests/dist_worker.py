"""Worker for tests/test_distributed.py: one epoch's sampling, advantages and ONE optimizer step of the real
:class:`genalign.trainer.Trainer`, with the global results written by rank 0.

Usage (config overrides as for ``genalign train``)::

    python tests/dist_worker.py --out result.safetensors [--simulate-world 2] key=value ...
    torchrun --nproc_per_node 2 tests/dist_worker.py --out result.safetensors key=value ...

``--simulate-world W`` (one process only) reproduces the global batch of a W-process run: it samples the
slice and the rollout seeds of every rank r in turn (``Trainer.rank = r`` and a ``KRepeatSampler`` for rank r
of W), concatenates them in rank order -- the order ``Accelerator.gather`` uses -- and then computes the
advantages and the optimizer step of the whole batch in this single process.

With eval prompts configured, ``Trainer.evaluate()`` runs after the step (``eval_reward``; the eval images need
not split evenly over the processes).

Written by rank 0: ``--out`` (safetensors) with the GLOBAL ``rewards``, ``group_ids``, ``advantages``,
``valid``, old ``log_probs`` and final latents (gathered in rank order), the global ``loss`` of the step,
``grad_norm``, the trainable weights before (``w0.<name>``) and after (``w1.<name>``) the step and their
gradients (``grad.<name>``, summed over ranks and clipped, as the optimizer used them); and
``<out>.json`` with world size, distributed type, backend and whether all ranks hold identical weights.

The module also defines reward functions (loaded by the trainer as ``tests/dist_worker.py:NAME``).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def brightness(images, prompts, metadata):
    """Mean pixel value (same as tests/data/toy_rewards.py:brightness)."""
    return images.mean(dim=(1, 2, 3))


def raise_on_rank1(images, prompts, metadata):
    """Brightness on rank 0; rank 1 fails (a reward server that is down on one node)."""
    if metadata and metadata[0].get("rank") == 1:
        raise RuntimeError("reward server unreachable from rank 1")
    return images.mean(dim=(1, 2, 3))


def _sample(trainer, epoch: int, simulate_world: int):
    """``Trainer.sample_epoch``, or (simulate_world > 1) the concatenation of every simulated rank's share."""
    if simulate_world <= 1:
        return trainer.sample_epoch(epoch)
    from genalign.prompts import KRepeatSampler
    from genalign.rollout import Trajectory

    if trainer.world != 1:
        raise SystemExit("--simulate-world needs a single process")
    s = trainer.cfg.sampling
    trainer.cfg.validate(simulate_world)  # the batch arithmetic of the simulated world must hold too
    saved = trainer.rank, trainer.sampler
    outs = []
    try:
        for r in range(simulate_world):
            trainer.rank = r
            trainer.sampler = KRepeatSampler(len(trainer.prompts), s.groups_per_epoch, s.group_size,
                                             trainer.cfg.seed, simulate_world, r)
            outs.append(trainer.sample_epoch(epoch))
    finally:
        trainer.rank, trainer.sampler = saved
    traj = Trajectory.cat([o[0] for o in outs])
    rewards = torch.cat([o[1] for o in outs])
    parts = {k: torch.cat([o[2][k] for o in outs]) for k in outs[0][2]}
    group_ids = outs[0][3]
    local = torch.cat([o[4] for o in outs])
    assert torch.equal(local, torch.arange(len(rewards))), local
    return traj, rewards, parts, group_ids, local


def _evaluate(trainer, simulate_world: int) -> float:
    """``Trainer.evaluate()['eval/reward']`` after the step; simulated: every rank's share in turn, then the
    image-weighted mean of the shares (what the reduction over processes computes)."""
    if simulate_world <= 1:
        return trainer.evaluate()["eval/reward"]
    n = len(trainer.eval_prompts) * trainer.cfg.eval.num_per_prompt
    saved, total = (trainer.rank, trainer.world), 0.0
    try:
        for r in range(simulate_world):
            trainer.rank, trainer.world = r, simulate_world
            share = len(range(r, n, simulate_world))
            total += trainer.evaluate()["eval/reward"] * share
    finally:
        trainer.rank, trainer.world = saved
    return total / n


def flat_for_cat(images, prompts, metadata):
    """Constant for 'a cat' (a zero-variance group), brightness otherwise."""
    scores = images.mean(dim=(1, 2, 3))
    return torch.stack([torch.zeros(()) if p == "a cat" else s for p, s in zip(prompts, scores)])


def _train(trainer, out: str) -> int:
    """The whole loop; each rank records its local sample counts per epoch and a weight checksum."""
    counts, sample = [], trainer.dynamic_sample_epoch

    def recording(epoch, plan):
        batch, stats = sample(epoch, plan)
        counts.append([int((batch.local >= 0).sum()), len(batch.traj)])  # kept rows, rows incl. padding
        return batch, stats

    trainer.dynamic_sample_epoch = recording
    metrics = trainer.train()
    weights = torch.cat([p.detach().flatten() for p in trainer.params])
    with open(f"{out}.rank{trainer.rank}.json", "w") as fh:
        json.dump({"local_counts": counts, "weights": weights.tolist(), "metrics": metrics}, fh)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="safetensors file written by rank 0")
    parser.add_argument("--config", default=None, help="YAML config (optional)")
    parser.add_argument("--simulate-world", type=int, default=1)
    parser.add_argument("--train", action="store_true", help="run Trainer.train() and write <out>.rank<r>.json")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides key=value")
    args = parser.parse_args(argv)

    from safetensors.torch import save_file

    from genalign.config import load_config
    from genalign.trainer import Trainer

    trainer = Trainer(load_config(args.config, args.overrides))
    acc = trainer.acc
    if args.train:
        return _train(trainer, args.out)
    w0 = {n: p.detach().clone() for n, p in trainer.denoiser.named_parameters() if p.requires_grad}

    traj, rewards, _, group_ids, local = _sample(trainer, 0, args.simulate_world)
    adv, valid = trainer.compute_advantages(rewards, group_ids)
    # one optimizer step over all local samples (as train_epoch does with train.num_minibatches = 1)
    ids = torch.arange(len(traj))
    steps = torch.tensor(trainer.trainable_steps()).expand(len(traj), -1)
    trainer.optimizer.zero_grad(set_to_none=True)
    stats = trainer.accumulate(trainer.objective.units_for(traj, adv[local], valid[local], steps), ids)
    grad_norm = trainer.optim.step()

    eval_reward = _evaluate(trainer, args.simulate_world) if trainer.eval_prompts else None

    device = trainer.device
    loss = acc.reduce(stats["loss"].detach().reshape(1).to(device), "sum").cpu()  # each rank's share of the loss
    log_probs = acc.gather(traj.log_probs.contiguous().to(device)).cpu()
    final = acc.gather(traj.final.contiguous().to(device)).cpu()
    w1 = {n: p.detach().clone().cpu() for n, p in trainer.denoiser.named_parameters() if p.requires_grad}
    grads = {n: p.grad.detach().clone().cpu() for n, p in trainer.denoiser.named_parameters()
             if p.requires_grad and p.grad is not None}  # summed over ranks (DDP mean x world), then clipped
    flat = torch.cat([v.flatten() for v in w1.values()]).to(device)
    all_flat = acc.gather(flat[None]).cpu()  # [world, P]
    ranks_agree = bool(all(torch.equal(all_flat[0], row) for row in all_flat))

    if acc.is_main_process:
        tensors = {"rewards": rewards, "group_ids": group_ids, "advantages": adv, "valid": valid,
                   "log_probs": log_probs, "final_latents": final, "loss": loss,
                   "grad_norm": grad_norm.detach().reshape(1).cpu()}
        if eval_reward is not None:
            tensors["eval_reward"] = torch.tensor([eval_reward])
        tensors.update({f"w0.{n}": v.cpu() for n, v in w0.items()})
        tensors.update({f"w1.{n}": v for n, v in w1.items()})
        tensors.update({f"grad.{n}": v for n, v in grads.items()})
        save_file({k: v.contiguous() for k, v in tensors.items()}, args.out)
        import torch.distributed as dist

        meta = {"world_size": acc.num_processes, "distributed_type": str(acc.distributed_type),
                "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
                "device": str(device), "ranks_agree": ranks_agree, "num_threads": torch.get_num_threads(),
                "simulate_world": args.simulate_world, "wrapper": type(trainer.optim.wrapped).__name__}
        with open(args.out + ".json", "w") as fh:
            json.dump(meta, fh)
    acc.wait_for_everyone()
    acc.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
