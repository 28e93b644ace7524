"""Image data sets for the data-driven methods (docs/algorithms.md §13.4): demonstrations for ``method: sft`` and
preference pairs for offline ``method: diffusion_dpo``, read from ``data.train_file``.

A data set is a jsonl file, one record per line: ``{"prompt": ..., "image": path}`` (demonstrations) or
``{"prompt": ..., "chosen": path, "rejected": path}`` (pairs). Paths are relative to the file's folder or absolute.
Every image is loaded once, resized so that its shorter side matches the policy's resolution and centre-cropped to
``model.height x model.width`` (the usual preprocessing of text-to-image training sets), and encoded once into the
policy's latent space (:meth:`encode_images` of the adapter); the latents stay on the CPU.

Each epoch draws ``data.samples_per_epoch`` records (all by default) from a fresh permutation seeded by
(``seed``, epoch), identical on every process; process ``rank`` trains a contiguous share. The records that do not
divide evenly among the processes are left out of that epoch (each epoch's permutation differs, so no record is
left out for good). An epoch's batch looks like the sampler's to the objectives: clean latents as ``final``, the
sampler's schedule (``sampling.num_steps``) as the noise levels to train at, and the prompts' conditioning.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from .methods import mix_seed
from .policy import Cond, cat_conds, index_cond

KINDS = {"image": ("image",), "pairs": ("chosen", "rejected")}


def read_image_records(path: str, kind: str, key: str = "data.train_file") -> List[Dict[str, object]]:
    """Records ``{"prompt": str, "images": [absolute path, ...]}`` of a data set (``kind``: 'image' or 'pairs');
    ``path`` may name a shipped file as ``digits:NAME`` (the convention of prompt files); ``key``: the config key
    that named it (for errors).

    Errors name the key, the file and the line: not JSON, no prompt, a missing field, an image that does not exist."""
    from .prompts import resolve_prompts_path

    if kind not in KINDS:
        raise ValueError(f"data set kind must be one of {sorted(KINDS)}, got {kind!r}")
    path = resolve_prompts_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key} {path!r} does not exist")
    folder = os.path.dirname(os.path.abspath(path))
    records = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{key} {path!r} line {number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
                raise ValueError(f"{where}: needs a non-empty string 'prompt'")
            images = []
            for key in KINDS[kind]:
                value = obj.get(key)
                if not isinstance(value, str) or not value:
                    raise ValueError(f"{where}: needs an image path in {key!r} (records of this method: "
                                     f"{['prompt', *KINDS[kind]]})")
                full = value if os.path.isabs(value) else os.path.join(folder, value)
                if not os.path.isfile(full):
                    raise FileNotFoundError(f"{where}: {key} image {full!r} does not exist")
                images.append(full)
            records.append({"prompt": obj["prompt"], "images": images})
    if not records:
        raise ValueError(f"{key} {path!r} has no records")
    return records


def load_image(path: str, height: int, width: int) -> torch.Tensor:
    """RGB image ``[3, height, width]`` in [0, 1]: shorter side resized to fit, centre crop."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        scale = max(height / img.height, width / img.width)
        size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
        img = img.resize(size, Image.BICUBIC)
        left, top = (img.width - width) // 2, (img.height - height) // 2
        img = img.crop((left, top, left + width, top + height))
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(height, width, 3).permute(2, 0, 1).float() / 255


@dataclass
class CleanBatch:
    """Clean samples as the forward-process and preference objectives read them: ``final`` ``[n, ...]`` latents,
    ``sigmas [n, T+1]`` and ``timesteps [n, T]`` (the schedule the objectives train at), ``cond``, ``prompts``."""

    final: torch.Tensor
    sigmas: torch.Tensor
    timesteps: torch.Tensor
    cond: Cond
    prompts: List[str]

    def __len__(self) -> int:
        return self.final.shape[0]

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[1]

    def select(self, index) -> "CleanBatch":
        index = torch.as_tensor(index, dtype=torch.long) if isinstance(index, (list, tuple)) else index
        prompts = [self.prompts[i] for i in index.tolist()] if isinstance(index, torch.Tensor) else self.prompts[index]
        return CleanBatch(self.final[index], self.sigmas[index], self.timesteps[index], index_cond(self.cond, index),
                          prompts)

    def to(self, device) -> "CleanBatch":
        return CleanBatch(self.final.to(device), self.sigmas.to(device), self.timesteps.to(device),
                          {k: v.to(device) for k, v in self.cond.items()}, self.prompts)


class ImageDataset:
    """A data set's records with their images encoded once (see the module docstring)."""

    def __init__(self, path: str, kind: str, policy, batch_size: int = 16, log=None, key: str = "data.train_file"):
        self.path, self.kind, self.key = path, kind, key
        self.records = read_image_records(path, kind, key)
        encode = getattr(policy, "encode_images", None)
        if encode is None:
            raise ValueError(f"{key}: the {type(policy).__name__} adapter cannot encode images into its "
                             f"latent space (no encode_images), so it cannot train on a data set")
        height, width = _resolution(policy)
        files = [p for r in self.records for p in r["images"]]
        latents = []
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            with torch.no_grad():
                latents.append(encode(torch.stack([load_image(f, height, width) for f in chunk])).float().cpu())
        self.latents = torch.cat(latents)  # [records * images per record, ...] in record order
        self.per_record = len(KINDS[kind])
        if log:
            log(f"data set {path}: {len(self.records)} records, {len(files)} images encoded at {height}x{width}")

    def __len__(self) -> int:
        return len(self.records)

    def epoch_rows(self, epoch: int, seed: int, world: int, rank: int,
                   samples_per_epoch: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(records of this process [m], the epoch's record count per process m)`` for ``epoch``."""
        order = torch.randperm(len(self.records), generator=torch.Generator().manual_seed(mix_seed(seed, epoch, 41)))
        if samples_per_epoch is not None:
            order = order[:samples_per_epoch]
        m = len(order) // world
        if m == 0:
            raise ValueError(f"{self.key} has {len(order)} records per epoch for {world} processes: each needs one")
        return order[rank * m:(rank + 1) * m], torch.tensor(m)

    def batch(self, policy, records: torch.Tensor, num_steps: int, batch_size: int) -> CleanBatch:
        """The clean batch of ``records`` (every image of each record, in record order) with encoded prompts."""
        k = self.per_record
        rows = (records[:, None] * k + torch.arange(k)).flatten()
        prompts = [self.records[int(r)]["prompt"] for r in records for _ in range(k)]
        conds = []
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                conds.append(policy.encode(prompts[start:start + batch_size]))
        timesteps, sigmas = policy.schedule(num_steps)
        n = len(prompts)
        return CleanBatch(self.latents[rows].to(policy.device), sigmas.float().expand(n, -1).clone(),
                          timesteps.expand(n, -1).clone(), cat_conds(conds), prompts)


def _resolution(policy) -> Tuple[int, int]:
    height, width = getattr(policy, "height", None), getattr(policy, "width", None)
    if height is None or width is None:
        raise ValueError(f"{type(policy).__name__} has no height / width to load data set images at")
    return int(height), int(width)


def pair_rewards(num_pairs: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rewards ``[2P]`` (chosen 1, rejected 0) and group ids ``[2P]`` (the pair) of P consecutive pairs."""
    return torch.tensor([1.0, 0.0]).repeat(num_pairs), torch.arange(num_pairs).repeat_interleave(2)


__all__ = ["CleanBatch", "ImageDataset", "load_image", "pair_rewards", "read_image_records"]
