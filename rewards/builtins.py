"""Factories of the built-in rewards, declared as ``genalign.rewards`` entry points in pyproject.toml
(one line per reward, ``name = "genalign.rewards.builtins:name"``), exactly as a third-party package declares
its own (see :mod:`genalign.plugins`). Each is called with the reward's options and imports its reward
module, and that module's heavy dependencies, only then.
"""

from __future__ import annotations


def digit_correct(model_dir: str = "digits", device=None, score: str = "probability"):
    """Probability, under the shipped digit classifier, of the digit the prompt asks for (options: score =
    probability | log_probability | accuracy)."""
    from .digits import DigitCorrectReward

    return DigitCorrectReward(model_dir=model_dir, device=device, score=score)


def jpeg_compressibility(**options):
    """-kB of the image as a JPEG at quality 95 (options: normalize, quality)."""
    from .jpeg import JpegReward

    return JpegReward(-1.0, **options)


def jpeg_incompressibility(**options):
    """+kB of the image as a JPEG at quality 95 (options: normalize, quality)."""
    from .jpeg import JpegReward

    return JpegReward(1.0, **options)


def clip_score(device=None, **options):
    """2.5 * max(cos(image, prompt), 0) with an open_clip model (options: model_name, pretrained)."""
    from .clip_score import ClipScore

    return ClipScore(device=device, **options)


def pickscore(device=None, **options):
    """logit_scale * cos(image, prompt) under PickScore (options: model, processor, normalize)."""
    from .pickscore import PickScore

    return PickScore(device=device, **options)


def hpsv2(device=None, **options):
    """cos(image, prompt) under an HPSv2(.1) checkpoint on open_clip ViT-H-14 (options: checkpoint, model_name)."""
    from .hpsv2 import HPSv2

    return HPSv2(device=device, **options)


def aesthetic(device=None, **options):
    """LAION aesthetic MLP on normalised CLIP ViT-L/14 image embeddings (options: clip_model, mlp, processor)."""
    from .aesthetic import AestheticScore

    return AestheticScore(device=device, **options)


def imagereward(device=None, **options):
    """ImageReward, needs ``pip install 'genalign[imagereward]'`` (options: model, med_config, download_root)."""
    from .imagereward import ImageRewardScore

    return ImageRewardScore(device=device, **options)


def dino_similarity(device=None, **options):
    """Cosine of DINOv2 CLS embeddings to reference images (options: references, model, reduce)."""
    from .dino import DinoSimilarity

    return DinoSimilarity(device=device, **options)


def exemplar_similarity(device=None, **options):
    """Cosine to an exemplar set's centroid or k nearest exemplars (options: encoder, references, mode, k)."""
    from .distributional import ExemplarSimilarity

    return ExemplarSimilarity(device=device, **options)


def frechet_instance(device=None, **options):
    """-FD of one image's patch tokens / crops to reference statistics (options: encoder, references, source)."""
    from .distributional import InstanceFrechet

    return InstanceFrechet(device=device, **options)


def frechet_set(device=None, **options):
    """Set-level -FD of the batch to references, leave-one-out per sample (options: encoder, references)."""
    from .distributional import FrechetSetReward

    return FrechetSetReward(device=device, **options)


def vendi(device=None, **options):
    """Set-level Vendi diversity (cosine kernel), leave-one-out per sample (options: encoder)."""
    from .distributional import VendiReward

    return VendiReward(device=device, **options)


def adversarial(device=None, **options):
    """Adv-GRPO discriminator on frozen DINOv2 (or digits) tokens, trained by the trainer (options: references, encoder)."""
    from .adversarial import AdversarialReward

    return AdversarialReward(device=device, **options)


def ocr(**options):
    """1 - normalised edit distance to the prompt's quoted text, needs ``genalign[ocr]`` (options: min_confidence)."""
    from .ocr import OcrReward

    return OcrReward(**options)


def vlm_judge(**options):
    """A VLM over an OpenAI-compatible chat API: P(yes) or a parsed score (options: base_url, model, question,
    mode, max_score, api_key_env, concurrency, timeout, retries)."""
    from .vlm import VLMJudgeReward

    return VLMJudgeReward(**options)


def remote(**options):
    """A reward server speaking the JSON protocol of ``genalign.rewards.remote`` (options: url, timeout, ...)."""
    from .remote import RemoteReward

    if "url" not in options:
        raise ValueError("the remote reward needs a url: reward_options: {remote: {url: 'http://host:port/'}}")
    return RemoteReward(**options)
