"""A tiny offline ``FluxKontextPipeline`` and condition images written as PNG files (no downloads).

FLUX.1 Kontext (Labs et al. 2025, arXiv 2506.15742) has FLUX.1's architecture: the pipeline is built from the
components of :func:`tests.tiny_models.tiny_flux` (1 double + 2 single blocks, 4 latent channels, 8x VAE, tiny
CLIP + T5 text encoders with offline tokenizers), so its weights equal that Flux pipeline's for the same seed.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .tiny_models import tiny_flux


def tiny_kontext(guidance_embeds: bool = True, seed: int = 0, with_text_encoders: bool = True):
    """``FluxKontextPipeline`` from :func:`tiny_flux`'s components (no image encoder / feature extractor)."""
    from diffusers import FluxKontextPipeline

    flux = tiny_flux(guidance_embeds=guidance_embeds, seed=seed, with_text_encoders=with_text_encoders)
    return FluxKontextPipeline(image_encoder=None, feature_extractor=None, **{
        k: v for k, v in flux.components.items() if k not in ("image_encoder", "feature_extractor")})


def write_png(path, height: int, width: int, seed: int = 0) -> str:
    """A smooth random RGB image ``height x width`` (pixels in 0..255, seeded) saved as PNG at ``path``."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    low = torch.rand(3, max(height // 8, 1), max(width // 8, 1), generator=g)
    pixels = torch.nn.functional.interpolate(low[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    array = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(array), mode="RGB").save(str(path))
    return str(path)


def write_pngs(folder, sizes: Sequence[tuple], prefix: str = "cond") -> list:
    """One PNG per ``(height, width)`` in ``sizes`` under ``folder`` (``<prefix><i>.png``, seeded by i)."""
    return [write_png(f"{folder}/{prefix}{i}.png", h, w, seed=i) for i, (h, w) in enumerate(sizes)]
