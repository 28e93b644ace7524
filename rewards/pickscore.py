"""PickScore: a CLIP-H fine-tuned on Pick-a-Pic preferences (transformers ``CLIPModel``).

score = ``logit_scale.exp() * cos(image, prompt)`` (about 18-23 for real images); ``normalize=True``
divides by 26 as flow_grpo does. ``model`` and ``processor`` are hub ids or local directories (the
processor gives the tokenizer and ``preprocessor_config.json``; images are preprocessed in torch).
"""

from __future__ import annotations

from typing import List, Optional

import torch

from ._common import ImagePrep, ModelReward, cosine, features, load_tokenizer

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PICKSCORE_NORMALIZER = 26.0


class HFClipReward(ModelReward):
    """A transformers ``CLIPModel`` (``model``) with the image preprocessing of ``processor`` (default: ``model``)."""

    def __init__(self, model: str, processor: Optional[str] = None, device=None, batch_size: Optional[int] = 32,
                 dtype="float32"):
        from transformers import CLIPModel

        from genalign.policy import resolve_pretrained

        super().__init__(device, batch_size, dtype)
        self.model_id, self.processor_id = model, processor or model
        self.model = self.freeze(CLIPModel.from_pretrained(resolve_pretrained(model)))
        self.prep = ImagePrep.from_processor_dir(resolve_pretrained(self.processor_id))

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return features(self.model.get_image_features(pixel_values=self.images_in(images, self.prep)))


class PickScore(HFClipReward):
    """``logit_scale * cos(image, prompt)`` (``/ 26`` when ``normalize``)."""

    name = "pickscore"

    def __init__(self, model: str = PICKSCORE_MODEL, processor: Optional[str] = PICKSCORE_PROCESSOR,
                 normalize: bool = False, **kwargs):
        super().__init__(model, processor, **kwargs)
        self.tokenizer = load_tokenizer(self.processor_id)
        self.scale = 1.0 / PICKSCORE_NORMALIZER if normalize else 1.0

    def text_features(self, prompts: List[str]) -> torch.Tensor:
        max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt").to(self.device)
        return features(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                     attention_mask=tokens["attention_mask"]))

    def __call__(self, images: torch.Tensor, prompts: List[str], metadata=None) -> torch.Tensor:
        cos = cosine(self.image_features(images), self.text_features(prompts))
        return self.scale * self.model.logit_scale.exp().float() * cos
