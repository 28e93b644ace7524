"""LAION aesthetic predictor (improved-aesthetic-predictor): an MLP on L2-normalised CLIP ViT-L/14 image
embeddings, scoring about 1..10.

``clip_model``: the CLIP (hub id or directory, default ``openai/clip-vit-large-patch14``); ``mlp``: the MLP
weights file (local path or ``org/repo/file``, ``.safetensors`` or a torch ``.pth`` read with
``weights_only=True``), with the original key names ``layers.{0,2,4,6,7}.{weight,bias}``.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from ._common import load_state_dict_file, resolve_file
from .pickscore import HFClipReward

AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
AESTHETIC_MLP = "camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth"


class AestheticMLP(nn.Module):
    """768-1024-128-64-16-1 (dropouts between the first layers, as in the original; inert in eval mode)."""

    def __init__(self, input_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


class AestheticScore(HFClipReward):
    """MLP(normalised CLIP image embedding) -> ``[N]``."""

    name = "aesthetic"

    def __init__(self, clip_model: str = AESTHETIC_CLIP, mlp: str = AESTHETIC_MLP, processor: Optional[str] = None,
                 **kwargs):
        super().__init__(clip_model, processor, **kwargs)
        state = load_state_dict_file(resolve_file(mlp, "aesthetic MLP weights"))
        head = AestheticMLP(state["layers.0.weight"].shape[1] if "layers.0.weight" in state else 768)
        head.load_state_dict(state)
        self.mlp = self.freeze(head)

    def __call__(self, images: torch.Tensor, prompts: List[str], metadata=None) -> torch.Tensor:
        embeddings = self.image_features(images)
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        return self.mlp(embeddings)[:, 0].float()
