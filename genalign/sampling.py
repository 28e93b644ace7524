"""The one sampling service of genalign: per-image seeds, shared by every user.

``genalign sample``, ``grid`` and ``eval``, training-time evaluation (:class:`genalign.evaluator.Evaluator`),
Adv-GRPO's fresh discriminator images and the digits pretraining metrics all sample through
:func:`iter_samples` / :func:`sample_images`. Every image has its own seed: its initial noise is
``policy.initial_latents(1, Generator(device).manual_seed(seed))`` and, for SDE sampling, the noise of each
stochastic step is drawn next from that same generator; nothing else is random. So an image depends only
on (prompt, seed, weights, steps, noise levels) and never on its batch neighbours, the batch size or the
process that draws it (up to the float round-off of batched kernels). Requests are prompt-major lists
(:func:`expand_jobs`) in which image i uses seed ``S + i`` (:func:`image_seed`); a process of ``W`` draws the
images ``i % W == rank`` (:func:`shard`) with the seeds of their global indices. Comparisons (grid columns,
paired evaluation) reuse the same seeds, hence the same noise, for every checkpoint.

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
from typing import Callable, ContextManager, Iterator, List, Optional, Sequence, Tuple, Union

import torch


@dataclass(frozen=True)
class Variant:
    """What to sample with: ``adapter`` None = base model; ``rlg`` None = the adapter as is."""

    label: str
    adapter: Optional[str] = None
    rlg: Optional[float] = None


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def base_model_of(lora: str) -> str:
    """The base model tuned weights (a LoRA or a full fine-tune: LoRA, weights file, checkpoint or run directory,
    :func:`genalign.lora.find_tuned`) were trained on: ``base_model`` of the ``base_model.json`` (LoRA) or
    ``denoiser.json`` (full fine-tune) written next to them. Raises FileNotFoundError naming that file when it is
    absent."""
    from .lora import tuned_meta_path

    path = tuned_meta_path(lora)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: cannot tell which base model {lora!r} belongs to; "
                                f"give --model")
    with open(path) as fh:
        base = json.load(fh).get("base_model")
    if not base:
        raise ValueError(f"{path} names no base_model; give --model")
    return str(base)


def resolve_model(model: Optional[str], loras: Sequence[str] = ()) -> str:
    """``model`` when given; else the base model of the LoRAs (:func:`base_model_of`; they must agree); else
    ``'digits'``."""
    if model:
        return model
    bases = {lora: base_model_of(lora) for lora in loras if lora}
    if len(set(bases.values())) > 1:
        raise ValueError(f"the LoRAs were trained on different base models {bases}; give --model")
    return next(iter(bases.values()), "digits")


def load_policy_with_loras(model: Optional[str], loras: Sequence[str] = (), guidance_scale: Optional[float] = None,
                           device: Optional[str] = None, names: Optional[Sequence[str]] = None, dtype=None,
                           **model_kwargs):
    """Load ``model`` (None: the LoRAs' base model, see :func:`resolve_model`; ``dtype`` a torch dtype or
    ``'float32'``/``'bfloat16'``/``'float16'``; ``model_kwargs`` such as ``height``/``width``, ``drop_t5``,
    ``offload_text_encoders``, ``cache_prompt_embeds`` as ``load_policy`` takes them) and each LoRA or full
    fine-tune (LoRA, ``denoiser*.safetensors``, checkpoint or run directory; :func:`genalign.lora.load_tuned`) as
    variant ``names[i]`` (default ``lora0``, ``lora1``, ...; the last one loaded is active). The LoRA
    weights are kept in float32 whatever ``dtype``, as the trainer keeps its trainable weights, so a LoRA
    samples here as it did in training. Returns ``(policy, adapter names)``."""
    from .lora import load_tuned
    from .plugins import load_policy

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    model = resolve_model(model, loras)
    policy = load_policy(model, device=device, dtype=dtype, guidance_scale=guidance_scale,
                         **{k: v for k, v in model_kwargs.items() if v is not None})
    names = list(names) if names is not None else [f"lora{i}" for i in range(len(loras))]
    with warnings.catch_warnings():  # peft warns that a second adapter makes several: that is the point here
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        for path, name in zip(loras, names):
            load_tuned(policy, path, name)
    for pname, p in policy.denoiser().named_parameters():
        if "lora_" in pname and p.dtype != torch.float32:
            p.data = p.data.float()
    return policy, names[:len(loras)]


@contextlib.contextmanager
def use_variant(policy, variant: Variant) -> Iterator[object]:
    """Yield the policy to sample ``variant`` with (the base, a LoRA adapter, a full fine-tune's weights or an RLG
    wrapper)."""
    from .lora import adapters_disabled, has_lora, weight_variants, weights_active
    from .rlg import RLGPolicy

    denoiser = policy.denoiser()
    full = weight_variants(policy)
    if variant.adapter is not None and variant.adapter in full:  # a full fine-tune: its weights copied in
        if variant.rlg is not None:
            raise ValueError(f"variant {variant.label!r}: RLG interpolates a LoRA with its base; {variant.adapter!r} "
                             f"is a full fine-tune")
        with weights_active(policy, variant.adapter):
            yield policy
        return
    with weights_active(policy, None) if full else contextlib.nullcontext():  # the base or a LoRA: base weights
        if variant.adapter is None:
            if variant.rlg is not None:
                raise ValueError(f"variant {variant.label!r}: RLG needs an adapter")
            with adapters_disabled(denoiser) if has_lora(denoiser) else contextlib.nullcontext():
                yield policy
            return
        denoiser.set_adapter(variant.adapter)
        yield policy if variant.rlg is None else RLGPolicy(policy, variant.rlg)


def image_seed(base_seed: int, index: int) -> int:
    """The seed of image ``index`` of a request seeded ``base_seed``: ``base_seed + index`` (so image i of
    ``genalign sample --seed S`` is image 0 of ``--seed S+i``, and a grid row with seed s shows image s of
    a request seeded 0)."""
    return int(base_seed) + int(index)


def expand_jobs(prompts: Sequence[str], num_per_prompt: int, seed: int) -> Tuple[List[str], List[int]]:
    """A request as ``(prompts, seeds)`` lists, prompt-major: each prompt repeated ``num_per_prompt`` times,
    image i seeded :func:`image_seed` ``(seed, i)``."""
    jobs = [p for p in prompts for _ in range(num_per_prompt)]
    return jobs, [image_seed(seed, i) for i in range(len(jobs))]


def shard(num_images: int, rank: int = 0, world: int = 1) -> List[int]:
    """The global image indices process ``rank`` of ``world`` draws: those with ``i % world == rank``, in order."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside [0, {world})")
    return list(range(rank, num_images, world))


def image_generator(policy, seed: int) -> torch.Generator:
    """The generator of one image: on the policy's device, seeded with the image's seed. It draws the image's
    initial noise, then (SDE sampling) the noise of each stochastic step, in step order."""
    return torch.Generator(policy.device).manual_seed(int(seed))


def seeded_latents(policy, seeds: Sequence[int],
                   generators: Optional[Sequence[torch.Generator]] = None) -> torch.Tensor:
    """Initial noise ``[len(seeds), ...]``, row i drawn by ``policy.initial_latents(1, g_i)`` from its own
    generator ``g_i`` (:func:`image_generator` of ``seeds[i]``, or ``generators[i]`` when given)."""
    generators = generators if generators is not None else [image_generator(policy, s) for s in seeds]
    return torch.cat([policy.initial_latents(1, g) for g in generators])


def default_steps(policy, num_steps: Optional[int] = None) -> int:
    """``num_steps``, else the adapter's default (digits: 10), else 28."""
    return int(num_steps or getattr(policy, "num_steps", None) or 28)


def default_step_kind(policy) -> str:
    """``'ddim'`` for DDPM-family policies, ``'sde'`` for flow models. At noise level 0 the flow steps
    ``'sde'`` and ``'cps'`` are the same Euler step ``x + (s' - s) v`` (exact coefficients, see
    :mod:`genalign.sde`), so the ODE does not depend on the flow step kind."""
    return "ddim" if policy.kind == "ddpm" else "sde"


def step_noise_levels(num_steps: int, noise_level: Union[float, Sequence[float], torch.Tensor] = 0.0) -> torch.Tensor:
    """Per-step noise levels ``[T]`` (float32) from one level for every step or ``T`` per-step levels."""
    levels = torch.as_tensor(noise_level, dtype=torch.float32)
    levels = levels.expand(num_steps).clone() if levels.ndim == 0 else levels.clone()
    if levels.shape != (num_steps,):
        raise ValueError(f"noise_level must be a number or {num_steps} per-step levels, "
                         f"got shape {tuple(levels.shape)}")
    if not bool(torch.all(torch.isfinite(levels) & (levels >= 0))):
        raise ValueError(f"noise levels must be finite and >= 0, got {levels.tolist()}")
    return levels


def mixed_precision_autocast(mixed_precision: Optional[str] = "no", device=None) -> Callable[[], ContextManager]:
    """An autocast factory for a run's ``mixed_precision`` (``no``, ``bf16``, ``fp16``): the context that
    ``accelerate``'s ``Accelerator.autocast()`` enters on ``device`` (``torch.autocast`` with that dtype), so
    ``genalign eval`` runs the forward a training run's evaluation ran."""
    if mixed_precision in (None, "no"):
        return contextlib.nullcontext
    if mixed_precision not in ("bf16", "fp16"):
        raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {mixed_precision!r}")
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    device_type = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return lambda: torch.autocast(device_type=device_type, dtype=dtype)


@torch.no_grad()
def _final_latents(policy, prompts: List[str], seeds: Sequence[int], num_steps: int, levels: torch.Tensor,
                   step_kind: str, conditioning: Optional[Sequence[Optional[dict]]] = None) -> torch.Tensor:
    """Final latents of one batch. Row i uses only its own generator (seeded ``seeds[i]``): its initial noise,
    then the noise of every step with a positive level; deterministic steps draw nothing. ``conditioning``: one
    per-prompt conditioning dict (or None) per row (:func:`genalign.policy.encode_prompts`)."""
    from . import sde
    from .policy import encode_prompts
    from .rollout import check_step_kind, transition

    check_step_kind(policy, step_kind)
    generators = [image_generator(policy, s) for s in seeds]
    x = seeded_latents(policy, seeds, generators)
    batch = len(prompts)
    cond = encode_prompts(policy, prompts, conditioning)
    timesteps, sigmas = policy.schedule(num_steps)
    if timesteps.shape[0] != num_steps or sigmas.shape[0] != num_steps + 1:
        raise ValueError(f"schedule has {timesteps.shape[0]} timesteps / {sigmas.shape[0]} sigmas "
                         f"for {num_steps} steps")
    if policy.kind == "flow":
        sde.check_sigmas(sigmas[:-1], sigmas[1:])
    ts, sg = timesteps.to(policy.device, torch.float32), sigmas.to(policy.device, torch.float32)
    for j in range(num_steps):
        out = policy.predict(x, ts[j].expand(batch), cond)
        level = float(levels[j])
        # the step's mean and std; prev_sample=x (scored, then ignored) keeps it from drawing shared noise
        step = transition(step_kind, out, x, sg[j].expand(batch), sg[j + 1].expand(batch),
                          torch.full((batch,), level, device=x.device), prev_sample=x)
        if level == 0.0:
            x = step.mean  # what rollout's mean + 0 * noise gives, without drawing the noise
        else:  # mean + std * noise as genalign.sde draws it, row i's noise from row i's generator
            noise = torch.cat([torch.randn((1, *step.mean.shape[1:]), generator=g, device=step.mean.device,
                                           dtype=step.mean.dtype) for g in generators])
            x = torch.addcmul(step.mean, noise, step.std.reshape(-1, *[1] * (x.ndim - 1)).to(step.mean.dtype))
    return x


@torch.no_grad()
def iter_samples(policy, prompts: Sequence[str], seeds: Sequence[int], num_steps: Optional[int] = None,
                 batch_size: int = 32, *, noise_level: Union[float, Sequence[float], torch.Tensor] = 0.0,
                 step_kind: Optional[str] = None, autocast: Optional[Callable[[], ContextManager]] = None,
                 conditioning: Optional[Sequence[Optional[dict]]] = None) -> Iterator[torch.Tensor]:
    """THE sampler: image i from prompt ``prompts[i]`` and seed ``seeds[i]``, yielded per batch of
    ``batch_size`` as ``[b, 3, H, W]`` float32 in [0, 1] on the CPU.

    Everything random about image i (initial noise; for SDE sampling, each step's noise) comes from one
    generator seeded ``seeds[i]``, so the image does not depend on the batch size, its batch neighbours or
    the process drawing it (batched kernels may still round differently in the last bits).

    num_steps: default :func:`default_steps`. noise_level: one level for every step or ``[T]`` per-step levels;
    0 (default) = the deterministic ODE (DDIM eta = 0 for DDPM models). step_kind: default
    :func:`default_step_kind`. Guidance is the policy's (``policy.guidance_scale``), the dtype its weights';
    ``autocast``: a zero-argument factory of the mixed-precision context entered around each batch's sampling
    and decoding (e.g. ``Accelerator.autocast`` or :func:`mixed_precision_autocast`). ``conditioning``: None or
    one per-prompt conditioning dict per image (a prompt record's ``"conditioning"``: negative prompt, condition
    images; :func:`genalign.prompts.read_prompt_records`), passed to ``policy.encode`` with its batch.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if conditioning is not None and len(conditioning) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(conditioning)} conditioning entries")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    steps = default_steps(policy, num_steps)
    levels = step_noise_levels(steps, noise_level)
    kind = step_kind or default_step_kind(policy)
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        with autocast() if autocast is not None else contextlib.nullcontext():
            rows = None if conditioning is None else list(conditioning[start:start + batch_size])
            images = policy.decode(_final_latents(policy, chunk, seeds[start:start + batch_size], steps, levels, kind,
                                                  rows))
        yield images.clamp(0, 1).float().cpu()


def sample_images(policy, prompts: Sequence[str], seeds: Sequence[int], num_steps: Optional[int] = None,
                  batch_size: int = 32, **options) -> torch.Tensor:
    """All of :func:`iter_samples` (same arguments and options) as one ``[N, 3, H, W]`` tensor."""
    if not len(prompts):
        raise ValueError("no prompts to sample")
    return torch.cat(list(iter_samples(policy, prompts, seeds, num_steps, batch_size, **options)))


def display_parts(parts: Sequence[str], rewards: Sequence[str]) -> List[str]:
    """Reward components in display order: each reward, then its sub-scores, then anything else; the
    ``<reward>.score`` sub-score (identical to ``<reward>`` itself, see ``RewardSet``) is left out."""
    out: List[str] = []
    for name in rewards:
        out += [name] if name in parts else []
        out += [p for p in parts if p.startswith(name + ".") and p != name + ".score"]
    return out + [p for p in parts if p not in out and not any(p == r + ".score" for r in rewards)]


def middle_frames(images: torch.Tensor) -> torch.Tensor:
    """What grids and evaluation images show of a video model's samples: a batch of videos ``[N, F, 3, H, W]`` ->
    their middle frames ``[N, 3, H, W]`` (frame ``F // 2``, a copy: the videos' memory is not held); a batch of
    images ``[N, 3, H, W]`` unchanged."""
    return images[:, images.shape[1] // 2].clone() if images.ndim == 5 else images


def to_pil(image: torch.Tensor):
    """``[3, H, W]`` in [0, 1] -> a PIL RGB image (a video ``[F, 3, H, W]``: its middle frame)."""
    from PIL import Image

    image = image[image.shape[0] // 2] if image.ndim == 4 else image
    return Image.fromarray((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


def sample_to_dir(model: Optional[str], prompts: List[str], num_per_prompt: int, seed: int, out: str,
                  lora: Optional[str] = None, num_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                  batch_size: int = 32, device: Optional[str] = None, rlg: Optional[float] = None,
                  dtype: Optional[str] = None, conditioning: Optional[Sequence[Optional[dict]]] = None,
                  **model_kwargs) -> str:
    """Generate ``num_per_prompt`` ODE samples per prompt; image i uses seed ``seed + i`` (reproducible
    one by one). ``rlg``: alignment strength w (needs ``lora``; 0 = base, 1 = the LoRA). ``model`` None: the
    LoRA's base model; ``dtype``, ``model_kwargs`` (``height``, ``width``, ...): see
    :func:`load_policy_with_loras`. ``conditioning``: one per-prompt conditioning dict (or None) per prompt (a
    ``.jsonl`` record's ``"conditioning"``). Writes PNGs and ``manifest.jsonl`` lines ``{"file", "prompt", "seed"}``."""
    if rlg is not None and not lora:
        raise ValueError("--rlg needs --lora: RLG mixes the base model with a fine-tuned LoRA")
    policy, names = load_policy_with_loras(model, [lora] if lora else [], guidance_scale, device, dtype=dtype,
                                           **model_kwargs)
    variant = Variant("sample", names[0] if names else None, rlg)
    job_prompts, seeds = expand_jobs(prompts, num_per_prompt, seed)
    os.makedirs(out, exist_ok=True)
    with use_variant(policy, variant) as sampler, open(os.path.join(out, "manifest.jsonl"), "w") as manifest:
        i = 0
        rows = None if conditioning is None else [c for c in conditioning for _ in range(num_per_prompt)]
        for batch in iter_samples(sampler, job_prompts, seeds, num_steps, batch_size, conditioning=rows):
            for img in batch:
                name = f"{i:05d}.png"
                to_pil(img).save(os.path.join(out, name))
                manifest.write(json.dumps({"file": name, "prompt": job_prompts[i], "seed": seeds[i]}) + "\n")
                i += 1
    return out
