"""Atomic checkpoint directories: write to a temporary directory, rename, then update ``latest``.

Layout under ``<run>/checkpoints/``: ``checkpoint-<step>/`` (accelerate state, LoRA, trainer state,
``COMPLETE`` marker written last) and ``latest`` (a text file naming the newest complete checkpoint).
A checkpoint without its marker is partial (the process died while writing) and is skipped with a
warning, so resuming falls back to the previous one.

Checkpoints belong to one run: ``trainer_state.json`` records the run id (``<run>/run.json``), and resuming
refuses a checkpoint whose run id differs from the one of the output directory (README, "Run directories,
checkpoints and EMA"). When to save: every ``checkpoint.every`` epochs, after ``checkpoint.every_minutes``
since the last save (decided by the main process and broadcast, so every process takes part in the
collective save), and at the end.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
import warnings
from typing import Callable, List, Optional

MARKER = "COMPLETE"


class CheckpointError(RuntimeError):
    """No usable checkpoint, or a checkpoint that is corrupt."""


def _step_of(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


def list_checkpoints(root: str) -> List[str]:
    """Complete checkpoints under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if n.startswith("checkpoint-") and n.rsplit("-", 1)[1].isdigit()]
    good = []
    for n in sorted(names, key=_step_of):
        path = os.path.join(root, n)
        if os.path.isfile(os.path.join(path, MARKER)):
            good.append(path)
        else:
            warnings.warn(f"skipping partial checkpoint {path} (no {MARKER} marker)")
    return good


def latest_checkpoint(root: str) -> Optional[str]:
    """The newest complete checkpoint (the ``latest`` pointer if it is valid, else a scan)."""
    pointer = os.path.join(root, "latest")
    if os.path.isfile(pointer):
        with open(pointer) as fh:
            path = os.path.join(root, fh.read().strip())
        if os.path.isfile(os.path.join(path, MARKER)):
            return path
        warnings.warn(f"'latest' points to {path}, which is incomplete; using the newest complete checkpoint")
    found = list_checkpoints(root)
    return found[-1] if found else None


def begin_checkpoint(root: str, step: int) -> str:
    """Create (empty) the temporary directory of checkpoint ``step``, removing ones left by killed writes."""
    os.makedirs(root, exist_ok=True)
    for stale in glob.glob(os.path.join(root, ".tmp-checkpoint-*")):  # left by a write that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = os.path.join(root, f".tmp-checkpoint-{step}")
    os.makedirs(tmp)
    return tmp


def publish_checkpoint(root: str, step: int, tmp: str, keep_last: int = 2) -> str:
    """Mark ``tmp`` complete, atomically rename it to ``checkpoint-<step>``, point ``latest`` at it, prune."""
    final = os.path.join(root, f"checkpoint-{step}")
    with open(os.path.join(tmp, MARKER), "w") as fh:
        json.dump({"step": step}, fh)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    ptr_tmp = os.path.join(root, ".latest.tmp")
    with open(ptr_tmp, "w") as fh:
        fh.write(os.path.basename(final))
    os.replace(ptr_tmp, os.path.join(root, "latest"))
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(root: str, step: int, write: Callable[[str], None], keep_last: int = 2) -> str:
    """Call ``write(tmp_dir)`` then atomically publish it as ``checkpoint-<step>``; prune old ones."""
    tmp = begin_checkpoint(root, step)
    write(tmp)
    return publish_checkpoint(root, step, tmp, keep_last)


def resolve_resume(output_dir: str, resume: str) -> str:
    """``resume`` = 'latest' (the run's newest checkpoint) or a checkpoint path."""
    if resume == "latest":
        path = latest_checkpoint(os.path.join(output_dir, "checkpoints"))
        if path is None:
            raise CheckpointError(f"--resume latest: no complete checkpoint under {output_dir}/checkpoints")
        return path
    if not os.path.isfile(os.path.join(resume, MARKER)):
        raise CheckpointError(f"{resume!r} is not a complete checkpoint directory (missing {MARKER})")
    return resume


class Checkpointer:
    """Saves and restores every stateful part of a :class:`genalign.trainer.Trainer`: the trainable weights
    (LoRA adapters, or the trainable parameters), the EMA, the trainer counters and config, and through
    ``accelerator.save_state`` the optimizer, RNG states and registered objects (the Adv-GRPO discriminator).
    Prepared models are kept out of accelerate's state (:func:`genalign.optim.save_state_hooks`)."""

    def __init__(self, trainer):
        self.tr = trainer
        self.root = os.path.join(trainer.cfg.output_dir, "checkpoints")
        self.last_save = time.monotonic()

    def start_clock(self) -> None:
        """Start counting ``checkpoint.every_minutes`` (the start of training)."""
        self.last_save = time.monotonic()

    def due(self, epoch: int, last: bool) -> bool:
        """Whether to save after ``epoch`` (1-based, completed): at the end, every ``checkpoint.every`` epochs, or
        when ``checkpoint.every_minutes`` passed since the last save. The time is the main process's and is
        broadcast, so every process reaches the same decision (:meth:`save` is collective)."""
        c = self.tr.cfg.checkpoint
        if last or (c.every and epoch % c.every == 0):
            return True
        if not c.every_minutes:
            return False
        late = time.monotonic() - self.last_save >= c.every_minutes * 60
        if self.tr.acc.num_processes > 1:
            import torch
            from accelerate.utils import broadcast

            flag = broadcast(torch.tensor([int(late)], device=self.tr.acc.device), from_process=0)
            late = bool(flag.item())
        return late

    def latest(self) -> Optional[str]:
        return latest_checkpoint(self.root)

    def save(self) -> Optional[str]:
        """Atomic checkpoint. Every process takes part: accelerate writes each process's RNG state (and sharded
        optimizer state under FSDP / DeepSpeed) and gathering sharded weights is collective; the main process
        writes the rest and publishes the directory. Returns its path on the main process."""
        from safetensors.torch import save_file

        tr = self.tr
        step = tr.global_step
        tmp = os.path.join(self.root, f".tmp-checkpoint-{step}")
        tr.acc.wait_for_everyone()
        if tr.is_main:
            begin_checkpoint(self.root, step)
        tr.acc.wait_for_everyone()
        tr.acc.save_state(os.path.join(tmp, "accelerate"))
        tr.save_weights(tmp)  # collective gather when sharded; written by the main process
        path = None
        if tr.is_main:
            if tr.ema is not None:
                shadow = tr.ema.state_dict()["shadow"]
                save_file({str(i): s.contiguous() for i, s in enumerate(shadow)}, os.path.join(tmp, "ema.safetensors"))
            extra = tr.objective.state_dict()
            if extra:
                save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()},
                          os.path.join(tmp, "objective.safetensors"))
            with open(os.path.join(tmp, "trainer_state.json"), "w") as fh:
                json.dump({**tr.counters(), "ema_updates": tr.ema.num_updates if tr.ema else 0,
                           "run_id": tr.run_id}, fh)
            path = publish_checkpoint(self.root, step, tmp, tr.cfg.checkpoint.keep_last)
        tr.acc.wait_for_everyone()
        self.last_save = time.monotonic()
        return path

    @staticmethod
    def run_id_of(path: str) -> Optional[str]:
        """The run id recorded in checkpoint ``path`` (None for checkpoints written before run ids existed)."""
        with open(os.path.join(path, "trainer_state.json")) as fh:
            return json.load(fh).get("run_id")

    def load(self, path: str) -> int:
        """Restore ``path`` into the trainer; returns the epoch it resumes from."""
        from safetensors.torch import load_file

        from .config import ConfigError, to_dict
        from .run import config_diff

        from .run import read_run_id

        tr = self.tr
        with open(os.path.join(path, "trainer_state.json")) as fh:
            state = json.load(fh)
        mine, theirs = read_run_id(tr.cfg.output_dir), state.get("run_id")
        if mine and theirs and mine != theirs:
            raise CheckpointError(f"cannot resume from {path}: it belongs to run {theirs}, but output_dir "
                                  f"{tr.cfg.output_dir!r} holds run {mine}; resume into a new output_dir")
        tr.run_id = theirs or mine or tr.run_id
        diff = config_diff(state["config"], to_dict(tr.cfg))
        if diff:
            raise ConfigError(f"cannot resume from {path}: the config differs in {diff} "
                              f"(only num_epochs, eval.* and checkpoint.* may change)")
        tr.load_weights(path)
        tr.acc.load_state(os.path.join(path, "accelerate"))
        if tr.ema is not None:
            shadow = load_file(os.path.join(path, "ema.safetensors"))
            tr.ema.load_state_dict({"shadow": [shadow[str(i)] for i in range(len(shadow))],
                                    "num_updates": state.get("ema_updates", 0)})
        tr.epoch, tr.global_step, tr.samples_seen = state["epoch"], state["global_step"], state["samples_seen"]
        tr.model_calls = state.get("model_calls", 0)
        tr.monitor.load_state_dict(state.get("hacking"))
        if os.path.isfile(os.path.join(path, "objective.safetensors")):
            tr.objective.load_state_dict(load_file(os.path.join(path, "objective.safetensors")))
        tr.optim.num_steps = tr.global_step
        return tr.epoch

    def resume_hint(self) -> str:
        """Where a failed run can continue from: the newest complete checkpoint, or that none exists."""
        path = self.latest()
        if path is None:
            c = self.tr.cfg.checkpoint
            return ("no checkpoint exists yet, so the run restarts from scratch with --overwrite (checkpoint.every "
                    f"= {c.every} epochs, checkpoint.every_minutes = {c.every_minutes}; lower them to save more often)")
        return f"resume from {path} with --resume latest"
