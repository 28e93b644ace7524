"""Model adapters (installed as ``genalign.pipelines``): one per model family, all implementing
:class:`genalign.policy.Policy`.

- ``digits``: the shipped tiny text-to-digit flow model (the embedded default).
- ``sd3``: Stable Diffusion 3 / 3.5; ``flux``: Flux.1; ``ddpm``: SD1.x / SDXL (DDIM eta steps).
- ``llm``: causal language models (token-level objectives share the loss module).

:func:`load_policy` picks the adapter from a model directory's ``model_index.json``.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from genalign.policy import resolve_pretrained

_PIPELINE_CLASSES = {
    "StableDiffusion3Pipeline": ("sd3", "SD3Policy"),
    "FluxPipeline": ("flux", "FluxPolicy"),
    "StableDiffusionPipeline": ("ddpm", "DDPMPolicy"),
    "StableDiffusionXLPipeline": ("ddpm", "DDPMPolicy"),
}


def _adapter(module: str, cls: str):
    import importlib

    return getattr(importlib.import_module(f"genalign.pipelines.{module}"), cls)


def policy_class(model_id: str):
    """Return the adapter class for ``model_id`` ('digits', a digits asset dir, or a diffusers model)."""
    if model_id == "digits" or os.path.isfile(os.path.join(model_id, "policy.json")):
        return _adapter("digits", "DigitsPolicy")
    path = resolve_pretrained(model_id)
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise ValueError(f"{model_id!r} has no model_index.json: not a diffusers pipeline directory "
                         f"(supported: {sorted(_PIPELINE_CLASSES)} or 'digits')")
    with open(index) as fh:
        name = json.load(fh).get("_class_name", "")
    if name not in _PIPELINE_CLASSES:
        raise ValueError(f"pipeline class {name!r} of {model_id!r} is not supported; supported: {sorted(_PIPELINE_CLASSES)}")
    return _adapter(*_PIPELINE_CLASSES[name])


def load_policy(model_id: str, device=None, dtype=None, guidance_scale: Optional[float] = None, **kwargs):
    """Load the policy adapter for ``model_id`` (hub id, local directory, or 'digits')."""
    cls = policy_class(model_id)
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    return cls.from_pretrained(model_id, device=device, dtype=dtype, **kwargs)
