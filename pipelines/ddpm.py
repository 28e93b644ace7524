"""Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``) and SDXL (``StableDiffusionXLPipeline``) as
DDPM-family :class:`~genalign.policy.Policy` objects (kind ``"ddpm"``, DDPO-style DDIM eta steps).

The schedule is a DDIM timestep grid; its "sigmas" are ``sqrt(1 - alpha_bar)`` so that the rollout
recovers ``alpha_bar = 1 - sigma^2``. :meth:`DDPMPolicy.predict` returns the noise prediction epsilon
(``v_prediction`` models are converted).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ._base import DiffusersPolicy

SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction")


class DDPMPolicy(DiffusersPolicy):
    """Adapter for UNet pipelines: SD1.x/2.x (``prompt_embeds``) and SDXL (``text_time`` added conditioning).

    Conditioning keys: ``prompt_embeds [B, L, D]``; SDXL also ``pooled_prompt_embeds [B, P]`` (the UNet's
    ``text_embeds``); ``negative_*`` when ``guidance_scale > 1`` (empty prompt, or zeros for SDXL with
    ``force_zeros_for_empty_prompt``). SDXL ``time_ids`` are ``(H, W, 0, 0, H, W)`` from the policy resolution.
    """

    kind = "ddpm"
    default_guidance_scale = 7.5
    denoiser_name = "unet"
    pipeline_class_name = "DiffusionPipeline"
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")

    def __init__(self, pipe, guidance_scale: Optional[float] = None, device=None, dtype: Optional[torch.dtype] = None,
                 height: Optional[int] = None, width: Optional[int] = None):
        if getattr(pipe, "unet", None) is None:
            raise ValueError(f"{type(self).__name__} needs a UNet pipeline (StableDiffusionPipeline or "
                             f"StableDiffusionXLPipeline), got {type(pipe).__name__}")
        unet_config = pipe.unet.config
        self.is_sdxl = unet_config.get("addition_embed_type", None) == "text_time"
        self.cond_keys = ("prompt_embeds", "pooled_prompt_embeds") if self.is_sdxl else ("prompt_embeds",)
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in SUPPORTED_PREDICTION_TYPES:
            raise ValueError(f"{type(self).__name__} supports prediction types {list(SUPPORTED_PREDICTION_TYPES)}, "
                             f"the scheduler says {self.prediction_type!r}")
        super().__init__(pipe, guidance_scale=guidance_scale, device=device, dtype=dtype, height=height, width=width)
        self._alphas_cumprod = self._ddim_scheduler().alphas_cumprod.to(torch.float32)

    def _ddim_scheduler(self):
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.pipe.scheduler.config)

    def _encode(self, prompts: List[str], negative: bool = True) -> Dict[str, Optional[torch.Tensor]]:
        if self.is_sdxl:
            self._require_text_encoders("text_encoder_2")
            pe, npe, ppe, nppe = self.pipe.encode_prompt(
                prompt=prompts, device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=self.uses_cfg and negative)
            return dict(prompt_embeds=pe, pooled_prompt_embeds=ppe, negative_prompt_embeds=npe,
                        negative_pooled_prompt_embeds=nppe)
        self._require_text_encoders("text_encoder")
        pe, npe = self.pipe.encode_prompt(prompts, self.device, 1, self.uses_cfg and negative)
        return dict(prompt_embeds=pe, negative_prompt_embeds=npe)

    def schedule(self, num_steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """DDIM grid ``timesteps [T]`` (float32) and ``sigmas [T+1] = sqrt(1 - alpha_bar)``.

        The last sigma uses the DDIM final alpha (1 with ``set_alpha_to_one``, else ``alphas_cumprod[0]``).
        """
        sched = self._ddim_scheduler()
        sched.set_timesteps(num_steps, device="cpu")
        timesteps = sched.timesteps.to(torch.long)
        alpha_bar = sched.alphas_cumprod.to(torch.float64)
        final = torch.as_tensor(sched.final_alpha_cumprod, dtype=torch.float64).reshape(1)
        sigmas = torch.sqrt(1 - torch.cat([alpha_bar[timesteps], final]))
        return timesteps.to(self.device, torch.float32), sigmas.to(self.device, torch.float32)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, embeds: Dict[str, torch.Tensor]) -> torch.Tensor:
        added = None
        if self.is_sdxl:
            time_ids = torch.tensor([self.height, self.width, 0, 0, self.height, self.width], device=x.device,
                                    dtype=x.dtype).expand(x.shape[0], 6)
            added = {"text_embeds": embeds["pooled_prompt_embeds"], "time_ids": time_ids}
        return self.denoiser()(x, t, encoder_hidden_states=embeds["prompt_embeds"], added_cond_kwargs=added,
                               return_dict=False)[0]

    def _postprocess(self, output: torch.Tensor, latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v-prediction -> epsilon: ``eps = sqrt(ab) v + sqrt(1 - ab) x_t``."""
        if self.prediction_type == "epsilon":
            return output
        alpha_bar = self._alphas_cumprod.to(latents.device)[timesteps.round().long()]
        shape = (-1,) + (1,) * (latents.ndim - 1)
        return alpha_bar.sqrt().reshape(shape) * output + (1 - alpha_bar).sqrt().reshape(shape) * latents.float()
