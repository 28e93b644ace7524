"""Z-Image and Z-Image-Turbo (``ZImagePipeline``) as a flow-matching :class:`~genalign.policy.Policy`.

Z-Image is a 6B single-stream diffusion transformer (S3-DiT) with a Qwen3 text encoder and the FLUX VAE (Z-Image
Team 2025, "Z-Image: An Efficient Image Generation Foundation Model with Single-Stream Diffusion Transformer",
arXiv 2511.22699); Z-Image-Turbo is its few-step distilled variant with the same architecture and pipeline.

Latents ``[B, C, H/8, W/8]`` (C = 16), unpacked, as the pipeline keeps them; the transformer takes a LIST of
per-sample ``[C, 1, H/8, W/8]`` latents and patchifies them 2x2 itself. Its time input is ``1 - sigma``
(``(1000 - timestep) / 1000``) and its output is the NEGATED velocity: :meth:`ZImagePolicy._forward` feeds the
model time and negates the output, so :meth:`predict` returns the velocity ``v`` of genalign's Euler step
``x_{s'} = x_s + (s' - s) v`` (sigma from 1 to 0, as for SD3 / Flux; docs/algorithms.md §1.1).

Conditioning keys: the Qwen3 hidden states of the chat-templated prompt (second-to-last layer, its real tokens
only) are variable-length per prompt; they are stored zero-padded to ``max_sequence_length`` (512, the
pipeline's default) as ``prompt_embeds [B, L, D]`` with ``prompt_embeds_mask [B, L]`` (bool, True = token), so
that rollouts from different batches concatenate; :meth:`ZImagePolicy._forward` rebuilds the per-sample list the
transformer expects. With CFG, ``negative_prompt_embeds`` / ``negative_prompt_embeds_mask`` hold the empty
prompt's (batched ``[negative; positive]`` by the base class).

Guidance follows the pipeline's own convention ``v = v_pos + g (v_pos - v_neg)`` (standard CFG of scale
``g + 1``): ``guidance_scale`` 5.0 by default (the pipeline's default, for the base Z-Image model); any
``g > 0`` runs CFG and ``g = 0`` disables it. Z-Image-Turbo is distilled without CFG: use
``guidance_scale=0`` (``model.guidance_scale: 0``) and about 8 steps; unlike SD3, ``guidance_scale=1`` does
NOT disable CFG here (it is standard CFG of scale 2). The pipeline's ``cfg_normalization`` and
``cfg_truncation`` options are supported (off by default, as in the pipeline).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from genalign.policy import Cond, conditioning_rows

from ._base import DiffusersPolicy, flow_schedule

Z_IMAGE_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
EmbedsArg = Union[torch.Tensor, Sequence[torch.Tensor]]


def pad_embeds(embeds: Sequence[torch.Tensor], length: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample embeddings ``[L_i, D]`` -> zero-padded ``[B, length, D]`` and mask ``[B, length]`` (bool, the
    first ``L_i`` positions True)."""
    first = embeds[0]
    out = first.new_zeros(len(embeds), length, first.shape[-1])
    mask = torch.zeros(len(embeds), length, dtype=torch.bool, device=first.device)
    for i, e in enumerate(embeds):
        out[i, :e.shape[0]] = e
        mask[i, :e.shape[0]] = True
    return out, mask


def unpad_embeds(embeds: torch.Tensor, mask: torch.Tensor) -> List[torch.Tensor]:
    """Inverse of :func:`pad_embeds`: the tokens of ``embeds [B, L, D]`` where ``mask [B, L]`` is nonzero, per
    sample (any mask layout; left-aligned masks come from :func:`pad_embeds`)."""
    keep = mask != 0
    return [e[m] for e, m in zip(embeds, keep)]


class ZImagePolicy(DiffusersPolicy):
    """Adapter for ``ZImagePipeline`` (Z-Image, Z-Image-Turbo; kind ``"flow"``).

    Conditioning keys: ``prompt_embeds [B, L, D]`` and ``prompt_embeds_mask [B, L]`` (L =
    ``max_sequence_length``), plus ``negative_prompt_embeds`` / ``negative_prompt_embeds_mask`` (empty prompt)
    when ``guidance_scale > 0``. ``guidance_scale`` uses the pipeline's convention (see the module docstring):
    0 for Z-Image-Turbo. ``cfg_normalization`` (> 0: cap the guided prediction's norm at that multiple of the
    positive one's, per sample) and ``cfg_truncation`` (< 1: no guidance where ``1 - sigma`` exceeds it) are
    the pipeline's options of the same names.
    """

    kind = "flow"
    default_guidance_scale = 5.0
    default_lora_targets = Z_IMAGE_LORA_TARGETS
    denoiser_name = "transformer"
    pipeline_class_name = "ZImagePipeline"
    pipeline_classes = ("ZImagePipeline",)
    text_encoder_names = ("text_encoder",)
    cond_keys = ("prompt_embeds", "prompt_embeds_mask")
    max_sequence_length = 512
    default_resolution = 1024

    def __init__(self, pipe, guidance_scale: Optional[float] = None, device=None, dtype: Optional[torch.dtype] = None,
                 height: Optional[int] = None, width: Optional[int] = None, cfg_normalization: float = 0.0,
                 cfg_truncation: float = 1.0, max_sequence_length: Optional[int] = None, **options):
        """``cfg_normalization`` / ``cfg_truncation``: the pipeline's CFG options (defaults: off);
        ``max_sequence_length``: text token budget and the padded length of the stored embeddings (512);
        ``options``: ``offload_text_encoders`` / ``cache_prompt_embeds`` of
        :class:`~genalign.pipelines._base.DiffusersPolicy`."""
        self.resolution_multiple_extra = int(pipe.transformer.config.all_patch_size[0])
        self.cfg_normalization = float(cfg_normalization)
        self.cfg_truncation = float(cfg_truncation)
        if max_sequence_length is not None:
            self.max_sequence_length = int(max_sequence_length)
        super().__init__(pipe, guidance_scale=guidance_scale, device=device, dtype=dtype, height=height, width=width,
                         **options)

    def _default_resolution(self) -> int:
        return self.default_resolution  # the pipeline's default (1024 px); the transformer has no sample_size

    # ---------------------------------------------------------------- guidance
    @property
    def cfg_scale(self) -> float:
        """Standard CFG scale ``g + 1`` of the pipeline's ``v_pos + g (v_pos - v_neg)`` (1 = off when g <= 0)."""
        return 1.0 + self.guidance_scale if self.guidance_scale > 0 else 1.0

    @property
    def _cfg_options_active(self) -> bool:
        return self.cfg_normalization > 0 or self.cfg_truncation < 1

    # ---------------------------------------------------------------- conditioning
    def check_conditioning(self, prompts: List[str], conditioning: Optional[List[Optional[dict]]]) -> List[dict]:
        """:meth:`DiffusersPolicy.check_conditioning`, with the guidance error in this adapter's convention (CFG
        is on for ``guidance_scale > 0``, not > 1)."""
        if not self.uses_cfg:
            for i, row in enumerate(conditioning_rows(prompts, conditioning, type(self).__name__)):
                if row.get("negative_prompt"):
                    raise ValueError(f"{type(self).__name__}: prompt {i} ({prompts[i]!r}) has negative_prompt "
                                     f"{row['negative_prompt']!r}, but classifier-free guidance is off (guidance_scale "
                                     f"= {self.guidance_scale:g}; Z-Image's convention: > 0 turns it on), so the "
                                     f"negative prompt would be ignored; set guidance_scale > 0 or remove it")
        return super().check_conditioning(prompts, conditioning)

    def _embed_list(self, embeds: EmbedsArg, mask: Optional[torch.Tensor], name: str) -> List[torch.Tensor]:
        """Per-sample ``[L_i, D]`` token embeddings from a list or from ``[B, L, D]`` (+ optional mask)."""
        if isinstance(embeds, torch.Tensor):
            if embeds.ndim != 3:
                raise ValueError(f"{name} must be [B, L, D] or a list of [L_i, D] tensors, got {tuple(embeds.shape)}")
            if mask is None:
                items = list(embeds.unbind(0))
            else:
                if tuple(mask.shape) != tuple(embeds.shape[:2]):
                    raise ValueError(f"{name}_mask has shape {tuple(mask.shape)}, {name} has {tuple(embeds.shape)}")
                items = unpad_embeds(embeds, mask.to(embeds.device))
        else:
            items = list(embeds)
            if mask is not None:
                raise ValueError(f"{name} is a list of per-sample embeddings: it takes no mask")
        dim = int(self.denoiser().config.cap_feat_dim)
        for i, e in enumerate(items):
            if e.ndim != 2 or e.shape[-1] != dim:
                raise ValueError(f"{name}[{i}] must be [L, {dim}] (cap_feat_dim {dim}), got {tuple(e.shape)}")
            if not 0 < e.shape[0] <= self.max_sequence_length:
                raise ValueError(f"{name}[{i}] has {e.shape[0]} tokens; 1..max_sequence_length "
                                 f"({self.max_sequence_length}) are supported")
        return items

    def cond_from_embeds(self, prompt_embeds: EmbedsArg, prompt_embeds_mask: Optional[torch.Tensor] = None,
                         negative_prompt_embeds: Optional[EmbedsArg] = None,
                         negative_prompt_embeds_mask: Optional[torch.Tensor] = None) -> Cond:
        """Conditioning dict from given embeddings (for pipelines without a text encoder).

        ``prompt_embeds``: the pipeline's list of per-sample ``[L_i, D]`` tensors, or ``[B, L, D]`` with an
        optional ``prompt_embeds_mask [B, L]`` (nonzero = token; None = every position). The same for the
        negative, required with CFG (``guidance_scale > 0``); a negative of batch 1 is repeated to B. Stored
        zero-padded to ``max_sequence_length`` with a bool mask; tensors keep their dtype (``predict`` casts).
        """
        pos = self._embed_list(prompt_embeds, prompt_embeds_mask, "prompt_embeds")
        parts = {"": pos}
        if self.uses_cfg:
            if negative_prompt_embeds is None:
                raise ValueError(f"{type(self).__name__} conditioning needs ['negative_prompt_embeds'] (CFG is on: "
                                 f"guidance {self.guidance_scale} > 0; Z-Image-Turbo uses guidance_scale 0)")
            neg = self._embed_list(negative_prompt_embeds, negative_prompt_embeds_mask, "negative_prompt_embeds")
            if len(neg) == 1 and len(pos) > 1:
                neg = neg * len(pos)
            if len(neg) != len(pos):
                raise ValueError(f"negative_prompt_embeds has batch {len(neg)}, prompt_embeds has {len(pos)}")
            parts["negative_"] = neg
        cond = {}
        for prefix, items in parts.items():
            embeds, mask = pad_embeds(items, self.max_sequence_length)
            cond[prefix + "prompt_embeds"] = embeds.to(self.device)
            cond[prefix + "prompt_embeds_mask"] = mask.to(self.device)
        return cond

    def _encode(self, prompts: List[str], negative: bool = True) -> Dict[str, Optional[torch.Tensor]]:
        self._require_text_encoders("text_encoder", "tokenizer")
        with_negative = self.uses_cfg and negative
        # a copy: diffusers' _encode_prompt replaces the list's items by their chat-templated text
        pos, neg = self.pipe.encode_prompt(prompt=list(prompts), device=self.device,
                                           do_classifier_free_guidance=with_negative,
                                           max_sequence_length=self.max_sequence_length)
        out: Dict[str, Optional[torch.Tensor]] = dict(zip(self.cond_keys, pad_embeds(pos, self.max_sequence_length)))
        if with_negative:
            out.update(zip(["negative_" + k for k in self.cond_keys], pad_embeds(neg, self.max_sequence_length)))
        return out

    # ---------------------------------------------------------------- schedule / forward
    def schedule(self, num_steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The pipeline's sigmas ``linspace(1, 1/N, N)``, shifted by the scheduler (static ``shift``, 3.0 for
        Z-Image-Turbo, or the dynamic ``mu`` of the image's token count), then 0 appended."""
        _, h, w = self.latent_shape
        patch = self.resolution_multiple_extra
        sigmas = np.asarray(torch.linspace(1.0, 1.0 / num_steps, num_steps).tolist())  # float32 values, as diffusers
        return flow_schedule(self.pipe.scheduler, num_steps, (h // patch) * (w // patch), self.device, sigmas=sigmas,
                             max_shift_default=1.15)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, embeds: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Velocity (in ``x``'s dtype) for latents ``x [N, C, h, w]`` at genalign timesteps ``t = 1000 sigma``: the
        model gets the per-sample lists and time ``(1000 - t) / 1000``, and its output is negated."""
        caps = unpad_embeds(embeds["prompt_embeds"], embeds["prompt_embeds_mask"])
        model_t = (1000 - t.to(torch.float32)) / 1000
        out = self.denoiser()(list(x.unsqueeze(2).unbind(0)), model_t, caps, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def _guide(self, output: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The pipeline's guidance of the ``[negative; positive]`` velocities: plain CFG, or with ``cfg_truncation`` /
        ``cfg_normalization`` on, ``pos + g (pos - neg)`` with g = 0 late in sampling and the result's norm capped
        per sample."""
        if not self._cfg_options_active:
            return super()._guide(output, timesteps)
        neg, pos = output.chunk(2)
        t = timesteps
        shape = (pos.shape[0],) + (1,) * (pos.ndim - 1)
        scale = torch.full_like(t, self.guidance_scale)
        if self.cfg_truncation < 1:  # no guidance late in sampling (model time 1 - sigma above the threshold)
            scale = torch.where((1000 - t) / 1000 > self.cfg_truncation, torch.zeros_like(scale), scale)
        pred = pos + scale.reshape(shape) * (pos - neg)
        if self.cfg_normalization > 0:  # cap ||pred|| at cfg_normalization * ||pos||, per sample
            pos_norm = torch.linalg.vector_norm(pos.flatten(1), dim=1)
            new_norm = torch.linalg.vector_norm(pred.flatten(1), dim=1)
            max_norm = pos_norm * self.cfg_normalization
            factor = torch.where(new_norm > max_norm, max_norm / new_norm, torch.ones_like(new_norm))
            pred = pred * factor.reshape(shape)
        return pred
