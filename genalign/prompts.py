"""Prompt files and the distributed K-repeat prompt sampler."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Tuple

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


UNSUPPORTED_FIELDS = ("negative_prompt", "image", "images", "condition_image", "condition_images")
"""jsonl fields that need per-prompt conditioning the trainer does not pass to the model yet (refused, not ignored)."""


def read_prompt_records(path: str) -> List[Dict[str, Any]]:
    """The prompts of a file as records ``{"prompt": str, "metadata": dict}``.

    ``.jsonl``: one JSON object per non-empty line with a string ``"prompt"``; its other fields (or its
    ``"metadata"`` object, merged) become the metadata every reward receives with each image of that prompt (e.g.
    the text an OCR reward should find, the objects of a GenEval prompt). Other files: one prompt per non-empty,
    stripped line, empty metadata. ``digits:NAME`` / ``prompts:NAME`` name shipped files (:func:`read_prompts`).
    Errors name the file and the line."""
    path = resolve_prompts_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist")
    records: List[Dict[str, Any]] = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if not path.endswith(".jsonl"):
                records.append({"prompt": line.strip(), "metadata": {}})
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"prompt file {path!r} line {number}: not JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
                raise ValueError(f"prompt file {path!r} line {number}: each line must be an object with a non-empty "
                                 f"string \"prompt\"")
            bad = [k for k in UNSUPPORTED_FIELDS if k in obj]
            if bad:
                raise ValueError(f"prompt file {path!r} line {number}: field {bad[0]!r} is not supported yet (per-prompt "
                                 f"negative prompts and condition images are not passed to the model); remove it or "
                                 f"move it under \"metadata\" for the rewards only")
            meta = obj.get("metadata", {})
            if not isinstance(meta, dict):
                raise ValueError(f"prompt file {path!r} line {number}: \"metadata\" must be an object")
            extra = {k: v for k, v in obj.items() if k not in ("prompt", "metadata")}
            records.append({"prompt": obj["prompt"].strip(), "metadata": {**extra, **meta}})
    if not records:
        raise ValueError(f"prompt file {path!r} is empty: it needs at least one prompt, one per line")
    return records


def read_prompts(path: str) -> List[str]:
    """The prompt texts of a prompt file (:func:`read_prompt_records`): non-empty, stripped lines, or the
    ``"prompt"`` fields of a ``.jsonl`` file; ``digits:NAME`` names a file of the shipped digits assets,
    ``prompts:NAME`` one of the shipped prompt sets (``genalign.assets/prompts``, listed in the README's
    "Real models" section)."""
    return [r["prompt"] for r in read_prompt_records(path)]


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
