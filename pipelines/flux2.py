"""FLUX.2 [klein] (``Flux2KleinPipeline``) as a flow-matching :class:`~genalign.policy.Policy`.

Black Forest Labs, "FLUX.2 [klein]" (model cards ``black-forest-labs/FLUX.2-klein-4B`` / ``-9B`` and the
``-base-`` variants; https://bfl.ai/blog/flux2-klein-towards-interactive-visual-intelligence): a rectified-flow
transformer with a Qwen3 text encoder and the FLUX.2 VAE.

Latent layout: the VAE (``AutoencoderKLFlux2``) has C latent channels (32 for the released models) at 1/f of the
pixel size (f = 8), ``z [B, C, h, w]`` with h = H/f. FLUX.2 patchifies 2x2 -> ``[B, 4C, h/2, w/2]``, normalises
each of the 4C channels with the VAE's batch-norm running statistics, and packs the grid into tokens
``[B, (h/2)*(w/2), 4C]`` (``(B, (H/16)*(W/16), 128)`` for the released models; row-major token order). The rollout
latents are exactly these normalised tokens (the pipeline's own ``latents``); :meth:`Flux2KleinPolicy.decode`
unpacks, denormalises and unpatchifies before the VAE decoder, as the pipeline does.

Conditioning keys: ``prompt_embeds [B, L, 3D]`` only (no pooled embedding): the Qwen3 hidden states of layers
(9, 18, 27) side by side, the chat-templated prompt padded to L = 512 tokens; with CFG also
``negative_prompt_embeds`` (the empty prompt, as the pipeline uses).

Transformer call: ``timestep / 1000`` (the sigma), no guidance embedding (``guidance=None``, as the klein
pipeline passes), ``img_ids [N, 4]`` = (0, row, column, 0) per token and ``txt_ids [L, 4]`` = (0, 0, 0, l).

Defaults: ``guidance_scale`` is the true classifier-free guidance scale (4.0, the pipeline's default for the
undistilled klein base models; batched ``[negative; positive]``, two times the compute). The step-distilled klein
models (pipeline config ``is_distilled``) always run without CFG, whatever the guidance scale, as the pipeline
does. Schedule: ``linspace(1, 1/N, N)`` shifted by FLUX.2's empirical ``mu`` (a function of the image-token
count AND the number of steps, unlike FLUX.1's ``calculate_shift``), then 0 appended.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from genalign.policy import Cond

from ._base import DiffusersPolicy

FLUX2_LORA_TARGETS = (
    # double-stream blocks: image and text attention projections, SwiGLU feed-forwards of both streams
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
    # single-stream blocks: the fused QKV + MLP input projection. Their output projection ``attn.to_out`` is not
    # listed: that suffix also names the double blocks' ``to_out`` ModuleList, which peft refuses as a target.
    "to_qkv_mlp_proj",
)


def _pipeline_class():
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline


def pack_tokens(grid: torch.Tensor) -> torch.Tensor:
    """Patchified grid ``[B, 4C, h/2, w/2]`` -> tokens ``[B, (h/2)*(w/2), 4C]`` (the pipeline's ``_pack_latents``).

    Returned contiguous: the pipeline's packing is a transposed view, and element-wise results keep their inputs'
    memory layout, so a rollout started from the view would reduce its log-probs in another summation order than
    the recomputation from the stored (contiguous) states, and differ from them in the last bit."""
    return _pipeline_class()._pack_latents(grid).contiguous()


def unpack_tokens(tokens: torch.Tensor, grid_height: int, grid_width: int) -> torch.Tensor:
    """Inverse of :func:`pack_tokens` for a token grid of ``grid_height x grid_width`` (= latent size / 2)."""
    b, n, ch = tokens.shape
    if n != grid_height * grid_width:
        raise ValueError(f"{n} tokens do not fill a {grid_height}x{grid_width} token grid")
    return tokens.transpose(1, 2).reshape(b, ch, grid_height, grid_width)


class Flux2KleinPolicy(DiffusersPolicy):
    """Adapter for ``Flux2KleinPipeline`` (kind ``"flow"``).

    Conditioning keys: ``prompt_embeds [B, L, 3D]``; ``negative_prompt_embeds`` too when CFG is on
    (``guidance_scale > 1`` and the model is not step-distilled). Options: ``max_sequence_length`` (512) and
    ``text_encoder_out_layers`` ((9, 18, 27)), the pipeline's prompt-encoding arguments.
    """

    kind = "flow"
    default_guidance_scale = 4.0
    default_lora_targets = FLUX2_LORA_TARGETS
    denoiser_name = "transformer"
    pipeline_class_name = "Flux2KleinPipeline"
    pipeline_classes = ("Flux2KleinPipeline",)
    text_encoder_names = ("text_encoder",)
    resolution_multiple_extra = 2  # the 2x2 patchify
    cond_keys = ("prompt_embeds",)
    max_sequence_length = 512
    text_encoder_out_layers: Tuple[int, ...] = (9, 18, 27)

    def __init__(self, pipe, guidance_scale: Optional[float] = None, device=None, dtype: Optional[torch.dtype] = None,
                 height: Optional[int] = None, width: Optional[int] = None, max_sequence_length: Optional[int] = None,
                 text_encoder_out_layers: Optional[Sequence[int]] = None, **options):
        """``options``: ``offload_text_encoders`` / ``cache_prompt_embeds`` of
        :class:`~genalign.pipelines._base.DiffusersPolicy`."""
        if max_sequence_length is not None:
            self.max_sequence_length = int(max_sequence_length)
        if text_encoder_out_layers is not None:
            self.text_encoder_out_layers = tuple(int(i) for i in text_encoder_out_layers)
        super().__init__(pipe, guidance_scale=guidance_scale, device=device, dtype=dtype, height=height, width=width,
                         **options)

    # ---------------------------------------------------------------- guidance
    @property
    def is_distilled(self) -> bool:
        """The pipeline's ``is_distilled`` flag (step-distilled klein models: no classifier-free guidance)."""
        return bool(self.pipe.config.get("is_distilled", False))

    @property
    def cfg_scale(self) -> float:
        """``guidance_scale``, or 1 (CFG off) for a step-distilled model, as ``Flux2KleinPipeline`` decides."""
        return 1.0 if self.is_distilled else self.guidance_scale

    # ---------------------------------------------------------------- latents
    @property
    def latent_channels(self) -> int:
        """Channels of one token: 4C, the transformer's ``in_channels`` (the VAE has C = in_channels / 4)."""
        return int(self.denoiser().config.in_channels)

    @property
    def token_grid(self) -> Tuple[int, int]:
        """Token grid ``(h/2, w/2)`` (latent size after the 2x2 patchify)."""
        h, w = self.latent_size
        return h // 2, w // 2

    @property
    def latent_shape(self) -> Tuple[int, int]:
        """Packed normalised tokens ``((h/2)*(w/2), 4C)``."""
        gh, gw = self.token_grid
        return (gh * gw, self.latent_channels)

    def initial_latents(self, batch_size: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Noise drawn as the pipeline draws it (``[B, 4C, h/2, w/2]``), packed -> ``[B, N, 4C]`` float32."""
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor((batch_size, self.latent_channels, *self.token_grid), generator=generator,
                             device=self.device, dtype=torch.float32)
        return pack_tokens(noise)

    # ---------------------------------------------------------------- conditioning
    def cond_from_embeds(self, prompt_embeds: torch.Tensor, pooled_prompt_embeds: Optional[torch.Tensor] = None,
                         negative_prompt_embeds: Optional[torch.Tensor] = None,
                         negative_pooled_prompt_embeds: Optional[torch.Tensor] = None) -> Cond:
        """Conditioning from ``prompt_embeds [B, L, 3D]`` (and ``negative_prompt_embeds`` with CFG, batch B or 1).

        FLUX.2 has no pooled embedding (``pooled_*`` are ignored). The negative must have the positive's length L:
        the two run as one batch, and padding either one would change the output (the transformer gets no mask).
        """
        if self.uses_cfg and negative_prompt_embeds is not None and negative_prompt_embeds.ndim == 3 \
                and prompt_embeds.ndim == 3 and negative_prompt_embeds.shape[1:] != prompt_embeds.shape[1:]:
            raise ValueError(f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} and prompt_embeds "
                             f"{tuple(prompt_embeds.shape)} must have the same length and width (they run as one "
                             f"CFG batch)")
        return super().cond_from_embeds(prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)

    def _encode(self, prompts: List[str], negative: bool = True) -> Dict[str, Optional[torch.Tensor]]:
        self._require_text_encoders("text_encoder", "tokenizer")
        kw = dict(device=self.device, max_sequence_length=self.max_sequence_length,
                  text_encoder_out_layers=self.text_encoder_out_layers)
        out = {"prompt_embeds": self.pipe.encode_prompt(prompt=list(prompts), **kw)[0]}
        if self.uses_cfg and negative:  # the pipeline's negative prompt is always ""
            out["negative_prompt_embeds"] = self.pipe.encode_prompt(prompt=[""] * len(prompts), **kw)[0]
        return out

    # ---------------------------------------------------------------- schedule / forward
    def schedule(self, num_steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(timesteps [T], sigmas [T+1])`` exactly as ``Flux2KleinPipeline`` sets them on a copy of its scheduler:
        ``linspace(1, 1/T, T)`` (the scheduler's own spacing with ``use_flow_sigmas``) and ``mu`` from FLUX.2's
        empirical fit to the image-token count and T."""
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        sched = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        mu = compute_empirical_mu(image_seq_len=self.latent_shape[0], num_steps=num_steps)
        if sched.config.get("use_flow_sigmas", False):
            sched.set_timesteps(num_steps, device="cpu", mu=mu)
        else:
            sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), device="cpu", mu=mu)
        sigmas = sched.sigmas.to(torch.float32)
        timesteps = sched.timesteps.to(torch.float32)
        if sigmas.shape[0] != num_steps + 1 or timesteps.shape[0] != num_steps:
            raise ValueError(f"scheduler produced {timesteps.shape[0]} timesteps / {sigmas.shape[0]} sigmas for "
                             f"{num_steps} steps")
        return timesteps.to(self.device), sigmas.to(self.device)

    def _ids(self, text_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``img_ids [N, 4]`` (0, row, column, 0) of the tokens and ``txt_ids [L, 4]`` (0, 0, 0, l), built with the
        pipeline's own helpers (int64, as it passes them)."""
        gh, gw = self.token_grid
        key = (text_len, self.device, gh, gw)
        cache = self.__dict__.setdefault("_ids_cache", {})
        if key not in cache:  # built once per shape, not once per denoising step (never modified: read only)
            cache.clear()
            pipeline = _pipeline_class()
            img_ids = pipeline._prepare_latent_ids(torch.empty(1, 0, gh, gw))[0]
            txt_ids = pipeline._prepare_text_ids(torch.empty(1, text_len, 0))[0]
            cache[key] = (img_ids.to(self.device), txt_ids.to(self.device))
        return cache[key]

    def _forward(self, x: torch.Tensor, t: torch.Tensor, embeds: Dict[str, torch.Tensor]) -> torch.Tensor:
        prompt_embeds = embeds["prompt_embeds"]
        img_ids, txt_ids = self._ids(prompt_embeds.shape[1])
        return self.denoiser()(
            hidden_states=x, timestep=t.to(x.dtype) / 1000, guidance=None, encoder_hidden_states=prompt_embeds,
            txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
        )[0]

    # ---------------------------------------------------------------- decoding
    def _vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised tokens ``[B, N, 4C]`` -> VAE latents ``[B, C, h, w]``: unpacked, batch-norm statistics undone
        (``x * sqrt(running_var + eps) + running_mean``) and unpatchified; what the pipeline decodes (and returns
        for ``output_type="latent"``)."""
        vae = self.pipe.vae
        grid = unpack_tokens(latents, *self.token_grid)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(grid.device, grid.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(grid.device, grid.dtype)
        return _pipeline_class()._unpatchify_latents(grid * std + mean)

    def _from_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_vae_latents`: VAE latents ``[B, C, h, w]`` -> patchified, batch-norm normalised and
        packed tokens ``[B, N, 4C]`` (the pipeline's ``_encode_vae_image`` followed by its packing)."""
        vae = self.pipe.vae
        grid = _pipeline_class()._patchify_latents(latents)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(grid.device, grid.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(grid.device, grid.dtype)
        return pack_tokens((grid - mean) / std)

