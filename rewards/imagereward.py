"""ImageReward (BLIP-based human preference model, ``THUDM/ImageReward``), through the ``image-reward`` package.

Only available when that package is installed (``pip install genalign[imagereward]``); otherwise the
factory raises an ImportError saying so. ``model``: ``"ImageReward-v1.0"`` (the package fetches it from
the hub into ``download_root``) or a local ``ImageReward.pt``; ``med_config``: a local
``med_config.json`` (default: the package's own lookup). The package also loads the
``bert-base-uncased`` tokenizer, which must be cached when offline.
score = ``(raw - 0.16717) / 1.03334`` (the package's standardisation), computed with torch preprocessing.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from genalign.policy import ModelNotAvailableError, _offline

from ._common import ImagePrep, ModelReward

IMAGEREWARD_MODEL = "ImageReward-v1.0"
PROMPT_TOKENS = 35  # the package's max_length for prompts


def import_image_reward():
    """The ``ImageReward`` module, or an ImportError telling how to install it."""
    try:
        import ImageReward  # noqa: N813 - the package's own name
    except ImportError as exc:
        raise ImportError("the 'imagereward' reward needs the image-reward package: "
                          "pip install 'genalign[imagereward]' (or pip install image-reward)") from exc
    return ImageReward


class ImageRewardScore(ModelReward):
    """Standardised ImageReward score ``[N]`` (about -2..2)."""

    name = "imagereward"

    def __init__(self, model: str = IMAGEREWARD_MODEL, med_config: Optional[str] = None,
                 download_root: Optional[str] = None, device=None, batch_size: Optional[int] = 16, dtype="float32"):
        package = import_image_reward()
        super().__init__(device, batch_size, dtype)
        try:
            loaded = package.load(model, device=str(self.device), download_root=download_root, med_config=med_config)
        except Exception as exc:  # noqa: BLE001 - most likely an uncached download while offline
            if _offline():
                raise ModelNotAvailableError(
                    f"ImageReward {model!r} could not be loaded offline (HF_HUB_OFFLINE=1): {exc}. Fetch "
                    f"`hf download THUDM/ImageReward ImageReward.pt med_config.json` and "
                    f"`hf download bert-base-uncased` on a machine with internet access, then pass "
                    f"model=<ImageReward.pt> med_config=<med_config.json>."
                ) from exc
            raise
        self.model = self.freeze(loaded)
        self.prep = ImagePrep(resize=224, crop=224)

    def __call__(self, images: torch.Tensor, prompts: List[str], metadata=None) -> torch.Tensor:
        blip = self.model.blip
        tokens = blip.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=PROMPT_TOKENS,
                                return_tensors="pt").to(self.device)
        image_embeds = blip.visual_encoder(self.images_in(images, self.prep))
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        text = blip.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask, return_dict=True,
                                 encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts)
        raw = self.model.mlp(text.last_hidden_state[:, 0, :])[:, 0].float()
        return (raw - self.model.mean) / self.model.std
