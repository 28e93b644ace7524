"""FLUX.1 Kontext (``FluxKontextPipeline``) as an image-conditioned flow-matching :class:`~genalign.policy.Policy`.

FLUX.1 Kontext (Labs et al. 2025, "FLUX.1 Kontext: Flow Matching for In-Context Image Generation and Editing in
Latent Space", arXiv 2506.15742) is FLUX.1 with a context image: the condition image is VAE-encoded, packed into
2x2-patch tokens like the noisy latents and appended to them along the sequence axis; its RoPE positions have first
coordinate 1 (the noisy tokens' is 0), which tells the model which tokens are context. The transformer's output at
the context tokens is discarded: the velocity is that of the noisy tokens only. Everything else (text encoders,
guidance embedding, packing, dynamic-shift schedule, optional true CFG) is :class:`~genalign.pipelines.flux.FluxPolicy`.

Condition images come from the prompt set (a ``.jsonl`` record's ``image`` field, see
:func:`genalign.prompts.read_prompt_records`), one per prompt, and are prepared as ``FluxKontextPipeline`` does:

1. loaded with PIL (converted to RGB) and resized to ``condition_size`` (config ``model.condition_size``): None, the
   pipeline's default (``_auto_resize=True``), takes the preferred Kontext resolution (about 1024x1024 pixels)
   whose aspect ratio is closest to the image's; an int or ``(height, width)`` resizes every image to that size
   (multiples of 16), which bounds the context tokens (a 1024x1024 image adds 4096 tokens to every forward);
2. scaled to [-1, 1] by the pipeline's image processor, VAE-encoded deterministically (the mode of the latent
   distribution, the pipeline's ``sample_mode="argmax"``), shifted and scaled ``(z - shift_factor) *
   scaling_factor`` and packed.

The packed condition latents are stored in the conditioning (``image_latents [B, M, 4C]``, zero-padded to the
policy's maximum of ``M`` context tokens so that batches concatenate; ``image_grid [B, 2]``: the packed rows and
columns of each row's condition image, ``0 0`` for none). A trajectory keeps its conditioning, so rollout and every
training step see the same context. The forward runs the rows of each condition size together (one transformer
call when all images share a size, as with a fixed ``condition_size`` or same-aspect images).

A prompt without a condition image is generated from its text alone, as ``FluxKontextPipeline`` does with
``image=None`` (no context tokens). The generated image has the policy's ``height x width`` (the pipeline would
rescale a requested size to ``max_area`` = 1024x1024 pixels keeping its aspect ratio; give the size you want).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from genalign.policy import Cond

from .flux import FluxPolicy, pack_latents

IMAGE_KEYS = ("image_latents", "image_grid")
"""Conditioning keys of the condition images (besides the text embeddings)."""


def preferred_resolutions() -> List[Tuple[int, int]]:
    """The ``(width, height)`` pixel sizes Kontext was trained at (diffusers' ``PREFERRED_KONTEXT_RESOLUTIONS``)."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import (
        PREFERRED_KONTEXT_RESOLUTIONS,
    )

    return [tuple(r) for r in PREFERRED_KONTEXT_RESOLUTIONS]


class FluxKontextPolicy(FluxPolicy):
    """Adapter for ``FluxKontextPipeline`` (kind ``"flow"``): :class:`FluxPolicy` plus one condition image per
    prompt (see the module docstring).

    Conditioning keys: those of :class:`FluxPolicy` plus ``image_latents [B, M, 4C]`` (model-input latents of the
    condition images, packed, zero-padded) and ``image_grid [B, 2]`` (int64: packed rows, columns; 0 0 = no image).
    ``condition_size``: None (preferred Kontext resolution per image) or ``(height, width)`` pixels.
    """

    pipeline_class_name = "FluxKontextPipeline"
    pipeline_classes = ("FluxKontextPipeline",)
    accepts_condition_images = True
    max_condition_images = 1
    condition_size: Optional[Tuple[int, int]] = None

    def __init__(self, pipe, guidance_scale: Optional[float] = None, device=None, dtype: Optional[torch.dtype] = None,
                 height: Optional[int] = None, width: Optional[int] = None, true_cfg_scale: float = 1.0,
                 condition_size: Union[None, int, Sequence[int]] = None, **options):
        """``condition_size`` (``model.condition_size``): None keeps the class default (the pipeline's preferred
        resolutions); ``options``: those of :class:`FluxPolicy`."""
        super().__init__(pipe, guidance_scale=guidance_scale, device=device, dtype=dtype, height=height, width=width,
                         true_cfg_scale=true_cfg_scale, **options)
        if condition_size is not None:
            self.condition_size = self._check_size(condition_size)

    # ---------------------------------------------------------------- condition sizes
    @property
    def _multiple(self) -> int:
        """Pixel multiple of condition images: the VAE factor times the 2x2 packing."""
        return self.vae_scale_factor * 2

    def _check_size(self, size: Union[str, int, Sequence[int]]) -> Optional[Tuple[int, int]]:
        """``'preferred'`` -> None; an int (square) or ``(height, width)``, multiples of 16 -> ``(height, width)``."""
        if isinstance(size, str) and size == "preferred":
            return None
        hw = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(v) for v in size)
        if len(hw) != 2 or min(hw) < self._multiple or any(v % self._multiple for v in hw):
            raise ValueError(f"{type(self).__name__}: condition_size must be an int or [height, width], positive "
                             f"multiples of {self._multiple} pixels (VAE factor x 2x2 packing), got {size!r}")
        return hw

    def condition_pixel_size(self, image) -> Tuple[int, int]:
        """``(height, width)`` a PIL condition image is resized to: :attr:`condition_size`, else (the pipeline's
        ``_auto_resize``) the preferred Kontext resolution closest to the image's aspect ratio (the image's own
        size floored to multiples of 16 first, as the pipeline's image processor does)."""
        if self.condition_size is not None:
            return tuple(self.condition_size)
        height, width = self.pipe.image_processor.get_default_height_width(image)
        aspect = width / height
        _, width, height = min((abs(aspect - w / h), w, h) for w, h in preferred_resolutions())
        m = self._multiple
        return height // m * m, width // m * m

    @property
    def max_condition_tokens(self) -> int:
        """``M``: the context tokens of the largest condition image this policy makes (``image_latents`` is padded
        to it, so the conditionings of all batches concatenate)."""
        m = self._multiple
        sizes = [tuple(self.condition_size)] if self.condition_size is not None else \
            [(h // m * m, w // m * m) for w, h in preferred_resolutions()]
        return max((h // m) * (w // m) for h, w in sizes)

    # ---------------------------------------------------------------- condition images -> latents
    def _load_image(self, image, where: str):
        from PIL import Image

        if isinstance(image, Image.Image):
            return image.convert("RGB")
        if not isinstance(image, (str, os.PathLike)):
            raise ValueError(f"{type(self).__name__}: {where}: a condition image must be a path or a PIL image, got "
                             f"{type(image).__name__}")
        try:
            with Image.open(image) as img:
                return img.convert("RGB")
        except OSError as exc:
            raise ValueError(f"{type(self).__name__}: {where}: cannot read condition image {str(image)!r} "
                             f"({exc})") from None

    @torch.no_grad()
    def _image_latents(self, image, where: str) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """One condition image -> packed latents ``[(h/16)*(w/16), 4C]`` (on the device, VAE dtype) and their grid
        ``(h/16, w/16)``. With ``cache_prompt_embeds``, a path's latents are computed once (kept on the CPU)."""
        from diffusers.pipelines.flux.pipeline_flux_kontext import retrieve_latents

        cacheable = self.cache_prompt_embeds and isinstance(image, (str, os.PathLike))
        cache = self.__dict__.setdefault("_image_cache", {})
        key = (os.path.abspath(image), self.condition_size) if cacheable else None
        if key is not None and key in cache:
            packed, grid = cache[key]
            return packed.to(self.device), grid
        pil = self._load_image(image, where)
        height, width = self.condition_pixel_size(pil)
        processor, vae = self.pipe.image_processor, self.pipe.vae
        pixels = processor.preprocess(processor.resize(pil, height, width), height, width)
        latents = retrieve_latents(vae.encode(pixels.to(self.device, vae.dtype)), sample_mode="argmax")
        shift = vae.config.get("shift_factor", None) or 0.0
        latents = (latents - shift) * vae.config.scaling_factor
        packed, grid = pack_latents(latents)[0], (latents.shape[2] // 2, latents.shape[3] // 2)
        if key is not None:
            cache[key] = (packed.detach().to("cpu"), grid)
        return packed, grid

    def encode_condition_images(self, images: Sequence, prompts: Optional[Sequence[str]] = None) -> Cond:
        """``image_latents [B, M, 4C]`` and ``image_grid [B, 2]`` for one condition image (path or PIL image) or
        None per row (for conditionings built with :meth:`cond_from_embeds`; :meth:`encode` calls it)."""
        total = self.max_condition_tokens
        channels = 4 * self.latent_channels
        rows, grids = [], []
        for i, image in enumerate(images):
            if image is None:
                rows.append(None)
                grids.append((0, 0))
                continue
            where = f"prompt {i}" + (f" ({prompts[i]!r})" if prompts is not None else "")
            packed, grid = self._image_latents(image, where)
            if packed.shape[0] != grid[0] * grid[1] or packed.shape[0] > total:
                raise ValueError(f"{type(self).__name__}: {where}: condition image gave {packed.shape[0]} tokens, "
                                 f"expected {grid[0]}x{grid[1]} (at most {total})")
            rows.append(packed)
            grids.append(grid)
        dtype = next((r.dtype for r in rows if r is not None), self.pipe.vae.dtype)
        latents = torch.zeros(len(rows), total, channels, device=self.device, dtype=dtype)
        for i, row in enumerate(rows):
            if row is not None:
                latents[i, :row.shape[0]] = row.to(self.device, dtype)
        return {"image_latents": latents, "image_grid": torch.tensor(grids, dtype=torch.long, device=self.device)}

    def _condition_image_cond(self, prompts: List[str], rows: List[dict]) -> Cond:
        return self.encode_condition_images([(row.get("images") or [None])[0] for row in rows], prompts)

    # ---------------------------------------------------------------- forward
    def _model_embeds(self, cond: Cond, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
        """The text embeddings of :class:`FluxPolicy` plus the condition latents and grids (``[negative; positive]``
        with true CFG: both halves see the same context, as in the pipeline)."""
        embeds = super()._model_embeds(cond, dtype)
        if "image_grid" not in cond:  # built by cond_from_embeds without images: text-to-image
            return embeds
        latents, grid = cond["image_latents"].to(self.device, dtype), cond["image_grid"].to(self.device)
        if self.uses_cfg:
            latents, grid = torch.cat([latents, latents]), torch.cat([grid, grid])
        return {**embeds, "image_latents": latents, "image_grid": grid}

    def _condition_ids(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """RoPE ids ``[rows*cols, 3]`` of packed condition tokens: (1, row, column) (the noisy tokens' first
        coordinate is 0)."""
        from diffusers import FluxPipeline

        key = (rows, cols, dtype, self.device)
        cache = self.__dict__.setdefault("_condition_ids_cache", {})
        if key not in cache:
            ids = FluxPipeline._prepare_latent_image_ids(None, rows, cols, self.device, dtype)
            ids[..., 0] = 1
            cache[key] = ids
        return cache[key]

    def _transformer(self, x: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor, pooled: torch.Tensor,
                     context: Optional[torch.Tensor], grid: Tuple[int, int]) -> torch.Tensor:
        """One transformer call on noisy tokens ``x [n, N, 4C]`` and context tokens ``context [n, M', 4C]`` (None:
        none); returns the output at the noisy tokens ``[n, N, 4C]``."""
        img_ids, txt_ids = self._ids(prompt_embeds.shape[1], x.dtype)
        hidden = x
        if context is not None:
            hidden = torch.cat([x, context], dim=1)  # the pipeline's order: noisy tokens, then context tokens
            img_ids = torch.cat([img_ids, self._condition_ids(*grid, x.dtype)], dim=0)
        guidance = None
        if self.denoiser().config.guidance_embeds:
            guidance = torch.full((x.shape[0],), self.guidance_scale, device=x.device, dtype=torch.float32)
        out = self.denoiser()(
            hidden_states=hidden, timestep=t.to(x.dtype) / 1000, guidance=guidance, pooled_projections=pooled,
            encoder_hidden_states=prompt_embeds, txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
        )[0]
        return out[:, :x.shape[1]]

    def _forward(self, x: torch.Tensor, t: torch.Tensor, embeds: Dict[str, torch.Tensor]) -> torch.Tensor:
        pe, pooled = embeds["prompt_embeds"], embeds["pooled_prompt_embeds"]
        grid = embeds.get("image_grid")
        if grid is None:
            return self._transformer(x, t, pe, pooled, None, (0, 0))
        sizes = torch.unique(grid, dim=0).tolist()  # one transformer call per condition size
        if len(sizes) == 1:
            (rows, cols), = sizes
            context = embeds["image_latents"][:, :rows * cols] if rows * cols else None
            return self._transformer(x, t, pe, pooled, context, (rows, cols))
        outs, order = [], []
        for rows, cols in sizes:
            idx = (grid == grid.new_tensor([rows, cols])).all(dim=1).nonzero()[:, 0]
            context = embeds["image_latents"][idx, :rows * cols] if rows * cols else None
            outs.append(self._transformer(x[idx], t[idx], pe[idx], pooled[idx], context, (rows, cols)))
            order.append(idx)
        return torch.cat(outs)[torch.argsort(torch.cat(order))]
