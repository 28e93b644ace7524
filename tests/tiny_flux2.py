"""Tiny random FLUX.2 [klein] pipeline (``Flux2KleinPipeline``) built offline from config objects (no downloads).

Sizes follow diffusers' ``get_dummy_components`` for the klein pipeline (transformer: 1 double + 1 single block,
2 heads of 16, rope axes (4, 4, 4, 4), no guidance embedding; VAE with one latent group of 4 channels and batch
norm over the 2x2-patchified latents; Qwen3 with hidden size 16), with three changes:

- the VAE has two blocks (factor 2, so pixel, latent and token sizes all differ) and 2 latent channels (8 after
  the 2x2 patchify; the transformer's ``in_channels``), and its batch-norm running statistics are set to
  non-trivial values, so the latent (de)normalisation is exercised;
- the Qwen3 text encoder has 28 layers so that the pipeline's default ``text_encoder_out_layers`` (9, 18, 27) of
  the released klein models exist (the prompt embedding is their 3 hidden states side by side: 3 x 16 = 48, the
  transformer's ``joint_attention_dim``); it uses the byte-level tokenizer of :func:`tests.tiny_models.tiny_qwen_tokenizer`;
- the scheduler uses dynamic shifting like the released models, so the pipeline's empirical ``mu`` matters.

Images are :data:`TINY_FLUX2_RES` = 32 px: latents 16x16, 8x8 = 64 image tokens.
"""

from __future__ import annotations

import torch

TINY_FLUX2_RES = 32
QWEN_HIDDEN = 16
TEXT_DIM = 3 * QWEN_HIDDEN  # three stacked hidden states
LATENT_CHANNELS = 2


def tiny_qwen3_encoder(num_layers: int = 28, vocab_size: int = 259):
    """Qwen3ForCausalLM, hidden size 16, 2 heads, ``num_layers`` layers (vocabulary of the tiny Qwen tokenizer)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=QWEN_HIDDEN, intermediate_size=16, num_hidden_layers=num_layers,
        num_attention_heads=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
        pad_token_id=256, bos_token_id=None, eos_token_id=256, tie_word_embeddings=False,
    )
    return Qwen3ForCausalLM(config).eval()


def tiny_flux2_vae():
    """AutoencoderKLFlux2 with 2 blocks (4, 8 channels; 2x downsampling), 2 latent channels, BN over 8 channels."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        sample_size=TINY_FLUX2_RES, in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(4, 8), layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=1,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    channels = vae.bn.num_features
    with torch.no_grad():  # a trained VAE's statistics are not (0, 1): make the denormalisation visible
        vae.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, channels))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, channels))
    return vae.eval()


def tiny_flux2_klein(with_text_encoders: bool = False, seed: int = 0, is_distilled: bool = False):
    """Flux2KleinPipeline with tiny random weights (identical for the same ``seed``).

    ``with_text_encoders``: a 28-layer tiny Qwen3 text encoder and the byte-level Qwen tokenizer (built after the
    transformer and VAE, so their weights do not depend on it); otherwise None (condition with random
    ``prompt_embeds [B, L, 48]``). ``is_distilled``: the pipeline flag of the step-distilled klein models (no CFG).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )
    torch.manual_seed(seed + 1)
    vae = tiny_flux2_vae()
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
        shift=3.0, time_shift_type="exponential",
    )
    text_encoder = tokenizer = None
    if with_text_encoders:
        from .tiny_models import tiny_qwen_tokenizer

        torch.manual_seed(seed + 2)
        text_encoder, tokenizer = tiny_qwen3_encoder(), tiny_qwen_tokenizer()
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=is_distilled)
