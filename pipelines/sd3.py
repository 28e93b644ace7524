"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``) as a flow-matching :class:`~genalign.policy.Policy`.

Latents ``[B, C, H/8, W/8]``; the transformer predicts the velocity at ``timestep = 1000 * sigma``;
classifier-free guidance (default 4.5, Flow-GRPO) with the empty prompt as negative, batched as
``[negative; positive]``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ._base import DiffusersPolicy, flow_schedule

SD3_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class SD3Policy(DiffusersPolicy):
    """Adapter for ``StableDiffusion3Pipeline`` (kind ``"flow"``).

    Conditioning keys: ``prompt_embeds [B, L, D]``, ``pooled_prompt_embeds [B, P]`` and, when
    ``guidance_scale > 1``, ``negative_prompt_embeds`` / ``negative_pooled_prompt_embeds`` (empty prompt).
    ``max_sequence_length`` is the T5 token budget used by :meth:`encode` (the T5 part is zeros when the
    pipeline has no ``text_encoder_3``).
    """

    kind = "flow"
    default_guidance_scale = 4.5
    default_lora_targets = SD3_LORA_TARGETS
    denoiser_name = "transformer"
    pipeline_class_name = "StableDiffusion3Pipeline"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    max_sequence_length = 256

    def __init__(self, pipe, guidance_scale: Optional[float] = None, device=None, dtype: Optional[torch.dtype] = None,
                 height: Optional[int] = None, width: Optional[int] = None, drop_t5: bool = False, **options):
        """``drop_t5``: remove the pipeline's T5 encoder (see :meth:`_drop_t5_components`); ``options``:
        ``offload_text_encoders`` / ``cache_prompt_embeds`` of :class:`~genalign.pipelines._base.DiffusersPolicy`."""
        self.resolution_multiple_extra = int(pipe.transformer.config.patch_size)
        if drop_t5 and getattr(pipe, "text_encoder_3", None) is not None:
            pipe.register_modules(**self._drop_t5_components())
        super().__init__(pipe, guidance_scale=guidance_scale, device=device, dtype=dtype, height=height, width=width,
                         **options)

    @classmethod
    def _drop_t5_components(cls) -> Dict[str, None]:
        """``model.drop_t5``: run SD3 without its T5-XXL encoder (4.7 B parameters). diffusers'
        ``StableDiffusion3Pipeline.encode_prompt`` then fills the T5 part of ``prompt_embeds`` with zeros
        (``max_sequence_length`` tokens). SD3 was trained with each text encoder dropped independently (rate
        46.3%), so T5 can be removed at inference at little cost except for typography (Esser et al. 2024,
        "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", arXiv 2403.03206). Rollout and training see the same
        conditioning: the training steps reuse each rollout's encoded conditioning, and the zeros are
        deterministic. A LoRA trained this way should be sampled and evaluated with ``drop_t5`` as well."""
        return {"text_encoder_3": None, "tokenizer_3": None}

    def _encode(self, prompts: List[str], negative: bool = True) -> Dict[str, Optional[torch.Tensor]]:
        self._require_text_encoders("text_encoder", "text_encoder_2")
        pe, npe, ppe, nppe = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=self.uses_cfg and negative, max_sequence_length=self.max_sequence_length,
        )
        return dict(prompt_embeds=pe, pooled_prompt_embeds=ppe, negative_prompt_embeds=npe,
                    negative_pooled_prompt_embeds=nppe)

    def schedule(self, num_steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Scheduler sigmas (static ``shift`` from its config, 3.0 for SD3) -> ``(1000 * sigma [T], sigma [T+1])``."""
        _, h, w = self.latent_shape
        patch = self.resolution_multiple_extra
        return flow_schedule(self.pipe.scheduler, num_steps, (h // patch) * (w // patch), self.device,
                             max_shift_default=1.16)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, embeds: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.denoiser()(
            hidden_states=x, timestep=t, encoder_hidden_states=embeds["prompt_embeds"],
            pooled_projections=embeds["pooled_prompt_embeds"], return_dict=False,
        )[0]
