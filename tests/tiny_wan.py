"""A tiny random Wan 2.1 text-to-video pipeline built offline from config objects (no downloads).

Sizes follow diffusers' own Wan test (``get_dummy_components``): ``AutoencoderKLWan`` base_dim 3, z_dim 16, 8x spatial
and 4x temporal compression; ``WanTransformer3DModel`` patch (1, 2, 2), 2 heads of 12, 2 layers, text_dim 32. The
scheduler is ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` (Wan 2.1's 480p shift), with which the adapter's
rollout ODE steps reproduce the pipeline's sampling exactly. Videos of :data:`TINY_FRAMES` frames at
:data:`TINY_WAN_RES` pixels have latents ``[16, 2, 4, 4]``.
"""

from __future__ import annotations

import torch

from .tiny_models import T5_DIM, tiny_t5_tokenizer

TINY_WAN_RES = 32  # pixels (multiple of 16); latents 4x4
TINY_FRAMES = 5    # frames; (5 - 1) / 4 + 1 = 2 latent frames
TINY_SHIFT = 3.0


def tiny_umt5_encoder():
    """Wan's text encoder, tiny: a UMT5EncoderModel (:func:`tests.tiny_models.tiny_t5_encoder` with ``umt5``) whose
    vocabulary covers the 192 ids of :func:`tests.tiny_models.tiny_t5_tokenizer`."""
    from .tiny_models import tiny_t5_encoder

    return tiny_t5_encoder(umt5=True)


def tiny_wan(with_text_encoders: bool = False, seed: int = 0):
    """WanPipeline (Wan 2.1 T2V layout: one transformer); the umT5 encoder and T5 tokenizer only when
    ``with_text_encoders`` (built last, so the other weights do not depend on it)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=T5_DIM, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    encoders = dict(text_encoder=None, tokenizer=None)
    if with_text_encoders:
        encoders = dict(text_encoder=tiny_umt5_encoder(), tokenizer=tiny_t5_tokenizer())
    return WanPipeline(vae=vae, transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=TINY_SHIFT),
                       **encoders)
