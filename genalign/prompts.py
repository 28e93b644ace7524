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


IMAGE_FIELDS = ("image", "condition_image", "images", "condition_images")
"""jsonl fields naming a prompt's condition image(s): a path (the first two) or a list of paths (the last two)."""
CONDITIONING_FIELDS = ("negative_prompt",) + IMAGE_FIELDS
"""jsonl fields passed to the model (a record's ``"conditioning"``), not to the rewards as metadata."""


def _conditioning(obj: Dict[str, Any], path: str, number: int, max_images: int) -> Dict[str, Any]:
    """The ``"conditioning"`` of one jsonl object (``negative_prompt``, ``images``: checked, existing paths)."""
    where = f"prompt file {path!r} line {number}"
    out: Dict[str, Any] = {}
    neg = obj.get("negative_prompt")
    if neg is not None:
        if not isinstance(neg, str):
            raise ValueError(f"{where}: \"negative_prompt\" must be a string, got {type(neg).__name__}")
        if neg.strip():  # blank: the default negative (the empty prompt)
            out["negative_prompt"] = neg.strip()
    given = [k for k in IMAGE_FIELDS if k in obj]
    if len(given) > 1:
        raise ValueError(f"{where}: give the condition image(s) in one field, not {given}")
    if not given:
        return out
    field, value = given[0], obj[given[0]]
    images = [value] if field in ("image", "condition_image") else value
    if not isinstance(images, list) or not all(isinstance(v, str) and v.strip() for v in images):
        kind = "a path (string)" if field in ("image", "condition_image") else "a list of paths (strings)"
        raise ValueError(f"{where}: {field!r} must be {kind}, got {value!r}")
    if len(images) > max_images:
        raise ValueError(f"{where}: {field!r} gives {len(images)} condition images, but at most {max_images} per "
                         f"prompt is supported (FLUX.1 Kontext takes one condition image)")
    folder = os.path.dirname(os.path.abspath(path))
    resolved = []
    for image in images:
        full = os.path.normpath(os.path.join(folder, os.path.expanduser(image.strip())))  # absolute: as given
        if not os.path.isfile(full):
            raise FileNotFoundError(f"{where}: condition image {full!r} does not exist (given as {image!r}; relative "
                                    f"paths are relative to the prompt file's folder)")
        resolved.append(full)
    if resolved:
        out["images"] = resolved
    return out


def read_prompt_records(path: str, max_images: int = 1) -> List[Dict[str, Any]]:
    """The prompts of a file as records ``{"prompt": str, "metadata": dict}`` (plus ``"conditioning"``: dict).

    ``.jsonl``: one JSON object per non-empty line with a string ``"prompt"``; its other fields (or its
    ``"metadata"`` object, merged) become the metadata every reward receives with each image of that prompt (e.g.
    the text an OCR reward should find, the objects of a GenEval prompt). Other files: one prompt per non-empty,
    stripped line, empty metadata. ``digits:NAME`` / ``prompts:NAME`` name shipped files (:func:`read_prompts`).

    Per-prompt conditioning, passed to the model (:data:`CONDITIONING_FIELDS`, kept out of the metadata):
    ``"negative_prompt"`` (string; replaces the empty negative prompt of classifier-free guidance for this prompt)
    and a condition image: ``"image"`` / ``"condition_image"`` (a path) or ``"images"`` / ``"condition_images"`` (a
    list of at most ``max_images`` paths), relative to the prompt file's folder or absolute, checked to exist. A
    record that has any gets ``"conditioning": {"negative_prompt": str, "images": [path, ...]}`` (absolute paths)
    and the first image's path as ``metadata["condition_image"]`` (so an editing reward can compare with it); the
    other records have no ``"conditioning"`` key. Errors name the file and the line."""
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
            conditioning = _conditioning(obj, path, number, max_images)
            meta = obj.get("metadata", {})
            if not isinstance(meta, dict):
                raise ValueError(f"prompt file {path!r} line {number}: \"metadata\" must be an object")
            extra = {k: v for k, v in obj.items() if k not in ("prompt", "metadata") + CONDITIONING_FIELDS}
            record = {"prompt": obj["prompt"].strip(), "metadata": {**extra, **meta}}
            if conditioning:
                if conditioning.get("images"):
                    image = conditioning["images"][0]
                    given = record["metadata"].get("condition_image", image)
                    folder = os.path.dirname(os.path.abspath(path))
                    if not isinstance(given, str) or os.path.normpath(os.path.join(folder, given)) != image:
                        raise ValueError(f"prompt file {path!r} line {number}: metadata \"condition_image\" "
                                         f"{record['metadata']['condition_image']!r} differs from the record's "
                                         f"condition image {image!r}")
                    record["metadata"]["condition_image"] = image
                record["conditioning"] = conditioning
            records.append(record)
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


def split_records(records: List[Dict[str, Any]], fraction: float, seed: int):
    """``(train, eval)`` records: a fraction of ``records`` (at least one, drawn by ``seed``, in file order) held out
    for evaluation, the rest for training (config ``eval_split``)."""
    import torch

    n_eval = max(1, round(fraction * len(records)))
    if n_eval >= len(records):
        raise ValueError(f"eval_split = {fraction} of {len(records)} prompts leaves none to train on")
    held = set(torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()[:n_eval])
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def run_prompt_records(cfg):
    """The training and evaluation prompt records of a run config: ``prompts_file`` and ``eval_prompts_file``, or
    ``prompts_file`` split by ``eval_split``."""
    records = read_prompt_records(cfg.prompts_file)
    if cfg.eval_split is not None:
        return split_records(records, cfg.eval_split, cfg.seed)
    return records, (read_prompt_records(cfg.eval_prompts_file) if cfg.eval_prompts_file else [])
