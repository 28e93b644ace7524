"""Qwen-Image (``QwenImagePipeline``) as a flow-matching :class:`~genalign.policy.Policy`.

Qwen-Image (Wu et al. 2025, "Qwen-Image Technical Report", arXiv 2508.02324) is an MMDiT whose text condition is
the last hidden state of a Qwen2.5-VL language model, and whose VAE is a video-style autoencoder with per-channel
latent normalisation.

Latents are PACKED like diffusers does: the VAE latents ``[B, C, 1, h, w]`` (h = H/8, C = 16) lose their frame axis
and are cut into 2x2 patches -> ``[B, (h/2)*(w/2), 4C]`` (``(B, (H/16)*(W/16), 64)``); height and width must be
multiples of 16 px (the VAE factor times the patch size). :meth:`QwenImagePolicy.decode` de-normalises with the
VAE's ``latents_mean`` / ``latents_std`` (it has no ``scaling_factor``) and decodes the single frame.

Conditioning keys: ``prompt_embeds [B, L, D]`` and ``prompt_embeds_mask [B, L]`` (int64, 1 = prompt token,
0 = padding), both padded to the fixed length L = :attr:`QwenImagePolicy.max_sequence_length` (512, the pipeline's
default truncation). Prompts have different token counts; a fixed length lets the rollout store, index and
concatenate conditionings of any prompts, and makes a sample's forward independent of the other prompts in its
batch. The transformer masks the padding out of its joint attention, so the velocity is the one of the unpadded
prompt. ``negative_*`` of both when true CFG is on.

The transformer gets ``timestep / 1000`` (= sigma), the mask, and ``img_shapes`` (one frame of ``h/2 x w/2``
patches, for its 3-D rotary embedding); ``guidance_scale`` is the guidance-embedding value of guidance-distilled
transformers only (Qwen-Image is not one: its default 1.0 means "none"). No CFG by default; ``true_cfg_scale > 1``
enables true classifier-free guidance with the negative prompt :attr:`QwenImagePolicy.negative_prompt` (batched
``[negative; positive]``, two times the compute), combined as the pipeline does, with the guided velocity rescaled
per token to the norm of the conditional one. Schedule: ``linspace(1, 1/N, N)`` with the scheduler's
resolution-dependent shift (``mu`` from the packed token count), then 0. Default LoRA targets: the joint attention's
image and text projections and both streams' MLPs (:data:`QWEN_IMAGE_LORA_TARGETS`).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ._base import DiffusersPolicy, PackedLatents, flow_schedule, latent_channel_stats
from .sd3 import SD3_LORA_TARGETS

QWEN_IMAGE_LORA_TARGETS = SD3_LORA_TARGETS + ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
                                              "txt_mlp.net.2")
"""Joint attention (image and text projections) and both streams' MLPs of every block."""

QWEN_IMAGE_MAX_SEQUENCE_LENGTH = 1024  # the pipeline's tokenizer budget (``tokenizer_max_length``)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` or ``[B, C, 1, h, w]`` -> ``[B, (h/2)*(w/2), 4C]`` (2x2 patches, the pipeline's layout)."""
    from diffusers import QwenImagePipeline

    if latents.ndim == 5:
        if latents.shape[2] != 1:
            raise ValueError(f"Qwen-Image latents have one frame, got {tuple(latents.shape)}")
        latents = latents[:, :, 0]
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack, got {h}x{w}")
    return QwenImagePipeline._pack_latents(latents, b, c, h, w)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for LATENT size ``h x w``: ``[B, (h/2)*(w/2), 4C]`` -> ``[B, C, 1, h, w]``
    (the VAE's video layout, one frame)."""
    from diffusers import QwenImagePipeline

    _, n, ch = packed.shape
    if n != (height // 2) * (width // 2) or ch % 4:
        raise ValueError(f"packed latents {tuple(packed.shape)} do not fit a {height}x{width} latent grid")
    # diffusers' helper takes pixel sizes and a VAE factor; factor 1 means "these are latent sizes"
    return QwenImagePipeline._unpack_latents(packed, height, width, 1)


def pad_prompt_embeds(prompt_embeds: torch.Tensor, mask: Optional[torch.Tensor], length: int
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Truncate (as the pipeline's ``max_sequence_length`` does) or zero-pad ``prompt_embeds [B, L, D]`` and its mask
    ``[B, L]`` (None: every token valid) to ``length`` tokens; the mask comes back int64 with 0 on the padding."""
    if prompt_embeds.ndim != 3:
        raise ValueError(f"prompt_embeds must be [B, L, D], got {tuple(prompt_embeds.shape)}")
    b, n, _ = prompt_embeds.shape
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.long, device=prompt_embeds.device)
    if tuple(mask.shape) != (b, n):
        raise ValueError(f"prompt_embeds_mask has shape {tuple(mask.shape)}, prompt_embeds {tuple(prompt_embeds.shape)}")
    mask = mask.to(device=prompt_embeds.device, dtype=torch.long)
    if n >= length:
        return prompt_embeds[:, :length], mask[:, :length]
    return (torch.nn.functional.pad(prompt_embeds, (0, 0, 0, length - n)),
            torch.nn.functional.pad(mask, (0, length - n)))


class QwenImagePolicy(PackedLatents, DiffusersPolicy):
    """Adapter for ``QwenImagePipeline`` (kind ``"flow"``).

    Conditioning keys: ``prompt_embeds [B, L, D]`` (Qwen2.5-VL last hidden states, the chat-template prefix
    dropped) and ``prompt_embeds_mask [B, L]``, padded to L = :attr:`max_sequence_length`; ``negative_*`` too when
    ``true_cfg_scale > 1``. ``guidance_scale``: guidance-embedding value, only for transformers with
    ``guidance_embeds`` (a value other than 1 is refused otherwise: CFG is ``true_cfg_scale``).
    """

    kind = "flow"
    default_guidance_scale = 1.0
    default_lora_targets = QWEN_IMAGE_LORA_TARGETS
    denoiser_name = "transformer"
    pipeline_class_name = "QwenImagePipeline"
    pipeline_classes = ("QwenImagePipeline",)
    resolution_multiple_extra = 2  # 2x2 patches
    text_encoder_names = ("text_encoder",)
    cond_keys = ("prompt_embeds", "prompt_embeds_mask")
    cfg_scale_name = "true_cfg_scale"
    pack = staticmethod(pack_latents)
    unpack = staticmethod(unpack_latents)
    max_sequence_length = 512
    """Prompt tokens kept (the pipeline's default truncation) and the fixed padded length of the conditioning.
    Every padded token costs transformer compute (masked, it changes nothing else): lower it for short prompts."""
    negative_prompt = ""
    """The negative prompt of true CFG (``true_cfg_scale > 1``)."""

    def __init__(self, pipe, guidance_scale: Optional[float] = None, device=None, dtype: Optional[torch.dtype] = None,
                 height: Optional[int] = None, width: Optional[int] = None, true_cfg_scale: float = 1.0,
                 max_sequence_length: Optional[int] = None, negative_prompt: Optional[str] = None, **options):
        """``true_cfg_scale`` (> 1: true CFG), ``max_sequence_length`` and ``negative_prompt``: see the class
        attributes; ``options``: ``offload_text_encoders`` / ``cache_prompt_embeds`` of
        :class:`~genalign.pipelines._base.DiffusersPolicy`."""
        if guidance_scale is not None and float(guidance_scale) != 1.0 and not pipe.transformer.config.guidance_embeds:
            raise ValueError(
                f"{type(self).__name__}: guidance_scale={guidance_scale} is the guidance-embedding value of "
                f"guidance-distilled transformers, and this {type(pipe.transformer).__name__} has none "
                f"(guidance_embeds=False); classifier-free guidance is true_cfg_scale (with a negative prompt)")
        self._set_options(true_cfg_scale, max_sequence_length, negative_prompt)
        super().__init__(pipe, guidance_scale=guidance_scale, device=device, dtype=dtype, height=height, width=width,
                         **options)

    def _set_options(self, true_cfg_scale: Optional[float], max_sequence_length: Optional[int],
                     negative_prompt: Optional[str]) -> None:
        if true_cfg_scale is not None:
            self.true_cfg_scale = float(true_cfg_scale)
        if max_sequence_length is not None:
            if not 1 <= int(max_sequence_length) <= QWEN_IMAGE_MAX_SEQUENCE_LENGTH:
                raise ValueError(f"max_sequence_length must be in [1, {QWEN_IMAGE_MAX_SEQUENCE_LENGTH}], "
                                 f"got {max_sequence_length}")
            self.max_sequence_length = int(max_sequence_length)
        if negative_prompt is not None:
            self.negative_prompt = str(negative_prompt)
        self._negative_cache = None  # encoded with the previous options
        self.__dict__.pop("_prompt_cache", None)

    # ---------------------------------------------------------------- latents (packed: PackedLatents)
    def _img_shapes(self, batch: int) -> List[List[Tuple[int, int, int]]]:
        """The transformer's ``img_shapes``: per sample, one frame of ``(1, h/2, w/2)`` patches."""
        h, w = self.latent_size
        return [[(1, h // 2, w // 2)]] * batch

    # ---------------------------------------------------------------- conditioning
    def cond_from_embeds(self, prompt_embeds: torch.Tensor, prompt_embeds_mask: Optional[torch.Tensor] = None,
                         negative_prompt_embeds: Optional[torch.Tensor] = None,
                         negative_prompt_embeds_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Conditioning dict from given embeddings (for pipelines without a text encoder).

        prompt_embeds ``[B, L, D]`` with ``prompt_embeds_mask [B, L]`` (1 = token, 0 = padding; None: all tokens
        valid), truncated or zero-padded to :attr:`max_sequence_length`. With true CFG the negative embeddings are
        required (their mask is optional); a negative of batch 1 is repeated to B.
        """
        if self.uses_cfg and negative_prompt_embeds is None:
            raise ValueError(f"{type(self).__name__} conditioning needs ['negative_prompt_embeds'] (true CFG is on: "
                             f"true_cfg_scale {self.cfg_scale} > 1)")
        batch = prompt_embeds.shape[0]
        pe, mask = pad_prompt_embeds(prompt_embeds, prompt_embeds_mask, self.max_sequence_length)
        cond = {"prompt_embeds": pe, "prompt_embeds_mask": mask}
        if self.uses_cfg:
            npe, nmask = pad_prompt_embeds(negative_prompt_embeds, negative_prompt_embeds_mask,
                                           self.max_sequence_length)
            if npe.shape[0] == 1 and batch > 1:
                npe, nmask = npe.expand(batch, *npe.shape[1:]), nmask.expand(batch, -1)
            if npe.shape[0] != batch:
                raise ValueError(f"negative_prompt_embeds has batch {npe.shape[0]}, prompt_embeds has {batch}")
            cond.update(negative_prompt_embeds=npe, negative_prompt_embeds_mask=nmask)
        return {k: v.to(self.device).contiguous() for k, v in cond.items()}

    def _encode_padded(self, prompts: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        embeds, mask = self.pipe.encode_prompt(prompt=prompts, device=self.device,
                                               max_sequence_length=self.max_sequence_length)
        return pad_prompt_embeds(embeds, mask, self.max_sequence_length)

    def _encode(self, prompts: List[str], negative: bool = True) -> Dict[str, Optional[torch.Tensor]]:
        """The pipeline's ``encode_prompt`` (chat template, Qwen2.5-VL last hidden states of the prompt tokens),
        padded to :attr:`max_sequence_length`; with true CFG and ``negative``, the same for :attr:`negative_prompt`."""
        self._require_text_encoders("text_encoder", "tokenizer")
        out = dict(zip(("prompt_embeds", "prompt_embeds_mask"), self._encode_padded(prompts)))
        if self.uses_cfg and negative:
            out.update(zip(("negative_prompt_embeds", "negative_prompt_embeds_mask"),
                           self._encode_padded([self.negative_prompt] * len(prompts))))
        return out

    # ---------------------------------------------------------------- schedule / forward
    def schedule(self, num_steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``linspace(1, 1/N, N)`` shifted by the dynamic ``mu`` of the image's token count, then 0 appended
        (with the scheduler's ``shift_terminal`` when configured)."""
        sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)
        timesteps, sigmas = flow_schedule(self.pipe.scheduler, num_steps, self.latent_shape[0], self.device,
                                          sigmas=sigmas)
        if not torch.isfinite(sigmas).all():  # shift_terminal stretches [1.0] by 0 / 0 for a single step
            raise ValueError(f"the scheduler gives non-finite sigmas for {num_steps} step(s): {sigmas.tolist()} "
                             f"(shift_terminal={self.pipe.scheduler.config.get('shift_terminal')} needs >= 2 steps)")
        return timesteps, sigmas

    def _forward(self, x: torch.Tensor, t: torch.Tensor, embeds: Dict[str, torch.Tensor]) -> torch.Tensor:
        """One transformer call with the arguments ``QwenImagePipeline.__call__`` passes at a denoising step (with
        true CFG ``x`` is the ``[negative; positive]`` batch, combined by :meth:`_guide`)."""
        transformer = self.denoiser()
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((x.shape[0],), self.guidance_scale, device=x.device, dtype=torch.float32)
        out = transformer(
            hidden_states=x, timestep=t.to(x.dtype) / 1000, guidance=guidance,
            encoder_hidden_states_mask=embeds["prompt_embeds_mask"], encoder_hidden_states=embeds["prompt_embeds"],
            img_shapes=self._img_shapes(x.shape[0]), return_dict=False,
        )[0]
        return out

    def _guide(self, output: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The pipeline's true CFG: ``g = neg + s (pos - neg)`` rescaled per token to the norm of ``pos``."""
        neg, pos = output.chunk(2)
        guided = neg + self.true_cfg_scale * (pos - neg)
        return guided * (torch.norm(pos, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True))

    # ---------------------------------------------------------------- VAE
    def _vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        """The mode of the VAE's latent distribution of the one-frame video, normalised as the diffusers Qwen-Image
        image-to-image pipeline does (``(z - latents_mean) / latents_std``), which :meth:`_vae_decode` undoes."""
        vae = self.pipe.vae
        video = (images * 2 - 1).to(self.device, vae.dtype)[:, :, None]  # [B, 3, 1, H, W]
        z = vae.encode(video).latent_dist.mode()
        mean, inv_std = latent_channel_stats(vae, z.device, z.dtype)
        return ((z - mean) * inv_std).to(torch.float32)

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """As the pipeline decodes: unpacked to ``[B, C, 1, h, w]``, the per-channel normalisation undone
        (``z * latents_std + latents_mean``), decoded, the single frame kept."""
        vae = self.pipe.vae
        z = self._vae_latents(latents).to(self.device, vae.dtype)
        mean, inv_std = latent_channel_stats(vae, z.device, z.dtype)
        return vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0]
