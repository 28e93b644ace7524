"""Wan 2.1 text-to-video (``WanPipeline``) as a flow-matching :class:`~genalign.policy.Policy`.

Wan (Wan Team, "Wan: Open and Advanced Large-Scale Video Generative Models", arXiv 2503.20314) is a flow-matching
video diffusion transformer: a umT5 text encoder, ``WanTransformer3DModel`` (3-D patches, patch size ``(1, 2, 2)``)
and the causal 3-D VAE ``AutoencoderKLWan`` (8x spatial, 4x temporal compression).

- Latents ``[B, C, F', h, w]``, unpacked (the transformer patchifies itself): C = 16, ``F' = (F - 1) / 4 + 1`` latent
  frames for F video frames (``num_frames``, 81 by default: 5 s at 16 fps), ``h, w = H / 8, W / 8``.
- :meth:`WanPolicy.decode` returns videos ``[B, F, 3, H, W]`` float32 in [0, 1], as ``WanPipeline`` decodes them
  (VAE ``latents_mean`` / ``latents_std`` denormalisation). Rewards see them through the per-video protocol of
  :mod:`genalign.reward_api` (a ``modality = "video"`` reward gets the videos, an image reward every frame, its
  scores averaged per video).
- The transformer predicts the velocity at ``timestep = 1000 * sigma``, conditioned on the umT5 embeddings
  (``encoder_hidden_states``, 512 tokens, zero past each prompt's end); no pooled embedding.
- Classifier-free guidance is true CFG (Wan 2.1: scale 5.0) with the empty prompt as negative (diffusers'
  default), batched ``[negative; positive]`` like SD3.
- Wan 2.2's two-expert pipelines (``transformer_2`` / ``boundary_ratio``) and per-token timesteps
  (``expand_timesteps``) are refused.

Sampling schedule: the official pipeline integrates with the UniPC multistep solver and a static ``flow_shift``
(3.0 at 480p, 5.0 at 720p). genalign's rollout takes flow-matching Euler (ODE) or SDE steps, so :meth:`schedule`
uses the sigma grid of ``FlowMatchEulerDiscreteScheduler`` with that shift (``sigma' = s sigma / (1 + (s - 1) sigma)``
on ``linspace(1, sigma_min, T)``, then 0), the grid an Euler solver of the same model uses. A pipeline built with
a ``FlowMatchEulerDiscreteScheduler`` is used as is (its ``shift``): then rollout ODE steps reproduce
``WanPipeline``'s own sampling. A UniPC scheduler only lends its ``flow_shift`` (the ``flow_shift`` option
overrides either).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ._base import DiffusersPolicy, flow_schedule, latent_channel_stats

WAN_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
"""Self-attention (``attn1``) and cross-attention (``attn2``) projections and the feed-forward layers of every
``WanTransformer3DModel`` block (the suffixes match both attentions)."""


class WanPolicy(DiffusersPolicy):
    """Adapter for ``WanPipeline`` (Wan 2.1 text-to-video; kind ``"flow"``).

    Conditioning keys: ``prompt_embeds [B, L, D]`` (umT5, L = :attr:`max_sequence_length`) and, when
    ``guidance_scale > 1``, ``negative_prompt_embeds`` (the empty prompt, or a prompt record's ``negative_prompt``).
    Options: ``num_frames`` (video frames F,
    default :attr:`default_num_frames`; ``(F - 1)`` must be a multiple of the VAE's temporal factor, 4),
    ``flow_shift`` (see the module docstring; None: the pipeline scheduler's), ``height`` / ``width`` (multiples of
    16; default 480 x 832, Wan 2.1's 480p).
    """

    kind = "flow"
    default_guidance_scale = 5.0
    default_lora_targets = WAN_LORA_TARGETS
    denoiser_name = "transformer"
    pipeline_class_name = "WanPipeline"
    pipeline_classes = ("WanPipeline",)
    text_encoder_names = ("text_encoder",)
    cond_keys = ("prompt_embeds",)
    max_sequence_length = 512
    default_num_frames = 81
    default_height, default_width = 480, 832

    def __init__(self, pipe, guidance_scale: Optional[float] = None, device=None, dtype: Optional[torch.dtype] = None,
                 height: Optional[int] = None, width: Optional[int] = None, num_frames: Optional[int] = None,
                 flow_shift: Optional[float] = None, **options):
        """``options``: ``offload_text_encoders`` / ``cache_prompt_embeds`` of
        :class:`~genalign.pipelines._base.DiffusersPolicy`."""
        if getattr(pipe, "transformer", None) is None or getattr(pipe, "transformer_2", None) is not None \
                or pipe.config.get("boundary_ratio") is not None or pipe.config.get("expand_timesteps", False):
            raise ValueError("WanPolicy supports Wan 2.1 text-to-video (one transformer, one timestep per sample); "
                             "this pipeline has a transformer_2 / boundary_ratio / expand_timesteps (Wan 2.2)")
        patch = tuple(pipe.transformer.config.patch_size)
        self.resolution_multiple_extra = int(max(patch[1], patch[2]))
        # the base class reads the spatial factor as `vae_scale_factor`, which WanPipeline names differently
        pipe.vae_scale_factor = int(pipe.vae_scale_factor_spatial)
        super().__init__(pipe, guidance_scale=guidance_scale, device=device, dtype=dtype,
                         height=height or self.default_height, width=width or self.default_width, **options)
        self.num_frames = self._check_num_frames(self.default_num_frames if num_frames is None else num_frames)
        self.flow_shift = None if flow_shift is None else float(flow_shift)

    def _check_num_frames(self, num_frames: int) -> int:
        factor = int(self.pipe.vae_scale_factor_temporal)
        if isinstance(num_frames, bool) or int(num_frames) != num_frames or num_frames < 1 \
                or (int(num_frames) - 1) % factor:
            raise ValueError(f"num_frames={num_frames!r}: (num_frames - 1) must be a multiple of the VAE's temporal "
                             f"factor {factor}, e.g. {factor + 1}, {8 * factor + 1} or {20 * factor + 1} "
                             f"(Wan 2.1 generates 81)")
        return int(num_frames)

    def _default_resolution(self) -> int:
        return self.default_height

    # ---------------------------------------------------------------- shapes
    @property
    def num_latent_frames(self) -> int:
        """``(num_frames - 1) / temporal factor + 1`` (the causal VAE keeps the first frame on its own)."""
        return (self.num_frames - 1) // int(self.pipe.vae_scale_factor_temporal) + 1

    @property
    def latent_shape(self) -> Tuple[int, int, int, int]:
        """``(C, F', h, w)`` per video."""
        h, w = self.latent_size
        return (int(self.denoiser().config.in_channels), self.num_latent_frames, h, w)

    # ---------------------------------------------------------------- conditioning
    def _encode(self, prompts: List[str], negative: bool = True) -> Dict[str, Optional[torch.Tensor]]:
        self._require_text_encoders("text_encoder")
        pe, npe = self.pipe.encode_prompt(prompt=prompts, do_classifier_free_guidance=self.uses_cfg and negative,
                                          max_sequence_length=self.max_sequence_length, device=self.device)
        return dict(prompt_embeds=pe, negative_prompt_embeds=npe)

    encode_images = None
    """No image encoding into the latent space: data-set training (``data.train_file``, images) does not apply to a
    video model; :mod:`genalign.datasets` refuses it naming this adapter."""

    # ---------------------------------------------------------------- schedule / forward
    def _euler_scheduler(self):
        """The ``FlowMatchEulerDiscreteScheduler`` whose sigmas :meth:`schedule` uses (module docstring)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = self.pipe.scheduler
        config = sched.config
        if isinstance(sched, FlowMatchEulerDiscreteScheduler):
            return sched if self.flow_shift is None else \
                FlowMatchEulerDiscreteScheduler.from_config(config, shift=self.flow_shift)
        shift = self.flow_shift if self.flow_shift is not None else config.get("flow_shift", config.get("shift"))
        if shift is None:
            raise ValueError(f"{type(sched).__name__} has no flow_shift: give WanPolicy(flow_shift=...) "
                             f"(Wan 2.1: 3.0 at 480p, 5.0 at 720p)")
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.get("num_train_timesteps", 1000),
                                               shift=float(shift))

    def schedule(self, num_steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Euler flow-matching sigmas with Wan's static shift -> ``(1000 * sigma [T], sigma [T+1])``."""
        _, f, h, w = self.latent_shape
        pt, ph, pw = self.denoiser().config.patch_size
        return flow_schedule(self._euler_scheduler(), num_steps, (f // pt) * (h // ph) * (w // pw), self.device)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, embeds: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.denoiser()(hidden_states=x, timestep=t, encoder_hidden_states=embeds["prompt_embeds"],
                               return_dict=False)[0]

    # ---------------------------------------------------------------- decoding
    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, C, F', h, w]`` -> videos ``[B, F, 3, H, W]`` in [-1, 1], as ``WanPipeline`` decodes them:
        ``z / (1 / latents_std) + latents_mean`` per channel, then the VAE (:meth:`decode` maps them to [0, 1])."""
        vae = self.pipe.vae
        z = latents.to(self.device, vae.dtype)
        mean, inv_std = latent_channel_stats(vae, z.device, z.dtype)
        return vae.decode(z / inv_std + mean, return_dict=False)[0].permute(0, 2, 1, 3, 4)  # [B, 3, F, H, W] -> F first
