"""A tiny random ``QwenImagePipeline`` built offline from config objects (no downloads).

Sizes follow diffusers' own Qwen-Image pipeline test (``get_dummy_components``): a 2-layer
``QwenImageTransformer2DModel`` (3 heads of 16, patch 2, 16 packed input channels = 4 latent channels x 2x2),
an ``AutoencoderKLQwenImage`` with z_dim 4 and a 4x spatial factor, and, when asked for, a 2-layer
``Qwen2_5_VLForConditionalGeneration`` text encoder (hidden size 16, the transformer's ``joint_attention_dim``)
with the byte-level Qwen2 tokenizer of :func:`tests.tiny_models.tiny_qwen_tokenizer`.

At :data:`TINY_QWEN_RES` = 32 px the latents are 8x8 (4 channels), packed to 16 tokens of 16 channels.
"""

from __future__ import annotations

import torch

from .tiny_models import tiny_qwen_tokenizer

TINY_QWEN_RES = 32  # pixels: 8x8 latents with the 4x VAE below, 4x4 = 16 packed tokens
QWEN_TEXT_DIM = 16  # text encoder hidden size = transformer joint_attention_dim


def tiny_qwen_text_encoder(vocab_size: int = 272):
    """Qwen2.5-VL with a 2-layer text model (hidden 16, 2 heads, multimodal RoPE sections 1/1/2) and a 2-layer
    vision tower (unused for text); ``vocab_size`` covers the tiny tokenizer's 259 ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": QWEN_TEXT_DIM, "intermediate_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": vocab_size,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0, "max_position_embeddings": 2048, "bos_token_id": None, "eos_token_id": 258,
            "pad_token_id": 256,
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=QWEN_TEXT_DIM, vocab_size=vocab_size, bos_token_id=None, eos_token_id=258, pad_token_id=256,
        # ids outside the tiny vocabulary's text range: the vision tokens never appear in a text prompt
        vision_start_token_id=vocab_size - 3, vision_end_token_id=vocab_size - 2, vision_token_id=vocab_size - 1,
        image_token_id=vocab_size - 4, video_token_id=vocab_size - 5,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen_image(with_text_encoders: bool = False, seed: int = 0):
    """``QwenImagePipeline`` with the tiny transformer, VAE and a flow-matching scheduler with a resolution-dependent
    exponential shift (base / max shift 0.5 / 0.9) and ``shift_terminal`` 0.02; the text encoder and tokenizer are
    None unless ``with_text_encoders`` (built last, so the other weights do not depend on it). Two calls with the same
    ``seed`` give identical weights."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=QWEN_TEXT_DIM, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    )
    z_dim = 4
    vae = AutoencoderKLQwenImage(
        base_dim=z_dim * 6, z_dim=z_dim, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        # not the identity, so that decode's de-normalisation is exercised
        latents_mean=[0.1, -0.2, 0.05, 0.0], latents_std=[1.5, 0.8, 1.2, 2.0],
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, time_shift_type="exponential", shift_terminal=0.02,
    )
    encoders = dict(text_encoder=None, tokenizer=None)
    if with_text_encoders:
        encoders = dict(text_encoder=tiny_qwen_text_encoder(), tokenizer=tiny_qwen_tokenizer(max_length=2048))
    return QwenImagePipeline(transformer=transformer, vae=vae, scheduler=scheduler, **encoders)
