"""The objective protocol's data types and registry (see :mod:`genalign.objectives`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from ..registry import Registry

OBJECTIVES = Registry("objective")


def register_objective(name: str):
    """Decorator registering an objective class ``cls(trainer)`` under ``name``."""
    return OBJECTIVES.register(name)


class ObjectiveBase:
    """Defaults of the optional parts of the objective protocol (see :mod:`genalign.objectives`)."""

    def sampling_context(self):
        """Context the epoch's samples are drawn in (DiffusionNFT: the old policy's weights swapped in)."""
        return contextlib.nullcontext()

    def after_step(self) -> None:
        """Called after every optimizer step."""

    def after_epoch(self, global_step: int) -> None:
        """Called after the epoch's optimizer steps (``global_step``: optimizer steps so far)."""

    def epoch_stats(self) -> Dict[str, float]:
        """Statistics logged once per epoch."""
        return {}

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Tensors the objective needs to resume exactly (saved with every checkpoint)."""
        return {}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict`."""


def require_flow_model(policy, method: str, what: str = "") -> None:
    """Objectives on the flow-matching loss (``x_t = (1 - s) x0 + s eps``, target ``eps - x0``) need a
    flow-matching model; a DDPM-family adapter (epsilon / v prediction on another noising path) is refused.
    ``what`` names the culprit when it is not the method itself (e.g. ``data.anchor_file``)."""
    if getattr(policy, "kind", "flow") != "flow":
        from ..errors import ConfigError

        fix = f"remove {what}" if what else "use a policy-gradient method such as flow_grpo with sampling.step_kind: ddim"
        raise ConfigError(f"{what or f'method {method}'} trains on the flow-matching loss, which needs a flow-matching "
                          f"model; {type(policy).__name__} is a {policy.kind!r}-family model ({fix})")


@dataclass
class TrainContext:
    """What an objective uses to compute losses: the config, the policy, accelerate, the optimizer step, and the
    forward contexts. The trainer builds one; a benchmark or another loop can build its own."""

    cfg: object
    policy: object
    acc: object
    optim: Optional[object] = None
    reward_fn: Optional[object] = None
    frozen_reference: Optional[torch.nn.Module] = None

    @property
    def device(self) -> torch.device:
        return torch.device(self.cfg.model.device) if self.cfg.model.device else self.acc.device

    @property
    def rank(self) -> int:
        return self.acc.process_index

    @property
    def world(self) -> int:
        return self.acc.num_processes

    def autocast(self):
        return self.acc.autocast() if self.cfg.mixed_precision != "no" else contextlib.nullcontext()

    def reference(self):
        """Context in which the denoiser computes the reference policy (adapters disabled or the frozen copy)."""
        from ..lora import adapters_disabled, forward_of

        denoiser = self.policy.denoiser()
        if self.frozen_reference is not None:
            return forward_of(denoiser, self.frozen_reference)
        return adapters_disabled(denoiser)

    def trainable_steps(self) -> List[int]:
        """The stochastic steps trained (:func:`genalign.methods.trainable_tensor`: ConfigError when none)."""
        from ..methods import trainable_tensor

        return trainable_tensor(self.cfg).tolist()


@dataclass
class EpochBatch:
    """One epoch's samples. ``traj``: this process's trajectories (rows follow ``local``); ``rewards`` ``[N]``,
    ``parts`` and ``group_ids`` ``[N]`` are GLOBAL (gathered); ``local`` ``[n]`` the global position of each local
    row (-1: a padding row that trains nothing); ``plan`` the epoch's global :class:`genalign.methods.EpochPlan`."""

    traj: object
    rewards: torch.Tensor
    parts: Dict[str, torch.Tensor]
    group_ids: torch.Tensor
    local: torch.Tensor
    plan: Optional[object] = None


__all__ = ["OBJECTIVES", "EpochBatch", "ObjectiveBase", "TrainContext", "register_objective", "require_flow_model"]
