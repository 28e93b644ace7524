"""HPSv2 / HPSv2.1 (human preference score): an open_clip ViT-H-14 fine-tuned on human preferences.

The score is the cosine of the image and prompt embeddings (about 0.2-0.35 for real images). The
checkpoint (``HPS_v2_compressed.pt`` or ``HPS_v2.1_compressed.pt`` from the ``xswu/HPSv2`` hub repository,
or any local copy, ``.safetensors`` or a torch checkpoint read with ``weights_only=True``) replaces all of
the architecture's weights, so no other CLIP weights are needed.
"""

from __future__ import annotations

from typing import List

import torch

from .clip_score import OpenClipReward

HPSV2_CHECKPOINT = "xswu/HPSv2/HPS_v2.1_compressed.pt"


class HPSv2(OpenClipReward):
    """``cos(image, prompt)`` under the HPSv2 checkpoint (``model_name``: the architecture, ViT-H-14)."""

    name = "hpsv2"

    def __init__(self, checkpoint: str = HPSV2_CHECKPOINT, model_name: str = "ViT-H-14", **kwargs):
        super().__init__(model_name, checkpoint, **kwargs)

    def __call__(self, images: torch.Tensor, prompts: List[str], metadata=None) -> torch.Tensor:
        return self.cosine(images, prompts)
