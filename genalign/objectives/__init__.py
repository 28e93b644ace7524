"""Training objectives of the one trainer, chosen by name (``cfg.method_spec().objective``).

An objective turns one epoch of on-policy samples into optimizer steps, through three calls the trainer makes:

- ``prepare(epoch, batch) -> units``: advantages, labels or pairs for this process's samples (from the GLOBAL
  rewards in ``batch``, identical on every process);
- ``minibatches(units, epoch, inner) -> [rows, ...]``: this process's unit rows of each optimizer step
  (``train.num_minibatches`` per inner epoch);
- ``backwards(units, rows) -> [fn(sync) -> stats, ...]``: one callable per backward pass of that optimizer step;
  each computes its loss (normalised by GLOBAL counts) and calls ``trainer.optim.backward(loss, sync)``. The
  list is never empty (a process without rows contributes a zero-weighted pass, so collectives stay matched).

``describe_failure()`` names what went non-finite (see :class:`genalign.optim.OptimizerStep`). A new objective is
one module defining such a class (constructed with a :class:`TrainContext`) plus one
:func:`register_objective` line.
"""

from __future__ import annotations

from .awm import AWM
from .base import OBJECTIVES, EpochBatch, TrainContext, register_objective
from .dgpo import DGPO
from .dragon import Dragon
from .nft import DiffusionNFT
from .policy_gradient import PolicyGradient
from .sft import SFT


def build_objective(name: str, ctx: TrainContext):
    """Instantiate the objective registered as ``name`` on a :class:`TrainContext`."""
    return OBJECTIVES.get(name)(ctx)


__all__ = ["AWM", "DGPO", "OBJECTIVES", "SFT", "DiffusionNFT", "Dragon", "EpochBatch", "PolicyGradient", "TrainContext",
           "build_objective", "register_objective"]
