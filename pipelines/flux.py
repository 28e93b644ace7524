"""FLUX.1 (``FluxPipeline``) as a flow-matching :class:`~genalign.policy.Policy`.

Latents are PACKED like diffusers does: ``[B, C, h, w]`` (h = H/8) -> ``[B, (h/2)*(w/2), 4C]``
(``(B, (H/16)*(W/16), 64)`` for FLUX.1). The transformer gets ``timestep / 1000``, the guidance
embedding ``guidance_scale`` (3.5 by default, only when ``transformer.config.guidance_embeds``), and
``img_ids`` / ``txt_ids`` built here. No true CFG by default; ``true_cfg_scale > 1`` enables it with
negative embeddings in the conditioning (batched ``[negative; positive]``, two times the compute).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ._base import DiffusersPolicy, PackedLatents, flow_schedule
from .sd3 import SD3_LORA_TARGETS

FLUX_LORA_TARGETS = SD3_LORA_TARGETS + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, (h/2)*(w/2), 4C]`` (2x2 patches; diffusers' ``FluxPipeline._pack_latents``)."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack, got {h}x{w}")
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: ``[B, (h/2)*(w/2), 4C]`` -> ``[B, C, h, w]`` for LATENT size ``h x w``."""
    from diffusers import FluxPipeline

    b, n, ch = packed.shape
    if n != (height // 2) * (width // 2) or ch % 4:
        raise ValueError(f"packed latents {tuple(packed.shape)} do not fit a {height}x{width} latent grid")
    # diffusers' helper takes pixel sizes and a VAE factor; factor 1 means "these are latent sizes".
    return FluxPipeline._unpack_latents(packed, height, width, 1)


class FluxPolicy(PackedLatents, DiffusersPolicy):
    """Adapter for ``FluxPipeline`` (kind ``"flow"``).

    Conditioning keys: ``prompt_embeds [B, L, D]`` (T5) and ``pooled_prompt_embeds [B, P]`` (CLIP);
    ``negative_*`` too when ``true_cfg_scale > 1``. ``guidance_scale`` is the guidance-embedding value.
    """

    kind = "flow"
    default_guidance_scale = 3.5
    default_lora_targets = FLUX_LORA_TARGETS
    denoiser_name = "transformer"
    pipeline_class_name = "FluxPipeline"
    pipeline_classes = ("FluxPipeline",)
    resolution_multiple_extra = 2
    max_sequence_length = 512
    cfg_scale_name = "true_cfg_scale"
    pack = staticmethod(pack_latents)
    unpack = staticmethod(unpack_latents)

    def __init__(self, pipe, guidance_scale: Optional[float] = None, device=None, dtype: Optional[torch.dtype] = None,
                 height: Optional[int] = None, width: Optional[int] = None, true_cfg_scale: float = 1.0, **options):
        """``options``: ``offload_text_encoders`` / ``cache_prompt_embeds`` of
        :class:`~genalign.pipelines._base.DiffusersPolicy`."""
        self.true_cfg_scale = float(true_cfg_scale)
        super().__init__(pipe, guidance_scale=guidance_scale, device=device, dtype=dtype, height=height, width=width,
                         **options)

    def _encode(self, prompts: List[str], negative: bool = True) -> Dict[str, Optional[torch.Tensor]]:
        self._require_text_encoders("text_encoder", "text_encoder_2")
        out = dict(zip(("prompt_embeds", "pooled_prompt_embeds"), self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length)[:2]))
        if self.uses_cfg and negative:
            neg = self.pipe.encode_prompt(prompt=[""] * len(prompts), prompt_2=None, device=self.device,
                                          max_sequence_length=self.max_sequence_length)
            out.update(negative_prompt_embeds=neg[0], negative_pooled_prompt_embeds=neg[1])
        return out

    def schedule(self, num_steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``linspace(1, 1/N, N)`` shifted by the dynamic ``mu`` of the image's token count, then 0 appended."""
        sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)
        return flow_schedule(self.pipe.scheduler, num_steps, self.latent_shape[0], self.device, sigmas=sigmas)

    def _ids(self, text_len: int, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """``img_ids [N, 3]`` (row, column positions of packed tokens) and ``txt_ids [L, 3]`` (zeros)."""
        from diffusers import FluxPipeline

        h, w = self.latent_size
        key = (text_len, dtype, self.device, h, w)
        cache = self.__dict__.setdefault("_ids_cache", {})
        if key not in cache:  # built once per shape, not once per denoising step (never modified: read only)
            cache.clear()
            img_ids = FluxPipeline._prepare_latent_image_ids(None, h // 2, w // 2, self.device, dtype)
            cache[key] = (img_ids, torch.zeros(text_len, 3, device=self.device, dtype=dtype))
        return cache[key]

    def _forward(self, x: torch.Tensor, t: torch.Tensor, embeds: Dict[str, torch.Tensor]) -> torch.Tensor:
        prompt_embeds = embeds["prompt_embeds"]
        img_ids, txt_ids = self._ids(prompt_embeds.shape[1], x.dtype)
        guidance = None
        if self.denoiser().config.guidance_embeds:
            guidance = torch.full((x.shape[0],), self.guidance_scale, device=x.device, dtype=torch.float32)
        return self.denoiser()(
            hidden_states=x, timestep=t.to(x.dtype) / 1000, guidance=guidance,
            pooled_projections=embeds["pooled_prompt_embeds"], encoder_hidden_states=prompt_embeds,
            txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
        )[0]
