"""Tiny random diffusers pipelines built offline from config objects (no downloads).

Sizes follow diffusers' own ``get_dummy_components`` test helpers. Every builder seeds torch so two
calls give identical weights. Text encoders (tiny CLIP / T5 with offline tokenizers) are None unless asked
for (``with_text_encoders=True``; built after the denoiser and VAE, so those weights do not depend on it).
Without text encoders, conditioning is built from random embeddings with :func:`random_embeds` and the
policy's ``cond_from_embeds``.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

TINY_RES = 64  # pixels; latents are 8x8 with the 8x VAE below
CLIP_DIM = 32


def tiny_vae(latent_channels: int = 4, shift_factor: Optional[float] = None, scaling_factor: float = 1.5):
    """AutoencoderKL with 4 blocks (8x downsampling), 8/8/16/16 channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=TINY_RES,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
        use_quant_conv=shift_factor is None,
        use_post_quant_conv=shift_factor is None,
    )


def _bytes_to_unicode():
    """The GPT-2 / CLIP byte -> printable character table (256 characters)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def tiny_clip_tokenizer(max_length: int = 16):
    """Byte-level CLIP tokenizer from an in-memory vocabulary (every byte a token, no merges)."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_qwen_tokenizer(max_length: int = 512):
    """Byte-level Qwen2 tokenizer from an in-memory vocabulary (every byte a token, no merges; 259 ids):
    ``<|endoftext|>`` (256, also the pad token), ``<|im_start|>`` (257), ``<|im_end|>`` (258) and a ChatML chat
    template, as the Qwen2.5-VL / Qwen3 text encoders of Qwen-Image, Z-Image and FLUX.2 klein expect."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(_bytes_to_unicode())}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|endoftext|>",
                         pad_token="<|endoftext|>", model_max_length=max_length)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def tiny_clip_encoder(with_projection: bool = True, vocab_size: int = 514, max_length: int = 16):
    """CLIP text encoder, hidden size 32, 2 layers (with a 32-d projection when ``with_projection``)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=CLIP_DIM, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab_size, projection_dim=CLIP_DIM,
        max_position_embeddings=max_length, hidden_act="gelu",
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


T5_DIM = 32


def tiny_t5_tokenizer(max_length: int = 512):
    """SentencePiece-style (Unigram) T5 tokenizer from an in-memory vocabulary: one piece per printable ASCII
    character, with and without the word-start marker; ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, no extra ids."""
    import string

    from transformers import T5Tokenizer

    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def tiny_t5_encoder(vocab_size: int = 4 + 2 * 94, d_model: int = T5_DIM, umt5: bool = False):
    """T5EncoderModel, d_model 32, 2 layers, 4 heads, no dropout (relative position buckets: any sequence length);
    ``umt5``: a UMT5EncoderModel with umT5-XXL's gated-GELU feed-forward (Wan's text encoder) instead."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                        feed_forward_proj="gated-gelu" if umt5 else "relu", is_encoder_decoder=False)
    return model_cls(config)


def tiny_sd3(with_text_encoders: bool = False, seed: int = 0):
    """StableDiffusion3Pipeline: SD3Transformer2DModel patch 2, 2 layers; optional 2 tiny CLIP encoders (no T5)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=TINY_RES // 8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
        joint_attention_dim=2 * CLIP_DIM, pooled_projection_dim=2 * CLIP_DIM,
    )
    encoders = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    if with_text_encoders:
        encoders = dict(text_encoder=tiny_clip_encoder(), tokenizer=tiny_clip_tokenizer(),
                        text_encoder_2=tiny_clip_encoder(), tokenizer_2=tiny_clip_tokenizer())
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=tiny_vae(shift_factor=0.0609, scaling_factor=1.5035),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder_3=None, tokenizer_3=None, **encoders,
    )


def tiny_flux(guidance_embeds: bool = True, seed: int = 0, with_text_encoders: bool = False):
    """FluxPipeline: 1 double + 2 single blocks, rope axes (4, 6, 6), 4 latent channels; optional tiny text
    encoders (pooled CLIPTextModel hidden 32 as ``text_encoder``, T5EncoderModel d_model 32 as ``text_encoder_2``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
        guidance_embeds=guidance_embeds,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )
    vae = tiny_vae(shift_factor=0.1159, scaling_factor=0.3611)
    encoders = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    if with_text_encoders:
        encoders = dict(text_encoder=tiny_clip_encoder(with_projection=False), tokenizer=tiny_clip_tokenizer(),
                        text_encoder_2=tiny_t5_encoder(), tokenizer_2=tiny_t5_tokenizer())
    return FluxPipeline(transformer=transformer, vae=vae, scheduler=scheduler, **encoders)


def _tiny_unet(sdxl: bool):
    from diffusers import UNet2DConditionModel

    common = dict(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=TINY_RES // 8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    if not sdxl:
        return UNet2DConditionModel(cross_attention_dim=CLIP_DIM, attention_head_dim=4, **common)
    return UNet2DConditionModel(
        cross_attention_dim=2 * CLIP_DIM, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + CLIP_DIM, **common,
    )


def _ddim_scheduler(prediction_type: str):
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def tiny_sd(prediction_type: str = "epsilon", seed: int = 0, with_text_encoders: bool = False):
    """StableDiffusionPipeline (SD1.x layout): tiny UNet, cross-attention dim 32; optional tiny CLIPTextModel
    (hidden 32, byte-level tokenizer of 16 tokens)."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(seed)
    unet, vae = _tiny_unet(sdxl=False), tiny_vae()
    encoders = dict(text_encoder=None, tokenizer=None)
    if with_text_encoders:
        encoders = dict(text_encoder=tiny_clip_encoder(with_projection=False), tokenizer=tiny_clip_tokenizer())
    return StableDiffusionPipeline(
        unet=unet, vae=vae, scheduler=_ddim_scheduler(prediction_type),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False, **encoders,
    )


def tiny_sdxl(prediction_type: str = "epsilon", seed: int = 0):
    """StableDiffusionXLPipeline without text encoders: tiny UNet with text_time added conditioning."""
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(seed)
    return StableDiffusionXLPipeline(
        unet=_tiny_unet(sdxl=True), vae=tiny_vae(), scheduler=_ddim_scheduler(prediction_type),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
    )


def random_embeds(batch: int, seq: int, dim: int, pooled_dim: Optional[int] = None, seed: int = 0,
                  negative: bool = True) -> Dict[str, torch.Tensor]:
    """Random ``cond_from_embeds`` keyword arguments: prompt_embeds ``[B, seq, dim]``, pooled ``[B, pooled_dim]``
    and (when ``negative``) the same for the negative prompt."""
    g = torch.Generator().manual_seed(seed)
    out = {"prompt_embeds": torch.randn(batch, seq, dim, generator=g)}
    if pooled_dim is not None:
        out["pooled_prompt_embeds"] = torch.randn(batch, pooled_dim, generator=g)
    if negative:
        for k in list(out):
            out["negative_" + k] = torch.randn(out[k].shape, generator=g)
    return out


def save_pipeline(pipe, directory) -> str:
    """Save ``pipe`` with ``save_pretrained`` into ``directory`` and return its path (for ``XPolicy.from_pretrained``)."""
    pipe.save_pretrained(str(directory))
    return str(directory)


def randomize_lora(denoiser, scale: float, seed: int = 0) -> None:
    """Give a freshly added LoRA non-zero B matrices (so it changes the model), deterministically."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
