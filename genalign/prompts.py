"""Prompt files and the distributed K-repeat prompt sampler."""

from __future__ import annotations

import os
from typing import List, Tuple

import torch


def asset_path(name: str, folder: str = "digits") -> str:
    """Path of a shipped asset file: ``genalign.assets/<folder>/<name>`` (``folder`` 'digits' or 'prompts')."""
    from importlib.resources import files

    return str(files("genalign.assets").joinpath(folder, name))


ASSET_PREFIXES = ("digits", "prompts")
"""``NAME:FILE`` prefixes of prompt files resolved to ``genalign.assets/NAME/FILE`` by :func:`read_prompts`."""


def resolve_prompts_path(path: str) -> str:
    """``digits:FILE`` / ``prompts:FILE`` -> the shipped ``genalign.assets/digits|prompts/FILE``; else ``path``."""
    prefix, sep, name = path.partition(":")
    if sep and prefix in ASSET_PREFIXES:
        return asset_path(name, prefix)
    return path


def read_prompts(path: str) -> List[str]:
    """Non-empty, stripped lines of a prompt file; ``digits:NAME`` names a file of the shipped digits assets,
    ``prompts:NAME`` one of the shipped prompt sets (``genalign.assets/prompts``, listed in the README's
    "Real models" section)."""
    path = resolve_prompts_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist")
    with open(path, encoding="utf-8") as fh:
        prompts = [line.strip() for line in fh if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path!r} is empty: it needs at least one prompt, one per line")
    return prompts


class KRepeatSampler:
    """Each epoch: draw ``num_groups`` prompt indices, repeat each ``group_size`` times, shuffle.

    Every process seeds the same generator with ``seed + epoch``, so all agree on the epoch's global
    list; process ``rank`` takes the contiguous slice ``[rank * n_local, (rank + 1) * n_local)``.
    Groups therefore may span processes. The sampler is stateless apart from the epoch number,
    which makes resuming exact.
    """

    def __init__(self, num_prompts: int, num_groups: int, group_size: int, seed: int, world_size: int = 1, rank: int = 0):
        total = num_groups * group_size
        if total % world_size:
            raise ValueError(f"{num_groups} groups x {group_size} samples cannot be split over {world_size} processes")
        self.num_prompts, self.num_groups, self.group_size = num_prompts, num_groups, group_size
        self.seed, self.world_size, self.rank = seed, world_size, rank
        self.n_local = total // world_size

    def epoch(self, epoch: int) -> Tuple[List[int], torch.Tensor, List[int]]:
        """``(global prompt indices, global group ids [N], local sample positions)`` for ``epoch``."""
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        if self.num_groups <= self.num_prompts:
            chosen = torch.randperm(self.num_prompts, generator=g)[: self.num_groups]
        else:
            chosen = torch.randint(self.num_prompts, (self.num_groups,), generator=g)
        group_ids = torch.arange(self.num_groups).repeat_interleave(self.group_size)
        order = torch.randperm(group_ids.numel(), generator=g)
        group_ids = group_ids[order]
        prompt_idx = chosen[group_ids].tolist()
        local = list(range(self.rank * self.n_local, (self.rank + 1) * self.n_local))
        return prompt_idx, group_ids, local
