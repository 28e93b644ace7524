"""Rewards (installed as ``genalign.rewards``): protocol, registry, script loading, built-ins.

Built-in reward models import their heavy dependencies lazily, inside their factories, and load weights
by hub id or local path (offline, an uncached id raises ``ModelNotAvailableError`` saying what to fetch).
A factory's keyword options (``reward_options: {name: {...}}`` in a config) are those of the class it
builds, documented there; model rewards also take ``device``, ``batch_size`` and ``dtype``.
"""

from .base import (RewardError, RewardSet, available_rewards, load_reward, load_script_function,
                   register_reward, score_reward, validate_scores)


@register_reward("digit_correct")
def _digit_correct(model_dir: str = "digits", device=None):
    """Probability, under the shipped digit classifier, of the digit the prompt asks for."""
    from .digits import DigitCorrectReward

    return DigitCorrectReward(model_dir=model_dir, device=device)


@register_reward("jpeg_compressibility")
def _jpeg_compressibility(**options):
    """-kB of the image as a JPEG at quality 95 (options: normalize, quality)."""
    from .jpeg import JpegReward

    return JpegReward(-1.0, **options)


@register_reward("jpeg_incompressibility")
def _jpeg_incompressibility(**options):
    """+kB of the image as a JPEG at quality 95 (options: normalize, quality)."""
    from .jpeg import JpegReward

    return JpegReward(1.0, **options)


@register_reward("clip_score")
def _clip_score(device=None, **options):
    """2.5 * max(cos(image, prompt), 0) with an open_clip model (options: model_name, pretrained)."""
    from .clip_score import ClipScore

    return ClipScore(device=device, **options)


@register_reward("pickscore")
def _pickscore(device=None, **options):
    """logit_scale * cos(image, prompt) under PickScore (options: model, processor, normalize)."""
    from .pickscore import PickScore

    return PickScore(device=device, **options)


@register_reward("hpsv2")
def _hpsv2(device=None, **options):
    """cos(image, prompt) under an HPSv2(.1) checkpoint on open_clip ViT-H-14 (options: checkpoint, model_name)."""
    from .hpsv2 import HPSv2

    return HPSv2(device=device, **options)


@register_reward("aesthetic")
def _aesthetic(device=None, **options):
    """LAION aesthetic MLP on normalised CLIP ViT-L/14 image embeddings (options: clip_model, mlp, processor)."""
    from .aesthetic import AestheticScore

    return AestheticScore(device=device, **options)


@register_reward("imagereward")
def _imagereward(device=None, **options):
    """ImageReward, needs ``pip install 'genalign[imagereward]'`` (options: model, med_config, download_root)."""
    from .imagereward import ImageRewardScore

    return ImageRewardScore(device=device, **options)


@register_reward("dino_similarity")
def _dino_similarity(device=None, **options):
    """Cosine of DINOv2 CLS embeddings to reference images (options: references, model, reduce)."""
    from .dino import DinoSimilarity

    return DinoSimilarity(device=device, **options)


@register_reward("exemplar_similarity")
def _exemplar_similarity(device=None, **options):
    """Cosine to an exemplar set's centroid or k nearest exemplars (options: encoder, references, mode, k)."""
    from .distributional import ExemplarSimilarity

    return ExemplarSimilarity(device=device, **options)


@register_reward("frechet_instance")
def _frechet_instance(device=None, **options):
    """-FD of one image's patch tokens / crops to reference statistics (options: encoder, references, source)."""
    from .distributional import InstanceFrechet

    return InstanceFrechet(device=device, **options)


@register_reward("frechet_set")
def _frechet_set(device=None, **options):
    """Set-level -FD of the batch to references, leave-one-out per sample (options: encoder, references)."""
    from .distributional import FrechetSetReward

    return FrechetSetReward(device=device, **options)


@register_reward("vendi")
def _vendi(device=None, **options):
    """Set-level Vendi diversity (cosine kernel), leave-one-out per sample (options: encoder)."""
    from .distributional import VendiReward

    return VendiReward(device=device, **options)


@register_reward("adversarial")
def _adversarial(device=None, **options):
    """Adv-GRPO discriminator on frozen DINOv2 (or digits) tokens, trained by the trainer (options: references, encoder)."""
    from .adversarial import AdversarialReward

    return AdversarialReward(device=device, **options)


@register_reward("ocr")
def _ocr(**options):
    """1 - normalised edit distance to the prompt's quoted text, needs ``genalign[ocr]`` (options: min_confidence)."""
    from .ocr import OcrReward

    return OcrReward(**options)


@register_reward("remote")
def _remote(**options):
    """A reward server speaking the JSON protocol of ``genalign.rewards.remote`` (options: url, timeout, ...)."""
    from .remote import RemoteReward

    if "url" not in options:
        raise ValueError("the remote reward needs a url: reward_options: {remote: {url: 'http://host:port/'}}")
    return RemoteReward(**options)


__all__ = ["RewardError", "RewardSet", "available_rewards", "load_reward", "load_script_function",
           "register_reward", "score_reward", "validate_scores"]
