"""A run directory: ``config.json``, ``run.json`` (the run id), ``metrics.jsonl`` (one JSON row per epoch),
``checkpoints/``, ``final/``, trackers, and the before/after grid of the evaluation images.

One directory holds one run (README, "Run directories, checkpoints and EMA"): a directory already used by a
run (it has ``metrics.jsonl``, ``checkpoints/`` or ``final/``) is continued with ``--resume latest`` or
cleared with ``--overwrite``, never silently mixed with a new run. Every checkpoint records the run id it
belongs to, and ``--resume latest`` refuses a checkpoint of another run.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Dict, List, Optional

from .errors import ConfigError

import torch
from tqdm.auto import tqdm

from .config import to_dict

# what marks a directory as used by a run, and what --overwrite removes (nothing else in the directory is touched)
USED = ("metrics.jsonl", "checkpoints", "final")
RUN_FILES = USED + ("run.json", "config.json", "before_images.safetensors", "before_after.png", "reward_curve.png",
                    "step_ratios.png", "failed_rewards")
# accelerate tracker name -> the package that provides it (pip install NAME, or genalign[NAME] for the extras)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "mlflow": "mlflow",
                    "aim": "aim", "clearml": "clearml", "dvclive": "dvclive"}
EXTRAS = ("tensorboard", "wandb")


class RunDirError(ConfigError):
    """The output directory holds another run (use ``--resume latest`` or ``--overwrite``)."""


def used_entries(root: str) -> List[str]:
    """The entries of ``root`` that show a run already used it (``metrics.jsonl``, ``checkpoints/``, ``final/``)."""
    return [name for name in USED if os.path.exists(os.path.join(root, name))]


def check_output_dir(root: str, resume: Optional[str], overwrite: bool) -> None:
    """Refuse a used ``root`` unless the run resumes it or overwrites it."""
    if resume is not None and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: resume continues the run in the output "
                          "directory, overwrite deletes it")
    found = used_entries(root)
    if found and resume is None and not overwrite:
        raise RunDirError(f"output_dir {root!r} already holds a run ({', '.join(found)}); continue it with "
                          f"--resume latest, start again there with --overwrite (deletes its metrics, checkpoints "
                          f"and final weights), or choose another output_dir")


def clear_run(root: str) -> None:
    """``--overwrite``: remove the previous run's files (:data:`RUN_FILES`) from ``root``; other files stay."""
    for name in RUN_FILES:
        path = os.path.join(root, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def read_run_id(root: str) -> Optional[str]:
    path = os.path.join(root, "run.json")
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh).get("run_id")


def check_trackers(names: List[str]) -> List[str]:
    """``log_with``: every requested tracker must be installed (a ConfigError names the package to install)."""
    for name in names:
        if name not in TRACKER_PACKAGES:
            raise ConfigError(f"log_with: unknown tracker {name!r}; choose from {sorted(TRACKER_PACKAGES)}")
        if not tracker_available(name):
            pkg = TRACKER_PACKAGES[name]
            extra = f" (or pip install 'genalign[{name}]')" if name in EXTRAS else ""
            raise ConfigError(f"log_with: tracker {name!r} is requested but not installed: pip install {pkg}{extra}, "
                              f"or remove it from log_with")
    return list(names)


SHOWN = ("epoch", "reward/mean", "eval/reward", "eval/fd_independent", "eval/diversity_ratio", "hacking/flag", "ratio_mean",
         "clip_frac", "kl", "grad_norm")


class RunDir:
    """Files of one run under ``cfg.output_dir`` (written by the main process only)."""

    def __init__(self, cfg, accelerator, trackers: List[str], run_id: Optional[str] = None):
        self.cfg, self.acc = cfg, accelerator
        self.root = cfg.output_dir
        self.metrics_path = os.path.join(self.root, "metrics.jsonl")
        self.is_main = accelerator.is_main_process
        self.trackers = trackers
        self.run_id = run_id

    def start(self, resumed_epoch: Optional[int]) -> None:
        """New run: empty metrics; resumed run: drop metric rows after the checkpoint's epoch. Writes
        config.json and run.json (the run id)."""
        if self.is_main:
            os.makedirs(self.root, exist_ok=True)
            if resumed_epoch is None:
                if os.path.exists(self.metrics_path):
                    os.remove(self.metrics_path)
            else:
                truncate_metrics(self.metrics_path, resumed_epoch)
            with open(os.path.join(self.root, "config.json"), "w") as fh:
                json.dump(to_dict(self.cfg), fh, indent=1)
            with open(os.path.join(self.root, "run.json"), "w") as fh:
                json.dump({"run_id": self.run_id}, fh)
        if getattr(self.acc, "log_with", None):
            self.acc.init_trackers("genalign", config=flat(to_dict(self.cfg)))

    def log_images(self, name: str, images: torch.Tensor, step: int) -> None:
        """``images`` [N, 3, H, W] in [0, 1] to every tracker that accepts images (accelerate's ``log_images``:
        tensorboard takes an NCHW array, wandb and others a list of HWC uint8 arrays). Main process only."""
        if not self.is_main or images is None or not len(images):
            return
        for tracker in getattr(self.acc, "trackers", []):
            if not callable(getattr(tracker, "log_images", None)):
                continue
            x = images.detach().float().clamp(0, 1).cpu()
            if tracker.name == "tensorboard":
                tracker.log_images({name: x.numpy()}, step=step)
            else:
                hwc = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
                tracker.log_images({name: list(hwc)}, step=step)

    def log(self, row: Dict[str, float]) -> None:
        if self.is_main:
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            shown = {k: round(v, 4) for k, v in row.items() if k in SHOWN or "accuracy" in k}
            tqdm.write(f"[genalign] {shown}")
        self.acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row.get("global_step", 0))

    def last_metrics(self) -> Dict[str, float]:
        merged: Dict[str, float] = {}
        if os.path.isfile(self.metrics_path):
            with open(self.metrics_path) as fh:
                for line in fh:
                    merged.update(json.loads(line))
        return merged

    def save_before_images(self, images: torch.Tensor) -> None:
        if self.is_main:
            from safetensors.torch import save_file

            save_file({"images": images.contiguous()}, os.path.join(self.root, "before_images.safetensors"))

    def before_after_grid(self, after: Optional[torch.Tensor], num_per_prompt: int,
                          step: int = 0) -> Optional[torch.Tensor]:
        """``before_after.png`` from the shown eval images (:func:`shown_indices`), before and after (same
        noise); also sent to the image trackers. Main process only."""
        from safetensors.torch import load_file

        from .plots import save_image_grid

        before_path = os.path.join(self.root, "before_images.safetensors")
        if not self.is_main or after is None or not os.path.isfile(before_path):
            return None
        before = load_file(before_path)["images"]
        if before.shape != after.shape:
            return None
        cols = min(8, num_per_prompt)
        path = os.path.join(self.root, "before_after.png")
        save_image_grid([before, after], path, columns=cols, titles=["before", "after"])
        from PIL import Image
        import numpy as np

        png = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
        self.log_images("before_after", png[None], step)
        return png


def shown_indices(num_images: int, num_per_prompt: int) -> List[int]:
    """Global indices of the eval images shown in grids and trackers: the first 8 prompts x at most 8 images."""
    per, cols = num_per_prompt, min(8, num_per_prompt)
    return [p * per + c for p in range(min(8, num_images // per)) for c in range(cols)]


def tracker_available(name: str) -> bool:
    import importlib.util

    module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(name, name)
    return importlib.util.find_spec(module) is not None


def flat(d: Dict, prefix: str = "") -> Dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def config_diff(old: Dict, new: Dict) -> List[str]:
    """Keys whose values differ, except those a resumed run may change."""
    free = ("num_epochs", "eval.", "checkpoint.", "output_dir", "log_with")
    a, b = flat(old), flat(new)
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not k.startswith(free)]


def truncate_metrics(path: str, epoch: int) -> None:
    """Drop metric rows written after the checkpoint we resume from (they will be recomputed)."""
    if not os.path.isfile(path):
        return
    with open(path) as fh:
        rows = [line for line in fh if line.strip() and json.loads(line).get("epoch", 0) <= epoch]
    with open(path, "w") as fh:
        fh.writelines(rows)


__all__ = ["RunDir", "RunDirError", "check_output_dir", "check_trackers", "clear_run", "config_diff", "flat",
           "read_run_id", "shown_indices", "tracker_available", "truncate_metrics", "used_entries"]
