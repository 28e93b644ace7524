"""Evaluation shared by training runs (``eval/*`` in ``metrics.jsonl``) and ``genalign eval``.

An :class:`Evaluator` is one fixed request: ``num_per_prompt`` ODE images per evaluation prompt, prompt-major,
image i seeded ``seed + i`` (:func:`genalign.sampling.expand_jobs`). A process of ``W`` draws the images whose
global index satisfies ``i % W == rank`` with the seeds of those global indices
(:func:`genalign.sampling.shard`), scores them with the reward set, and the per-image values are combined
over processes into the full ``[N]`` vectors in index order: every process writes its values at their global
indices into zeros and the vectors are summed over processes (``x + 0 = x`` exactly, so this is an exact
gather of uneven shares). Means are then taken over the same vector, in float64, on every process.

Hence ``eval/reward`` and ``eval/<part>`` do not depend on the number of processes, and ``genalign eval``
on a run's weights, config and seed reproduces the run's evaluation (README, "Compare: grids, RLG, eval,
plots"), up to the round-off of batched kernels: the same image in a differently composed batch may differ
in the last bits (with ``batch_size`` 1, or the same batches, the numbers are identical).
"""

from __future__ import annotations

from typing import Callable, ContextManager, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .sampling import expand_jobs, iter_samples, middle_frames, shard


class EvalScores(NamedTuple):
    """What :meth:`Evaluator.score` returns.

    scores: ``{"reward": [N], <part>: [N], ...}`` float64 per-image values of ALL ``N`` images in global index
        order (identical on every process): ``reward`` is the reward set's weighted total, then its parts.
    images: this process's images ``[n_local, 3, H, W]`` (CPU, float32, in global index order; videos: their
        middle frames, :func:`genalign.sampling.middle_frames`); None when :meth:`Evaluator.score` was asked not to
        keep them.
    prompts: their prompts.
    indices: their global indices.
    """

    scores: Dict[str, torch.Tensor]
    images: Optional[torch.Tensor]
    prompts: List[str]
    indices: List[int]


class Evaluator:
    """Evaluate a policy on ``prompts`` x ``num_per_prompt`` ODE images (image i seeded ``seed + i``).

    reward_fn: a :class:`genalign.reward_api.RewardSet` (``(images, prompts, metadata) -> (total [n], parts)``);
        each image's metadata is its prompt's record metadata (``metadata``, one dict per prompt, e.g. from a
        ``.jsonl`` prompt file) plus ``{"eval": True, "seed": its seed, "index": its global index}``.
    accelerator: None (one process) or an object with ``process_index``, ``num_processes``, ``device`` and
        ``reduce(tensor, "sum")`` (an ``accelerate.Accelerator``). ``rank`` / ``world`` override its process
        index and count (attributes, settable).
    num_steps: ODE steps (None: the policy's default, see :func:`genalign.sampling.default_steps`).
    batch_size: images per sampling (and scoring) batch.
    conditioning: None or one per-prompt conditioning dict (or None) per prompt (a prompt record's
        ``"conditioning"``: negative prompt, condition images), passed to the model with each of its images.
    """

    def __init__(self, prompts: Sequence[str], num_per_prompt: int, seed: int, num_steps: Optional[int] = None,
                 batch_size: int = 32, reward_fn=None, accelerator=None, *, rank: Optional[int] = None,
                 world: Optional[int] = None, metadata: Optional[Sequence[dict]] = None,
                 conditioning: Optional[Sequence[Optional[dict]]] = None):
        if not prompts:
            raise ValueError("the evaluator needs at least one prompt")
        if num_per_prompt < 1:
            raise ValueError(f"num_per_prompt must be >= 1, got {num_per_prompt}")
        if reward_fn is None:
            raise ValueError("the evaluator needs a reward set (reward_fn)")
        self.prompts, self.num_per_prompt, self.seed = list(prompts), int(num_per_prompt), int(seed)
        self.num_steps, self.batch_size, self.reward_fn = num_steps, int(batch_size), reward_fn
        self.accelerator = accelerator
        self.rank = int(rank if rank is not None else getattr(accelerator, "process_index", 0))
        self.world = int(world if world is not None else getattr(accelerator, "num_processes", 1))
        self.job_prompts, self.seeds = expand_jobs(self.prompts, self.num_per_prompt, self.seed)
        if getattr(reward_fn, "group_level", False) and self.world > 1:
            raise ValueError("a group-level reward needs all images of a prompt in one call: evaluate on 1 process")
        if metadata is not None and len(metadata) != len(self.prompts):
            raise ValueError(f"{len(metadata)} metadata records for {len(self.prompts)} eval prompts")
        self.metadata = list(metadata) if metadata is not None else [{} for _ in self.prompts]
        if conditioning is not None and len(conditioning) != len(self.prompts):
            raise ValueError(f"{len(conditioning)} conditioning records for {len(self.prompts)} eval prompts")
        self.conditioning = list(conditioning) if conditioning is not None else None

    @property
    def num_images(self) -> int:
        return len(self.job_prompts)

    def local_indices(self) -> List[int]:
        """The global indices this process draws (``i % world == rank``)."""
        if self.num_images < self.world:
            raise ValueError(f"{len(self.prompts)} eval prompts x num_per_prompt {self.num_per_prompt} = "
                             f"{self.num_images} images cannot be shared by {self.world} processes")
        return shard(self.num_images, self.rank, self.world)

    @torch.no_grad()
    def score(self, policy, autocast: Optional[Callable[[], ContextManager]] = None,
              keep_images: bool = True) -> EvalScores:
        """Sample this process's images with ``policy`` (under ``autocast()`` when given), score them and
        combine the per-image values of all processes (see the module docstring). ``keep_images=False``
        drops each batch's images once scored (``genalign eval``: memory stays one batch)."""
        mine = self.local_indices()
        prompts, seeds = [self.job_prompts[i] for i in mine], [self.seeds[i] for i in mine]
        images, totals, parts, start = [], [], {}, 0
        grouped = getattr(self.reward_fn, "group_level", False)  # a group = one prompt's images, scored at once
        conditioning = (None if self.conditioning is None
                        else [self.conditioning[i // self.num_per_prompt] for i in mine])
        batches = iter_samples(policy, prompts, seeds, self.num_steps, self.batch_size, autocast=autocast,
                               conditioning=conditioning)
        if grouped:
            batches = [torch.cat(list(batches))]
        for batch in batches:
            idx = mine[start:start + len(batch)]
            meta = [{**self.metadata[i // self.num_per_prompt], "eval": True, "seed": self.seeds[i], "index": i,
                     "group": i // self.num_per_prompt} for i in idx]
            total, batch_parts = self.reward_fn(batch, prompts[start:start + len(batch)], meta)
            totals.append(total.detach().double().cpu().reshape(-1))
            for k, v in batch_parts.items():
                parts.setdefault(k, []).append(v.detach().double().cpu().reshape(-1))
            if keep_images:  # a video model's videos (scored whole above) are kept as their middle frames
                images.append(middle_frames(batch))
            start += len(batch)
        names = ["reward"] + list(parts)
        local = torch.stack([torch.cat(totals)] + [torch.cat(parts[k]) for k in parts])  # [K, n_local]
        values = torch.zeros(len(names), self.num_images, dtype=torch.float64)
        values[:, torch.tensor(mine)] = local
        values = self._sum_over_processes(values)
        return EvalScores(dict(zip(names, values.unbind(0))), torch.cat(images) if keep_images else None, prompts,
                          mine)

    def run(self, policy, autocast: Optional[Callable[[], ContextManager]] = None
            ) -> Tuple[Dict[str, float], torch.Tensor, List[str]]:
        """``(metrics, local images, local prompts)``; metrics ``{"eval/reward": mean, "eval/<part>": mean}``
        over all images, identical on every process and for any number of processes."""
        result = self.score(policy, autocast)
        return self.metrics(result.scores), result.images, result.prompts

    @staticmethod
    def metrics(scores: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """``eval/<name>`` = the float64 mean of each per-image vector of :meth:`score`."""
        return {f"eval/{k}": float(v.sum() / v.numel()) for k, v in scores.items()}

    def _sum_over_processes(self, values: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return values
        if self.accelerator is None:
            raise ValueError(f"world {self.world} needs an accelerator to combine the processes' scores")
        device = getattr(self.accelerator, "device", "cpu")
        return self.accelerator.reduce(values.to(device), "sum").cpu()


__all__ = ["EvalScores", "Evaluator"]
