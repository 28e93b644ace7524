"""open_clip-based rewards: CLIPScore (this file) and HPSv2 (``hpsv2.py``) share :class:`OpenClipReward`.

``clip_score`` = 2.5 * max(cos(image, text), 0) (Hessel et al., 2021) with an open_clip model.
``pretrained`` is an open_clip tag (``openai``, ``laion2b_s34b_b79k``, ...: fetched from the hub repository
open_clip names for it) or a weights file (local path or ``org/repo/file``; ``.safetensors`` or a torch
checkpoint loaded with ``weights_only=True``). Loading OpenAI weights from a file needs the matching
``-quickgelu`` architecture name (e.g. ``ViT-B-32-quickgelu``).
"""

from __future__ import annotations

from typing import List, Optional

import torch

from genalign.policy import ModelNotAvailableError, _offline

from ._common import ImagePrep, ModelReward, _side, cosine, looks_like_file, resolve_file

CLIP_SCORE_WEIGHT = 2.5


def load_open_clip(model_name: str, pretrained: str) -> torch.nn.Module:
    """An open_clip model ``model_name`` with weights from a tag or a file (never random weights)."""
    import open_clip

    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {model_name!r} (register a JSON config with "
                         f"open_clip.add_model_config, or pick one of open_clip.list_models())")
    if looks_like_file(pretrained):
        path = resolve_file(pretrained, f"open_clip {model_name} weights")
        model = open_clip.create_model(model_name, pretrained=None)
        open_clip.load_checkpoint(model, path, strict=True, weights_only=True)
        return model
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in tags:
        raise ValueError(f"open_clip has no pretrained tag {pretrained!r} for {model_name!r}: valid tags {tags}, "
                         f"or give a weights file (local path or 'org/repo/file')")
    repo = open_clip.get_pretrained_cfg(model_name, pretrained).get("hf_hub", "").strip("/")
    if repo and _offline():
        from huggingface_hub import snapshot_download

        try:
            snapshot_download(repo, local_files_only=True)
        except Exception:  # noqa: BLE001 - not cached
            raise ModelNotAvailableError(
                f"open_clip weights {model_name}/{pretrained} (hub repository {repo!r}) are not in the Hugging Face "
                f"cache and the hub is offline (HF_HUB_OFFLINE=1). Fetch them with `hf download {repo}` on a "
                f"machine with internet access and copy the cache, or pass pretrained=<local weights file>."
            ) from None
    return open_clip.create_model(model_name, pretrained=pretrained)


class OpenClipReward(ModelReward):
    """An open_clip model scoring image-prompt pairs by the cosine of their embeddings."""

    def __init__(self, model_name: str, pretrained: str, device=None, batch_size: Optional[int] = 32,
                 dtype="float32"):
        import open_clip

        super().__init__(device, batch_size, dtype)
        self.model = self.freeze(load_open_clip(model_name, pretrained))
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        size = _side(cfg.get("size"), 224)
        self.prep = ImagePrep(resize=size, crop=size, mean=tuple(cfg.get("mean", ImagePrep.mean)),
                              std=tuple(cfg.get("std", ImagePrep.std)))

    def cosine(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        """``[N]`` cosine similarity of each image's and its prompt's embedding (float32)."""
        image_features = self.model.encode_image(self.images_in(images, self.prep))
        text_features = self.model.encode_text(self.tokenizer(list(prompts)).to(self.device))
        return cosine(image_features, text_features)


class ClipScore(OpenClipReward):
    """CLIPScore: ``2.5 * max(cos, 0)``, in [0, 2.5]."""

    name = "clip_score"

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str = "openai", **kwargs):
        super().__init__(model_name, pretrained, **kwargs)

    def __call__(self, images: torch.Tensor, prompts: List[str], metadata=None) -> torch.Tensor:
        return CLIP_SCORE_WEIGHT * self.cosine(images, prompts).clamp(min=0)
