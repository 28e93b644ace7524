"""The policy protocol: a diffusers model seen as a stochastic policy over denoising steps.

An adapter (``genalign.pipelines.*``) implements :class:`Policy`. Its :meth:`Policy.predict` is THE
forward: rollout and training both call it, so recomputed log-probs match the stored ones exactly.

Conditioning is a ``dict[str, Tensor]`` whose tensors all have the batch as first dimension (negative
prompt embeddings included, repeated per sample), so a trajectory's conditioning can be indexed,
concatenated and stored like any other per-sample tensor.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch

Cond = Dict[str, torch.Tensor]


class ModelNotAvailableError(OSError):
    """Raised when a model id is neither a local directory nor cached while offline."""


@runtime_checkable
class Policy(Protocol):
    """What the rollout and the trainer need from a model adapter.

    kind: ``"flow"`` (velocity prediction, sigmas in [0, 1]) or ``"ddpm"`` (noise prediction; the
        schedule's sigmas are ``sqrt(1 - alpha_bar)``).
    guidance_scale: CFG scale used inside :meth:`predict` (Flux: the guidance embedding value).

    Optional: ``independent_judge() -> hook(images, prompts) -> {eval/...: float}``, a realism / diversity
    judge in a feature space no reward uses (:mod:`genalign.judge`); the trainer logs it at every evaluation
    when present (``eval.judge``). The digits adapter provides one.
    """

    kind: str
    guidance_scale: float

    @property
    def device(self) -> torch.device: ...

    def denoiser(self) -> torch.nn.Module:
        """The network that is trained (transformer or UNet)."""

    def encode(self, prompts: List[str], conditioning: Optional[List[Optional[dict]]] = None) -> Cond:
        """Encode prompts (and the empty negative prompt when CFG is on) -> batch-first tensors.

        conditioning: None, or one dict per prompt (:data:`CONDITIONING_KEYS`: ``negative_prompt`` replacing the
        empty negative of that row, ``images`` condition images) from the prompt set's records
        (:func:`genalign.prompts.read_prompt_records`). An adapter that cannot honour a field raises an error naming
        itself, the prompt index and the field (never ignores it). Callers use :func:`encode_prompts`, which calls
        ``encode(prompts)`` when no row has conditioning."""

    def schedule(self, num_steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(timesteps [T], sigmas [T+1])`` (float32, on the policy's device)."""

    def initial_latents(self, batch_size: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Pure noise latents ``[B, ...]`` in float32 (Flux: packed)."""

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Model output (velocity or noise) for ``latents`` at per-sample ``timesteps [B]``, with CFG /
        guidance applied; float32, same shape as ``latents``."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images ``[B, 3, H, W]`` in [0, 1] (float32)."""


CONDITIONING_KEYS = ("negative_prompt", "images")
"""Fields of a per-prompt conditioning dict (a prompt record's ``"conditioning"``): ``negative_prompt`` (str) and
``images`` (a list of condition image paths or PIL images)."""


def conditioning_rows(prompts: Sequence[str], conditioning: Optional[Sequence[Optional[dict]]],
                      adapter: str = "policy") -> List[dict]:
    """``conditioning`` checked against ``prompts``: one dict per prompt (None or ``{}`` = nothing), keys from
    :data:`CONDITIONING_KEYS`; None -> ``[{}] * len(prompts)``. Errors name ``adapter`` and the prompt index."""
    if conditioning is None:
        return [{} for _ in prompts]
    if isinstance(conditioning, dict) or len(conditioning) != len(prompts):
        raise ValueError(f"{adapter}.encode: conditioning must be a list of one dict (or None) per prompt; got "
                         f"{type(conditioning).__name__ if isinstance(conditioning, dict) else len(conditioning)} "
                         f"for {len(prompts)} prompts")
    rows = []
    for i, row in enumerate(conditioning):
        row = {} if row is None else row
        if not isinstance(row, dict):
            raise ValueError(f"{adapter}.encode: conditioning of prompt {i} ({prompts[i]!r}) must be a dict, got "
                             f"{type(row).__name__}")
        unknown = sorted(set(row) - set(CONDITIONING_KEYS))
        if unknown:
            raise ValueError(f"{adapter}.encode: conditioning of prompt {i} ({prompts[i]!r}) has unknown field(s) "
                             f"{unknown}; known: {list(CONDITIONING_KEYS)}")
        neg = row.get("negative_prompt")
        if neg is not None and not isinstance(neg, str):
            raise ValueError(f"{adapter}.encode: negative_prompt of prompt {i} ({prompts[i]!r}) must be a string, "
                             f"got {type(neg).__name__}")
        images = row.get("images")
        if images is not None and (isinstance(images, (str, bytes)) or not isinstance(images, (list, tuple))):
            raise ValueError(f"{adapter}.encode: images of prompt {i} ({prompts[i]!r}) must be a list, got "
                             f"{type(images).__name__}")
        rows.append({k: v for k, v in row.items() if v})  # '' / [] / None: nothing given
    return rows


def has_conditioning(conditioning: Optional[Sequence[Optional[dict]]]) -> bool:
    """Whether any row of ``conditioning`` (one dict or None per prompt) gives a field."""
    return conditioning is not None and any(row and any(row.values()) for row in conditioning)


def refuse_conditioning(adapter: str, prompts: Sequence[str], conditioning: Optional[Sequence[Optional[dict]]],
                        why: str = "it takes no per-prompt negative prompts or condition images") -> None:
    """For adapters without per-prompt conditioning: raise naming ``adapter``, the first prompt index with a
    field and that field, unless ``conditioning`` is empty."""
    for i, row in enumerate(conditioning_rows(prompts, conditioning, adapter)):
        if row:
            raise ValueError(f"{adapter}: prompt {i} ({prompts[i]!r}) has {sorted(row)[0]!r} in its conditioning, "
                             f"but {why}; remove it from the prompt set (or move it under \"metadata\" for the "
                             f"rewards only)")


def check_prompt_conditioning(policy, prompts: Sequence[str],
                              conditioning: Optional[Sequence[Optional[dict]]]) -> None:
    """Check a prompt set's conditioning against ``policy`` before any sampling (the adapter's
    ``check_conditioning`` when it has one: CFG on for negative prompts, condition images accepted). Nothing to
    check when no row gives a field."""
    if not has_conditioning(conditioning):
        return
    check = getattr(policy, "check_conditioning", None)
    if check is not None:
        check(list(prompts), list(conditioning))
    else:
        _require_conditioning_parameter(policy, list(prompts), conditioning)


def _require_conditioning_parameter(policy, prompts: List[str], conditioning) -> None:
    import inspect

    try:
        takes = "conditioning" in inspect.signature(policy.encode).parameters
    except (TypeError, ValueError):
        takes = True
    if not takes:
        i = next(i for i, row in enumerate(conditioning) if row and any(row.values()))
        raise ValueError(f"{type(policy).__name__}.encode takes no per-prompt conditioning, but prompt {i} "
                         f"({prompts[i]!r}) has {sorted(k for k, v in conditioning[i].items() if v)}")


def encode_prompts(policy, prompts: Sequence[str], conditioning: Optional[Sequence[Optional[dict]]] = None) -> Cond:
    """``policy.encode(prompts)`` when no row of ``conditioning`` gives a field (every adapter, including those
    whose ``encode`` predates per-prompt conditioning), else ``policy.encode(prompts, conditioning)``; an adapter
    whose ``encode`` has no ``conditioning`` parameter is named in the error."""
    prompts = list(prompts)
    if not has_conditioning(conditioning):
        return policy.encode(prompts)
    _require_conditioning_parameter(policy, prompts, conditioning)
    return policy.encode(prompts, conditioning=list(conditioning))


def index_cond(cond: Cond, index) -> Cond:
    """Select samples ``index`` (slice, LongTensor or list) from every conditioning tensor."""
    return {k: v[index] for k, v in cond.items()}


def cat_conds(conds: List[Cond]) -> Cond:
    """Concatenate conditionings along the batch dimension (all must have the same keys)."""
    keys = set(conds[0])
    for i, c in enumerate(conds[1:], start=1):
        if set(c) != keys:
            raise ValueError(f"conditioning {i} has keys {sorted(c)}, expected {sorted(keys)}")
    return {k: torch.cat([c[k] for c in conds], dim=0) for k in conds[0]}


def cfg_combine(output: torch.Tensor, scale: float) -> torch.Tensor:
    """Combine a ``[negative; positive]`` batched model output: ``neg + scale * (pos - neg)``."""
    neg, pos = output.chunk(2)
    return neg + scale * (pos - neg)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_pretrained(model_id: str) -> str:
    """Map a hub id or local directory to something ``from_pretrained`` can load without surprises.

    A local directory is returned as is. A hub id is looked up in the local cache; if it is absent and
    the hub is offline (``HF_HUB_OFFLINE=1``) a :class:`ModelNotAvailableError` says how to fetch it.
    Online, the id is returned unchanged and diffusers/transformers download it as usual.
    """
    if os.path.isdir(model_id):
        return model_id
    if os.path.exists(model_id):
        raise ModelNotAvailableError(f"model path {model_id!r} exists but is not a directory")
    looks_local = model_id.startswith((".", "/", "~")) or model_id.count("/") > 1
    if looks_local:
        raise ModelNotAvailableError(f"model directory {model_id!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model_id, local_files_only=True)
    except Exception:
        if _offline():
            raise ModelNotAvailableError(
                f"model {model_id!r} is neither a local directory nor in the Hugging Face cache, and the hub "
                f"is offline (HF_HUB_OFFLINE=1). Fetch it on a machine with internet access with "
                f"`hf download {model_id}` (or `huggingface-cli download {model_id}`) and copy the cache, "
                f"or pass the path of a local directory saved with save_pretrained."
            ) from None
        return model_id


def resolve_device(device: Optional[str]) -> torch.device:
    """``None`` -> CUDA if available else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
