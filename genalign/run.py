"""A run directory: ``config.json``, ``metrics.jsonl`` (one JSON row per epoch), trackers, and the
before/after grid of the evaluation images."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import torch
from tqdm.auto import tqdm

from .config import to_dict

SHOWN = ("epoch", "reward/mean", "eval/reward", "ratio_mean", "clip_frac", "kl", "grad_norm")


class RunDir:
    """Files of one run under ``cfg.output_dir`` (written by the main process only)."""

    def __init__(self, cfg, accelerator, trackers: List[str]):
        self.cfg, self.acc = cfg, accelerator
        self.root = cfg.output_dir
        self.metrics_path = os.path.join(self.root, "metrics.jsonl")
        self.is_main = accelerator.is_main_process
        self.trackers = trackers

    def start(self, resumed_epoch: Optional[int]) -> None:
        """New run: empty metrics; resumed run: drop metric rows after the checkpoint's epoch. Writes config.json."""
        if self.is_main:
            os.makedirs(self.root, exist_ok=True)
            if resumed_epoch is None:
                if os.path.exists(self.metrics_path):
                    os.remove(self.metrics_path)
            else:
                truncate_metrics(self.metrics_path, resumed_epoch)
            with open(os.path.join(self.root, "config.json"), "w") as fh:
                json.dump(to_dict(self.cfg), fh, indent=1)
        if self.trackers:
            self.acc.init_trackers("genalign", config=flat(to_dict(self.cfg)))

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

    def before_after_grid(self, after: Optional[torch.Tensor], num_per_prompt: int) -> None:
        """``before_after.png``: the first 8 eval prompts x at most 8 images, before and after (same noise)."""
        from safetensors.torch import load_file

        from .plots import save_image_grid

        before_path = os.path.join(self.root, "before_images.safetensors")
        if after is None or not os.path.isfile(before_path):
            return
        before = load_file(before_path)["images"]
        if len(before) != len(after):
            return
        per, cols = num_per_prompt, min(8, num_per_prompt)
        keep = torch.tensor([p * per + c for p in range(min(8, len(after) // per)) for c in range(cols)])
        save_image_grid([before[keep], after[keep]], os.path.join(self.root, "before_after.png"),
                        columns=cols, titles=["before", "after"])


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


__all__ = ["RunDir", "config_diff", "flat", "tracker_available", "truncate_metrics"]
