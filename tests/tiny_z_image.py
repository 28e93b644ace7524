"""A tiny random ``ZImagePipeline`` built offline from config objects (no downloads).

Transformer sizes follow diffusers' own Z-Image ``get_dummy_components`` (dim 32, 2 layers, 1 refiner layer per
stream, 2 heads, caption features 16, RoPE axes (8, 4, 4)); the first RoPE axis (caption and image-start
positions) is 1024 long like the real model's, so captions of up to 512 tokens fit. The VAE is the 8x
:func:`tests.tiny_models.tiny_vae` with 16 latent channels and the FLUX VAE's scaling / shift factors; the
scheduler is Z-Image-Turbo's (static shift 3.0). The optional text encoder is a 2-layer ``Qwen3Model`` of
hidden size 16 (= the transformer's ``cap_feat_dim``) with the offline byte-level Qwen tokenizer.
"""

from __future__ import annotations

import torch

from .tiny_models import TINY_RES, tiny_qwen_tokenizer, tiny_vae

Z_IMAGE_RES = TINY_RES  # 64 px -> 8x8 latents -> 4x4 image tokens
CAP_DIM = 16


def tiny_qwen3_encoder(vocab_size: int = 259, hidden_size: int = CAP_DIM):
    """``Qwen3Model``: 2 layers, hidden 16, 2 heads of 8, vocabulary of the tiny Qwen tokenizer (259 ids)."""
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(hidden_size=hidden_size, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=8, vocab_size=vocab_size, max_position_embeddings=512,
                         pad_token_id=256, bos_token_id=None, eos_token_id=256, tie_word_embeddings=False)
    return Qwen3Model(config)


def tiny_z_image(with_text_encoders: bool = False, seed: int = 0, dynamic_shift: bool = False):
    """``ZImagePipeline`` with a tiny ``ZImageTransformer2DModel``; ``text_encoder`` / ``tokenizer`` are None unless
    ``with_text_encoders`` (built last, so the other weights do not depend on it). ``dynamic_shift``: a
    resolution-dependent scheduler shift instead of the static 3.0. Same ``seed``, same weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=CAP_DIM, rope_theta=256.0,
        t_scale=1000.0, axes_dims=[8, 4, 4], axes_lens=[1024, 32, 32],
    )
    with torch.no_grad():  # the pad tokens are allocated with torch.empty: give them seeded values
        transformer.x_pad_token.copy_(torch.randn_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.randn_like(transformer.cap_pad_token))
    vae = tiny_vae(latent_channels=16, shift_factor=0.1159, scaling_factor=0.3611)
    if dynamic_shift:
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                    base_image_seq_len=256, max_image_seq_len=4096)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    text_encoder = tokenizer = None
    if with_text_encoders:
        text_encoder, tokenizer = tiny_qwen3_encoder(), tiny_qwen_tokenizer()
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
