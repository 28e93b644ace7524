"""The one optimizer step: accelerate's ``prepare`` / ``backward`` / ``no_sync`` / ``clip_grad_norm_`` for any
trainable module, shared by every objective (policy gradient, DRAGON), the Adv-GRPO discriminator and the
token-level LLM step.

Global-sum semantics. Objectives normalise their loss by GLOBAL counts (tokens, pairs, sequences summed over
processes), so the gradient of the global loss is the SUM of the processes' gradients. DDP, FSDP and DeepSpeed
average gradients over processes, so :meth:`OptimizerStep.backward` multiplies the loss by the number of
processes: N processes then compute exactly what one process computes on the same global batch.

Accumulation. An optimizer step is a sequence of backward calls; all but the last run under
``accelerator.no_sync`` and the last one synchronises (DDP's all-reduce happens there), so every process must
make exactly one synchronising backward per optimizer step (processes may make different numbers of
non-synchronising ones).

Forward routing. Adapters call their denoiser directly (``policy.denoiser()(...)``); after ``prepare`` wraps it
(DDP / FSDP / DeepSpeed), :func:`route_forward` makes those direct calls go through the wrapper while gradients
are recorded (and always for sharded wrappers, whose parameters only exist inside the wrapper's forward).
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Callable, Dict, Iterable, List, Optional

import torch

from .choices import LR_SCHEDULES
from .errors import ConfigError


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN/inf; the optimizer step was skipped, so the weights are unchanged."""


_SHARDED = ("FSDP", "DEEPSPEED", "MEGATRON_LM")


def route_forward(module: torch.nn.Module, wrapper: torch.nn.Module, always: bool = False) -> None:
    """Make ``module(...)`` run ``wrapper(...)`` (which itself calls ``module``'s own forward) when gradients are
    enabled, or always when ``always`` (sharded wrappers). Re-entrant calls from inside the wrapper reach the
    module's original forward."""
    if wrapper is module:
        return
    original = type(module).forward
    state = threading.local()

    def routed(*args, **kwargs):
        if getattr(state, "inside", False) or not (always or torch.is_grad_enabled()):
            return original(module, *args, **kwargs)
        state.inside = True
        try:
            return wrapper(*args, **kwargs)
        finally:
            state.inside = False

    module.forward = routed


class OptimizerStep:
    """Backward, gradient synchronisation, clipping, the non-finite check, the optimizer update and the EMA.

    ``model``: the trainable module (prepared with accelerate when ``distributed``: DDP / FSDP / DeepSpeed
    come from the accelerate config); ``params``: its trainable parameters (for clipping, EMA and checks);
    ``optimizer``: built on ``params``. ``distributed=False`` keeps the module local (a module every process
    trains identically, e.g. the Adv-GRPO discriminator on shared samples): no wrapping, no scaling.
    """

    def __init__(self, accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 params: Optional[List[torch.nn.Parameter]] = None, max_grad_norm: float = 1.0, ema=None,
                 distributed: bool = True, describe_failure: Optional[Callable[[], str]] = None):
        self.acc = accelerator
        self.module = model
        self.params = list(params if params is not None else [p for p in model.parameters() if p.requires_grad])
        self.max_grad_norm = max_grad_norm
        self.ema = ema
        self.distributed = distributed
        self.describe_failure = describe_failure
        self.num_steps = 0
        self.kind = str(accelerator.distributed_type).split(".")[-1] if distributed else "LOCAL"
        if distributed:
            self.wrapped, self.optimizer = accelerator.prepare(model, optimizer)
            route_forward(model, self.wrapped, always=self.kind in _SHARDED)
        else:
            self.wrapped, self.optimizer = model, optimizer
        self.scale = float(accelerator.num_processes) if distributed else 1.0  # accelerator may be None when local

    def no_sync(self, sync: bool):
        """Context for one backward: ``no_sync`` unless this backward synchronises the step's gradients."""
        if sync or not self.distributed or self.acc.num_processes == 1:  # noqa: SIM114
            return contextlib.nullcontext()
        return self.acc.no_sync(self.wrapped)

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        """Backward of a loss normalised by global counts (scaled to undo the wrappers' gradient averaging)."""
        if not self.distributed:
            loss.backward()
            return
        deepspeed = self.kind == "DEEPSPEED"
        if deepspeed:  # the engine steps inside backward when gradients sync: only on the step's last backward
            self.acc.gradient_state._set_sync_gradients(sync)
        try:
            with self.no_sync(sync):
                self.acc.backward(loss * self.scale if self.scale != 1.0 else loss)
        finally:
            if deepspeed:
                self.acc.gradient_state._set_sync_gradients(True)

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every parameter group (the schedule's value for this epoch)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, where: str = "") -> torch.Tensor:
        """Clip, check and apply the accumulated gradients -> the gradient norm (before clipping); the clipped
        gradients stay in ``.grad`` until the next :meth:`run` clears them.

        A NaN/inf gradient raises :class:`NonFiniteError` (naming ``where`` and ``describe_failure()``) before
        any weight changes; the gradients are cleared. One host sync per optimizer step, identical on every
        process (the gradients are synchronised).
        """
        if self.max_grad_norm > 0:
            norm = self.acc.clip_grad_norm_(self.params, self.max_grad_norm) if self.distributed else \
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        else:
            grads = [p.grad.norm() for p in self.params if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.zeros(())
        if norm is None:  # DeepSpeed clips (and steps) inside its engine: read the norm it computed
            norm = self.wrapped.get_global_grad_norm() if hasattr(self.wrapped, "get_global_grad_norm") else 0.0
            norm = float("nan") if norm is None else norm
        norm = torch.as_tensor(norm).float()
        if not torch.isfinite(norm):
            self.zero_grad()
            detail = self.describe_failure() if self.describe_failure else ""
            raise NonFiniteError(f"non-finite loss or gradient (grad norm {float(norm)}){where}{detail}")
        self.optimizer.step()
        self.num_steps += 1
        if self.ema is not None:
            self.ema.step(self.num_steps)
        return norm

    def run(self, backwards: Iterable[Callable[[bool], Dict[str, torch.Tensor]]], where: str = ""):
        """One optimizer step over ``backwards``: callables ``fn(sync) -> stats`` that compute a loss and call
        :meth:`backward` with ``sync``; the last one synchronises. Returns (summed stats, grad norm)."""
        self.zero_grad()
        sums = self.accumulate(backwards)
        return sums, self.step(where)

    @staticmethod
    def accumulate(backwards: Iterable[Callable[[bool], Dict[str, torch.Tensor]]]) -> Dict[str, torch.Tensor]:
        """Run ``backwards`` (the last one synchronises) without stepping -> their summed statistics."""
        fns = list(backwards)
        sums: Dict[str, torch.Tensor] = {}
        for i, fn in enumerate(fns):
            for k, v in fn(i == len(fns) - 1).items():
                sums[k] = sums[k] + v if k in sums else v
        return sums


OPTIMIZERS = ("adamw", "adamw8bit")


def lr_factor(schedule: str, epoch: int, num_epochs: int, warmup_epochs: int = 0, min_ratio: float = 0.0) -> float:
    """The learning rate of 0-based ``epoch`` as a fraction of the peak (``train.lr_schedule``): a linear warm-up
    over ``warmup_epochs`` ((epoch + 1) / warmup_epochs), then 'constant' 1, or 'cosine' / 'linear' from 1 at the
    first epoch after the warm-up towards ``min_ratio`` at ``num_epochs`` (Loshchilov & Hutter, arXiv 1608.03983)."""
    if epoch < warmup_epochs:
        return (epoch + 1) / warmup_epochs
    if schedule == "constant":
        return 1.0
    progress = min((epoch - warmup_epochs) / max(num_epochs - warmup_epochs, 1), 1.0)
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        shape = 1.0 - progress
    else:
        raise ConfigError(f"train.lr_schedule must be one of {list(LR_SCHEDULES)}, got {schedule!r}")
    return min_ratio + (1.0 - min_ratio) * shape


def build_optimizer(params: Iterable[torch.nn.Parameter], train_cfg, device=None) -> torch.optim.Optimizer:
    """The optimizer ``train.optimizer`` names, on ``params`` with ``train.lr``, ``betas``, ``weight_decay`` and
    ``adam_eps``: ``adamw`` = ``torch.optim.AdamW`` (decoupled weight decay, Loshchilov & Hutter, arXiv
    1711.05101; ``fused=True`` on CUDA), ``adamw8bit`` = ``bitsandbytes.optim.AdamW8bit`` (block-wise 8-bit
    optimizer state, Dettmers et al., arXiv 2110.02861; needs the optional extra ``genalign[bnb]`` and, for
    bitsandbytes' kernels, usually CUDA). Raises :class:`genalign.config.ConfigError` for another name or when
    bitsandbytes is missing."""
    params = list(params)
    name = getattr(train_cfg, "optimizer", "adamw")
    kwargs = dict(lr=train_cfg.lr, betas=tuple(train_cfg.betas), weight_decay=train_cfg.weight_decay,
                  eps=train_cfg.adam_eps)
    if name == "adamw":
        fused = {"fused": True} if device is not None and torch.device(device).type == "cuda" else {}
        return torch.optim.AdamW(params, **kwargs, **fused)
    if name == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError as exc:
            raise ConfigError("train.optimizer=adamw8bit needs bitsandbytes: pip install 'genalign[bnb]' "
                              f"(or pip install bitsandbytes), or use train.optimizer=adamw ({exc})") from None
        return bitsandbytes.optim.AdamW8bit(params, **kwargs)
    raise ConfigError(f"train.optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")


def save_state_hooks(accelerator) -> None:
    """Keep prepared models out of ``accelerator.save_state`` / ``load_state``: the trainer saves the trainable
    weights itself (LoRA adapters or the trainable parameters), so a checkpoint never holds a second copy of a
    frozen base model; optimizer, scheduler, RNG and registered objects are still handled by accelerate."""
    def on_save(models, weights, output_dir):  # `models` is the accelerator's own list: leave it alone
        weights.clear()

    def on_load(models, input_dir):
        models.clear()

    accelerator.register_save_state_pre_hook(on_save)
    accelerator.register_load_state_pre_hook(on_load)


__all__ = ["NonFiniteError", "OptimizerStep", "build_optimizer", "lr_factor", "route_forward", "save_state_hooks"]
