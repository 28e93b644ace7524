"""Reproducible ODE sampling shared by ``genalign sample``, ``grid`` and ``eval``.

Every image has its own seed: its initial noise is ``policy.initial_latents(1, Generator.manual_seed(seed))``,
so an image depends only on (prompt, seed, weights) and never on its batch neighbours. Comparisons
(grid columns, paired evaluation) reuse the same seeds, hence the same initial noise, for every
checkpoint.

A *variant* of a loaded policy is one of: the base model (adapters disabled), one of its named LoRA
adapters, or an RLG mix of base and adapter (:class:`genalign.rlg.RLGPolicy`); several LoRAs are
loaded once as separately named adapters and switched between variants.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import torch


@dataclass(frozen=True)
class Variant:
    """What to sample with: ``adapter`` None = base model; ``rlg`` None = the adapter as is."""

    label: str
    adapter: Optional[str] = None
    rlg: Optional[float] = None


def load_policy_with_loras(model: str, loras: Sequence[str] = (), guidance_scale: Optional[float] = None,
                           device: Optional[str] = None, names: Optional[Sequence[str]] = None):
    """Load ``model`` and each LoRA (LoRA, checkpoint or run directory) as adapter ``names[i]``
    (default ``lora0``, ``lora1``, ...). Returns ``(policy, adapter names)``."""
    from .lora import load_lora
    from .pipelines import load_policy

    policy = load_policy(model, device=device, guidance_scale=guidance_scale)
    names = list(names) if names is not None else [f"lora{i}" for i in range(len(loras))]
    with warnings.catch_warnings():  # peft warns that a second adapter makes several: that is the point here
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        for path, name in zip(loras, names):
            load_lora(policy, path, adapter_name=name)
    return policy, names[:len(loras)]


@contextlib.contextmanager
def use_variant(policy, variant: Variant) -> Iterator[object]:
    """Yield the policy to sample ``variant`` with (the base, an adapter, or an RLG wrapper)."""
    from .lora import adapters_disabled, has_lora
    from .rlg import RLGPolicy

    denoiser = policy.denoiser()
    if variant.adapter is None:
        if variant.rlg is not None:
            raise ValueError(f"variant {variant.label!r}: RLG needs an adapter")
        with adapters_disabled(denoiser) if has_lora(denoiser) else contextlib.nullcontext():
            yield policy
        return
    denoiser.set_adapter(variant.adapter)
    yield policy if variant.rlg is None else RLGPolicy(policy, variant.rlg)


def seeded_latents(policy, seeds: Sequence[int]) -> torch.Tensor:
    """Initial noise ``[len(seeds), ...]``, row i drawn from its own generator seeded with ``seeds[i]``."""
    return torch.cat([policy.initial_latents(1, torch.Generator(policy.device).manual_seed(int(s))) for s in seeds])


def default_steps(policy, num_steps: Optional[int] = None) -> int:
    """``num_steps``, else the adapter's default (digits: 10), else 28."""
    return int(num_steps or getattr(policy, "num_steps", None) or 28)


@torch.no_grad()
def iter_samples(policy, prompts: Sequence[str], seeds: Sequence[int], num_steps: Optional[int] = None,
                 batch_size: int = 32) -> Iterator[torch.Tensor]:
    """Deterministic ODE (DDIM eta = 0 for DDPM models) samples, yielded per batch as ``[b, 3, H, W]`` in
    [0, 1] on the CPU; image i comes from prompt ``prompts[i]`` and seed ``seeds[i]``."""
    from .rollout import rollout

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    steps = default_steps(policy, num_steps)
    step_kind = "ddim" if policy.kind == "ddpm" else "sde"
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        latents = seeded_latents(policy, seeds[start:start + batch_size])
        traj = rollout(policy, policy.encode(chunk), chunk, steps, 0.0, step_kind, latents=latents)
        yield policy.decode(traj.final).clamp(0, 1).float().cpu()


def sample_images(policy, prompts: Sequence[str], seeds: Sequence[int], num_steps: Optional[int] = None,
                  batch_size: int = 32) -> torch.Tensor:
    """All of :func:`iter_samples` as one ``[N, 3, H, W]`` tensor."""
    return torch.cat(list(iter_samples(policy, prompts, seeds, num_steps, batch_size)))


def expand_jobs(prompts: Sequence[str], num_per_prompt: int, seed: int):
    """``(prompts, seeds)`` lists: each prompt repeated ``num_per_prompt`` times, image i seeded ``seed + i``."""
    jobs = [p for p in prompts for _ in range(num_per_prompt)]
    return jobs, [seed + i for i in range(len(jobs))]


def display_parts(parts: Sequence[str], rewards: Sequence[str]) -> List[str]:
    """Reward components in display order: each reward, then its sub-scores, then anything else; the
    ``<reward>.score`` sub-score (identical to ``<reward>`` itself, see ``RewardSet``) is left out."""
    out: List[str] = []
    for name in rewards:
        out += [name] if name in parts else []
        out += [p for p in parts if p.startswith(name + ".") and p != name + ".score"]
    return out + [p for p in parts if p not in out and not any(p == r + ".score" for r in rewards)]


def to_pil(image: torch.Tensor):
    """``[3, H, W]`` in [0, 1] -> a PIL RGB image."""
    from PIL import Image

    return Image.fromarray((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


def sample_to_dir(model: str, prompts: List[str], num_per_prompt: int, seed: int, out: str, lora: Optional[str] = None,
                  num_steps: Optional[int] = None, guidance_scale: Optional[float] = None, batch_size: int = 32,
                  device: Optional[str] = None, rlg: Optional[float] = None) -> str:
    """Generate ``num_per_prompt`` ODE samples per prompt; image i uses seed ``seed + i`` (reproducible
    one by one). ``rlg``: alignment strength w (needs ``lora``; 0 = base, 1 = the LoRA). Writes PNGs and
    ``manifest.jsonl`` lines ``{"file", "prompt", "seed"}``."""
    if rlg is not None and not lora:
        raise ValueError("--rlg needs --lora: RLG mixes the base model with a fine-tuned LoRA")
    policy, names = load_policy_with_loras(model, [lora] if lora else [], guidance_scale, device)
    variant = Variant("sample", names[0] if names else None, rlg)
    job_prompts, seeds = expand_jobs(prompts, num_per_prompt, seed)
    os.makedirs(out, exist_ok=True)
    with use_variant(policy, variant) as sampler, open(os.path.join(out, "manifest.jsonl"), "w") as manifest:
        i = 0
        for batch in iter_samples(sampler, job_prompts, seeds, num_steps, batch_size):
            for img in batch:
                name = f"{i:05d}.png"
                to_pil(img).save(os.path.join(out, name))
                manifest.write(json.dumps({"file": name, "prompt": job_prompts[i], "seed": seeds[i]}) + "\n")
                i += 1
    return out
